"""The rewrite seam: for every Query/Parse that mentions ``pgml``, one decision.

Owns: the cheap ``pgml`` pre-check (a frame the proxy cannot decode is the server's
to answer), the :class:`Decision` values a session acts on (forward as is / forward
rewritten frames / answer the client / fail), the decision itself (session checks,
schema check, then :mod:`proxy.plan` — long statements parsed off the event loop,
nesting too deep for Python refused with 54001), and the statement that makes the
server raise a proxy error (so both sides agree on the transaction).

Must not: write to sockets. The session executes decisions; this module only
decides, talking to the upstream through :class:`proxy.internal.Port`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass

import pglast
from pglast import ast, enums

from engine.api import DatabaseError, Engine, EngineError
from proxy import extended, literals, plan, protocol, schema
from proxy.calls import find_calls
from proxy.errors import (
    FeatureNotSupported,
    ProgramLimitExceeded,
    ProtocolViolation,
    ProxyError,
    StatementTooComplex,
    error_fields,
)
from proxy.internal import Port, Statement
from proxy.protocol import Parse, Query

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)
_QUERY, _PARSE = ord("Q"), ord("P")


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive).

    False for one whole Query or Parse frame that does not decode (text that is not
    UTF-8, a missing terminator): it is not the proxy's to rewrite, and the server
    answers it with its own error (22021, 08P01) and keeps the session.
    """
    return _PGML.search(raw) is not None and not undecodable(raw)


def undecodable(raw: bytes) -> bool:
    """One complete Query/Parse frame that :mod:`proxy.protocol` cannot decode (a chunk of several: False)."""
    if len(raw) < 5 or raw[0] not in (_QUERY, _PARSE) or int.from_bytes(raw[1:5], "big") + 1 != len(raw):
        return False
    frame = protocol.Frame(raw[0], raw)
    try:
        protocol.decode_query(frame) if raw[0] == _QUERY else protocol.decode_parse(frame)
    except ProtocolViolation:
        return True
    return False


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
    """Send these frames upstream in place of the original."""

    frames: bytes


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


