"""Output column names: what PostgreSQL calls the columns a rewritten statement returns.

Owns: naming SELECT and RETURNING targets that hold a pgml call as PostgreSQL names the original
expression (``FigureColname``), before any call is replaced; and the alias and column names of a
replacement for a call in FROM (a base type's single column, a row type's columns, ordinality).

Must not: paste names into SQL: every name is set on the AST, for pglast to quote.
"""

from __future__ import annotations

from typing import Any

from pglast import ast

from engine.api import Signature
from proxy.errors import FeatureNotSupported
from proxy.rewrite.calls import Site
from proxy.rewrite.tree import nodes_under


def keep_column_names(root: ast.Node | None, sites: list[Site]) -> None:
    """Name output columns as PostgreSQL names them for the original expression, before any call is replaced.

    ``SELECT pgml.embed(…)`` is ``embed``, so is ``(pgml.embed(…))[1:3]`` and ``pgml.embed(…)::vector``;
    the replacement (a cast, a lookup) would otherwise be named after its type. Only SELECT lists and
    RETURNING lists of statements that hold a call are named; an explicit ``AS`` is never changed.
    """
    if root is None or not sites:
        return
    holders = {id(site.stmt) for site in sites}
    calls = {id(site.call) for site in sites}

    def name(stmt: Any) -> None:
        for member in ("targetList", "returningList"):
            if member == "targetList" and not isinstance(stmt, ast.SelectStmt):
                continue
            for target in getattr(stmt, member, None) or ():
                if not isinstance(target, ast.ResTarget) or target.name is not None or target.val is None:
                    continue
                if any(isinstance(c, ast.FuncCall) and id(c) in calls for c in nodes_under(target.val)):
                    figured = column_name(target.val)
                    if figured is not None:
                        target.name = figured

    for node in nodes_under(root):
        if id(node) in holders or isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
            name(node)


def column_name(node: Any) -> str | None:
    """PostgreSQL's name for an output expression without ``AS`` (``FigureColname``), None for ``?column?``."""
    name, strength = _figure(node)
    return name if strength > 0 else None


def _figure(node: Any) -> tuple[str | None, int]:
    """``FigureColnameInternal``: a name and its strength (2: from a column or function, 1: a fallback)."""
    match node:
        case ast.ColumnRef(fields=fields) if fields and isinstance(fields[-1], ast.String):
            return str(fields[-1].sval), 2
        case ast.A_Indirection(arg=arg, indirection=indirection):
            names = [i for i in indirection or () if isinstance(i, ast.String)]
            return (str(names[-1].sval), 2) if names else _figure(arg)
        case ast.FuncCall(funcname=names) if names:
            return str(names[-1].sval), 2
        case ast.TypeCast(arg=arg, typeName=type_name):
            inner, strength = _figure(arg)
            if strength <= 1 and type_name is not None:
                spelled = [n.sval for n in type_name.names or () if isinstance(n, ast.String)]
                if spelled:
                    return str(spelled[-1]), 1
            return inner, strength
        case ast.CollateClause(arg=arg):
            return _figure(arg)
        case ast.CaseExpr(defresult=default):
            inner, strength = _figure(default)
            return (inner, strength) if strength > 1 else ("case", 1)
        case ast.CoalesceExpr():
            return "coalesce", 2
        case ast.A_ArrayExpr():
            return "array", 2
        case ast.RowExpr():
            return "row", 2
    return None, 0


def from_columns(site: Site, sig: Signature) -> tuple[ast.Alias, list[str]]:
    """The FROM item's alias and its column names as PostgreSQL gives them for the original call.

    A function of a base type has one column named by the column alias, else the table alias, else the
    function; a row type's columns are its declared names, overridden in order by column aliases;
    ``WITH ORDINALITY`` adds ``ordinality`` (or the next column alias).
    """
    rf = site.range_function
    assert rf is not None
    if len(rf.functions or ()) != 1:
        raise FeatureNotSupported(f"pgml.{sig.function}() in ROWS FROM")
    declared = [name for name, _ in sig.columns] if sig.columns else [sig.function]
    if rf.ordinality:
        declared.append("ordinality")
    given = [str(c.sval) for c in rf.alias.colnames or ()] if rf.alias is not None else []
    if rf.alias is not None and not given and len(sig.columns) <= 1:
        given = [str(rf.alias.aliasname)]
    names = [given[i] if i < len(given) else name for i, name in enumerate(declared)]
    return ast.Alias(aliasname=rf.alias.aliasname if rf.alias is not None else sig.function), names


def named(select: Any, names: list[str]) -> Any:
    """Name a generated SELECT's output columns (identifiers set on the AST, never pasted into SQL)."""
    for target, name in zip(select.targetList, names, strict=True):
        target.name = name
    return select
