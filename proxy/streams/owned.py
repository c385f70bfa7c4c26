"""Extended-protocol messages the proxy answers itself: prepared DECLARE / FETCH / CLOSE of its cursors.

Owns: the session's own prepared statements and portals — a Parse of ``DECLARE c
CURSOR FOR SELECT pgml.transform_stream($1, …)`` or of ``FETCH n FROM c`` for a
proxy-owned cursor, and the Bind, Describe, Execute and Close messages that name
them (what PostgresML's Korvus SDK sends) — the messages that name a proxy-owned
cursor as a portal (psycopg 3's server-side cursors describe the portal their
DECLARE made; Execute with a row limit reads it, Close closes it), and the
response each gets: ParseComplete, BindComplete, ParameterDescription,
RowDescription / NoData, DataRows, PortalSuspended, CommandComplete, CloseComplete.
Also the client portals bound to a deferred statement whose per-row calls stream
(:class:`StreamedPortal`: the rows come from :class:`proxy.rewrite.streaming.Streamed`,
which reads the statement's row portal on the client's session).

The parameter types of an own statement with ``$n`` are the server's: its text is
parsed and described there (never executed) with the client's declared types, so
inference, the stubs' overload resolution and its errors (42883 for a varchar where
only jsonb fits) are PostgreSQL's own.

Must not: touch sockets. The session writes the answers after a barrier (so
they follow every earlier response of the batch) and forwards Sync, whose
ReadyForQuery then comes from the server, which saw none of these messages (a
streamed portal's reads of its row portal are the proxy's own, ended with Flush).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.pg.types import TEXT
from proxy import schema
from proxy.errors import (
    DuplicateCursor,
    FeatureNotSupported,
    InvalidCursorName,
    NotInPrerequisiteState,
    ProxyError,
)
from proxy.rewrite.params import referenced_params, substitute_params
from proxy.rewrite.steps import Steps
from proxy.rewrite.streaming import Streamed
from proxy.session.exchange import Described, Port, Prepare
from proxy.streams import classify, cursors
from proxy.streams.stream import Stream, command_complete, data_row, failure, row_description
from proxy.wire.frames import Frame, Frontend
from proxy.wire.messages import (
    Bind,
    BindComplete,
    Close,
    CloseComplete,
    Describe,
    Execute,
    NoData,
    ParameterDescription,
    Parse,
    ParseComplete,
    PortalSuspended,
    Target,
    try_decode,
)
from proxy.wire.params import bound_values

OwnStatement = classify.StreamSelect | classify.Declare | classify.Fetch | classify.Close
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA, PORTAL_SUSPENDED = (
    m.encode() for m in (ParseComplete(), BindComplete(), CloseComplete(), NoData(), PortalSuspended())
)


@dataclass(frozen=True)
class Prepared:
    sql: str
    own: OwnStatement
    param_types: tuple[int, ...]


@dataclass
class StreamedPortal:
    """A client portal bound to a deferred statement whose per-row calls stream (:mod:`proxy.rewrite.streaming`):
    Describe answers its RowDescription, each Execute its next rows, computed as the server's rows arrive."""

    rows: Streamed
    drive: Callable[[Steps[None]], Awaitable[None]]  # runs the stream's steps on the session and the engine
    discard: Callable[[str], None]  # a row portal of the proxy's (and its statement) to close on the server later

    def stop(self) -> None:
        """The client's portal is gone: the server's portal and statement are closed when the proxy next can."""
        portal = self.rows.abandon()
        if portal is not None:
            self.discard(portal)


@dataclass
class Portal:
    """A bound own statement; Execute with a row limit runs it in pieces (PortalSuspended between)."""

    own: OwnStatement
    binary: bool  # results in binary format (asyncpg asks for it)
    stream: Stream | None = None  # a streaming SELECT's generation, once executed
    pending: list[list[str]] | None = None  # a FETCH's rows not sent yet
    done: bool = False