class Rewriter:
    """Decides what happens to a statement that mentions ``pgml``; one per server, shared by sessions."""

    def __init__(self, engine: Engine | None = None, cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.engine = engine
        self._schema_ready: set[str] = set()
        # Statements whose calls all have constant arguments rewrite to the same SQL every time
        # (the functions are IMMUTABLE): apps repeat statements, and parse + evaluate + deparse is
        # milliseconds. Keyed by database and exact text, bounded by bytes, least recently used first out.
        self._rewritten: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        # Parameter types of deferred statements (a PREPARE round trip each time otherwise).
        self._param_types_cache: OrderedDict[tuple[str, str, tuple[int, ...]], tuple[int, ...]] = OrderedDict()

    async def decide(self, message: Query | Parse, port: Port) -> Decision:
        try:
            return await self._decide(message, port)
        except RecursionError:  # a parse tree nested deeper than Python walks: the server's stack limit, here
            raise StatementTooComplex.nesting() from None

    async def _decide(self, message: Query | Parse, port: Port) -> Decision:
        if self.engine is None:
            return FORWARD
        if port.tx_status == "E":
            await port.settled()  # a ROLLBACK may still be on its way
            if port.tx_status == "E":
                return FORWARD  # an aborted transaction rejects the statement itself (25P02)
        if not port.standard_strings and might_use_pgml(message.sql.encode()):
            raise FeatureNotSupported(
                "pgml-proxy rewrites statements only with standard_conforming_strings = on",
                hint="SET standard_conforming_strings = on (the default since PostgreSQL 9.1).",
            )
        _require_utf8(port)
        key = (port.database, message.sql)
        sql = self._rewritten.get(key)
        if sql is None:
            analysis = await analyze(message.sql)
            if analysis is None:
                return FORWARD
            await self._ensure_schema(port)
            if not plan.constant_only(analysis):
                if isinstance(message, Parse):
                    return DeferToBind(await self._param_types(message, analysis, port))
                rewritten = await plan.rewrite(analysis, self.engine, port, dependent_ok=True)
                if rewritten is None:  # run on the session already: only ReadyForQuery is left to send
                    return Respond(protocol.encode_ready(protocol.ReadyForQuery(port.tx_status)))
                return Rewritten(protocol.encode_query(Query(rewritten)))
            sql = await plan.rewrite(analysis, self.engine, port, dependent_ok=False)
            assert sql is not None  # constants only: nothing runs on the session
            if plan.cacheable(analysis):
                self._remember(key, sql)
        else:
            self._rewritten.move_to_end(key)
        if isinstance(message, Parse):
            return Rewritten(protocol.encode_parse(Parse(message.name, sql, message.param_types)))
        return Rewritten(protocol.encode_query(Query(sql)))

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
        # Undeclared (0) or unfamiliar types stay "unknown" for the server to infer; declared ones win below.
        types = tuple(
            literals.type_name(extended.PARAM_TYPES.get(oid, "unknown") if oid else "unknown") for oid in declared
        )
        prepare = plan.deparse(ast.PrepareStmt(name=name, argtypes=types or None, query=stmt))
        results = await port.execute(
            [
                Statement(prepare),
                Statement(f"SELECT parameter_types::oid[]::text FROM pg_prepared_statements WHERE name = '{name}'"),
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

    async def decide_bind(
        self, bind: extended.Bind, sql: str, types: tuple[int, ...], port: Port, private_id: int
    ) -> Decision:
        """Rewrite a deferred statement with this Bind's values into a private statement."""
        try:
            return await self._decide_bind(bind, sql, types, port, private_id)
        except RecursionError:
            raise StatementTooComplex.nesting() from None

    async def _decide_bind(
        self, bind: extended.Bind, sql: str, types: tuple[int, ...], port: Port, private_id: int
    ) -> Decision:
        assert self.engine is not None
        if port.tx_status == "E":
            return FORWARD
        _require_utf8(port)
        analysis = await analyze(sql)
        assert analysis is not None
        oids = list(types) + [0] * (len(bind.params) - len(types))
        values, problems = extended.bound_values(bind, oids)
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
            parse=protocol.encode_parse(Parse(private, new_sql, tuple(oids))),
            bind=extended.encode_bind(dataclasses.replace(bind, statement=private)),
            close=protocol.encode(b"C", b"S" + private.encode() + b"\0"),
            name=private,
        )

    async def _ensure_schema(self, port: Port) -> None:
        key = f"{port.database}"
        if key not in self._schema_ready:
            committed = not port.in_transaction  # inside a transaction, a ROLLBACK takes the schema away again
            await schema.ensure(port)
            if committed:
                self._schema_ready.add(key)

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


async def analyze(sql: str) -> plan.Analysis | None:
    """:func:`proxy.plan.analyze`, off the event loop for long statements, bounded in list elements.

    A pgml statement with more commas than MAX_ARRAY_ELEMENTS (a cheap upper bound of its list
    elements) is refused with 54000 before it is parsed: its tree would take gigabytes.
    """
    if len(sql) <= THREAD_PARSE_CHARS:
        return plan.analyze(sql)
    if sql.count(",") > literals.MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"statement too large for pgml-proxy to rewrite: more than {literals.MAX_ARRAY_ELEMENTS} list elements",
            hint="Pass large arrays as bound parameters.",
        )
    return await asyncio.to_thread(plan.analyze, sql)


def raise_statement(error: BaseException, original: str | None = None) -> str:
    """``DO`` block that makes the server raise ``error`` with its SQLSTATE and texts.

    With the ``original`` query string, the statements before the first one that
    calls ``pgml.*`` are kept in front (a ``BEGIN`` must still begin the transaction).

    The texts travel hex-encoded (``convert_from('\\x…'::bytea, 'UTF8')``), so no
    quoting of client-influenced text is ever involved; pglast quotes the body.
    """
    fields = dict(error_fields(error))

    def text(value: str) -> str:
        return f"convert_from('\\x{value.encode().hex()}'::bytea, 'UTF8')"

    code = fields["C"] if re.fullmatch(r"[0-9A-Z]{5}", fields["C"]) else "XX000"
    options = [f"ERRCODE = '{code}'", f"MESSAGE = {text(fields['M'])}"]
    if "D" in fields:
        options.append(f"DETAIL = {text(fields['D'])}")
    if "H" in fields:
        options.append(f"HINT = {text(fields['H'])}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(options)}; END"
    raising = plan.deparse(ast.DoStmt(args=(ast.DefElem(defname="as", arg=ast.String(sval=body)),)))
    return "; ".join([*_before_first_call(original), raising]) if original else raising


def _before_first_call(sql: str) -> list[str]:
    """The statements of ``sql`` before the first one calling ``pgml.*`` (or too complex to walk), as sent.

    Split by the parser without building trees; only statements that mention pgml are parsed, one by
    one (a long one is taken to be the call: it is not parsed again on the event loop). Empty when no
    statement calls one (the error is then raised alone).
    """
    try:
        texts = list(pglast.split(sql))
    except pglast.parser.ParseError:
        return []
    for index, text in enumerate(texts):
        if _PGML.search(text.encode()) is None:
            continue
        if len(text) <= THREAD_PARSE_CHARS:
            try:
                if not any(find_calls(raw.stmt) for raw in pglast.parse_sql(text) if raw.stmt is not None):
                    continue
            except pglast.parser.ParseError:
                continue
            except StatementTooComplex:  # this statement is where the rewrite stopped
                pass
        return texts[:index]
    return []
