"""Choosing the overload of a per-row call once the server has told the types of its arguments.

Owns: which of a call's arguments are read from rows (:func:`row_read`), the implicit casts among the
types pgml's parameters take, and :func:`choose`:
the overload PostgreSQL would pick for those types — every argument matches exactly or by an
implicit cast, most exact matches win, the catalogue's order breaks ties.

Must not: evaluate or run anything.
"""

from __future__ import annotations

from typing import Any

from pglast import ast

from engine.api import EngineError, Signature
from engine.pg.types import TYPE_NAMES
from proxy.errors import ProxyError, UndefinedFunction
from proxy.rewrite.calls import DEFAULT, Site
from proxy.rewrite.constant import fold_strict
from proxy.rewrite.literals import NOT_CONSTANT, fold, is_constant

# Implicit casts among the types pgml's parameters take (PostgreSQL's pg_cast, context 'i'); an array
# coerces to another implicitly when its elements do. json -> jsonb and float8 -> float4 are assignment
# casts in PostgreSQL, accepted here (pgml's math is float4 anyway; PostgresML reads json texts as jsonb).
IMPLICIT = {
    "smallint": {"integer", "bigint", "real", "double precision", "numeric"},
    "integer": {"bigint", "real", "double precision", "numeric"},
    "bigint": {"real", "double precision", "numeric"},
    "numeric": {"real", "double precision"},
    "real": {"double precision"},
    "double precision": {"real"},
    "varchar": {"text"},
    "bpchar": {"text"},
    "name": {"text"},
    "json": {"jsonb"},
}


def choose(site: Site, candidates: list[Signature], slots: list[Any], given: list[int], oids: list[int]) -> Signature:
    """The overload PostgreSQL would pick for these argument types: every argument matches exactly or by an
    implicit cast, most exact matches win, the catalogue's order breaks ties (it lists the preferred first).

    ``given`` are the slots read from rows (their type OIDs in ``oids``); the other slots are constants,
    which must fold under the overload. A gathered argument's type is what PostgreSQL calls it
    (:data:`engine.pg.types.TYPE_NAMES`; a record is any row, matched by the "record" param).
    """
    types = [TYPE_NAMES.get(oid) for oid in oids]
    best: tuple[int, Signature] | None = None
    for sig in candidates:
        scores = [_match(sig.params[i].type, t) for i, t in zip(given, types, strict=True)]
        if any(score is None for score in scores) or not _folds(sig, slots, set(given)):
            continue
        exact = sum(score or 0 for score in scores)
        if best is None or exact > best[0]:
            best = (exact, sig)
    if best is not None:
        return best[1]
    shown = ", ".join(t or "unknown" for t in types)
    raise UndefinedFunction(
        f"function pgml.{site.function}({shown}) does not exist",
        hint="No function matches the given argument types. You might need to add explicit type casts.",
    )


def row_read(candidates: list[Signature], slots: list[Any]) -> list[int]:
    """The argument slots read from rows: all but left-out ones and constants the proxy reads itself
    (a constant only the server can read, such as a cast the proxy does not fold, is read from rows)."""
    return [
        i
        for i, s in enumerate(slots)
        if s is not DEFAULT and (not is_constant(s) or not any(read_here(s, sig.params[i].type) for sig in candidates))
    ]


def read_here(node: ast.Node, sql_type: str) -> bool:
    """Whether the proxy reads this constant itself (a constant it reads but rejects counts: its error is ours)."""
    try:
        return fold(node, sql_type) is not NOT_CONSTANT
    except (ProxyError, EngineError):
        return True


def _folds(sig: Signature, slots: list[Any], skip: set[int]) -> bool:
    try:
        fold_strict(sig, slots, skip)
    except (ProxyError, EngineError):
        return False
    return True


def _match(param: str, given: str | None) -> int | None:
    """1: exactly the parameter's type; 0: by an implicit cast; None: not at all."""
    if given is None:
        return None
    if param == given:
        return 1
    if given.endswith("[]") and param.endswith("[]"):
        given, param = given[:-2], param[:-2]
    return 0 if param in IMPLICIT.get(given, ()) else None
