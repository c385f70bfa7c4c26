"""What a handler runs with: :class:`Context` (config, model cache, cancel flag, the client's session),
and :class:`ModelLock`, the lock of one loaded model that steps aside from the engine's compute turn.

Owns: the cancel checkpoint (``Context.check``), the mini-batch size rule (``Context.batch_size``), messages to
the client while the call runs (``Context.inform``: INFO for progress, NOTICE for a model's first load through
``Context.load``), the call's library warnings (``Context.library_warnings``), running
model code in a worker from a procedure (``Context.work``), running a function on a loaded model wherever
it is held (``Context.on_model``: this process's cache, or an :class:`Offload`'s actor), running a row
function where the models are (``Context.on_rows``) and a long job as a task of its own
(``Context.task``), the
:class:`Offload` protocol (where model work runs instead of this process: ``engine.runtime.ray_backend``),
and how a worker thread waiting for a model's lock gives up its compute turn meanwhile
(``step_aside_with``, installed by ``engine.runtime.turns``).

Must not: know about SQL, the wire protocol or any ``pgml.*`` function; schedule work (the executor does).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from engine.api import CANCELED, Canceled, Database, EngineConfig, InvalidArgument, NotSupported, SessionSettings
from engine.runtime import library_warnings
from engine.runtime.cache import ModelCache

T = TypeVar("T")
# What Context.inform sends: INFO (progress: the client always gets it, as PostgreSQL sends INFO whatever
# client_min_messages says) or NOTICE (a model loading: silenced by client_min_messages = warning and above).
Severity = Literal["INFO", "NOTICE"]

_held = threading.local()  # this thread's way to step aside from its compute turn (set by engine.runtime.turns)


class ModelLock:
    """The lock of one loaded model (pipelines and fast tokenizers are not thread-safe).

    A thread that must wait for it steps aside from its engine compute turn while it waits
    (``engine.runtime.turns`` installs how, per worker thread): the holder may have handed its turn to
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


@dataclass(frozen=True)
class Hosted:
    """A model :meth:`Context.on_model` runs functions on: its cache key (unique for its content), how its
    payload is read (a coroutine of the proxy: it may use the client's session), and how the payload becomes
    the model (a picklable function: it may run in another process)."""

    key: str
    source: Callable[[], Awaitable[Any]]
    build: Callable[[Any], Any]


class Offload(Protocol):
    """Where model work runs instead of this process's worker threads (``engine.runtime.ray_backend``).

    Every coroutine runs on the event loop and never blocks it; ``fan_out`` runs in an engine worker thread.
    ``cancelled`` is the call's cancel flag (``engine.runtime.turns.Job``): :meth:`cancel` gets the same object.
    """

    workers: frozenset[str]  # the row functions it runs: worker handlers (engine.runtime.executor.HANDLERS) and more
    everywhere: frozenset[str]  # of those, the ones that also run in this process (pgml.clear_gpu_cache)

    async def run(self, name: str, rows: Sequence[tuple[Any, ...]], cancelled: threading.Event,
                  notices: list[str], settings: SessionSettings | None) -> list[Any]:  # fmt: skip
        """The row function ``name`` on ``rows``, where the models are, under the caller's ``settings``."""
        ...

    def stream(self, row: tuple[Any, ...], cancelled: threading.Event, notices: list[str],
               settings: SessionSettings | None) -> AsyncIterator[list[str]]:  # fmt: skip
        """``pgml.transform_stream``'s fragments for one ``(task, args, inputs, cache)`` row, as they are made."""
        ...

    async def task(self, fn: Callable[..., Any], args: tuple[Any, ...], cancelled: threading.Event,
                   notices: list[str], settings: SessionSettings | None) -> Any:  # fmt: skip
        """``fn(ctx, *args)`` as a task of its own, with the resources configured for one."""
        ...

    def actors(self) -> int:
        """The model actors (replicas) in use."""
        ...

    async def on_model(self, hosted: Hosted, fn: Callable[..., Any], args: tuple[Any, ...],
                       cancelled: threading.Event) -> Any:  # fmt: skip
        """``fn(model, *args)`` where ``hosted``'s model is held (read and built there first when it is not)."""
        ...

    def fan_out(self, fn: Callable[..., Any], shared: tuple[Any, ...], items: list[tuple[Any, ...]],
                cancelled: Callable[[], bool], done: Callable[[int, Any], None]) -> list[Any]:  # fmt: skip
        """``[fn(*shared, *item) for item in items]``, in parallel (``shared`` shipped once), ``done(k, outcome)``
        called for each in order once it is in; blocking."""
        ...

    def cancel(self, cancelled: threading.Event) -> None:
        """Stop the remote work of the call whose flag is ``cancelled``."""
        ...

    async def close(self) -> None: ...


