"""SQL-level ``PREPARE`` / ``EXECUTE`` of statements that call ``pgml.*``: an EXECUTE becomes its statement.

Owns: finding, for each ``EXECUTE name (args)`` of a statement string (also ``CREATE TABLE …
AS EXECUTE``), the statement it runs — a PREPARE earlier in the same string, else the session's
own row of ``pg_prepared_statements`` (the server's catalogue is the truth: a DEALLOCATE, a
DISCARD ALL, a PREPARE that failed are all seen there) — and, when that statement calls
``pgml.*``, the statement itself with each ``$n`` replaced by ``CAST(<argument> AS <parameter
type>)`` as AST nodes (columns named as EXECUTE's would be), for the rewriter to evaluate like
any statement. The PREPARE itself goes to the server unchanged: it checks it against the stub
signatures, and the statement then exists there (``pg_prepared_statements`` shows it).

Must not: run anything itself (it yields :mod:`proxy.rewrite.steps` requests: the catalogue
reads), keep copies of prepared statements from one statement string to the next, evaluate
pgml calls (the rewriter does, on the statement returned), or answer for the server: an EXECUTE
that cannot be substituted exactly (no such statement, a wrong number of arguments, a subquery,
column, aggregate or parameter in an argument — the server evaluates EXECUTE's arguments without
the Bind's parameters) is left as it is, for the server to run or to refuse with its own error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, enums, visitors

from engine.pg.text import from_text
from proxy.errors import ProgramLimitExceeded
from proxy.rewrite import literals
from proxy.rewrite.calls import find_calls
from proxy.rewrite.params import referenced_params
from proxy.rewrite.steps import LOOK, Run, Steps
from proxy.rewrite.tree import clone, deparse
from proxy.session.exchange import Statement

_EXECUTE = re.compile(rb"(?i)execute")
# The session's own prepared statements: their source text (the whole query string of a SQL PREPARE) and
# the parameter types the server settled on (declared or inferred), as type names it reads back.
LOOKUP = "SELECT statement, from_sql, parameter_types::text[] FROM pg_prepared_statements WHERE name = $1"
UNNAMED_COLUMN = "?column?"  # what PostgreSQL names an output column that is a bare parameter

Parser = Callable[[str], Steps[tuple[ast.RawStmt, ...] | None]]


def might_execute(raw: bytes) -> bool:
    """True when a Query/Parse frame's text may hold an EXECUTE (cheap, allocation-free)."""
    return _EXECUTE.search(raw) is not None


def prepares_pgml(stmts: Sequence[ast.RawStmt]) -> bool:
    """Some statement is a PREPARE of a statement that calls ``pgml.*``."""
    return any(isinstance(raw.stmt, ast.PrepareStmt) and _calls_pgml(raw.stmt.query) for raw in stmts)


def executes(stmts: Sequence[ast.RawStmt]) -> bool:
    return any(execute_of(raw.stmt) is not None for raw in stmts)


@dataclass(frozen=True)
class Prepared:
    """A prepared statement: its query (never changed: copied for each EXECUTE) and parameter types.

    ``complete``: ``types`` has every parameter (the server's). A PREPARE of the same string, not run
    yet, has only those it declares; the server infers the others (:func:`_inferred`).
    """

    query: ast.Node
    types: tuple[ast.TypeName, ...]
    complete: bool = True


def expand(stmts: tuple[ast.RawStmt, ...], parse: Parser) -> Steps[tuple[ast.RawStmt, ...] | None]:
    """``stmts`` with each EXECUTE of a statement calling ``pgml.*`` replaced by that statement (None: none)."""
    in_string: dict[str, Prepared | None] = {}  # PREPAREs before this point of the string (None: deallocated)
    cleared = False  # DEALLOCATE ALL / DISCARD ALL before this point: the catalogue's statements are gone
    out = list(stmts)
    changed = False
    for index, raw in enumerate(stmts):
        node = raw.stmt
        match node:
            case ast.PrepareStmt(name=str(name), query=query) if query is not None:
                in_string[name] = Prepared(query, tuple(node.argtypes or ()), complete=False)
                continue
            case ast.DeallocateStmt(isall=True) | ast.DiscardStmt(target=enums.DiscardMode.DISCARD_ALL):
                in_string, cleared = dict.fromkeys(in_string), True
                continue
            case ast.DeallocateStmt(name=str(name)):
                in_string[name] = None
                continue
        execute = execute_of(node)
        if execute is None or execute.name is None:
            continue
        if execute.name in in_string:
            target = in_string[execute.name]
        else:
            target = None if cleared else (yield from lookup(execute.name, parse))
        if target is None or not _calls_pgml(target.query):
            continue
        if not target.complete and max(referenced_params([target.query]) | {0}) > len(target.types):
            target = yield from _inferred(target)
        replaced = substitute(target, tuple(execute.params or ()))
        if replaced is None:
            continue
        if isinstance(node, ast.CreateTableAsStmt):
            if not isinstance(replaced, ast.SelectStmt):
                continue  # the server's own error: the prepared statement is not a SELECT
            replaced = ast.CreateTableAsStmt(
                query=replaced,
                into=node.into,
                objtype=node.objtype,
                is_select_into=node.is_select_into,
                if_not_exists=node.if_not_exists,
            )
        out[index] = ast.RawStmt(stmt=replaced, stmt_location=raw.stmt_location, stmt_len=raw.stmt_len)
        changed = True
    return tuple(out) if changed else None


