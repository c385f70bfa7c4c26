"""The Ray backend (``[engine] backend = "ray"``): the engine's :class:`~engine.runtime.context.Offload` onto a
Ray cluster.

Owns: connecting to the cluster (:func:`connect`, before the event loop starts: ``[ray]`` address — a GCS
address, or ``ray://`` for Ray Client, which cannot stream (``transform_stream`` says so) — or a local instance
started in this process, whose token stays in this process's environment; the namespace), the named, detached
model actors (:class:`~engine.runtime.ray_host.ModelHost`; one name per model and load kwargs — per database, id
and creation time for a classical or tuned model — and replica; found or created with ``get_if_exists``, so every
proxy of the namespace shares one warm copy), sending rows to the actors of their models (embed, rank, transform,
generate: ``engine.runtime.ray_host.ROW_FUNCTIONS``; clear_gpu_cache to every actor this proxy uses), streaming
``transform_stream`` from its actor (a Ray generator, back-pressured at ``STREAM_AHEAD`` unread fragments),
running functions on hosted models (the predict family: the artifact read through the client's session by the
proxy, shipped through the object store only when the actor does not hold it yet), tasks of their own with the
configured resources (tune: the rows read by the proxy, shipped through the object store), fanning a training
search's fits out as parallel tasks, cancel (``ray.cancel`` of a call's actor calls, generators and tasks) and
what a dead worker gives (:class:`WorkerLost`; the next call gets a fresh actor).

Must not: block the event loop (object refs are awaited as futures; handles are made and large arguments put
into the object store in a thread), read or
write the database (procedures do that in the proxy), fork handler logic (the actors run the engine's own
functions), or log client data (keys are hashed into actor names).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from engine.api import (
    CANCELED,
    Canceled,
    Columns,
    EngineConfig,
    EngineError,
    InvalidArgument,
    NotSupported,
    Observer,
    RayConfig,
    SessionSettings,
    WorkerLost,
)
from engine.nlp.embed import INIT_KWARGS
from engine.nlp.json_args import kwargs_object
from engine.nlp.rank import RANK_INIT
from engine.runtime.context import Hosted
from engine.runtime.executor import STREAM_AHEAD, LocalEngine
from engine.runtime.ray_host import ROW_FUNCTIONS, ModelHost, Outcome, run_in_context, run_tasks

log = logging.getLogger(__name__)
# The kwargs of each offloaded worker function that construct its model (the rest go to the call).
MODEL_KWARGS = {"embed": INIT_KWARGS, "rank": RANK_INIT}
# What a call gets when the process holding its model or its task is gone.
_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
         ray.exceptions.NodeDiedError, ray.exceptions.OwnerDiedError)  # fmt: skip
LOST_HINT = "The next call starts a fresh one; see the Ray cluster's logs for why it died."
WAIT_STEP = 0.1  # seconds between cancel checks of a remote call or a training fan-out
# Seconds a canceled remote call has to end after ray.cancel before the session stops waiting for it (a task's
# worker is then killed; an actor call goes on to its next checkpoint, its result dropped).
CANCEL_GRACE = 5.0
RAY_CLIENT = "ray://"  # an address of Ray Client (the cluster's client server) rather than of its GCS
# Ray's token authentication (2.52+): the mode, the token itself, a file holding it, and its default file.
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


def connect(ray_config: RayConfig) -> None:
    """Connect this process to the ``[ray]`` cluster, or start a local instance (empty address: always a new one,
    never a ``ray start`` cluster of this machine nor RAY_ADDRESS, as Ray's own default would). Blocking (seconds):
    call it before the event loop starts — and not in a passing thread: a local instance's processes are
    tied to the thread that started them and end with it."""
    if not ray_config.address:
        _private_token()
    try:
        ray.init(
            address=ray_config.address or "local", namespace=ray_config.namespace, include_dashboard=False,
            log_to_driver=False, logging_level=logging.WARNING, ignore_reinit_error=True,
        )  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = ray_config.address or "a local instance"
        raise EngineError(f"cannot start the Ray backend ({where}): {exc}") from None


def _private_token() -> None:
    """Give the local instance about to start a token of its own, in this process's environment (its processes
    inherit it), unless token authentication is configured already or disabled.

    Ray 2.60 enables token authentication for an instance ``ray.init`` starts and, with no token configured,
    writes a new one to ``~/.ray/auth_token``. That file outlives the proxy and turns token authentication on for
    every later ``ray start`` on the machine, whose drivers (with an explicit address) then fail with
    InvalidAuthToken. A token in the environment keeps the instance protected without leaving that file behind.
    """
    if os.environ.get(AUTH_MODE, "token").lower() != "token":
        return
    if AUTH_TOKEN in os.environ or AUTH_TOKEN_PATH in os.environ or DEFAULT_TOKEN_FILE.expanduser().exists():
        return
    os.environ[AUTH_TOKEN] = secrets.token_hex(32)


def ray_engine(config: EngineConfig, ray_config: RayConfig, observer: Observer | None = None) -> LocalEngine:
    """The engine of ``backend = "ray"`` (after :func:`connect`): the local engine with its model work offloaded."""
    if not ray.is_initialized():
        raise EngineError("the Ray backend is not connected", hint="engine.runtime.ray_backend.connect comes first.")
    return LocalEngine(config, observer, RayOffload(config, ray_config))


def actor_name(key: str, replica: int) -> str:
    """The actor of model ``key`` (its kind, name and load kwargs): a hash, so no client data is in the name."""
    return f"pgml-{hashlib.sha256(key.encode()).hexdigest()[:32]}-{replica}"


def worker_key(name: str, row: tuple[Any, ...]) -> str:
    """The model a row of row function ``name`` needs: embed and rank, their model argument and the kwargs that
    construct it; transform and transform_stream, the task (the model and how it loads); generate, the tuned
    model's key."""
    if name == "generate":
        return json.dumps(["tuned", row[0]])
    if name not in MODEL_KWARGS:
        return json.dumps(["transform", row[0]], sort_keys=True, default=str)
    try:
        kwargs = kwargs_object(row[-1]) if row[-1] is not None else {}
    except InvalidArgument:
        kwargs = {}  # the handler gives the error, as the local engine does
    init = {k: v for k, v in kwargs.items() if k in MODEL_KWARGS[name]}
    return json.dumps([name, row[0], init], sort_keys=True, default=str)


