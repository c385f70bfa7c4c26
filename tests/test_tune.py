"""engine.tune: fine-tuning and generation with tiny random-weight models built on the fly (no downloads)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import tune as T
from engine.api import Canceled, EngineError, InvalidArgument, NotSupported, PermissionDenied
from engine.models import ModelCache
from proxy.config import EngineSection

CONFIG = EngineSection(device="cpu")  # generate(): tuned models come as files, not by name
WORDS = (  # noqa: SIM905
    "good bad great awful movie film plot the a is was fine terrible love hate hello hi how are you thanks "
    "bonjour salut chat chien le la est bon mauvais merci"
).split()
STEPS = {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8}


def _tokenizer(specials: list[str], post: Any = None, **tokens: Any) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if post is not None:
        backend.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **tokens)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny models are built: the model directory of ``config`` (local paths load only inside one)."""
    return tmp_path_factory.mktemp("tune-models")


@pytest.fixture(scope="module")
def config(model_root: Path) -> EngineSection:
    return EngineSection(device="cpu", model_dirs=(str(model_root),))


@pytest.fixture(scope="module")
def bert(model_root: Path) -> str:
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    post = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = _tokenizer(specials, post, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    config = BertConfig(vocab_size=len(specials) + len(WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    path = model_root / "bert"
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2(model_root: Path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    specials = ["<|endoftext|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = _tokenizer(specials, unk_token="<unk>", eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %} <|endoftext|>{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    config = GPT2Config(vocab_size=len(specials) + len(WORDS), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    path = model_root / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def t5(model_root: Path) -> str:
    from tokenizers import processors
    from transformers import T5Config, T5ForConditionalGeneration

    specials = ["<pad>", "</s>", "<unk>"]
    post = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = _tokenizer(specials, post, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    config = T5Config(vocab_size=len(specials) + len(WORDS), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                      num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)  # fmt: skip
    path = model_root / "t5"
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS[:20], k=rng.randint(2, 6))) for _ in range(n)]


def _run(
    config: EngineSection, task: str, model: str, train: dict[str, list[Any]], test: dict[str, list[Any]], **hyper: Any
) -> Any:
    logged: list[dict[str, Any]] = []
    hyperparams = {"training_args": dict(STEPS), **hyper}
    result = T.tune(task, model, train, test, hyperparams, config, lambda: False, logged.append)
    assert result.events == logged and result.events
    assert all("step" in e and "epoch" in e for e in result.events)
    assert any(isinstance(e.get("loss"), float) for e in result.events)
    assert any("eval_loss" in e for e in result.events)
    json.dumps(result.events, allow_nan=False)  # storable in pgml.logs
    return result


def _check_files(files: dict[str, bytes]) -> dict[str, Any]:
    assert "config.json" in files and "model.safetensors" in files
    assert "tokenizer.json" in files and "tokenizer_config.json" in files and T.MANIFEST in files
    assert "training_args.bin" not in files
    config: dict[str, Any] = json.loads(files["config.json"])
    return config


def test_text_classification(bert: str, config: EngineSection) -> None:
    texts = _sentences(24, 1)
    labels = ["good" if "good" in t or "great" in t else "bad" for t in texts]
    train = {"text": texts[:18], "class": labels[:18], "unused": list(range(18))}
    test = {"text": texts[18:], "class": labels[18:], "unused": list(range(6))}
    result = _run(config, "text-classification", bert, train, test)
    saved = _check_files(result.files)
    assert saved["id2label"] == {"0": "bad", "1": "good"} and saved["label2id"] == {"bad": 0, "good": 1}
    assert {"f1", "accuracy", "eval_loss", "fit_time"} <= set(result.metrics)
    assert 0 <= result.metrics["f1"] <= 1 and 0 <= result.metrics["accuracy"] <= 1
    assert result.hyperparams["model_name"] == bert
    assert result.hyperparams["dataset_args"] == {"text_column": "text", "class_column": "class"}
    args = result.hyperparams["training_args"]
    assert args["max_steps"] == 2 and args["report_to"] == "none" and args["save_strategy"] == "no"
    assert args["use_cpu"] is True and "output_dir" not in args
    assert json.loads(result.files[T.MANIFEST])["labels"] == ["bad", "good"]
    with pytest.raises(NotSupported, match="text-classification"):
        T.generate(result.files, "cls", ["hello"], {}, CONFIG, ModelCache(1 << 30))


def test_text_pair_classification_int_labels_and_columns(bert: str, config: EngineSection) -> None:
    first, second = _sentences(20, 2), _sentences(20, 3)
    labels = [i % 3 for i in range(20)]
    train = {"premise": first[:15], "hypothesis": second[:15], "label": labels[:15]}
    test = {"premise": first[15:], "hypothesis": second[15:], "label": labels[15:]}
    columns = {"text1_column": "premise", "text2_column": "hypothesis", "class_column": "label"}
    result = _run(config, "text_pair_classification", bert, train, test, dataset_args=columns)
    assert _check_files(result.files)["id2label"] == {"0": "0", "1": "1", "2": "2"}
    assert result.hyperparams["dataset_args"] == columns
    assert "f1" in result.metrics


def _chat(n: int) -> dict[str, list[Any]]:
    users = _sentences(n, 4)
    return {"system": [None if i % 2 else "be fine" for i in range(n)], "user": users,
            "assistant": [f"thanks {u.split()[0]}" for u in users]}  # fmt: skip


def test_conversation_and_generate(gpt2: str, config: EngineSection) -> None:
    data = _chat(20)
    train = {k: v[:16] for k, v in data.items()}
    test = {k: v[16:] for k, v in data.items()}
    result = _run(config, "conversation", gpt2, train, test)
    _check_files(result.files)
    assert {"loss", "perplexity", "bleu", "eval_loss"} <= set(result.metrics)
    cache = ModelCache(1 << 30)
    prompts = ["hello how are you thanks", "hi", "bad movie"]
    out = T.generate(result.files, "conv", prompts, {"max_new_tokens": 3}, CONFIG, cache)
    assert len(out) == 3 and all(isinstance(t, str) and len(t.split()) <= 3 for t in out)  # new text only
    again = T.generate(result.files, "conv", ["hi"], {"max_new_tokens": 2, "do_sample": False}, CONFIG, cache)
    assert len(again) == 1 and len(cache) == 1
    with pytest.raises(InvalidArgument, match="generate config"):
        T.generate(result.files, "conv", ["hi"], {"no_such_option": 1}, CONFIG, cache)


def test_conversation_prompt_template_without_system_column(gpt2: str, config: EngineSection) -> None:
    data = {k: v for k, v in _chat(12).items() if k != "system"}
    template = "{system} question: {user} answer: {assistant}{eos_token}"
    result = _run(config, "conversation", gpt2, data, {}, prompt_template=template)
    assert result.hyperparams["prompt_template"] == template and "bleu" in result.metrics
    assert json.loads(result.files[T.MANIFEST])["prompt_template"] == template
    out = T.generate(result.files, "tpl", ["hello you"], {"max_new_tokens": 2}, CONFIG, ModelCache(1 << 30))
    assert len(out) == 1 and len(out[0].split()) <= 2
    # generate checks the stored template too: the manifest comes from pgml.files, anyone may have written it
    for stored, match in (("{assistant}{user:>30}", "format specs"), (5, "must be text")):
        forged = {**result.files, T.MANIFEST: json.dumps({"task": "conversation", "kind": "causal",
                                                          "prompt_template": stored}).encode()}  # fmt: skip
        with pytest.raises(InvalidArgument, match=match):
            T.generate(forged, f"forged-{stored}", ["hello you"], {"max_new_tokens": 2}, CONFIG, ModelCache(1 << 30))


def test_conversation_loss_covers_the_reply_only(gpt2: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    prompt, full = T.chat_prompt(tokenizer, None, "be fine", "hello how are you", "fine thanks")
    assert full.startswith(prompt) and prompt.endswith("<|assistant|> ")
    plan = T._plan("conversation", {})
    row = T._conversation_row(plan, tokenizer, 64, "be fine", "hello how are you", "fine thanks")
    supervised = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(supervised) == "fine thanks <|endoftext|>"
    templated = T._plan("conversation", {"prompt_template": "{system} {user} {assistant}{eos_token}"})
    row = T._conversation_row(templated, tokenizer, 64, None, "hi", "thanks")
    assert tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]) == (
        "thanks <|endoftext|>"
    )


def test_translation_and_generate(t5: str, config: EngineSection) -> None:
    sources = _sentences(20, 5)
    targets = [" ".join(reversed(s.split())) for s in sources]
    train = {"en": sources[:16], "fr": targets[:16]}
    test = {"en": sources[16:], "fr": targets[16:]}
    result = _run(config, "translation", t5, train, test, dataset_args={"text_column": "en", "target_column": "fr"})
    _check_files(result.files)
    assert {"loss", "perplexity", "bleu", "blue", "rouge_ngram_f1", "rouge_bigram_recall"} <= set(result.metrics)
    out = T.generate(result.files, "t5", ["hello you", "the movie"], {"max_new_tokens": 4}, CONFIG, ModelCache(1 << 30))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_text2text_scores_train_rows_without_test(t5: str, config: EngineSection) -> None:
    sources = _sentences(12, 6)
    result = _run(config, "text2text", t5, {"text": sources, "target": sources}, {"text": [], "target": []})
    assert "perplexity" in result.metrics and "blue" not in result.metrics


def test_cancel_stops_training(bert: str, config: EngineSection) -> None:
    texts = _sentences(20, 7)
    calls = 0

    def cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1  # the check before training passes; the first step's check cancels

    events: list[dict[str, Any]] = []
    hyper = {"training_args": {**STEPS, "max_steps": 200}}
    data = {"text": texts, "class": [i % 2 for i in range(20)]}
    with pytest.raises(Canceled):
        T.tune("text-classification", bert, data, {}, hyper, config, cancelled, events.append)
    assert all(e["step"] <= 1 for e in events)


def test_cancel_while_waiting_for_another_run(bert: str, config: EngineSection) -> None:
    data = {"text": ["good movie", "bad film"], "class": ["pos", "neg"]}
    with T._ONE_RUN, pytest.raises(Canceled):
        T.tune("text-classification", bert, data, {}, {}, config, lambda: True, lambda e: None)


Case = tuple[str, dict[str, Any], type[Exception], str]
BAD: list[Case] = [
    ("text-classification", {"training_args": {"learning_rat": 1e-3, "max_steps": 1}}, InvalidArgument, "learning_rat"),
    ("text-classification", {"training_args": {"push_to_hub": True}}, InvalidArgument, "push_to_hub"),
    ("text-classification", {"training_args": {"output_dir": "/tmp/x"}}, InvalidArgument, "output_dir"),
    ("text-classification", {"training_args": {"lr_scheduler_type": "nope"}}, InvalidArgument, "training_args"),
    ("text-classification", {"training_args": []}, InvalidArgument, "training_args"),
    # file-reading config fields: objects only, whatever the text names
    (
        "text-classification",
        {"training_args": {"accelerator_config": "/nonexistent"}},
        PermissionDenied,
        "accelerator_config",
    ),
    ("text-classification", {"training_args": {"accelerator_config": "/etc"}}, PermissionDenied, "accelerator_config"),
    (
        "text-classification",
        {"training_args": {"fsdp": "full_shard", "fsdp_config": "/etc/hostname"}},
        PermissionDenied,
        "fsdp_config",
    ),
    ("text-classification", {"training_args": {"deepspeed": "/etc/hostname"}}, PermissionDenied, "deepspeed"),
    (
        "text-classification",
        {"training_args": {"lr_scheduler_kwargs": "/etc/hostname"}},
        PermissionDenied,
        "lr_scheduler_kwargs",
    ),
    ("text-classification", {"training_args": {"accelerator_config": 0.5}}, InvalidArgument, "JSON object"),
    # path and hub fields
    (
        "text-classification",
        {"training_args": {"resume_from_checkpoint": "/etc"}},
        InvalidArgument,
        "resume_from_checkpoint",
    ),
    ("text-classification", {"training_args": {"hub_token": "hf_secret"}}, InvalidArgument, "hub_token"),
    ("text-classification", {"training_args": {"hub_model_id": "someone/model"}}, InvalidArgument, "hub_model_id"),
    ("text-classification", {"dataset_args": {"text_column": "body"}}, InvalidArgument, "body"),
    ("text-classification", {"dataset_args": {"txt_column": "text"}}, InvalidArgument, "txt_column"),
    ("text-classification", {"epochs": 3}, InvalidArgument, "epochs"),
    ("text-classification", {"lora_config": {"r": 2}}, NotSupported, "lora_config"),
    ("text-pair-classification", {}, InvalidArgument, "text1, text2"),
    ("conversation", {"dataset_args": {"system_column": "sys"}}, InvalidArgument, "assistant, sys, user"),
    # prompt_template: plain documented fields only (a format spec would pad every row to gigabytes)
    ("conversation", {"prompt_template": "{assistant}{user:>2000000000}"}, InvalidArgument, "format specs"),
    ("conversation", {"prompt_template": "{assistant}{user!r}"}, InvalidArgument, "conversions"),
    ("conversation", {"prompt_template": "{assistant}{user.__class__}"}, InvalidArgument, "not allowed"),
    ("conversation", {"prompt_template": "{assistant}{user"}, InvalidArgument, "invalid prompt_template"),
    ("regression", {}, NotSupported, "regression"),
    ("nonsense", {}, InvalidArgument, "nonsense"),
]


@pytest.mark.parametrize(("task", "hyper", "error", "match"), BAD)
def test_rejected(
    bert: str, task: str, hyper: dict[str, Any], error: type[Exception], match: str, config: EngineSection
) -> None:
    data = {"text": ["good movie", "bad film"] * 4, "class": ["pos", "neg"] * 4}
    with pytest.raises(error, match=match):
        T.tune(task, bert, data, data, hyper, config, lambda: False, lambda e: None)


def _dict_fields() -> list[str]:
    """The TrainingArguments fields of the installed transformers that take an object (or text: a file path)."""
    import dataclasses

    from transformers import TrainingArguments

    typed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init and "dict" in str(f.type)}
    return sorted(typed | set(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ())))


