"""The proxy's own statements on a client's upstream session: the messages that run them, and their answers.

Owns: :class:`Exchange`, the sans-IO driver of one internal exchange — a run of
statements sent with extended-protocol messages (private statement and portal,
Describe, Execute, COPY in both directions; a :class:`Prepare` is only parsed and
described, for the parameter types the server infers; a :class:`Rows` reads the proxy's
row portal part by part — opened with result formats, suspended at a row limit, its rows
kept as sent, in a :class:`Portion`), ended by Sync between client batches
or by Flush in the middle of one, so the client's implicit transaction is never
ended by the proxy — and the :class:`Port` protocol the rewriter uses to run them.

Must not: write to sockets, or encode and decode messages itself (:mod:`proxy.wire.messages`
does). The session sends what an exchange asks for and feeds frames in; it starts an
exchange only once every response owed to the client has arrived, so every frame until
the exchange is done is ours.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.api import DatabaseError, Result, Statement
from proxy.errors import ProtocolViolation
from proxy.session.search_path import SearchPath
from proxy.wire.frames import Backend, Frame, equal_run
from proxy.wire.messages import (
    Bind,
    Close,
    CommandComplete,
    CopyData,
    CopyDone,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    Flush,
    ParameterDescription,
    Parse,
    ReadyForQuery,
    RowDescription,
    Sync,
    Target,
)
from proxy.wire.rows import RowBlock

log = logging.getLogger(__name__)
_COPY_CHUNK = 256 * 1024
STATEMENT = "pgml_proxy_s"  # the private statement and portal of internal exchanges
PORTAL = "pgml_proxy_p"
SYNC = Sync().encode()
FLUSH = Flush().encode()
_COPY_DATA, _DATA_ROW = int(Backend.COPY_DATA), int(Backend.DATA_ROW)
_LENGTH = struct.Struct("!i")
# The answers of a visible statement (one of the client's own, run here): they are the client's.
_VISIBLE = frozenset(
    {
        Backend.ROW_DESCRIPTION, Backend.DATA_ROW, Backend.COMMAND_COMPLETE, Backend.EMPTY_QUERY_RESPONSE,
        Backend.NOTICE_RESPONSE, Backend.ERROR_RESPONSE,
    }
)  # fmt: skip
# Answers that need nothing here: completions, COPY TO framing, notices of the proxy's own statements.
_IGNORED = frozenset(
    {
        Backend.PARSE_COMPLETE, Backend.BIND_COMPLETE, Backend.NO_DATA, Backend.COPY_OUT_RESPONSE, Backend.COPY_DONE,
        Backend.NOTICE_RESPONSE,
    }
)  # fmt: skip

__all__ = ["Described", "Exchange", "Port", "Portion", "Prepare", "Result", "Rows", "Statement", "UpstreamError"]


@dataclass(frozen=True)
class Prepare(Statement):
    """A statement the server only parses and describes (never executes), with these declared parameter types.

    Its result is a :class:`Described`: the parameter types the server settled on (declared or
    inferred) and the result columns. A statement that cannot be prepared fails as the client's own
    Parse of it would (42883 for a call no overload accepts, 42P18 for an undeterminable type …).
    """

    param_types: tuple[int, ...] = ()


@dataclass
class Described(Result):
    """The answer to a :class:`Prepare`: its ParameterDescription, and its RowDescription in ``columns``."""

    param_types: tuple[int, ...] = field(default_factory=tuple)


ROWS_PORTAL = "pgml_proxy_rows"  # the portal a stream of rows is read from, part by part (its statement: + "_s")


@dataclass(frozen=True)
class Rows(Statement):
    """Up to ``limit`` rows (0: all) of the proxy's row portal ``name``, answered with a :class:`Portion`.

    ``opens``: Parse ``sql`` as the statement ``name + "_s"``, Bind the portal with result ``formats`` (one code
    per column), Describe it, then Execute; otherwise Execute the portal a previous Rows left suspended
    (``sql`` unused). ``executes`` False: no Execute (opened only: answered at its RowDescription; or only
    ``closes``). ``closes``: Close the portal and its statement after. The portal lives in the transaction, so
    the exchanges that read it must end with Flush until the last one.
    """

    name: str = ROWS_PORTAL
    formats: tuple[int, ...] = ()
    limit: int = 0
    opens: bool = True
    executes: bool = True
    closes: bool = False


@dataclass
class Portion(Result):
    """The answer to a :class:`Rows`: the rows as sent (bytes in the requested formats), the RowDescription
    (once it opened the portal), and whether the portal was suspended at the limit (more rows follow)."""

    block: RowBlock = field(default_factory=RowBlock)  # the DataRows
    description: RowDescription | None = None
    suspended: bool = False
    notices: list[bytes] = field(default_factory=list)  # NoticeResponses of these rows, for the client


class BatchFailed(DatabaseError):
    """The extended-protocol batch already failed upstream; the server skips messages until Sync (the
    session's skip-to-sync phase): the proxy's own statements cannot run in it."""


class UpstreamError(DatabaseError):
    """The server rejected an internal statement; ``fields`` is its ErrorResponse, ``status`` the Z after it.

    ``delivered``: the error already went to the client as the answer of its batch
    (an exchange in the middle of an extended-protocol batch).
    """

    def __init__(self, fields: tuple[tuple[str, str], ...], status: str, delivered: bool = False) -> None:
        super().__init__(dict(fields).get("M", "upstream error"))
        self.fields = fields
        self.status = status
        self.delivered = delivered


class Port(Protocol):
    """What the rewriter may do on the client's own upstream session."""

    session_id: int
    database: str
    standard_strings: bool
    client_encoding: str
    search_path: SearchPath  # the session's, for unqualified pgml calls
    temp_tables: list[str]  # per-row result tables created for the statement being decided
    notices: list[str]  # WARNINGs from the engine for the client, sent with the decision
    silenced: frozenset[str]  # the engine's severities the startup packet's client_min_messages silences
    # A CancelRequest came while this decision ran (the server honours a cancel at its statement's next check): an
    # engine call the decision makes after it fails with 57014, as one running at that moment does.
    canceled: bool

    @property
    def tx_status(self) -> str:
        """The server's transaction status from its last ReadyForQuery."""
        ...

    @property
    def in_transaction(self) -> bool:
        """Inside BEGIN or an extended-protocol batch: what runs now commits with the client's work."""
        ...

    async def settled(self) -> None:
        """Until every ReadyForQuery owed has arrived (``tx_status`` is then current)."""
        ...

    async def execute(
        self, statements: Sequence[Statement], keep_open: bool = False, finish: bool = False, quiet: bool = False
    ) -> list[Result]:
        """Run statements as one internal exchange; raises UpstreamError.

        ``keep_open``: end with Flush even between batches, so the implicit transaction goes on into
        the statements that follow; ``finish``: end with Sync even so (the last part of such a run).
        ``quiet``: an error that answers the client's message (Flush-ended) is not written to the client
        here: the caller writes the error it answers with (the UpstreamError still says ``delivered``).
        Exchanges run one at a time: a second waits for the first to end.
        """
        ...

    def emit(self, frames: bytes) -> None:
        """Answer frames of the client's own statement, written to the client now (rows the proxy computed)."""
        ...

    def notify(self, severity: str, message: str) -> None:
        """A NoticeResponse of ``severity`` (INFO, NOTICE) from the engine, written to the client now (the caller
        left out what the session's client_min_messages silences)."""
        ...


async def query(port: Port, sql: str, copy_data: bytes | None = None) -> Result:
    """One internal statement's result."""
    return (await port.execute([Statement(sql, copy_data=copy_data)]))[0]


def _columns(frame: Frame) -> list[tuple[str, int]]:
    return [(column.name, column.type_oid) for column in RowDescription.decode(frame).columns]


def _text_row(frame: Frame) -> tuple[str | None, ...]:
    return tuple([None if value is None else value.decode() for value in DataRow.decode(frame).values])


def _result(statement: Statement) -> Result:
    if isinstance(statement, Rows):
        return Portion()
    return Described() if isinstance(statement, Prepare) else Result()


def copy_frames(data: bytes) -> list[bytes]:
    """CopyData messages for ``data`` followed by CopyDone."""
    frames = [CopyData(data[i : i + _COPY_CHUNK]).encode() for i in range(0, len(data), _COPY_CHUNK)]
    frames.append(CopyDone().encode())
    return frames


def _close_statement(name: str) -> bytes:
    return Close(Target.STATEMENT, name).encode()


def statement_frames(statement: Statement) -> list[bytes]:
    """Parse, Bind, Describe and Execute of one statement on the private statement and portal (a Prepare:
    Parse and Describe of the statement only)."""
    if isinstance(statement, Rows):
        return _rows_frames(statement)
    if isinstance(statement, Prepare):
        return [
            Parse(STATEMENT, statement.sql, statement.param_types).encode(),
            Describe(Target.STATEMENT, STATEMENT).encode(),
        ]
    binary = tuple(int(isinstance(v, bytes)) for v in statement.params)
    values = tuple(v.encode() if isinstance(v, str) else v for v in statement.params)
    return [
        Parse(STATEMENT, statement.sql, ()).encode(),
        Bind(PORTAL, STATEMENT, binary, values, ()).encode(),
        Describe(Target.PORTAL, PORTAL).encode(),
        Execute(PORTAL, 0).encode(),
    ]


CLOSE_BOTH = [Close(Target.PORTAL, PORTAL).encode(), _close_statement(STATEMENT)]


def close_rows(name: str) -> list[bytes]:
    """Close of the row portal ``name`` and its statement (either already gone: a no-op on the server)."""
    return [Close(Target.PORTAL, name).encode(), _close_statement(name + "_s")]


def _rows_frames(rows: Rows) -> list[bytes]:
    out = []
    portal, statement = rows.name, rows.name + "_s"
    if rows.opens:  # its statement is closed first: a no-op unless an earlier stream failed before its Close
        out += [
            _close_statement(statement),
            Parse(statement, rows.sql, ()).encode(),
            Bind(portal, statement, (), (), rows.formats).encode(),
            Describe(Target.PORTAL, portal).encode(),
        ]
    if rows.executes:
        out.append(Execute(portal, rows.limit).encode())
    return out + (close_rows(portal) if rows.closes else [])


def _closes(statement: Statement) -> int:
    """CloseCompletes the frames of ``statement`` (and the closes after it) bring."""
    if isinstance(statement, Rows):
        return int(statement.opens) + 2 * int(statement.closes)
    return 2


class Exchange:
    """One internal exchange: ``start()`` gives its frames, ``feed`` the frames each answer asks for.

    Every statement goes out at once, in one write: a ``COPY … FROM STDIN``'s data right after its
    Execute, without waiting for CopyInResponse. The server reads it in copy-in mode, in order; and
    when something before it failed, it skips to the Sync (extended protocol) and accepts but ignores
    CopyData, CopyDone and CopyFail outside copy mode (PostgresMain: "we probably got here because a
    COPY failed"), so data sent ahead of an error is harmless. With ``sync`` the exchange ends at
    ReadyForQuery; otherwise (Flush, mid-batch) at its last CloseComplete or at an error, after which
    the server skips the client's batch until its Sync.
    """

    def __init__(
        self, statements: Sequence[Statement], *, sync: bool, close_first: Sequence[bytes] = (), show: bool = True
    ) -> None:
        self.statements = list(statements)
        if log.isEnabledFor(logging.DEBUG):  # the proxy's own statements on the client's session (SQL: debug only;
            for statement in self.statements:  # not ``show``: it holds a Bind's values, which are never logged)
                sql = statement.sql if show else f"({len(statement.sql)} characters with bound values, not shown)"
                log.debug("own statement (%s): %s", type(statement).__name__, sql)
        self.results = [_result(s) for s in self.statements]
        self.error: tuple[tuple[str, str], ...] | None = None
        self.status: str | None = None
        self.forward: list[bytes] = []  # frames the client must still see (notifications, parameter changes)
        self._sync = sync
        # Closing the private statement and portal first is a no-op unless an earlier exchange failed
        # between its Parse and Close (the server then skipped the Close): names are free again.
        self._first = [*close_first, *CLOSE_BOTH]
        self._closes_left = len(self._first) + sum(_closes(s) for s in self.statements)
        self._index = 0  # the statement being answered
        self._answers = sum(not isinstance(s, Rows) or s.executes or s.opens for s in self.statements)  # answered
        self._copy_parts: list[bytes] = []  # a COPY TO's rows (one or many per part) ...
        self._copy_rows: list[int] = []  # ... and each row's length (PostgreSQL sends one CopyData per row)

    @property
    def done(self) -> bool:
        if self.status is not None:
            return True
        # Flush-ended: at an error, or once every close and every statement's answer arrived (a Rows leaves its
        # portal open, so its answer can come after the closes that precede it).
        return not self._sync and (self.error is not None or (self._closes_left == 0 and self._index >= self._answers))

    def start(self) -> list[bytes]:
        frames = list(self._first)
        for statement in self.statements:
            frames += statement_frames(statement)
            if statement.copy_data is not None:
                frames += copy_frames(statement.copy_data)
            if not isinstance(statement, Rows):  # its portal stays open for the next part
                frames += CLOSE_BOTH
        return [*frames, SYNC if self._sync else FLUSH]

    def feed(self, frame: Frame) -> list[bytes]:
        kind = frame.type
        if kind == _COPY_DATA:  # a row of a COPY TO (no visible statement copies): checked first, for each row
            self._copy_parts.append(frame.raw[5:])  # one frame per row: the rows' bounds for binary COPY
            self._copy_rows.append(len(frame.raw) - 5)
            return []
        if self._index < len(self.statements) and self.statements[self._index].visible and kind in _VISIBLE:
            self.forward.append(frame.raw)  # a statement of the client's own, run here: its answer is theirs
        result = self.results[min(self._index, len(self.results) - 1)] if self.results else Result()
        match kind:  # the frequent kinds first: each case looks its member up
            case Backend.DATA_ROW:
                if isinstance(result, Portion):
                    result.block.add(frame.raw, (len(frame.raw),))
                elif not self.statements[self._index].visible:
                    result.rows.append(_text_row(frame))
            case Backend.PARAMETER_DESCRIPTION if isinstance(result, Described):
                result.param_types = ParameterDescription.decode(frame).types
            case Backend.ROW_DESCRIPTION | Backend.NO_DATA if self._describing():
                result.columns = _columns(frame) if kind == Backend.ROW_DESCRIPTION else []
                if isinstance(result, Portion) and kind == Backend.ROW_DESCRIPTION:
                    result.description = RowDescription.decode(frame)
                self._index += 1  # described: a Prepare is never executed, nor a Rows that only opens
            case Backend.ROW_DESCRIPTION:
                result.columns = _columns(frame)
                if isinstance(result, Portion):
                    result.description = RowDescription.decode(frame)
            case Backend.PORTAL_SUSPENDED:
                if isinstance(result, Portion):
                    result.suspended = True
                self._index += 1
            case Backend.COMMAND_COMPLETE | Backend.EMPTY_QUERY_RESPONSE:
                result.command = CommandComplete.decode(frame).tag if kind == Backend.COMMAND_COMPLETE else ""
                if self._copy_rows:
                    result.copy, result.copy_rows = b"".join(self._copy_parts), self._copy_rows
                    self._copy_parts, self._copy_rows = [], []
                self._index += 1
            case Backend.CLOSE_COMPLETE:
                self._closes_left -= 1
            case Backend.NOTICE_RESPONSE if isinstance(result, Portion):
                result.notices.append(frame.raw)  # raised by the client's own statement (a function it calls)
            case Backend.ERROR_RESPONSE:
                self.error = self.error or ErrorResponse.decode(frame).fields
            case Backend.COPY_IN_RESPONSE:
                self._copy_in()
            case Backend.NOTIFICATION_RESPONSE | Backend.PARAMETER_STATUS:
                self.forward.append(frame.raw)
            case Backend.READY_FOR_QUERY:
                self.status = ReadyForQuery.decode(frame).status
            case _ if kind in _IGNORED:
                pass
            case _:
                raise ProtocolViolation(f"unexpected message {chr(kind)!r} in an internal exchange")
        return []

    def feed_run(self, chunk: bytes, kind: int, count: int) -> int:
        """The first ``count`` messages of ``chunk`` are of ``kind``: a COPY TO's rows (CopyData) or a row portal's
        rows (DataRow) are taken at once, not message by message; returns how many bytes of ``chunk`` were taken
        (0: these are not taken in bulk; :meth:`feed` each)."""
        if kind == _COPY_DATA:
            return self._copy_run(chunk, count)
        result = self.results[self._index] if self._index < len(self.results) else None
        if kind != _DATA_ROW or not isinstance(result, Portion):
            return 0
        pos, header = 0, _LENGTH.unpack_from
        ends: list[int] = []
        append = ends.append
        for _ in range(count):
            pos += 1 + header(chunk, pos + 1)[0]
            append(pos)
        result.block.add(chunk[:pos], ends)
        return pos

    def _copy_run(self, chunk: bytes, count: int) -> int:
        """CopyData rows: runs of one length (a numeric table's rows; binary COPY's header and trailer come in the
        first and last) cut out of the chunk as strided arrays, the others one by one."""
        pos, taken, parts, rows, header = 0, 0, self._copy_parts, self._copy_rows, _LENGTH.unpack_from
        while taken < count:
            size: int = 1 + header(chunk, pos + 1)[0]
            run = 1
            if count - taken > 1 and chunk[pos : pos + 5] == chunk[pos + size : pos + size + 5]:
                run += min(equal_run(chunk, pos, size, len(chunk)), count - taken - 1)
            if run > 1:
                frames = np.frombuffer(chunk, np.uint8, count=run * size, offset=pos).reshape(run, size)
                parts.append(frames[:, 5:].tobytes())
            else:
                parts.append(chunk[pos + 5 : pos + size])
            rows.extend([size - 5] * run)
            pos += run * size
            taken += run
        return pos

    def _describing(self) -> bool:
        """The statement being answered ends at its description: a Prepare, or a Rows that only opens its portal."""
        if self._index >= len(self.statements):
            return False
        statement = self.statements[self._index]
        return isinstance(statement, Prepare) or (isinstance(statement, Rows) and not statement.executes)

    def _copy_in(self) -> None:
        """Copy-in mode: the statement's data went out right after its Execute. One given none (only the proxy's
        own statements copy in, always with their data) is cut off by the frames sent behind it: the server
        then ends the session, having lost protocol synchronization."""
        if self._index >= len(self.statements) or self.statements[self._index].copy_data is None:
            raise ProtocolViolation("an internal statement started COPY FROM STDIN without COPY data")
