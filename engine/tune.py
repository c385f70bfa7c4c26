"""The model side of ``pgml.tune``, ``pgml.generate`` and ``pgml.predict`` on tuned models.

Owns: the tasks tune supports and their ``dataset_args`` (column roles, ``y_column_name``), the
hyperparams forms (below), ``training_args`` -> ``TrainingArguments`` (temporary output dir, no
reporting, no hub push, no checkpoints unless asked, no path or hub fields, config fields as objects
only: never a file of this host opened by name), tokenization, the Trainer run (cancel between steps,
one event per Trainer log), test metrics, the tuned model's files (plus ``pgml_tune.json``: task,
kind, labels, prompt template), generation, and classifying texts with a tuned classifier.

Tasks (dash or underscore) and ``dataset_args`` roles with their default columns (the role
``y_column_name`` names is marked *y*):

* ``text-classification``: ``text_column`` "text", ``class_column`` "class" (*y*);
  ``text-pair-classification``: ``text1_column`` "text1", ``text2_column`` "text2", ``class_column`` (*y*).
  Labels (text, integers, booleans): sorted distinct values -> ``id2label`` (as strings) in the config,
  the values themselves in the manifest (what ``pgml.predict`` answers). Metrics ``f1`` (macro), ``accuracy``.
* ``conversation``: ``system_column`` "system" (may be absent unless named; NULL/empty = none),
  ``user_column`` "user", ``assistant_column`` "assistant" (*y*). Causal LM on the tokenizer's chat template
  (or ``hyperparams.prompt_template``, a ``str.format`` text with ``{system}``, ``{user}``,
  ``{assistant}``, ``{eos_token}``, plain fields only: no format spec, conversion, attribute or index,
  checked at tune time and wherever it is applied); the loss covers the assistant's reply (and an EOS) only.
* ``text-generation``: ``text_column`` "text" (*y*); causal LM on the whole text (PostgresML's older tune).
* ``question-answering``: ``question_column`` "question", ``context_column`` "context", ``answers_column``
  "answers" (*y*: SQuAD's ``{"text": [...], "answer_start": [...]}``, empty for no answer, or plain text);
  extractive QA over windows of ``max_length`` tokens overlapping by ``hyperparams.stride`` (128). Metrics:
  SQuAD ``f1`` and ``exact_match`` (fractions) of the best span (never the null answer).
* ``text2text`` / ``summarization`` / ``translation``: ``text_column`` "text" (source), ``target_column``
  "target" (*y*); seq2seq LM.

A role left to its default whose column the relation lacks takes the relation's one other column
when exactly one role is unresolved and exactly one column is unused (PostgresML's older tune read
every non-label column as the input: ``y_column_name => 'es'`` over ``(en, es)`` translates ``en``).
``y_column_name`` and ``dataset_args`` naming the same role differently is an error.

Hyperparams come in PostgresML's two forms, mixed freely: nested (``training_args``, ``dataset_args``,
as its newer fine-tuning code) and flat (any ``TrainingArguments`` field at the top level, as its
docs and ``examples/finetune.sql`` for the older tune). Besides: ``max_length`` / ``max_seq_length`` /
``max_input_length`` (input tokens), ``max_target_length`` / ``max_summary_length`` (seq2seq targets;
default: the input limit), ``prompt_template``, ``stride`` (question answering), and ``model_name`` /
``project_name`` (PostgresML stores them in hyperparams; ignored here). A field given both flat and
in ``training_args``, or a key that is neither ours nor a ``TrainingArguments`` field, is an error;
``evaluation_strategy`` (the name in PostgresML's examples) is read as ``eval_strategy`` where the
installed version renamed it.

Generative tasks report ``loss`` and ``perplexity`` (test ``eval_loss``) and, except text-generation,
from greedy outputs on the first ``SCORED_ROWS`` test rows, ``bleu`` (sacreBLEU-style corpus BLEU;
``blue`` too for translation, PostgresML's key-metric spelling) and, for seq2seq, ROUGE-1/2
``rouge_ngram_*`` / ``rouge_bigram_*`` (the ``rouge`` package's per-pair average); simple word tokens,
so close to but not identical with those libraries. All tasks keep the Trainer's numeric ``eval_*``
values and ``fit_time``. Without test rows the training rows are scored.

Must not: know about SQL, the registry or the wire protocol (the caller reads rows, stores the files
and events); import torch or transformers at import time; download unless ``allow_downloads``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.api import Canceled, EngineError, InvalidArgument, NotSupported, PermissionDenied
from engine.generation import CANCELED as _CANCELED
from engine.generation import MANIFEST, MAX_NEW_TOKENS, Tuned, bleu, generate, generate_all, load_tuned, rouge
from engine.models import pick_device, resolve

if TYPE_CHECKING:
    from engine.models import ModelCache
    from proxy.config import EngineSection

__all__ = [
    "MANIFEST",
    "MAX_NEW_TOKENS",
    "TuneResult",
    "Tuned",
    "bleu",
    "chat_prompt",
    "check_template",
    "classify",
    "generate",
    "load_tuned",
    "rouge",
    "tune",
]

_SEQ2SEQ = ("seq2seq", {"text_column": "text", "target_column": "target"})
# pgml.task label -> (model kind, dataset_args defaults)
TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "text_classification": ("classification", {"text_column": "text", "class_column": "class"}),
    "text_pair_classification": (
        "classification",
        {"text1_column": "text1", "text2_column": "text2", "class_column": "class"},
    ),
    "conversation": ("causal", {"system_column": "system", "user_column": "user", "assistant_column": "assistant"}),
    "text_generation": ("causal", {"text_column": "text"}),
    "question_answering": (
        "qa",
        {"question_column": "question", "context_column": "context", "answers_column": "answers"},
    ),
    "text2text": _SEQ2SEQ,
    "summarization": _SEQ2SEQ,
    "translation": _SEQ2SEQ,
}
# The role pgml.tune's y_column_name names (PostgresML's older tune: the label, the target, the text)
Y_ROLES = {
    "text_classification": "class_column", "text_pair_classification": "class_column",
    "conversation": "assistant_column", "text_generation": "text_column", "question_answering": "answers_column",
    "text2text": "target_column",
    "summarization": "target_column", "translation": "target_column",
}  # fmt: skip
# Token limits: for the inputs (first given wins), for seq2seq targets
INPUT_LENGTHS = ("max_input_length", "max_length", "max_seq_length")
TARGET_LENGTHS = ("max_target_length", "max_summary_length")
# hyperparams keys of pgml.tune itself; any other key must be a TrainingArguments field (the flat form)
HYPERPARAMS = frozenset(
    {"model_name", "project_name", "training_args", "dataset_args", "prompt_template", "stride", *INPUT_LENGTHS,
     *TARGET_LENGTHS}
)  # fmt: skip
DEFAULT_STRIDE = 128  # question answering: tokens shared by consecutive windows of a long context (PostgresML's)
MAX_ANSWER_TOKENS = 30  # question answering: the longest span scored
# TrainingArguments fields renamed since PostgresML's examples were written: old -> new
_RENAMED = {"evaluation_strategy": "eval_strategy"}
_UNSUPPORTED = {"lora_config": "LoRA (peft)", "load_in_8bit": "8-bit loading (bitsandbytes)"}
# TrainingArguments fields that take an object or, as text, the path of a JSON file it opens on this host
# (or JSON text): objects only here. _training_args adds every field the installed version types as dict.
_DICT_ONLY = frozenset(
    {"accelerator_config", "deepspeed", "fsdp_config", "activation_checkpointing_kwargs",
     "gradient_checkpointing_kwargs", "lr_scheduler_kwargs", "liger_kernel_config"}
)  # fmt: skip
# TrainingArguments fields pgml.tune sets itself or that name a path or the Hub: refused when set
_OWNED = {
    "output_dir": "the tuned model is stored in pgml.files",
    "logging_dir": "the Trainer's logs are stored in pgml.logs",
    "resume_from_checkpoint": "pgml.tune starts from hyperparams.model_name",
}
_NO_HUB = "pgml.tune never pushes to the Hugging Face Hub"  # for push_to_hub* and hub_*
# The prompt_template fields: name -> how often it may appear (None: any number; the EOS text is short)
TEMPLATE_FIELDS: dict[str, tuple[int, int | None]] = {
    "system": (0, 1), "user": (0, 1), "assistant": (1, 1), "eos_token": (0, None),
}  # fmt: skip
_SKIPPED_FILES = frozenset({"training_args.bin"})  # a pickle holding temporary paths
SCORED_ROWS = 256
DEFAULT_MAX_LENGTH = 1024  # when the tokenizer declares no usable model_max_length (as PostgresML)
_MARK = "\ue000pgml-assistant\ue000"  # stands in for the reply, to split the prompt from it
_ONE_RUN = threading.Lock()


@dataclass(frozen=True)
class TuneResult:
    """A fine-tuned model: its files (relative paths), test metrics, settings used, Trainer log events."""

    files: dict[str, bytes]
    metrics: dict[str, float]
    hyperparams: dict[str, Any]
    events: list[dict[str, Any]]


@dataclass(frozen=True)
class _Plan:
    """Validated arguments of one tune run."""

    task: str  # pgml.task label
    kind: str  # classification | causal | seq2seq
    columns: dict[str, str]  # role (dataset_args key) -> column
    optional: frozenset[str]  # roles whose column may be missing
    training_args: dict[str, Any]
    max_length: int | None  # input tokens
    prompt_template: str | None
    target_length: int | None = None  # seq2seq target tokens (None: max_length)
    stride: int = DEFAULT_STRIDE  # question answering


@dataclass
class _Job:
    """What a Trainer run needs, built per kind."""

    model: Any
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    collator: Any
    compute_metrics: Callable[[Any], dict[str, float]] | None = None
    labels: list[Any] | None = None


def tune(
    task: str, model_name: str, train: dict[str, list[Any]], test: dict[str, list[Any]], hyperparams: dict[str, Any],
    config: EngineSection, cancelled: Callable[[], bool], on_log: Callable[[dict[str, Any]], None],
    y_column: str | None = None,
) -> TuneResult:  # fmt: skip
    """Fine-tune ``model_name`` for ``task`` on ``train`` (column -> values), score it on ``test``.

    ``y_column`` (``y_column_name``) names the task's *y* role. One run at a time per process (Trainer
    resets accelerate's process-wide state); a run waiting for another one still notices ``cancelled``.
    """
    plan = _plan(task, hyperparams, list(train), y_column)
    train = _tables(plan, train)
    test = _tables(plan, test, train)
    path = resolve(model_name, config)
    events: list[dict[str, Any]] = []

    def log(event: dict[str, Any]) -> None:
        events.append(event)
        on_log(event)

    while not _ONE_RUN.acquire(timeout=0.05):  # short: this wait holds an engine turn between checkpoints
        if cancelled():
            raise Canceled(_CANCELED)
    try:
        files, metrics, used = _fit(plan, path, model_name, config, train, test, cancelled, log)
    finally:
        _ONE_RUN.release()
    used_hyperparams = {"model_name": model_name, "training_args": used, "dataset_args": plan.columns}
    used_hyperparams.update({k: v for k, v in hyperparams.items() if k in (*INPUT_LENGTHS, *TARGET_LENGTHS, "stride")})
    if plan.prompt_template is not None:
        used_hyperparams["prompt_template"] = plan.prompt_template
    return TuneResult(files, metrics, used_hyperparams, events)


def _fit(
    plan: _Plan, path: str, name: str, config: EngineSection, train: dict[str, list[Any]],
    test: dict[str, list[Any]], cancelled: Callable[[], bool], log: Callable[[dict[str, Any]], None],
) -> tuple[dict[str, bytes], dict[str, float], dict[str, Any]]:  # fmt: skip
    """Train, score and save in a temporary directory: (files, metrics, training_args as used)."""
    _quiet()
    with tempfile.TemporaryDirectory(prefix="pgml-tune-") as tmp:
        args, used = _training_args(plan.training_args, tmp, pick_device(config.device))
        tokenizer = _load_tokenizer(path, name, config)
        if cancelled():
            raise Canceled(_CANCELED)
        job = _BUILDERS[plan.kind](plan, tokenizer, path, name, config, train, test)
        trainer, stop = _trainer(job, args, tokenizer, cancelled, log)
        started = time.perf_counter()
        trainer.train()
        fit_time = time.perf_counter() - started
        if stop.is_set():
            raise Canceled(_CANCELED)
        metrics = {**_metrics(plan, trainer, tokenizer, test, cancelled), "fit_time": fit_time}
        out = Path(tmp) / "model"
        trainer.save_model(str(out))  # the model and its processing_class (the tokenizer)
        manifest = {"task": plan.task, "kind": plan.kind, "labels": job.labels, "prompt_template": plan.prompt_template}
        (out / MANIFEST).write_text(json.dumps(manifest))
        files = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in _SKIPPED_FILES
        }
        del trainer, job
        _release_gpu_memory()
    return files, metrics, used


def _plan(
    task: str, hyperparams: dict[str, Any], available: list[str] | None = None, y_column: str | None = None
) -> _Plan:
    """The run's settings from ``hyperparams`` (either form); ``available``: the relation's usable columns."""
    from engine.algorithms import normalize_task

    label = normalize_task(task) if isinstance(task, str) else ""
    if label not in TASKS:
        raise NotSupported(
            f"pgml.tune does not fine-tune {task} models",
            hint="Tasks: " + ", ".join(t.replace("_", "-") for t in TASKS) + ". Use pgml.train for classical models.",
        )
    if not isinstance(hyperparams, dict):
        raise InvalidArgument("hyperparams must be a JSON object")
    for key, what in _UNSUPPORTED.items():
        if hyperparams.get(key):
            raise NotSupported(f"hyperparams.{key}: {what} is not supported by pgml.tune here")
    nested = hyperparams.get("training_args")
    if not isinstance(nested, dict | None):
        raise InvalidArgument("hyperparams.training_args must be a JSON object")
    flat = {k: v for k, v in hyperparams.items() if k not in HYPERPARAMS and k not in _UNSUPPORTED}
    training_args = _merge_training_args(flat, nested or {})
    _check_training_args(training_args, _DICT_ONLY)
    kind, defaults = TASKS[label]
    max_length = _length(hyperparams, INPUT_LENGTHS)
    target_length = _length(hyperparams, TARGET_LENGTHS)
    if target_length is not None and kind != "seq2seq":
        key = next(k for k in TARGET_LENGTHS if k in hyperparams)
        raise InvalidArgument(f"hyperparams.{key} applies to text2text, summarization and translation only")
    stride = hyperparams.get("stride", DEFAULT_STRIDE)
    if "stride" in hyperparams and kind != "qa":
        raise InvalidArgument("hyperparams.stride applies to question-answering only")
    if type(stride) is not int or stride < 0:
        raise InvalidArgument("hyperparams.stride must be a non-negative integer")
    template = hyperparams.get("prompt_template")
    if template is not None:
        check_template(template)
    given = hyperparams.get("dataset_args") or {}
    if not isinstance(given, dict):
        raise InvalidArgument("hyperparams.dataset_args must be a JSON object")
    if unknown := sorted(set(given) - set(defaults)):
        raise InvalidArgument(
            f"unknown dataset_args for {label}: {', '.join(unknown)}", hint=f"Known: {', '.join(defaults)}."
        )
    if bad := [k for k, v in given.items() if not isinstance(v, str) or not v]:
        raise InvalidArgument(f"dataset_args must name columns: {', '.join(bad)}")
    if y_column is not None:
        role = Y_ROLES[label]
        if given.get(role, y_column) != y_column:
            raise InvalidArgument(
                f"y_column_name `{y_column}` and hyperparams.dataset_args.{role} `{given[role]}` name different"
                " columns",
                hint=f"For {label.replace('_', '-')}, y_column_name names the {role}; give one of them.",
            )
        given = {**given, role: y_column}
    optional = frozenset({"system_column"} - set(given)) if label == "conversation" else frozenset()
    columns = {**defaults, **given}
    if available is not None:
        columns = _fill_in(columns, set(given), optional, available)
    return _Plan(label, kind, columns, optional, training_args, max_length, template, target_length, stride)


@functools.lru_cache(maxsize=1)
def _training_fields() -> frozenset[str]:
    """The names ``TrainingArguments`` takes (of the installed transformers)."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def _merge_training_args(flat: dict[str, Any], nested: dict[str, Any]) -> dict[str, Any]:
    """The flat form's top-level ``TrainingArguments`` fields and ``training_args``, as one dict."""
    fields = _training_fields()
    renamed = {old: new for old, new in _RENAMED.items() if old not in fields and new in fields}
    if unknown := sorted(k for k in flat if k not in fields and k not in renamed):
        raise InvalidArgument(
            f"unknown hyperparams: {', '.join(unknown)}",
            hint=f"pgml.tune takes {', '.join(sorted(HYPERPARAMS))}, and transformers.TrainingArguments fields"
            " at the top level or in training_args.",
        )
    merged: dict[str, Any] = {}
    for source, values in (("hyperparams", flat), ("hyperparams.training_args", nested)):
        for key, value in values.items():
            name = renamed.get(key, key)
            if name in merged:
                raise InvalidArgument(
                    f"{source}.{key}: training argument {name} is given twice",
                    hint="Give each training argument once, at the top level of hyperparams or in training_args.",
                )
            merged[name] = value
    return merged


