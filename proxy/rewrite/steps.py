"""What rewriting asks of the client's session, and the one driver that answers it.

Owns: the requests a rewrite yields — :class:`Run` statements on the client's session,
:class:`Settle` until every answer owed has arrived, :class:`Look` at the session's
:class:`Facts`, :class:`Evaluate` a batch of engine calls, :class:`Compute` CPU-heavy work off
the event loop, :class:`Begin` a Run without waiting and :class:`Wait` for it (the next part of a
stream is read while the rows before it are computed), :class:`Emit` answer frames to the client —
and :func:`drive`, which answers them against a
:class:`~proxy.session.exchange.Port` and the engine and resumes the rewrite with each answer, or
with the exception that answering raised (thrown in where the request was yielded, so the rewrite
handles :class:`~proxy.session.exchange.UpstreamError` as if it had awaited the call itself);
:func:`replay` runs one from answers given at once (recorded ones, in tests); and an engine call's live channel
(:class:`Live`: its INFO and NOTICE messages, sent from worker threads, written to the client on the loop).

Must not: decide anything. Decision code (:mod:`proxy.rewrite.decide` and the modules it uses)
yields these requests and is resumed with their answers; it never calls the Port nor awaits, so a
decision runs from recorded answers in tests, the way psycopg 3's generators run without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.api import CANCELED, Call, Canceled, Engine, SessionSettings, Signature
from proxy.session.exchange import Port, Statement

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Facts:
    """What a rewrite may know of the client's session at one moment (answer to Look and Settle)."""

    session_id: int
    database: str
    tx_status: str  # of the last ReadyForQuery: "I", "T" or "E"
    in_transaction: bool  # inside BEGIN or an extended-protocol batch: what runs now commits with the client's work
    standard_strings: bool
    client_encoding: str
    search_path: str | None = '"$user", public'  # the session's (None: unknown; :mod:`proxy.session.search_path`)
    path_epoch: int = 0  # changes whenever search_path does or is forgotten
    user: str = ""  # the login user (``$user`` on the path)
    path_set_in_block: bool = False  # a statement that may change search_path ran in the open transaction block
    path_before_block: str | None = None  # the search_path when the session was last idle (None: unknown)


@dataclass(frozen=True, slots=True)
class Run:
    """Run ``statements`` as one internal exchange on the client's session; answered with their Results.

    ``keep_open`` / ``finish`` / ``quiet``: as :meth:`proxy.session.exchange.Port.execute`. ``temp_tables``: session
    temp tables these statements create, for the session to drop once the client's statement has run.
    """

    statements: tuple[Statement, ...]
    keep_open: bool = False
    finish: bool = False
    temp_tables: tuple[str, ...] = ()
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class Settle:
    """Wait until every ReadyForQuery owed has arrived; answered with the Facts then."""


@dataclass(frozen=True, slots=True)
class Look:
    """The session's Facts now."""


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Evaluate one overload for each argument tuple of ``rows`` in the engine; answered with the results.

    The call runs for the client's session: it is cancelled with it, and reads and writes tables through it.
    """

    signature: Signature
    rows: Sequence[tuple[Any, ...]]  # a tuple of tuples, or an engine.api.Columns batch
    settings: SessionSettings | None = None  # the session's pgml.* settings (proxy.rewrite.pgml_settings)
    # The engine severities the session's client_min_messages silences, as read with the settings (None: not read;
    # the startup packet's level, Port.silenced, applies).
    silenced: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Compute:
    """``function()``, in a worker thread (pure CPU work on a large input: other sessions are not stalled)."""

    function: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Begin:
    """Start ``run`` and answer at once with a handle for :class:`Wait` (the session runs exchanges one at a
    time: an engine query in between waits for it)."""

    run: Run


@dataclass(frozen=True, slots=True)
class Wait:
    """The Results of a :class:`Begin`'s run (its failure, raised here)."""

    handle: Any


@dataclass(frozen=True, slots=True)
class Emit:
    """Write these frames to the client now: answers of its own statement that the proxy computed."""

    frames: bytes


Request = Run | Settle | Look | Evaluate | Compute | Begin | Wait | Emit
# A rewrite step: yields requests, is sent each one's answer, returns its outcome.
Steps = Generator[Request, Any, T]
LOOK, SETTLE = Look(), Settle()


def run(*sql: str) -> Run:
    """A Run of plain statements (no parameters, no COPY data)."""
    return Run(tuple(Statement(text) for text in sql))


def off_loop(long: bool, function: Callable[[], T]) -> Steps[T]:
    """``function()``: in a worker thread when the input is ``long``, else here."""
    if long:
        result: T = yield Compute(function)
        return result
    return function()


