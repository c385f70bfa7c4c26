"""Models tuned by ``pgml.tune``, in use: ``pgml.generate``, ``pgml.predict`` on a tuned text classifier,
and tuned projects named as the model of ``pgml.transform``.

Owns: a tuned model's files from the registry (verified there, ``engine.pg.registry``) written once per
model version to a private directory (:func:`model_directories`), or loaded from the files directly
(once per model version, through the shared model cache); batched generation with a tuned model
(:func:`generate_all`, also tune's scoring: only new text for causal LMs); classifying texts with a
tuned classifier.

Must not: train (``engine.nlp.finetune.trainer`` does), map client generation args
(``engine.nlp.generation_args`` does: OpenAI-style names as well as Hugging Face ones), paste values into
SQL, run model code on the event loop, or import torch or transformers at import time.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.api import CANCELED, Call, Canceled, EngineConfig, EngineError, InvalidArgument, NotSupported, UnknownModel
from engine.ml.algorithms import dashed_task
from engine.nlp import generation_args
from engine.nlp.finetune.plan import DEFAULT_MAX_LENGTH
from engine.nlp.finetune.rows import chat_prompt
from engine.nlp.generate import model_generate
from engine.nlp.generation_args import GenerationArgs
from engine.pg import registry
from engine.runtime.cache import ModelCache
from engine.runtime.confine import generation_kwargs
from engine.runtime.context import Context
from engine.runtime.device import pick_device
from engine.runtime.locate import no_progress_bars, owned_dir, resolve

MANIFEST = "pgml_tune.json"  # task, kind, labels, prompt template of a tuned model
MAX_NEW_TOKENS = 256


def generate_all(
    model: Any, tokenizer: Any, kind: str, inputs: list[str], batch: int, cancelled: Callable[[], bool],
    add_special: bool, mapped: GenerationArgs | None = None, **kwargs: Any,
) -> list[str]:  # fmt: skip
    """``model.generate(**kwargs)`` per input, in batches: the continuation for causal LMs, the output for seq2seq,
    cut at its first stop string.

    ``mapped``: a client's args (``generation_args.parse``), else ``kwargs`` (Hugging Face names) are used.
    ``cancelled`` is polled between batches and after every decoding step (a stopping criterion): once it
    says so, Canceled is raised.
    """
    generation_kwargs(kwargs)  # no code-loading generation args
    args = mapped if mapped is not None else GenerationArgs(kwargs)
    model.eval()
    args.kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out: list[str] = []
    step = max(1, batch)
    side = "left" if kind == "causal" else "right"  # a causal LM continues from the last column
    for start in range(0, len(inputs), step):
        if cancelled():
            raise Canceled(CANCELED)
        enc = tokenizer(inputs[start : start + step], return_tensors="pt", padding=True, truncation=True,
                        padding_side=side, add_special_tokens=add_special)  # fmt: skip
        enc.pop("token_type_ids", None)
        enc = enc.to(model.device)
        call = args.call_kwargs(model, tokenizer, int(enc["input_ids"].shape[1]))
        generated = model_generate(model, enc, call, cancelled)
        if cancelled():
            raise Canceled(CANCELED)
        if kind == "causal":
            generated = generated[:, enc["input_ids"].shape[1] :]
        out.extend(args.cut(text).strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


@dataclass(frozen=True)
class Tuned:
    """A tuned model loaded from its files (what the model cache keeps; ``nbytes`` sizes it there)."""

    model: Any
    tokenizer: Any
    kind: str
    task: str
    prompt_template: str | None
    nbytes: int


def generate_tuned(
    files: dict[str, bytes], key: str, inputs: list[str], config_kwargs: dict[str, Any],
    engine_config: EngineConfig, cache: ModelCache, cancelled: threading.Event | None = None,
    notices: list[str] | None = None, load: Callable[[str, Callable[[], Tuned]], Tuned] | None = None,
) -> list[str]:  # fmt: skip
    """``model.generate(**config_kwargs)`` per input with the tuned model in ``files`` (cached under ``key``; by
    ``load(key, loader)`` where given: ``Context.load``, which tells the client of a first load).

    Seq2seq models return their output; causal LMs only the generated continuation, and a
    ``conversation`` model takes each input as the user's message, formatted as in tuning. Without
    ``max_new_tokens`` / ``max_length`` up to ``MAX_NEW_TOKENS`` are generated. ``cancelled`` (the call's
    cancel flag: cancel, disconnect, call_timeout) stops it at the next decoding step with Canceled.
    ``config_kwargs`` may use OpenAI-style names (``engine.nlp.generation_args``); what they cannot honour is
    said in ``notices`` (the call's notices channel).
    """
    cached = cache.peek(key)  # the caller sends no files once the model is cached
    if cached is not None:
        manifest = {"kind": cached.kind, "task": cached.task}
    else:
        manifest = json.loads(files.get(MANIFEST, b"{}"))
    if manifest.get("kind") not in ("causal", "seq2seq"):
        task = str(manifest.get("task", "this")).replace("_", "-")
        hint = "Use a model tuned for conversation, text2text, summarization or translation."
        raise NotSupported(f"pgml.generate does not apply to {task} models", hint=hint)
    if not isinstance(config_kwargs, dict):
        raise InvalidArgument("the generate config must be a JSON object")
    generation_kwargs(config_kwargs)  # before anything is loaded
    mapped = generation_args.parse(config_kwargs, {"eos_token"})  # OpenAI-style names too
    if notices is not None:
        mapped.report(notices)
    if mapped.sequences > 1:
        raise InvalidArgument(
            "pgml.generate returns one text per input", hint="Leave n / num_return_sequences out (or 1)."
        )
    tuned: Tuned = (load or cache.get)(key, lambda: load_tuned(files, manifest, engine_config))
    kwargs = mapped.kwargs
    if "eos_token" in kwargs:  # as PostgresML's transform: a token text becomes its id
        kwargs["eos_token_id"] = tuned.tokenizer.convert_tokens_to_ids(kwargs.pop("eos_token"))
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:  # HF's default max_length=20 counts the prompt
        kwargs["max_new_tokens"] = tuned.model.generation_config.max_new_tokens or MAX_NEW_TOKENS
    texts = [text if isinstance(text, str) else "" for text in inputs]
    if tuned.task == "conversation":
        texts = [chat_prompt(tuned.tokenizer, tuned.prompt_template, None, text, "")[0] for text in texts]
    stop = cancelled.is_set if cancelled is not None else lambda: False
    special = tuned.kind == "seq2seq" or tuned.prompt_template is not None  # a chat template has its own
    try:
        return generate_all(tuned.model, tuned.tokenizer, tuned.kind, texts, engine_config.batch_size,
                             stop, special, mapped)  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid generate config: {exc}") from exc


def load_tuned(files: dict[str, bytes], manifest: dict[str, Any], config: EngineConfig) -> Tuned:
    """Writes the files to a temporary directory, loads model and tokenizer, removes the directory."""
    import transformers  # lazy: seconds to import (torch); the engine imports without it

    no_progress_bars()
    kind = manifest["kind"]
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="pgml-generate-") as tmp:
        root = Path(tmp).resolve()
        for name, data in files.items():
            target = (root / name).resolve()
            if not target.is_relative_to(root):
                raise InvalidArgument(f"invalid model file path: {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            model: Any = auto.from_pretrained(tmp, trust_remote_code=config.trust_remote_code)
            tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EngineError(f"could not load the tuned model: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(config.device)).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return Tuned(model, tokenizer, kind, manifest.get("task", ""), manifest.get("prompt_template"), int(size))


@dataclass(frozen=True)
class _Classifier:
    """A tuned classifier loaded for ``pgml.predict`` (what the model cache keeps; ``nbytes`` sizes it there)."""

    model: Any
    tokenizer: Any
    labels: list[Any]  # by class index: the training labels
    max_length: int
    nbytes: int


def classify_texts(
    directory: str, key: str, texts: list[str], probabilities: bool, config: EngineConfig, cache: ModelCache,
    cancelled: Callable[[], bool], load: Callable[[str, Callable[[], _Classifier]], _Classifier] | None = None,
) -> list[Any]:  # fmt: skip
    """Per text the label (or the class probabilities, in label order) from the tuned classifier in ``directory``.

    Loaded once per ``key`` through the model cache (by ``load(key, loader)`` where given: ``Context.load``, which
    tells the client of a first load); batches of ``[engine] batch_size``, ``cancelled`` polled between them.
    """
    import torch  # lazy: seconds to import; the engine imports without it

    classifier: _Classifier = (load or cache.get)(key, lambda: _load_classifier(directory, config))
    out: list[Any] = []
    step = max(1, config.batch_size)
    for start in range(0, len(texts), step):
        if cancelled():
            raise Canceled(CANCELED)
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


def _load_classifier(directory: str, config: EngineConfig) -> _Classifier:
    import transformers  # lazy: seconds to import (torch); the engine imports without it

    no_progress_bars()
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


# --------------------------------------------------------------------------- #
# Procedures: the registry side
# --------------------------------------------------------------------------- #


async def generate(call: Call, ctx: Context) -> list[Any]:
    """``pgml.generate(project_name, inputs, config)``: text (or text[]) from the project's tuned model."""
    db = ctx.database()
    out: list[Any] = []
    for name, inputs, config in call.rows:
        if name is None or inputs is None or config is None:
            out.append(None)  # STRICT
            continue
        row = await registry.model(db, await registry.deployed_model_id(db, name))
        if row.algorithm != "transformers":
            raise InvalidArgument(f"Project `{name}` has no tuned transformers model to generate with")
        key = f"tuned/{ctx.database_name}/{row.id}/{row.created_at}"
        many = isinstance(inputs, list)
        texts = await _generate(ctx, row, key, name, inputs if many else [inputs], dict(config))
        out.append(texts if many else texts[0])
    return out


class NotLoaded(EngineError):
    """A :func:`generate_rows` row came without files where its model is not loaded: read them, and ask again."""


def generate_rows(rows: list[tuple[Any, ...]], ctx: Context) -> list[list[str]]:
    """``(key, project, files, inputs, config)`` rows -> :func:`generate_tuned`'s texts, where the model is (this
    process or a model actor; ``Context.on_rows``); :class:`NotLoaded` when it is not loaded there and no files came.
    A first load is told to the client as the project's model loading (``Context.load``)."""
    out = []
    for key, project, files, inputs, config in rows:
        if not files and ctx.cache.peek(key) is None:
            raise NotLoaded("the tuned model is not loaded here")

        def load(key: str, loader: Callable[[], Tuned], project: str = project) -> Tuned:
            return ctx.load(key, loader, f"of project {project}")

        out.append(generate_tuned(files, key, inputs, config, ctx.config, ctx.cache, ctx.cancelled, ctx.notices, load))
    return out


async def _generate(
    ctx: Context, row: registry.Model, key: str, project: str, inputs: list[Any], config: dict[str, Any]
) -> list[str]:
    """The texts of one generate call; the model's files read (and verified) through the client's session only
    where the model is not loaded yet."""
    try:
        (texts,) = await ctx.on_rows("generate", generate_rows, [(key, project, {}, inputs, config)])
    except NotLoaded:
        files = await registry.files(ctx.database(), row, registry.signer(ctx))
        (texts,) = await ctx.on_rows("generate", generate_rows, [(key, project, files, inputs, config)])
    return texts  # type: ignore[no-any-return]


async def model_directories(ctx: Context, names: list[str]) -> dict[str, str]:
    """Per name of a project with a deployed model (as the caller sees it): a local directory of its files.

    A name that is another role's project is 42501, not a Hugging Face lookup, unless the name is also a
    model this proxy serves (a role must not make a Hugging Face name unusable for others by naming a
    project after it).
    """
    db = ctx.database()
    if not await registry.has_registry(db):
        return {}
    found = await registry.deployments_by_name(db, names)
    for name, _, foreign in found:
        if foreign and not await ctx.work(_resolvable, name, ctx.config):
            raise registry.foreign_project(name)
    return {name: await _materialize(ctx, model_id) for name, model_id, _ in found if model_id is not None}


def _resolvable(name: str, config: EngineConfig) -> bool:
    try:
        resolve(name, config)
    except UnknownModel:
        return False
    return True


async def classify(ctx: Context, row: registry.Model, function: str, inputs: list[Any]) -> list[Any]:
    """``pgml.predict`` / ``pgml.predict_proba`` with a project's tuned text classifier.

    Each input is a text (answer: its label, or the class probabilities in label order) or an array of
    texts (answer: an array of those; NULL elements answer NULL).
    """
    if row.task != "text_classification" or function not in ("predict", "predict_proba"):
        raise NotSupported(
            f"pgml.{function} does not apply to the tuned {dashed_task(row.task)} model of project `{row.project}`",
            hint="pgml.predict and pgml.predict_proba classify texts with text-classification projects; generate"
            " text with pgml.generate, or use the project's name as the model of pgml.transform.",
        )
    texts = [t for v in inputs for t in ([v] if isinstance(v, str) else v) if t is not None]
    directory = await _materialize_row(ctx, row)
    key = f"tuned/{ctx.database_name}/{row.id}/{row.created_at}/classifier"
    values: list[Any] = []

    def load(key: str, loader: Callable[[], _Classifier]) -> _Classifier:
        return ctx.load(key, loader, f"of project {row.project}")

    for start in range(0, len(texts), _SLICE):  # one job per slice: other sessions go in between
        values += await ctx.work(
            classify_texts, directory, key, texts[start : start + _SLICE], function == "predict_proba", ctx.config,
            ctx.cache, ctx.cancelled.is_set, load,
        )  # fmt: skip
    answers = iter(values)
    return [next(answers) if isinstance(v, str) else [None if t is None else next(answers) for t in v] for v in inputs]


_SLICE = 1024  # texts per worker job


async def _materialize(ctx: Context, model_id: int) -> str:
    """A local directory with the tuned model's files (written once per model version)."""
    return await _materialize_row(ctx, await registry.model(ctx.database(), model_id))


async def _materialize_row(ctx: Context, row: registry.Model) -> str:
    # A private, per-process directory (unguessable name): nothing another OS user or a client planted is reused.
    target = Path(owned_dir(f"tuned/{ctx.database_name}/{row.id}/{row.created_at}"))
    if not (target / ".complete").exists():
        files = await registry.files(ctx.database(), row, registry.signer(ctx))
        for path, data in files.items():
            destination = (target / path).resolve()
            if not destination.is_relative_to(target.resolve()):
                raise InvalidArgument(f"model {row.id} has a file outside its directory: {path}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
        (target / ".complete").touch()
        os.chmod(target, 0o700)
    return str(target)
