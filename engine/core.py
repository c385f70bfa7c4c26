"""The local engine: runs handlers in worker threads, shares compute fairly between sessions, cancels.

Owns: the handler table (function name -> handler), the worker threads and the
compute turns they take (:class:`Turns`), per-session cancel flags (:class:`Job`),
the shared model cache, and what an engine failure writes to the log (its type,
SQLSTATE, function and model at error level; the traceback, which may quote
client data, at debug only).

Must not: be imported by the proxy directly (``engine.api.create_engine`` does it),
run model code on the event loop, or log arguments or exception texts at info and above.

Scheduling: every admitted call (at most ``max_queue``) gets a thread of its own, so
a short call never waits for a thread behind a long one; compute is gated by
``workers`` turns, handed out first come, first served. Each cancel check a running
job makes (``Context.check()`` between mini-batches, ``ctx.cancelled.is_set()`` as
training and generation poll it) is also a checkpoint: when a job of another session
waits for a turn, the running job hands its turn over and queues again. A single
constant call therefore waits for about one mini-batch of someone else's large batch,
not the whole batch; a cancel (CancelRequest, disconnect, Terminate, time limit) wakes
a waiting job and stops a running one at its next checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from engine import deploy, inference, text, training, tuning
from engine.api import Call, Canceled, DatabaseError, EngineError, NotSupported, Overloaded
from engine.models import ModelCache, configure_offline

if TYPE_CHECKING:
    from proxy.config import EngineSection

log = logging.getLogger(__name__)
_END = object()  # the end of a stream
CANCELED = "canceling statement due to user request"
# A job keeps a turn at least this long before a checkpoint hands it on: the checks a call makes right
# after it got its turn (before any work) must not bounce the turn straight back.
QUANTUM = 0.02

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


# --------------------------------------------------------------------------- #
# Fair compute turns
# --------------------------------------------------------------------------- #


class Job(threading.Event):
    """One engine call's cancel flag (``ctx.cancelled``), and its place in the :class:`Turns`.

    ``is_set()`` keeps its meaning (has the call been canceled?); called from a worker
    thread of the job, it is also a checkpoint: the job may hand its turn to another
    session's job and wait for the next one first. On the event loop it only reads the flag.
    """

    def __init__(self, turns: Turns, session: int) -> None:
        super().__init__()
        self.turns = turns
        self.session = session
        self.holding = False  # has a turn (guarded by turns.lock)
        self.since = 0.0  # when it got the turn
        self.queued = False  # is in turns.waiting
        self.users = 0  # threads between acquire() and release()
        self._loop_thread = threading.get_ident()

    def is_set(self) -> bool:
        if super().is_set():
            return True
        if self.turns.waiting and threading.get_ident() != self._loop_thread:  # cheap when nobody waits
            self.turns.checkpoint(self)
            return super().is_set()
        return False

    def set(self) -> None:
        super().set()
        self.turns.wake()  # a job waiting for a turn gives up now

    def canceled(self) -> bool:
        """The flag alone (never a checkpoint)."""
        return super().is_set()


class Turns:
    """``permits`` compute turns shared by every session's jobs: first come, first served, and at a
    checkpoint the running job yields to the longest-waiting job of another session."""

    def __init__(self, permits: int) -> None:
        self.lock = threading.Condition(threading.Lock())
        self._free = permits
        self.waiting: deque[Job] = deque()

    def acquire(self, job: Job) -> None:
        """Take a turn for ``job`` (in its worker thread); raises Canceled if canceled while waiting."""
        with self.lock:
            job.users += 1
            if not self._take(job):
                job.users -= 1
                raise Canceled(CANCELED)

    def release(self, job: Job) -> None:
        with self.lock:
            job.users -= 1
            if job.users > 0:
                return
            if job.holding:
                job.holding = False
                self._pass_on()
            elif job.queued:
                self.waiting.remove(job)
                job.queued = False
            self.lock.notify_all()

    def checkpoint(self, job: Job) -> None:
        """Hand ``job``'s turn to another session's waiting job, then wait for the next turn."""
        if job.holding and time.monotonic() - job.since < QUANTUM:
            return
        with self.lock:
            if job.holding:
                other = next((w for w in self.waiting if w.session != job.session), None)
                if other is None:
                    return
                self.waiting.remove(other)
                other.queued, other.holding, other.since = False, True, time.monotonic()
                job.holding = False
                self.waiting.append(job)
                job.queued = True
                self.lock.notify_all()
            elif not job.queued:
                return  # not running under a turn (e.g. between a procedure's work items)
            self._wait(job)

    @contextmanager
    def aside(self, job: Job) -> Iterator[None]:
        """``job`` gives up its turn for the block (its thread waits for something else), then takes one again.

        Taking it again waits like :meth:`acquire`; Canceled if the job is canceled meanwhile.
        """
        with self.lock:
            had = job.holding
            if had:
                job.holding = False
                self._pass_on()
                self.lock.notify_all()
        try:
            yield
        finally:
            if had:
                with self.lock:
                    if not self._take(job):
                        raise Canceled(CANCELED)

    @contextmanager
    def held(self, job: Job) -> Iterator[None]:
        """A turn for ``job`` in this worker thread for the block; a model lock it waits for meanwhile
        makes it step :meth:`aside` (``engine.text.ModelLock``)."""
        self.acquire(job)
        text.step_aside_with(lambda: self.aside(job))
        try:
            yield
        finally:
            text.step_aside_with(None)
            self.release(job)

    def wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def _take(self, job: Job) -> bool:
        """Under the lock: a free turn for ``job``, else its place in the queue and the wait (see _wait)."""
        if job.holding:
            return True
        if not job.queued:
            if self._free > 0:  # nobody waits whenever a turn is free
                self._free -= 1
                job.holding, job.since = True, time.monotonic()
                return True
            self.waiting.append(job)
            job.queued = True
        return self._wait(job)

    def _wait(self, job: Job) -> bool:
        """Under the lock: until ``job`` holds a turn (True), or is canceled or done (False, out of the queue)."""
        while not job.holding:
            if job.canceled() or not job.queued:  # not queued: its last user released it (another thread waits)
                if job.queued:
                    self.waiting.remove(job)
                    job.queued = False
                return False
            self.lock.wait()
        return True

    def _pass_on(self) -> None:
        if self.waiting:
            nxt = self.waiting.popleft()
            nxt.queued, nxt.holding, nxt.since = False, True, time.monotonic()
        else:
            self._free += 1


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


def _as_engine_error(what: str, call: Call | None, exc: BaseException) -> EngineError:
    """A fault inside the ML library is the statement's error (the client sees the message), not ours."""
    log_failure(what, call, exc)
    return EngineError(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #


class LocalEngine:
    """Evaluates calls with in-process models; one instance per proxy process."""

    def __init__(self, config: EngineSection) -> None:
        configure_offline(config.allow_downloads)
        self.config = config
        self.cache = ModelCache(config.cache_bytes)
        # A thread for every admitted call (running or waiting for a turn), a turn per worker.
        self._pool = ThreadPoolExecutor(max_workers=config.workers + config.max_queue, thread_name_prefix="pgml-engine")
        self._turns = Turns(config.workers)
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
        self._pending -= 1
        self._flags[job.session].discard(job)
        if not self._flags[job.session]:
            del self._flags[job.session]

    async def evaluate(self, call: Call) -> list[Any]:
        name = call.signature.function
        handler, procedure = HANDLERS.get(name), PROCEDURES.get(name)
        if handler is None and procedure is None:
            raise NotSupported(f"pgml.{name}() is not implemented by this pgml-proxy yet")
        job = self._admit(call.session)
        loop = asyncio.get_running_loop()
        try:
            if procedure is not None:
                function, limit = procedure
                ctx = text.Context(
                    self.config, self.cache, job, call.db,
                    lambda fn: loop.run_in_executor(self._pool, self._work, fn, job, call), call.database,
                    call.notices,
                )  # fmt: skip
                return await self._limited(function(call, ctx), job, limit, call)
            assert handler is not None
            ctx = text.Context(self.config, self.cache, job, notices=call.notices)
            future = loop.run_in_executor(self._pool, self._run, handler, list(call.rows), ctx, job, call)
            return await self._limited(future, job, True, call)
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
            raise _as_engine_error("procedure", call, exc) from exc

    def _run(self, handler: Handler, rows: list[tuple[Any, ...]], ctx: text.Context, job: Job, call: Call) -> list[Any]:
        with self._turns.held(job):
            try:
                ctx.check()
                return handler(rows, ctx)
            except EngineError:
                raise
            except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
                raise _as_engine_error("handler", call, exc) from exc

    def _work(self, fn: Callable[[], Any], job: Job, call: Call) -> Any:
        if job.canceled():
            raise Canceled(CANCELED)
        with self._turns.held(job):
            try:
                return fn()
            except EngineError:
                raise
            except Exception as exc:  # a failure inside the ML library is the statement's error, not ours
                raise _as_engine_error("work", call, exc) from exc

    async def stream(self, call: Call) -> AsyncIterator[list[str]]:
        """Fragments of one generation, produced in a worker thread and handed over through a queue."""
        transform = _transform()
        job = self._admit(call.session)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ctx = text.Context(self.config, self.cache, job, notices=call.notices)
        task, args, inputs, _cache = call.rows[0]

        def produce() -> None:
            try:
                with self._turns.held(job):
                    for fragment in transform.stream(task, args or {}, inputs, ctx):
                        if job.is_set():  # also a checkpoint between fragments
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, fragment)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        try:
            running = loop.run_in_executor(self._pool, produce)
        except BaseException:
            self._forget(job)
            raise
        running.add_done_callback(lambda _: self._forget(job))  # admitted while the generation runs
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise _as_engine_error("stream", call, item) from item
                yield item
            if job.canceled():
                raise Canceled(CANCELED)
        finally:
            job.set()  # the worker stops at its next fragment

    def cancel(self, session: int) -> None:
        for job in list(self._flags.get(session, ())):
            job.set()

    async def close(self) -> None:
        for jobs in list(self._flags.values()):
            for job in list(jobs):
                job.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