def _refusal(call: Callable[[], Any]) -> tuple[str, str | None, str | None]:
    with pytest.raises(EngineError) as caught:
        call()
    error = caught.value
    assert isinstance(error, PermissionDenied) and error.sqlstate == "42501", error
    return error.message, error.detail, error.hint


def test_config_file_fields_give_one_answer_whatever_the_path(bert: str, config: EngineSection, tmp_path: Path) -> None:
    """No probe of the proxy host's files: a missing path, a directory, any file, JSON text, all answer alike."""
    valid = tmp_path / "accelerate.json"
    valid.write_text(json.dumps({"even_batches": True}))
    texts = ["/nonexistent/pgml", "/etc", "/etc/hostname", str(valid), '{"even_batches": true}', "relative.json", ""]
    data = {"text": ["good movie", "bad film"] * 4, "class": ["pos", "neg"] * 4}
    fields = _dict_fields()
    assert {"accelerator_config", "deepspeed", "fsdp_config"} <= set(fields)
    for field in fields:
        answers = set()
        for text in texts:
            given = {field: text, **({"fsdp": "full_shard"} if field == "fsdp_config" else {})}
            hyper = {"training_args": given}
            answers.add(_refusal(lambda: T.tune("text-classification", bert, data, {}, hyper, config,  # noqa: B023
                                                lambda: False, lambda e: None)))  # fmt: skip
            # the check when TrainingArguments is built covers every dict field of the installed transformers
            answers.add(_refusal(lambda: T._training_args(given, str(tmp_path / "out"), "cpu")))  # noqa: B023
        assert len(answers) == 1 and field in next(iter(answers))[0], answers
    assert not list(tmp_path.glob("out*"))


