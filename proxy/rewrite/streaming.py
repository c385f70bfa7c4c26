"""Per-row calls computed on their statement's result stream, part by part, as the rows arrive.

Owns: :class:`Streamed`, one :class:`proxy.rewrite.outputs.Plan` run on the client's session — describing
the statement sent (the types of the hidden argument columns choose each call's overload, and the session's
``extra_float_digits`` how floats print), opening it as a row portal of the proxy's with the client's
columns in the client's result formats and the hidden ones in binary where the proxy reads that format
(numeric arrays straight into numpy), then reading it part by part as the client asks for rows: all of them
for a simple Query (:func:`run`), ``n`` at a time for each Execute of an extended-protocol portal the
proxy owns (:class:`Opener`, at the Bind). Parts are ``PART_ROWS`` rows first, growing, never more than the
Execute still wants; the next part is on its way while the engine computes this one
(:func:`proxy.rewrite.parts.part`: each distinct input once per statement, up to ``MEMO_LIMIT`` of them). The
client gets the server's RowDescription less
the hidden columns, its DataRows in order (each part's notices ahead of its rows, the calls' columns in
text or binary as asked), then PortalSuspended at an Execute's row limit or ``SELECT k`` — what the server
would send for the original statement; an error ends the rows (the server's, once the rows before it, or
the engine's). Work is proportional to the rows the client reads; memory to two parts.

Must not: touch the session or the engine itself — it yields :mod:`proxy.rewrite.steps` requests — or
decide which statements stream (:mod:`proxy.rewrite.outputs`), or compute a part itself (:mod:`proxy.rewrite.parts`).
"""

from __future__ import annotations

import logging
from typing import Any

from engine.pg import output
from engine.pg.binary import READABLE
from proxy.errors import ProtocolViolation, error_fields
from proxy.rewrite.constant import fold_strict
from proxy.rewrite.outputs import Plan
from proxy.rewrite.overloads import choose
from proxy.rewrite.parts import StreamCall, part
from proxy.rewrite.steps import Begin, Emit, Run, Steps, Wait
from proxy.session.exchange import ROWS_PORTAL, BatchFailed, Portion, Prepare, Rows, Statement, UpstreamError
from proxy.wire.messages import CommandComplete, ErrorResponse, PortalSuspended, RowDescription

# Rows of the first part: a model call's mini-batch (the engine batches within it), and many more for the cheap
# per-row math of the predict family (fewer round trips and engine jobs). Each later part doubles, up to
# GROWTH times the first: the first row comes after one small part, and large parts then let the model sort
# more texts by length (less padding) with fewer engine jobs; memory stays bounded by two parts.
PART_ROWS = 256
CHEAP = {"predict": 8192, "predict_proba": 8192, "predict_joint": 8192, "decompose": 8192}
GROWTH = 8
MOST_ROWS = 16384  # and never more rows than this in one part: the proxy's memory stays bounded by two parts
log = logging.getLogger(__name__)
PORTAL_SUSPENDED = PortalSuspended().encode()
_SETTING = Statement("SELECT pg_catalog.current_setting('extra_float_digits')")


