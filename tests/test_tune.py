"""pgml.tune: fine-tuning and generation with tiny random-weight models built on the fly (no downloads).

engine.nlp.finetune directly, then pgml.tune / pgml.predict / pgml.generate through a real proxy with psycopg:
PostgresML's documented flat hyperparams form and the nested one, y_column_name, predict and
predict_proba on tuned text classifiers, overload resolution of untyped literals, errors with SQLSTATE.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.api import Canceled, EngineConfig, EngineError, InvalidArgument, NotSupported, PermissionDenied
from engine.nlp.finetune import trainer, tuned
from engine.nlp.finetune.plan import build_plan, check_template, training_args
from engine.nlp.finetune.rows import chat_prompt, conversation_row
from engine.nlp.finetune.scores import bleu, rouge
from engine.runtime.cache import ModelCache
from tests.conftest import Postgres, ProxyProcess, scratch_database, start_proxy

CONFIG = EngineConfig(device="cpu")  # generate(): tuned models come as files, not by name
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
def config(model_root: Path) -> EngineConfig:
    return EngineConfig(device="cpu", model_dirs=(str(model_root),))


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
    config: EngineConfig, task: str, model: str, train: dict[str, list[Any]], test: dict[str, list[Any]], **hyper: Any
) -> Any:
    logged: list[dict[str, Any]] = []
    hyperparams = {"training_args": dict(STEPS), **hyper}
    result = trainer.fine_tune(task, model, train, test, hyperparams, config, lambda: False, logged.append)
    assert result.events == logged and result.events
    assert all("step" in e and "epoch" in e for e in result.events)
    assert any(isinstance(e.get("loss"), float) for e in result.events)
    assert any("eval_loss" in e for e in result.events)
    json.dumps(result.events, allow_nan=False)  # storable in pgml.logs
    return result


def _check_files(files: dict[str, bytes]) -> dict[str, Any]:
    assert "config.json" in files and "model.safetensors" in files
    assert "tokenizer.json" in files and "tokenizer_config.json" in files and tuned.MANIFEST in files
    assert "training_args.bin" not in files
    config: dict[str, Any] = json.loads(files["config.json"])
    return config


def test_text_classification(bert: str, config: EngineConfig) -> None:
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
    assert json.loads(result.files[tuned.MANIFEST])["labels"] == ["bad", "good"]
    with pytest.raises(NotSupported, match="text-classification"):
        tuned.generate_tuned(result.files, "cls", ["hello"], {}, CONFIG, ModelCache(1 << 30))


def test_text_pair_classification_int_labels_and_columns(bert: str, config: EngineConfig) -> None:
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


def test_conversation_and_generate(gpt2: str, config: EngineConfig) -> None:
    data = _chat(20)
    train = {k: v[:16] for k, v in data.items()}
    test = {k: v[16:] for k, v in data.items()}
    result = _run(config, "conversation", gpt2, train, test)
    _check_files(result.files)
    assert {"loss", "perplexity", "bleu", "eval_loss"} <= set(result.metrics)
    cache = ModelCache(1 << 30)
    prompts = ["hello how are you thanks", "hi", "bad movie"]
    out = tuned.generate_tuned(result.files, "conv", prompts, {"max_new_tokens": 3}, CONFIG, cache)
    assert len(out) == 3 and all(isinstance(t, str) and len(t.split()) <= 3 for t in out)  # new text only
    again = tuned.generate_tuned(result.files, "conv", ["hi"], {"max_new_tokens": 2, "do_sample": False}, CONFIG, cache)
    assert len(again) == 1 and len(cache) == 1
    with pytest.raises(InvalidArgument, match="no_such_option"):
        tuned.generate_tuned(result.files, "conv", ["hi"], {"no_such_option": 1}, CONFIG, cache)


def test_conversation_prompt_template_without_system_column(gpt2: str, config: EngineConfig) -> None:
    data = {k: v for k, v in _chat(12).items() if k != "system"}
    template = "{system} question: {user} answer: {assistant}{eos_token}"
    result = _run(config, "conversation", gpt2, data, {}, prompt_template=template)
    assert result.hyperparams["prompt_template"] == template and "bleu" in result.metrics
    assert json.loads(result.files[tuned.MANIFEST])["prompt_template"] == template
    out = tuned.generate_tuned(result.files, "tpl", ["hello you"], {"max_new_tokens": 2}, CONFIG, ModelCache(1 << 30))
    assert len(out) == 1 and len(out[0].split()) <= 2
    # generate checks the stored template too: the manifest comes from pgml.files, anyone may have written it
    for stored, match in (("{assistant}{user:>30}", "format specs"), (5, "must be text")):
        forged = {**result.files, tuned.MANIFEST: json.dumps({"task": "conversation", "kind": "causal",
                                                          "prompt_template": stored}).encode()}  # fmt: skip
        with pytest.raises(InvalidArgument, match=match):
            tuned.generate_tuned(
                forged, f"forged-{stored}", ["hello you"], {"max_new_tokens": 2}, CONFIG, ModelCache(1 << 30)
            )


def test_conversation_loss_covers_the_reply_only(gpt2: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    prompt, full = chat_prompt(tokenizer, None, "be fine", "hello how are you", "fine thanks")
    assert full.startswith(prompt) and prompt.endswith("<|assistant|> ")
    plan = build_plan("conversation", {})
    row = conversation_row(plan, tokenizer, 64, "be fine", "hello how are you", "fine thanks")
    supervised = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(supervised) == "fine thanks <|endoftext|>"
    templated = build_plan("conversation", {"prompt_template": "{system} {user} {assistant}{eos_token}"})
    row = conversation_row(templated, tokenizer, 64, None, "hi", "thanks")
    assert tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]) == (
        "thanks <|endoftext|>"
    )


def test_translation_and_generate(t5: str, config: EngineConfig) -> None:
    sources = _sentences(20, 5)
    targets = [" ".join(reversed(s.split())) for s in sources]
    train = {"en": sources[:16], "fr": targets[:16]}
    test = {"en": sources[16:], "fr": targets[16:]}
    result = _run(config, "translation", t5, train, test, dataset_args={"text_column": "en", "target_column": "fr"})
    _check_files(result.files)
    assert {"loss", "perplexity", "bleu", "blue", "rouge_ngram_f1", "rouge_bigram_recall"} <= set(result.metrics)
    out = tuned.generate_tuned(
        result.files, "t5", ["hello you", "the movie"], {"max_new_tokens": 4}, CONFIG, ModelCache(1 << 30)
    )
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_text2text_scores_train_rows_without_test(t5: str, config: EngineConfig) -> None:
    sources = _sentences(12, 6)
    result = _run(config, "text2text", t5, {"text": sources, "target": sources}, {"text": [], "target": []})
    assert "perplexity" in result.metrics and "blue" not in result.metrics


def test_cancel_stops_training(bert: str, config: EngineConfig) -> None:
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
        trainer.fine_tune("text-classification", bert, data, {}, hyper, config, cancelled, events.append)
    assert all(e["step"] <= 1 for e in events)


def test_cancel_while_waiting_for_another_run(bert: str, config: EngineConfig) -> None:
    data = {"text": ["good movie", "bad film"], "class": ["pos", "neg"]}
    with trainer._ONE_RUN, pytest.raises(Canceled):
        trainer.fine_tune("text-classification", bert, data, {}, {}, config, lambda: True, lambda e: None)


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
    bert: str, task: str, hyper: dict[str, Any], error: type[Exception], match: str, config: EngineConfig
) -> None:
    data = {"text": ["good movie", "bad film"] * 4, "class": ["pos", "neg"] * 4}
    with pytest.raises(error, match=match):
        trainer.fine_tune(task, bert, data, data, hyper, config, lambda: False, lambda e: None)


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


def test_config_file_fields_give_one_answer_whatever_the_path(bert: str, config: EngineConfig, tmp_path: Path) -> None:
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
            answers.add(_refusal(lambda: trainer.fine_tune("text-classification", bert, data, {}, hyper, config,  # noqa: B023
                                                lambda: False, lambda e: None)))  # fmt: skip
            # the check when TrainingArguments is built covers every dict field of the installed transformers
            answers.add(_refusal(lambda: training_args(given, str(tmp_path / "out"), "cpu")))  # noqa: B023
        assert len(answers) == 1 and field in next(iter(answers))[0], answers
    assert not list(tmp_path.glob("out*"))


def test_config_fields_take_objects(tmp_path: Path) -> None:
    given = {"accelerator_config": {"even_batches": False}, "lr_scheduler_kwargs": {}, "push_to_hub": False,
             "hub_private_repo": None}  # fmt: skip
    args, used = training_args(given, str(tmp_path), "cpu")
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
    assert check_template(template) == template
    assert build_plan("conversation", {"prompt_template": template}).prompt_template == template


@pytest.mark.parametrize(("template", "match"), BAD_TEMPLATES)
def test_prompt_template_rejected(template: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        check_template(template)
    if template is not None:
        with pytest.raises(InvalidArgument, match=match):
            build_plan("conversation", {"prompt_template": template})


def test_chat_prompt_checks_the_template(gpt2: str) -> None:
    """Where a template is applied (training rows, scoring, pgml.generate): never formatted unchecked."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    prompt, full = chat_prompt(tokenizer, "{system}|{user}|{assistant}{eos_token}", None, "hi", "thanks")
    assert (prompt, full) == ("|hi|", "|hi|thanks<|endoftext|>")
    for template, match in BAD_TEMPLATES[:4]:
        with pytest.raises(InvalidArgument, match=match):
            chat_prompt(tokenizer, template, None, "hi", "thanks")


