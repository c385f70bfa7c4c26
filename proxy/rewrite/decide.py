"""The rewrite seam: for every Query/Parse that mentions ``pgml``, one decision.

Owns: the cheap ``pgml`` pre-check (a frame the proxy cannot decode is the server's
to answer), the :class:`Decision` values a session acts on (forward as is / forward
rewritten frames / answer the client / fail), the decision itself (session checks;
SQL EXECUTE of a pgml statement replaced by it (:mod:`proxy.rewrite.sql_prepare`); CREATE /
ALTER / DROP EXTENSION pgml (:mod:`proxy.schema`); the schema check; then
:mod:`proxy.rewrite.plan` — long statements parsed off the event loop, nesting too deep for
Python refused with 54001), when the ``pgml`` schema is checked (before any statement
naming something in it: at a session's first, then whenever no session has seen it
complete for SCHEMA_RECHECK_SECONDS; at once after a statement that drops or changes
it; and a statement whose own query finds it gone starts over once, outside the
client's transactions), the little it keeps per session (held weakly: it goes with the
session), and the statement that makes the server raise a proxy error (so both sides
agree on the transaction).

Must not: write to sockets. The session executes decisions; this module only
decides, talking to the upstream through :class:`proxy.session.exchange.Port`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pglast
from pglast import ast, enums, visitors

from engine.api import DatabaseError, Engine, EngineError
from proxy import schema
from proxy.errors import (
    FeatureNotSupported,
    ProgramLimitExceeded,
    ProtocolViolation,
    ProxyError,
    StatementTooComplex,
    error_fields,
    from_fields,
)
from proxy.rewrite import literals, plan
from proxy.rewrite import params as extended
from proxy.rewrite import sql_prepare as prepared
from proxy.rewrite.calls import find_calls
from proxy.session.exchange import Port, Statement, UpstreamError
from proxy.wire import messages as protocol
from proxy.wire.frames import Frame
from proxy.wire.messages import Bind, Parse, Query
from proxy.wire.params import PARAM_TYPES, bound_values

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)
_QUERY, _PARSE = ord("Q"), ord("P")
_T = TypeVar("_T")


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive).

    False for one whole Query or Parse frame that does not decode (text that is not
    UTF-8, a missing terminator): it is not the proxy's to rewrite, and the server
    answers it with its own error (22021, 08P01) and keeps the session.
    """
    return _PGML.search(raw) is not None and not undecodable(raw)


def undecodable(raw: bytes) -> bool:
    """One complete Query/Parse frame that :mod:`proxy.wire.messages` cannot decode (a chunk of several: False)."""
    if len(raw) < 5 or raw[0] not in (_QUERY, _PARSE) or int.from_bytes(raw[1:5], "big") + 1 != len(raw):
        return False
    frame = Frame(raw[0], raw)
    try:
        Query.decode(frame) if raw[0] == _QUERY else Parse.decode(frame)
    except ProtocolViolation:
        return True
    return False


def might_execute(raw: bytes) -> bool:
    """True when the text may hold an EXECUTE (of a SQL-prepared statement: :meth:`Rewriter.sql_prepared`).

    False for one Query/Parse frame that does not decode (the server answers it itself).
    """
    return prepared.might_execute(raw) and not undecodable(raw)


_DEALLOCATE = re.compile(rb"(?i)dealloc|discard")
ALL = None


def might_deallocate(raw: bytes) -> bool:
    """True when the text may hold DEALLOCATE or DISCARD (SQL that drops prepared statements).

    False for one Query/Parse frame that does not decode: the server rejects it, so it drops nothing.
    """
    return _DEALLOCATE.search(raw) is not None and not undecodable(raw)


def deallocated(sql: str) -> set[str] | None:
    """Prepared statements the SQL drops: their names, or ``ALL`` (None) for DEALLOCATE ALL / DISCARD ALL."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return set()
    names: set[str] = set()
    for raw in statements:
        match raw.stmt:
            case ast.DeallocateStmt(isall=True) | ast.DiscardStmt(target=enums.DiscardMode.DISCARD_ALL):
                return ALL
            case ast.DeallocateStmt(name=str(name)):
                names.add(name)
    return names


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the original frame upstream unchanged."""


