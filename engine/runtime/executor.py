"""The engine: one handler table, calls run in worker threads, compute shared fairly, cancels.

Owns: :data:`HANDLERS` (every evaluated ``pgml.*`` function -> how it runs: a :class:`Worker` in a worker
thread under a compute turn, or a :class:`Procedure` on the event loop with the client's session; with an
:class:`~engine.runtime.context.Offload` (the Ray backend) the workers it names run there, and procedures'
model work goes to it through their context), admission (at most ``max_queue`` calls), the worker threads,
per-session cancel flags, the time limit, the shared model cache, the :class:`~engine.api.EngineStats` it
reports, and what an engine failure writes to the log (its type, SQLSTATE, function and model at error level;
the traceback, which may quote client data, at debug only).

Must not: be imported by the proxy except by its composition root (``proxy.cli`` builds the engine),
run model code on the event loop, or log arguments or exception texts at info and above.

Scheduling: every admitted call gets a thread of its own, so a short call never waits for a thread
behind a long one; compute is gated by ``workers`` turns (``engine.runtime.turns``). A cancel
(CancelRequest, disconnect, Terminate, time limit) wakes a waiting job and stops a running one at
its next checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from engine.api import (
    CANCELED,
    Call,
    Canceled,
    DatabaseError,
    EngineConfig,
    EngineError,
    EngineStats,
    NotSupported,
    Observer,
    Overloaded,
)
from engine.ml import deploy, dump, metric_functions, predict, train
from engine.ml.datasets import load
from engine.nlp import chunk, embed, rank, stream, transform
from engine.nlp.finetune import tune, tuned
from engine.runtime import environment, library_warnings, memory
from engine.runtime.cache import ModelCache
from engine.runtime.context import Context, Offload
from engine.runtime.locate import configure_offline
from engine.runtime.threads import limited
from engine.runtime.turns import Job, Turns

log = logging.getLogger(__name__)
_END = object()  # the end of a stream
_PAUSED = object()  # a stream's worker made STREAM_AHEAD fragments and stopped until they are read
# Fragments one run of a stream's worker makes before it stops and waits for the reader: with the proxy's own
# bounded buffer, what an unread cursor holds stays small, whatever its max_new_tokens.
STREAM_AHEAD = 32
PGML_API_LEVEL = "2.10.0"


@dataclass(frozen=True)
class Worker:
    """Runs in a worker thread under a compute turn, within ``call_timeout``: argument rows -> one result each."""

    run: Callable[[list[tuple[Any, ...]], Context], list[Any]]


@dataclass(frozen=True)
class Procedure:
    """Runs on the event loop with the client's session (model work through ``Context.work``)."""

    run: Callable[[Call, Context], Awaitable[list[Any]]]
    limited: bool  # bounded by call_timeout (training is not)


def pgml_version(rows: list[tuple[Any, ...]], ctx: Context) -> list[str]:
    try:
        own = version("pgml-proxy")
    except PackageNotFoundError:  # running from a source tree
        own = "dev"
    return [f"{PGML_API_LEVEL} (pgml-proxy {own})" for _ in rows]


# Every function of engine.api.CATALOGUE, once (tests/test_catalogue.py checks that they agree).
HANDLERS: dict[str, Worker | Procedure] = {
    "version": Worker(pgml_version),
    "embed": Worker(embed.embed),
    "chunk": Worker(chunk.chunk),
    "rank": Worker(rank.rank),
    "transform_stream": Worker(stream.stream_all),  # inside a larger statement: every fragment, as rows
    "transform": Procedure(transform.transform, limited=True),
    "generate": Procedure(tuned.generate, limited=True),
    "tune": Procedure(tune.tune, limited=False),
    "train": Procedure(train.train, limited=False),
    "train_joint": Procedure(train.train, limited=False),
    "snapshot": Procedure(train.snapshot, limited=False),
    "deploy": Procedure(deploy.deploy, limited=True),
    "load_dataset": Procedure(load.load_dataset, limited=False),
    **{name: Procedure(predict.predict, limited=True) for name in predict.FUNCTIONS},
    "python_version": Worker(environment.python_version),
    "python_package_version": Worker(environment.python_package_version),
    "python_pip_freeze": Worker(environment.python_pip_freeze),
    "validate_python_dependencies": Worker(environment.validate_python_dependencies),
    "validate_shared_library": Worker(environment.validate_shared_library),
    "xgboost_version": Worker(environment.xgboost_version),
    "clear_gpu_cache": Worker(memory.clear_gpu_cache),
    "sklearn_f1_score": Worker(metric_functions.sklearn_f1_score),
    "sklearn_r2_score": Worker(metric_functions.sklearn_r2_score),
    "sklearn_regression_metrics": Worker(metric_functions.sklearn_regression_metrics),
    "sklearn_classification_metrics": Worker(metric_functions.sklearn_classification_metrics),
    "dump_all": Procedure(dump.dump_all, limited=False),
    "load_all": Procedure(dump.load_all, limited=False),
}