class RayOffload:
    """Model work on a Ray cluster; one instance per proxy process (:func:`ray_engine`)."""

    workers = frozenset(ROW_FUNCTIONS)
    everywhere = frozenset({"clear_gpu_cache"})

    def __init__(self, config: EngineConfig, ray_config: RayConfig) -> None:
        self.config = config
        self.ray_config = ray_config
        self._host = ray.remote(ModelHost)
        self._task = ray.remote(run_tasks)
        self._job = ray.remote(run_in_context)
        self._handles: dict[str, Any] = {}
        self._replica = itertools.count()
        self._refs: dict[threading.Event, set[Any]] = defaultdict(set)

    # ----------------------------------------------------------------------- actors

    async def _actor(self, key: str) -> tuple[str, Any]:
        """A replica of ``key``'s actor (round-robin), created in the cluster when it does not exist."""
        name = actor_name(key, next(self._replica) % self.ray_config.replicas)
        handle = self._handles.get(name)
        if handle is None:
            options = self._host.options(
                name=name, lifetime="detached", get_if_exists=True, max_restarts=0,
                num_cpus=self.ray_config.num_cpus, num_gpus=self.ray_config.num_gpus,
            )  # fmt: skip
            handle = await asyncio.to_thread(options.remote, self.config)  # a GCS round trip
            self._handles[name] = handle
            log.debug("using model actor %s", name)
        return name, handle

    async def _result(self, name: str, ref: Any, cancelled: threading.Event) -> Outcome:
        """The outcome of an actor call or task: Canceled when canceled, WorkerLost when its worker died."""
        self._refs[cancelled].add(ref)
        try:
            _stop_if_canceled(ref, cancelled)
            with self._failures(name):
                return await _awaited(ref, cancelled, task=not name)
        except asyncio.CancelledError:  # time limit, or the session went away: stop the remote call too
            ray.cancel(ref)
            raise
        finally:
            self._forget(cancelled, ref)

    @contextlib.contextmanager
    def _failures(self, name: str) -> Iterator[None]:
        """A remote call's Ray failures as the engine's errors (``name``: its actor's; empty for a task)."""
        try:
            yield
        except ray.exceptions.TaskCancelledError:
            raise Canceled(CANCELED) from None
        except _LOST as exc:
            if not name:
                log.error("pgml engine: a Ray task's worker died: %s", type(exc).__name__)
                raise WorkerLost("the Ray worker of this task died", hint=LOST_HINT) from None
            self._handles.pop(name, None)
            log.error("pgml engine: the Ray model actor %s died: %s", name, type(exc).__name__)
            raise WorkerLost("the Ray worker holding this model died during the call", hint=LOST_HINT) from None

    def _forget(self, cancelled: threading.Event, ref: Any) -> None:
        refs = self._refs.get(cancelled)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self._refs[cancelled]

    # ----------------------------------------------------------------------- the Offload protocol

    async def run(self, name: str, rows: Sequence[tuple[Any, ...]], cancelled: threading.Event,
                  notices: list[str], settings: SessionSettings | None) -> list[Any]:  # fmt: skip
        if name in self.everywhere:
            return await self._everywhere(name, rows, cancelled)
        groups = _groups(name, rows)
        calls = (self._run_group(name, key, part, cancelled, settings) for key, (_, part) in groups.items())
        parts = await asyncio.gather(*calls)
        if len(groups) == 1:
            values, notes = parts[0]
            notices += notes
            return values  # type: ignore[no-any-return]
        out: list[Any] = [None] * len(rows)
        for (indices, _), (values, notes) in zip(groups.values(), parts, strict=True):
            notices += notes
            for i, value in zip(indices, values, strict=True):
                out[i] = value
        return out

    async def _run_group(self, name: str, key: str, rows: Sequence[tuple[Any, ...]], cancelled: threading.Event,
                         settings: SessionSettings | None) -> tuple[Any, list[str]]:  # fmt: skip
        actor_id, actor = await self._actor(key)
        return _unpack(await self._result(actor_id, actor.run.remote(name, rows, settings), cancelled))

    async def _everywhere(self, name: str, rows: Sequence[tuple[Any, ...]], cancelled: threading.Event) -> list[Any]:
        """``name`` on every model actor this proxy uses (an actor gone meanwhile has nothing to free)."""
        calls = [self._result(actor_id, actor.run.remote(name, rows, None), cancelled)
                 for actor_id, actor in list(self._handles.items())]  # fmt: skip
        values: list[Any] = [True] * len(rows)
        for got in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(got, BaseException) and not isinstance(got, WorkerLost):
                raise got
            if not isinstance(got, BaseException):
                values = [a and b for a, b in zip(values, _unpack(got)[0], strict=True)]
        return values

    async def stream(self, row: tuple[Any, ...], cancelled: threading.Event, notices: list[str],
                     settings: SessionSettings | None) -> AsyncIterator[list[str]]:  # fmt: skip
        if self.ray_config.address.startswith(RAY_CLIENT):
            raise NotSupported(
                'pgml.transform_stream cannot stream through Ray Client ([ray] address = "ray://…")',
                detail="Ray Client does not support Ray generators (streaming actor calls).",
                hint="Set [ray] address to the cluster's GCS address (host:6379) from a host that can reach the "
                "cluster's nodes, or use pgml.transform.",
            )
        task, args, inputs, _ = row
        name, actor = await self._actor(worker_key("transform_stream", row))
        method = actor.stream.options(num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD)
        generator = method.remote(task, args, inputs, settings)
        self._refs[cancelled].add(generator)
        try:
            _stop_if_canceled(generator, cancelled)
            with self._failures(name):
                async for ref in generator:
                    fragment, said = _unpack(await ref)
                    notices += said
                    yield fragment
        finally:  # ended, closed by the reader (or gone), canceled, failed: the generation stops there too
            ray.cancel(generator)
            self._forget(cancelled, generator)

    async def task(self, fn: Callable[..., Any], args: tuple[Any, ...], cancelled: threading.Event,
                   notices: list[str], settings: SessionSettings | None) -> Any:  # fmt: skip
        job = self._job.options(num_cpus=self.ray_config.num_cpus, num_gpus=self.ray_config.num_gpus, max_retries=0)
        stored = await asyncio.to_thread(_store, args)  # the rows: into the object store (serializing takes time)
        value, said = _unpack(await self._result("", job.remote(self.config, settings, fn, *stored), cancelled))
        notices += said
        return value

    def actors(self) -> int:
        return len(self._handles)

    async def on_model(self, hosted: Hosted, fn: Callable[..., Any], args: tuple[Any, ...],
                       cancelled: threading.Event) -> Any:  # fmt: skip
        name, actor = await self._actor(hosted.key)
        got = await self._result(name, actor.apply.remote(hosted.key, fn, args), cancelled)
        if got[0] == "missing":  # not loaded there yet: read here (the client's session), built there
            payload = await hosted.source()
            _unpack(await self._result(name, actor.load.remote(hosted.key, hosted.build, payload), cancelled))
            got = await self._result(name, actor.apply.remote(hosted.key, fn, args), cancelled)
        return _unpack(got)[0]  # functions on hosted models give no notices

    def fan_out(self, fn: Callable[..., Any], shared: tuple[Any, ...], items: list[tuple[Any, ...]],
                cancelled: Callable[[], bool], done: Callable[[int, Any], None]) -> list[Any]:  # fmt: skip
        task = self._task.options(num_cpus=self.ray_config.num_cpus, num_gpus=self.ray_config.num_gpus, max_retries=0)
        stored = _store(shared)  # once in the object store, whatever the number of tasks
        shares = self._shares(len(items))
        refs = [task.remote(fn, len(stored), *stored, [items[k] for k in share]) for share in shares]
        try:
            pending = refs
            with self._failures(""):
                while pending:
                    if cancelled():
                        raise Canceled(CANCELED)
                    _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_STEP)
                outcomes = ray.get(refs)
        except BaseException:
            for ref in refs:
                ray.cancel(ref)  # canceled, or one failed: the others stop too (nothing for finished ones)
            raise
        results: list[Any] = [None] * len(items)
        for share, outcome in zip(shares, outcomes, strict=True):
            for k, result in zip(share, _unpack(outcome)[0], strict=True):
                results[k] = result
        for k, result in enumerate(results):  # reported once all are in (they ran in parallel)
            done(k, result)
        return results

    def _shares(self, count: int) -> list[list[int]]:
        """The items of a fan-out, dealt round-robin into twice as many tasks as the cluster runs at once with the
        resources each asks for (a task costs the scheduler and a worker a round trip: a share of fits each keeps
        that off every fit, and dealing them out evens candidates of different cost)."""
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        needs = (("CPU", self.ray_config.num_cpus), ("GPU", self.ray_config.num_gpus))
        at_once = [resources.get(name, 0.0) / need for name, need in needs if need]
        return deal(count, int(min(at_once, default=1.0)))

    def cancel(self, cancelled: threading.Event) -> None:
        for ref in list(self._refs.get(cancelled, ())):
            ray.cancel(ref)

    async def close(self) -> None:
        for refs in list(self._refs.values()):
            for ref in list(refs):
                ray.cancel(ref)
        with contextlib.suppress(Exception):  # the cluster may be gone already
            await asyncio.to_thread(ray.shutdown)


