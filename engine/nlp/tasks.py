"""Which model a ``pgml.transform`` task runs, whether it may, and loading it once per process.

Owns: turning the task argument (a name, or JSON with ``task``, ``model`` and loading kwargs) into a
canonical task (every task and alias of the installed ``transformers.pipeline``, and the tasks
transformers 5 dropped that PostgresML had), a model and its loading kwargs; the permission checks, for the
model and every other model its kwargs name (``trust_remote_code``, and ``[engine] allowed_models``, narrowed by
the session's ``pgml.huggingface_whitelist``: PostgresML's, for transform and transform_stream only); each task's
default model (those of the transformers 4.x pipelines PostgresML ran, else the installed pipeline's own
default); loading pipelines (every task transformers 5 has one for) or Auto models (the others) into the
ModelCache, keyed by model kind, resolved model and loading kwargs.

Must not: run inference, or import ML libraries at import time.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from engine.api import EngineError, InvalidArgument, NotSupported, UnknownModel
from engine.nlp.json_args import json_object
from engine.runtime.cache import ModelCache, model_bytes
from engine.runtime.confine import confine_kwargs, refuse_unsupported_loading
from engine.runtime.context import Context, ModelLock
from engine.runtime.device import pick_device, usable_device, usable_device_map
from engine.runtime.locate import resolve


class ModelNotAllowed(EngineError):
    sqlstate: ClassVar[str] = "42501"  # insufficient_privilege: the model is not in [engine] allowed_models


# Pipelines whose results transform shapes itself (PostgresML's transformers 4.x quirks); every other task of
# transformers.pipeline runs as is (engine.nlp.any_task).
PIPELINE_TASKS = frozenset(
    {
        "text-classification",
        "token-classification",
        "fill-mask",
        "zero-shot-classification",
        "text-generation",
        "feature-extraction",
    }
)
SEQ2SEQ_TASKS = frozenset({"summarization", "translation", "text2text-generation"})
# Tasks transformers 5 has no pipeline for, run on Auto models (and the chat form).
OWN_TASKS = SEQ2SEQ_TASKS | {"question-answering", "conversational"}
AUTO_KINDS = frozenset({"seq2seq", "question-answering"})  # what _kind loads as an Auto model, not a pipeline
# The defaults of the transformers 4.x pipelines PostgresML 2.10 ran (hub name, then its legacy alias).
DEFAULT_MODELS: dict[str, tuple[str, ...]] = {
    "text-classification": (
        "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "distilbert-base-uncased-finetuned-sst-2-english",
    ),
    "token-classification": ("dbmdz/bert-large-cased-finetuned-conll03-english",),
    "fill-mask": ("distilbert/distilroberta-base", "distilroberta-base"),
    "zero-shot-classification": ("facebook/bart-large-mnli",),
    "text-generation": ("openai-community/gpt2", "gpt2"),
    "feature-extraction": ("distilbert/distilbert-base-cased", "distilbert-base-cased"),
    "question-answering": (
        "distilbert/distilbert-base-cased-distilled-squad",
        "distilbert-base-cased-distilled-squad",
    ),
    "summarization": ("sshleifer/distilbart-cnn-12-6",),
    "translation_en_to_fr": ("google-t5/t5-base", "t5-base"),
    "translation_en_to_de": ("google-t5/t5-base", "t5-base"),
    "translation_en_to_ro": ("google-t5/t5-base", "t5-base"),
    "text2text-generation": ("google-t5/t5-base", "t5-base"),
    "conversational": ("microsoft/DialoGPT-medium",),
}
# config.json architectures -> task, for a task JSON that names only a model.
ARCHITECTURES = (
    ("ForQuestionAnswering", "question-answering"),
    ("ForTokenClassification", "token-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("WithLMHeadModel", "text2text-generation"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
)
# --------------------------------------------------------------------------- #
# Tasks, permissions, loading
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task argument: canonical task ("" until inferred from the model), model (None: the default)."""

    task: str
    model: str | None
    init: dict[str, Any]

    @property
    def family(self) -> str:
        return "translation" if self.task.startswith("translation") else self.task


@dataclass
class Loaded:
    """A loaded model with its tokenizer (and pipeline, for tasks transformers 5 still has one for)."""

    model: Any
    tokenizer: Any
    pipe: Any = None
    lock: ModelLock = field(default_factory=ModelLock)  # a waiter steps aside from its compute turn

    @property
    def nbytes(self) -> int:  # what the ModelCache counts
        return model_bytes(self.model)


@functools.cache
def pipeline_tasks() -> tuple[frozenset[str], dict[str, str]]:
    """The tasks ``transformers.pipeline`` accepts (its SUPPORTED_TASKS) and its aliases, as installed."""
    from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES  # lazy: imports torch (seconds)

    return frozenset(SUPPORTED_TASKS), dict(TASK_ALIASES)


