"""PostgresML's own SQL files (``tests/postgresml/``, unmodified) run through the proxy with psql.

``tests/test.sql`` and every ``examples/*.sql`` of postgresml/postgresml run with ``ON_ERROR_STOP`` on a
scratch database of the bundled PostgreSQL 18, from the directory that holds them (test.sql ``\\i``'s the
examples by relative path, as in PostgresML's repository). Nothing is downloaded:

- hub model names resolve to local stand-ins in a ``model_dirs`` directory laid out by hub id:
  all-MiniLM-L6-v2 (hard links) for the sentence-embedding names, and tiny random models of each named
  model's architecture and task (save_pretrained, a word-level tokenizer over the files' own words) for the
  others, including the default models of the tasks transformers.sql names without a model;
- hub datasets come from the proxy's Hugging Face datasets cache (``HF_HOME``), filled here with tiny
  datasets of the same names, configurations, splits and features: what a proxy that once loaded them
  online holds, and what ``pgml.load_dataset('imdb')`` offline reads.

After a file has run, a few of its results are checked through the proxy (predictions are labels of the
training data, the last deploy chose the algorithm it named, chunks come from the document …).

A few statements of transformers.sql (which test.sql leaves out) cannot run on any host of this suite:
4-bit bitsandbytes loading, GGML and GPTQ models (``UNRUNNABLE``). That file runs in full without
``ON_ERROR_STOP``; exactly those statements must fail, with the SQLSTATE listed, and all others succeed.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import MINILM, Postgres, ProxyProcess, link_tree, scratch_database, start_proxy

FILES = Path(__file__).resolve().parent / "postgresml"
EXAMPLES = sorted(p.name for p in (FILES / "examples").glob("*.sql"))

# --------------------------------------------------------------------------- #
# Stand-in models
# --------------------------------------------------------------------------- #

# Sentence-embedding models the files name: all-MiniLM-L6-v2 stands in for each (sentence-transformers).
EMBEDDERS = (MINILM, "Alibaba-NLP/gte-base-en-v1.5", "hkunlp/instructor-xl", "mixedbread-ai/mxbai-embed-large-v1")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Tokenizer styles: special tokens (in id order from 0), the single/pair templates, the model's inputs.
STYLES: dict[str, dict[str, Any]] = {
    "bert": {
        "specials": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]"},
        "single": "[CLS] $A [SEP]", "pair": "[CLS] $A [SEP] $B:1 [SEP]:1", "tokens": ("[CLS]", "[SEP]"),
        "inputs": ["input_ids", "token_type_ids", "attention_mask"],
    },
    "roberta": {
        "specials": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                     "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"},
        "single": "<s> $A </s>", "pair": "<s> $A </s> </s> $B </s>", "tokens": ("<s>", "</s>"),
        "inputs": ["input_ids", "attention_mask"],
    },
    "seq2seq": {  # T5 and Marian: source </s>, no BOS
        "specials": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        "single": "$A </s>", "pair": "$A </s> $B </s>", "tokens": ("</s>",),
        "inputs": ["input_ids", "attention_mask"],
    },
    "causal": {
        "specials": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        "single": None, "pair": None, "tokens": (),
        "inputs": ["input_ids", "attention_mask"],
    },
}  # fmt: skip


def vocabulary() -> list[str]:
    """Every word (and punctuation run) of the SQL files and of the stand-in datasets."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    text = " ".join(p.read_text() for p in FILES.rglob("*.sql")) + " " + " ".join(WORDS) + " user assistant system"
    words = {piece for piece, _ in split.pre_tokenize_str(text)}
    return sorted(words | {w.lower() for w in words})