async def _awaited(ref: Any, cancelled: threading.Event, task: bool) -> Outcome:
    """A remote call's outcome, or Canceled soon after ``cancelled`` is set: ``ray.cancel`` asks it to stop (a
    KeyboardInterrupt in a task, a CancelledError in an async actor's call), and a call that has not ended
    CANCEL_GRACE seconds later is no longer waited for (a task still importing its modules, or deep in native
    code, may not see the interrupt; its worker is killed) — a cancel never leaves the session hanging."""
    future = asyncio.wrap_future(ref.future())
    while not cancelled.is_set():
        done, _ = await asyncio.wait({future}, timeout=WAIT_STEP)
        if done:
            result: Outcome = future.result()
            return result
    ray.cancel(ref)  # (again: harmless; the cancel may have come before the call was made)
    done, _ = await asyncio.wait({future}, timeout=CANCEL_GRACE)
    if done:
        result = future.result()  # ended anyway, or raises TaskCancelledError: Canceled
        return result
    if task:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its late failure: seen, not logged
    log.warning("pgml engine: a canceled Ray %s did not stop within %g s", "task" if task else "call", CANCEL_GRACE)
    raise Canceled(CANCELED)


def _stop_if_canceled(ref: Any, cancelled: threading.Event) -> None:
    """A cancel that came while the call was being prepared (its rows stored, its actor found) found no remote call to
    stop: stop the one just made (a tune would otherwise run to its end, the client waiting for it)."""
    if cancelled.is_set():
        ray.cancel(ref)
        raise Canceled(CANCELED)


