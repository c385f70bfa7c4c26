"""The query that reads the distinct argument tuples of a per-row ``pgml.*`` call.

Owns: building ``SELECT DISTINCT <arguments> FROM …`` over the rows the call's
statement sees (its FROM, WHERE, GROUP BY, HAVING, and the CTEs those read), for calls
in a SELECT, UPDATE, DELETE, VALUES, a JOIN condition, or a set-returning call in FROM
that reads other FROM items; arguments that read no row (scalar subqueries, CTE
lookups, expressions over parameters) give a query with no FROM: one row.

Which CTEs a gather query carries: only those it reads, directly or through other CTEs,
so a data-modifying CTE of the statement never runs twice. Every part of one statement
sees the same snapshot (PostgreSQL docs, "Data-Modifying Statements in WITH"), so rows
read before the statement runs are the rows it reads — except the RETURNING rows of a
data-modifying CTE, which exist only once it ran: a call reading those is refused (0A000).

Must not: run anything or change the statement; the nodes it reuses stay shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pglast import ast, visitors

from proxy.calls import STATEMENTS, Site, bind, nodes_under
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
    return _select(site, targets, from_clause=(tables[0],))


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
    """A set-returning call in FROM whose arguments come from the other FROM items (implicitly LATERAL).

    With no other FROM item (``FROM pgml.chunk((SELECT …), (SELECT …))``) the arguments read no row: one row.
    """
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
        return _select(site, targets)
    # The WHERE clause narrows the rows unless it refers to the call's own output (then: all rows, a superset).
    where = stmt.whereClause if not _mentions_output(stmt.whereClause, site) else None
    return _select(site, targets, from_clause=others, where=where)


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


def _select(
    site: Site,
    targets: tuple[ast.ResTarget, ...],
    *,
    from_clause: tuple[ast.Node, ...] | None = None,
    where: ast.Node | None = None,
    group: tuple[ast.Node, ...] | None = None,
    having: ast.Node | None = None,
) -> ast.SelectStmt:
    stmt = ast.SelectStmt(
        distinctClause=(None,),
        targetList=targets,
        fromClause=from_clause or None,
        whereClause=where,
        groupClause=group or None,
        havingClause=having,
    )
    stmt.withClause = _with_clause(site, stmt)
    return stmt


def _with_clause(site: Site, query: ast.SelectStmt) -> ast.WithClause | None:
    """The visible CTEs ``query`` reads, directly or through each other, in their original order."""
    by_name = {cte.ctename: cte for cte in site.ctes}  # later definitions (inner WITH) shadow outer ones
    needed: dict[str, ast.CommonTableExpr] = {}
    todo = list(_unqualified_relations(query))
    while todo:
        name = todo.pop()
        cte = by_name.get(name)
        if cte is None or name in needed:
            continue
        needed[name] = cte
        todo.extend(_unqualified_relations(cte.ctequery))
    if not needed:
        return None
    for name, cte in needed.items():
        if not isinstance(cte.ctequery, ast.SelectStmt):
            raise FeatureNotSupported(
                f"pgml.{site.function}() with arguments read from the RETURNING rows of the data-modifying"
                f' WITH query "{name}"',
                hint="Those rows exist only once the statement ran: run the data-modifying statement first"
                " (RETURNING into a temporary table, or a separate statement), then call pgml on its rows.",
            )
    ordered = tuple(cte for cte in site.ctes if needed.get(cte.ctename or "") is cte)
    return ast.WithClause(ctes=ordered, recursive=site.recursive)


def _unqualified_relations(node: Any) -> Iterator[str]:
    """Names of schema-less relations referenced anywhere under ``node`` (candidates for CTE references)."""
    for item in nodes_under(node):
        if isinstance(item, ast.RangeVar) and item.schemaname is None and item.relname:
            yield item.relname


def gather_statement(site: Site, args: list[ast.Node]) -> ast.SelectStmt:
    """``SELECT DISTINCT <args> FROM …`` over the rows the call's statement sees.

    Other pgml calls the query would contain (in WHERE, in a CTE it reads, in a derived
    table) must have been replaced already: the rewriter evaluates calls inside-out.
    """
    stmt, clause = site.stmt, site.clause
    targets = tuple(ast.ResTarget(val=a) for a in args)
    if site.range_function is not None:
        return _gather_lateral(site, targets)
    if site.in_join:
        return _gather_join(site, targets, args)
    match stmt:
        case ast.SelectStmt(valuesLists=values) if values:
            return _select(site, targets)
        case None:
            return _select(site, targets)
        case ast.SelectStmt():
            # A call in WHERE is evaluated for the rows of FROM; one in GROUP BY for those rows too; one in
            # HAVING for the groups; one in the SELECT list, ORDER BY or DISTINCT ON for the groups that pass.
            skip_where = clause == "whereClause"
            skip_group = clause in ("whereClause", "groupClause")
            skip_having = clause in ("whereClause", "groupClause", "havingClause")
            return _select(
                site,
                targets,
                from_clause=stmt.fromClause,
                where=None if skip_where else stmt.whereClause,
                group=None if skip_group else stmt.groupClause,
                having=None if skip_having else stmt.havingClause,
            )
        case ast.UpdateStmt() if clause in ("targetList", "whereClause"):
            sources = (stmt.relation, *(stmt.fromClause or ()))
            where = None if clause == "whereClause" else stmt.whereClause
            return _select(site, targets, from_clause=sources, where=where)
        case ast.DeleteStmt(relation=ast.RangeVar() as relation) if clause == "whereClause":
            return _select(site, targets, from_clause=(relation, *(stmt.usingClause or ())))
    raise FeatureNotSupported(
        f"pgml.{site.function}() with column arguments is not supported in this part of a statement ({clause})",
        hint="Compute the value in a SELECT list (a subquery or CTE) and refer to it here.",
    )


def reads(site: Site, args: list[ast.Node]) -> Iterator[ast.Node]:
    """The nodes the gather query of ``site`` contains (for finding the calls it must wait for)."""
    try:
        yield gather_statement(site, args)
    except FeatureNotSupported:  # reported when the call is evaluated
        yield from args


__all__ = ["STATEMENTS", "gather_statement", "reads"]