def lookup(name: str, parse: Parser) -> Steps[Prepared | None]:
    """The session's prepared statement ``name`` from ``pg_prepared_statements`` (None: there is none)."""
    (result,) = yield Run((Statement(LOOKUP, params=(name,)),))
    if not result.rows:
        return None
    text, from_sql, type_names = result.rows[0]
    try:
        parsed = yield from parse(text or "")
    except ProgramLimitExceeded:  # a huge string it was prepared from: not one the proxy would rewrite
        return None
    if parsed is None:
        return None
    if from_sql == "t":  # the text is the whole query string that held the PREPARE: the last one of that name
        found = [
            raw.stmt.query
            for raw in parsed
            if isinstance(raw.stmt, ast.PrepareStmt) and raw.stmt.name == name and raw.stmt.query is not None
        ]
        query = found[-1] if found else None
    else:  # a statement prepared with a Parse message: the text is the statement
        query = parsed[0].stmt if len(parsed) == 1 else None
    if query is None:
        return None
    names = from_text(type_names, "text[]") if type_names else []
    return Prepared(query, tuple(_type_name(str(t)) for t in names))


def _inferred(target: Prepared) -> Steps[Prepared]:
    """A PREPARE of this string with undeclared parameters: the types the server infers for them.

    The statement is prepared under a private name, its types read back and the name released,
    exactly as the client's PREPARE will be (an error here is the one that PREPARE would raise).
    """
    facts = yield LOOK
    name = f"pgml_proxy_probe_{facts.session_id}"
    prepare = ast.PrepareStmt(name=name, argtypes=target.types or None, query=target.query)
    results = yield Run(
        (
            Statement(deparse(prepare)),
            Statement("SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = $1", params=(name,)),
            Statement(f"DEALLOCATE {name}"),
        )
    )
    rows = results[1].rows
    names = from_text(rows[0][0], "text[]") if rows and rows[0][0] else []
    return Prepared(target.query, tuple(_type_name(str(t)) for t in names))


def substitute(target: Prepared, args: tuple[ast.Node, ...]) -> ast.Node | None:
    """The prepared query with ``$n`` -> ``CAST(args[n-1] AS type n)`` (None: leave EXECUTE to the server)."""
    if len(args) != len(target.types) or any(_refused(arg) for arg in args):
        return None
    query: Any = clone(target.query, {})
    types = target.types

    class Names(visitors.Visitor):
        def visit_ResTarget(self, ancestors: Any, node: ast.ResTarget) -> None:
            if node.name is None and isinstance(node.val, ast.ParamRef):
                node.name = UNNAMED_COLUMN  # EXECUTE's column is named after the parameter, not the cast

    class Swap(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> Any:
            number = int(node.number or 0)
            if not 0 < number <= len(types):
                return None  # no such parameter: the server's own error, from the statement as written
            return ast.TypeCast(arg=clone(args[number - 1], {}), typeName=clone(types[number - 1], {}))

    Names()(query)
    Swap()(query)
    return query  # type: ignore[no-any-return]


def _refused(arg: ast.Node) -> bool:
    """Whether the server refuses this EXECUTE argument (42P02 for a ``$n``: no parameters there)."""
    found = False

    class Check(visitors.Visitor):
        def visit_SubLink(self, ancestors: Any, node: ast.SubLink) -> None:
            nonlocal found
            found = True

        def visit_ColumnRef(self, ancestors: Any, node: ast.ColumnRef) -> None:
            nonlocal found
            found = True

        def visit_GroupingFunc(self, ancestors: Any, node: ast.GroupingFunc) -> None:
            nonlocal found
            found = True

        def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
            nonlocal found
            if node.agg_star or node.agg_distinct or node.agg_order or node.agg_filter or node.over:
                found = True

        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            nonlocal found
            found = True

    Check()(ast.ResTarget(val=arg))
    return found


def _calls_pgml(node: ast.Node | None) -> bool:
    return node is not None and bool(find_calls(node))


def execute_of(node: ast.Node | None) -> ast.ExecuteStmt | None:
    """The EXECUTE of ``EXECUTE p(…)`` or ``CREATE TABLE … AS EXECUTE p(…)``, else None."""
    match node:
        case ast.ExecuteStmt():
            return node
        case ast.CreateTableAsStmt(query=ast.ExecuteStmt() as execute):
            return execute
    return None


def _type_name(spelled: str) -> ast.TypeName:
    """A type as ``regtype`` spells it (``character varying``, ``pgml.task``, ``"char"``) -> its TypeName."""
    return clone(literals.type_name(spelled), {})  # type: ignore[no-any-return]