def test_rejected_values(bert: str, config: EngineConfig) -> None:
    run: Callable[[dict[str, list[Any]]], Any] = lambda data: trainer.fine_tune(  # noqa: E731
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


def test_unknown_model_is_not_downloaded(tmp_path: Path, config: EngineConfig) -> None:
    from engine.api import UnknownModel

    with pytest.raises(UnknownModel):
        trainer.fine_tune("text-classification", "nobody/no-such-model", {"text": ["a"], "class": [1]}, {}, {}, config,
               lambda: False, lambda e: None)  # fmt: skip


def test_flat_and_nested_hyperparams_make_one_set_of_training_arguments() -> None:
    plan = build_plan(
        "text-classification",
        {
            "learning_rate": 1e-3,
            "weight_decay": 0.01,
            "max_length": 32,
            "training_args": {"max_steps": 2},
            "model_name": "x",
            "project_name": "p",
        },
    )
    assert plan.training_args == {"learning_rate": 1e-3, "weight_decay": 0.01, "max_steps": 2}
    assert plan.max_length == 32
    renamed = build_plan("question-answering", {"evaluation_strategy": "epoch", "stride": 16})
    assert renamed.training_args == {"eval_strategy": "epoch"} and renamed.stride == 16
    lengths = build_plan("summarization", {"max_input_length": 64, "max_summary_length": 8})
    assert (lengths.max_length, lengths.target_length) == (64, 8)


def test_columns_from_y_column_name_and_the_relation() -> None:
    assert build_plan("translation", {}, ["en", "es"], "es").columns == {"text_column": "en", "target_column": "es"}
    # more than one unused column: nothing is guessed (the missing column is reported when the rows are read)
    assert build_plan("translation", {}, ["en", "fr", "es"], "es").columns["text_column"] == "text"
    named = build_plan("text-classification", {"dataset_args": {"text_column": "body"}}, ["review", "label"], "label")
    assert named.columns == {"text_column": "body", "class_column": "label"}  # a named column is never replaced
    assert build_plan("text-classification", {}, ["text", "label"]).columns["class_column"] == "label"
    assert build_plan("conversation", {}, ["user", "reply"], "reply").columns["assistant_column"] == "reply"
    assert build_plan("text-generation", {}, ["id", "body"], "body").columns == {"text_column": "body"}
    with pytest.raises(InvalidArgument, match="name different columns"):
        build_plan("summarization", {"dataset_args": {"target_column": "a"}}, ["text", "a", "b"], "b")


def test_an_evaluation_after_the_last_step_is_reused(bert: str, config: EngineConfig) -> None:
    data: dict[str, list[Any]] = {"text": _sentences(12, 8), "class": [i % 2 for i in range(12)]}
    result = _run(config, "text-classification", bert, data, data, training_args={**STEPS, "eval_strategy": "steps",
                                                                                  "eval_steps": 2})  # fmt: skip
    evaluations = [e for e in result.events if "eval_loss" in e]
    assert len(evaluations) == 1 and result.metrics["eval_loss"] == evaluations[0]["eval_loss"]


def test_bleu_and_rouge() -> None:
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    assert bleu(["hello"], ["goodbye world"]) == 0.0
    assert 0 < bleu(["the cat sat on the mat"], ["the cat is on the mat"]) < 100
    assert rouge(["the cat"], ["the cat"], 1) == pytest.approx((1.0, 1.0, 1.0))
    p, r, f = rouge(["the cat sat"], ["the cat"], 1)
    assert (p, r) == pytest.approx((2 / 3, 1.0)) and f == pytest.approx(0.8)
    assert rouge(["a b"], ["c d"], 2) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- #
# Through a real proxy: pgml.tune as PostgresML documents it, predict on the tuned project
# --------------------------------------------------------------------------- #

JSONB = 3802  # type OID


@pytest.fixture(scope="module")
def tune_proxy(
    pg: Postgres, model_root: Path, bert: str, gpt2: str, t5: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy whose model directory holds the tiny ``bert``, ``gpt2`` and ``t5`` built above (named so)."""
    handle = start_proxy(pg.dsn(), tmp_path_factory.mktemp("tune-proxy"), PGML_PROXY_ENGINE_MODEL_DIRS=str(model_root),
                         PGML_PROXY_ENGINE_DEVICE="cpu")  # fmt: skip
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def tune_db(pg: Postgres) -> Iterator[str]:
    with scratch_database(pg, "tune") as name:
        yield name


@pytest.fixture
def conn(tune_proxy: ProxyProcess, tune_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(tune_proxy.dsn(dbname=tune_db), autocommit=True) as connection:
        yield connection


def _table(conn: psycopg.Connection[Any], name: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} ({columns})")
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} VALUES ({', '.join(['%s'] * len(rows[0]))})", rows)


def _model(conn: psycopg.Connection[Any], project: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The deployed model's hyperparams and metrics, and its snapshot's y_column_name."""
    found = conn.execute(
        "SELECT m.hyperparams, m.metrics, s.y_column_name FROM pgml.deployed_models d JOIN pgml.models m ON m.id = d.id"
        " JOIN pgml.snapshots s ON s.id = m.snapshot_id WHERE d.name = %s", [project]
    ).fetchone()  # fmt: skip
    assert found is not None, project
    return found[0], found[1], found[2]


@contextlib.contextmanager
def _load_notices(conn: psycopg.Connection[Any]) -> Iterator[list[str]]:
    """The NOTICEs the block's statements got, a "loaded model … in N s" one cut before its time."""
    told: list[str] = []

    def heard(diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.severity_nonlocalized == "NOTICE":
            told.append(re.sub(r" in [0-9.]+ s$", "", diagnostic.message_primary or ""))

    conn.add_notice_handler(heard)
    try:
        yield told
    finally:
        conn.remove_notice_handler(heard)


def _one(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> tuple[Any, int]:
    """The single value of ``sql`` and its column's type OID."""
    cur = conn.execute(sql, params)
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return row[0], cur.description[0].type_code


def _reviews(n: int, seed: int) -> list[tuple[str, int]]:
    texts = _sentences(n, seed)
    return [(t, int("good" in t or "great" in t or "love" in t)) for t in texts]


# The IMDB example of PostgresML's pgml.tune docs / examples/finetune.sql, verbatim but the names
DOCS_TUNE = """SELECT * FROM pgml.tune(
    'IMDB Review Sentiment',
    task => 'text-classification',
    relation_name => 'imdb',
    y_column_name => 'label',
    model_name => 'bert',
    hyperparams => '{
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 1,
        "weight_decay": 0.01
    }',
    test_size => 0.5,
    test_sampling => 'last'
)"""


@pytest.fixture(scope="module")
def imdb(tune_proxy: ProxyProcess, tune_db: str) -> str:
    """``IMDB Review Sentiment`` tuned as the docs do it (flat hyperparams, y_column_name 'label', bigint labels)."""
    with psycopg.connect(tune_proxy.dsn(dbname=tune_db), autocommit=True) as conn:
        _table(conn, "imdb", "text text, label bigint", [*_reviews(16, 11), ("I love SQL", 1)])
        row = conn.execute(DOCS_TUNE).fetchone()
        assert row == ("IMDB Review Sentiment", "text-classification", "transformers", True)
    return "IMDB Review Sentiment"


def test_docs_flat_form_is_read_as_training_arguments(conn: psycopg.Connection[Any], imdb: str) -> None:
    hyperparams, metrics, y = _model(conn, imdb)
    args = hyperparams["training_args"]
    assert {
        k: args[k] for k in ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "weight_decay")
    } == {"learning_rate": 2e-5, "per_device_train_batch_size": 16, "num_train_epochs": 1, "weight_decay": 0.01}
    assert hyperparams["dataset_args"] == {"text_column": "text", "class_column": "label"}  # y_column_name honoured
    assert y == ["label"] and {"f1", "accuracy"} <= set(metrics)
    (logged,) = conn.execute(
        "SELECT count(*) FROM pgml.logs l JOIN pgml.models m ON m.id = l.model_id"
        " JOIN pgml.deployed_models d ON d.id = m.id WHERE d.name = %s",
        [imdb],
    ).fetchone() or (0,)
    assert logged >= 1  # fmt: skip


def test_predict_and_predict_proba_on_the_tuned_project(conn: psycopg.Connection[Any], imdb: str) -> None:
    """As the docs show: ``pgml.predict('IMDB Review Sentiment', 'I love SQL')`` -> a training label."""
    labels = sorted(v for (v,) in conn.execute("SELECT DISTINCT label FROM imdb"))
    with _load_notices(conn) as told:
        label, oid = _one(conn, "SELECT pgml.predict('IMDB Review Sentiment', 'I love SQL') AS sentiment")
    project = "of project IMDB Review Sentiment"
    assert told == [f"loading model {project} (first use)", f"loaded model {project}"]
    assert oid == JSONB and type(label) is int and label in labels
    proba, oid = _one(conn, "SELECT pgml.predict_proba('IMDB Review Sentiment', 'I love SQL') AS sentiment")
    assert oid == JSONB and len(proba) == len(labels) and sum(proba) == pytest.approx(1.0, abs=1e-5)
    assert labels[max(range(len(proba)), key=proba.__getitem__)] == label  # probabilities in label order
    # bound parameters (psycopg sends them untyped), per row, and arrays of texts all agree with the constant form
    assert _one(conn, "SELECT pgml.predict(%s, %s)", [imdb, "I love SQL"])[0] == label
    assert _one(conn, "SELECT pgml.predict_proba(%s, %s)", [imdb, "I love SQL"])[0] == proba
    texts = [t for (t,) in conn.execute("SELECT text FROM imdb ORDER BY text")]
    rows = conn.execute("SELECT text, pgml.predict(%s, text), pgml.predict_proba(%s, text) FROM imdb ORDER BY text",
                        [imdb, imdb]).fetchall()  # fmt: skip
    assert [r[0] for r in rows] == texts and all(r[1] in labels and len(r[2]) == len(labels) for r in rows)
    assert dict((r[0], r[1]) for r in rows)["I love SQL"] == label
    many, oid = _one(conn, "SELECT pgml.predict(%s, %s::text[])", [imdb, texts])
    assert oid == JSONB and many == [r[1] for r in rows]
    many = _one(conn, "SELECT pgml.predict_proba(%s, ARRAY['I love SQL', NULL, 'I love SQL'])", [imdb])[0]
    assert many == [proba, None, proba]
    assert _one(conn, "SELECT pgml.predict(%s, NULL::text)", [imdb])[0] is None  # STRICT


def test_unknown_literals_resolve_as_postgresql_resolves_them(conn: psycopg.Connection[Any], imdb: str,
                                                              pg: Postgres, tune_db: str) -> None:  # fmt: skip
    """``'I love SQL'`` and even ``'{1,2}'`` are text to PostgreSQL (string category first); ARRAY[1,2] is not."""
    shapes = {"a": "'I love SQL'", "b": "'{1,2}'", "c": "ARRAY['x', 'y']", "d": "ARRAY[1, 2]"}
    select = ", ".join(f"pgml.predict('p', {arg}) AS {name}" for name, arg in shapes.items())
    select += ", pgml.predict_proba('p', 'x') AS pa, pgml.predict_proba('p', '{1,2}'::real[]) AS pb"
    with psycopg.connect(pg.dsn(dbname=tune_db), autocommit=True) as direct:  # the server, with the stubs
        direct.execute(f"CREATE OR REPLACE TEMP VIEW resolved AS SELECT {select}")
        types: dict[str, str] = dict(direct.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                                    " WHERE attrelid = 'resolved'::regclass AND attnum > 0").fetchall())  # fmt: skip
    assert types == {"a": "jsonb", "b": "jsonb", "c": "jsonb", "d": "real", "pa": "jsonb", "pb": "real[]"}
    # the proxy picks the same overloads: text ones classify, the number array one asks for text
    assert _one(conn, "SELECT pgml.predict('IMDB Review Sentiment', '{1,2}')")[1] == JSONB
    assert len(_one(conn, "SELECT pgml.predict('IMDB Review Sentiment', ARRAY['x', 'y'])")[0]) == 2
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="pass the text"):
        conn.execute("SELECT pgml.predict('IMDB Review Sentiment', ARRAY[1, 2])")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_text_predict_overloads_are_declared_alike_in_catalogue_and_stubs(conn: psycopg.Connection[Any]) -> None:
    """The text overloads are declared alike in the stubs (what PostgreSQL resolves with) and the catalogue."""
    from engine.api import signatures

    conn.execute("SELECT pgml.version()")  # the schema is in place
    declared: set[tuple[str, str, str]] = set()
    for name in ("predict", "predict_proba"):
        for sig in signatures(name):
            args = ", ".join(f"{p.name} {'anyelement' if p.type == 'record' else p.type}" for p in sig.params)
            declared.add((name, args, sig.returns))
    stubs = {(n, a.replace('"', ""), r) for n, a, r in conn.execute(
        "SELECT proname, pg_get_function_identity_arguments(p.oid), format_type(prorettype, NULL) FROM pg_proc p"
        " WHERE pronamespace = 'pgml'::regnamespace AND proname IN ('predict', 'predict_proba')")}  # fmt: skip
    texts = {s for s in declared if s[1].startswith("project_name text, inputs ")}
    assert texts == {s for s in stubs if s[1].startswith("project_name text, inputs ")}
    assert {(n, a.split()[-1], t) for n, a, t in texts} == {
        (name, inputs, "jsonb") for name in ("predict", "predict_proba") for inputs in ("text", "text[]")
    }


def test_nested_form_text_labels_and_y_column_name(conn: psycopg.Connection[Any]) -> None:
    rows = [(i, t, "good" if label else "bad") for i, (t, label) in enumerate(_reviews(12, 12))]
    _table(conn, "feedback", "id int, comment text, verdict text", rows)
    hyper = {"training_args": dict(STEPS), "dataset_args": {"text_column": "comment"}}
    row = conn.execute("SELECT * FROM pgml.tune('Feedback', 'text-classification', 'feedback', 'verdict', 'bert',"
                       " %s::jsonb, test_size => 0.25)", [json.dumps(hyper)]).fetchone()  # fmt: skip
    assert row is not None and row[:3] == ("Feedback", "text-classification", "transformers")
    hyperparams, _, y = _model(conn, "Feedback")
    assert hyperparams["dataset_args"] == {"text_column": "comment", "class_column": "verdict"} and y == ["verdict"]
    assert hyperparams["training_args"]["max_steps"] == 2
    label, _ = _one(conn, "SELECT pgml.predict('Feedback', 'good movie')")
    assert label in ("bad", "good")
    # again without relation_name: the project's snapshot, and its y_column_name, are reused
    row = conn.execute("SELECT * FROM pgml.tune('Feedback', model_name => 'bert', hyperparams => %s::jsonb)",
                       [json.dumps(hyper)]).fetchone()  # fmt: skip
    assert row is not None and row[1] == "text-classification"


def test_flat_translation_takes_the_other_column_as_input(conn: psycopg.Connection[Any]) -> None:
    """finetune.sql's translation: a view (en, es), y_column_name 'es', flat hyperparams with max_length."""
    sources = _sentences(12, 13)
    _table(conn, "pairs", "en text, es text", [(s, " ".join(reversed(s.split()))) for s in sources])
    conn.execute("CREATE OR REPLACE VIEW en_to_es AS SELECT en, es FROM pairs")
    hyper = {"learning_rate": 2e-5, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
             "num_train_epochs": 1, "weight_decay": 0.01, "max_length": 16}  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.tune('Translate', task => 'translation', relation_name => 'en_to_es',"
                       " y_column_name => 'es', model_name => 't5', hyperparams => %s::jsonb, test_size => 0.5,"
                       " test_sampling => 'last')", [json.dumps(hyper)]).fetchone()  # fmt: skip
    assert row is not None and row[1:3] == ("translation", "transformers")
    hyperparams, metrics, _ = _model(conn, "Translate")
    assert hyperparams["dataset_args"] == {"text_column": "en", "target_column": "es"}
    assert hyperparams["max_length"] == 16 and hyperparams["training_args"]["num_train_epochs"] == 1
    assert {"bleu", "blue", "perplexity"} <= set(metrics)
    text, _ = _one(conn, "SELECT pgml.generate('Translate', 'the movie', '{\"max_new_tokens\": 3}')")
    assert isinstance(text, str)


def test_flat_summarization_lengths(conn: psycopg.Connection[Any]) -> None:
    """finetune.sql's summarization: max_input_length / max_summary_length at the top level."""
    _table(conn, "bills", '"text" text, summary text', [(s + " " + s, s.split()[0]) for s in _sentences(8, 14)])
    hyper = {"learning_rate": 2e-5, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
             "num_train_epochs": 1, "weight_decay": 0.01, "max_input_length": 8, "max_summary_length": 4}  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.tune('Summaries', task => 'summarization', relation_name => 'bills',"
                       " y_column_name => 'summary', model_name => 't5', hyperparams => %s::jsonb,"
                       " test_size => 0.01, test_sampling => 'last')", [json.dumps(hyper)]).fetchone()  # fmt: skip
    assert row is not None and row[1] == "summarization"
    hyperparams, metrics, _ = _model(conn, "Summaries")
    assert hyperparams["max_input_length"] == 8 and hyperparams["max_summary_length"] == 4
    assert hyperparams["dataset_args"] == {"text_column": "text", "target_column": "summary"}
    assert "rouge_ngram_f1" in metrics


def test_text_generation_as_documented(conn: psycopg.Connection[Any]) -> None:
    _table(conn, "book", "id int, body text", list(enumerate(_sentences(10, 15))))
    row = conn.execute("SELECT * FROM pgml.tune('GPT Generator', task => 'text-generation', relation_name => 'book',"
                       " y_column_name => 'body', model_name => 'gpt2',"
                       " hyperparams => '{\"learning_rate\": 2e-5, \"num_train_epochs\": 1}', test_size => 0.2,"
                       " test_sampling => 'last')").fetchone()  # fmt: skip
    assert row is not None and row[1:3] == ("text-generation", "transformers")
    hyperparams, metrics, _ = _model(conn, "GPT Generator")
    assert hyperparams["dataset_args"] == {"text_column": "body"} and "perplexity" in metrics
    with _load_notices(conn) as told:
        text, _ = _one(conn, "SELECT pgml.generate('GPT Generator', 'hello how', '{\"max_new_tokens\": 2}')")
    assert isinstance(text, str) and len(text.split()) <= 2
    assert told == ["loading model of project GPT Generator (first use)", "loaded model of project GPT Generator"]
    with _load_notices(conn) as told:
        _one(conn, "SELECT pgml.generate('GPT Generator', 'hello', '{\"max_new_tokens\": 1}')")
    assert told == []  # loaded: nothing to tell
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="text-generation"):
        conn.execute("SELECT pgml.predict('GPT Generator', 'hello')")