@dataclass(frozen=True, slots=True)
class Rewritten:
    """Send these frames upstream in place of the original.

    ``own``: 0-based positions of statements in the Query's string that are the proxy's own (``DO``
    blocks in place of extension commands): their errors and notices reach the client without the
    block's CONTEXT.
    """

    frames: bytes
    own: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client directly with these frames; nothing goes upstream."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The statement fails with this error (the upstream transaction must fail too)."""

    error: ProxyError | EngineError


@dataclass(frozen=True, slots=True)
class DeferToBind:
    """Forward the Parse as is (stubs describe it); rewrite at each Bind, when ``$n`` values are known."""

    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rebound:
    """In place of a Bind: Parse a private rewritten statement, Bind the portal to it, Close it."""

    parse: bytes
    bind: bytes
    close: bytes
    name: str


class BatchFailed(DatabaseError):
    """The extended-protocol batch already failed upstream; the server skips messages until Sync."""


Decision = Forward | Rewritten | Respond | Fail | DeferToBind | Rebound
FORWARD = Forward()


# The pgml schema, once seen complete in a database, is taken to be there for this long; then it is
# checked again (two catalogue reads). A statement through this proxy that drops or changes it, and an
# internal query that finds it missing, forget it at once; this bounds how long a schema dropped by
# another client or proxy goes unnoticed.
SCHEMA_RECHECK_SECONDS = 1.0


class SchemaMemo:
    """Databases whose ``pgml`` schema was last seen complete less than ``seconds`` ago."""

    def __init__(self, seconds: float = SCHEMA_RECHECK_SECONDS) -> None:
        self.seconds = seconds
        self._seen: dict[str, float] = {}

    def __contains__(self, database: object) -> bool:
        seen = self._seen.get(database) if isinstance(database, str) else None
        return seen is not None and time.monotonic() - seen < self.seconds

    def add(self, database: str) -> None:
        self._seen[database] = time.monotonic()

    def discard(self, database: str) -> None:
        self._seen.pop(database, None)


@dataclass
class SessionState:
    """What the rewriter remembers about one session (held weakly: it goes when the session does)."""

    # This session installed or changed schema pgml in the transaction it is in: what it sees of the
    # schema is not committed, so it is not remembered for other sessions.
    changed_schema: bool = False
    # A PREPARE of a statement calling pgml.* went through: its EXECUTEs must be decided here.
    prepares: bool = False
    # The schema was checked on this session once (schema dropped by another client before it began).
    checked: bool = False