# Parameter types the server gave own statements: (database, SQL, declared types) -> types. Shared by sessions.
_server_types: OrderedDict[tuple[str, str, tuple[int, ...]], tuple[int, ...]] = OrderedDict()
_SERVER_TYPES_KEPT = 1024


class Owned:
    """One session's own prepared statements and portals."""

    def __init__(self) -> None:
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal | StreamedPortal] = {}

    def adopt(self, name: str, portal: StreamedPortal) -> None:
        """The client's Bind of portal ``name`` made a streamed portal (in place of any portal of that name)."""
        self.drop_portal(name)
        self.portals[name] = portal

    def drop_portal(self, name: str) -> None:
        portal = self.portals.pop(name, None)
        if isinstance(portal, StreamedPortal):
            portal.stop()
        elif portal is not None and portal.stream is not None:
            portal.stream.stop()

    def clear_portals(self) -> None:
        """Transaction end or disconnect: portals are gone, their generations stop."""
        for name in list(self.portals):
            self.drop_portal(name)

    @property
    def active(self) -> bool:
        return bool(self.statements or self.portals)

    def starts_stream(self, frame: Frame) -> bool:
        """Whether this claimed message binds a portal that starts a generation (a streaming SELECT's or a DECLARE's):
        the session's pgml.* settings are read for it then (a query at its Execute would end the implicit
        transaction the portal lives in)."""
        bound = try_decode(Bind, frame) if frame.type == Frontend.BIND else None
        prepared = self.statements.get(bound.statement) if bound is not None else None
        return prepared is not None and isinstance(prepared.own, classify.StreamSelect | classify.Declare)

    def claims(self, frame: Frame, open_cursors: dict[str, cursors.Cursor]) -> bool:
        """Whether the proxy answers this client message itself.

        Never raises: a malformed message is not ours (the server answers it with its own error),
        and a statement of ours that cannot be prepared is answered with its error.
        """
        match frame.type:
            case Frontend.PARSE:
                parse = try_decode(Parse, frame)
                if parse is None:
                    return False
                try:
                    prepared = self._prepared(parse, open_cursors)
                except ProxyError:
                    return True  # answer() meets the same error and fails the batch with it
                if prepared is None:
                    self.statements.pop(parse.name, None)  # the name now means a statement of the server's
                    return False
                return True
            case Frontend.BIND:
                bound = try_decode(Bind, frame)
                if bound is None:
                    return False
                if bound.portal and bound.portal in open_cursors:
                    return True  # a cursor is a portal: answered with the server's 42P03
                if bound.statement not in self.statements:
                    self.drop_portal(bound.portal)  # the portal name now means another (the server's, or streamed)
                    return False
                return True
            case Frontend.DESCRIBE | Frontend.CLOSE:
                target = _target(frame)
                if target is None:
                    return False
                kind, name = target
                if kind == Target.STATEMENT:
                    return name in self.statements
                return name in self.portals or name in open_cursors
            case Frontend.EXECUTE:
                execute = try_decode(Execute, frame)
                return execute is not None and (execute.portal in self.portals or execute.portal in open_cursors)
        return False

    def _prepared(self, parse: Parse, open_cursors: dict[str, cursors.Cursor]) -> Prepared | None:
        own = classify.classify(parse.sql, open_cursors)
        if not isinstance(own, OwnStatement) or (isinstance(own, classify.Close) and own.name is None):
            return None
        return Prepared(parse.sql, own, parse.param_types)

    async def answer(self, frame: Frame, table: cursors.Cursors, tx_status: str, write: Any, port: Port) -> bytes:
        """The response frames for an own message (raises the error that fails the batch).

        A streaming SELECT writes its DataRows with ``write`` as they are generated. A Parse of a
        statement with ``$n`` is prepared on the server through ``port`` for its parameter types
        (an UpstreamError is the server's own answer to it).
        """
        match frame.type:
            case Frontend.PARSE:
                parse = Parse.decode(frame)
                prepared = self._prepared(parse, table.open)
                assert prepared is not None  # claims() said so
                types = await _server_types_of(prepared, port)
                self.statements[parse.name] = Prepared(prepared.sql, prepared.own, types)
                return PARSE_COMPLETE
            case Frontend.BIND:
                bound = Bind.decode(frame)
                if bound.portal and bound.portal in table.open:
                    raise DuplicateCursor(f'cursor "{bound.portal}" already exists')
                binary = bool(bound.result_formats) and bound.result_formats[0] == 1
                self.drop_portal(bound.portal)
                self.portals[bound.portal] = Portal(_bound(self.statements[bound.statement], bound), binary)
                return BIND_COMPLETE
            case Frontend.DESCRIBE:
                kind, name = _target(frame) or (Target.STATEMENT, "")  # claims() checked it
                if kind == Target.PORTAL and name not in self.portals:  # a cursor's portal: text, as DECLARE made it
                    return row_description(table.open[name].column)
                if kind == Target.PORTAL and isinstance(streamed := self.portals[name], StreamedPortal):
                    return streamed.rows.description
                return self._describe(kind, name, table)
            case Frontend.EXECUTE:
                execute = try_decode(Execute, frame) or Execute("", 0)  # claims() checked it
                if execute.portal not in self.portals:
                    return await _execute_cursor(execute.portal, execute.max_rows, table)
                if isinstance(streamed := self.portals[execute.portal], StreamedPortal):
                    await streamed.drive(streamed.rows.execute(execute.max_rows))  # it writes the rows itself
                    return b""
                return await self._execute(execute.portal, execute.max_rows, table, tx_status, write)
            case _:  # Close
                kind, name = _target(frame) or (Target.STATEMENT, "")
                if kind == Target.STATEMENT:
                    self.statements.pop(name, None)
                elif name in self.portals:
                    self.drop_portal(name)
                else:
                    table.close(name)  # Close of a cursor's portal closes the cursor
                return CLOSE_COMPLETE

    def _describe(self, kind: Target, name: str, table: cursors.Cursors) -> bytes:
        portal = self.portals.get(name) if kind == Target.PORTAL else None
        assert not isinstance(portal, StreamedPortal)
        own = self.statements[name].own if portal is None else portal.own
        binary = portal is not None and portal.binary
        rows = NO_DATA
        if isinstance(own, classify.StreamSelect):
            rows = row_description(own.column, binary)
        elif isinstance(own, classify.Fetch) and not own.move and own.name in table.open:
            rows = row_description(table.open[own.name].column, binary)
        elif isinstance(own, classify.Fetch) and not own.move:
            rows = row_description(classify.FUNCTION, binary)
        if kind != Target.STATEMENT:
            return rows
        return ParameterDescription(self.statements[name].param_types).encode() + rows

    async def _execute(self, name: str, limit: int, table: cursors.Cursors, tx_status: str, write: Any) -> bytes:
        portal = self.portals[name]
        assert isinstance(portal, Portal)
        own = portal.own
        match own:
            case classify.StreamSelect() | classify.Fetch(move=False) if portal.done:
                return command_complete("SELECT 0" if isinstance(own, classify.StreamSelect) else "FETCH 0")
            case _ if portal.done:  # a utility statement's portal runs once, as on the server
                raise NotInPrerequisiteState(f'portal "{name}" cannot be run')
            case classify.StreamSelect():
                portal.stream = table.reading = portal.stream or table.open_stream(own.call)
                try:
                    return await _stream_rows(portal, portal.stream, limit, write)
                finally:
                    table.reading = None
            case classify.Declare():
                portal.done = True
                return table.declare(own, tx_status)
            case classify.Fetch(move=True):
                portal.done = True
                return (await table.fetch(own))[1]
            case classify.Fetch():
                if portal.pending is None:
                    portal.pending = (await table.fetch_fragments(own))[0]
                rows, portal.pending = _first(portal.pending, limit)
                body = b"".join(data_row(f, portal.binary) for f in rows)
                if limit > 0 and len(rows) == limit:  # as the server: done only once a run falls short of its limit
                    return body + PORTAL_SUSPENDED
                portal.done = True
                return body + command_complete(f"FETCH {len(rows)}")
            case classify.Close(name=str(cursor)):
                portal.done = True
                if cursor not in table.open:
                    raise InvalidCursorName(f'cursor "{cursor}" does not exist')
                return table.close(cursor)
        raise FeatureNotSupported("unexpected statement for a pgml-proxy cursor")