def test_question_answering_squad_form(conn: psycopg.Connection[Any]) -> None:
    """finetune.sql's SQuAD example: answers as SQuAD JSON (some unanswerable), stride and evaluation_strategy."""
    rows = []
    for i, sentence in enumerate(_sentences(12, 16)):
        context = f"the plot is {sentence} and fine"
        answerable = i % 3 != 0
        answers = {"text": [sentence.split()[0]] if answerable else [], "answer_start": [12] if answerable else []}
        rows.append((f"q{i}", "what is the plot", context, json.dumps(answers)))
    _table(conn, "squad", "id text, question text, context text, answers jsonb", rows)
    hyper = {"evaluation_strategy": "epoch", "learning_rate": 2e-5, "per_device_train_batch_size": 4,
             "per_device_eval_batch_size": 4, "num_train_epochs": 1, "max_length": 24, "stride": 4}  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.tune('SQuAD', 'question-answering', 'squad', 'answers', 'bert',"
                       " hyperparams => %s::jsonb, test_size => 4, test_sampling => 'last')",
                       [json.dumps(hyper)]).fetchone()  # fmt: skip
    assert row is not None and row[1:3] == ("question-answering", "transformers")
    hyperparams, metrics, _ = _model(conn, "SQuAD")
    assert hyperparams["training_args"]["eval_strategy"] == "epoch" and hyperparams["stride"] == 4
    assert 0 <= metrics["f1"] <= 1 and 0 <= metrics["exact_match"] <= 1 and "eval_loss" in metrics
    task = json.dumps({"task": "question-answering", "model": "SQuAD"})
    question = json.dumps({"question": "what is the plot", "context": "the plot is good"})
    found, _ = _one(conn, "SELECT pgml.transform(%s::jsonb, inputs => ARRAY[%s])", [task, question])
    assert found["answer"] in "the plot is good"