def test_config_fields_take_objects(tmp_path: Path) -> None:
    given = {"accelerator_config": {"even_batches": False}, "lr_scheduler_kwargs": {}, "push_to_hub": False,
             "hub_private_repo": None}  # fmt: skip
    args, used = T._training_args(given, str(tmp_path), "cpu")
    assert args.accelerator_config.even_batches is False and args.push_to_hub is False
    assert used["accelerator_config"] == {"even_batches": False} and "hub_private_repo" not in used


GOOD_TEMPLATES = [
    "{assistant}",
    "{system} {user} {assistant}{eos_token}",
    "{{literal braces}} {user}: {assistant}",
    "{eos_token}{system}{eos_token}{user}{eos_token}{assistant}{eos_token}",
]
BAD_TEMPLATES = [
    ("{assistant}{user:>2000000000}", "format specs"),
    ("{assistant}{user:{eos_token}}", "format specs"),
    ("{assistant!s}", "conversions"),
    ("{assistant}{user[0]}", r"\{user\[0\]\} is not allowed"),
    ("{assistant}{user.upper}", r"\{user.upper\} is not allowed"),
    ("{assistant}{}", r"field \{\} is not allowed"),
    ("{assistant}{0}", r"\{0\} is not allowed"),
    ("{assistant}{prompt}", r"\{prompt\} is not allowed"),
    ("{user}", r"\{assistant\} exactly once"),
    ("{{assistant}}", r"\{assistant\} exactly once"),
    ("{assistant}{assistant}", r"\{assistant\} exactly once"),
    ("{user}{user}{assistant}", r"\{user\} at most once"),
    ("{assistant}}", "invalid prompt_template"),
    (None, "must be text"),
]


