"""The cluster side of the Ray backend: :class:`ModelHost` (one model actor) and :func:`run_tasks` (one task).

Owns: what runs inside a Ray worker process — a model actor's own shared model cache, the engine's very row
functions (:data:`ROW_FUNCTIONS`: the worker handlers of ``engine.runtime.executor.HANDLERS`` and the model
halves of the transform and generate procedures) run on its rows in its threads, a ``transform_stream``
generation streamed fragment by fragment (:meth:`ModelHost.stream`, a Ray generator), functions run on a
loaded model (``Context.on_model``'s remote half), how a cancel of an actor call (``ray.cancel``: an
``asyncio.CancelledError`` in the async actor) stops the handler at its next checkpoint, a task's function
run with a context of its own (``Context.task``'s remote half: tune), and the :data:`Outcome` every call
returns (an engine error travels as its class and fields, never as a traceback: Ray would wrap it and lose
its SQLSTATE).

Must not: import ray (the actor class is made remote by ``engine.runtime.ray_backend``), talk to a database,
or log client data at info and above.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.api import EngineConfig, EngineError, SessionSettings
from engine.nlp import embed, rank, stream, transform
from engine.nlp.finetune import tuned
from engine.runtime import memory
from engine.runtime.cache import ModelCache
from engine.runtime.context import Context
from engine.runtime.executor import log_failure
from engine.runtime.locate import configure_offline
from engine.runtime.threads import limited

# ("ok", value, notices) | ("error", EngineError subclass, message, detail, hint) | ("missing",): not loaded here
Outcome = tuple[Any, ...]
MISSING: Outcome = ("missing",)
RowFunction = Callable[[list[tuple[Any, ...]], Context], list[Any]]
# The functions a model actor runs on rows, by the name the offload is asked for (the engine's own: no copies).
ROW_FUNCTIONS: dict[str, RowFunction] = {
    "embed": embed.embed,
    "rank": rank.rank,
    "transform": transform.transform_rows,
    "transform_stream": stream.stream_all,  # inside a larger statement: every fragment, as rows
    "generate": tuned.generate_rows,
    "clear_gpu_cache": memory.clear_gpu_cache,
}
_END = object()


def outcome(fn: Callable[[Context], Any], ctx: Context) -> Outcome:
    """``fn(ctx)`` as an :data:`Outcome`: a library fault is the statement's error, as the local engine says it."""
    try:
        return ("ok", fn(ctx), ctx.notices)
    except EngineError as exc:
        return ("error", type(exc), exc.message, exc.detail, exc.hint)
    except Exception as exc:
        log_failure("ray worker", None, exc)
        return ("error", EngineError, f"{type(exc).__name__}: {exc}", None, None)


def run_tasks(fn: Callable[..., Any], count: int, *args: Any) -> Outcome:
    """A Ray task: ``fn(*shared, *item)`` for each item of a share of a fan-out (training fits of
    ``engine.ml.search``), as one :data:`Outcome` of their results in order; ``args``: the ``count`` shared values
    (refs, resolved by Ray), then the list of items."""
    shared, items = args[:count], args[count]
    return outcome(lambda ctx: [fn(*shared, *item) for item in items], Context(EngineConfig(), ModelCache(0),
                                                                                  threading.Event()))  # fmt: skip


def run_in_context(config: EngineConfig, settings: SessionSettings | None, fn: Callable[..., Any],
                   *args: Any) -> Outcome:  # fmt: skip
    """A Ray task: ``fn(ctx, *args)`` with a context of its own under the caller's ``settings`` (tune), as an
    :data:`Outcome`.

    It runs in the task's main thread: ``ray.cancel`` raises KeyboardInterrupt there, which ends it at once
    (the Ray task is then canceled; nothing is returned).
    """
    configure_offline(config.allow_downloads)
    def run(ctx: Context) -> Any:
        with limited(settings, fn.__name__):
            return fn(ctx, *args)

    return outcome(run, Context(config, ModelCache(0), threading.Event(), settings=settings))


