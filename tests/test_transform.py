"""pgml.transform / transform_stream / rank on the engine alone, with tiny random-weight models built here.

Nothing is downloaded: each model is a few-layer random network saved to a temp dir with a tokenizer
trained on the fly, so only shapes, keys, counts and order are asserted, never generated text.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.api import Canceled, EngineConfig, InvalidArgument, UnknownModel
from engine.nlp.rank import rank
from engine.nlp.stream import stream
from engine.nlp.tasks import ModelNotAllowed, canonical_task, parse_task
from engine.nlp.transform import transform_rows
from engine.runtime.cache import ModelCache
from engine.runtime.context import Context
from tests.conftest import MINILM

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "paris is the capital of france and berlin is the capital of germany",
    "hello world how are you today user assistant system",
    "i love postgres and machine learning with python",
    "translate english to french summarize this text please",
]
WORDS = sorted({word for line in CORPUS for word in line.split()})
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
QA = json.dumps({"question": "what is the capital of france", "context": "paris is the capital of france"})


def _word_tokenizer(specials: list[str], **tokens: str) -> Any:
    """Whole words as tokens: decoding joins them with spaces, so every step of a stream ends a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **tokens)


def _bert_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# Model directories every make_ctx() gets: the root the ``models`` fixture builds into (local paths load only
# inside [engine] model_dirs).
MODEL_DIRS: list[str] = []


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> directory of a tiny random model: gpt2, sst, nli, ner, mlm, qa, t5 (one root, in MODEL_DIRS)."""
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    MODEL_DIRS.append(str(root))
    paths = {name: str(root / name) for name in ("gpt2", "sst", "nli", "ner", "mlm", "qa", "t5")}
    gpt = _word_tokenizer(["<|endoftext|>", "[UNK]"], eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    gpt.chat_template = CHAT_TEMPLATE
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(gpt), n_positions=1024, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(paths["gpt2"])
    gpt.save_pretrained(paths["gpt2"])
    bert = _bert_tokenizer()
    labels = {
        "sst": ["NEGATIVE", "POSITIVE"],
        "nli": ["contradiction", "neutral", "entailment"],
        "ner": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    }
    classes = {
        "sst": BertForSequenceClassification,
        "nli": BertForSequenceClassification,
        "ner": BertForTokenClassification,
        "mlm": BertForMaskedLM,
        "qa": BertForQuestionAnswering,
    }
    for name, cls in classes.items():
        names = labels.get(name, ["LABEL_0", "LABEL_1"])
        config = BertConfig(
            vocab_size=len(bert),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        cls(config).save_pretrained(paths[name])
        bert.save_pretrained(paths[name])
    t5 = _word_tokenizer(["<pad>", "</s>", "[UNK]"], eos_token="</s>", pad_token="<pad>")
    prefixes = {
        "translation_en_to_fr": {"prefix": "translate english to french "},
        "summarization": {"prefix": "summarize "},
    }
    T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(t5),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            task_specific_params=prefixes,
        )
    ).save_pretrained(paths["t5"])
    t5.save_pretrained(paths["t5"])
    return paths


def make_ctx(**config: Any) -> Context:
    model_dirs = (*config.pop("model_dirs", ()), *MODEL_DIRS)
    return Context(EngineConfig(device="cpu", model_dirs=model_dirs, **config), ModelCache(1 << 30), threading.Event())


@pytest.fixture(scope="module")
def ctx(models: dict[str, str]) -> Context:
    return make_ctx()


def one(ctx: Context, task: Any, inputs: list[Any], args: dict[str, Any] | None = None) -> Any:
    [result] = transform_rows([(task, args or {}, inputs, False)], ctx)
    json.dumps(result)  # JSON-ready
    return result


def test_task_names() -> None:
    assert canonical_task("text_classification") == canonical_task("sentiment-analysis") == "text-classification"
    assert canonical_task("ner") == "token-classification"
    assert canonical_task("translation-en-to-fr") == canonical_task("translation_en_to_fr") == "translation_en_to_fr"
    assert canonical_task("Text2Text_Generation") == "text2text-generation"
    assert parse_task('{"task": "summarization", "model": "m", "revision": "x"}').init == {"revision": "x"}
    assert canonical_task("image_classification") == "image-classification"  # any pipeline task
    with pytest.raises(InvalidArgument):
        canonical_task("no-such-task")
    with pytest.raises(InvalidArgument):
        parse_task({"revision": "main"})


def test_text_classification_batches_rows_and_shares_the_model(models: dict[str, str], ctx: Context) -> None:
    task = {"task": "text-classification", "model": models["sst"]}
    rows = [
        (task, {}, ["hello world", "i love postgres", "paris"], False),
        (task, {}, ["the dog"], False),
        (task, None, ["x"], False),
        ("text-classification", {}, None, False),
    ]
    first, second, null_args, null_inputs = transform_rows(rows, ctx)
    assert len(first) == 3 and len(second) == 1 and null_args is None and null_inputs is None
    for item in first + second:
        assert set(item) == {"label", "score"} and item["label"] in ("NEGATIVE", "POSITIVE")
        assert type(item["score"]) is float
    loaded = len(ctx.cache)
    one(ctx, task, ["again"])
    assert len(ctx.cache) == loaded  # cached, not reloaded
    assert len(one(ctx, {"model": models["sst"]}, ["task from the model's config"])) == 1


def test_text_generation(models: dict[str, str], ctx: Context) -> None:
    prompts = ["hello world", "the quick brown fox"]
    result = one(
        ctx, {"task": "text-generation", "model": models["gpt2"]}, prompts, {"max_new_tokens": 5, "min_new_tokens": 5}
    )
    assert [len(per_input) for per_input in result] == [1, 1]
    for prompt, [item] in zip(prompts, result, strict=True):
        assert set(item) == {"generated_text"} and item["generated_text"].startswith(prompt)
        assert len(item["generated_text"]) > len(prompt)  # prompt + continuation
    args = {"max_new_tokens": 3, "min_new_tokens": 3, "num_return_sequences": 2, "do_sample": True}
    result = one(ctx, {"task": "text_generation", "model": models["gpt2"]}, ["hello"], args)
    assert len(result) == 1 and len(result[0]) == 2


def test_token_classification(models: dict[str, str], ctx: Context) -> None:
    result = one(
        ctx,
        {"task": "ner", "model": models["ner"]},
        ["paris is the capital of france", "hello world"],
        {"ignore_labels": []},
    )
    assert [len(entities) for entities in result] == [6, 2]
    for entity in result[0]:
        assert set(entity) == {"entity", "score", "index", "word", "start", "end"}
        assert type(entity["score"]) is float and type(entity["index"]) is int
    assert [e["index"] for e in result[0]] == list(range(1, 7))


def test_fill_mask(models: dict[str, str], ctx: Context) -> None:
    task = {"task": "fill-mask", "model": models["mlm"]}
    single = one(ctx, task, ["paris is the [MASK] of france"])
    assert len(single) == 5 and all(set(p) == {"score", "token", "token_str", "sequence"} for p in single)
    assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
    double = one(ctx, task, ["paris is the [MASK] of france", "hello [MASK]"])
    assert [len(per_input) for per_input in double] == [5, 5]


def test_zero_shot(models: dict[str, str], ctx: Context) -> None:
    labels = ["python", "france", "dog"]
    result = one(
        ctx,
        {"task": "zero-shot-classification", "model": models["nli"]},
        ["i love python"],
        {"candidate_labels": labels},
    )
    [item] = result
    assert set(item) == {"labels", "scores", "sequence"} and sorted(item["labels"]) == sorted(labels)
    assert item["scores"] == sorted(item["scores"], reverse=True) and item["sequence"] == "i love python"


def test_question_answering(models: dict[str, str], ctx: Context) -> None:
    task = {"task": "question-answering", "model": models["qa"]}
    answer = one(ctx, task, [QA])
    assert set(answer) == {"answer", "start", "end", "score"} and type(answer["score"]) is float
    context = json.loads(QA)["context"]
    assert (
        0 <= answer["start"] < answer["end"] <= len(context)
        and answer["answer"] == context[answer["start"] : answer["end"]]
    )
    assert [set(a) for a in one(ctx, task, [QA, QA])] == [set(answer)] * 2
    top = one(ctx, task, [QA], {"top_k": 3})
    assert len(top) == 3 and [a["score"] for a in top] == sorted((a["score"] for a in top), reverse=True)
    with pytest.raises(InvalidArgument):
        one(ctx, task, ["not json"])


def test_seq2seq_tasks(models: dict[str, str], ctx: Context) -> None:
    args = {"max_new_tokens": 4, "min_new_tokens": 4, "suppress_tokens": [0, 2]}  # a random T5 likes <pad>
    texts = ["hello world", "the lazy dog"]
    for task, key in (
        ("translation_en_to_fr", "translation_text"),
        ("summarization", "summary_text"),
        ("text2text-generation", "generated_text"),
    ):
        result = one(ctx, {"task": task, "model": models["t5"]}, texts, args)
        assert len(result) == 2 and all(set(item) == {key} and len(item[key].split()) == 4 for item in result)
    many = one(
        ctx,
        {"task": "summarization", "model": models["t5"]},
        texts,
        {**args, "num_beams": 2, "num_return_sequences": 2},
    )
    assert [len(per_input) for per_input in many] == [2, 2] and set(many[0][0]) == {"summary_text"}


def test_feature_extraction(models: dict[str, str], ctx: Context) -> None:
    [vectors] = one(ctx, {"task": "feature-extraction", "model": models["mlm"]}, ["hello world"])
    assert len(vectors[0]) == 4 and len(vectors[0][0]) == 32 and type(vectors[0][0][0]) is float  # [CLS] 2 words [SEP]


def test_conversational(models: dict[str, str], ctx: Context) -> None:
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "how are you"}]
    task = {"task": "conversational", "model": models["gpt2"]}
    args = {"max_new_tokens": 4, "min_new_tokens": 4}
    [reply] = one(ctx, task, messages, args)
    assert isinstance(reply, str) and len(reply.split()) == 4  # the new text only
    as_text = [json.dumps(m) for m in messages]  # jsonb[] elements may arrive as JSON text
    assert len(one(ctx, task, as_text, {**args, "num_return_sequences": 2, "do_sample": True})) == 2
    with pytest.raises(InvalidArgument, match="conversational"):
        one(ctx, {"task": "text-generation", "model": models["gpt2"]}, messages)


def _collect(fragments: Iterator[list[str]]) -> list[list[str]]:
    return list(fragments)


def test_stream_text_generation(models: dict[str, str], ctx: Context) -> None:
    task = {"task": "text-generation", "model": models["gpt2"]}
    fragments = _collect(stream(task, {"max_new_tokens": 8, "min_new_tokens": 8}, "hello world", ctx))
    assert len(fragments) >= 4 and all(len(f) == 1 and isinstance(f[0], str) for f in fragments)
    text = "".join(f[0] for f in fragments)
    assert text.startswith("hello world") and len(text.split()) == 10  # the prompt too, as PostgresML
    two = _collect(
        stream(
            task, {"max_new_tokens": 5, "min_new_tokens": 5, "num_return_sequences": 2, "do_sample": True}, "hello", ctx
        )
    )
    assert len(two) >= 3 and all(len(f) == 2 for f in two)
    assert list(stream(task, {}, None, ctx)) == []  # STRICT


def test_stream_chat_and_seq2seq(models: dict[str, str], ctx: Context) -> None:
    messages = [{"role": "user", "content": "how are you"}]
    chat = _collect(
        stream(
            {"task": "conversational", "model": models["gpt2"]},
            {"max_new_tokens": 6, "min_new_tokens": 6},
            messages,
            ctx,
        )
    )
    assert len(chat) >= 3 and len("".join(f[0] for f in chat).split()) == 6  # no prompt
    t5 = _collect(
        stream(
            {"task": "translation_en_to_fr", "model": models["t5"]},
            {"max_new_tokens": 5, "min_new_tokens": 5, "suppress_tokens": [0, 2]},
            "hello world",
            ctx,
        )
    )
    assert len(t5) >= 2 and len("".join(f[0] for f in t5).split()) == 5
    with pytest.raises(InvalidArgument):
        next(stream({"task": "text-classification", "model": models["sst"]}, {}, "hello", ctx))
    with pytest.raises(InvalidArgument, match="conversational"):
        next(stream({"task": "text-generation", "model": models["gpt2"]}, {}, messages, ctx))
    with pytest.raises(InvalidArgument, match="beam search"):  # transformers cannot stream it
        next(stream({"task": "text-generation", "model": models["gpt2"]}, {"num_beams": 2}, "hello", ctx))


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgml-transform-stream" and t.is_alive()]


def test_stream_cancel_and_close_stop_generation(models: dict[str, str]) -> None:
    ctx = make_ctx()
    task = {"task": "text-generation", "model": models["gpt2"]}
    args = {"max_new_tokens": 900, "min_new_tokens": 900}
    fragments = stream(task, args, "hello", ctx)
    next(fragments), next(fragments)
    started = time.monotonic()
    ctx.cancelled.set()
    with pytest.raises(Canceled):
        for _ in fragments:
            pass
    assert time.monotonic() - started < 2 and not _stream_threads()
    ctx.cancelled.clear()
    fragments = stream(task, args, "hello", ctx)
    next(fragments)
    fragments.close()  # e.g. the cursor was closed
    assert not _stream_threads()


def test_cancel_stops_generation_in_transform(models: dict[str, str]) -> None:
    ctx = make_ctx()
    task = {"task": "text-generation", "model": models["gpt2"]}
    one(ctx, task, ["warm"], {"max_new_tokens": 1})
    timer = threading.Timer(0.5, ctx.cancelled.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Canceled):
        one(ctx, task, ["hello"], {"max_new_tokens": 1000, "min_new_tokens": 1000})
    assert time.monotonic() - started < 3


def test_trust_remote_code_is_refused_unless_configured(models: dict[str, str]) -> None:
    plain = {"task": "text-classification", "model": models["sst"]}
    for task in ({**plain, "trust_remote_code": True}, {**plain, "model_kwargs": {"trust_remote_code": True}}):
        with pytest.raises(InvalidArgument) as info:
            one(make_ctx(), task, ["hello"])
        assert info.value.sqlstate == "22023" and info.value.hint
        assert len(one(make_ctx(trust_remote_code=True), task, ["hello"])) == 1
    with pytest.raises(InvalidArgument):
        rank([(models["sst"], "q", ["a"], {"trust_remote_code": True})], make_ctx())


def test_allowed_models(models: dict[str, str]) -> None:
    task = {"task": "text-classification", "model": models["sst"]}
    with pytest.raises(ModelNotAllowed) as info:
        one(make_ctx(allowed_models=("some/other",)), task, ["hello"])
    assert info.value.sqlstate == "42501" and models["sst"] in info.value.message
    assert len(one(make_ctx(allowed_models=(models["sst"],)), task, ["hello"])) == 1
    with pytest.raises(ModelNotAllowed):  # the default model is checked too, before anything is looked up
        one(make_ctx(allowed_models=("some/other",)), "text-classification", ["hello"])


def test_default_models(models: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UnknownModel) as info:
        one(make_ctx(model_dirs=(str(tmp_path),)), "text-classification", ["hello"])
    assert time.monotonic() - started < 2
    assert info.value.sqlstate == "42704" and "distilbert-base-uncased-finetuned-sst-2-english" in info.value.message
    assert info.value.hint and '"model"' in info.value.hint
    (tmp_path / "distilbert").mkdir()
    (tmp_path / "distilbert" / "distilbert-base-uncased-finetuned-sst-2-english").symlink_to(models["sst"])
    assert len(one(make_ctx(model_dirs=(str(tmp_path),)), "sentiment-analysis", ["a", "b"])) == 2


def test_rank() -> None:
    ctx = make_ctx()
    documents = ["paris is the capital of france", "the lazy dog", "i love postgres", "hello world"]
    rows = [
        (MINILM, "capital of france", documents, {}),
        (MINILM, "dog", documents, {"return_documents": True, "top_k": 2}),
        (MINILM, "q", None, {}),
        (MINILM, "q", [], {}),
    ]
    ranked, top, null, empty = rank(rows, ctx)
    assert sorted(r[0] for r in ranked) == [0, 1, 2, 3] and all(r[2] is None for r in ranked)
    assert [r[1] for r in ranked] == sorted((r[1] for r in ranked), reverse=True)
    assert all(type(r[0]) is int and type(r[1]) is float for r in ranked)
    assert len(top) == 2 and all(text == documents[i] for i, _, text in top)
    assert null is None and empty == []
    with pytest.raises(InvalidArgument):
        rank([(MINILM, "q", ["a"], {"no_such_kwarg": 1})], ctx)


def test_rank_of_many_documents_is_sliced_and_equals_one_rank() -> None:
    """Ranked in slices (a checkpoint between them): the same scores, order and top_k as one rank call."""
    from engine.nlp.rank import _cross_encoder

    ctx = make_ctx()
    words = "paris france dog cat postgres hello world capital lazy love".split()  # noqa: SIM905
    documents = [" ".join(words[(i * k) % len(words)] for k in range(1, 5)) for i in range(300)]
    sliced = rank([(MINILM, "capital of france", documents, {"top_k": 250, "return_documents": True})], ctx)[0]
    whole = _cross_encoder(MINILM, {}, ctx).rank(  # the same loaded model (its head is random-initialised)
        "capital of france", documents, top_k=250, return_documents=True, batch_size=32, show_progress_bar=False
    )
    assert len(sliced) == 250 == len(whole)
    assert [r[0] for r in sliced] == [int(r["corpus_id"]) for r in whole]
    np.testing.assert_allclose([r[1] for r in sliced], [float(r["score"]) for r in whole], rtol=1e-5, atol=1e-6)
    assert all(text == documents[i] for i, _, text in sliced)
    with pytest.raises(InvalidArgument, match="top_k"):
        rank([(MINILM, "q", documents, {"top_k": "ten"})], ctx)
