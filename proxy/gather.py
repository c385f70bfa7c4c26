"""The query that reads the distinct argument tuples of a per-row ``pgml.*`` call.

Owns: building ``SELECT DISTINCT <arguments> FROM …`` over the rows the call's
statement sees (its FROM, WHERE, GROUP BY, CTEs), for calls in a SELECT, UPDATE,
DELETE, a JOIN condition, or a set-returning call in FROM that reads other FROM items.

Must not: run anything or change the statement; the nodes it reuses stay shared.
"""

from __future__ import annotations

from typing import Any

from pglast import ast, visitors

from proxy.calls import Site, bind, pgml_function
from proxy.errors import FeatureNotSupported


def _gather_join(site: Site, targets: tuple[ast.ResTarget, ...], args: list[ast.Node]) -> ast.SelectStmt:
    """A call in a JOIN condition: its arguments must come from one table of the join, read on its own."""
    qualifiers: set[str | None] = set()

    class Refs(visitors.Visitor):
        def visit_ColumnRef(self, ancestors: Any, ref: ast.ColumnRef) -> None:
            names = [f.sval for f in ref.fields or () if isinstance(f, ast.String)]
            qualifiers.add(names[0] if len(names) > 1 else None)

    for arg in args:
        Refs()(ast.ResTarget(val=arg))
    tables = [t for t in _range_vars(getattr(site.stmt, "fromClause", None)) if _visible_name(t) in qualifiers]
    if None in qualifiers or len(qualifiers) != 1 or len(tables) != 1:
        raise FeatureNotSupported(
            f"pgml.{site.function}() in a JOIN condition needs arguments from one table, qualified by its name",
            hint="Write e.g. JOIN b ON pgml.f(…, a.col) …, with every column prefixed by the same table alias.",
        )
    with_clause = ast.WithClause(ctes=tuple(site.ctes), recursive=False) if site.ctes else None
    return ast.SelectStmt(distinctClause=(None,), targetList=targets, fromClause=(tables[0],), withClause=with_clause)


def _range_vars(node: Any) -> list[ast.RangeVar]:
    """Tables of a FROM clause, through joins."""
    match node:
        case tuple() | list():
            return [t for item in node for t in _range_vars(item)]
        case ast.RangeVar():
            return [node]
        case ast.JoinExpr(larg=left, rarg=right):
            return _range_vars(left) + _range_vars(right)
    return []


def _visible_name(table: ast.RangeVar) -> str | None:
    return table.alias.aliasname if table.alias is not None else table.relname


def _gather_lateral(site: Site, targets: tuple[ast.ResTarget, ...]) -> ast.SelectStmt:
    """A set-returning call in FROM whose arguments come from the other FROM items (implicitly LATERAL)."""
    stmt, rf = site.stmt, site.range_function
    items = getattr(stmt, "fromClause", None) or ()
    if not isinstance(stmt, ast.SelectStmt) or not any(item is rf for item in items):
        raise FeatureNotSupported(
            f"pgml.{site.function}() with column arguments in FROM must be a plain item of the FROM list",
            hint="Write FROM t, pgml.f(…, t.col) AS x, or call it in the SELECT list.",
        )
    if rf is not None and (len(rf.functions or ()) != 1 or rf.ordinality):
        raise FeatureNotSupported(f"pgml.{site.function}() in ROWS FROM or WITH ORDINALITY")
    others = tuple(item for item in items if item is not rf)
    if not others:
        raise FeatureNotSupported(f"pgml.{site.function}() in FROM refers to columns of no other FROM item")
    with_clause = ast.WithClause(ctes=tuple(site.ctes), recursive=False) if site.ctes else None
    # The WHERE clause narrows the rows unless it refers to the call's own output (then: all rows, a superset).
    where = stmt.whereClause if not _mentions_output(stmt.whereClause, site) else None
    return ast.SelectStmt(
        distinctClause=(None,), targetList=targets, fromClause=others, whereClause=where, withClause=with_clause
    )


def _mentions_output(node: ast.Node | None, site: Site) -> bool:
    """Whether ``node`` may refer to the columns of the FROM-item call of ``site``."""
    if node is None:
        return False
    rf = site.range_function
    alias = rf.alias.aliasname if rf is not None and rf.alias is not None else site.function
    columns = {name for name, _ in _output_columns(site)}
    found = False

    class Refs(visitors.Visitor):
        def visit_ColumnRef(self, ancestors: Any, ref: ast.ColumnRef) -> None:
            nonlocal found
            names = [f.sval for f in ref.fields or () if isinstance(f, ast.String)]
            if (len(names) > 1 and names[0] == alias) or (len(names) == 1 and names[0] in columns | {alias}):
                found = True

    Refs()(node)
    return found


def _output_columns(site: Site) -> tuple[tuple[str, str], ...]:
    return next((s.columns for s in bind(site)[0] if s.columns), ())


def _without_calls(node: Any) -> Any:
    """``node``, or None when it holds a pgml call of its own (replaced later: the rows are then a superset)."""
    if node is None:
        return None
    found = False

    class Calls(visitors.Visitor):
        def visit_FuncCall(self, ancestors: Any, call: ast.FuncCall) -> None:
            nonlocal found
            found = found or pgml_function(call) is not None

    Calls()(ast.ResTarget(val=node) if not isinstance(node, tuple) else ast.SelectStmt(groupClause=node))
    return None if found else node


def gather_statement(site: Site, args: list[ast.Node]) -> ast.SelectStmt:
    """``SELECT DISTINCT <args> FROM …`` over the rows the call's statement sees."""
    stmt, clause = site.stmt, site.clause
    if site.range_function is not None:
        return _gather_lateral(site, tuple(ast.ResTarget(val=a) for a in args))
    if site.in_join:
        return _gather_join(site, tuple(ast.ResTarget(val=a) for a in args), args)
    if any(not isinstance(cte.ctequery, ast.SelectStmt) for cte in site.ctes):
        raise FeatureNotSupported("per-row pgml calls in a statement with a data-modifying WITH query")
    targets = tuple(ast.ResTarget(val=a) for a in args)
    with_clause = ast.WithClause(ctes=tuple(site.ctes), recursive=False) if site.ctes else None
    where = None if clause == "whereClause" else _without_calls(getattr(stmt, "whereClause", None))
    match stmt:
        case ast.SelectStmt(valuesLists=values) if values:
            return ast.SelectStmt(targetList=targets, withClause=with_clause)
        case ast.SelectStmt():
            return ast.SelectStmt(
                distinctClause=(None,),
                targetList=targets,
                fromClause=stmt.fromClause,
                whereClause=where,
                groupClause=None if clause == "groupClause" else _without_calls(stmt.groupClause),
                havingClause=None if clause == "havingClause" else _without_calls(stmt.havingClause),
                withClause=with_clause,
            )
        case ast.UpdateStmt():
            sources = (stmt.relation, *(stmt.fromClause or ()))
            return ast.SelectStmt(distinctClause=(None,), targetList=targets, fromClause=sources, whereClause=where,
                                  withClause=with_clause)  # fmt: skip
        case ast.DeleteStmt():
            sources = (stmt.relation, *(stmt.usingClause or ()))
            return ast.SelectStmt(distinctClause=(None,), targetList=targets, fromClause=sources, whereClause=where,
                                  withClause=with_clause)  # fmt: skip
    raise FeatureNotSupported(
        f"pgml.{site.function}() with column arguments is not supported in this part of a statement ({clause})"
    )