class ModelHost:
    """A model actor: holds loaded models (normally the one its name stands for) and runs calls on them.

    An async actor: each call runs in a thread of its own; ``ray.cancel`` of a call sets that call's cancel
    flag, and the handler stops at its next checkpoint (between mini-batches), as it does in the proxy.
    """

    def __init__(self, config: EngineConfig) -> None:
        configure_offline(config.allow_downloads)
        self.config = config
        self.cache = ModelCache(config.cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=config.workers + config.max_queue, thread_name_prefix="pgml-ray")

    async def run(self, name: str, rows: Sequence[tuple[Any, ...]], settings: SessionSettings | None) -> Outcome:
        """The row function ``name`` (:data:`ROW_FUNCTIONS`) on ``rows``, under the caller's ``settings``."""
        return await self._in_thread(functools.partial(_run_rows, ROW_FUNCTIONS[name], rows), settings)

    async def stream(
        self, task: Any, args: Any, inputs: Any, settings: SessionSettings | None
    ) -> AsyncIterator[Outcome]:
        """A Ray generator: ``engine.nlp.stream.stream``'s fragments, each as ``("ok", fragment, notices)`` as
        soon as it is decoded (the notices said since the last one), or one error :data:`Outcome` that ends it.

        The generation runs in this actor's threads, one ``next()`` at a time; ``ray.cancel`` of the generator
        (the reader closed, canceled or timed out) closes it, which stops ``generate``.
        """
        cancelled = threading.Event()
        ctx = Context(self.config, self.cache, cancelled, settings=settings)
        fragments = stream.stream(task, args or {}, inputs, ctx)  # nothing runs before the first next()
        loop = asyncio.get_running_loop()
        step: asyncio.Future[Outcome] | None = None
        said = 0
        try:
            while True:
                step = loop.run_in_executor(self._pool, outcome, functools.partial(_next, fragments), ctx)
                got = await asyncio.shield(step)
                if got[0] != "ok":
                    yield got
                if got[0] != "ok" or got[1] is _END:
                    return
                yield ("ok", got[1], ctx.notices[said:])
                said = len(ctx.notices)
        finally:
            cancelled.set()  # a next() still running stops at its next fragment (Canceled), then it is closed
            if step is not None:
                await asyncio.wait([step])
            await loop.run_in_executor(self._pool, fragments.close)

    async def apply(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Outcome:
        """``fn(model, *args)`` on the model cached under ``key``; :data:`MISSING` when it is not loaded here."""
        model = self.cache.peek(key)
        if model is None:
            return MISSING
        return await self._in_thread(lambda ctx: fn(model, *args))

    async def load(self, key: str, build: Callable[[Any], Any], payload: Any) -> Outcome:
        """``build(payload)`` into the cache under ``key`` (once, whoever asks)."""
        def load(ctx: Context) -> None:
            self.cache.get(key, functools.partial(build, payload))

        return await self._in_thread(load)

    async def _in_thread(self, fn: Callable[[Context], Any], settings: SessionSettings | None = None) -> Outcome:
        cancelled = threading.Event()
        ctx = Context(self.config, self.cache, cancelled, settings=settings)
        future = asyncio.get_running_loop().run_in_executor(self._pool, outcome, fn, ctx)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()  # the handler stops at its next checkpoint; its thread then ends
            raise


def _run_rows(fn: RowFunction, rows: Sequence[tuple[Any, ...]], ctx: Context) -> Any:
    ctx.check()
    with limited(ctx.settings, fn.__name__):  # pgml.omp_num_threads, in the actor's thread as in the proxy's
        return fn(list(rows), ctx)


def _next(fragments: Iterator[list[str]], ctx: Context) -> Any:
    ctx.check()
    return next(fragments, _END)
