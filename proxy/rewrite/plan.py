"""Rewriting one statement string: evaluate its ``pgml.*`` calls and replace them in the AST.

Owns: the order of evaluation — statement by statement, and within one statement inside-out in
rounds (a call waits while its arguments or the rows its arguments read still hold another pgml
call) —, choosing the overload (exact and implicit type matches, as PostgreSQL resolves the stubs),
evaluating calls with constant arguments in one batch per overload, evaluating calls whose
arguments need the server through the client's own session (gather the distinct argument tuples,
one batched engine call; arguments that read no row make a constant call; otherwise COPY the
results into a session temp table and look them up), the replacement nodes (typed literals, row
sources, lookups) and the output column names and types PostgreSQL gives the original statement.

Must not: touch sockets (it talks to the session through :class:`Port`), or
paste user text into SQL: replacements are AST nodes; the few templates here are
built only from catalogue names and generated identifiers, and output names are set on the AST.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql, visitors
from pglast.stream import RawStream

from engine.api import Call, Engine, Signature
from proxy.errors import FeatureNotSupported, ProxyError, UndefinedFunction
from proxy.rewrite import gather
from proxy.rewrite.calls import DEFAULT, Site, bind, find_calls, nodes_under
from proxy.rewrite.literals import (
    NOT_CONSTANT,
    fold,
    from_text,
    is_constant,
    literal,
    quote_element,
    text_const,
    to_text,
)
from proxy.session.exchange import Port, Statement, query

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
# Key columns keep the argument's own type, so the lookup compares like with like.
KEY_TYPES = {
    25: "text", 1043: "varchar", 1042: "bpchar", 19: "name", 705: "text", 114: "jsonb", 21: "smallint",
    23: "integer", 1005: "smallint[]", 1007: "integer[]", 1700: "numeric", 1231: "numeric[]", 2249: "text",
    199: "jsonb[]", 700: "text", 701: "text", 1021: "text", 1022: "text",
}  # fmt: skip
# Keyed on their text, in the gather as in the lookup: records have no equality a table column can hold, and
# floats printed under a client's extra_float_digits <= 0 do not read back to the same value.
TEXT_KEYED = frozenset({2249, 700, 701, 1021, 1022})
_temp_ids = itertools.count(1)


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


def deparse(node: ast.Node) -> str:
    return str(RawStream()(node))


@dataclass
class Analysis:
    """A parsed statement string and the pgml calls found in each statement (one list per statement)."""

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
    sites = [find_calls(raw.stmt) if raw.stmt is not None else [] for raw in stmts]
    return Analysis(stmts, sites) if any(sites) else None


async def rewrite(analysis: Analysis, engine: Engine, port: Port, *, dependent_ok: bool) -> str | None:
    """Evaluate every call and return the rewritten SQL (the analysis' tree is changed in place).

    Calls are evaluated inside-out, in rounds: a call waits while its arguments, or the rows its
    arguments are read from (a WHERE, a CTE, a derived table), still contain another pgml call; so
    no query the proxy sends contains one. The statements of a string are taken in order.

    None: the statements were run here already (a call after the first statement of a query string
    needed the server: the statements before it ran first, with their answers going to the client);
    the client has every answer but the final ReadyForQuery.
    """
    stmts = analysis.stmts
    for raw, sites in zip(stmts, analysis.sites, strict=True):
        _keep_column_names(raw.stmt, sites)
        top = raw.stmt.targetList if isinstance(raw.stmt, ast.SelectStmt) else None
        outputs = {id(t.val) for t in top or ()}
        for site in sites:
            site.output = id(site.call) in outputs
    ran = 0  # statements of the string already run on the session (visibly), once one needed the server

    async def before_query(index: int) -> None:
        nonlocal ran
        if ran == 0 and index > 0:
            await _run_visible(stmts[:index], port, finish=False)
            ran = index

    for index, (raw, sites) in enumerate(zip(stmts, analysis.sites, strict=True)):
        pending = list(sites)
        while pending:
            ready = [site for site in pending if not _waits(site, pending)]
            if not ready:
                raise FeatureNotSupported("pgml calls whose arguments depend on each other's results")
            replacements = await _evaluate(ready, engine, port, dependent_ok, functools.partial(before_query, index))
            raw.stmt = replace_nodes(raw.stmt, replacements)
            pending = [site for site in pending if site not in ready]
        if ran:
            await _run_visible((raw,), port, finish=index == len(stmts) - 1)
            ran = index + 1
    return None if ran else deparse_all(stmts)


def _waits(site: Site, pending: list[Site]) -> bool:
    """Whether ``site`` must wait for another pending call: one inside its arguments or the rows they read."""
    others = {id(other.call) for other in pending if other is not site}
    if not others:
        return False
    args = [a for a in site.call.args or ()]
    regions: list[Any] = list(args)
    if not constant_call(site):
        _, slots = bind(site)
        regions.extend(gather.reads(site, [s for s in slots if s is not DEFAULT and not is_constant(s)]))
    return any(id(node) in others for node in _calls_under(regions))


def _calls_under(node: Any) -> Iterator[ast.FuncCall]:
    return (item for item in nodes_under(node) if isinstance(item, ast.FuncCall))


async def _evaluate(
    ready: list[Site], engine: Engine, port: Port, dependent_ok: bool, before_query: Any
) -> dict[int, ast.Node]:
    """One round: procedures one by one in statement order, constants one batch per overload, then the rest."""
    replacements: dict[int, ast.Node] = {}
    constant: dict[int, list[tuple[Site, tuple[Any, ...]]]] = defaultdict(list)  # by id(signature)
    signature_of: dict[int, Signature] = {}
    dependent: list[tuple[Site, list[Signature], list[Any]]] = []
    for site in ready:
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
    # Procedures (train, deploy, load_dataset…) first, one call at a time in statement order:
    # what they change (a deployment, a table) is what the other calls of the statement see.
    if any(not signature_of[k].cacheable for k in constant):
        await before_query()  # they read the database (a model, a table): after the string's earlier statements
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
    for site, candidates, slots in dependent:
        await before_query()
        replacements.update(await _dependent_replacement(site, candidates, slots, engine, port))
    return replacements


async def _run_visible(stmts: tuple[ast.RawStmt, ...], port: Port, *, finish: bool) -> None:
    """The client's own statements (rewritten already), run by the proxy with their answers going to the client."""
    if any(isinstance(raw.stmt, ast.CopyStmt) for raw in stmts):
        raise FeatureNotSupported(
            "COPY in a query string with a per-row pgml call after its first statement",
            hint="Send the COPY on its own.",
        )
    texts = [deparse(raw) for raw in stmts if raw.stmt is not None]
    await port.execute([Statement(sql, visible=True) for sql in texts], keep_open=not finish, finish=finish)


def _call(sig: Signature, rows: list[tuple[Any, ...]], port: Port) -> Call:
    return Call(sig, rows, session=port.session_id, db=port, database=port.database, notices=port.notices)


def _order(site: Site) -> int:
    return site.call.location or 0


def cacheable(analysis: Analysis) -> bool:
    """True when every call's result depends on its arguments alone (no deployments, no effects)."""
    return all(all(s.cacheable for s in bind(site)[0]) for sites in analysis.sites for site in sites)


def constant_only(analysis: Analysis) -> bool:
    """True when every call's arguments are constants (no columns, no $n, no other pgml call)."""
    return all(constant_call(site) for sites in analysis.sites for site in sites)


def constant_call(site: Site) -> bool:
    """Whether the call's arguments are all constants under one of its overloads."""
    candidates, slots = bind(site)
    return _fold(candidates, slots) is not None


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
    rf = site.range_function
    if not sig.returns_set:
        value = literal(result, sig.returns)
        if rf is None:
            return {id(site.call): value}
        # A call in FROM is a one-row relation whose column is named as PostgreSQL names it.
        alias, columns = _from_columns(site, sig)
        targets = [ast.ResTarget(val=value)]
        if rf.ordinality:
            targets.append(ast.ResTarget(val=literal(1, "bigint")))
        select = ast.SelectStmt(targetList=tuple(targets))
        return {id(rf): ast.RangeSubselect(lateral=False, subquery=_named(select, columns), alias=alias)}
    rows = [] if result is None else [r if isinstance(r, tuple) else (r,) for r in result]
    if rf is not None:
        alias, columns = _from_columns(site, sig)
        subquery = _named(_rows_select(sig, rows, ordinality=bool(rf.ordinality)), columns)
        return {id(rf): ast.RangeSubselect(lateral=False, subquery=subquery, alias=alias)}
    return {id(site.call): _unnest(sig, text_const(_array_text(sig, rows)), as_record=site.output)}


def _from_columns(site: Site, sig: Signature) -> tuple[ast.Alias, list[str]]:
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


def _named(select: Any, names: list[str]) -> Any:
    """Name a generated SELECT's output columns (identifiers set on the AST, never pasted into SQL)."""
    for target, name in zip(select.targetList, names, strict=True):
        target.name = name
    return select


def _array_text(sig: Signature, rows: list[tuple[Any, ...]]) -> str:
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
        template = f"SELECT {_row_of(sig, f'CAST($1 AS pgml.{sig.function}_result[])')}"
    else:
        template = f"SELECT pg_catalog.unnest(CAST($1 AS pgml.{sig.function}_result[]))"
    return _fill(template, {1: array})


def _row_of(sig: Signature, array: str) -> str:
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
    return _fill(template, arrays_text, whole=True)


def _fill(template: str, values: Mapping[int, ast.Node], whole: bool = False) -> Any:
    """Parse a template built from catalogue names only, and put nodes where its $n are."""
    stmt: Any = parse_sql(template)[0].stmt  # parsed per use: the tree is then filled in place
    params: dict[int, ast.Node] = {}

    class Collect(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            params[id(node)] = values[int(node.number or 0)]

    Collect()(stmt)
    replace_nodes(stmt, params)
    return stmt if whole else stmt.targetList[0].val


# --------------------------------------------------------------------------- #
# Per-row calls: gather, evaluate, load, look up
# --------------------------------------------------------------------------- #


async def _dependent_replacement(
    site: Site, candidates: list[Signature], slots: list[Any], engine: Engine, port: Port
) -> dict[int, ast.Node]:
    # Constant arguments are read here; only the others are gathered (and constants only the server can
    # read, such as a cast the proxy does not fold, are computed by the server too).
    given = [
        i
        for i, s in enumerate(slots)
        if s is not DEFAULT and (not is_constant(s) or not any(_folds_as(s, sig.params[i].type) for sig in candidates))
    ]
    if not given:  # constants that fit no overload: report why under the first one
        _fold_strict(candidates[0], slots)
    gathering = gather.gather_statement(site, [slots[i] for i in given])
    if find_calls(gathering):  # what evaluating inside-out cannot untangle (a call in a recursive CTE's term)
        raise FeatureNotSupported(
            f"pgml.{site.function}() reads rows that another pgml call in the same statement produces this way",
            hint="Compute the inner call in an earlier statement (a temporary table), then call pgml on its rows.",
        )
    result = await query(port, deparse(gathering))
    types = [OID_TYPES.get(oid) for _, oid in result.columns]
    sig = _choose(site, candidates, slots, given, [oid for _, oid in result.columns])
    fixed = _fold_strict(sig, slots, skip=set(given))
    decode = functools.partial(_decode_rows, result.rows, fixed, given, types)
    # Thousands of arrays take a while to read: off the event loop, so other sessions are not stalled.
    tuples, texts = await asyncio.to_thread(decode) if len(result.rows) > 500 else decode()
    if gathering.fromClause is None and len(result.rows) <= 1:
        # The arguments read no row of the statement (scalar subqueries, CTEs, expressions): a constant call.
        (value,) = await engine.evaluate(_call(sig, tuples, port)) if tuples else (None,)
        return _constant_replacement(site, sig, value)
    results = await engine.evaluate(_call(sig, tuples, port)) if tuples else []
    keys = [KEY_TYPES.get(oid, t or "text") for (_, oid), t in zip(result.columns, types, strict=True)]
    name = await _load(port, sig, keys, texts, results)
    conditions = " AND ".join(
        f"k{i} OPERATOR(pg_catalog.=) CAST(${i + 1} AS text)"
        if oid in TEXT_KEYED
        else f"k{i} OPERATOR(pg_catalog.=) ${i + 1}"
        for i, (_, oid) in enumerate(result.columns)
    )
    lookup = f"(SELECT v FROM pg_temp.{name} WHERE {conditions})"
    args = {i + 1: slots[g] for i, g in enumerate(given)}
    if site.range_function is not None:
        return {id(site.range_function): _lateral(site, sig, lookup, args)}
    if not sig.returns_set:
        return {id(site.call): _fill(f"SELECT CAST({lookup} AS {sig.returns})", args)}
    if len(sig.columns) == 1:
        return {id(site.call): _fill(f"SELECT CAST(pg_catalog.unnest({lookup}) AS {sig.columns[0][1]})", args)}
    if site.output:
        return {id(site.call): _fill(f"SELECT {_row_of(sig, lookup)}", args)}
    return {id(site.call): _fill(f"SELECT pg_catalog.unnest({lookup})", args)}


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
    """``FROM …, pgml.f(…, t.col) AS a`` -> ``LATERAL (SELECT … FROM pg_catalog.unnest(<lookup>) …) AS a``."""
    rf = site.range_function
    assert rf is not None
    alias, names = _from_columns(site, sig)
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
    subquery = _named(_fill(select, args, whole=True), names)
    return ast.RangeSubselect(lateral=True, subquery=subquery, alias=alias)


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


def _choose(site: Site, candidates: list[Signature], slots: list[Any], given: list[int], oids: list[int]) -> Signature:
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


def _folds_as(node: ast.Node, sql_type: str) -> bool:
    """Whether the proxy reads this constant itself (a constant it reads but rejects counts: its error is ours)."""
    try:
        return fold(node, sql_type) is not NOT_CONSTANT
    except ProxyError:
        return True


def _folds(sig: Signature, slots: list[Any], skip: set[int]) -> bool:
    try:
        _fold_strict(sig, slots, skip)
    except ProxyError:
        return False
    return True


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


def _match(param: str, given: str | None) -> int | None:
    """1: exactly the parameter's type; 0: by an implicit cast; None: not at all."""
    if given is None:
        return None
    if param == given:
        return 1
    if given.endswith("[]") and param.endswith("[]"):
        given, param = given[:-2], param[:-2]
    return 0 if param in IMPLICIT.get(given, ()) else None


# --------------------------------------------------------------------------- #
# Output column names
# --------------------------------------------------------------------------- #


def _keep_column_names(root: ast.Node | None, sites: list[Site]) -> None:
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
                if any(id(c) in calls for c in _calls_under(target.val)):
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


def deparse_all(stmts: tuple[ast.RawStmt, ...]) -> str:
    """Statements joined the way a rewritten Query carries them."""
    return "; ".join(deparse(raw) for raw in stmts)
