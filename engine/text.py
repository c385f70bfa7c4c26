"""Handlers for text functions: ``pgml.embed``, ``pgml.chunk``, ``pgml.version``.

Owns: argument checking (kwargs split between model construction and the call,
as PostgresML does), batching every text of one statement into one encode call,
and the LangChain splitter table.

Must not: know about SQL or the wire protocol; handlers take argument tuples and
return Python values (numpy arrays for vectors).
"""

from __future__ import annotations

import functools
import json
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVar

from engine.api import Canceled, EngineError, InvalidArgument, NotSupported
from engine.models import ModelCache, confine_kwargs, pick_device, resolve, usable_device

if TYPE_CHECKING:
    from engine.api import Database
    from proxy.config import EngineSection

T = TypeVar("T")
PGML_API_LEVEL = "2.10.0"
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


_held = threading.local()  # this thread's way to step aside from its compute turn (set by engine.core)


class ModelLock:
    """The lock of one loaded model (pipelines and fast tokenizers are not thread-safe).

    A thread that must wait for it steps aside from its engine compute turn while it waits
    (``engine.core`` installs how, per worker thread): the holder may have handed its turn to
    this thread's job at a checkpoint and needs a turn back to finish and release the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> ModelLock:
        if self._lock.acquire(blocking=False):
            return self
        aside: Callable[[], AbstractContextManager[None]] | None = getattr(_held, "aside", None)
        if aside is None:
            self._lock.acquire()
            return self
        got = False
        try:
            with aside():  # others compute meanwhile; the turn is taken again after (Canceled if canceled)
                self._lock.acquire()
                got = True
        except BaseException:
            if got:
                self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def step_aside_with(aside: Callable[[], AbstractContextManager[None]] | None) -> None:
    """Install (or with None remove) this worker thread's way to give up its turn while it waits for a model."""
    _held.aside = aside


class Context:
    """What a handler may use: config, the shared model cache, its cancel flag.

    Procedures (train, deploy, predict…) run on the event loop and also get the
    client's session (``database()``) and ``work()``, which runs model code in the
    engine's worker threads.

    ``check()`` (and ``cancelled.is_set()``) between mini-batches is where a call
    stops once canceled; with the engine's flag (``engine.core.Job``) it is also
    where a long call lets other sessions' calls take their turn.
    """

    def __init__(
        self,
        config: EngineSection,
        cache: ModelCache,
        cancelled: threading.Event,
        db: Database | None = None,
        work: Callable[..., Awaitable[Any]] | None = None,
        database_name: str = "",
        notices: list[str] | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.cancelled = cancelled
        self.db = db
        self._work = work
        self.database_name = database_name
        self.notices = notices if notices is not None else []

    def check(self) -> None:
        """Raise Canceled once the call was canceled (a checkpoint: may first wait for another session's turn)."""
        if self.cancelled.is_set():
            raise Canceled("canceling statement due to user request")

    def batch_size(self, requested: Any = None) -> int:
        """The mini-batch size for a client's ``batch_size`` kwarg: it may ask for less than
        ``[engine] batch_size``, never more (a batch holds the engine's turn until it is done)."""
        limit = max(1, int(self.config.batch_size))
        if requested is None:
            return limit
        if isinstance(requested, bool) or not isinstance(requested, (int, float, str)):
            raise InvalidArgument("batch_size must be a positive integer")
        try:
            size = int(requested)
        except ValueError as exc:
            raise InvalidArgument("batch_size must be a positive integer") from exc
        return max(1, min(size, limit))

    def database(self) -> Database:
        if self.db is None:
            raise NotSupported("this pgml function needs the client's database session")
        return self.db

    async def work(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in an engine worker thread (the event loop goes on)."""
        if self._work is None:
            return fn(*args, **kwargs)
        result: T = await self._work(functools.partial(fn, *args, **kwargs))
        return result


def pgml_version(rows: list[tuple[Any, ...]], ctx: Context) -> list[str]:
    try:
        own = version("pgml-proxy")
    except PackageNotFoundError:  # running from a source tree
        own = "dev"
    return [f"{PGML_API_LEVEL} (pgml-proxy {own})" for _ in rows]


def _kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"kwargs must be a JSON object, not {type(value).__name__}")
    return value


def _load_encoder(name: str, init: dict[str, Any], ctx: Context) -> Any:
    return load_sentence_model("SentenceTransformer", name, init, ctx)  # confine_kwargs checks trust_remote_code


# sentence-transformers class -> its kind in the model cache key
_CACHE_KINDS = {"SentenceTransformer": "sentence-transformers", "CrossEncoder": "cross-encoder"}


def load_sentence_model(cls_name: str, name: str, init: dict[str, Any], ctx: Context) -> Any:
    """A sentence-transformers ``SentenceTransformer`` / ``CrossEncoder`` for ``name``, from the shared cache.

    ``init`` goes through :func:`confine_kwargs` first (locations, trust_remote_code at any depth)."""
    init = {"device": pick_device(ctx.config.device), **confine_kwargs(init, ctx.config)}
    init["device"], note = usable_device(init["device"], ctx.config.device)
    if note is not None:
        ctx.notices.append(note)
    path = ctx.cache.resolved.get(name) or resolve(name, ctx.config)
    ctx.cache.resolved[name] = path

    def load() -> Any:
        import sentence_transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no progress bars in the proxy's log
        try:
            return getattr(sentence_transformers, cls_name)(path, **init)
        except TypeError as exc:
            raise InvalidArgument(f"invalid kwargs for model {name}: {exc}") from exc
        except OSError as exc:
            raise EngineError(f"could not load model {name}: {exc}") from exc

    return ctx.cache.get(ModelCache.key(_CACHE_KINDS[cls_name], path, init), load)


def embed(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(transformer, text | text[], kwargs)`` rows -> one vector (or list of vectors) per row."""
    results: list[Any] = [None] * len(rows)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (model, inputs, kwargs) in enumerate(rows):
        if model is None or inputs is None or kwargs is None:
            continue  # STRICT: NULL in, NULL out
        groups[(model, json.dumps(_kwargs(kwargs), sort_keys=True))].append(i)
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
    import numpy as np

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


SPLITTERS = {
    "character": "CharacterTextSplitter",
    "latex": "LatexTextSplitter",
    "markdown": "MarkdownTextSplitter",
    "nltk": "NLTKTextSplitter",
    "python": "PythonCodeTextSplitter",
    "recursive_character": "RecursiveCharacterTextSplitter",
    "spacy": "SpacyTextSplitter",
}


def chunk(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    """``(splitter, text, kwargs)`` rows -> ``[(chunk_index, chunk), ...]`` per row, index from 1."""
    import langchain_text_splitters as splitters

    results: list[Any] = []
    for name, text, kwargs in rows:
        if name is None or text is None or kwargs is None:
            results.append(None)
            continue
        if name not in SPLITTERS:
            raise InvalidArgument(f"Unknown splitter: {name}", hint=f"Use one of: {', '.join(sorted(SPLITTERS))}.")
        try:
            splitter = getattr(splitters, SPLITTERS[name])(**_kwargs(kwargs))
            pieces = splitter.split_text(text)
        except (ImportError, LookupError, OSError) as exc:
            raise NotSupported(
                f"the {name} splitter is not available: {exc}",
                hint="The nltk splitter needs the nltk package and its punkt data; spacy needs spacy and a model.",
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid kwargs for the {name} splitter: {exc}") from exc
        results.append([(i + 1, piece) for i, piece in enumerate(pieces)])
    return results