async def drive(steps: Steps[T], port: Port, engine: Engine | None) -> T:
    """Run ``steps`` to its end, answering each request on ``port`` and ``engine``; returns its outcome.

    An exception raised while answering is thrown into ``steps`` at its ``yield``; one ``steps`` does not
    catch comes out of here. Cancelled, ``steps`` is closed (its ``finally`` blocks run).
    """
    reply: Any = None
    failure: Exception | None = None
    try:
        while True:
            ended, value = _resume(steps, reply, failure)
            if ended:
                outcome: T = value
                return outcome
            reply, failure = None, None
            try:
                reply = await _answer(value, port, engine)
            except Exception as exc:  # the rewrite's to handle, as if it had awaited the call itself
                failure = exc
    finally:
        steps.close()


def replay(steps: Steps[T], answer: Callable[[Request], Any]) -> T:
    """Run ``steps`` to its end with ``answer(request)`` for each request, at once: recorded answers, no
    session (how the tests run decisions). What ``answer`` raises is thrown into ``steps``, as in :func:`drive`.
    """
    reply: Any = None
    failure: Exception | None = None
    while True:
        ended, value = _resume(steps, reply, failure)
        if ended:
            outcome: T = value
            return outcome
        reply, failure = None, None
        try:
            reply = answer(value)
        except Exception as exc:  # the rewrite's to handle, as in drive()
            failure = exc


def _resume(steps: Steps[Any], reply: Any, failure: Exception | None) -> tuple[bool, Any]:
    """Resume ``steps`` with ``reply`` (or throw ``failure`` in at its ``yield``): ``(True, outcome)`` once it
    ended, else ``(False, next request)`` — the one step :func:`drive` and :func:`replay` both take."""
    try:
        return False, (steps.send(reply) if failure is None else steps.throw(failure))
    except StopIteration as done:
        return True, done.value


async def _answer(request: Request, port: Port, engine: Engine | None) -> Any:
    match request:
        case Run(statements=statements, keep_open=keep_open, finish=finish, temp_tables=tables, quiet=quiet):
            port.temp_tables.extend(tables)
            return await port.execute(list(statements), keep_open=keep_open, finish=finish, quiet=quiet)
        case Look():
            return facts(port)
        case Settle():
            await port.settled()
            return facts(port)
        case Evaluate(signature=signature, rows=rows, settings=settings, silenced=silenced):
            assert engine is not None
            if port.canceled:
                raise Canceled(CANCELED)
            silenced = port.silenced if silenced is None else silenced
            live = Live(port, silenced)
            warnings: list[str] = []
            call = Call(
                signature,
                rows,
                session=port.session_id,
                db=port,
                inform=live.inform,
                database=port.database,
                notices=warnings,
                settings=settings,
            )
            try:
                return await engine.evaluate(call)
            finally:
                live.close()
                if "WARNING" not in silenced:  # each once per statement, as the engine says each once per call
                    port.notices.extend(w for w in dict.fromkeys(warnings) if w not in port.notices)
        case Compute(function=function):
            return await asyncio.to_thread(function)
        case Begin(run=run):
            begun = asyncio.ensure_future(_answer(run, port, engine))
            begun.add_done_callback(_retrieved)
            return begun
        case Wait(handle=handle):
            return await handle
        case Emit(frames=frames):
            port.emit(frames)
            return None
    raise TypeError(f"not a rewrite request: {request!r}")


def _retrieved(begun: asyncio.Future[Any]) -> None:
    """A begun run's failure counts as seen: its :class:`Wait` raises it; a rewrite that ended first (the session
    closed, the client went away) never waits, and asyncio would log it, with a traceback, at ERROR."""
    if not begun.cancelled() and (failure := begun.exception()) is not None:
        log.debug("a begun exchange failed: %s", type(failure).__name__)


class Live:
    """The live channel of one engine call: what the engine tells the client while it runs (``Call.inform``, called
    from worker threads) goes to the event loop, which writes it as a NoticeResponse (``Port.notify``) between
    whole frames, before the call's result: the worker's message is queued on the loop ahead of its result. Once
    the call is over, a message a stopped worker still sends is dropped; one of a ``silenced`` severity (the
    session's client_min_messages) is never sent."""

    __slots__ = ("_loop", "_open", "_port", "_silenced")

    def __init__(self, port: Port, silenced: frozenset[str] = frozenset()) -> None:
        self._port = port
        self._silenced = silenced
        self._loop = asyncio.get_running_loop()
        self._open = True

    def inform(self, severity: str, message: str) -> None:
        """Thread-safe: ``message`` of ``severity`` (INFO, NOTICE) to the client as soon as the loop runs (nothing
        once the loop is closed: the proxy is ending, and the message must not fail the worker's call)."""
        if severity in self._silenced:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._write, severity, message)

    def _write(self, severity: str, message: str) -> None:
        if self._open:
            self._port.notify(severity, message)

    def close(self) -> None:
        self._open = False


def facts(port: Port) -> Facts:
    return Facts(
        session_id=port.session_id,
        database=port.database,
        tx_status=port.tx_status,
        in_transaction=port.in_transaction,
        standard_strings=port.standard_strings,
        client_encoding=port.client_encoding,
        search_path=port.search_path.value,
        path_epoch=port.search_path.epoch,
        user=port.search_path.user,
        path_set_in_block=port.search_path.changed_in_block,
        path_before_block=port.search_path.at_idle,
    )
