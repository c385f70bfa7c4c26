"""``pgml.embed``: sentence-transformers embeddings, and loading sentence-transformers models.

Owns: argument checking (kwargs split between model construction and the call, as PostgresML does),
batching every text of one statement into one encode pass (longest first, in mini-batches with a
cancel checkpoint between them), and :func:`load_sentence_model` (``SentenceTransformer`` /
``CrossEncoder`` through the shared model cache; with ``[engine] embed_backend = "onnx"`` an embedding model's
transformer runs in ONNX Runtime, :mod:`engine.nlp.onnx_embed`).

Must not: know about SQL or the wire protocol; handlers take argument tuples and return Python values
(numpy arrays for vectors).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from engine.api import EngineError, InvalidArgument, NotSupported
from engine.nlp.json_args import kwargs_object
from engine.runtime.cache import ModelCache
from engine.runtime.confine import confine_kwargs, refuse_unsupported_loading
from engine.runtime.context import Context
from engine.runtime.device import pick_device, usable_device
from engine.runtime.locate import resolve

# SentenceTransformer(...) keyword arguments; everything else goes to encode() (PostgresML's split).
INIT_KWARGS = frozenset(
    {
        "device",
        "trust_remote_code",
        "revision",
        "model_kwargs",
        "tokenizer_kwargs",
        "config_kwargs",
        "truncate_dim",
        "token",
    }
)


def _load_encoder(name: str, init: dict[str, Any], ctx: Context) -> Any:
    # confine_kwargs checks trust_remote_code
    return load_sentence_model("SentenceTransformer", name, init, ctx, onnx=ctx.config.embed_backend == "onnx")


# sentence-transformers class -> its kind in the model cache key
_CACHE_KINDS = {"SentenceTransformer": "sentence-transformers", "CrossEncoder": "cross-encoder"}
ONNX_HINT = "Install the onnx extra (pip install 'pgml-proxy[onnx]'), or set [engine] embed_backend = \"torch\"."


def load_sentence_model(cls_name: str, name: str, init: dict[str, Any], ctx: Context, onnx: bool = False) -> Any:
    """A sentence-transformers ``SentenceTransformer`` / ``CrossEncoder`` for ``name``, from the shared cache.

    ``init`` goes through :func:`confine_kwargs` first (locations, other models named, trust_remote_code at any
    depth). ``onnx``: loaded on the CPU, its transformer then run by ONNX Runtime (:mod:`engine.nlp.onnx_embed`)."""
    # No session settings: PostgresML's trust settings govern transform only (its own embedding.sql asks for
    # trust_remote_code with them unset); [engine] trust_remote_code alone decides here.
    init = {"device": pick_device(ctx.config.device), **confine_kwargs(init, ctx.config, None, name)}
    refuse_unsupported_loading(name, init)
    if onnx:
        init["device"] = "cpu"  # ONNX Runtime's CPU execution provider runs it; torch only loads and exports it
    else:
        init["device"], note = usable_device(init["device"], ctx.config.device)
        if note is not None:
            ctx.notices.append(note)
    path = ctx.cache.resolved.get(name) or resolve(name, ctx.config)
    ctx.cache.resolved[name] = path

    def load() -> Any:
        # lazy: sentence-transformers and transformers import torch (seconds); only a model load needs them
        import sentence_transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no progress bars in the proxy's log
        attach = _onnx_attach() if onnx else None
        try:
            model = getattr(sentence_transformers, cls_name)(path, **init)
        except TypeError as exc:
            raise InvalidArgument(f"invalid kwargs for model {name}: {exc}") from exc
        except OSError as exc:
            raise EngineError(f"could not load model {name}: {exc}") from exc
        if attach is not None:
            attach(model, path, init, ctx.config)
        return model

    kind = _CACHE_KINDS[cls_name] + ("-onnx" if onnx else "")
    return ctx.load(ModelCache.key(kind, path, init), load, name)


def _onnx_attach() -> Any:
    """:func:`engine.nlp.onnx_embed.attach`, or 0A000 naming the extra when ONNX Runtime is not installed."""
    try:
        # lazy: imports torch and ONNX Runtime, optional packages only embed_backend = "onnx" needs
        from engine.nlp.onnx_embed import attach
    except ModuleNotFoundError as exc:
        if exc.name not in ("onnxruntime", "onnxscript", "onnx_ir", "onnx"):
            raise
        raise NotSupported(
            f'[engine] embed_backend = "onnx" needs the Python package {exc.name}, which is not installed',
            hint=ONNX_HINT,
        ) from exc
    return attach


def embed(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(transformer, text | text[], kwargs)`` rows -> one vector (or list of vectors) per row."""
    results: list[Any] = [None] * len(rows)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (model, inputs, kwargs) in enumerate(rows):
        if model is None or inputs is None or kwargs is None:
            continue  # STRICT: NULL in, NULL out
        groups[(model, json.dumps(kwargs_object(kwargs), sort_keys=True))].append(i)
    for (model, kwargs_text), indexes in groups.items():
        kwargs = json.loads(kwargs_text)
        init = {k: v for k, v in kwargs.items() if k in INIT_KWARGS}
        encode_kwargs = {k: v for k, v in kwargs.items() if k not in INIT_KWARGS}
        if "instruction" in encode_kwargs:  # hkunlp/instructor models: PostgresML maps it to a prompt
            encode_kwargs["prompt"] = encode_kwargs.pop("instruction")
        encoder = _load_encoder(model, init, ctx)
        texts: list[str] = []
        spans: list[tuple[int, int, bool]] = []
        for i in indexes:
            value = rows[i][1]
            many = isinstance(value, list)
            items = value if many else [value]
            if any(not isinstance(t, str) for t in items):
                raise InvalidArgument("pgml.embed inputs must be text values, not NULL")
            spans.append((len(texts), len(texts) + len(items), many))
            texts.extend(items)
        vectors = _encode(encoder, texts, encode_kwargs, ctx)
        for i, (start, stop, many) in zip(indexes, spans, strict=True):
            results[i] = list(vectors[start:stop]) if many else vectors[start]
    return results


def _encode(encoder: Any, texts: list[str], kwargs: dict[str, Any], ctx: Context) -> Any:

    batch = ctx.batch_size(kwargs.pop("batch_size", None))
    # Longest first across the whole statement (as encode() does within one call), so slicing
    # adds no padding. One encode() call per batch (no slower than bigger slices): between them a
    # cancel takes effect and another session's call gets its turn after at most one batch.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = []
    for start in range(0, len(order), batch):
        ctx.check()
        part = [texts[i] for i in order[start : start + batch]]
        try:
            vectors = encoder.encode(part, batch_size=batch, convert_to_numpy=True, show_progress_bar=False, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"invalid kwargs for encode: {exc}") from exc
        out.append(np.asarray(vectors, dtype=np.float32))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    result = np.empty_like(np.concatenate(out))
    result[np.asarray(order)] = np.concatenate(out)
    return result
