"""Working on pglast trees: walking, copying, swapping nodes, SQL templates, and deparsing.

Owns: :func:`nodes_under` (every node of a tree), :func:`clone` (a fresh copy, with the map from
each old node to its copy, so that references into the tree can follow it), :func:`replace_nodes`
(swap nodes by identity, in place), :func:`fill` (a SQL template built from catalogue names only,
parsed once per text and copied for each use, its ``$n`` replaced by nodes) and :func:`deparse`.

Must not: know what a pgml call is, or paste client text into SQL: templates hold only catalogue
names and generated identifiers; everything from the client arrives as nodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import pglast
from pglast import ast
from pglast.stream import RawStream

_set = object.__setattr__  # pglast checks each assignment; a copy of a checked tree needs none


def nodes_under(node: Any) -> Iterator[ast.Node]:
    """Every node under ``node`` (itself included; tuples and lists of nodes walked), depth first."""
    if isinstance(node, tuple | list):
        for item in node:
            yield from nodes_under(item)
        return
    if not isinstance(node, ast.Node):
        return
    yield node
    for member in node:
        yield from nodes_under(getattr(node, member))


def clone(value: Any, copies: dict[int, Any]) -> Any:
    """A copy of a tree (a node, or tuples of them), recording ``id(old node) -> copy`` in ``copies``.

    Strings, numbers and enums are shared: pglast never changes them in place. About three times
    faster than parsing the text again, and ten times faster than ``copy.deepcopy``.
    """
    if isinstance(value, tuple):
        return tuple([clone(item, copies) for item in value])
    if isinstance(value, list):
        return [clone(item, copies) for item in value]
    if isinstance(value, ast.Node):
        done = copies.get(id(value))
        if done is not None:
            return done
        cls = type(value)
        new = cls.__new__(cls)
        copies[id(value)] = new
        for member in value:
            _set(new, member, clone(getattr(value, member), copies))
        return new
    return value


def replace_nodes(root: Any, replacements: Mapping[int, ast.Node]) -> Any:
    """Swap nodes by identity (FuncCall/RangeFunction -> replacement) everywhere under ``root``, in place.

    Returns ``root`` itself, or its replacement. Lists of lists (``VALUES`` rows) are walked too.
    """
    if not replacements:
        return root

    def swap(value: Any) -> Any:
        if isinstance(value, tuple):
            items = tuple(swap(v) for v in value)
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        if isinstance(value, ast.Node):
            replacement = replacements.get(id(value))
            if replacement is not None:
                return replacement
            for member in value:
                old = getattr(value, member)
                new = swap(old)
                if new is not old:
                    setattr(value, member, new)
        return value

    return swap(root)


# The name a template gives the one generated table it reads (a per-row lookup): set on the copy's AST.
TABLE = "pgml_proxy_table"


def fill(template: str, values: Mapping[int, ast.Node], whole: bool = False, table: str | None = None) -> Any:
    """A template's statement (``whole``) or its first output expression, with its ``$n`` replaced by nodes.

    The template is built from catalogue names only; ``pg_temp.pgml_proxy_table`` in it names ``table``.
    """
    stmt: Any = clone(_template(template), {})
    params: dict[int, ast.Node] = {}
    for node in nodes_under(stmt):
        if isinstance(node, ast.ParamRef):
            params[id(node)] = values[int(node.number or 0)]
        elif isinstance(node, ast.RangeVar) and node.relname == TABLE and table is not None:
            node.relname = table
    replace_nodes(stmt, params)
    return stmt if whole else stmt.targetList[0].val


@lru_cache(maxsize=1024)
def _template(template: str) -> ast.Node:
    """The parsed template (shared: only its copies are filled in)."""
    stmt = pglast.parse_sql(template)[0].stmt
    assert stmt is not None
    return stmt


def deparse(node: ast.Node) -> str:
    return str(RawStream()(node))


def deparse_all(stmts: tuple[ast.RawStmt, ...]) -> str:
    """Statements joined the way a rewritten Query carries them."""
    return "; ".join(deparse(raw) for raw in stmts)
