"""The proxy's own statements on a client's upstream session: building and decoding them.

Owns: :class:`Exchange`, the sans-IO driver of one internal exchange — a run of
statements sent with extended-protocol messages (private statement and portal,
Describe, Execute, COPY in both directions; a :class:`Prepare` is only parsed and
described, for the parameter types the server infers), ended by Sync between client batches
or by Flush in the middle of one, so the client's implicit transaction is never
ended by the proxy — and the :class:`Port` protocol the rewriter uses to run them.

Must not: write to sockets. The session sends what an exchange asks for and
feeds frames in; it starts an exchange only once every response owed to the
client has arrived, so every frame until the exchange is done is ours.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.api import DatabaseError, Result, Statement
from proxy.errors import ProtocolViolation
from proxy.rewrite import params as extended
from proxy.wire import messages as pq

_H = struct.Struct("!h")
_I = struct.Struct("!i")
_COPY_CHUNK = 256 * 1024
STATEMENT = "pgml_proxy_s"  # the private statement and portal of internal exchanges
PORTAL = "pgml_proxy_p"
SYNC = pq.encode(b"S", b"")

__all__ = ["Described", "Exchange", "Port", "Prepare", "Result", "Statement", "UpstreamError"]


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
    temp_tables: list[str]  # per-row result tables created for the statement being decided
    notices: list[str]  # WARNINGs from the engine for the client, sent with the decision

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
        self, statements: Sequence[Statement], keep_open: bool = False, finish: bool = False
    ) -> list[Result]:
        """Run statements as one internal exchange; raises UpstreamError.

        ``keep_open``: end with Flush even between batches, so the implicit transaction goes on into
        the statements that follow; ``finish``: end with Sync even so (the last part of such a run).
        """
        ...


async def query(port: Port, sql: str, copy_data: bytes | None = None) -> Result:
    """One internal statement's result."""
    return (await port.execute([Statement(sql, copy_data=copy_data)]))[0]


def decode_row_description(raw: bytes) -> list[tuple[str, int]]:
    (count,) = _H.unpack_from(raw, 5)
    pos, columns = 7, []
    for _ in range(count):
        nul = raw.index(b"\0", pos)
        name = raw[pos:nul].decode()
        type_oid = _I.unpack_from(raw, nul + 7)[0]
        columns.append((name, type_oid))
        pos = nul + 19
    return columns


