"""The settings of one ``pgml.tune`` run, validated before any model is loaded: tasks, columns, hyperparams.

Owns: the tasks tune supports and their ``dataset_args`` (column roles, ``y_column_name``), the
hyperparams forms (below), ``training_args`` -> ``TrainingArguments`` (temporary output dir, no
reporting, no hub push, no checkpoints unless asked, no path or hub fields, config fields as objects
only: never a file of this host opened by name), the prompt template's grammar, and the input token limit.

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

Must not: load models or run the Trainer (``engine.nlp.finetune.trainer`` does), know about SQL, or
import transformers at import time (its ``TrainingArguments`` are looked up when a run is planned).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.api import InvalidArgument, NotSupported, PermissionDenied
from engine.ml.algorithms import normalize_task

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
DEFAULT_MAX_LENGTH = 1024  # when the tokenizer declares no usable model_max_length (as PostgresML)


@dataclass(frozen=True)
class Plan:
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


def build_plan(
    task: str, hyperparams: dict[str, Any], available: list[str] | None = None, y_column: str | None = None
) -> Plan:
    """The run's settings from ``hyperparams`` (either form); ``available``: the relation's usable columns."""
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
    return Plan(label, kind, columns, optional, training_args, max_length, template, target_length, stride)


@functools.lru_cache(maxsize=1)
def _training_fields() -> frozenset[str]:
    """The names ``TrainingArguments`` takes (of the installed transformers)."""
    from transformers import TrainingArguments  # lazy: transformers imports torch (seconds)

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


def tables(plan: Plan, table: dict[str, list[Any]], train: dict[str, list[Any]] | None = None) -> dict[str, list[Any]]:
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


def training_args(given: dict[str, Any], output_dir: str, device: str) -> tuple[Any, dict[str, Any]]:
    """``TrainingArguments`` for ``given``, and the arguments as recorded (without the temporary directory)."""
    from transformers import TrainingArguments  # lazy: transformers imports torch (seconds)

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


def input_limit(plan: Plan, tokenizer: Any) -> int:
    if plan.max_length is not None:
        return plan.max_length
    declared = getattr(tokenizer, "model_max_length", None)
    return int(declared) if isinstance(declared, int) and 1 < declared <= 1_000_000 else DEFAULT_MAX_LENGTH


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
