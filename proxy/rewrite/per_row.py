"""Calls whose arguments need the server: gather, evaluate, load into a temp table, look up.

Owns: the replacement of one call with column (or otherwise server-computed) arguments — the
distinct argument tuples gathered through the client's own session (:mod:`proxy.rewrite.gather`
builds the query; a binary COPY of it, with a Prepare for its column types, in one round trip, read
by :mod:`proxy.rewrite.gathered` where it reads the types, else the query's text rows), one batched
engine call for them, then either a constant (arguments that read no row) or a session temp table
of (argument keys -> result), created, indexed and filled by COPY in one round trip (analysed only
from :data:`ANALYZE_FROM` rows), and a lookup in its place; the key types the lookup compares, and
the COPY rows that fill the table from text-read gathers.

Must not: run anything itself: it yields :mod:`proxy.rewrite.steps` requests (run the gather query,
evaluate, create and fill the table) and is resumed with their answers. Templates hold catalogue
names and generated identifiers only; the client's argument nodes go into the AST.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

from pglast import ast

from engine.api import Signature
from engine.pg import copy, types
from engine.pg.binary import SEND, send_text
from engine.pg.text import from_text, to_text
from proxy.errors import FeatureNotSupported
from proxy.rewrite import constant, gather, gathered
from proxy.rewrite.calls import Site, find_calls
from proxy.rewrite.columns import from_columns, named
from proxy.rewrite.overloads import choose, row_read
from proxy.rewrite.steps import LOOK, Compute, Evaluate, Run, Steps, off_loop, run
from proxy.rewrite.tree import TABLE, deparse, fill
from proxy.session.exchange import Prepare, Statement

# Key columns keep the argument's own type, so the lookup compares like with like.
# Keyed on their text, in the gather as in the lookup: records have no equality a table column can hold, and
# floats printed under a client's extra_float_digits <= 0 do not read back to the same value.
TEXT_KEYED = frozenset({types.RECORD, types.FLOAT4, types.FLOAT8, types.FLOAT4_ARRAY, types.FLOAT8_ARRAY})
KEY_TYPES = {
    types.TEXT: "text", types.VARCHAR: "varchar", types.BPCHAR: "bpchar", types.NAME: "name", types.UNKNOWN: "text",
    types.JSON: "jsonb", types.JSON_ARRAY: "jsonb[]", types.INT2: "smallint", types.INT4: "integer",
    types.INT2_ARRAY: "smallint[]", types.INT4_ARRAY: "integer[]", types.NUMERIC: "numeric",
    types.NUMERIC_ARRAY: "numeric[]", **dict.fromkeys(TEXT_KEYED, "text"),
}  # fmt: skip
_temp_ids = itertools.count(1)
# A result table of fewer rows is not analysed. Unanalysed, the planner takes it for 10 pages and an equality
# match for 0.5 % of its rows, and probes the hash index with a bitmap scan per lookup; analysed, it knows
# each key matches one row: for a few hundred rows (a page or two) it then scans the whole table per lookup,
# no faster over many rows of the statement, and from about a thousand on it probes the index directly,
# about twice as fast per lookup as the bitmap scan — worth an ANALYZE, which samples at most 30,000 rows.
ANALYZE_FROM = 1000


def replacement(site: Site, candidates: list[Signature], slots: list[Any]) -> Steps[dict[int, ast.Node]]:
    """The node in place of the call: a constant, or a lookup in a temp table of its results."""
    given = row_read(candidates, slots)  # only those are gathered
    if not given:  # constants that fit no overload: report why under the first one
        constant.fold_strict(candidates[0], slots)
    gathering = gather.gather_statement(site, [slots[i] for i in given])
    if find_calls(gathering):  # what evaluating inside-out cannot untangle (a call in a recursive CTE's term)
        raise FeatureNotSupported(
            f"pgml.{site.function}() reads rows that another pgml call in the same statement produces this way",
            hint="Compute the inner call in an earlier statement (a temporary table), then call pgml on its rows.",
        )
    sig, rows = yield from _gather(deparse(gathering), site, candidates, slots, given)
    if gathering.fromClause is None and rows.count <= 1:
        # The arguments read no row of the statement (scalar subqueries, CTEs, expressions): a constant call.
        (value,) = (yield Evaluate(sig, tuple(rows.tuples))) if rows.tuples else (None,)
        return constant.replacement(site, sig, value)
    results = (yield Evaluate(sig, tuple(rows.tuples))) if rows.tuples else []
    name = yield from _load(sig, rows, results)
    conditions = " AND ".join(
        f"k{i} OPERATOR(pg_catalog.=) CAST(${i + 1} AS text)"
        if oid in TEXT_KEYED and not rows.binary
        else f"k{i} OPERATOR(pg_catalog.=) ${i + 1}"
        for i, oid in enumerate(rows.oids)
    )
    return {_replaced(site): _lookup(site, sig, conditions, {i + 1: slots[g] for i, g in enumerate(given)}, name)}


def _replaced(site: Site) -> int:
    return id(site.range_function if site.range_function is not None else site.call)


def _lookup(site: Site, sig: Signature, conditions: str, args: dict[int, ast.Node], table: str) -> ast.Node:
    """The expression (or FROM item) reading the call's result for its arguments from ``table``."""
    lookup = f"(SELECT v FROM pg_temp.{TABLE} WHERE {conditions})"
    if site.range_function is not None:
        return _lateral(site, sig, lookup, args, table)
    if not sig.returns_set:
        return fill(f"SELECT CAST({lookup} AS {sig.returns})", args, table=table)  # type: ignore[no-any-return]
    if len(sig.columns) == 1:
        template = f"SELECT CAST(pg_catalog.unnest({lookup}) AS {sig.columns[0][1]})"
    elif site.output:
        template = f"SELECT {constant.row_of(sig, lookup)}"
    else:
        template = f"SELECT pg_catalog.unnest({lookup})"
    return fill(template, args, table=table)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Rows:
    """The gathered rows without a NULL argument: engine argument tuples and their keys, read in binary (the
    keys' binary forms, compared by their types' own equality) or from text (their texts, floats and records
    compared as text)."""

    oids: list[int]  # the gathered columns' types
    tuples: list[tuple[Any, ...]]
    keys: list[tuple[Any, ...]]
    key_types: list[str]
    binary: bool
    count: int  # every gathered row, NULL arguments included


