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
from proxy.errors import FeatureNotSupported, InvalidCursorName

_P, _B, _D, _E, _C = (ord(c) for c in "PBDEC")
TYPE_OIDS = {"text": 25, "jsonb": 3802, "jsonb[]": 3807, "text[]": 1009, "boolean": 16, "real": 700, "bigint": 20}
OwnStatement = cursors.StreamSelect | cursors.Declare | cursors.Fetch | cursors.Close
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA = (pq.encode(t, b"") for t in (b"1", b"2", b"3", b"n"))


@dataclass(frozen=True)
class Prepared:
    sql: str
    own: OwnStatement
    param_types: tuple[int, ...]


@dataclass(frozen=True)
class Portal:
    own: OwnStatement
    binary: bool  # results in binary format (asyncpg asks for it)


class Owned:
    """One session's own prepared statements and portals."""

    def __init__(self) -> None:
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.failed = False  # an own message failed: the rest of the batch is skipped until Sync

    @property
    def active(self) -> bool:
        return bool(self.statements or self.portals)

    def claims(self, frame: pq.Frame, open_cursors: dict[str, cursors.Stream]) -> bool:
        """Whether the proxy answers this client message itself."""
        match frame.type:
            case 80:  # P
                parse = pq.decode_parse(frame)
                if self._prepared(parse, open_cursors) is None:
                    self.statements.pop(parse.name, None)  # the name now means a statement of the server's
                    return False
                return True
            case 66:  # B
                bound = extended.decode_bind(frame)
                if bound.statement not in self.statements:
                    self.portals.pop(bound.portal, None)  # the portal name now means one of the server's
                    return False
                return True
            case 68 | 67:  # D, C
                kind, name = frame.raw[5:6], frame.raw[6:-1].decode(errors="replace")
                return name in (self.statements if kind == b"S" else self.portals)
            case 69:  # E
                return frame.raw[5 : frame.raw.index(b"\0", 5)].decode(errors="replace") in self.portals
        return False

    def _prepared(self, parse: pq.Parse, open_cursors: dict[str, cursors.Stream]) -> Prepared | None:
        if "pgml" not in parse.sql.lower() and not open_cursors:
            return None
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
                self.portals[bound.portal] = Portal(_bound(self.statements[bound.statement], bound), binary)
                return BIND_COMPLETE
            case 68:
                return self._describe(frame.raw[5:6], frame.raw[6:-1].decode(), table)
            case 69:
                portal = frame.raw[5 : frame.raw.index(b"\0", 5)].decode()
                return await self._execute(portal, table, tx_status, write)
            case _:  # C
                names = self.statements if frame.raw[5:6] == b"S" else self.portals
                names.pop(frame.raw[6:-1].decode(), None)
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

    async def _execute(self, name: str, table: cursors.Cursors, tx_status: str, write: Any) -> bytes:
        own, binary = self.portals[name].own, self.portals[name].binary
        match own:
            case cursors.StreamSelect():
                return await table.select_rows(own.call, write, binary)
            case cursors.Declare():
                return table.declare(own, tx_status)
            case cursors.Fetch(name=cursor, count=count, move=move):
                if cursor not in table.open:
                    raise InvalidCursorName(f'cursor "{cursor}" does not exist')
                rows, tag = await table.fetch(cursor, count, move, binary)
                return rows + tag
            case cursors.Close(name=str(cursor)):
                if cursor not in table.open:
                    raise InvalidCursorName(f'cursor "{cursor}" does not exist')
                return table.close(cursor)
        raise FeatureNotSupported("unexpected statement for a pgml-proxy cursor")


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
    values: dict[int, tuple[Any, int]] = {}
    for i, data in enumerate(bound.params):
        oid = types[i] if i < len(types) else 25
        values[i + 1] = (extended.param_value(data, bound.format_of(i) == 1, oid), oid)
    extended.substitute_params([fresh.call], values)
    return fresh
