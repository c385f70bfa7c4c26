"""Fair compute turns: how the engine's worker threads share ``[engine] workers`` between sessions.

Owns: :class:`Job` (one call's cancel flag, and its place in the queue) and :class:`Turns` (the turns,
handed out first come, first served). Each cancel check a running job makes (``Context.check()``
between mini-batches, ``ctx.cancelled.is_set()`` as training and generation poll it) is also a
checkpoint: when a job of another session waits for a turn, the running job hands its turn over and
queues again. A single constant call therefore waits for about one mini-batch of someone else's large
batch, not the whole batch; a cancel wakes a waiting job and stops a running one at its next checkpoint.
A worker waiting for a model's lock steps aside from its turn meanwhile (``engine.runtime.context``).

Must not: run handlers or know about calls (``engine.runtime.executor`` does).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.api import CANCELED, Canceled
from engine.runtime import library_warnings
from engine.runtime.context import step_aside_with

# A job keeps a turn at least this long before a checkpoint hands it on: the checks a call makes right
# after it got its turn (before any work) must not bounce the turn straight back.
QUANTUM = 0.02


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

    def __init__(self, permits: int, waited: Callable[[float], None] | None = None) -> None:
        self.lock = threading.Condition(threading.Lock())
        self._free = permits
        self.waiting: deque[Job] = deque()
        self._waited = waited  # told how long each acquire() waited (engine.api.Observer.waited)

    def acquire(self, job: Job) -> None:
        """Take a turn for ``job`` (in its worker thread); raises Canceled if canceled while waiting."""
        start = time.monotonic()
        with self.lock:
            job.users += 1
            if not self._take(job):
                job.users -= 1
                raise Canceled(CANCELED)
        if self._waited is not None:
            self._waited(time.monotonic() - start)

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
        makes it step :meth:`aside` (``engine.runtime.context.ModelLock``); the library warnings it shows are the
        job's (``engine.runtime.library_warnings``)."""
        self.acquire(job)
        step_aside_with(lambda: self.aside(job))
        try:
            with library_warnings.running(job):
                yield
        finally:
            step_aside_with(None)
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