def save_tokenizer(directory: Path, style: str, words: list[str], chat_template: str | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    specials: dict[str, str] = spec["specials"]
    ordered = list(dict.fromkeys(specials.values()))
    vocab = {token: i for i, token in enumerate([*ordered, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if spec["single"]:
        backend.post_processor = processors.TemplateProcessing(
            single=spec["single"], pair=spec["pair"], special_tokens=[(t, vocab[t]) for t in spec["tokens"]]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=512, model_input_names=spec["inputs"], **specials
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_model(directory: Path, kind: str, words: list[str], labels: tuple[str, ...] = ()) -> None:
    """A 1-layer random model of ``kind`` (an architecture and head) with its tokenizer, in ``directory``."""
    import torch
    import transformers as tf

    style = {"bert": "bert", "distilbert": "bert", "roberta": "roberta", "t5": "seq2seq", "marian": "seq2seq",
             "bart": "roberta"}.get(kind.split(":")[0], "causal")  # fmt: skip
    tok = save_tokenizer(directory, style, words, CHAT_TEMPLATE if style == "causal" else None)
    size = len(tok)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)}) if labels else {}  # fmt: skip
    arch, _, task = kind.partition(":")
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    torch.manual_seed(0)
    model: Any
    if arch == "bert":
        config = tf.BertConfig(vocab_size=size, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                               **small, **head)  # fmt: skip
        model = {"cls": tf.BertForSequenceClassification, "token": tf.BertForTokenClassification}[task](config)
    elif arch == "distilbert":
        config = tf.DistilBertConfig(vocab_size=size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                     max_position_embeddings=512, pad_token_id=tok.pad_token_id, **head)  # fmt: skip
        model = {"mlm": tf.DistilBertForMaskedLM, "cls": tf.DistilBertForSequenceClassification,
                 "qa": tf.DistilBertForQuestionAnswering}[task](config)  # fmt: skip
    elif arch == "roberta":
        config = tf.RobertaConfig(vocab_size=size, max_position_embeddings=520, type_vocab_size=1,
                                  bos_token_id=tok.bos_token_id, **ids, **small, **head)  # fmt: skip
        model = {"cls": tf.RobertaForSequenceClassification, "qa": tf.RobertaForQuestionAnswering}[task](config)
    elif arch == "bart":
        config = tf.BartConfig(
            vocab_size=size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=1024,
            bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id, **ids,
        )  # fmt: skip
        model = tf.BartForConditionalGeneration(config)
    elif arch == "marian":
        config = tf.MarianConfig(
            vocab_size=size, decoder_vocab_size=size, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_position_embeddings=512, decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=tok.eos_token_id,
            **ids,
        )  # fmt: skip
        model = tf.MarianMTModel(config)
    elif arch == "t5":
        prefix = {"prefix": "translate English to French: ", "max_length": 20, "num_beams": 1}
        config = tf.T5Config(
            vocab_size=size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            decoder_start_token_id=tok.pad_token_id, task_specific_params={"translation_en_to_fr": prefix}, **ids,
        )  # fmt: skip
        model = tf.T5ForConditionalGeneration(config)
    elif arch == "llama":
        config = tf.LlamaConfig(vocab_size=size, num_key_value_heads=1, max_position_embeddings=4096,
                                bos_token_id=tok.bos_token_id, **ids, **small)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = tf.Qwen2Config(vocab_size=size, num_key_value_heads=1, max_position_embeddings=4096,
                                bos_token_id=tok.bos_token_id, **ids, **small)  # fmt: skip
        model = tf.Qwen2ForCausalLM(config)
    elif arch == "bloom":
        config = tf.BloomConfig(vocab_size=size, hidden_size=16, n_layer=1, n_head=2,
                                bos_token_id=tok.bos_token_id, **ids)  # fmt: skip
        model = tf.BloomForCausalLM(config)
    else:
        raise AssertionError(kind)
    if model.can_generate():
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.max_length = 20
    model.save_pretrained(directory)
    if task == "gptq":  # as the quantized repository declares itself (transformers needs gptqmodel/optimum for it)
        path = directory / "config.json"
        config_json = json.loads(path.read_text())
        config_json["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 128,
                                              "desc_act": False, "sym": True}  # fmt: skip
        path.write_text(json.dumps(config_json, indent=2))


# Hub id -> (architecture:head, labels). The task defaults are those of engine.nlp.tasks.DEFAULT_MODELS.
TINY_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    # finetune.sql
    "Helsinki-NLP/opus-mt-en-es": ("marian", ()),
    "distilbert-base-uncased": ("distilbert:mlm", ()),
    "deepset/roberta-base-squad2": ("roberta:qa", ()),
    "sshleifer/distilbart-xsum-12-1": ("bart", ()),
    # transformers.sql, named
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ("llama", ()),
    "bigscience/bloom-1b7": ("bloom", ()),
    "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8": ("qwen2:gptq", ()),
    "roberta-large-mnli": ("roberta:cls", ("CONTRADICTION", "NEUTRAL", "ENTAILMENT")),
    "finiteautomata/bertweet-base-sentiment-analysis": ("roberta:cls", ("NEG", "NEU", "POS")),
    "ProsusAI/finbert": ("bert:cls", ("positive", "negative", "neutral")),
    # transformers.sql, task defaults
    "google-t5/t5-base": ("t5", ()),
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english": ("distilbert:cls", ("NEGATIVE", "POSITIVE")),
    "distilbert/distilbert-base-cased-distilled-squad": ("distilbert:qa", ()),
    "sshleifer/distilbart-cnn-12-6": ("bart", ()),
    "dbmdz/bert-large-cased-finetuned-conll03-english": (
        "bert:token", ("O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"),
    ),
}
# Not stood in: GGML files (PostgresML loaded them with ctransformers; transformers reads GGUF, not GGML).
NO_STANDIN = ("TheBloke/MPT-7B-Storywriter-GGML", "marella/gpt-2-ggml")
FINETUNE_MODELS = tuple(list(TINY_MODELS)[:4])
TRANSFORMERS_MODELS = tuple(list(TINY_MODELS)[4:])


class Standins:
    """The proxy's model directory; stand-ins are built on first need (a file's test asks for its own)."""

    def __init__(self, base: Path, minilm: Path) -> None:
        self.base, self.minilm = base, minilm
        self._words: list[str] | None = None

    def ensure(self, names: tuple[str, ...]) -> None:
        for name in names:
            target = self.base / name
            if target.exists():
                continue
            if name in EMBEDDERS:
                link_tree(self.minilm, target)
            else:
                if self._words is None:
                    self._words = vocabulary()
                kind, labels = TINY_MODELS[name]
                target.mkdir(parents=True)
                tiny_model(target, kind, self._words, labels)


# --------------------------------------------------------------------------- #
# Stand-in hub datasets (in the proxy's Hugging Face datasets cache)
# --------------------------------------------------------------------------- #

WORDS = [
    *("good", "great", "love", "fine", "happy", "bad", "awful", "hate", "poor", "sad", "the", "a", "film", "movie"),
    *("plot", "actor", "was", "is", "very", "not", "and", "bill", "state", "law", "tax", "court", "water", "school"),
    *("public", "health", "section", "act", "amends", "code"),
]
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]


