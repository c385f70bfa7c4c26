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

from proxy.errors import FeatureNotSupported
from proxy.rewrite.calls import Site, bind, find_calls
from proxy.rewrite.tree import nodes_under


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
    """A call that is, or is inside, a FROM function item: its arguments come from the FROM items before it
    (what LATERAL sees). With none before it (``FROM pgml.chunk((SELECT …), (SELECT …))``) they read no row.
    """
    stmt, rf = site.stmt, site.from_item
    items = getattr(stmt, "fromClause", None) or ()
    position = next((i for i, item in enumerate(items) if item is rf), None)
    if not isinstance(stmt, ast.SelectStmt) or position is None:
        raise FeatureNotSupported(
            f"pgml.{site.function}() with column arguments in FROM must be in a plain item of the FROM list",
            hint="Write FROM t, pgml.f(…, t.col) AS x, or call it in the SELECT list.",
        )
    before, after = tuple(items[:position]), items[position + 1 :]
    if not before:
        return _select(site, targets)
    # The WHERE clause narrows the rows when it can be read with the items before the call alone: no later
    # item, no other pgml call, no reference to the call's own output. Otherwise all their rows (a superset).
    where = stmt.whereClause
    if where is not None and (
        after or site.range_function is None or find_calls(where) or _mentions_output(where, site)
    ):
        where = None
    return _select(site, targets, from_clause=before, where=where)


def _mentions_output(node: ast.Node | None, site: Site) -> bool:
    """Whether ``node`` may refer to the columns of the FROM-item call of ``site``."""
    if node is None:
        return False
    rf = site.range_function
    alias = rf.alias.aliasname if rf is not None and rf.alias is not None else site.function
    columns = {name for name, _ in _output_columns(site)}
    if rf is not None and rf.alias is not None:
        columns |= {str(c.sval) for c in rf.alias.colnames or ()}
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
    """The visible CTEs ``query`` reads, directly or through each other, in their original order.

    Names resolve as PostgreSQL resolves them: the latest visible definition wins, and a CTE's own
    query sees only the CTEs visible before it (all of them in a WITH RECURSIVE).
    """
    ctes = site.ctes

    def resolve(name: str, limit: int) -> int | None:
        return next((i for i in range(limit - 1, -1, -1) if ctes[i].ctename == name), None)

    needed: dict[int, ast.CommonTableExpr] = {}
    todo = [(name, len(ctes)) for name in _unqualified_relations(query)]
    while todo:
        name, limit = todo.pop()
        index = resolve(name, limit)
        if index is None or index in needed:
            continue
        needed[index] = ctes[index]
        scope = len(ctes) if site.recursive else index
        todo.extend((inner, scope) for inner in _unqualified_relations(ctes[index].ctequery))
    if not needed:
        return None
    for cte in needed.values():
        if not isinstance(cte.ctequery, ast.SelectStmt):
            raise FeatureNotSupported(
                f"pgml.{site.function}() with arguments read from the RETURNING rows of the data-modifying"
                f' WITH query "{cte.ctename}"',
                hint="Those rows exist only once the statement ran: run the data-modifying statement first"
                " (RETURNING into a temporary table, or a separate statement), then call pgml on its rows.",
            )
    return ast.WithClause(ctes=tuple(needed[i] for i in sorted(needed)), recursive=site.recursive)


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
    if site.from_item is not None:
        return _gather_lateral(site, targets)
    if site.in_join:
        return _gather_join(site, targets, args)
    match stmt:
        case ast.SelectStmt(valuesLists=values) if values:
            return _select(site, targets)
        case None:  # outside any query (a generated column, MERGE): there are no rows to read here
            raise FeatureNotSupported(
                f"pgml.{site.function}() with column arguments is not supported in this statement",
                hint="Call it in a SELECT, INSERT, UPDATE or DELETE statement.",
            )
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
                group=None if skip_group else _group_items(stmt),
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


def _group_items(stmt: ast.SelectStmt) -> tuple[ast.Node, ...] | None:
    """GROUP BY as the gather query must spell it: ordinals (``GROUP BY 1``) are the statement's own targets."""
    if not stmt.groupClause:
        return None
    targets = stmt.targetList or ()
    items = []
    for item in stmt.groupClause:
        number = item.val.ival if isinstance(item, ast.A_Const) and isinstance(item.val, ast.Integer) else None
        if number is not None and 0 < number <= len(targets):
            item = targets[number - 1].val
        items.append(item)
    return tuple(items)


def reads(site: Site, args: list[ast.Node]) -> Iterator[ast.Node]:
    """The nodes the gather query of ``site`` contains (for finding the calls it must wait for)."""
    try:
        yield gather_statement(site, args)
    except FeatureNotSupported:  # reported when the call is evaluated
        yield from args
