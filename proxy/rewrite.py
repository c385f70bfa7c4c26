"""The rewrite seam: for every Query/Parse that mentions ``pgml``, one decision.

Owns: the cheap ``pgml`` pre-check, the :class:`Decision` values a session acts on
(forward as is / forward rewritten frames / answer the client / fail), the
decision itself (schema check, then :mod:`proxy.plan`), and the statement that
makes the server raise a proxy error (so both sides agree on the transaction).

Must not: write to sockets. The session executes decisions; this module only
decides, talking to the upstream through :class:`proxy.internal.Port`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast, enums

from engine.api import DatabaseError, Engine, EngineError
from proxy import extended, literals, plan, protocol, schema
from proxy.errors import FeatureNotSupported, ProxyError, error_fields
from proxy.internal import Port, Statement
from proxy.protocol import Parse, Query

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive)."""
    return _PGML.search(raw) is not None


_DEALLOCATE = re.compile(rb"(?i)dealloc|discard")
ALL = None


def might_deallocate(raw: bytes) -> bool:
    """True when the text may hold DEALLOCATE or DISCARD (SQL that drops prepared statements)."""
    return _DEALLOCATE.search(raw) is not None


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
        key = (port.database, message.sql)
        sql = self._rewritten.get(key)
        if sql is None:
            analysis = plan.analyze(message.sql)
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
        assert self.engine is not None
        if port.tx_status == "E":
            return FORWARD
        analysis = plan.analyze(sql)
        assert analysis is not None
        oids = list(types) + [0] * (len(bind.params) - len(types))
        values: dict[int, tuple[Any, int]] = {}
        problems: dict[int, Exception] = {}
        for i, data in enumerate(bind.params):
            try:
                values[i + 1] = (extended.param_value(data, bind.format_of(i) == 1, oids[i]), oids[i])
            except ProxyError as exc:
                problems[i + 1] = exc
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
            await schema.ensure(port)
            self._schema_ready.add(key)

    def cancel(self, session: int) -> None:
        if self.engine is not None:
            self.engine.cancel(session)


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
    analysis = plan.analyze(original) if original else None
    if analysis is None:
        return raising
    first = next(i for i, sites in enumerate(analysis.sites) if sites)
    return "; ".join([*(plan.deparse(raw) for raw in analysis.stmts[:first]), raising])