class Rewriter:
    """Decides what happens to a statement that mentions ``pgml``; one per server, shared by sessions."""

    def __init__(self, engine: Engine | None = None, cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.engine = engine
        self._schema_ready = SchemaMemo()
        self._sessions: weakref.WeakKeyDictionary[Port, SessionState] = weakref.WeakKeyDictionary()
        # Statements whose calls all have constant arguments rewrite to the same SQL every time
        # (the functions are IMMUTABLE): apps repeat statements, and parse + evaluate + deparse is
        # milliseconds. Keyed by database and exact text, bounded by bytes, least recently used first out.
        self._rewritten: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        # Parameter types of deferred statements (a PREPARE round trip each time otherwise).
        self._param_types_cache: OrderedDict[tuple[str, str, tuple[int, ...]], tuple[int, ...]] = OrderedDict()

    def sql_prepared(self, port: Port) -> bool:
        """Whether this session PREPAREd a statement calling ``pgml.*``: its EXECUTEs must come here.

        The session asks this for Query/Parse frames that do not mention ``pgml`` but may hold an
        EXECUTE (:func:`proxy.rewrite.sql_prepare.might_execute`).
        """
        state = self._sessions.get(port)
        return state is not None and state.prepares

    def _state(self, port: Port) -> SessionState:
        state = self._sessions.get(port)
        if state is None:
            state = self._sessions[port] = SessionState()
        return state

    async def decide(self, message: Query | Parse, port: Port) -> Decision:
        try:
            try:
                return await self._decide(message, port)
            except UpstreamError as exc:
                if not self._forget_missing_schema(exc, port) or exc.delivered or port.in_transaction:
                    raise
                # Our own query found schema pgml gone (dropped by another client since it was checked), in
                # no transaction of the client's and with nothing sent to it yet: once more, checking it first.
                return await self._decide(message, port)
        except RecursionError:  # a parse tree nested deeper than Python walks: the server's stack limit, here
            raise StatementTooComplex.nesting() from None
        except UpstreamError as exc:
            self._forget_missing_schema(exc, port)
            raise

    async def _decide(self, message: Query | Parse, port: Port) -> Decision:
        if self.engine is None:
            return FORWARD
        if port.tx_status == "E":
            await port.settled()  # a ROLLBACK may still be on its way
            if port.tx_status == "E":
                return FORWARD  # an aborted transaction rejects the statement itself (25P02)
        mentions = might_use_pgml(message.sql.encode())
        state = self._state(port)
        if not mentions and not state.prepares:
            return FORWARD  # no pgml here, and no statement of this session's that an EXECUTE could run
        if mentions:
            _require_rewritable(port)
        if not port.in_transaction:
            state.changed_schema = False  # the transaction that changed it has ended
        key = (port.database, message.sql)
        sql = self._rewritten.get(key)
        if sql is not None:
            self._rewritten.move_to_end(key)
            await self._ensure_schema(port, state)
            return _rewritten_message(message, sql)
        stmts = await parse(message.sql)
        if stmts is None:
            return FORWARD
        changed = False
        own: tuple[int, ...] = ()
        state.prepares = state.prepares or prepared.prepares_pgml(stmts)
        if state.prepares and prepared.executes(stmts):
            expanded = await prepared.expand(stmts, port, parse)
            if expanded is not None:
                _require_rewritable(port)
                if isinstance(message, Parse):  # substituted again at each Bind: what the name means then
                    return DeferToBind(message.param_types)
                stmts, changed = expanded, True
        long = len(message.sql) > THREAD_PARSE_CHARS  # its tree is walked off the event loop too
        use = await _off_loop(long, schema_use, stmts)
        if use.drops or use.commands:
            self._schema_ready.discard(port.database)
            if port.in_transaction:
                state.changed_schema = True
        if use.commands:
            commands = [schema.extension_command(raw.stmt) for raw in stmts]
            alone = commands[0] if len(stmts) == 1 else None
            if isinstance(message, Query) and alone is not None and alone.alone:
                return await self._extension(alone, port)
            own = tuple(i for i, command in enumerate(commands) if command is not None)
            stmts = tuple(
                raw
                if command is None
                else ast.RawStmt(
                    stmt=command.statement(report=False), stmt_location=raw.stmt_location, stmt_len=raw.stmt_len
                )
                for raw, command in zip(stmts, commands, strict=True)
            )
            changed = True
        if use.references and not use.installs:  # CREATE EXTENSION in the string: the client installs it
            await self._ensure_schema(port, state)
        analysis = await _off_loop(long, _analysis, stmts)
        if changed:
            sql = plan.deparse_all(stmts)
            if analysis is None:
                return _rewritten_message(message, sql, own)
        elif analysis is None:
            return FORWARD
        else:
            sql = message.sql
        if not plan.constant_only(analysis):
            if isinstance(message, Parse):
                return DeferToBind(await self._param_types(message, analysis, port))
            rewritten = await plan.rewrite(analysis, self.engine, port, dependent_ok=True)
            if rewritten is None:  # run on the session already: only ReadyForQuery is left to send
                return Respond(protocol.ReadyForQuery(port.tx_status).encode())
            return Rewritten(Query(rewritten).encode(), own)
        rewritten = await plan.rewrite(analysis, self.engine, port, dependent_ok=False)
        if rewritten is None:  # a call reading the database after the string's first statement: all ran here
            return Respond(protocol.ReadyForQuery(port.tx_status).encode())
        # Not a string with an EXECUTE: what it means depends on the session's prepared statements.
        if not changed and plan.cacheable(analysis) and not prepared.executes(stmts):
            self._remember(key, rewritten)
        return _rewritten_message(message, rewritten, own)

    async def _extension(self, command: schema.ExtensionCommand, port: Port) -> Decision:
        """A query string that is one CREATE / ALTER / DROP EXTENSION pgml: carried out here, answered as the
        server answers it (NOTICE, command tag), or failed with the server's error (nothing done)."""
        results = await port.execute(
            [Statement(plan.deparse(command.statement(report=True))), Statement(schema.OUTCOME_QUERY)]
        )
        ((reported, level),) = results[1].rows
        answer = command.answer(reported)
        if answer is not None and answer.severity == "ERROR":
            raise from_fields(answer.fields())
        frames = b""
        if answer is not None and level in schema.NOTICE_LEVELS:
            frames = protocol.NoticeResponse(answer.fields()).encode()
        frames += protocol.CommandComplete(command.tag).encode()
        return Respond(frames + protocol.ReadyForQuery(port.tx_status).encode())

    def _remember(self, key: tuple[str, str], sql: str) -> None:
        size = len(sql) + len(key[1])
        if size > self._cache_limit // 4:
            return
        self._rewritten[key] = sql
        self._cache_bytes += size
        while self._cache_bytes > self._cache_limit:
            (_, old_text), old_sql = self._rewritten.popitem(last=False)
            self._cache_bytes -= len(old_sql) + len(old_text)

    async def _param_types(self, message: Parse, analysis: plan.Analysis, port: Port) -> tuple[int, ...]:
        """Parameter type OIDs: declared in the Parse, else inferred by the server (PREPARE, read back)."""
        count = max(extended.referenced_params([raw.stmt for raw in analysis.stmts if raw.stmt is not None]) | {0})
        declared = list(message.param_types) + [0] * (count - len(message.param_types))
        if all(declared):
            return tuple(declared)
        key = (port.database, message.sql, tuple(declared))
        if key in self._param_types_cache:
            self._param_types_cache.move_to_end(key)
            return self._param_types_cache[key]
        name = f"pgml_proxy_probe_{port.session_id}"
        stmt = analysis.stmts[0].stmt
        if isinstance(stmt, ast.DeclareCursorStmt):  # PREPARE takes the cursor's query (same $n numbering)
            stmt = stmt.query
        # Undeclared (0) or unfamiliar types stay "unknown" for the server to infer; declared ones win below.
        types = tuple(literals.type_name(PARAM_TYPES.get(oid, "unknown") if oid else "unknown") for oid in declared)
        prepare = plan.deparse(ast.PrepareStmt(name=name, argtypes=types or None, query=stmt))
        results = await port.execute(
            [
                Statement(prepare),
                Statement(
                    "SELECT parameter_types::oid[]::text FROM pg_catalog.pg_prepared_statements"
                    f" WHERE name OPERATOR(pg_catalog.=) '{name}'"
                ),
                Statement(f"DEALLOCATE {name}"),
            ]
        )
        result = results[1]
        inferred = literals.from_text(result.rows[0][0], "bigint[]") if result.rows else []
        oids = tuple(d or int(i or 0) for d, i in zip(declared, inferred + [0] * count, strict=False))
        self._param_types_cache[key] = oids
        if len(self._param_types_cache) > 1024:
            self._param_types_cache.popitem(last=False)
        return oids

    async def decide_bind(self, bind: Bind, sql: str, types: tuple[int, ...], port: Port, private_id: int) -> Decision:
        """Rewrite a deferred statement with this Bind's values into a private statement."""
        try:
            return await self._decide_bind(bind, sql, types, port, private_id)
        except RecursionError:
            raise StatementTooComplex.nesting() from None
        except UpstreamError as exc:
            self._forget_missing_schema(exc, port)
            raise

    async def _decide_bind(self, bind: Bind, sql: str, types: tuple[int, ...], port: Port, private_id: int) -> Decision:
        assert self.engine is not None
        if port.tx_status == "E":
            return FORWARD
        _require_utf8(port)
        stmts = await parse(sql)
        assert stmts is not None  # parsed when its Parse was decided
        if prepared.executes(stmts):  # EXECUTE of a SQL-prepared statement: what it names now
            expanded = await prepared.expand(stmts, port, parse)
            if expanded is None:
                return FORWARD  # gone or changed: the server runs (or refuses) the EXECUTE itself
            stmts = expanded
        await self._ensure_schema(port, self._state(port))
        analysis = await _off_loop(len(sql) > THREAD_PARSE_CHARS, _analysis, stmts)
        if analysis is None:
            return FORWARD
        oids = list(types) + [0] * (len(bind.params) - len(types))
        values, problems = bound_values(bind, oids)
        calls = [site.call for sites in analysis.sites for site in sites]
        for number in extended.referenced_params(calls):
            if number in problems:
                raise problems[number]
        extended.substitute_params(calls, values)
        if not plan.constant_only(analysis):  # the gather query runs as plain SQL: no $n may remain
            roots = [raw.stmt for raw in analysis.stmts if raw.stmt is not None]
            for number in extended.referenced_params(roots):
                if number in problems:
                    raise problems[number]
            extended.substitute_params(roots, values)
        new_sql = await plan.rewrite(analysis, self.engine, port, dependent_ok=True)
        assert new_sql is not None  # one statement: rewritten, never run here
        private = f"pgml_proxy_stmt_{port.session_id}_{private_id}"
        return Rebound(
            parse=Parse(private, new_sql, tuple(oids)).encode(),
            bind=dataclasses.replace(bind, statement=private).encode(),
            close=protocol.Close(protocol.Target.STATEMENT, private).encode(),
            name=private,
        )

    async def _ensure_schema(self, port: Port, state: SessionState) -> None:
        """Install or upgrade schema pgml unless this session already checked it and some session saw it
        complete lately (SCHEMA_RECHECK_SECONDS): a session's first pgml statement always checks."""
        if state.checked and port.database in self._schema_ready:
            return
        installed = await schema.ensure(port)
        state.checked = True
        if not port.in_transaction:
            self._schema_ready.add(port.database)  # committed (or found complete) outside any transaction
        elif installed or state.changed_schema:
            state.changed_schema = True  # a ROLLBACK takes it away again: nothing to tell other sessions
        else:
            self._schema_ready.add(port.database)  # found complete, and not through this transaction

    def _forget_missing_schema(self, error: UpstreamError, port: Port) -> bool:
        """An internal query found something of schema pgml missing: check it again at the next statement."""
        fields = dict(error.fields)
        missing = fields.get("C") in _MISSING_OBJECT and "pgml" in fields.get("M", "")
        if missing:
            self._schema_ready.discard(port.database)
        return missing

    def cancel(self, session: int) -> None:
        if self.engine is not None:
            self.engine.cancel(session)


def _require_utf8(port: Port) -> None:
    """Texts, parameters and rows are read as UTF-8: another client_encoding is refused (0A000).

    The session reports ``client_encoding`` from the server's ParameterStatus (UTF8 when it does not).
    SQL_ASCII (psql's choice in the C locale) converts nothing, so the bytes are the database's UTF-8.
    """
    encoding = port.client_encoding.upper().replace("-", "").replace("_", "")
    if encoding not in ("UTF8", "UNICODE", "SQLASCII"):
        raise FeatureNotSupported(
            "pgml-proxy rewrites statements only with client_encoding UTF8",
            hint="SET client_encoding = 'UTF8' (the default of psql, psycopg, asyncpg and JDBC).",
        )


# Statements longer than this are parsed in a worker thread: pglast builds Python objects for every node
# (a literal ARRAY of a million numbers takes seconds), and the event loop serves every other session.
THREAD_PARSE_CHARS = 64 * 1024


async def parse(sql: str) -> tuple[ast.RawStmt, ...] | None:
    """The statements of ``sql`` (None when pglast cannot parse it: the server reports the syntax error itself).

    Long statements are parsed off the event loop. One with more commas than MAX_ARRAY_ELEMENTS
    (a cheap upper bound of its list elements) is refused with 54000 before it is parsed: its tree
    would take gigabytes.
    """
    if len(sql) > THREAD_PARSE_CHARS and sql.count(",") > literals.MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"statement too large for pgml-proxy to rewrite: more than {literals.MAX_ARRAY_ELEMENTS} list elements",
            hint="Pass large arrays as bound parameters.",
        )
    try:
        if len(sql) <= THREAD_PARSE_CHARS:
            return tuple(pglast.parse_sql(sql))
        return tuple(await asyncio.to_thread(pglast.parse_sql, sql))
    except pglast.parser.ParseError:
        return None