def decode_data_row(raw: bytes) -> tuple[str | None, ...]:
    (count,) = _H.unpack_from(raw, 5)
    pos = 7
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _I.unpack_from(raw, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(raw[pos : pos + length].decode())
            pos += length
    return tuple(values)


def copy_frames(data: bytes) -> list[bytes]:
    """CopyData messages for ``data`` followed by CopyDone."""
    frames = [pq.encode(b"d", data[i : i + _COPY_CHUNK]) for i in range(0, len(data), _COPY_CHUNK)]
    frames.append(pq.encode(b"c", b""))
    return frames


def _close(kind: bytes, name: str) -> bytes:
    return pq.encode(b"C", kind + name.encode() + b"\0")


def statement_frames(statement: Statement) -> list[bytes]:
    """Parse, Bind, Describe and Execute of one statement on the private statement and portal (a Prepare:
    Parse and Describe of the statement only)."""
    if isinstance(statement, Prepare):
        return [
            pq.encode_parse(pq.Parse(STATEMENT, statement.sql, statement.param_types)),
            pq.encode(b"D", b"S" + STATEMENT.encode() + b"\0"),
        ]
    binary = tuple(int(isinstance(v, bytes)) for v in statement.params)
    values = tuple(v.encode() if isinstance(v, str) else v for v in statement.params)
    return [
        pq.encode_parse(pq.Parse(STATEMENT, statement.sql, ())),
        extended.encode_bind(extended.Bind(PORTAL, STATEMENT, binary, values, ())),
        pq.encode(b"D", b"P" + PORTAL.encode() + b"\0"),
        pq.encode(b"E", PORTAL.encode() + b"\0\0\0\0\0"),
    ]


CLOSE_BOTH = [_close(b"P", PORTAL), _close(b"S", STATEMENT)]


class Exchange:
    """One internal exchange: ``start()`` gives the first frames, ``feed`` the frames each answer asks for.

    Statements after a ``COPY … FROM STDIN`` are sent only once its data went out
    (any other message would abort the copy). With ``sync`` the exchange ends at
    ReadyForQuery; otherwise (Flush, mid-batch) at its last CloseComplete or at an
    error, after which the server skips the client's batch until its Sync.
    """

    def __init__(self, statements: Sequence[Statement], *, sync: bool, close_first: Sequence[str] = ()) -> None:
        self.statements = list(statements)
        self.results = [Described() if isinstance(s, Prepare) else Result() for s in self.statements]
        self.error: tuple[tuple[str, str], ...] | None = None
        self.status: str | None = None
        self.forward: list[bytes] = []  # frames the client must still see (notifications, parameter changes)
        self._sync = sync
        # Closing the private statement and portal first is a no-op unless an earlier exchange failed
        # between its Parse and Close (the server then skipped the Close): names are free again.
        self._first = [_close(b"S", name) for name in close_first] + CLOSE_BOTH
        self._closes_left = len(self._first) + 2 * len(self.statements)
        self._index = 0  # the statement being answered
        self._next = 0  # the first statement not yet sent
        self._synced = False
        self._copy_parts: list[bytes] = []

    @property
    def done(self) -> bool:
        return self.status is not None or (not self._sync and (self.error is not None or self._closes_left == 0))

    def start(self) -> list[bytes]:
        return self._first + self._send_more()

    def _send_more(self) -> list[bytes]:
        """Frames up to and including the next COPY FROM's Execute (or the end)."""
        out: list[bytes] = []
        while self._next < len(self.statements):
            statement = self.statements[self._next]
            self._next += 1
            out += statement_frames(statement)
            if statement.copy_data is not None:
                return [*out, pq.FLUSH]
            out += CLOSE_BOTH
        return [*out, *self._end()]

    def _end(self) -> list[bytes]:
        if not self._sync:
            return [pq.FLUSH]
        self._synced = True
        return [SYNC]

    def feed(self, frame: pq.Frame) -> list[bytes]:
        kind = chr(frame.type)
        if self._index < len(self.statements) and self.statements[self._index].visible and kind in "TDCINE":
            self.forward.append(frame.raw)  # a statement of the client's own, run here: its answer is theirs
        result = self.results[min(self._index, len(self.results) - 1)] if self.results else Result()
        match kind:
            case "t" if isinstance(result, Described):
                (count,) = _H.unpack_from(frame.raw, 5)
                result.param_types = struct.unpack_from(f"!{count}I", frame.raw, 7)
            case "T" | "n" if self._index < len(self.statements) and isinstance(self.statements[self._index], Prepare):
                result.columns = decode_row_description(frame.raw) if kind == "T" else []
                self._index += 1  # described: a Prepare is never executed
            case "T":
                result.columns = decode_row_description(frame.raw)
            case "D" if not self.statements[self._index].visible:
                result.rows.append(decode_data_row(frame.raw))
            case "D":
                pass
            case "d":
                self._copy_parts.append(frame.raw[5:])  # one frame per row: joined once, at CommandComplete
            case "C" | "I":
                result.command = frame.raw[5:-1].decode()
                if self._copy_parts:
                    result.copy, self._copy_parts = b"".join(self._copy_parts), []
                self._index += 1
            case "3":
                self._closes_left -= 1
            case "E":
                self.error = self.error or pq.decode_error(frame).fields
                if self._sync and not self._synced:  # the server now skips to a Sync that is not sent yet
                    return self._end()
            case "G":
                return self._copy_in()
            case "A" | "S":
                self.forward.append(frame.raw)
            case "Z":
                self.status = chr(frame.raw[5])
            case "1" | "2" | "n" | "H" | "c" | "N":
                pass  # completions, COPY TO framing, notices of our own statements
            case _:
                raise ProtocolViolation(f"unexpected message {kind!r} in an internal exchange")
        return []

    def _copy_in(self) -> list[bytes]:
        data = self.statements[self._index].copy_data if self._index < len(self.statements) else None
        if data is None:
            return [pq.encode(b"f", b"pgml-proxy sent no COPY data\0"), *self._end()]
        return [*copy_frames(data), *CLOSE_BOTH, *self._send_more()]
