"""Choosing the overload of a per-row call once the server has told the types of its arguments.

Owns: the types of gathered arguments by type OID (how their text is read, and what PostgreSQL
calls them), the implicit casts among the types pgml's parameters take, and :func:`choose`:
the overload PostgreSQL would pick for those types — every argument matches exactly or by an
implicit cast, most exact matches win, the catalogue's order breaks ties.

Must not: evaluate or run anything.
"""

from __future__ import annotations

from typing import Any

from pglast import ast

from engine.api import Signature
from proxy.errors import ProxyError, UndefinedFunction
from proxy.rewrite.calls import Site
from proxy.rewrite.constant import fold_strict
from proxy.rewrite.literals import NOT_CONSTANT, fold

# Type OIDs of gathered arguments -> how their text is read (the catalogue's type names) ...
OID_TYPES = {
    25: "text", 1043: "text", 1042: "text", 19: "text", 705: "text",
    1009: "text[]", 1015: "text[]", 1014: "text[]", 1003: "text[]", 3802: "jsonb", 114: "jsonb",
    3807: "jsonb[]", 199: "jsonb[]",
    20: "bigint", 23: "bigint", 21: "bigint", 16: "boolean",
    700: "real", 701: "double precision", 1021: "real[]", 1022: "double precision[]",
    1005: "bigint[]", 1007: "bigint[]", 1016: "bigint[]", 1000: "boolean[]", 1700: "double precision",
    1231: "double precision[]", 2249: "record",
}  # fmt: skip
# ... and what PostgreSQL calls them, for choosing the overload (record: any row, matched by the "record" param).
SOURCE_TYPES = {
    **OID_TYPES, 1043: "varchar", 1042: "bpchar", 19: "name", 114: "json", 199: "json[]", 1015: "varchar[]",
    1014: "bpchar[]", 1003: "name[]", 23: "integer", 21: "smallint", 1007: "integer[]", 1005: "smallint[]",
    1700: "numeric", 1231: "numeric[]",
}  # fmt: skip

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
    which must fold under the overload.
    """
    types = [SOURCE_TYPES.get(oid) for oid in oids]
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


def read_here(node: ast.Node, sql_type: str) -> bool:
    """Whether the proxy reads this constant itself (a constant it reads but rejects counts: its error is ours)."""
    try:
        return fold(node, sql_type) is not NOT_CONSTANT
    except ProxyError:
        return True


def _folds(sig: Signature, slots: list[Any], skip: set[int]) -> bool:
    try:
        fold_strict(sig, slots, skip)
    except ProxyError:
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
