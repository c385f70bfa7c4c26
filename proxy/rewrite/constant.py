"""Calls with constant arguments: their values, and the literals that replace them.

Owns: folding a call's argument nodes into values under one of its overloads
(:func:`fold_call`: the first overload under which every argument is a constant), and the node
that takes a call's place once the engine has its result: a typed literal; for a set-returning
call an ``unnest`` of one array literal (a row type's rows as ``record`` in an output column); for a
call in FROM a one-row or many-row subselect whose columns are named as PostgreSQL names them.

Must not: evaluate anything (the engine does, asked by :mod:`proxy.rewrite.evaluate`) or paste
values into SQL: every value is a literal node; templates hold catalogue names only.
"""

from __future__ import annotations

from typing import Any

from pglast import ast

from engine.api import EngineError, Signature
from engine.pg.text import quote_element, to_text
from proxy.errors import ProxyError, UndefinedFunction
from proxy.rewrite.calls import DEFAULT, Site, bind
from proxy.rewrite.columns import from_columns, named
from proxy.rewrite.literals import NOT_CONSTANT, fold, literal, text_const
from proxy.rewrite.tree import fill

Folded = tuple[Signature, tuple[Any, ...]]


def fold_call(candidates: list[Signature], slots: list[Any]) -> Folded | None:
    """The first overload under which every argument is a constant, with the values (None: not all constant)."""
    for sig in candidates:
        values = []
        for slot, param in zip(slots, sig.params, strict=True):
            if slot is DEFAULT:
                values.append(param.default)
                continue
            if param.type == "text" and isinstance(slot, ast.A_Const) and isinstance(slot.val, ast.Integer | ast.Float):
                break  # PostgreSQL has no implicit number -> text cast: pgml.predict(7, …) is the model-id form
            try:
                value = fold(slot, param.type)
            except (ProxyError, EngineError):
                break
            if value is NOT_CONSTANT:
                break
            values.append(value)
        else:
            return sig, tuple(values)
    return None


def folded(site: Site) -> Folded | None:
    """The call's overload and argument values when its arguments, as they are now, are all constants."""
    return fold_call(*bind(site))


def all_constant(sites: list[list[Site]]) -> bool:
    """True when every call's arguments are constants (no columns, no $n, no other pgml call)."""
    return all(folded(site) is not None for statement in sites for site in statement)


def fold_strict(sig: Signature, slots: list[Any], skip: set[int] | None = None) -> list[Any]:
    """Values of the constant arguments under ``sig`` (defaults filled); raises the folding error."""
    values = []
    for i, (slot, param) in enumerate(zip(slots, sig.params, strict=True)):
        if slot is DEFAULT or (skip and i in skip):
            values.append(param.default)
            continue
        value = fold(slot, param.type)
        if value is NOT_CONSTANT:
            raise UndefinedFunction(f"function pgml.{sig.function}() does not accept this {param.name} argument")
        values.append(value)
    return values


def replacement(site: Site, sig: Signature, result: Any) -> dict[int, ast.Node]:
    """The node in place of the call (by ``id`` of the node it replaces), given the engine's result."""
    rf = site.range_function
    if not sig.returns_set:
        value = literal(result, sig.returns)
        if rf is None:
            return {id(site.call): value}
        # A call in FROM is a one-row relation whose column is named as PostgreSQL names it.
        alias, columns = from_columns(site, sig)
        targets = [ast.ResTarget(val=value)]
        if rf.ordinality:
            targets.append(ast.ResTarget(val=literal(1, "bigint")))
        select = ast.SelectStmt(targetList=tuple(targets))
        return {id(rf): ast.RangeSubselect(lateral=False, subquery=named(select, columns), alias=alias)}
    rows = [] if result is None else [r if isinstance(r, tuple) else (r,) for r in result]
    if rf is not None:
        alias, columns = from_columns(site, sig)
        subquery = named(_rows_select(sig, rows, ordinality=bool(rf.ordinality)), columns)
        return {id(rf): ast.RangeSubselect(lateral=False, subquery=subquery, alias=alias)}
    return {id(site.call): _unnest(sig, text_const(array_text(sig, rows)), as_record=site.output)}


def array_text(sig: Signature, rows: list[tuple[Any, ...]]) -> str:
    """One array literal holding every output row (a row type for several columns)."""
    if len(sig.columns) == 1:
        return "{" + ",".join(quote_element(to_text(r[0], sig.columns[0][1])) for r in rows) + "}"
    return "{" + ",".join(quote_element(to_text(tuple(r), "record")) for r in rows) + "}"


def _unnest(sig: Signature, array: ast.Node, as_record: bool = False) -> Any:
    """A set-returning expression for a SELECT list: ``unnest(array)``, cast back to the column type.

    Row types are ``record`` in a client's output column, as PostgreSQL types a call of a function
    returning TABLE(…); inside the statement they keep their row type, so ``(x).chunk`` still works.
    """
    if len(sig.columns) == 1:
        template = f"SELECT CAST(pg_catalog.unnest(CAST($1 AS text[])) AS {sig.columns[0][1]})"
    elif as_record:
        template = f"SELECT {row_of(sig, f'CAST($1 AS pgml.{sig.function}_result[])')}"
    else:
        template = f"SELECT pg_catalog.unnest(CAST($1 AS pgml.{sig.function}_result[]))"
    return fill(template, {1: array})


def row_of(sig: Signature, array: str) -> str:
    """``ROW((unnest(a)).c1, (unnest(a)).c2, …)``: the rows of a row-type array as type ``record``.

    A cast to ``record`` keeps the row type (PostgreSQL treats it as a no-op); ``ROW(…)`` is ``record``.
    The unnests run in lockstep, one output row per element.
    """
    return "ROW(" + ", ".join(f"(pg_catalog.unnest({array})).{name}" for name, _ in sig.columns) + ")"


def _rows_select(sig: Signature, rows: list[tuple[Any, ...]], ordinality: bool = False) -> Any:
    count = len(sig.columns)
    cols = ", ".join(f"CAST(u.c{i} AS {t})" for i, (_, t) in enumerate(sig.columns))
    # ROWS FROM of one-array unnests: the several-array form is only the unqualified name's syntax.
    arrays = ", ".join(f"pg_catalog.unnest(CAST(${i + 1} AS text[]))" for i in range(count))
    aliases = ", ".join(f"c{i}" for i in range(count))
    ord_column = ", u.ord" if ordinality else ""
    template = (
        f"SELECT {cols}{ord_column} FROM ROWS FROM ({arrays}) WITH ORDINALITY AS u({aliases}, ord) ORDER BY u.ord"
    )
    arrays_text = {
        i + 1: text_const("{" + ",".join(quote_element(to_text(r[i], t)) for r in rows) + "}")
        for i, (_, t) in enumerate(sig.columns)
    }
    return fill(template, arrays_text, whole=True)