def _length(hyperparams: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` given in ``hyperparams``, checked: a token count of at least 2."""
    for key in keys:
        value = hyperparams.get(key)
        if value is not None:
            if type(value) is not int or value < 2:
                raise InvalidArgument(f"hyperparams.{key} must be an integer of at least 2")
            return value
    return None


def _fill_in(
    columns: dict[str, str], named: set[str], optional: frozenset[str], available: list[str]
) -> dict[str, str]:
    """A defaulted role whose column is missing takes the relation's one unused column, when that is unambiguous."""
    missing = [role for role, name in columns.items() if role not in optional and name not in available]
    unused = [name for name in available if name not in columns.values()]
    if len(missing) == 1 and missing[0] not in named and len(unused) == 1:
        return {**columns, missing[0]: unused[0]}
    return columns


def _tables(
    plan: _Plan, table: dict[str, list[Any]], train: dict[str, list[Any]] | None = None
) -> dict[str, list[Any]]:
    """``table`` keyed by role, values checked; a test table without rows is the (checked) train table."""
    if train is not None and not any(len(values) for values in (table or {}).values()):
        return train
    missing = sorted(name for role, name in plan.columns.items() if role not in plan.optional and name not in table)
    if missing:
        raise InvalidArgument(
            f"column{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}",
            hint=f"Name the columns in hyperparams.dataset_args: {', '.join(plan.columns)}.",
        )
    rows = {role: list(table[name]) for role, name in plan.columns.items() if name in table}
    count = len(next(iter(rows.values())))
    for role in plan.columns:
        values = rows.setdefault(role, [None] * count)  # an absent optional column: all NULL
        if len(values) != count:
            raise InvalidArgument("the dataset columns have different lengths")
        if role != "system_column" and any(v is None for v in values):
            raise InvalidArgument(f"column {plan.columns[role]} has NULL values")
        if role != "class_column":  # texts; labels keep their type
            rows[role] = [v if v is None else str(v) for v in values]
    if not count:
        raise InvalidArgument("pgml.tune needs at least one training row")
    return rows


def _training_args(given: dict[str, Any], output_dir: str, device: str) -> tuple[Any, dict[str, Any]]:
    """``TrainingArguments`` for ``given``, and the arguments as recorded (without the temporary directory)."""
    from transformers import TrainingArguments

    fields = [f for f in dataclasses.fields(TrainingArguments) if f.init]
    if unknown := sorted(set(given) - {f.name for f in fields}):
        raise InvalidArgument(
            f"unknown training_args: {', '.join(unknown)}", hint="See transformers.TrainingArguments."
        )
    dict_typed = {f.name for f in fields if re.search(r"\bdict\b", str(f.type))}
    _check_training_args(given, _DICT_ONLY | dict_typed | set(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ())))
    _check_scalars(given, {f.name: f.type for f in fields})
    used = {k: v for k, v in given.items() if not _owned(k)}
    used.setdefault("save_strategy", "no")
    used.update(report_to="none", disable_tqdm=True)
    if device == "cpu":
        used["use_cpu"] = True
    try:
        args = TrainingArguments(output_dir=output_dir, push_to_hub=False, **used)
    except (TypeError, ValueError, ImportError) as exc:
        raise InvalidArgument(f"invalid training_args: {exc}") from exc
    return args, used


_SCALARS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _check_scalars(given: dict[str, Any], types: dict[str, Any]) -> None:
    """Values of the plain bool / int / float / str fields of the right JSON type (the Trainer would fail later)."""
    import typing

    for key, value in given.items():
        declared = types.get(key)
        allowed = set(typing.get_args(declared)) or {declared}
        nullable = type(None) in allowed
        allowed.discard(type(None))
        if not allowed or not allowed <= set(_SCALARS) or (value is None and nullable):
            continue  # enums, objects, lists: checked by TrainingArguments itself
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = bool(allowed & {int, float})
        else:
            ok = (isinstance(value, float) and float in allowed) or (isinstance(value, str) and str in allowed)
        if not ok:
            what = " or ".join(_SCALARS[t] for t in _SCALARS if t in allowed)
            raise InvalidArgument(f"training_args.{key} must be {what}{' or null' if nullable else ''}")


def _owned(key: str) -> str | None:
    """Why pgml.tune refuses to take training_args ``key`` from the caller; None when it does not."""
    return _OWNED.get(key) or (_NO_HUB if key.startswith(("push_to_hub", "hub_")) else None)


def _check_training_args(given: dict[str, Any], dict_only: Iterable[str]) -> None:
    """Refuse the fields pgml.tune owns, and anything but an object where TrainingArguments would read a file.

    The answer never depends on what a text names (a file, a directory, nothing): no probing of this host.
    """
    for key, value in given.items():
        if value and (why := _owned(key)):
            raise InvalidArgument(f"training_args.{key} is not supported: {why}")
    for key in sorted(set(dict_only) & set(given)):
        value = given[key]
        if isinstance(value, str):
            raise PermissionDenied(
                f"training_args.{key} must be a JSON object, not text",
                detail="pgml-proxy does not read configuration files (or JSON text) named in training_args.",
                hint=f'Give the settings inline: {{"{key}": {{...}}}}.',
            )
        if not isinstance(value, dict | None):
            raise InvalidArgument(f"training_args.{key} must be a JSON object")


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _load_tokenizer(path: str, name: str, config: EngineSection) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EngineError(f"could not load the tokenizer of {name}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(kind: str, path: str, name: str, config: EngineSection, tokenizer: Any, **kwargs: Any) -> Any:
    import torch
    import transformers

    auto = {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "qa": transformers.AutoModelForQuestionAnswering,
    }[kind]
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, trust_remote_code=config.trust_remote_code, **kwargs)
    except ValueError as exc:
        raise InvalidArgument(f"model {name} cannot be fine-tuned as a {kind} model: {exc}") from exc
    except OSError as exc:
        raise EngineError(f"could not load model {name}: {exc}") from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _max_length(plan: _Plan, tokenizer: Any) -> int:
    if plan.max_length is not None:
        return plan.max_length
    declared = getattr(tokenizer, "model_max_length", None)
    return int(declared) if isinstance(declared, int) and 1 < declared <= 1_000_000 else DEFAULT_MAX_LENGTH


def _classification_job(
    plan: _Plan, tokenizer: Any, path: str, name: str, config: EngineSection,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> _Job:  # fmt: skip
    from transformers import DataCollatorWithPadding

    labels = sorted(set(train["class_column"]) | set(test["class_column"]), key=lambda v: (type(v).__name__, v))
    if len(labels) < 2:
        raise InvalidArgument(f"text classification needs at least 2 distinct classes, found {len(labels)}")
    id2label = {i: str(v) for i, v in enumerate(labels)}
    index = {v: i for i, v in enumerate(labels)}
    model = _load_model(
        "classification", path, name, config, tokenizer, num_labels=len(labels), id2label=id2label,
        label2id={v: i for i, v in id2label.items()}, ignore_mismatched_sizes=True,
    )  # fmt: skip
    length = _max_length(plan, tokenizer)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        texts = [table["text1_column"], table["text2_column"]] if "text1_column" in table else [table["text_column"]]
        enc = tokenizer(*texts, truncation=True, max_length=length)
        return [{**{k: enc[k][i] for k in enc}, "labels": index[y]} for i, y in enumerate(table["class_column"])]

    stored = [v if isinstance(v, str | int | float | bool) else str(v) for v in labels]
    return _Job(model, encode(train), encode(test), DataCollatorWithPadding(tokenizer), _classification_scores, stored)


def _classification_scores(prediction: Any) -> dict[str, float]:
    """Macro F1 (over the classes in truth or prediction, as scikit-learn) and accuracy."""
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, truth = np.asarray(logits).argmax(-1), np.asarray(prediction.label_ids).reshape(-1)
    scores = []
    for label in np.union1d(truth, predicted):
        tp = float(np.sum((predicted == label) & (truth == label)))
        fp_fn = float(np.sum(predicted == label) + np.sum(truth == label)) - 2 * tp
        scores.append(2 * tp / (2 * tp + fp_fn) if tp else 0.0)
    return {"f1": float(np.mean(scores)), "accuracy": float(np.mean(predicted == truth))}


def _seq2seq_job(
    plan: _Plan, tokenizer: Any, path: str, name: str, config: EngineSection,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> _Job:  # fmt: skip
    from transformers import DataCollatorForSeq2Seq

    model = _load_model("seq2seq", path, name, config, tokenizer)
    length = _max_length(plan, tokenizer)
    target_length = plan.target_length or length

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        enc = tokenizer(table["text_column"], truncation=True, max_length=length)
        targets = tokenizer(text_target=table["target_column"], truncation=True, max_length=target_length)
        labels = targets["input_ids"]
        return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(labels))]

    return _Job(model, encode(train), encode(test), DataCollatorForSeq2Seq(tokenizer, model=model))


def _causal_job(
    plan: _Plan, tokenizer: Any, path: str, name: str, config: EngineSection,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> _Job:  # fmt: skip
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise InvalidArgument(f"the tokenizer of {name} has neither a pad nor an EOS token")
    model = _load_model("causal", path, name, config, tokenizer)
    length = _max_length(plan, tokenizer)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        if plan.task == "text_generation":
            return [_text_row(tokenizer, length, text) for text in table["text_column"]]
        rows = zip(table["system_column"], table["user_column"], table["assistant_column"], strict=True)
        return [_conversation_row(plan, tokenizer, length, *row) for row in rows]

    # Pads input_ids with the pad token and labels with -100: right for causal LMs too.
    return _Job(model, encode(train), encode(test), DataCollatorForSeq2Seq(tokenizer, padding=True))


def chat_prompt(tokenizer: Any, template: str | None, system: str | None, user: str, assistant: str) -> tuple[str, str]:
    """``(prompt, full text)`` of one exchange: the prompt ends where the assistant's reply starts."""
    if template is not None:
        template = check_template(template)  # also a stored one: the manifest comes from pgml.files
        text = template.format(system=system or "", user=user, assistant=_MARK, eos_token=tokenizer.eos_token or "")
    elif not getattr(tokenizer, "chat_template", None):
        example = '"{system}\\nUser: {user}\\nAssistant: {assistant}{eos_token}"'
        raise InvalidArgument(
            "the tokenizer has no chat template", hint=f"Pass hyperparams.prompt_template: {example}."
        )
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _MARK}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja2 TemplateError (e.g. a template without a system role)
            raise InvalidArgument(f"the chat template rejected a conversation: {exc}") from exc
    if _MARK not in text:
        raise InvalidArgument("the prompt template drops the assistant's message")
    return text[: text.index(_MARK)], text.replace(_MARK, assistant)


def check_template(template: object) -> str:
    """``template`` when it is a ``str.format`` text of plain ``TEMPLATE_FIELDS``; InvalidArgument otherwise.

    No format spec (``{user:>2000000000}`` would pad every row to gigabytes), conversion, attribute or
    index access, positional field; ``{assistant}`` exactly once, ``{system}`` and ``{user}`` at most once.
    """
    if not isinstance(template, str):
        raise InvalidArgument("prompt_template must be text containing {assistant}")
    return _checked_template(template)


@functools.lru_cache(maxsize=16)  # chat_prompt checks it for every row
def _checked_template(template: str) -> str:
    hint = "Fields: {system}, {user}, {assistant}, {eos_token}, written plain; {{ and }} are literal braces."
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidArgument(f"invalid prompt_template: {exc}", hint=hint) from exc
    counts = dict.fromkeys(TEMPLATE_FIELDS, 0)
    for _, name, spec, conversion in parsed:
        if name is None:
            continue  # literal text only
        shown = "{" + _shorten(name) + "}"
        if name not in counts:
            raise InvalidArgument(f"prompt_template field {shown} is not allowed", hint=hint)
        if conversion is not None:
            raise InvalidArgument(
                f"prompt_template field {shown}: conversions (!{conversion}) are not allowed", hint=hint
            )
        if spec:
            raise InvalidArgument(f"prompt_template field {shown}: format specs are not allowed", hint=hint)
        counts[name] += 1
    for name, (least, most) in TEMPLATE_FIELDS.items():
        if counts[name] < least or (most is not None and counts[name] > most):
            times = "exactly once" if least == most else "at most once"
            raise InvalidArgument(f"prompt_template must contain {{{name}}} {times}", hint=hint)
    return template


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _conversation_row(
    plan: _Plan, tokenizer: Any, length: int, system: str | None, user: str, assistant: str
) -> dict[str, Any]:
    """Token ids with labels masked (-100) over the prompt: the loss is on the assistant's reply only."""
    prompt, full = chat_prompt(tokenizer, plan.prompt_template, system, user, assistant)
    special = plan.prompt_template is not None  # chat templates spell out their own BOS
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(full, add_special_tokens=special, truncation=True, max_length=length, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    if fast:
        prompt_tokens = sum(1 for _, end in enc["offset_mapping"] if end <= len(prompt))
    else:
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] != eos and len(ids) < length:
        ids.append(eos)  # teach the model to stop
    labels = [-100 if i < prompt_tokens else token for i, token in enumerate(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _qa_job(
    plan: _Plan, tokenizer: Any, path: str, name: str, config: EngineSection,
    train: dict[str, list[Any]], test: dict[str, list[Any]],
) -> _Job:  # fmt: skip
    """Extractive question answering: every window of a long context is a row, labelled with the answer's
    token span there (or the first token: no answer in this window, or none at all)."""
    from transformers import DataCollatorWithPadding

    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgument(f"question answering needs a fast tokenizer (character offsets); {name} has none")
    model = _load_model("qa", path, name, config, tokenizer)
    length = _max_length(plan, tokenizer)
    stride = min(plan.stride, length // 2)

    def encode(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
        rows = zip(table["question_column"], table["context_column"], table["answers_column"], strict=True)
        return [f for q, c, a in rows for f in _qa_rows(tokenizer, length, stride, q, c, answer_span(a, c))]

    return _Job(model, encode(train), encode(test), DataCollatorWithPadding(tokenizer))


def _qa_rows(
    tokenizer: Any, length: int, stride: int, question: str, context: str, span: tuple[int, int] | None
) -> list[dict[str, Any]]:
    try:
        enc = tokenizer(question, context, truncation="only_second", max_length=length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    except Exception as exc:  # e.g. a question longer than max_length
        raise InvalidArgument(f"could not tokenize a question: {exc}") from exc
    names = [n for n in tokenizer.model_input_names if n in enc]
    rows = []
    for i in range(len(enc["input_ids"])):
        start = end = 0
        inside = [j for j, sequence in enumerate(enc.sequence_ids(i)) if sequence == 1]
        offsets = enc["offset_mapping"][i]
        if span is not None and inside and offsets[inside[0]][0] <= span[0] and offsets[inside[-1]][1] >= span[1]:
            start = next(j for j in inside if offsets[j][1] > span[0])
            end = max(j for j in inside if offsets[j][0] < span[1])
        rows.append({**{n: enc[n][i] for n in names}, "start_positions": start, "end_positions": end})
    return rows


def answer_texts(value: str) -> list[str]:
    """The gold answers of an ``answers`` value: SQuAD's ``{"text": [...], "answer_start": [...]}``, or plain text."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, dict):
        texts = parsed.get("text", [])
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidArgument('answers must be text or JSON {"text": [...], "answer_start": [...]}')
        return [t for t in texts if t]
    if isinstance(parsed, str):
        return [parsed] if parsed else []
    raise InvalidArgument('answers must be text or JSON {"text": [...], "answer_start": [...]}')


def answer_span(value: str, context: str) -> tuple[int, int] | None:
    """Character span of the first answer in ``context`` (its ``answer_start`` when right); None: unanswerable."""
    texts = answer_texts(value)
    if not texts:
        return None
    text = texts[0]
    try:
        starts = json.loads(value).get("answer_start", [])
    except (ValueError, AttributeError):
        starts = []
    start = starts[0] if isinstance(starts, list) and starts and type(starts[0]) is int else -1
    if context[start : start + len(text)] != text if start >= 0 else True:
        start = context.find(text)
    return None if start < 0 else (start, start + len(text))


def _text_row(tokenizer: Any, length: int, text: str) -> dict[str, Any]:
    """Language modelling on the whole text (and an EOS): tokenized as pgml.generate tokenizes its prompts."""
    ids = list(tokenizer(text, add_special_tokens=False, truncation=True, max_length=length)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < length:
        ids.append(eos)
    if not ids:
        raise InvalidArgument("text-generation needs texts of at least one token")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


_BUILDERS: dict[str, Callable[..., _Job]] = {
    "classification": _classification_job,
    "seq2seq": _seq2seq_job,
    "causal": _causal_job,
    "qa": _qa_job,
}


def _trainer(
    job: _Job, args: Any, tokenizer: Any, cancelled: Callable[[], bool], log: Callable[[dict[str, Any]], None]
) -> tuple[Any, threading.Event]:
    from transformers import PrinterCallback, Trainer, TrainerCallback

    stop = threading.Event()

    class Hooks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cancelled():
                stop.set()
                control.should_training_stop = control.should_epoch_stop = True
            return control

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cancelled():
                raise Canceled(_CANCELED)
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            event = {k: _json_value(v) for k, v in (logs or {}).items()}
            event.update(step=state.global_step, max_steps=state.max_steps)
            event.setdefault("epoch", _json_value(state.epoch))
            log(event)
            return control

    trainer = Trainer(
        model=job.model, args=args, data_collator=job.collator, train_dataset=job.train_rows,
        eval_dataset=job.eval_rows, processing_class=tokenizer, compute_metrics=job.compute_metrics,
        callbacks=[Hooks()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it would print every log to stdout
    return trainer, stop


def _json_value(value: Any) -> Any:
    """A log value as JSON can hold it (jsonb has no NaN or infinity)."""
    if isinstance(value, bool | str | int) or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _evaluate(trainer: Any) -> dict[str, Any]:
    """The Trainer's test evaluation; the one it ran after the last step already (an eval_strategy) is reused."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return dict(trainer.evaluate())


def _metrics(
    plan: _Plan, trainer: Any, tokenizer: Any, test: dict[str, list[Any]], cancelled: Callable[[], bool]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in _evaluate(trainer).items():
        number = _json_value(value)
        if isinstance(number, int | float) and not isinstance(number, bool):
            metrics[key.removeprefix("eval_") if key in ("eval_f1", "eval_accuracy") else key] = float(number)
    if plan.kind == "classification":
        return metrics
    if "eval_loss" in metrics:
        metrics["loss"] = metrics["eval_loss"]
        if metrics["eval_loss"] < 700:  # exp() stays finite
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if plan.task == "text_generation":
        return metrics  # PostgresML's text-generation metric: perplexity
    if plan.kind == "qa":
        return {**metrics, **_qa_scores(trainer.model, tokenizer, plan, test, cancelled)}
    if plan.kind == "seq2seq":
        sources, references = test["text_column"][:SCORED_ROWS], test["target_column"][:SCORED_ROWS]
    else:
        rows = list(zip(test["system_column"], test["user_column"], test["assistant_column"], strict=True))
        sources = [chat_prompt(tokenizer, plan.prompt_template, s, u, "")[0] for s, u, _ in rows[:SCORED_ROWS]]
        references = [a for _, _, a in rows[:SCORED_ROWS]]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    outputs = generate_all(
        trainer.model, tokenizer, plan.kind, sources, trainer.args.per_device_eval_batch_size, cancelled,
        plan.kind == "seq2seq" or plan.prompt_template is not None,
        max_new_tokens=max(1, min(longest + 8, MAX_NEW_TOKENS)), do_sample=False,
    )  # fmt: skip
    metrics["bleu"] = bleu(outputs, references)
    if plan.task == "translation":
        metrics["blue"] = metrics["bleu"]  # the translation key metric's name in PostgresML (sic)
    if plan.kind == "seq2seq":
        for n, name in ((1, "ngram"), (2, "bigram")):
            p, r, f = rouge(outputs, references, n)
            metrics.update({f"rouge_{name}_f1": f, f"rouge_{name}_precision": p, f"rouge_{name}_recall": r})
    return metrics


@dataclass(frozen=True)
class _Classifier:
    """A tuned classifier loaded for ``pgml.predict`` (what the model cache keeps; ``nbytes`` sizes it there)."""

    model: Any
    tokenizer: Any
    labels: list[Any]  # by class index: the training labels
    max_length: int
    nbytes: int


def classify(
    directory: str, key: str, texts: list[str], probabilities: bool, config: EngineSection, cache: ModelCache,
    cancelled: Callable[[], bool],
) -> list[Any]:  # fmt: skip
    """Per text the label (or the class probabilities, in label order) from the tuned classifier in ``directory``.

    Loaded once per ``key`` through the model cache; batches of ``[engine] batch_size``, ``cancelled``
    polled between them.
    """
    import torch

    classifier: _Classifier = cache.get(key, lambda: _load_classifier(directory, config))
    out: list[Any] = []
    step = max(1, config.batch_size)
    for start in range(0, len(texts), step):
        if cancelled():
            raise Canceled(_CANCELED)
        enc = classifier.tokenizer(
            texts[start : start + step], return_tensors="pt", padding=True, truncation=True,
            max_length=classifier.max_length,
        ).to(classifier.model.device)  # fmt: skip
        with torch.inference_mode():
            logits = classifier.model(**enc).logits.float()
        if probabilities:
            out += torch.softmax(logits, dim=-1).cpu().tolist()
        else:
            out += [classifier.labels[i] for i in logits.argmax(-1).cpu().tolist()]
    return out


def _load_classifier(directory: str, config: EngineSection) -> _Classifier:
    import transformers

    _quiet()
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict) or manifest.get("kind") != "classification":
        raise NotSupported("the project's tuned model is not a text classifier")
    try:
        model: Any = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory, trust_remote_code=config.trust_remote_code
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EngineError(f"could not load the tuned model: {exc}") from exc
    count = int(model.config.num_labels)
    labels = manifest.get("labels")
    if not isinstance(labels, list) or len(labels) != count:
        labels = [model.config.id2label.get(i, str(i)) for i in range(count)]
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(model.config, "max_position_embeddings", None))
              if isinstance(n, int) and 1 < n <= 1_000_000]  # fmt: skip
    model.to(pick_device(config.device)).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return _Classifier(model, tokenizer, labels, min(limits, default=DEFAULT_MAX_LENGTH), int(size))


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _normalize_answer(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces -> words."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return _ARTICLES.sub(" ", text).split()


def _answer_f1(prediction: str, truth: str) -> float:
    predicted, gold = _normalize_answer(prediction), _normalize_answer(truth)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum(min(predicted.count(w), gold.count(w)) for w in set(predicted))
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _qa_scores(
    model: Any, tokenizer: Any, plan: _Plan, test: dict[str, list[Any]], cancelled: Callable[[], bool]
) -> dict[str, float]:
    """SQuAD ``f1`` and ``exact_match`` (fractions) of the best span on the first ``SCORED_ROWS`` test rows.

    The best span is always an answer (no null-answer threshold), so unanswerable questions score 0.
    """
    from engine.seq2seq import _spans

    model.eval()
    length = _max_length(plan, tokenizer)
    window = {"max_length": length, "stride": min(plan.stride, length // 2)}
    f1 = exact = 0.0
    rows = list(zip(test["question_column"], test["context_column"], test["answers_column"], strict=True))
    for question, context, answers in rows[:SCORED_ROWS]:
        if cancelled():
            raise Canceled(_CANCELED)
        spans = _spans(model, tokenizer, question, context, window, MAX_ANSWER_TOKENS)
        predicted = context[spans[0][1] : spans[0][2]] if spans else ""
        golds = answer_texts(answers) or [""]
        f1 += max(_answer_f1(predicted, g) for g in golds)
        exact += max(float(_normalize_answer(predicted) == _normalize_answer(g)) for g in golds)
    scored = max(1, min(len(rows), SCORED_ROWS))
    return {"f1": f1 / scored, "exact_match": exact / scored}