class Streamed:
    """One streamed statement on the client's session: its row portal ``name`` on the server, read part by part as
    the client asks for rows — all of them for a simple Query, ``n`` at a time for an extended-protocol portal
    Executed with a row limit (what the server itself sends: the rows, then PortalSuspended at the limit or
    ``SELECT k``, k the rows of that Execute).

    ``formats``: the client's result format codes as its Bind gave them (none: text; one: for every column).
    """

    def __init__(self, plan: Plan, name: str = ROWS_PORTAL, formats: tuple[int, ...] = ()) -> None:
        self.plan = plan
        self.name = name
        self.formats = formats
        self.description = b""  # the RowDescription the client gets (the server's, less the hidden columns)
        self.done = False  # the client got the statement's CommandComplete
        self.closed = False  # the server's portal and statement are closed (or gone with their transaction)
        self._calls: list[StreamCall] = []
        self._digits = 1
        self._first = PART_ROWS
        self._limit = 0  # the size of the last part read (0: none yet)
        self._pending: Portion | None = None  # a part read when the portal opened, not yet sent
        self._total = 0

    def open(self, *, execute: bool) -> Steps[bool]:
        """Describe the statement sent (the hidden columns' types choose the overloads) and open the row portal;
        ``execute``: its first part is read too (a simple Query, whose rows follow at once). False: an overload's
        result type is not one the proxy prints (nothing was opened)."""
        plan = self.plan
        (described, setting) = yield Run((Prepare(plan.statement([None] * len(plan.outputs))), _SETTING))
        for out in plan.outputs:
            oids = [described.columns[h][1] for h in out.hidden]
            sig = choose(out.site, list(out.candidates), list(out.slots), list(out.given), oids)
            if sig.returns_set or sig.returns not in output.TYPES or (out.cast == "vector" and sig.returns != "real[]"):
                return False
            fixed = fold_strict(sig, list(out.slots), skip=set(out.given))
            self._calls.append(StreamCall(out, sig, fixed, oids, [oid in READABLE for oid in oids]))
        formats = [*_client_formats(self.formats, plan.visible), *[0] * (len(plan.targets) - plan.visible)]
        for call in self._calls:
            call.format = formats[call.output.column]
            for column, binary in zip(call.output.hidden, call.binary, strict=True):
                formats[column] = int(binary)
        self._digits = int(setting.rows[0][0])
        self._first = min(CHEAP.get(c.signature.function, PART_ROWS) for c in self._calls)
        limit = self._first if execute else 0
        self._limit = limit
        sql = plan.statement([call.signature.returns for call in self._calls])
        opening = Rows(sql, name=self.name, formats=tuple(formats), limit=limit, executes=execute)
        (portion,) = yield from _part_run(Run((opening,), keep_open=True, quiet=True))
        assert portion.description is not None
        self.description = RowDescription(portion.description.columns[: plan.visible]).encode()
        self._pending = portion if execute else None
        return True

    def execute(self, count: int, *, finish: bool = False) -> Steps[None]:
        """Send the client the next ``count`` rows (0: all the rest), computed part by part, the next part on its
        way while the engine computes this one; then PortalSuspended, or ``SELECT k`` and the portal closed
        (``finish``: that exchange ends with Sync, the end of the client's Query)."""
        count = max(count, 0)  # as the server reads a row limit: none but a positive one
        if self.done:  # as the server answers an Execute of a portal run to its end
            yield Emit(CommandComplete("SELECT 0").encode())
            return
        sent = 0
        portion = self._pending
        self._pending = None
        if portion is None:
            (portion,) = yield from _part_run(self._part_after(count, 0))
        while True:
            more = portion.suspended and (not count or sent + len(portion.block) < count)
            pending = (yield Begin(self._part_after(count, sent + len(portion.block)))) if more else None
            try:
                frames = yield from part(portion.block, self._calls, len(self.plan.targets), self.plan.visible,
                                         self._digits)  # fmt: skip
            except Exception as exc:
                if pending is not None:  # the next part's exchange ends before anything else runs on the session
                    yield from _settle(pending, exc)
                raise
            # The next part first: if the server failed in it, the client gets its error and not these rows (a
            # client drops the rows before an error anyway).
            following = (yield from _part_run(pending)) if pending is not None else None
            sent += len(portion.block)
            yield Emit(b"".join(portion.notices) + frames)  # the server's notices of the part, then its rows
            if following is None:
                break
            (portion,) = following
        self._total += sent
        if portion.suspended:  # at the client's row limit
            yield Emit(PORTAL_SUSPENDED)
            return
        self.done = True
        yield Emit(CommandComplete(f"SELECT {sent}").encode())
        self._log()
        yield from self.close(finish=finish)

    def abandon(self) -> str | None:
        """The client's portal is gone (closed, rebound, its transaction over): the server's row portal to close,
        with its statement (None: closed already)."""
        if self.closed:
            return None
        self.closed = True
        self._log()
        return self.name

    def close(self, *, finish: bool = False) -> Steps[None]:
        """Close the server's portal and its statement (``finish``: the exchange ends with Sync)."""
        if not self.closed:
            self.closed = True
            closing = Rows("", name=self.name, opens=False, executes=False, closes=True)
            yield Run((closing,), keep_open=not finish, finish=finish)

    def _log(self) -> None:
        for call in self._calls:  # counts only: never values
            log.debug(
                "streamed pgml.%s over %d rows: %d inputs computed", call.signature.function, self._total, call.computed
            )

    def _part_after(self, count: int, have: int) -> Run:
        """The exchange reading the next part: twice the last one, up to GROWTH times the first (and MOST_ROWS), no
        more rows than the client's Execute still wants."""
        self._limit = self._first if not self._limit else min(2 * self._limit, self._first * GROWTH, MOST_ROWS)
        limit = min(self._limit, count - have) if count else self._limit
        return Run((Rows("", name=self.name, limit=limit, opens=False),), keep_open=True, quiet=True)


