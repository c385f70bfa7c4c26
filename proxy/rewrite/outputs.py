"""Per-row pgml calls that stand in a statement's output: which statements qualify, and what is sent instead.

Owns: recognising a SELECT whose remaining per-row calls are each the whole expression of an output
column of the outermost query — bare, or under one cast the proxy applies itself (to ``text``,
``varchar`` or pgvector's ``vector``) — in a statement whose other clauses do not read those columns
(no ORDER BY, GROUP BY or DISTINCT ON naming them by position or name, no grouping sets, no plain
DISTINCT, no set operation, no INTO, no ``*`` target, no set-returning call); and the statement sent in
its place (:class:`Plan`): each call becomes a typed NULL under its cast, so the server describes the
column exactly as it would the original (name, type, modifier), and the arguments the call reads from
rows are appended as hidden columns. WHERE, ORDER BY, LIMIT / OFFSET, DISTINCT ON, windows, joins and
CTEs stay as they are, so the server returns exactly the rows the statement returns, and only their calls
are computed.

Must not: run or evaluate anything (:mod:`proxy.rewrite.streaming` does), or paste text into SQL: the
placeholder and hidden columns are AST nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, enums

from engine.api import Signature
from proxy.rewrite.calls import Site, bind, find_calls
from proxy.rewrite.constant import folded
from proxy.rewrite.overloads import row_read
from proxy.rewrite.tree import deparse, fill

# Casts of a call's result the proxy applies itself, by the cast's type name.
CASTS = frozenset({"text", "varchar", "vector"})


@dataclass(frozen=True)
class Output:
    """One call computed from the rows: its overloads, argument slots, and where its columns are.

    ``given``: the parameters read from rows, each from the hidden column at the same index of
    ``hidden``; the others are constants. ``column``: the placeholder's position. ``cast``: the
    cast applied to the result (None: the call's own type). ``dimensions``: a ``vector(n)``'s n.
    """

    site: Site
    candidates: tuple[Signature, ...]
    slots: tuple[Any, ...]
    given: tuple[int, ...]
    hidden: tuple[int, ...]
    column: int
    cast: str | None = None
    dimensions: int | None = None


@dataclass(frozen=True)
class Plan:
    """The calls computed on the rows of ``stmt`` and the columns sent in its place.

    ``targets``: the output columns sent — the statement's own (a call's column is None, its placeholder),
    then the hidden argument columns. The client sees the first ``visible`` columns.
    """

    stmt: ast.SelectStmt
    outputs: tuple[Output, ...]
    targets: tuple[ast.ResTarget | None, ...]
    visible: int

    def statement(self, returns: Sequence[str | None]) -> str:
        """The statement sent, each call's column a NULL of ``returns[k]`` (None: untyped) under its cast."""
        original = self.stmt.targetList or ()
        placeholders = {
            o.column: _placeholder(original[o.column], r) for o, r in zip(self.outputs, returns, strict=True)
        }
        stmt = self.stmt
        stmt.targetList = tuple(placeholders.get(i, t) for i, t in enumerate(self.targets))
        try:
            return deparse(stmt)
        finally:
            stmt.targetList = original


def plan(stmt: ast.Node | None, pending: list[Site]) -> Plan | None:
    """The streamed form of ``stmt`` when every pending call stands in its output (None: it does not).

    ``stmt`` is not changed: :meth:`Plan.statement` spells the statement sent.
    """
    if not pending or not _plain_select(stmt):
        return None
    assert isinstance(stmt, ast.SelectStmt)
    targets = list(stmt.targetList or ())
    found: list[tuple[Site, int, str | None, int | None]] = []
    calls = {id(site.call) for site in pending}
    for site in pending:
        place = _output_column(site, stmt, targets)
        if place is None or folded(site) is not None or _nested(site, calls):
            return None
        found.append((site, *place))
    columns = {index for _, index, _, _ in found}
    if _reads_outputs(stmt, targets, columns):
        return None
    outputs: list[Output] = []
    hidden: list[ast.ResTarget] = []
    for site, index, cast, dimensions in found:
        candidates, slots = bind(site)
        if all(sig.returns_set for sig in candidates):
            return None
        given = row_read(candidates, slots)
        if not given:  # constants that fit no overload: the temp-table path reports why
            return None
        positions = tuple(range(len(targets) + len(hidden), len(targets) + len(hidden) + len(given)))
        hidden += [ast.ResTarget(name=f"pgml_proxy_arg_{len(hidden) + k}", val=slots[i]) for k, i in enumerate(given)]
        outputs.append(Output(site, tuple(candidates), tuple(slots), tuple(given), positions, index, cast, dimensions))
    sent = tuple(None if i in columns else t for i, t in enumerate(targets))
    return Plan(stmt, tuple(outputs), sent + tuple(hidden), len(targets))