# --------------------------------------------------------------------------- #
# Logging engine failures without client data
# --------------------------------------------------------------------------- #

_MODEL_PARAMS = ("transformer", "model_name", "project_name", "model_id")


def _model_name(call: Call) -> str | None:
    """The model (or project) a call names, when it is a plain argument of its first row."""
    if not call.rows:
        return None
    row = call.rows[0]
    for param, value in zip(call.signature.params, row, strict=False):
        if param.name == "task" and isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if param.name == "task" and isinstance(value, dict):
            value = value.get("model")
        elif param.name not in _MODEL_PARAMS:
            continue
        if isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def log_failure(what: str, call: Call | None, exc: BaseException) -> None:
    """An unexpected engine failure: type, SQLSTATE, function and model at error; the traceback at debug."""
    sqlstate = exc.sqlstate if isinstance(exc, EngineError) else EngineError.sqlstate
    function = f"pgml.{call.signature.function}" if call is not None else "pgml engine"
    model = _model_name(call) if call is not None else None
    log.error(
        "%s %s failed: %s (SQLSTATE %s)%s", function, what, type(exc).__name__, sqlstate,
        f", model {model!r}" if model else "",
    )  # fmt: skip
    log.debug("%s %s failed", function, what, exc_info=exc)


def as_engine_error(what: str, call: Call | None, exc: BaseException) -> EngineError:
    """A fault inside the ML library is the statement's error (the client sees the message), not ours."""
    log_failure(what, call, exc)
    return EngineError(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #


class LocalEngine:
    """Evaluates calls with in-process models (or the offload's); one instance per proxy process."""

    def __init__(self, config: EngineConfig, observer: Observer | None = None, offload: Offload | None = None) -> None:
        configure_offline(config.allow_downloads)
        library_warnings.install()
        self.config = config
        self.offload = offload
        self.cache = ModelCache(config.cache_bytes, observer.loaded if observer is not None else None)
        # A thread for every admitted call (running or waiting for a turn), a turn per worker.
        self._pool = ThreadPoolExecutor(max_workers=config.workers + config.max_queue, thread_name_prefix="pgml-engine")
        self._turns = Turns(config.workers, observer.waited if observer is not None else None)
        self._pending = 0
        self._flags: dict[int, set[Job]] = defaultdict(set)

    def _admit(self, session: int) -> Job:
        if self._pending >= self.config.max_queue:
            raise Overloaded(
                "too many pgml engine calls are waiting", hint="Retry later, or raise [engine] max_queue / workers."
            )
        job = Job(self._turns, session)
        self._flags[session].add(job)
        self._pending += 1
        return job

    def _forget(self, job: Job) -> None:
        self._ran()
        self._unflag(job)

    def _ran(self) -> None:
        self._pending -= 1

    def _in_worker(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in a worker thread, not waiting for it (nothing, once the engine is closed)."""
        with contextlib.suppress(RuntimeError):  # the pool was shut down: the process is ending
            self._pool.submit(fn)

    def _unflag(self, job: Job) -> None:
        """``job`` can no longer be canceled: its call is over."""
        self._flags[job.session].discard(job)
        if not self._flags[job.session]:
            del self._flags[job.session]

    async def evaluate(self, call: Call) -> list[Any]:
        name = call.signature.function
        handler = HANDLERS.get(name)
        if handler is None:
            raise NotSupported(f"pgml.{name}() is not implemented by this pgml-proxy yet")
        job = self._admit(call.session)
        loop = asyncio.get_running_loop()
        try:
            if isinstance(handler, Procedure):
                ctx = Context(
                    self.config, self.cache, job, call.db,
                    lambda fn: loop.run_in_executor(self._pool, self._work, fn, job, call), call.database,
                    call.notices, self.offload, call.inform, call.settings,
                )  # fmt: skip
                return await self._limited(handler.run(call, ctx), job, handler.limited, call)
            if self.offload is not None and name in self.offload.workers - self.offload.everywhere:
                offloaded = self.offload.run(name, call.rows, job, call.notices, call.settings)
                return await self._limited(offloaded, job, True, call)
            ctx = Context(
                self.config, self.cache, job, notices=call.notices, inform=call.inform, settings=call.settings
            )
            future = loop.run_in_executor(self._pool, self._run, handler, list(call.rows), ctx, job, call)
            result = await self._limited(future, job, True, call)
            if self.offload is not None and name in self.offload.everywhere:  # and where the offload runs it
                everywhere = self.offload.run(name, call.rows, job, call.notices, call.settings)
                await self._limited(everywhere, job, True, call)
            return result
        finally:
            self._forget(job)

    async def _limited(self, work: Awaitable[list[Any]], job: Job, limit: bool, call: Call) -> list[Any]:
        """Await ``work`` within call_timeout (when ``limit``); a timeout or cancel stops the worker."""
        try:
            async with asyncio.timeout(self.config.call_timeout if limit else None):
                return await work
        except TimeoutError:
            job.set()
            raise Canceled(
                f"canceling statement due to the pgml engine time limit ({self.config.call_timeout:g} s)",
                hint="Raise [engine] call_timeout for long batches.",
            ) from None
        except asyncio.CancelledError:
            job.set()  # the worker stops at its next check; the session is going away or was canceled
            raise
        except (EngineError, DatabaseError):
            raise
        except Exception as exc:  # a fault in a procedure is the statement's error, not the connection's
            raise as_engine_error("procedure", call, exc) from exc

    def _run(self, handler: Worker, rows: list[tuple[Any, ...]], ctx: Context, job: Job, call: Call) -> list[Any]:
        with self._turns.held(job), limited(call.settings, call.signature.function):
            try:
                ctx.check()
                return handler.run(rows, ctx)
            except EngineError:
                raise
            except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
                raise as_engine_error("handler", call, exc) from exc

    def _work(self, fn: Callable[[], Any], job: Job, call: Call) -> Any:
        if job.canceled():
            raise Canceled(CANCELED)
        with self._turns.held(job), limited(call.settings, call.signature.function):
            try:
                return fn()
            except EngineError:
                raise
            except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
                raise as_engine_error("work", call, exc) from exc

    async def stream(self, call: Call) -> AsyncIterator[list[str]]:
        """Fragments of one generation, produced in engine workers and handed over through a queue.

        A worker produces at most ``STREAM_AHEAD`` fragments the reader has not asked for, then stops
        (``_PAUSED``), giving back its thread, its compute turn and its place in ``max_queue``; the reader
        starts the next run once it has read them. A cursor nobody reads holds none of those, and no growing
        queue (the generation's own thread waits in its bounded streamer, ``engine.nlp.stream``). With an
        offload that streams, the fragments come from there (:meth:`_offloaded`).
        """
        if self.offload is not None and "transform_stream" in self.offload.workers:
            async for fragment in self._offloaded(call, self.offload):
                yield fragment
            return
        job = self._admit(call.session)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ctx = Context(self.config, self.cache, job, notices=call.notices, settings=call.settings)
        task, args, inputs, _cache = call.rows[0]
        fragments = stream.stream(task, args or {}, inputs, ctx)  # a generator: nothing runs before next()

        def produce() -> None:
            """One run: up to STREAM_AHEAD fragments, then _PAUSED — or _END, an error, or (canceled) closed."""
            try:
                with self._turns.held(job), limited(call.settings, call.signature.function):
                    item: Any = _PAUSED
                    for _ in range(STREAM_AHEAD):
                        if job.is_set():  # canceled, or the reader is gone (also a checkpoint between fragments)
                            item = _END
                            break
                        item = next(fragments, _END)
                        if item is _END:
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                        item = _PAUSED
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        closing = threading.Lock()

        def close() -> None:  # in a worker: stops the generation's thread and joins it (once, whoever asks)
            with closing:
                fragments.close()

        def ended(_: object) -> None:  # a run ended: its place in max_queue is free
            self._ran()
            if job.canceled():
                self._in_worker(close)

        def run() -> asyncio.Future[None]:
            future = loop.run_in_executor(self._pool, produce)
            future.add_done_callback(ended)
            return future

        try:
            running = run()
        except BaseException:
            self._forget(job)
            raise
        try:
            while (item := await queue.get()) is not _END:
                if item is _PAUSED:  # everything the last run made was read, and the reader wants more
                    self._pending += 1
                    running = run()
                    continue
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise as_engine_error("stream", call, item) from item
                yield item
            if job.canceled():
                raise Canceled(CANCELED)
        finally:
            job.set()  # a running worker stops at its next fragment; its end closes the generation
            self._unflag(job)
            if running.done():  # paused: no worker holds the generation
                self._in_worker(close)

    async def _offloaded(self, call: Call, offload: Offload) -> AsyncIterator[list[str]]:
        """A stream made by the offload: admitted like any call, cancelable through its flag; it holds no
        thread, turn or place in ``max_queue`` here meanwhile (the offload bounds what runs ahead)."""
        job = self._admit(call.session)
        self._ran()
        try:
            async for fragment in offload.stream(tuple(call.rows[0]), job, call.notices, call.settings):
                yield fragment
            if job.canceled():
                raise Canceled(CANCELED)
        finally:
            job.set()
            self._unflag(job)

    def stats(self) -> EngineStats:
        actors = self.offload.actors() if self.offload is not None else None
        return EngineStats(self._pending, len(self._turns.waiting), self.cache.bytes(), len(self.cache), actors)

    def cancel(self, session: int) -> None:
        for job in list(self._flags.get(session, ())):
            self._stop(job)

    def _stop(self, job: Job) -> None:
        job.set()
        if self.offload is not None:
            self.offload.cancel(job)

    async def close(self) -> None:
        for jobs in list(self._flags.values()):
            for job in list(jobs):
                self._stop(job)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.offload is not None:
            await self.offload.close()