BAD_TUNES: list[tuple[str, dict[str, Any], str, str]] = [
    ("text-classification", {"epochs": 3}, "22023", "unknown hyperparams: epochs"),
    ("text-classification", {"learning_rate": 1e-3, "training_args": {"learning_rate": 1e-4}}, "22023", "twice"),
    ("text-classification", {"num_train_epochs": "many"}, "22023", "training_args"),
    ("text-classification", {"output_dir": "/tmp/elsewhere"}, "22023", "output_dir"),
    ("text-classification", {"push_to_hub": True}, "22023", "push_to_hub"),
    ("text-classification", {"accelerator_config": "/etc/hostname"}, "42501", "accelerator_config"),
    ("text-classification", {"stride": 8}, "22023", "stride"),
    ("text-classification", {"max_summary_length": 8}, "22023", "max_summary_length"),
    ("text-classification", {"max_input_length": 1}, "22023", "max_input_length"),
    ("text-classification", {"dataset_args": {"class_column": "other"}}, "22023", "y_column_name"),
    ("text-classification", {"lora_config": {"r": 2}}, "0A000", "lora_config"),
    ("regression", {}, "22023", "regression"),
]


@pytest.mark.parametrize(("task", "hyper", "sqlstate", "match"), BAD_TUNES)
def test_bad_hyperparams_are_errors_with_sqlstate(
    conn: psycopg.Connection[Any], task: str, hyper: dict[str, Any], sqlstate: str, match: str
) -> None:
    _table(conn, "bad_reviews", "text text, label int", [("good movie", 1), ("bad film", 0)] * 4)
    with pytest.raises(psycopg.Error, match=match) as caught:
        conn.execute("SELECT * FROM pgml.tune('Bad', %s, 'bad_reviews', 'label', 'bert', %s::jsonb)",
                     [task, json.dumps(hyper)])  # fmt: skip
    assert caught.value.sqlstate == sqlstate
    assert conn.execute("SELECT count(*) FROM pgml.projects WHERE name = 'Bad'").fetchone() == (0,)


def test_y_column_name_must_exist_and_predict_needs_a_tuned_classifier(conn: psycopg.Connection[Any]) -> None:
    _table(conn, "points", "x real, y int", [(float(i), i % 2) for i in range(10)])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="nope"):
        conn.execute("SELECT * FROM pgml.tune('Nope', 'text-classification', 'points', 'nope', 'bert')")
    conn.execute("SELECT * FROM pgml.train('Points', 'classification', 'points', 'y')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"tuned by pgml\.tune") as caught:
        conn.execute("SELECT pgml.predict('Points', '{1}')")  # text to PostgreSQL: the hint says how to cast
    assert "real[]" in (caught.value.diag.message_hint or "")
    assert isinstance(_one(conn, "SELECT pgml.predict('Points', '{1}'::real[])")[0], float)
