"""Extended-protocol messages the proxy answers itself: prepared DECLARE / FETCH / CLOSE of its cursors.

Owns: the session's own prepared statements and portals — a Parse of ``DECLARE c
CURSOR FOR SELECT pgml.transform_stream($1, …)`` or of ``FETCH n FROM c`` for a
proxy-owned cursor, and the Bind, Describe, Execute and Close messages that name
them (what PostgresML's Korvus SDK sends) — and the response each gets:
ParseComplete, BindComplete, ParameterDescription, RowDescription / NoData,
DataRows, CommandComplete, CloseComplete.

Must not: touch sockets. The session writes the answers after a barrier (so
they follow every earlier response of the batch) and forwards Sync, whose
ReadyForQuery then comes from the server, which saw none of these messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pglast import ast

from proxy import cursors, extended
from proxy import protocol as pq
from proxy.calls import bind, find_calls
from proxy.errors import FeatureNotSupported, InvalidCursorName, ProtocolViolation, ProxyError

_P, _B, _D, _E, _C = (ord(c) for c in "PBDEC")
TYPE_OIDS = {"text": 25, "jsonb": 3802, "jsonb[]": 3807, "text[]": 1009, "boolean": 16, "real": 700, "bigint": 20}
OwnStatement = cursors.StreamSelect | cursors.Declare | cursors.Fetch | cursors.Close
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA, PORTAL_SUSPENDED = (
    pq.encode(t, b"") for t in (b"1", b"2", b"3", b"n", b"s")
)


@dataclass(frozen=True)
class Prepared:
    sql: str
    own: OwnStatement
    param_types: tuple[int, ...]


@dataclass
class Portal:
    """A bound own statement; Execute with a row limit runs it in pieces (PortalSuspended between)."""

    own: OwnStatement
    binary: bool  # results in binary format (asyncpg asks for it)
    stream: cursors.Stream | None = None  # a streaming SELECT's generation, once executed
    pending: list[list[str]] | None = None  # a FETCH's rows not sent yet
    done: bool = False


class Owned:
    """One session's own prepared statements and portals."""

    def __init__(self) -> None:
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.failed = False  # an own message failed: the rest of the batch is skipped until Sync

    def drop_portal(self, name: str) -> None:
        portal = self.portals.pop(name, None)
        if portal is not None and portal.stream is not None:
            portal.stream.stop()

    def clear_portals(self) -> None:
        """Transaction end or disconnect: portals are gone, their generations stop."""
        for name in list(self.portals):
            self.drop_portal(name)

    @property
    def active(self) -> bool:
        return bool(self.statements or self.portals)

    def claims(self, frame: pq.Frame, open_cursors: dict[str, cursors.Stream]) -> bool:
        """Whether the proxy answers this client message itself.

        Never raises: a malformed message is not ours (the server answers it with its own error),
        and a statement of ours that cannot be prepared is answered with its error.
        """
        match frame.type:
            case 80:  # P
                try:
                    parse = pq.decode_parse(frame)
                except ProtocolViolation:
                    return False
                try:
                    prepared = self._prepared(parse, open_cursors)
                except ProxyError:
                    return True  # answer() meets the same error and fails the batch with it
                if prepared is None:
                    self.statements.pop(parse.name, None)  # the name now means a statement of the server's
                    return False
                return True
            case 66:  # B
                try:
                    bound = extended.decode_bind(frame)
                except ProtocolViolation:
                    return False
                if bound.statement not in self.statements:
                    self.drop_portal(bound.portal)  # the portal name now means one of the server's
                    return False
                return True
            case 68 | 67:  # D, C
                target = _target(frame)
                return target is not None and target[1] in (self.statements if target[0] == b"S" else self.portals)
            case 69:  # E
                execute = _execute_message(frame)
                return execute is not None and execute[0] in self.portals
        return False

    def _prepared(self, parse: pq.Parse, open_cursors: dict[str, cursors.Stream]) -> Prepared | None:
        own = cursors.classify(parse.sql, open_cursors)
        if not isinstance(own, OwnStatement) or (isinstance(own, cursors.Close) and own.name is None):
            return None
        return Prepared(parse.sql, own, _param_types(own, parse.param_types))

    async def answer(self, frame: pq.Frame, table: cursors.Cursors, tx_status: str, write: Any) -> bytes:
        """The response frames for an own message (raises the error that fails the batch).

        A streaming SELECT writes its DataRows with ``write`` as they are generated.
        """
        match frame.type:
            case 80:
                parse = pq.decode_parse(frame)
                prepared = self._prepared(parse, table.open)
                assert prepared is not None  # claims() said so
                self.statements[parse.name] = prepared
                return PARSE_COMPLETE
            case 66:
                bound = extended.decode_bind(frame)
                binary = bool(bound.result_formats) and bound.result_formats[0] == 1
                self.drop_portal(bound.portal)
                self.portals[bound.portal] = Portal(_bound(self.statements[bound.statement], bound), binary)
                return BIND_COMPLETE
            case 68:
                kind, name = _target(frame) or (b"", "")  # claims() checked it
                return self._describe(kind, name, table)
            case 69:
                portal, limit = _execute_message(frame) or ("", 0)
                return await self._execute(portal, limit, table, tx_status, write)
            case _:  # C
                kind, name = _target(frame) or (b"", "")
                if kind == b"S":
                    self.statements.pop(name, None)
                else:
                    self.drop_portal(name)
                return CLOSE_COMPLETE

    def _describe(self, kind: bytes, name: str, table: cursors.Cursors) -> bytes:
        own = self.statements[name].own if kind == b"S" else self.portals[name].own
        binary = kind == b"P" and self.portals[name].binary
        rows = NO_DATA
        if isinstance(own, cursors.StreamSelect):
            rows = cursors.row_description(own.column, binary)
        elif isinstance(own, cursors.Fetch) and not own.move and own.name in table.open:
            rows = cursors.row_description(table.open[own.name].column, binary)
        elif isinstance(own, cursors.Fetch) and not own.move:
            rows = cursors.row_description(cursors.FUNCTION, binary)
        if kind != b"S":
            return rows
        types = self.statements[name].param_types
        return pq.encode(b"t", struct.pack(f"!h{len(types)}I", len(types), *types)) + rows

    async def _execute(self, name: str, limit: int, table: cursors.Cursors, tx_status: str, write: Any) -> bytes:
        portal = self.portals[name]
        own = portal.own
        match own:
            case cursors.StreamSelect() | cursors.Fetch() if portal.done:
                return cursors.command_complete("SELECT 0" if isinstance(own, cursors.StreamSelect) else "FETCH 0")
            case cursors.StreamSelect():
                portal.stream = table.reading = portal.stream or table.open_stream(own.call)
                try:
                    return await _stream_rows(portal, portal.stream, limit, write)
                finally:
                    table.reading = None
            case cursors.Declare():
                return table.declare(own, tx_status)
            case cursors.Fetch(move=True):
                portal.done = True
                return (await table.fetch(own))[1]
            case cursors.Fetch():
                if portal.pending is None:
                    portal.pending = await table.fetch_fragments(own)
                rows, portal.pending = portal.pending[: limit or None], portal.pending[limit or len(portal.pending) :]
                body = b"".join(cursors.data_row(f, portal.binary) for f in rows)
                if portal.pending:
                    return body + PORTAL_SUSPENDED
                portal.done = True
                return body + cursors.command_complete(f"FETCH {len(rows)}")
            case cursors.Close(name=str(cursor)):
                if cursor not in table.open:
                    raise InvalidCursorName(f'cursor "{cursor}" does not exist')
                return table.close(cursor)
        raise FeatureNotSupported("unexpected statement for a pgml-proxy cursor")


