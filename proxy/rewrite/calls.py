"""Finding ``pgml.*`` calls in a parsed statement, with the context a rewrite needs.

Owns: the walk over a pglast tree that records every ``FuncCall`` named
``pgml.<f>`` for an engine-evaluated ``f`` — where it sits (innermost statement,
clause, FROM item), which CTEs are visible — and binding its positional and
named arguments to the catalogue's overloads: once, when the call is found
(:class:`Binding` keeps argument positions, not nodes, so a copy of the tree
shares it); :func:`bind` reads it, raising the server's error for arguments
no overload takes where the call is evaluated, as the server does.

Must not: evaluate anything or change the tree, or look inside a definition the
server stores (:func:`proxy.rewrite.definitions.stored`: a view's query, a column's
DEFAULT or GENERATED expression, a function body, …): its calls are the server's to
run. ``pgml`` inside strings, comments, identifiers or another schema never matches:
only the parsed function name counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pglast import ast

from engine.api import Signature, evaluated_functions, signatures
from proxy.errors import StatementTooComplex, UndefinedFunction
from proxy.rewrite.definitions import stored

STATEMENTS = (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)
DEFAULT: Any = object()  # an optional argument left out


@dataclass(frozen=True, slots=True)
class Binding:
    """Which overloads one call's arguments fit, and which argument fills each parameter.

    ``places``: per parameter of the first fitting overload, the index of its argument in the call's
    ``args`` (a named one's value is that NamedArgExpr's ``arg``), or None for a left-out optional one.
    No fitting overload, or a call written as an aggregate: :func:`bind` raises (42883).
    """

    fitting: tuple[Signature, ...]
    places: tuple[int | None, ...]
    aggregate: bool = False

    def slots(self, call: ast.FuncCall) -> list[Any]:
        """The argument nodes the call holds now, in parameter order (DEFAULT where left out)."""
        args = call.args or ()
        out = []
        for place in self.places:
            arg = DEFAULT if place is None else args[place]
            out.append(arg.arg if isinstance(arg, ast.NamedArgExpr) else arg)
        return out


@dataclass(eq=False)
class Site:
    """One pgml call: the node, its innermost statement and clause, and its FROM wrapper if any.

    ``range_function`` is the FROM item when the call is that item's function (replaced as a whole);
    ``from_item`` is the FROM function item it is in at any depth (``unnest(pgml.embed(…))``).
    """

    call: ast.FuncCall
    function: str
    stmt: ast.Node | None
    clause: str
    range_function: ast.RangeFunction | None
    ctes: list[ast.CommonTableExpr] = field(default_factory=list)
    nested_in: Site | None = None
    in_join: bool = False
    recursive: bool = False  # a visible WITH is WITH RECURSIVE (its CTEs may read themselves)
    output: bool = False  # the whole expression of an output column of the outermost SELECT (set when evaluated)
    from_item: ast.RangeFunction | None = None  # the FROM function item the call is in, itself or in its arguments
    binding: Binding = field(init=False)  # its arguments matched to the overloads, once

    def __post_init__(self) -> None:
        self.binding = match_arguments(self.call, self.function)


def pgml_function(call: ast.FuncCall) -> str | None:
    """``f`` when ``call`` is ``pgml.f(...)`` for an engine-evaluated ``f``."""
    names = call.funcname or ()
    if len(names) == 2 and isinstance(names[0], ast.String) and names[0].sval == "pgml":
        name = names[1].sval
        return name if name in evaluated_functions() else None
    return None


def find_calls(root: ast.Node) -> list[Site]:
    """Every engine-evaluated pgml call under ``root``, outermost first (none inside a stored definition)."""
    sites: list[Site] = []
    try:
        _walk(root, None, "", ([], False), None, None, False, sites)
    except RecursionError:  # expressions nested deeper than Python recurses: the server's 54001, here
        raise StatementTooComplex.nesting() from None
    return sites


def _walk(
    node: Any,
    stmt: ast.Node | None,
    clause: str,
    ctes: tuple[list[ast.CommonTableExpr], bool],
    range_function: ast.RangeFunction | None,
    enclosing: Site | None,
    in_join: bool,
    sites: list[Site],
) -> None:
    """``ctes``: the CTEs visible here, in scope order (a later one of the same name shadows an earlier one),
    and whether a WITH RECURSIVE is among them; ``range_function``: the FROM function item ``node`` is in."""
    if isinstance(node, tuple):
        for item in node:
            _walk(item, stmt, clause, ctes, range_function, enclosing, in_join, sites)
        return
    if not isinstance(node, ast.Node) or stored(node):
        return
    if isinstance(node, STATEMENTS):
        with_clause = getattr(node, "withClause", None)
        if with_clause is not None and with_clause.ctes:
            outer, recursive = ctes
            here = tuple(with_clause.ctes)
            ctes = ([*outer, *here], recursive or bool(with_clause.recursive))
            for index, cte in enumerate(here):
                # A CTE of a plain WITH sees the ones before it; of a WITH RECURSIVE, all of them.
                scope = ctes if with_clause.recursive else ([*outer, *here[:index]], recursive)
                _walk(cte.ctequery, node, "withClause", scope, None, enclosing, False, sites)
        for member in node:
            if member != "withClause":
                _walk(getattr(node, member), node, member, ctes, None, enclosing, False, sites)
        return
    if isinstance(node, ast.FuncCall):
        function = pgml_function(node)
        if function is not None:
            # The FROM item itself only when the call is one of its functions (not inside one's arguments).
            direct = range_function if _is_item_function(range_function, node) else None
            site = Site(node, function, stmt, clause, direct, ctes[0], enclosing, in_join, ctes[1])
            site.from_item = range_function
            sites.append(site)
            enclosing = site
    rf = node if isinstance(node, ast.RangeFunction) else range_function
    for member in node:
        joined = in_join or (isinstance(node, ast.JoinExpr) and member == "quals")
        _walk(getattr(node, member), stmt, clause, ctes, rf, enclosing, joined, sites)


def _is_item_function(rf: ast.RangeFunction | None, call: ast.FuncCall) -> bool:
    return rf is not None and any(isinstance(item, tuple) and item and item[0] is call for item in rf.functions or ())


def match_arguments(call: ast.FuncCall, function: str) -> Binding:
    """The overloads of ``pgml.<function>`` whose parameters the call's positional and named arguments fill.

    Overloads that differ only in parameter types all fit; the caller picks one once argument types are known.
    """
    aggregate = bool(call.agg_star or call.agg_distinct or call.over is not None or call.agg_order)
    args = list(call.args or ())
    positional = [i for i, a in enumerate(args) if not isinstance(a, ast.NamedArgExpr)]
    named = {a.name: i for i, a in enumerate(args) if isinstance(a, ast.NamedArgExpr)}
    fitting = []
    for sig in signatures(function):
        names = [p.name for p in sig.params]
        if len(positional) > len(names) or any(n not in names[len(positional) :] for n in named):
            continue
        places: list[int | None] = [*positional, *(named.get(p.name) for p in sig.params[len(positional) :])]
        if all(place is not None or p.optional for place, p in zip(places, sig.params, strict=True)):
            fitting.append(sig)
    if not fitting:
        return Binding((), (), aggregate)
    names = [p.name for p in fitting[0].params]
    return Binding(tuple(fitting), (*positional, *(named.get(n) for n in names[len(positional) :])), aggregate)


def bind(site: Site) -> tuple[list[Signature], list[Any]]:
    """The call's fitting overloads and its arguments in parameter order (DEFAULT where left out).

    Overloads that differ only in parameter types are all returned; the caller
    picks one once argument types are known.
    """
    binding = site.binding
    if binding.aggregate:
        raise UndefinedFunction(f"pgml.{site.function} is not an aggregate or window function")
    if not binding.fitting:
        args = site.call.args or ()
        described = ", ".join(f"{a.name} => …" if isinstance(a, ast.NamedArgExpr) else "…" for a in args)
        raise UndefinedFunction(
            f"function pgml.{site.function}({described}) does not exist",
            hint="No function matches the given name and argument types. See the PostgresML API reference.",
            position=site.call.location + 1 if site.call.location is not None else None,
        )
    return list(binding.fitting), binding.slots(site.call)
