"""Prepared statements whose pgml calls depend on ``$n``: analysed once, rewritten at each Bind.

Owns: the parameter types of such a statement at its Parse (declared, else the ones the server
infers: the statement is prepared under a private name and its types read back; kept per database
and text), the analyses of their texts (:class:`Kept`: kept at the Parse, bounded, shared by all
sessions, so that neither a Bind nor a repeated Parse of the same text parses it again; one analysis per
text and bare pgml names, :mod:`proxy.rewrite.unqualified`), and the
rewrite at a Bind: a copy of the kept analysis with each ``$n`` the calls (and, for per-row calls,
the whole statement) read replaced by the bound value, evaluated like any statement — or, when its
per-row calls all stand in its output, opened as a stream the client's portal reads.

Must not: run anything itself (it yields :mod:`proxy.rewrite.steps` requests), or change a kept
analysis: every Bind rewrites its own copy. A statement that EXECUTEs a SQL-prepared one is
expanded again at each Bind (what the name means then): its analysis is not kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pglast import ast

from engine.pg.text import from_text
from engine.pg.types import PARAM_TYPES
from proxy.rewrite import analyze, constant, evaluate, literals, params, sql_prepare, unqualified
from proxy.rewrite.analyze import THREAD_PARSE_CHARS, Analysis, Bare, SchemaUse
from proxy.rewrite.memo import Memo
from proxy.rewrite.schema_check import SchemaCheck, SessionState
from proxy.rewrite.settings import require_utf8
from proxy.rewrite.steps import LOOK, Run, Steps, off_loop
from proxy.rewrite.streaming import Opener, Streamed
from proxy.rewrite.tree import deparse
from proxy.rewrite.unqualified import Resolution
from proxy.session.exchange import Statement
from proxy.wire.messages import Bind, Parse
from proxy.wire.params import bound_values

KEPT_ANALYSES = 512  # texts of deferred statements whose analysis is kept ...
KEPT_TEXT = 2 * 1024 * 1024  # ... with this many characters of SQL in all (a tree takes ~25 bytes a character)
KEPT_TYPES = 1024  # parameter types of deferred statements (a PREPARE round trip each time otherwise)


@dataclass(frozen=True)
class Kept:
    """A deferred statement text's analysis (never rewritten itself: each use copies it), its schema use,
    and the ``$n`` its calls read and its statements read (the same for every Bind)."""

    analysis: Analysis
    use: SchemaUse
    in_calls: frozenset[int]
    in_statements: frozenset[int]

    @staticmethod
    def of(analysis: Analysis, use: SchemaUse) -> Kept:
        """``analysis`` before any value is put in (the ``$n`` are read from its tree)."""
        calls = [site.call for sites in analysis.sites for site in sites]
        roots = [raw.stmt for raw in analysis.stmts if raw.stmt is not None]
        return Kept(
            analysis, use, frozenset(params.referenced_params(calls)), frozenset(params.referenced_params(roots))
        )

    @staticmethod
    def keepable(stmts: tuple[ast.RawStmt, ...], use: SchemaUse) -> bool:
        """Not an EXECUTE (expanded anew at each Bind) nor a PREPARE calling pgml (the session must note it),
        nor a string that changes schema pgml: each Parse of such a text is decided in full."""
        return not (sql_prepare.executes(stmts) or sql_prepare.prepares_pgml(stmts) or use.drops or use.commands)


class Deferred:
    """The analyses and parameter types of deferred statements; one per rewriter, shared by its sessions."""

    def __init__(self, schema: SchemaCheck) -> None:
        self._schema = schema
        self._kept: Memo[str, Kept] = Memo(KEPT_ANALYSES, KEPT_TEXT, lambda sql, kept: len(sql))
        self._types: Memo[tuple[str, str, tuple[int, ...]], tuple[int, ...]] = Memo(KEPT_TYPES)

    def keep(self, sql: str, kept: Kept) -> None:
        self._kept.put(sql, kept)

    def kept(self, sql: str, bare: Bare) -> Kept | None:
        """The analysis of a deferred statement ``sql`` kept at an earlier Parse (None: not kept), for a session on
        whose search_path the names ``bare`` are pgml's (:mod:`proxy.rewrite.unqualified`)."""
        kept = self._kept.get(sql)
        return kept if kept is not None and kept.analysis.bare == bare else None

    def param_types(self, message: Parse, kept: Kept) -> Steps[tuple[int, ...]]:
        """Parameter type OIDs: declared in the Parse, else inferred by the server (PREPARE, read back)."""
        count = max(kept.in_statements | {0})
        declared = list(message.param_types) + [0] * (count - len(message.param_types))
        if all(declared):
            return tuple(declared)
        facts = yield LOOK
        key = (facts.database, message.sql, tuple(declared))
        known = self._types.get(key)
        if known is not None:
            return known
        name = f"pgml_proxy_probe_{facts.session_id}"
        stmt = kept.analysis.stmts[0].stmt
        if isinstance(stmt, ast.DeclareCursorStmt):  # PREPARE takes the cursor's query (same $n numbering)
            stmt = stmt.query
        # Undeclared (0) or unfamiliar types stay "unknown" for the server to infer; declared ones win below.
        types = tuple(literals.type_name(PARAM_TYPES.get(oid, "unknown") if oid else "unknown") for oid in declared)
        prepare = deparse(ast.PrepareStmt(name=name, argtypes=types or None, query=stmt))
        results = yield Run(
            (
                Statement(prepare),
                Statement(
                    "SELECT parameter_types::oid[]::text FROM pg_catalog.pg_prepared_statements"
                    f" WHERE name OPERATOR(pg_catalog.=) '{name}'"
                ),
                Statement(f"DEALLOCATE {name}"),
            )
        )
        result = results[1]
        inferred = from_text(result.rows[0][0], "bigint[]") if result.rows else []
        oids = tuple(d or int(i or 0) for d, i in zip(declared, inferred + [0] * count, strict=False))
        self._types.put(key, oids)
        return oids

    def rewrite(
        self, bind: Bind, sql: str, types: tuple[int, ...], state: SessionState, opener: Opener | None = None
    ) -> Steps[tuple[str, tuple[int, ...]] | Streamed | None]:
        """The deferred statement ``sql`` with this Bind's values: its SQL and parameter types (None: as is), or,
        when ``opener`` is given and its per-row calls all stand in its output, its row portal opened for the
        client's portal to read (:mod:`proxy.rewrite.streaming`)."""
        facts = yield LOOK
        if facts.tx_status == "E":
            return None
        require_utf8(facts)
        long = len(sql) > THREAD_PARSE_CHARS
        found = yield from self._analysis(sql, long, state.unqualified)
        if found is None:  # an EXECUTE of a statement that is gone or changed: the server runs it itself
            return None
        analysis, kept = found
        yield from self._schema.ensure(state)
        if not analysis.calls:
            return None
        oids = list(types) + [0] * (len(bind.params) - len(types))
        _substitute(analysis, kept, bind, oids)
        new_sql = yield from evaluate.rewrite(analysis, dependent_ok=True, stream=opener)
        if new_sql is None:  # one statement: rewritten, or opened as a stream
            assert opener is not None and opener.streamed is not None
            return opener.streamed
        return new_sql, tuple(oids)

    def _analysis(self, sql: str, long: bool, resolution: Resolution) -> Steps[tuple[Analysis, Kept] | None]:
        """A fresh analysis of ``sql`` to rewrite — a copy of the kept one, else of a new parse (its bare pgml calls
        those its Parse found) — and what is kept of it (None: forward the Bind)."""
        bare = resolution.texts.get(sql, unqualified.EMPTY)
        kept = self.kept(sql, bare)
        if kept is None:
            stmts = yield from unqualified.parser(bare)(sql)
            assert stmts is not None  # parsed when its Parse was decided
            use = analyze.schema_use(stmts)
            if sql_prepare.executes(stmts):  # EXECUTE of a SQL-prepared statement: what it names now
                expanded = yield from sql_prepare.expand(stmts, unqualified.resolving(resolution))
                if expanded is None:
                    return None
                fresh = yield from off_loop(long, functools.partial(analyze.of, expanded, bare))
                return fresh, Kept.of(fresh, use)  # not kept: expanded anew at the next Bind
            fresh = yield from off_loop(long, functools.partial(analyze.of, stmts, bare))
            kept = Kept.of(fresh, use)
            if Kept.keepable(stmts, use):
                self._kept.put(sql, kept)
        copied: Analysis = yield from off_loop(long, kept.analysis.copy)
        return copied, kept


def _substitute(analysis: Analysis, kept: Kept, bind: Bind, oids: list[int]) -> None:
    """This Bind's values in place of the ``$n`` the calls read (and all of them when a call needs the server)."""
    values, problems = bound_values(bind, oids)
    for number in sorted(kept.in_calls):
        if number in problems:
            raise problems[number]
    params.substitute_params([site.call for sites in analysis.sites for site in sites], values)
    if not constant.all_constant(analysis.sites):  # the gather query runs as plain SQL: no $n may remain
        for number in sorted(kept.in_statements):
            if number in problems:
                raise problems[number]
        params.substitute_params([raw.stmt for raw in analysis.stmts if raw.stmt is not None], values)