def deal(count: int, at_once: int) -> list[list[int]]:
    """``count`` items dealt round-robin into twice ``at_once`` shares (fewer when fewer items; none for none): a
    grid's items come fold by fold, candidate by candidate, so each share holds candidates from all over the grid
    (measured better balanced than a seeded shuffle: 1.62x against 1.57x of local for 8 candidates x 2 folds on 2
    workers, bench/ray_backend.py in one session).
    Nothing fitting at once (a cluster that scales up on demand, with no worker yet): one share per item, so that
    the autoscaler sees the demand."""
    if count <= 0:
        return []
    tasks = count if at_once <= 0 else min(count, 2 * at_once)
    return [list(range(start, count, tasks)) for start in range(tasks)]


def _groups(name: str, rows: Sequence[tuple[Any, ...]]) -> dict[str, tuple[Sequence[int], Sequence[tuple[Any, ...]]]]:
    """The rows of each model (row indices, rows); a batch whose model and kwargs are shared is one group as is."""
    if isinstance(rows, Columns) and rows.shared[0] and rows.shared[-1]:
        return {worker_key(name, rows[0]): (range(len(rows)), rows)} if len(rows) else {}
    indices: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        indices[worker_key(name, row)].append(i)
    if len(indices) == 1:
        return {key: (range(len(rows)), rows) for key in indices}
    return {key: (found, [rows[i] for i in found]) for key, found in indices.items()}


def _store(values: Sequence[Any]) -> list[Any]:
    """Each value put into the object store once (blocking: it serializes them); their refs."""
    return [ray.put(value) for value in values]


def _unpack(outcome: Outcome) -> tuple[Any, list[str]]:
    """A remote :data:`~engine.runtime.ray_host.Outcome` as (value, notices), or its engine error raised here."""
    if outcome[0] == "ok":
        return outcome[1], list(outcome[2])
    _, cls, message, detail, hint = outcome
    error = cls(message, detail=detail, hint=hint) if issubclass(cls, EngineError) else EngineError(message)
    raise error
