"""The local engine: runs handlers in worker threads with a bounded queue, timeouts and cancel.

Owns: the handler table (function name -> handler), the worker pool, per-session
cancel flags, the shared model cache. Must not: be imported by the proxy directly
(``engine.api.create_engine`` does it), or run model code on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from engine import deploy, inference, text, training, tuning
from engine.api import Call, Canceled, DatabaseError, EngineError, NotSupported, Overloaded
from engine.models import ModelCache, configure_offline

if TYPE_CHECKING:
    from proxy.config import EngineSection

log = logging.getLogger(__name__)
_END = object()  # the end of a stream

Handler = Callable[[list[tuple[Any, ...]], text.Context], list[Any]]

HANDLERS: dict[str, Handler] = {
    "version": text.pgml_version,
    "embed": text.embed,
    "chunk": text.chunk,
    "rank": lambda rows, ctx: _transform().rank(rows, ctx),
    "transform_stream": lambda rows, ctx: _stream_all(rows, ctx),
}


def _transform() -> Any:
    from engine import transform  # transformers pipelines: imported on first use

    return transform


def _stream_all(rows: list[tuple[Any, ...]], ctx: text.Context) -> list[Any]:
    """``transform_stream`` where it cannot stream (inside a larger statement): every fragment, as rows."""
    return [
        None if any(v is None for v in row[:3]) else list(_transform().stream(row[0], row[1] or {}, row[2], ctx))
        for row in rows
    ]


Procedure = Callable[[Call, text.Context], Awaitable[list[Any]]]
# Handlers that talk to the client's session; the flag: bounded by call_timeout (training is not).
PROCEDURES: dict[str, tuple[Procedure, bool]] = {
    "train": (training.train, False),
    "train_joint": (training.train, False),
    "snapshot": (training.snapshot, False),
    "tune": (tuning.tune, False),
    "transform": (tuning.transform, True),
    "generate": (tuning.generate, True),
    "deploy": (deploy.deploy, True),
    "load_dataset": (deploy.load_dataset, False),
    **{name: (inference.predict, True) for name in inference.FUNCTIONS},
}


class LocalEngine:
    """Evaluates calls with in-process models; one instance per proxy process."""

    def __init__(self, config: EngineSection) -> None:
        configure_offline(config.allow_downloads)
        self.config = config
        self.cache = ModelCache(config.cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pgml-engine")
        self._pending = 0
        self._flags: dict[int, set[threading.Event]] = defaultdict(set)

    async def evaluate(self, call: Call) -> list[Any]:
        name = call.signature.function
        handler, procedure = HANDLERS.get(name), PROCEDURES.get(name)
        if handler is None and procedure is None:
            raise NotSupported(f"pgml.{name}() is not implemented by this pgml-proxy yet")
        if self._pending >= self.config.max_queue:
            raise Overloaded(
                "too many pgml engine calls are waiting", hint="Retry later, or raise [engine] max_queue / workers."
            )
        flag = threading.Event()
        self._flags[call.session].add(flag)
        self._pending += 1
        loop = asyncio.get_running_loop()
        try:
            if procedure is not None:
                function, limit = procedure
                ctx = text.Context(
                    self.config, self.cache, flag, call.db,
                    lambda fn: loop.run_in_executor(self._pool, self._work, fn, flag), call.database, call.notices,
                )  # fmt: skip
                return await self._limited(function(call, ctx), flag, limit)
            assert handler is not None
            ctx = text.Context(self.config, self.cache, flag)
            future = loop.run_in_executor(self._pool, self._run, handler, list(call.rows), ctx)
            return await self._limited(future, flag, True)
        finally:
            self._pending -= 1
            self._flags[call.session].discard(flag)
            if not self._flags[call.session]:
                del self._flags[call.session]

    async def _limited(self, work: Awaitable[list[Any]], flag: threading.Event, limit: bool) -> list[Any]:
        """Await ``work`` within call_timeout (when ``limit``); a timeout or cancel stops the worker."""
        try:
            async with asyncio.timeout(self.config.call_timeout if limit else None):
                return await work
        except TimeoutError:
            flag.set()
            raise Canceled(
                f"canceling statement due to the pgml engine time limit ({self.config.call_timeout:g} s)",
                hint="Raise [engine] call_timeout for long batches.",
            ) from None
        except asyncio.CancelledError:
            flag.set()  # the worker stops at its next check; the session is going away or was canceled
            raise
        except (EngineError, DatabaseError):
            raise
        except Exception as exc:  # a fault in a procedure is the statement's error, not the connection's
            log.exception("engine procedure failed")
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _run(handler: Handler, rows: list[tuple[Any, ...]], ctx: text.Context) -> list[Any]:
        ctx.check()
        try:
            return handler(rows, ctx)
        except EngineError:
            raise
        except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
            log.exception("engine handler failed")
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _work(fn: Callable[[], Any], flag: threading.Event) -> Any:
        if flag.is_set():
            raise Canceled("canceling statement due to user request")
        try:
            return fn()
        except EngineError:
            raise
        except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
            log.exception("engine work failed")
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    async def stream(self, call: Call) -> AsyncIterator[list[str]]:
        """Fragments of one generation, produced in a worker thread and handed over through a queue."""
        transform = _transform()
        flag = threading.Event()
        self._flags[call.session].add(flag)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ctx = text.Context(self.config, self.cache, flag)
        task, args, inputs, _cache = call.rows[0]

        def produce() -> None:
            try:
                for fragment in transform.stream(task, args or {}, inputs, ctx):
                    if flag.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, fragment)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        loop.run_in_executor(self._pool, produce)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineError(f"{type(item).__name__}: {item}") from item
                yield item
            if flag.is_set():
                raise Canceled("canceling statement due to user request")
        finally:
            flag.set()  # the worker stops at its next fragment
            self._flags[call.session].discard(flag)
            if not self._flags[call.session]:
                del self._flags[call.session]

    def cancel(self, session: int) -> None:
        for flag in self._flags.get(session, ()):
            flag.set()

    async def close(self) -> None:
        for flags in self._flags.values():
            for flag in flags:
                flag.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