def _gather(
    sql: str, site: Site, candidates: list[Signature], slots: list[Any], given: list[int]
) -> Steps[tuple[Signature, _Rows]]:
    """The overload for the gathered types, and the gathered rows: read from a binary COPY when some overload's
    result has a binary form here (:mod:`proxy.rewrite.gathered`), else, and for types it does not read, from
    the query's text rows."""
    copied = None
    if any(_value_type(sig) in SEND for sig in candidates):
        described, result = yield Run((Prepare(sql), Statement(f"COPY ({sql}) TO STDOUT (FORMAT binary)")))
        oids, copied = [oid for _, oid in described.columns], result
    else:
        (result,) = yield run(sql)
        oids = [oid for _, oid in result.columns]
    sig = choose(site, candidates, slots, given, oids)
    fixed = constant.fold_strict(sig, slots, skip=set(given))
    if copied is not None and gathered.readable(oids) and _value_type(sig) in SEND:
        # Thousands of rows take a while to read: off the event loop, so other sessions are not stalled.
        decode = functools.partial(gathered.decode, copied.copy, copied.copy_rows, oids, fixed, given)
        found = yield from off_loop(len(copied.copy_rows) > 500, decode)
        if found is not None:
            keys = [gathered.KEYS[oid] for oid in oids]
            return sig, _Rows(oids, found.tuples, found.keys, keys, True, found.count)
    if copied is not None:
        (result,) = yield run(sql)
    kinds = [types.READ_AS.get(oid) for oid in oids]
    tuples, texts = yield from off_loop(
        len(result.rows) > 500, functools.partial(_decode_rows, result.rows, fixed, given, kinds)
    )
    keys = [KEY_TYPES.get(oid, t or "text") for oid, t in zip(oids, kinds, strict=True)]
    return sig, _Rows(oids, tuples, texts, keys, False, len(result.rows))


def _decode_rows(
    rows: list[tuple[str | None, ...]], fixed: list[Any], given: list[int], kinds: list[str | None]
) -> tuple[list[tuple[Any, ...]], list[tuple[str | None, ...]]]:
    """Gathered argument rows (text) -> full argument tuples (constants filled in) and their key texts."""
    tuples, texts = [], []
    for row in rows:
        if any(v is None for v in row):
            continue  # STRICT: a NULL argument gives NULL, no lookup row needed
        values = list(fixed)
        for i, text, kind in zip(given, row, kinds, strict=True):
            values[i] = from_text(text, kind or "text")
        tuples.append(tuple(values))
        texts.append(row)
    return tuples, texts