def sentence(rng: random.Random, n: int, pool: list[str] | None = None) -> str:
    return " ".join(rng.choice(pool or WORDS) for _ in range(n))


def datasets_builder() -> Any:
    import datasets
    import pyarrow as pa

    class Standin(datasets.ArrowBasedBuilder):
        """Writes given rows as a prepared dataset, exactly where a hub load would have cached it."""

        def __init__(self, *, splits: dict[str, list[dict[str, Any]]], features: Any, **kwargs: Any) -> None:
            self._rows, self._features = splits, features
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return datasets.DatasetInfo(features=self._features)

        def _split_generators(self, dl_manager: Any) -> Any:
            return [datasets.SplitGenerator(name=n, gen_kwargs={"rows": r}) for n, r in self._rows.items()]

        def _generate_tables(self, rows: list[dict[str, Any]]) -> Any:
            yield 0, pa.Table.from_pylist(rows, schema=self._features.arrow_schema)

    return datasets, Standin


def cache_datasets(cache: Path, names: tuple[str, ...]) -> None:
    """Tiny versions of the hub datasets ``names`` in the datasets cache ``cache`` (``$HF_HOME/datasets``)."""
    datasets, Standin = datasets_builder()
    rng = random.Random(0)
    value, string = datasets.Value, datasets.Value("string")

    def put(name: str, config: str, features: dict[str, Any], splits: dict[str, list[dict[str, Any]]]) -> None:
        repo, _, short = name.rpartition("/")
        builder = Standin(
            splits=splits, features=datasets.Features(features), cache_dir=str(cache), dataset_name=short,
            repo_id=name if repo else None, config_name=config, version="0.0.0", hash="standin",
        )  # fmt: skip
        builder.download_and_prepare()

    for name in names:
        if name == "imdb":

            def review(label: int) -> dict[str, Any]:
                text = sentence(rng, 8, POSITIVE if label else NEGATIVE) + " " + sentence(rng, 4)
                return {"text": text, "label": label}

            features = {"text": string, "label": datasets.ClassLabel(names=["neg", "pos"])}
            put(name, "plain_text", features, {s: [review(i % 2) for i in range(16)] for s in ("train", "test")})
        elif name == "kde4":  # load_dataset('kde4', lang1 => en, lang2 => es): a config id of those kwargs
            config = datasets.BuilderConfig("default").create_config_id(config_kwargs={"lang1": "en", "lang2": "es"})
            pairs = [("the file", "el archivo"), ("open the file", "abrir el archivo"), ("save", "guardar")] * 5
            rows = [{"id": str(i), "translation": {"en": en, "es": es}} for i, (en, es) in enumerate(pairs)]
            put(name, config, {"id": string, "translation": datasets.Translation(languages=["en", "es"])},
                {"train": rows})  # fmt: skip
        elif name == "squad_v2":

            def qa(i: int) -> dict[str, Any]:
                context = f"the {WORDS[i % 20]} was {WORDS[(i * 7) % 20]} and the plot is {WORDS[(i * 3) % 20]}"
                answer = context.split()[3]
                unanswerable = i % 3 == 0  # SQuAD 2.0 has questions with no answer: empty lists
                answers = {"text": [answer], "answer_start": [context.index(" " + answer) + 1]}
                return {"id": f"q{i}", "title": "Film", "context": context, "question": f"what was the {WORDS[i % 20]}",
                        "answers": {"text": [], "answer_start": []} if unanswerable else answers}  # fmt: skip

            features = {"id": string, "title": string, "context": string, "question": string,
                        "answers": datasets.Sequence({"text": string, "answer_start": value("int32")})}  # fmt: skip
            # finetune.sql tests on the last 11873 rows: the size of SQuAD 2.0's validation split.
            put(name, "squad_v2", features, {"train": [qa(i) for i in range(16)],
                                             "validation": [qa(i) for i in range(16, 16 + 11873)]})  # fmt: skip
        elif name == "billsum":
            features = {"text": string, "summary": string, "title": string}

            def bill() -> dict[str, Any]:
                return {"text": sentence(rng, 30), "summary": sentence(rng, 8), "title": sentence(rng, 5)}

            put(name, "default", features, {s: [bill() for _ in range(n)] for s, n in
                                            (("train", 8), ("test", 4), ("ca_test", 20))})  # fmt: skip
        elif name == "jdxcosta/diamonds":
            cuts, colors = ["Fair", "Good", "Very Good", "Premium", "Ideal"], list("DEFGHIJ")
            clarities = ["SI1", "VS2", "IF"]
            rows = []
            for i in range(120):
                carat = round(rng.uniform(0.2, 2.5), 2)
                cut, color, clarity = rng.choice(cuts), rng.choice(colors), rng.choice(clarities)
                x = round(carat * 3 + 3, 2)
                price = int(3000 * carat * (1 + cuts.index(cut) / 10) + rng.uniform(0, 300))
                rows.append({"Unnamed: 0": i + 1, "carat": carat, "cut": cut, "color": color, "clarity": clarity,
                             "depth": round(rng.uniform(55, 70), 1), "table": float(rng.randint(50, 65)),
                             "price": price, "x": x, "y": x + 0.02, "z": round(x * 0.6, 2)})  # fmt: skip
            f64 = value("float64")
            features = {"Unnamed: 0": value("int64"), "carat": f64, "cut": string, "color": string, "clarity": string,
                        "depth": f64, "table": f64, "price": value("int64"), "x": f64, "y": f64, "z": f64}  # fmt: skip
            put(name, "default", features, {"train": rows})
        else:
            raise AssertionError(name)