def _target(frame: pq.Frame) -> tuple[bytes, str] | None:
    """Describe/Close: ``(b"S" or b"P", name)``, None when malformed."""
    raw = frame.raw
    kind = raw[5:6]
    if kind not in (b"S", b"P") or len(raw) < 7 or raw.find(b"\0", 6) != len(raw) - 1:
        return None
    try:
        return kind, raw[6:-1].decode()
    except UnicodeDecodeError:
        return None


def _execute_message(frame: pq.Frame) -> tuple[str, int] | None:
    """Execute: ``(portal, row limit)``, None when malformed."""
    raw = frame.raw
    end = raw.find(b"\0", 5)
    if end < 0 or len(raw) != end + 5:
        return None
    try:
        return raw[5:end].decode(), struct.unpack_from("!i", raw, end + 1)[0]
    except UnicodeDecodeError:
        return None


async def _stream_rows(portal: Portal, stream: cursors.Stream, limit: int, write: Any) -> bytes:
    """Up to ``limit`` rows (0: all) of a streaming SELECT, each written as it is generated."""
    count = 0
    try:
        while not limit or count < limit:
            fragments = await stream.take(1)
            if not fragments:
                portal.done = True
                stream.stop()
                return cursors.command_complete(f"SELECT {count}")
            write(cursors.data_row(fragments[0], portal.binary))
            count += 1
    except Exception as exc:
        stream.stop()
        raise cursors.failure(exc) from exc
    return PORTAL_SUSPENDED


def _param_types(own: OwnStatement, declared: tuple[int, ...]) -> tuple[int, ...]:
    """Declared parameter types, else the catalogue type of the argument each ``$n`` stands for."""
    if not isinstance(own, cursors.Declare | cursors.StreamSelect):
        return declared
    (site,) = find_calls(ast.SelectStmt(targetList=(ast.ResTarget(val=own.call),)))
    candidates, slots = bind(site)
    found: dict[int, int] = {}
    for slot, param in zip(slots, candidates[0].params, strict=True):
        inner = slot.arg if isinstance(slot, ast.TypeCast) else slot
        if isinstance(inner, ast.ParamRef):
            found[int(inner.number or 0)] = TYPE_OIDS.get(param.type, 25)
    count = max([len(declared), *found])
    return tuple((declared[i] if i < len(declared) and declared[i] else found.get(i + 1, 25)) for i in range(count))


def _bound(prepared: Prepared, bound: extended.Bind) -> OwnStatement:
    """The statement with this Bind's values in place of its ``$n``."""
    own = prepared.own
    if not isinstance(own, cursors.Declare | cursors.StreamSelect):
        return own
    fresh = cursors.classify(prepared.sql, {})  # a new tree: the values go into it
    assert isinstance(fresh, cursors.Declare | cursors.StreamSelect)
    types = prepared.param_types
    oids = [types[i] if i < len(types) else 25 for i in range(len(bound.params))]
    values, problems = extended.bound_values(bound, oids)
    for number in extended.referenced_params([fresh.call]):
        if number in problems:
            raise problems[number]
    extended.substitute_params([fresh.call], values)
    return fresh