async def _off_loop(long: bool, walk: Callable[[tuple[ast.RawStmt, ...]], _T], stmts: tuple[ast.RawStmt, ...]) -> _T:
    """``walk(stmts)``, in a worker thread for a long statement (Python walks every node of its tree)."""
    return await asyncio.to_thread(walk, stmts) if long else walk(stmts)


def _analysis(stmts: tuple[ast.RawStmt, ...]) -> plan.Analysis | None:
    """:class:`proxy.rewrite.plan.Analysis` of parsed statements; None when no statement calls an engine function.

    The body of a PREPARE is not evaluated (it runs at each EXECUTE, where the proxy substitutes it):
    the PREPARE goes to the server as written.
    """
    sites = [[] if raw.stmt is None or isinstance(raw.stmt, ast.PrepareStmt) else find_calls(raw.stmt) for raw in stmts]
    return plan.Analysis(stmts, sites) if any(sites) else None


def _rewritten_message(message: Query | Parse, sql: str, own: tuple[int, ...] = ()) -> Rewritten:
    if isinstance(message, Parse):
        return Rewritten(Parse(message.name, sql, message.param_types).encode())
    return Rewritten(Query(sql).encode(), own)


def _require_rewritable(port: Port) -> None:
    if not port.standard_strings:
        raise FeatureNotSupported(
            "pgml-proxy rewrites statements only with standard_conforming_strings = on",
            hint="SET standard_conforming_strings = on (the default since PostgreSQL 9.1).",
        )
    _require_utf8(port)