class Context:
    """What a handler may use: config, the shared model cache, its cancel flag.

    Procedures (train, deploy, predict…) run on the event loop and also get the
    client's session (``database()``) and ``work()``, which runs model code in the
    engine's worker threads.

    ``check()`` (and ``cancelled.is_set()``) between mini-batches is where a call
    stops once canceled; with the engine's flag (``engine.runtime.turns.Job``) it is also
    where a long call lets other sessions' calls take their turn.
    """

    def __init__(
        self,
        config: EngineConfig,
        cache: ModelCache,
        cancelled: threading.Event,
        db: Database | None = None,
        work: Callable[..., Awaitable[Any]] | None = None,
        database_name: str = "",
        notices: list[str] | None = None,
        offload: Offload | None = None,
        inform: Callable[[str, str], None] | None = None,
        settings: SessionSettings | None = None,
    ) -> None:
        self.config = config
        self.settings = settings  # the caller's pgml.* settings (None: no session to narrow [engine] for)
        self.offload = offload
        self.cache = cache
        self.cancelled = cancelled
        self.db = db
        self._work = work
        self.database_name = database_name
        self.notices = notices if notices is not None else []
        self._inform = inform

    def inform(self, severity: Severity, message: str) -> None:
        """Tell the client now, while the call runs (from any thread): the proxy writes it as a NoticeResponse of
        ``severity`` at once. Without a live channel (a Ray actor's context, a call made outside a session) it is
        dropped: what must outlive the call goes to ``pgml.logs`` or ``notices``."""
        if self._inform is not None:
            self._inform(severity, message)

    def load(self, key: str, loader: Callable[[], T], name: str) -> T:
        """``cache.get(key, loader)`` (in a worker); a model not in the cache yet is announced to the client, as a
        NOTICE before its load and one with the time it took after (``name``: the model as the client named it)."""

        def announced() -> T:
            self.inform("NOTICE", f"loading model {name} (first use)")
            started = time.monotonic()
            model = loader()
            self.inform("NOTICE", f"loaded model {name} in {time.monotonic() - started:.1f} s")
            return model

        loaded: T = self.cache.get(key, announced)
        return loaded

    def library_warnings(self) -> list[dict[str, Any]]:
        """The distinct library warnings this call's worker threads have shown so far, with their counts."""
        return library_warnings.collector(self.cancelled).entries()

    def check(self) -> None:
        """Raise Canceled once the call was canceled (a checkpoint: may first wait for another session's turn)."""
        if self.cancelled.is_set():
            raise Canceled(CANCELED)

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

    async def on_model(self, hosted: Hosted, fn: Callable[..., T], *args: Any) -> T:
        """``fn(model, *args)`` on ``hosted``'s model: in a worker of this process (loaded into the shared cache
        first when it is not there), or where the offload holds it."""
        if self.offload is not None:
            result: T = await self.offload.on_model(hosted, fn, args, self.cancelled)
            return result
        model = self.cache.peek(hosted.key)
        if model is None:
            payload = await hosted.source()
            model = await self.work(self.cache.get, hosted.key, functools.partial(hosted.build, payload))
        return await self.work(fn, model, *args)

    async def on_rows(self, name: str, fn: Callable[[list[tuple[Any, ...]], Context], list[Any]],
                      rows: list[tuple[Any, ...]]) -> list[Any]:  # fmt: skip
        """``fn(rows, ctx)`` where the models are: in a worker of this process, or in the offload's model actors
        when it runs ``name`` (there the same function, ``engine.runtime.ray_host.ROW_FUNCTIONS``)."""
        if self.offload is not None and name in self.offload.workers:
            return await self.offload.run(name, rows, self.cancelled, self.notices, self.settings)
        return await self.work(fn, rows, self)

    async def task(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(ctx, *args)``: in a worker of this process with this context, or (with an offload) as a task of its
        own with the resources configured for one, its arguments shipped through the cluster's object store; a
        cancel stops it either way."""
        if self.offload is not None:
            result: T = await self.offload.task(fn, args, self.cancelled, self.notices, self.settings)
            return result
        return await self.work(fn, self, *args)