# --------------------------------------------------------------------------- #
# Fixtures and running a file
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def standins(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Standins:
    return Standins(tmp_path_factory.mktemp("pgml-models"), model_dir / MINILM)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The proxy's Hugging Face home (no hub: its datasets cache holds the stand-in hub datasets)."""
    home = tmp_path_factory.mktemp("hf-home")
    cache_datasets(home / "datasets", ("imdb", "kde4", "squad_v2", "billsum", "jdxcosta/diamonds"))
    return home


@pytest.fixture(scope="module")
def files_proxy(
    pg: Postgres, standins: Standins, hf_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    handle = start_proxy(
        pg.dsn(),
        tmp_path_factory.mktemp("files-proxy"),
        PGML_PROXY_ENGINE_MODEL_DIRS=str(standins.base),
        # The files ask for trust_remote_code (gte-base-en-v1.5 ships code); the stand-ins ship none.
        PGML_PROXY_ENGINE_TRUST_REMOTE_CODE="true",
        HF_HOME=str(hf_home),
        # One intra-op thread: on a small, shared CI machine torch's default oversubscribes the cores and
        # the tiny models' passes get ~10x slower (measured on tune's question answering).
        OMP_NUM_THREADS="1",
    )
    try:
        yield handle
    finally:
        handle.stop()


# Statements no host of this suite can run, by file: line psql reports (the statement's last) -> the
# SQLSTATE they must fail with, and why. Such a file runs in full without ON_ERROR_STOP (none of them sets it
# itself), and every other statement must succeed. test.sql does not include transformers.sql.
UNRUNNABLE: dict[str, dict[int, tuple[str, str]]] = {
    "transformers.sql": {
        22: ("22023", "meta-llama with trust_remote_code in its generation args: a loading flag, refused there"
                      " (generation args never load code; transformers' generate rejects it as an unused model kwarg)"),
        36: ("0A000", "bigscience/bloom-1b7 with load_in_4bit: 4-bit loading needs bitsandbytes (and CUDA)"),
        48: ("0A000", "TheBloke/MPT-7B-Storywriter-GGML: GGML weights (ctransformers); nothing here loads them"),
        61: ("0A000", "marella/gpt-2-ggml: GGML weights, as above"),
        74: ("0A000", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8: GPTQ needs optimum and gptqmodel"),
    },
}
_ERROR = re.compile(r"^psql:[^:]+:(\d+): (?:ERROR|FATAL):  ([0-9A-Z]{5}): (.*)$", re.M)


def run_file(
    pg: Postgres, proxy: ProxyProcess, database: str, path: str, *, stop: bool = True, timeout: float = 900
) -> tuple[str, dict[int, tuple[str, str]]]:
    """``psql -v ON_ERROR_STOP=1 -f path`` through ``proxy``, from the directory the files live in
    (``VERBOSITY=verbose``: errors show their SQLSTATE). Without ``stop`` the whole file runs: the output,
    and the line -> (SQLSTATE, message) of each statement that failed."""
    proc = subprocess.run(
        [pg.tool("psql"), proxy.dsn(dbname=database), "-X", "-v", f"ON_ERROR_STOP={int(stop)}",
         "-v", "VERBOSITY=verbose", "-P", "pager=off", "-f", path],
        cwd=FILES, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )  # fmt: skip
    if proc.returncode != 0:
        stderr = proc.stderr.splitlines()
        first = max((i for i, line in enumerate(stderr) if "ERROR:" in line or "FATAL:" in line), default=0)
        logged = [line for line in proxy.log_text().splitlines() if " ERROR " in line][-5:]
        pytest.fail(
            f"{path} stopped (psql exit {proc.returncode}):\n" + "\n".join(stderr[first:][:30])
            + "\nproxy log (errors):\n" + "\n".join(logged), pytrace=False,
        )  # fmt: skip
    return proc.stdout, {int(line): (state, message) for line, state, message in _ERROR.findall(proc.stderr)}


# --------------------------------------------------------------------------- #
# Checks of a file's results (run through the proxy on the file's database afterwards)
# --------------------------------------------------------------------------- #

Check = Callable[[psycopg.Connection[Any], str], None]


def values(conn: psycopg.Connection[Any], query: str) -> list[Any]:
    return [row[0] for row in conn.execute(query)]


def deployed(conn: psycopg.Connection[Any], project: str) -> str:
    rows = values(conn, f"SELECT algorithm FROM pgml.deployed_models WHERE name = '{project}'")
    assert len(rows) == 1, rows
    return str(rows[0])


def algorithms(conn: psycopg.Connection[Any], project: str) -> set[str]:
    return set(values(conn, f"SELECT m.algorithm FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id "
                            f"WHERE p.name = '{project}'"))  # fmt: skip


def check_clustering(conn: psycopg.Connection[Any], out: str) -> None:
    clusters = set(values(conn, "SELECT pgml.predict('Handwritten Digit Clusters', image) FROM pgml.digits"))
    assert clusters <= set(range(10)) and len(clusters) > 1, clusters
    assert algorithms(conn, "Handwritten Digit Clusters") == {
        "kmeans", "affinity_propagation", "birch", "mini_batch_kmeans"}  # fmt: skip


def check_decomposition(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Handwritten Digits Reduction") == "pca"
    query = "SELECT cardinality(pgml.decompose('Handwritten Digits Reduction', image)) FROM pgml.digits"
    sizes = set(values(conn, query))
    assert len(sizes) == 1 and sizes <= {3, 64}, sizes


def check_binary(conn: psycopg.Connection[Any], out: str) -> None:
    project = "Breast Cancer Detection"
    assert deployed(conn, project) == "svm"  # the file's last deploy: best_score among svm models
    assert algorithms(conn, project) == {
        "linear", "ridge", "stochastic_gradient_descent", "perceptron", "passive_aggressive", "svm", "nu_svm",
        "linear_svm", "ada_boost", "bagging", "extra_trees", "gradient_boosting_trees", "random_forest", "xgboost",
    }  # fmt: skip
    features = ", ".join(f'"{c}"' for c in breast_cancer_features())
    predictions = values(conn, f"SELECT pgml.predict('{project}', ARRAY[{features}]) FROM pgml.breast_cancer")
    assert set(predictions) == {0.0, 1.0}  # malignant is boolean: 0/1


def breast_cancer_features() -> tuple[str, ...]:
    from engine.ml.datasets.builtins import BREAST_CANCER_FEATURES

    return BREAST_CANCER_FEATURES


def check_image(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Handwritten Digits") == "svm"
    predictions = set(values(conn, "SELECT pgml.predict('Handwritten Digits', image) FROM pgml.digits"))
    assert predictions <= set(range(10)) and len(predictions) > 5, predictions


def check_joint(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Exercise vs Physiology") == "svm"
    sizes = values(conn, "SELECT cardinality(pgml.predict_joint('Exercise vs Physiology', ARRAY[chins, situps, jumps]))"
                         " FROM pgml.linnerud")  # fmt: skip
    assert sizes == [3] * 20


def check_multi(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Iris Flower Types") == "svm"
    features = "ARRAY[sepal_length, sepal_width, petal_length, petal_width]"
    predictions = set(values(conn, f"SELECT pgml.predict('Iris Flower Types', {features}) FROM pgml.iris"))
    assert predictions == {0, 1, 2}


def check_regression(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Diabetes Progression") == "svm"
    assert {"xgboost", "catboost", "linear", "theil_sen", "huber"} <= algorithms(conn, "Diabetes Progression")
    predictions = values(conn, "SELECT pgml.predict('Diabetes Progression', ARRAY[age, sex, bmi, bp, s1, s2, s3, s4,"
                               " s5, s6]) FROM pgml.diabetes")  # fmt: skip
    assert len(predictions) == 442 and all(isinstance(p, float) for p in predictions)


def results(out: str) -> list[tuple[tuple[str, ...], list[list[str]]]]:
    """psql's aligned output: (column names, rows of cells) for each result, in order."""
    lines, found = out.splitlines(), []
    for i, line in enumerate(lines):
        if i and re.fullmatch(r"-+(\+-+)*", line):
            columns = tuple(c.strip() for c in lines[i - 1].split("|"))
            rows = []
            for row in lines[i + 1 :]:
                if re.fullmatch(r"\(\d+ rows?\)", row):
                    break
                rows.append([c.strip() for c in row.split("|")])
            found.append((columns, rows))
    return found


def number_or_array(cell: str) -> Any:
    return [float(v) for v in cell.strip("{}").split(",")] if cell.startswith("{") else float(cell)


def check_vectors(conn: psycopg.Connection[Any], out: str) -> None:
    import numpy as np

    f4 = np.float32
    a, b, v = np.array([1, 2, 3], f4), np.array([4, 5, 6], f4), np.array([1, 2, 3], f4)
    l2 = np.sqrt((v * v).sum())
    expected = [
        ("add", a + 3), ("subtract", a - 3), ("multiply", a * 3), ("divide", a / 100),
        ("add", a + b), ("subtract", a - b), ("multiply", a * b), ("divide", a / b),
        ("norm_l0", 3), ("norm_l1", 6), ("norm_l2", l2), ("norm_max", 3),
        ("normalize_l1", v / 6), ("normalize_l2", v / l2), ("normalize_max", v / 3),
        ("distance_l1", 9), ("distance_l2", np.sqrt(27)), ("dot_product", 32), ("cosine_similarity", 1),
    ]  # fmt: skip
    found = results(out)
    start = next(i for i, (columns, _) in enumerate(found) if columns == ("add",))
    for (name, value), (columns, rows) in zip(expected, found[start:], strict=False):
        assert columns == (name,) and len(rows) == 1, (name, columns, rows)
        assert np.allclose(number_or_array(rows[0][0]), value, rtol=1e-6), (name, rows, value)
    vectors = np.array([[-2, -4, -6, -8], [-1, -2, -3, -4], [0, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4]], f4)
    columns, rows = found[start + len(expected)]
    assert columns == ("sum", "min", "max", "min_abs", "max_abs", "avg") and len(rows) == 1
    aggregates = [vectors.sum(0), vectors.min(0), vectors.max(0), np.abs(vectors).min(0), np.abs(vectors).max(0),
                  vectors.sum(0) / 5]  # fmt: skip  # (the NULL row is skipped, as by count(embedding))
    for cell, value in zip(rows[0], aggregates, strict=True):
        assert np.allclose(number_or_array(cell), value), (cell, value)


def check_chunking(conn: psycopg.Connection[Any], out: str) -> None:
    document = values(conn, "SELECT document FROM documents WHERE id = 1")[0]
    chunks = values(conn, "SELECT chunk FROM document_chunks ORDER BY chunk_index")
    assert len(chunks) > 50 and all(chunk in document for chunk in chunks)
    assert values(conn, "SELECT DISTINCT (document_id, splitter_id)::text FROM document_chunks") == ["(1,1)"]


def check_preprocessing(conn: psycopg.Connection[Any], out: str) -> None:
    assert deployed(conn, "Diamond prices") == "lightgbm"
    rows = conn.execute(
        'SELECT price, pgml.predict(\'Diamond prices\', (carat, cut, color, clarity, depth, "table", x, y, z))'
        ' FROM pgml."jdxcosta/diamonds"'
    ).fetchall()
    assert len(rows) == 120 and all(isinstance(p, float) and p > 0 for _, p in rows)


def check_embedding(conn: psycopg.Connection[Any], out: str) -> None:
    import numpy as np

    embeds = [rows for columns, rows in results(out) if columns == ("embed",)]
    assert len(embeds) == 6 and all(len(rows) == 1 for rows in embeds)
    vectors = [number_or_array(rows[0][0]) for rows in embeds]
    assert all(len(v) == 384 for v in vectors)  # all-MiniLM-L6-v2's size
    assert np.allclose(vectors[0], vectors[1], atol=1e-5) and np.allclose(vectors[0], vectors[2], atol=1e-5)
    assert vectors[3] != vectors[0]  # an instruction is a prompt: another input


def check_finetune(conn: psycopg.Connection[Any], out: str) -> None:
    for project in ("Translate English to Spanish", "IMDB Review Sentiment", "SQuAD Q&A v2", "Legal Summarization"):
        assert deployed(conn, project) == "transformers"
    labels = set(values(conn, "SELECT DISTINCT label FROM pgml.imdb"))
    assert values(conn, "SELECT pgml.predict('IMDB Review Sentiment', 'I love SQL')")[0] in labels


def check_transformers(conn: psycopg.Connection[Any], out: str) -> None:
    embeds = [rows for columns, rows in results(out) if columns == ("embed",)]
    assert len(embeds) == 5 and all(len(number_or_array(rows[0][0])) == 384 for rows in embeds)
    found = [(columns, rows) for columns, rows in results(out) if columns != ("embed",)]
    assert len(found) == 10 and all(len(rows) == 1 and len(columns) == 1 for columns, rows in found), found
    cells = [(columns[0], json.loads(rows[0][0])) for columns, rows in found]
    # None of the five text generations runs here (UNRUNNABLE); the other tasks, in file order.
    names = [name for name, _ in cells]
    assert names == ["result", "result", "result", "transform", "positivity", "positivity", "market_sentiment",
                     "zero_shot", "transform", "answer"]  # fmt: skip
    translation, mnli, qa, summary, bertweet, sst2, finbert, zero_shot, entities, answer = (v for _, v in cells)
    assert len(translation) == 2 and all(set(t) == {"translation_text"} for t in translation)
    labels = [(mnli, TINY_MODELS["roberta-large-mnli"][1]), (bertweet, ("NEG", "NEU", "POS")),
              (sst2, ("NEGATIVE", "POSITIVE")), (finbert, ("positive", "negative", "neutral"))]  # fmt: skip
    for value, allowed in labels:
        assert len(value) == 2 and all(item["label"] in allowed and 0 <= item["score"] <= 1 for item in value)
    assert len(summary) == 1 and set(summary[0]) == {"summary_text"}
    assert sorted(zero_shot[0]["labels"]) == sorted(["urgent", "not urgent", "phone", "tablet", "computer"])
    assert abs(sum(zero_shot[0]["scores"]) - 1) < 1e-4
    sentence_ = "Hugging Face is a French company based in New York City."
    assert entities[0] and all(sentence_[e["start"] : e["end"]] == e["word"] for e in entities[0])
    transformers_sql = (FILES / "examples" / "transformers.sql").read_text()
    for result in (qa, answer):  # an extractive answer is the span of the context it points at
        assert result["answer"] and result["answer"] in transformers_sql
        assert result["end"] - result["start"] == len(result["answer"])


def check_test_sql(conn: psycopg.Connection[Any], out: str) -> None:
    for check in (check_clustering, check_decomposition, check_binary, check_image, check_joint, check_multi,
                  check_regression, check_vectors, check_chunking, check_preprocessing, check_embedding):  # fmt: skip
        check(conn, out)
    assert values(conn, "SELECT count(*) FROM pgml.wine") == [178]  # loaded by test.sql itself


CHECKS: dict[str, Check] = {
    "binary_classification.sql": check_binary,
    "chunking.sql": check_chunking,
    "clustering.sql": check_clustering,
    "decomposition.sql": check_decomposition,
    "embedding.sql": check_embedding,
    "finetune.sql": check_finetune,
    "image_classification.sql": check_image,
    "joint_regression.sql": check_joint,
    "multi_classification.sql": check_multi,
    "preprocessing.sql": check_preprocessing,
    "regression.sql": check_regression,
    "transformers.sql": check_transformers,
    "vectors.sql": check_vectors,
}
MODELS = {"embedding.sql": EMBEDDERS, "transformers.sql": EMBEDDERS + TRANSFORMERS_MODELS,
          "finetune.sql": FINETUNE_MODELS, "test.sql": EMBEDDERS}  # fmt: skip


def test_every_example_is_run_and_checked() -> None:
    assert set(EXAMPLES) == set(CHECKS)
    included = re.findall(r"^\\i examples/(\S+)", (FILES / "tests" / "test.sql").read_text(), re.M)
    assert included and set(included) <= set(EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", ["tests/test.sql", *(f"examples/{name}" for name in EXAMPLES)])
def test_postgresml_file(pg: Postgres, files_proxy: ProxyProcess, standins: Standins, path: str) -> None:
    name = Path(path).name
    standins.ensure(MODELS.get(name, ()))
    unrunnable = UNRUNNABLE.get(name, {})
    with scratch_database(pg, "pgml_files") as database:
        out, failed = run_file(pg, files_proxy, database, path, stop=not unrunnable)
        states = {line: state for line, (state, _) in failed.items()}
        expected = {line: state for line, (state, _) in unrunnable.items()}
        assert states == expected, f"{path}: failed statements (line: SQLSTATE, message) {failed}, expected {expected}"
        with psycopg.connect(files_proxy.dsn(dbname=database), autocommit=True) as conn:
            (check_test_sql if name == "test.sql" else CHECKS[name])(conn, out)