def _plain_select(stmt: ast.Node | None) -> bool:
    """A SELECT whose rows are its output rows one for one (no set operation, VALUES, INTO, plain DISTINCT),
    whose output columns are its targets one for one (no ``*``: positions are counted over the targets), and
    whose grouping names no output column in a way the proxy would have to follow (no grouping sets)."""
    return (
        isinstance(stmt, ast.SelectStmt)
        and (stmt.op is None or stmt.op == enums.SetOperation.SETOP_NONE)
        and not stmt.valuesLists
        and stmt.intoClause is None
        and stmt.distinctClause != (None,)
        and bool(stmt.targetList)
        and not any(_star(target) for target in stmt.targetList or ())
        and not any(isinstance(item, ast.GroupingSet) for item in stmt.groupClause or ())
    )


def _star(target: Any) -> bool:
    """A ``*`` or ``x.*`` target (expanded into several columns by the server)."""
    value = getattr(target, "val", None)
    if isinstance(value, ast.ColumnRef):
        return isinstance((value.fields or (None,))[-1], ast.A_Star)
    return isinstance(value, ast.A_Indirection) and any(isinstance(i, ast.A_Star) for i in value.indirection or ())


def _output_column(site: Site, stmt: ast.SelectStmt, targets: list[Any]) -> tuple[int, str | None, int | None] | None:
    """(column, cast, vector dimensions) when the call is a whole output column of ``stmt``, maybe under a cast."""
    if site.stmt is not stmt or site.clause != "targetList" or site.from_item is not None or site.in_join:
        return None
    for index, target in enumerate(targets):
        value = target.val if isinstance(target, ast.ResTarget) else None
        if value is site.call:
            return index, None, None
        if isinstance(value, ast.TypeCast) and value.arg is site.call and value.typeName is not None:
            return _cast(index, value.typeName)
    return None


def _cast(index: int, type_name: ast.TypeName) -> tuple[int, str | None, int | None] | None:
    names = [n.sval for n in type_name.names or () if isinstance(n, ast.String)]
    name = names[-1] if names else None
    if name not in CASTS or type_name.arrayBounds or type_name.setof or (len(names) > 1 and names[0] == "pgml"):
        return None
    modifiers = type_name.typmods or ()
    if name != "vector" and modifiers:
        return None  # varchar(n) truncates: the server's to apply
    dimensions = None
    if modifiers:
        (modifier,) = modifiers
        if not (isinstance(modifier, ast.A_Const) and isinstance(modifier.val, ast.Integer)):
            return None
        dimensions = modifier.val.ival
    return index, name, dimensions


def _nested(site: Site, calls: set[int]) -> bool:
    """Whether another pending call is inside this call's arguments."""
    inner = find_calls(ast.SelectStmt(targetList=(ast.ResTarget(val=site.call),)))
    return any(id(other.call) in calls and other.call is not site.call for other in inner)


def _reads_outputs(stmt: ast.SelectStmt, targets: list[Any], columns: set[int]) -> bool:
    """Whether ORDER BY, GROUP BY or DISTINCT ON names one of ``columns`` by position or output name."""
    names = {targets[i].name for i in columns if targets[i].name}
    items: list[Any] = [s.node for s in stmt.sortClause or ()]
    items += list(stmt.groupClause or ())
    items += [d for d in stmt.distinctClause or () if d is not None]
    for item in items:
        match item:
            case ast.A_Const(val=ast.Integer(ival=int(number))) if number - 1 in columns:
                return True
            case ast.ColumnRef(fields=(ast.String(sval=name),)) if name in names:
                return True
    return False


def _placeholder(target: ast.ResTarget, returns: str | None) -> ast.ResTarget:
    """The column in place of the call: NULL of the call's type, under the call's cast if it had one."""
    null = fill(f"SELECT CAST(NULL AS {returns})" if returns else "SELECT NULL", {})
    value = target.val
    if isinstance(value, ast.TypeCast):
        null = ast.TypeCast(arg=null, typeName=value.typeName)
    return ast.ResTarget(name=target.name, val=null)