class Opener:
    """At a Bind: the streamed statement's row portal opened for the client's portal to read (``streamed``)."""

    def __init__(self, name: str, formats: tuple[int, ...]) -> None:
        self.name = name
        self.formats = formats
        self.streamed: Streamed | None = None

    def __call__(self, plan: Plan, last: bool) -> Steps[bool]:
        streamed = Streamed(plan, self.name, self.formats)
        if not (yield from streamed.open(execute=False)):
            return False
        self.streamed = streamed
        return True


def run(plan: Plan, last: bool) -> Steps[bool]:
    """Stream a simple Query's statement to the client (False: an overload's result type is not one the proxy
    prints; nothing ran). ``last``: the statement is the query string's last: its exchange ends with Sync."""
    streamed = Streamed(plan)
    if not (yield from streamed.open(execute=True)):
        return False
    yield Emit(streamed.description)
    yield from streamed.execute(0, finish=last)
    return True


def _client_formats(formats: tuple[int, ...], columns: int) -> list[int]:
    """The format code of each of the client's columns, as a Bind's result format codes give them."""
    if not formats:
        return [0] * columns
    if len(formats) == 1:
        return [formats[0]] * columns
    if len(formats) != columns:
        raise ProtocolViolation(f"bind message has {len(formats)} result formats but query has {columns} columns")
    return list(formats)


def _part_run(run: Any) -> Steps[list[Portion]]:
    """A part's exchange (a Run, or the handle of one begun); its failure is the statement's answer: the client
    gets the server's error from here (the exchange is quiet: rows computed before it must go out first)."""
    try:
        return (yield (Wait(run) if not isinstance(run, Run) else run))  # type: ignore[no-any-return]
    except UpstreamError as exc:
        if exc.delivered:  # the batch now skips to Sync, which the session sends
            yield Emit(ErrorResponse(exc.fields).encode())
        raise


def _settle(pending: Any, failure: Exception) -> Steps[None]:
    """Wait for a part on its way after ``failure`` (computing the part before it). When the server failed it,
    the batch skips to Sync: the client gets the error of the earlier row — ``failure`` itself, unless it was
    only a consequence (an engine query that found the batch failed) — and the session sends Sync."""
    try:
        yield Wait(pending)
    except UpstreamError as exc:
        if not exc.delivered:
            return
        if isinstance(failure, BatchFailed | UpstreamError):
            yield Emit(ErrorResponse(exc.fields).encode())
            raise exc from None
        yield Emit(ErrorResponse.of(failure).encode())
        raise UpstreamError(tuple(error_fields(failure)), exc.status, delivered=True) from None