def tasks() -> frozenset[str]:
    """Every task ``pgml.transform`` runs: the installed pipelines' and its own."""
    return pipeline_tasks()[0] | OWN_TASKS


def canonical_task(name: str) -> str:
    """``'text_classification'``, ``'sentiment-analysis'``, ``'translation-en-to-fr'`` -> the task's own name."""
    supported, aliases = pipeline_tasks()
    key = name.strip().lower().replace("_", "-")
    key = aliases.get(key, key)
    pair = re.fullmatch(r"translation-([a-z]{2,3})-to-([a-z]{2,3})", key)
    if pair:
        return f"translation_{pair[1]}_to_{pair[2]}"
    if key not in supported | OWN_TASKS:
        shown = name if name.isprintable() else repr(name)[1:-1]
        raise InvalidArgument(
            f'pgml.transform task "{shown[:200]}" is not supported',
            detail=f"Aliases: {', '.join(f'{alias} ({task})' for alias, task in sorted(aliases.items()))}.",
            hint=f"Supported tasks: {', '.join(sorted(tasks()))}, translation_xx_to_yy.",
        )
    return key


def parse_task(value: Any) -> TaskSpec:
    """A task name (text) or a task JSON object -> TaskSpec."""
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        value = {"task": value}
    init = dict(json_object(value, "the task"))
    task, model = init.pop("task", None), init.pop("model", None)
    if model is not None and not isinstance(model, str):
        raise InvalidArgument('"model" in the task JSON must be a string')
    if task is None:
        if model is None:
            raise InvalidArgument('the task JSON needs a "task" (or a "model" to infer it from)')
        return TaskSpec("", model, init)
    if not isinstance(task, str):
        raise InvalidArgument('"task" in the task JSON must be a string')
    return TaskSpec(canonical_task(task), model, init)


def _allow(ctx: Context, name: str) -> None:
    """42501 unless ``[engine] allowed_models`` and the session's ``pgml.huggingface_whitelist`` let ``name`` load."""
    allowed = ctx.config.allowed_models
    if allowed and name not in allowed:
        raise ModelNotAllowed(
            f'model "{name}" is not in the allowed models',
            hint="Add it to [engine] allowed_models (PostgresML's pgml.huggingface_whitelist).",
        )
    if ctx.settings is not None and ctx.settings.whitelist and name not in ctx.settings.whitelist:
        raise ModelNotAllowed(  # PostgresML's message; the session's list only narrows [engine]'s
            f"model {name} is not whitelisted",
            hint="Add it to pgml.huggingface_whitelist (SET, ALTER ROLE … SET or ALTER DATABASE … SET).",
        )


