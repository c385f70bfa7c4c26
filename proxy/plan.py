"""Rewriting one statement string: evaluate its ``pgml.*`` calls and replace them in the AST.

Owns: choosing the overload, evaluating calls with constant arguments in one
batch per overload, evaluating calls whose arguments depend on rows through the
client's own session (gather the distinct argument tuples, one batched engine
call, COPY the results into a session temp table, look them up), and the
replacement nodes (typed literals, row sources, lookups).

Must not: touch sockets (it talks to the session through :class:`Port`), or
paste user text into SQL: replacements are AST nodes; the few templates here are
built only from catalogue names and generated identifiers.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import struct
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql, visitors
from pglast.stream import RawStream

from engine.api import Call, Engine, Signature
from proxy.calls import DEFAULT, Site, bind, find_calls
from proxy.errors import FeatureNotSupported, ProxyError, UndefinedFunction
from proxy.gather import gather_statement
from proxy.internal import Port, Statement, query
from proxy.literals import NOT_CONSTANT, fold, from_text, is_constant, literal, quote_element, text_const, to_text

# Type OIDs of gathered arguments -> the catalogue's type names (and the key column type).
OID_TYPES = {
    25: "text", 1043: "text", 1042: "text", 19: "text", 705: "text",
    1009: "text[]", 1015: "text[]", 3802: "jsonb", 114: "jsonb",
    20: "bigint", 23: "bigint", 21: "bigint", 16: "boolean",
    700: "real", 701: "double precision", 1021: "real[]", 1022: "double precision[]",
    1005: "bigint[]", 1007: "bigint[]", 1016: "bigint[]", 1000: "boolean[]", 1700: "double precision",
    1231: "double precision[]", 2249: "record",
}  # fmt: skip
# Key columns keep the argument's own type, so the lookup compares like with like.
KEY_TYPES = {
    25: "text", 1043: "varchar", 1042: "bpchar", 19: "name", 705: "text", 114: "jsonb", 21: "smallint",
    23: "integer", 1005: "smallint[]", 1007: "integer[]", 1700: "numeric", 1231: "numeric[]", 2249: "text",
}  # fmt: skip
RECORD_OID = 2249  # records have no equality a table column can hold: their text is the key
_temp_ids = itertools.count(1)


class Replacer(visitors.Visitor):
    """Swaps nodes by identity: FuncCall/RangeFunction/ParamRef -> replacement."""

    def __init__(self, replacements: dict[int, ast.Node]) -> None:
        self.replacements = replacements

    def visit(self, ancestors: Any, node: ast.Node) -> Any:
        return self.replacements.get(id(node))


def deparse(node: ast.Node) -> str:
    return str(RawStream()(node))


@dataclass
class Analysis:
    """A parsed statement string and the pgml calls found in each statement."""

    stmts: tuple[ast.RawStmt, ...]
    sites: list[list[Site]]


def analyze(sql: str) -> Analysis | None:
    """Parse and find calls; None when pglast cannot parse it (the server then reports the syntax
    error itself) or when there is no engine-evaluated call (``pgml.models`` and the vector helpers
    are plain SQL)."""
    from pglast.parser import ParseError

    try:
        stmts = parse_sql(sql)
    except ParseError:
        return None
    sites = [find_calls(raw.stmt) for raw in stmts if raw.stmt is not None]
    return Analysis(stmts, sites) if any(sites) else None


async def rewrite(analysis: Analysis, engine: Engine, port: Port, *, dependent_ok: bool) -> str | None:
    """Evaluate every call and return the rewritten SQL (the analysis' tree is changed in place).

    None: the statements were run here already (a per-row call after the first statement of a
    query string); the client has every answer but the final ReadyForQuery.
    """
    stmts, per_stmt = analysis.stmts, analysis.sites
    replacements: dict[int, ast.Node] = {}
    constant: dict[int, list[tuple[Site, tuple[Any, ...]]]] = defaultdict(list)  # by id(signature)
    signature_of: dict[int, Signature] = {}
    dependent: list[tuple[Site, list[Signature], list[Any]]] = []
    first_dependent = len(stmts)
    for index, sites in enumerate(per_stmt):
        for site in sites:
            if site.nested_in is not None:
                raise FeatureNotSupported(f"pgml.{site.function}() inside another pgml call's arguments")
            candidates, slots = bind(site)
            folded = _fold(candidates, slots)
            if folded is not None:
                constant[id(folded[0])].append((site, folded[1]))
                signature_of[id(folded[0])] = folded[0]
                continue
            if not dependent_ok:
                raise FeatureNotSupported(
                    f"pgml.{site.function}() with column or parameter arguments is not supported in the extended"
                    " query protocol yet",
                    hint="Pass constant arguments, or use the simple query protocol for per-row calls.",
                )
            dependent.append((site, candidates, slots))
            first_dependent = min(first_dependent, index)
    # Procedures (train, deploy, load_dataset…) first, one call at a time in statement order:
    # what they change (a deployment, a table) is what the other calls of the statement see.
    procedures = [(signature_of[k], e) for k, entries in constant.items() for e in entries if signature_of[k].procedure]
    for sig, (site, values) in sorted(procedures, key=lambda p: _order(p[1][0])):
        (result,) = await engine.evaluate(_call(sig, [values], port))
        replacements.update(_constant_replacement(site, sig, result))
    for key, entries in constant.items():
        sig = signature_of[key]
        if sig.procedure:
            continue
        results = await engine.evaluate(_call(sig, [values for _, values in entries], port))
        for (site, _), result in zip(entries, results, strict=True):
            replacements.update(_constant_replacement(site, sig, result))
    if 0 < first_dependent < len(stmts):
        # A per-row call reads rows the earlier statements of the string may change: those run first,
        # their answers going to the client, in one implicit transaction with the rest (run here too).
        await _run_visible(stmts[:first_dependent], replacements, port, finish=False)
        for site, candidates, slots in dependent:
            replacements.update(await _dependent_replacement(site, candidates, slots, engine, port))
        await _run_visible(stmts[first_dependent:], replacements, port, finish=True)
        return None
    for site, candidates, slots in dependent:
        replacements.update(await _dependent_replacement(site, candidates, slots, engine, port))
    return _replaced(stmts, replacements)


def _replaced(stmts: tuple[ast.RawStmt, ...], replacements: dict[int, ast.Node]) -> str:
    for raw in stmts:
        if raw.stmt is not None:
            _keep_column_names(raw.stmt, replacements)
    Replacer(replacements)(stmts)
    return deparse_all(stmts)


async def _run_visible(
    stmts: tuple[ast.RawStmt, ...], replacements: dict[int, ast.Node], port: Port, *, finish: bool
) -> None:
    """The client's own statements, run by the proxy with their answers going to the client."""
    if any(isinstance(raw.stmt, ast.CopyStmt) for raw in stmts):
        raise FeatureNotSupported(
            "COPY in a query string with a per-row pgml call after its first statement",
            hint="Send the COPY on its own.",
        )
    texts = [_replaced((raw,), replacements) for raw in stmts if raw.stmt is not None]
    await port.execute([Statement(sql, visible=True) for sql in texts], keep_open=not finish, finish=finish)


def _call(sig: Signature, rows: list[tuple[Any, ...]], port: Port) -> Call:
    return Call(sig, rows, session=port.session_id, db=port, database=port.database, notices=port.notices)


def _order(site: Site) -> int:
    return site.call.location or 0


def cacheable(analysis: Analysis) -> bool:
    """True when every call's result depends on its arguments alone (no deployments, no effects)."""
    return all(all(s.cacheable for s in bind(site)[0]) for sites in analysis.sites for site in sites)


def constant_only(analysis: Analysis) -> bool:
    """True when every call's arguments are constants (no columns, no $n)."""
    for sites in analysis.sites:
        for site in sites:
            candidates, slots = bind(site)
            if _fold(candidates, slots) is None:
                return False
    return True


def fold_call(candidates: list[Signature], slots: list[Any]) -> tuple[Signature, tuple[Any, ...]] | None:
    """The overload under which every argument is a constant, with the values (None: not all constant)."""
    return _fold(candidates, slots)


def _fold(candidates: list[Signature], slots: list[Any]) -> tuple[Signature, tuple[Any, ...]] | None:
    """The first overload under which every argument is a constant, with the values."""
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
            except ProxyError:
                break
            if value is NOT_CONSTANT:
                break
            values.append(value)
        else:
            return sig, tuple(values)
    return None


# --------------------------------------------------------------------------- #
# Replacements for constant calls
# --------------------------------------------------------------------------- #


def _constant_replacement(site: Site, sig: Signature, result: Any) -> dict[int, ast.Node]:
    if not sig.returns_set:
        return {id(site.call): literal(result, sig.returns)}
    rows = [] if result is None else [r if isinstance(r, tuple) else (r,) for r in result]
    if site.range_function is not None:
        rf = site.range_function
        if len(rf.functions or ()) != 1 or rf.ordinality:
            raise FeatureNotSupported(f"pgml.{sig.function}() in ROWS FROM or WITH ORDINALITY")
        subquery = _rows_select(sig, rows)
        alias = rf.alias or ast.Alias(aliasname=sig.function)
        return {id(rf): ast.RangeSubselect(lateral=False, subquery=subquery, alias=alias)}
    return {id(site.call): _unnest(sig, text_const(_array_text(sig, rows)))}


def _array_text(sig: Signature, rows: list[tuple[Any, ...]]) -> str:
    """One array literal holding every output row (a row type for several columns)."""
    if len(sig.columns) == 1:
        return "{" + ",".join(quote_element(to_text(r[0], sig.columns[0][1])) for r in rows) + "}"
    return "{" + ",".join(quote_element(to_text(tuple(r), "record")) for r in rows) + "}"


def _unnest(sig: Signature, array: ast.Node) -> Any:
    """A set-returning expression for a SELECT list: ``unnest(array)``, cast back to the column type."""
    if len(sig.columns) == 1:
        template = f"SELECT CAST(unnest(CAST($1 AS text[])) AS {sig.columns[0][1]})"
    else:
        template = f"SELECT unnest(CAST($1 AS pgml.{sig.function}_result[]))"
    return _fill(template, {1: array})


def _rows_select(sig: Signature, rows: list[tuple[Any, ...]]) -> Any:
    names = [name for name, _ in sig.columns]
    cols = ", ".join(f"CAST(u.c{i} AS {t}) AS {n}" for i, (n, t) in enumerate(sig.columns))
    arrays = ", ".join(f"CAST(${i + 1} AS text[])" for i in range(len(names)))
    aliases = ", ".join(f"c{i}" for i in range(len(names)))
    template = f"SELECT {cols} FROM unnest({arrays}) WITH ORDINALITY AS u({aliases}, ord) ORDER BY u.ord"
    arrays_text = {
        i + 1: text_const("{" + ",".join(quote_element(to_text(r[i], t)) for r in rows) + "}")
        for i, (_, t) in enumerate(sig.columns)
    }
    return _fill(template, arrays_text, whole=True)


def _fill(template: str, values: Mapping[int, ast.Node], whole: bool = False) -> Any:
    """Parse a template built from catalogue names only, and put nodes where its $n are."""
    stmt: Any = parse_sql(template)[0].stmt  # parsed per use: the tree is then filled in place
    params: dict[int, ast.Node] = {}

    class Collect(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            params[id(node)] = values[int(node.number or 0)]

    Collect()(stmt)
    Replacer(params)(stmt)
    return stmt if whole else stmt.targetList[0].val


# --------------------------------------------------------------------------- #
# Per-row calls: gather, evaluate, load, look up
# --------------------------------------------------------------------------- #


async def _dependent_replacement(
    site: Site, candidates: list[Signature], slots: list[Any], engine: Engine, port: Port
) -> dict[int, ast.Node]:
    # Constant arguments are read here; only the others are gathered from the rows.
    given = [i for i, s in enumerate(slots) if s is not DEFAULT and not is_constant(s)]
    if not given:  # constants that fit no overload: report why under the first one
        _fold_strict(candidates[0], slots)
    gather = gather_statement(site, [slots[i] for i in given])
    result = await query(port, deparse(gather))
    types = [OID_TYPES.get(oid) for _, oid in result.columns]
    sig = _choose(site, candidates, given, types)
    fixed = _fold_strict(sig, slots, skip=set(given))
    decode = functools.partial(_decode_rows, result.rows, fixed, given, types)
    # Thousands of arrays take a while to read: off the event loop, so other sessions are not stalled.
    tuples, texts = await asyncio.to_thread(decode) if len(result.rows) > 500 else decode()
    results = await engine.evaluate(_call(sig, tuples, port)) if tuples else []
    keys = [KEY_TYPES.get(oid, t or "text") for (_, oid), t in zip(result.columns, types, strict=True)]
    name = await _load(port, sig, keys, texts, results)
    conditions = " AND ".join(
        f"k{i} = CAST(${i + 1} AS text)" if oid == RECORD_OID else f"k{i} = ${i + 1}"
        for i, (_, oid) in enumerate(result.columns)
    )
    lookup = f"(SELECT v FROM pg_temp.{name} WHERE {conditions})"
    args = {i + 1: slots[g] for i, g in enumerate(given)}
    if not sig.returns_set:
        return {id(site.call): _fill(f"SELECT CAST({lookup} AS {sig.returns})", args)}
    if site.range_function is not None:
        return {id(site.range_function): _lateral(site, sig, lookup, args)}
    if len(sig.columns) == 1:
        return {id(site.call): _fill(f"SELECT CAST(unnest({lookup}) AS {sig.columns[0][1]})", args)}
    return {id(site.call): _fill(f"SELECT unnest({lookup})", args)}


def _decode_rows(
    rows: list[tuple[str | None, ...]], fixed: list[Any], given: list[int], types: list[str | None]
) -> tuple[list[tuple[Any, ...]], list[tuple[str | None, ...]]]:
    """Gathered argument rows -> full argument tuples (constants filled in) and their key texts."""
    tuples, texts = [], []
    for row in rows:
        if any(v is None for v in row):
            continue  # STRICT: a NULL argument gives NULL, no lookup row needed
        values = list(fixed)
        for i, text, kind in zip(given, row, types, strict=True):
            values[i] = from_text(text, kind or "text")
        tuples.append(tuple(values))
        texts.append(row)
    return tuples, texts


async def _load(
    port: Port, sig: Signature, keys: list[str], texts: list[tuple[str | None, ...]], results: list[Any]
) -> str:
    """A session temp table of (argument keys -> result), filled by COPY; returns its name."""
    name = f"pgml_proxy_{port.session_id}_{next(_temp_ids)}"
    value_type = _value_type(sig)
    columns = ", ".join(f"k{i} {t}" for i, t in enumerate(keys))
    on_commit = " ON COMMIT DROP" if port.tx_status == "T" else ""
    if not on_commit:
        port.temp_tables.append(name)  # dropped by the session once the statement has run
    # Formatting thousands of vectors is CPU work: off the event loop, so other sessions are not stalled.
    binary = value_type == "real[]" and all(k in TEXT_KEYS for k in keys)
    copy = await asyncio.to_thread(_copy_binary if binary else _copy_text, texts, results, sig)
    options = " WITH (FORMAT binary)" if binary else ""
    keys_list = ", ".join(f"k{i}" for i in range(len(keys)))
    await port.execute(
        [
            Statement(f"CREATE TEMP TABLE {name} ({columns}, v {value_type}){on_commit}"),
            Statement(f"CREATE INDEX ON {name} USING hash (k{len(keys) - 1})"),
            Statement(f"COPY {name} FROM STDIN{options}", copy_data=copy),
            # Statistics of the keys are all the lookup needs; analysing the vectors would cost ~1 s per 10k rows.
            Statement(f"ANALYZE {name} ({keys_list})"),
        ]
    )
    return name


def _lateral(site: Site, sig: Signature, lookup: str, args: dict[int, ast.Node]) -> ast.Node:
    """``FROM …, pgml.f(…, t.col) AS a`` -> ``LATERAL (SELECT … FROM unnest(<lookup>) …) AS a``."""
    rf = site.range_function
    assert rf is not None
    if len(sig.columns) == 1:
        column, sql_type = sig.columns[0]
        select = f"SELECT CAST(u.e AS {sql_type}) AS {column} FROM unnest({lookup}) WITH ORDINALITY AS u(e, ord)"
    else:
        names = [n for n, _ in sig.columns]
        select = (
            f"SELECT {', '.join(f'u.{n}' for n in names)} FROM unnest({lookup})"
            f" WITH ORDINALITY AS u({', '.join(names)}, ord)"
        )
    subquery = _fill(f"{select} ORDER BY u.ord", args, whole=True)
    return ast.RangeSubselect(lateral=True, subquery=subquery, alias=rf.alias or ast.Alias(aliasname=sig.function))


def _fold_strict(sig: Signature, slots: list[Any], skip: set[int] | None = None) -> list[Any]:
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


def _value_type(sig: Signature) -> str:
    if not sig.returns_set:
        return sig.returns
    return "text[]" if len(sig.columns) == 1 else f"pgml.{sig.function}_result[]"


def _copy_text(rows: list[tuple[str | None, ...]], results: list[Any], sig: Signature) -> bytes:
    """COPY text format: tab-separated, backslash escapes, \\N for NULL."""
    lines = []
    for keys, result in zip(rows, results, strict=True):
        if result is None:
            value = None
        elif not sig.returns_set:
            value = to_text(result, sig.returns)
        else:
            out = [r if isinstance(r, tuple) else (r,) for r in result]
            value = _array_text(sig, out)
        lines.append("\t".join(_copy_field(v) for v in (*keys, value)))
    return ("\n".join(lines) + "\n").encode() if lines else b""


TEXT_KEYS = frozenset({"text", "varchar", "bpchar", "name"})
_COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
_REAL_OID = 700


def _copy_binary(rows: list[tuple[str | None, ...]], results: list[Any], sig: Signature) -> bytes:
    """COPY binary format for text keys and real[] values: the vectors are packed by numpy, not printed."""
    import numpy as np

    ncols = struct.pack("!h", len(rows[0]) + 1) if rows else b""
    parts = [_COPY_HEADER]
    for keys, vector in zip(rows, results, strict=True):
        parts.append(ncols)
        for key in keys:
            data = (key or "").encode()
            parts.append(struct.pack("!i", len(data)) + data)
        if vector is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        values = np.asarray(vector, dtype=np.float32)
        pairs = np.empty(len(values), dtype=[("size", ">i4"), ("value", ">f4")])
        pairs["size"], pairs["value"] = 4, values
        # array header: 1 dimension, no NULLs, element type float4, length, lower bound 1
        body = struct.pack("!iiIii", 1, 0, _REAL_OID, len(values), 1) + pairs.tobytes()
        parts.append(struct.pack("!i", len(body)) + body)
    parts.append(b"\xff\xff")  # trailer
    return b"".join(parts)


def _copy_field(value: str | None) -> str:
    if value is None:
        return "\\N"
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _choose(site: Site, candidates: list[Signature], given: list[int], types: list[str | None]) -> Signature:
    for sig in candidates:
        if all(_accepts(sig.params[i].type, t) for i, t in zip(given, types, strict=True)):
            return sig
    shown = ", ".join(t or "unknown" for t in types)
    raise UndefinedFunction(
        f"function pgml.{site.function}({shown}) does not exist",
        hint="No function matches the given argument types. You might need to add explicit type casts.",
    )


def _accepts(param: str, given: str | None) -> bool:
    if given is None:
        return False
    if param == given:
        return True
    # Integer arrays coerce to real[] implicitly (element casts int -> float4 are implicit); float8 -> float4
    # is only an assignment cast in PostgreSQL, accepted here because pgml's math is float4 anyway.
    return param == "real[]" and given in ("double precision[]", "bigint[]")


# --------------------------------------------------------------------------- #
# Output column names
# --------------------------------------------------------------------------- #


def _keep_column_names(root: ast.Node, replacements: dict[int, ast.Node]) -> None:
    """Name SELECT-list columns as PostgreSQL would have named the original call (``embed``, ``chunk``)."""

    class Names(visitors.Visitor):
        def visit_ResTarget(self, ancestors: Any, node: ast.ResTarget) -> None:
            if node.name is None:
                inner = node.val
                while isinstance(inner, ast.TypeCast) and isinstance(inner.arg, ast.FuncCall):
                    inner = inner.arg
                if isinstance(inner, ast.FuncCall) and id(inner) in replacements:
                    node.name = inner.funcname[-1].sval  # type: ignore[index]

    if isinstance(root, ast.SelectStmt | ast.UpdateStmt | ast.DeleteStmt | ast.InsertStmt):
        Names()(root)


def deparse_all(stmts: tuple[ast.RawStmt, ...]) -> str:
    """Statements joined the way a rewritten Query carries them."""
    return "; ".join(deparse(raw) for raw in stmts)