@pytest.mark.parametrize("template", GOOD_TEMPLATES)
def test_prompt_template_accepted(template: str) -> None:
    assert T.check_template(template) == template
    assert T._plan("conversation", {"prompt_template": template}).prompt_template == template


@pytest.mark.parametrize(("template", "match"), BAD_TEMPLATES)
def test_prompt_template_rejected(template: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        T.check_template(template)
    if template is not None:
        with pytest.raises(InvalidArgument, match=match):
            T._plan("conversation", {"prompt_template": template})


def test_chat_prompt_checks_the_template(gpt2: str) -> None:
    """Where a template is applied (training rows, scoring, pgml.generate): never formatted unchecked."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    prompt, full = T.chat_prompt(tokenizer, "{system}|{user}|{assistant}{eos_token}", None, "hi", "thanks")
    assert (prompt, full) == ("|hi|", "|hi|thanks<|endoftext|>")
    for template, match in BAD_TEMPLATES[:4]:
        with pytest.raises(InvalidArgument, match=match):
            T.chat_prompt(tokenizer, template, None, "hi", "thanks")


def test_rejected_values(bert: str, config: EngineSection) -> None:
    run: Callable[[dict[str, list[Any]]], Any] = lambda data: T.tune(  # noqa: E731
        "text-classification", bert, data, {}, {}, config, lambda: False, lambda e: None
    )
    with pytest.raises(InvalidArgument, match="NULL"):
        run({"text": ["good", None], "class": ["a", "b"]})
    with pytest.raises(InvalidArgument, match="NULL"):
        run({"text": ["good", "bad"], "class": ["a", None]})
    with pytest.raises(InvalidArgument, match="2 distinct classes"):
        run({"text": ["good", "bad"], "class": ["a", "a"]})
    with pytest.raises(InvalidArgument, match="training row"):
        run({"text": [], "class": []})


def test_unknown_model_is_not_downloaded(tmp_path: Path, config: EngineSection) -> None:
    from engine.api import UnknownModel

    with pytest.raises(UnknownModel):
        T.tune("text-classification", "nobody/no-such-model", {"text": ["a"], "class": [1]}, {}, {}, config,
               lambda: False, lambda e: None)  # fmt: skip


def test_bleu_and_rouge() -> None:
    assert T.bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    assert T.bleu(["hello"], ["goodbye world"]) == 0.0
    assert 0 < T.bleu(["the cat sat on the mat"], ["the cat is on the mat"]) < 100
    assert T.rouge(["the cat"], ["the cat"], 1) == pytest.approx((1.0, 1.0, 1.0))
    p, r, f = T.rouge(["the cat sat"], ["the cat"], 1)
    assert (p, r) == pytest.approx((2 / 3, 1.0)) and f == pytest.approx(0.8)
    assert T.rouge(["a b"], ["c d"], 2) == (0.0, 0.0, 0.0)