def _load(sig: Signature, rows: _Rows, results: list[Any]) -> Steps[str]:
    """A session temp table of (argument keys -> result), filled by COPY; returns its name."""
    facts = yield LOOK
    name = f"pgml_proxy_{facts.session_id}_{next(_temp_ids)}"
    value_type = _value_type(sig)
    columns = ", ".join(f"k{i} {t}" for i, t in enumerate(rows.key_types))
    on_commit = " ON COMMIT DROP" if facts.tx_status == "T" else ""
    # Formatting thousands of vectors is CPU work: off the event loop, so other sessions are not stalled.
    if rows.binary:
        write = functools.partial(gathered.copy_rows, rows.keys, results, value_type)
    elif value_type == "real[]" and all(k in TEXT_KEYS for k in rows.key_types):
        write = functools.partial(_copy_binary, rows.keys, results, sig)
    else:
        write = functools.partial(_copy_text, rows.keys, results, sig)
    data = yield Compute(write)
    options = "" if write.func is _copy_text else " WITH (FORMAT binary)"
    keys_list = ", ".join(f"k{i}" for i in range(len(rows.key_types)))
    statements = [
        Statement(f"CREATE TEMP TABLE {name} ({columns}, v {value_type}){on_commit}"),
        Statement(f"CREATE INDEX ON {name} USING hash (k{len(rows.key_types) - 1})"),
        Statement(f"COPY {name} FROM STDIN{options}", copy_data=data),
    ]
    if len(rows.keys) >= ANALYZE_FROM:
        # Statistics of the keys are all the lookup needs, and of them only that each is distinct (they were
        # gathered by DISTINCT): a sample of 300 rows (target 1) shows that, where the default 30,000 would
        # cost ~0.6 s per 100k float-array keys (and analysing the vectors ~1 s per 10k rows).
        targets = ", ".join(f"ALTER k{i} SET STATISTICS 1" for i in range(len(rows.key_types)))
        statements += [Statement(f"ALTER TABLE {name} {targets}"), Statement(f"ANALYZE {name} ({keys_list})")]
    # Not dropped at commit: the session drops it once the statement has run.
    yield Run(tuple(statements), temp_tables=() if on_commit else (name,))
    return name


def _lateral(site: Site, sig: Signature, lookup: str, args: dict[int, ast.Node], table: str) -> ast.Node:
    """``FROM …, pgml.f(…, t.col) AS a`` -> ``LATERAL (SELECT … FROM pg_catalog.unnest(<lookup>) …) AS a``."""
    rf = site.range_function
    assert rf is not None
    alias, names = from_columns(site, sig)
    ord_column = ", u.ord" if rf.ordinality else ""
    if not sig.returns_set:
        select = f"SELECT CAST({lookup} AS {sig.returns}){', 1::bigint' if rf.ordinality else ''}"
    elif len(sig.columns) == 1:
        sql_type = sig.columns[0][1]
        select = (
            f"SELECT CAST(u.e AS {sql_type}){ord_column} FROM pg_catalog.unnest({lookup}) WITH ORDINALITY AS u(e, ord)"
            " ORDER BY u.ord"
        )
    else:
        columns = [n for n, _ in sig.columns]
        select = (
            f"SELECT {', '.join(f'u.{n}' for n in columns)}{ord_column} FROM pg_catalog.unnest({lookup})"
            f" WITH ORDINALITY AS u({', '.join(columns)}, ord) ORDER BY u.ord"
        )
    subquery = named(fill(select, args, whole=True, table=table), names)
    return ast.RangeSubselect(lateral=True, subquery=subquery, alias=alias)


def _value_type(sig: Signature) -> str:
    if not sig.returns_set:
        return sig.returns
    return "text[]" if len(sig.columns) == 1 else f"pgml.{sig.function}_result[]"


def _copy_text(rows: list[tuple[str | None, ...]], results: list[Any], sig: Signature) -> bytes:
    """The table's rows as COPY TEXT: the key texts as gathered, then the result's text."""
    return copy.encode_text((*keys, _value_text(result, sig)) for keys, result in zip(rows, results, strict=True))


def _value_text(result: Any, sig: Signature) -> str | None:
    if result is None:
        return None
    if not sig.returns_set:
        return to_text(result, sig.returns)
    return constant.array_text(sig, [r if isinstance(r, tuple) else (r,) for r in result])


TEXT_KEYS = frozenset({"text", "varchar", "bpchar", "name"})


def _copy_binary(rows: list[tuple[str | None, ...]], results: list[Any], sig: Signature) -> bytes:
    """COPY BINARY for text keys and real[] values: the vectors are packed by numpy, not printed."""
    keys = [tuple(None if key is None else send_text(key) for key in row) for row in rows]
    return gathered.copy_rows(keys, results, "real[]")