# SQLSTATEs of an internal query that found a pgml object missing (schema, table, function, type).
_MISSING_OBJECT = frozenset({"3F000", "42P01", "42883", "42704"})


@dataclass
class SchemaUse:
    """How a statement string touches schema ``pgml`` (by parsed names only: strings and comments never count)."""

    references: bool = False  # names a relation, function or type in schema pgml: it must be installed
    drops: bool = False  # may drop or rename schema pgml, or drop something in it
    commands: bool = False  # CREATE / ALTER / DROP EXTENSION pgml
    installs: bool = False  # CREATE / ALTER EXTENSION pgml: the string installs it itself


def schema_use(stmts: tuple[ast.RawStmt, ...]) -> SchemaUse:
    use = SchemaUse()

    class Walk(visitors.Visitor):
        def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
            use.references = use.references or node.schemaname == schema.SCHEMA

        def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
            use.references = use.references or _qualified(node.funcname)

        def visit_TypeName(self, ancestors: Any, node: ast.TypeName) -> None:
            use.references = use.references or _qualified(node.names)

        def visit_DropStmt(self, ancestors: Any, node: ast.DropStmt) -> None:
            if node.removeType == enums.ObjectType.OBJECT_SCHEMA:
                use.drops = use.drops or any(_is_pgml(o) for o in node.objects or ())
            elif node.removeType != enums.ObjectType.OBJECT_EXTENSION:
                use.drops = use.drops or any(_qualified(_object_names(o)) for o in node.objects or ())

        def visit_DropOwnedStmt(self, ancestors: Any, node: ast.DropOwnedStmt) -> None:
            use.drops = True  # it drops the schema if that role owns it

        def visit_RenameStmt(self, ancestors: Any, node: ast.RenameStmt) -> None:
            use.drops = use.drops or (node.renameType == enums.ObjectType.OBJECT_SCHEMA and node.subname == "pgml")

    for raw in stmts:
        command = schema.extension_command(raw.stmt)
        if command is not None:
            use.commands = True
            use.installs = use.installs or command.tag != "DROP EXTENSION"
            continue
        if raw.stmt is not None:
            Walk()(raw.stmt)
    return use