async def _execute_cursor(name: str, limit: int, table: cursors.Cursors) -> bytes:
    """Execute of a proxy-owned cursor's portal: its next ``limit`` rows (0: all), text format, as the server
    runs a cursor portal — PortalSuspended when the limit was reached, else ``SELECT n``."""
    rows = await table.execute(name, limit)
    body = b"".join(data_row(f) for f in rows)
    if table.open[name].at_end:
        return body + command_complete(f"SELECT {len(rows)}")
    return body + PORTAL_SUSPENDED


def _first(rows: list[list[str]], limit: int) -> tuple[list[list[str]], list[list[str]]]:
    """The first ``limit`` rows (0: all) and the rest."""
    return (rows[:limit], rows[limit:]) if limit > 0 else (rows, [])


def _target(frame: Frame) -> tuple[Target, str] | None:
    """Describe/Close: what it names, None when malformed (the server answers it with its own error)."""
    message = try_decode(Describe if frame.type == Frontend.DESCRIBE else Close, frame)
    return None if message is None else (message.target, message.name)


async def _stream_rows(portal: Portal, stream: Stream, limit: int, write: Any) -> bytes:
    """Up to ``limit`` rows (0: all) of a streaming SELECT, each written as it is generated."""
    count = 0
    try:
        while not limit or count < limit:
            fragments = await stream.take(1)
            if not fragments:
                portal.done = True
                stream.stop()
                return command_complete(f"SELECT {count}")
            write(data_row(fragments[0], portal.binary))
            count += 1
    except Exception as exc:
        stream.stop()
        raise failure(exc) from exc
    return PORTAL_SUSPENDED