def _permit(name: str, init: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The loading kwargs to use for ``name``, once the allow-list and trust_remote_code checks pass for it and
    for every other model its kwargs name (tokenizer, config, processors)."""
    _allow(ctx, name)
    # No client-chosen locations; other models only as tokenizer/config/processors, confined and allowed as
    # ``name`` (remote code included); trust_remote_code (at any depth) refused unless [engine]
    # trust_remote_code: then model_kwargs' flag counts for the whole pipeline.
    init = confine_kwargs(init, ctx.config, ctx.settings, name, functools.partial(_allow, ctx))
    refuse_unsupported_loading(name, init)
    nested = dict(init["model_kwargs"]) if isinstance(init.get("model_kwargs"), dict) else None
    wants = bool(init.pop("trust_remote_code", False)) or bool(nested and nested.pop("trust_remote_code", False))
    if nested is not None:
        init["model_kwargs"] = nested
    init["trust_remote_code"] = wants  # explicitly off otherwise (never left to a library default)
    if "torch_dtype" in init:  # PostgresML's name; transformers 5 calls it dtype
        init.setdefault("dtype", init.pop("torch_dtype"))
        init.pop("torch_dtype", None)
    if "device_map" in init:
        init["device_map"], note = usable_device_map(init["device_map"], ctx.config.device)
    else:
        init["device"], note = usable_device(init.get("device", pick_device(ctx.config.device)), ctx.config.device)
    if note is not None:
        ctx.notices.append(note)
    return init


def _candidates(spec: TaskSpec) -> tuple[str, ...]:
    """The model named in the task, else the task's default model (its hub name, then legacy aliases)."""
    if spec.model is not None:
        return (spec.model,)
    if spec.task in DEFAULT_MODELS:
        return DEFAULT_MODELS[spec.task]
    default = _pipeline_default(spec.task)
    if default is not None:
        return (default,)
    raise InvalidArgument(
        f'task "{spec.task}" has no default model', hint=f'Name one: {{"task": "{spec.task}", "model": "…"}}.'
    )


def _pipeline_default(task: str) -> str | None:
    """The default model transformers' own pipeline uses for ``task`` (PostgresML's ``get_model_from``)."""
    from transformers.pipelines import SUPPORTED_TASKS  # lazy: see pipeline_tasks

    entry: Any = SUPPORTED_TASKS.get(task, {})
    default = entry.get("default") or {}
    model = default.get("model", default.get("pt"))
    if isinstance(model, dict):
        model = model.get("pt")
    return str(model[0]) if isinstance(model, tuple) and model else None


def _locate(spec: TaskSpec, candidates: tuple[str, ...], ctx: Context) -> str:
    """The local path (or hub id, with downloads allowed) of the first candidate found."""
    missing: UnknownModel | None = None
    for candidate in candidates:
        path = ctx.cache.resolved.get(candidate)
        if path is None:
            try:
                path = resolve(candidate, ctx.config)
            except UnknownModel as exc:
                missing = missing or exc
                continue
            ctx.cache.resolved[candidate] = path
        return path
    assert missing is not None
    if spec.model is not None:
        raise missing
    raise UnknownModel(
        f'pgml.transform task "{spec.task}" names no model, and its default model "{candidates[0]}"'
        " was not found locally",
        detail=missing.detail,
        hint=f'Name a model: {{"task": "{spec.task}", "model": "<hub id or path>"}}, or put "{candidates[0]}"'
        " under [engine] model_dirs (or set [engine] allow_downloads).",
    )


def _infer_task(path: str, name: str) -> str:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for architecture in config.get("architectures") or ():
        for suffix, task in ARCHITECTURES:
            if str(architecture).endswith(suffix):
                return task
    raise InvalidArgument(f'cannot tell which task model "{name}" is for', hint='Name it: {"task": "…", "model": "…"}.')


def _kind(task: str) -> str:
    """What gets loaded: a pipeline (by task), a causal LM, a seq2seq LM or a QA model."""
    if task == "conversational":
        return "text-generation"  # the same causal LM (and cache entry) as text-generation
    if task.startswith("translation") or task in SEQ2SEQ_TASKS:
        return "seq2seq"
    return task


def load(spec: TaskSpec, ctx: Context) -> tuple[TaskSpec, Loaded]:
    """Check, resolve and load (once per process) the model of ``spec``; the task is inferred if missing."""
    ctx.check()  # a checkpoint before a load that may take seconds
    candidates = _candidates(spec)
    name = candidates[0]
    init = _permit(name, spec.init, ctx)  # before anything is looked up
    path = _locate(spec, candidates, ctx)
    if not spec.task:
        spec = replace(spec, task=_infer_task(path, name))
    kind = _kind(spec.task)
    return spec, ctx.load(ModelCache.key(f"transform:{kind}", path, init), lambda: _load(kind, path, init, name), name)


def _load(kind: str, path: str, init: dict[str, Any], name: str) -> Loaded:
    # lazy: transformers imports torch (seconds); only a model load needs it
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no progress bars in the proxy's log
    try:
        if kind in AUTO_KINDS:
            loaded = _load_auto(kind, path, init)
        else:
            make: Any = pipeline  # (its overloads want a literal task)
            pipe = make(kind, model=path, **init)
            loaded = Loaded(pipe.model, getattr(pipe, "tokenizer", None), pipe)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cannot load model {name} for {kind}: {exc}") from exc
    except ImportError as exc:  # e.g. sentencepiece, or accelerate for device_map
        raise NotSupported(f"model {name} needs a package that is not installed: {exc}") from exc
    except OSError as exc:
        raise EngineError(f"could not load model {name}: {exc}") from exc
    tokenizer = loaded.tokenizer
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as PostgresML did, so prompts can be batched
    if tokenizer is not None and kind == "text-generation":
        tokenizer.padding_side = "left"
    return loaded


def _load_auto(kind: str, path: str, init: dict[str, Any]) -> Loaded:
    from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoTokenizer  # lazy: see _load

    init = dict(init)
    device = init.pop("device", None)
    model_kwargs = init.pop("model_kwargs", None) or {}
    tokenizer_kwargs = {key: init[key] for key in ("revision", "token", "trust_remote_code") if key in init}
    auto: Any = AutoModelForQuestionAnswering if kind == "question-answering" else AutoModelForSeq2SeqLM
    model = auto.from_pretrained(path, **init, **model_kwargs)
    if device is not None and "device_map" not in init:
        model = model.to(device)
    model.eval()
    return Loaded(model, AutoTokenizer.from_pretrained(path, **tokenizer_kwargs))