def _is_pgml(node: Any) -> bool:
    return isinstance(node, ast.String) and node.sval == schema.SCHEMA


def _qualified(names: Any) -> bool:
    """``pgml.x`` (or ``catalog.pgml.x``) as a name list."""
    return isinstance(names, tuple) and len(names) >= 2 and _is_pgml(names[-2])


def _object_names(node: Any) -> Any:
    """The name list of one object of a DROP (a list of names, a function with arguments, a type)."""
    match node:
        case ast.ObjectWithArgs(objname=names):
            return names
        case ast.TypeName(names=names):
            return names
    return node


def raise_statement(error: BaseException, original: str | None = None) -> str:
    """``DO`` block that makes the server raise ``error`` with its SQLSTATE and texts.

    With the ``original`` query string, the statements before the first one that
    calls ``pgml.*`` are kept in front (a ``BEGIN`` must still begin the transaction).

    The texts travel hex-encoded (``convert_from('\\x…'::bytea, 'UTF8')``), so no
    quoting of client-influenced text is ever involved; pglast quotes the body.
    """
    fields = dict(error_fields(error))
    text = schema.text_expression
    code = fields["C"] if re.fullmatch(r"[0-9A-Z]{5}", fields["C"]) else "XX000"
    options = [f"ERRCODE = '{code}'", f"MESSAGE = {text(fields['M'])}"]
    if "D" in fields:
        options.append(f"DETAIL = {text(fields['D'])}")
    if "H" in fields:
        options.append(f"HINT = {text(fields['H'])}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(options)}; END"
    raising = plan.deparse(ast.DoStmt(args=(ast.DefElem(defname="as", arg=ast.String(sval=body)),)))
    return "; ".join([*_before_first_call(original), raising]) if original else raising


_EXECUTE = re.compile(r"(?i)\bexecute\b")


def _rewritten_here(stmt: ast.Node) -> bool:
    """A statement the proxy rewrites, so one its errors can come from: a pgml call, an EXECUTE (of a pgml
    PREPARE), a CREATE / ALTER / DROP EXTENSION pgml."""
    if prepared.execute_of(stmt) is not None:
        return True
    return bool(find_calls(stmt)) or schema.extension_command(stmt) is not None


def _before_first_call(sql: str) -> list[str]:
    """The statements of ``sql`` before the first one the proxy rewrites (:func:`_rewritten_here`; or one too
    complex to walk), as sent.

    Split by the parser without building trees; only statements that mention pgml are parsed, one by
    one (a long one is taken to be the call: it is not parsed again on the event loop). Empty when no
    statement calls one (the error is then raised alone).
    """
    try:
        texts = list(pglast.split(sql))
    except pglast.parser.ParseError:
        return []
    for index, text in enumerate(texts):
        if _PGML.search(text.encode()) is None and _EXECUTE.search(text) is None:
            continue
        if len(text) <= THREAD_PARSE_CHARS:
            try:
                if not any(_rewritten_here(raw.stmt) for raw in pglast.parse_sql(text) if raw.stmt is not None):
                    continue
            except pglast.parser.ParseError:
                continue
            except StatementTooComplex:  # this statement is where the rewrite stopped
                pass
        return texts[:index]
    return []