async def _server_types_of(prepared: Prepared, port: Port) -> tuple[int, ...]:
    """The parameter types the server gives the statement (its declared ones when it has no ``$n``).

    The statement is parsed and described on the client's session, with the declared types, in
    front of a Parse of its own (so its errors are the server's answer to the client's Parse);
    the pgml schema is installed first, as for any pgml statement. Cached per database and text.
    """
    own, declared = prepared.own, prepared.param_types
    if not isinstance(own, classify.Declare | classify.StreamSelect) or not referenced_params([own.call]):
        return declared
    key = (port.database, prepared.sql, declared)
    if key in _server_types:
        _server_types.move_to_end(key)
        return _server_types[key]
    await schema.ensure(port)
    (described,) = await port.execute([Prepare(prepared.sql, param_types=declared)])
    assert isinstance(described, Described)
    types = described.param_types
    _server_types[key] = types
    if len(_server_types) > _SERVER_TYPES_KEPT:
        _server_types.popitem(last=False)
    return types


def _bound(prepared: Prepared, bound: Bind) -> OwnStatement:
    """The statement with this Bind's values in place of its ``$n``."""
    own = prepared.own
    if not isinstance(own, classify.Declare | classify.StreamSelect):
        return own
    fresh = classify.classify(prepared.sql, {})  # a new tree: the values go into it
    assert isinstance(fresh, classify.Declare | classify.StreamSelect)
    types = prepared.param_types
    oids = [types[i] if i < len(types) else TEXT for i in range(len(bound.params))]
    values, problems = bound_values(bound, oids)
    for number in referenced_params([fresh.call]):
        if number in problems:
            raise problems[number]
    substitute_params([fresh.call], values)
    return fresh
