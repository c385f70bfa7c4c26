"""Where a training run's rows come from, and which of them train and test.

Owns: the arguments of one ``pgml.train`` call (:class:`TrainArgs`, defaults filled, checked), the
snapshot source (the relation, as the server spells it, or the project's last snapshot), reading the
rows with one binary ``COPY … TO STDOUT`` in the caller's transaction and privileges, and the train/test split.

Must not: build SQL with values in it (``engine.pg.registry`` binds them), or decode COPY data on the
event loop (``Context.work``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.api import Database, InvalidArgument, Statement, UnknownModel
from engine.ml.algorithms import SUPERVISED_TASKS
from engine.pg import registry
from engine.pg.table import Table, copy_select_list, decode_copy_binary
from engine.runtime.context import Context

SAMPLINGS = frozenset({"random", "last", "stratified"})


@dataclass(frozen=True)
class TrainArgs:
    """The arguments of one ``pgml.train`` call, defaults filled."""

    project_name: str
    task: str | None
    relation_name: str | None
    y_column_name: list[str] | None
    algorithm: str
    hyperparams: dict[str, Any]
    search: str | None
    search_params: dict[str, Any]
    search_args: dict[str, Any]
    test_size: float
    test_sampling: str
    runtime: str | None
    automatic_deploy: bool
    materialize_snapshot: bool
    preprocess: dict[str, Any]

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> TrainArgs:
        (name, task, relation, y, algorithm, hyper, search, search_params, search_args, test_size, sampling,
         runtime, automatic, materialize, preprocess) = row  # fmt: skip
        if name is None:
            raise InvalidArgument("project_name must not be NULL")
        for label, value in (("hyperparams", hyper), ("search_params", search_params), ("search_args", search_args),
                             ("preprocess", preprocess)):  # fmt: skip
            if value is not None and not isinstance(value, dict):
                raise InvalidArgument(f"{label} must be a JSON object")
        if sampling is not None and sampling not in SAMPLINGS:
            raise InvalidArgument(f'invalid input value for enum pgml.sampling: "{sampling}"')
        return cls(
            name, task, relation, [y] if isinstance(y, str) else y, algorithm or "linear", hyper or {}, search,
            search_params or {}, search_args or {}, 0.25 if test_size is None else float(test_size),
            sampling or "stratified", runtime, automatic is not False, bool(materialize), preprocess or {},
        )  # fmt: skip


@dataclass(frozen=True)
class Source:
    """Where the rows come from: the relation (as the server spells it), label columns, split settings."""

    relation: str  # regclass text, safe to use as SQL
    stored_name: str  # what pgml.snapshots.relation_name records
    y_columns: list[str]
    test_size: float
    test_sampling: str
    snapshot_id: int | None  # reused snapshot (relation_name NULL)


_LAST_SNAPSHOT = """
SELECT s.id, s.relation_name, s.y_column_name::text, s.test_size, s.test_sampling::text
FROM pgml.models m JOIN pgml.snapshots s ON s.id = m.snapshot_id
WHERE m.project_id = $1 ORDER BY m.id DESC LIMIT 1"""

# Qualified: that schema. Unqualified: public (as PostgresML), else the search path (temp tables).
_RELATION = """
SELECT CASE WHEN $1::text IS NOT NULL THEN to_regclass(format('%I.%I', $1::text, $2::text))
            ELSE coalesce(to_regclass(format('public.%I', $2::text)), to_regclass(format('%I', $2::text))) END::text,
       CASE WHEN $1::text IS NOT NULL THEN $1::text || '.' || $2::text
            WHEN to_regclass(format('public.%I', $2::text)) IS NOT NULL THEN 'public.' || $2::text
            ELSE $2::text END"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""


async def data_source(db: Database, project: registry.Project | None, args: TrainArgs, task: str) -> Source:
    if args.relation_name is None:
        found = None if project is None else (await registry.rows(db, _LAST_SNAPSHOT, project.id)).rows
        if not found:
            raise InvalidArgument(
                "You must pass a `relation_name` and `y_column_name` to snapshot the first time you train a model."
            )
        sid, stored, y_text, test_size, sampling = found[0]
        relation, _ = await _relation(db, str(stored))
        y = registry.text_list(y_text) or []
        return Source(relation, str(stored), y, float(test_size or 0.25), str(sampling), int(sid or 0))
    y = args.y_column_name or []
    if task in SUPERVISED_TASKS and not y:
        raise InvalidArgument("You must pass a `y_column_name` when you pass a `relation_name` for a supervised task.")
    if task not in SUPERVISED_TASKS:
        y = []  # PostgresML ignores a label for clustering and decomposition
    relation, stored = await _relation(db, args.relation_name)
    return Source(relation, stored, y, args.test_size, args.test_sampling, None)


async def _relation(db: Database, name: str) -> tuple[str, str]:
    schema, table = _split_name(name)
    found = (await registry.rows(db, _RELATION, schema, table)).rows
    if not found or found[0][0] is None:
        raise UnknownModel(f"Relation `{name}` does not exist.", hint="Use schema.table, or a table in public.")
    return str(found[0][0]), str(found[0][1])


def _split_name(name: str) -> tuple[str | None, str]:
    """``schema.table`` (first dot; double quotes allowed) -> parts; HF names keep later dots and slashes."""
    match = re.fullmatch(r'\s*(?:"((?:[^"]|"")+)"|([^".]+))\.(?:"((?:[^"]|"")+)"|(.+?))\s*', name)
    if match is None:
        return None, name.strip().strip('"')
    schema = match.group(1).replace('""', '"') if match.group(1) else match.group(2)
    table = match.group(3).replace('""', '"') if match.group(3) else match.group(4)
    return schema, table


async def read_rows(db: Database, source: Source, ctx: Context) -> tuple[Table, dict[str, bool]]:
    columns = (await registry.rows(db, _COLUMNS, source.relation)).rows
    names = [(str(n), str(t)) for n, t, _ in columns]
    for y in source.y_columns:
        if y not in {n for n, _ in names}:
            raise InvalidArgument(f"Column `{y}` not found. Did you pass the correct `y_column_name`?")
    select = f"COPY (SELECT {copy_select_list(names)} FROM {source.relation}) TO STDOUT (FORMAT binary)"
    copied = (await db.execute([Statement(select)]))[0]
    # Tens of ms per 100k x 20, still not on the event loop.
    table = await ctx.work(decode_copy_binary, copied.copy, copied.copy_rows, names)
    return table, {str(n): v == "t" for n, _, v in columns}


def split(n: int, test_size: float, sampling: str, strata: list[Any] | None) -> tuple[Any, Any]:
    """Train and test row indices: the last round(n * test_size) rows (or test_size rows) of the order."""
    n_test = int(test_size) if test_size > 1 else round(n * test_size)
    if n_test >= n:
        raise InvalidArgument(f"test_size = {test_size} leaves no training rows out of {n}")
    rng = np.random.default_rng()
    if sampling == "last":
        order = np.arange(n)
    elif sampling == "stratified" and strata is not None:
        # Shuffle within each label, then interleave by relative rank: every label's share reaches the tail.
        rank = np.empty(n)
        groups: dict[Any, list[int]] = {}
        for i, value in enumerate(strata):
            groups.setdefault(value, []).append(i)
        for members in groups.values():
            shuffled = rng.permutation(members)
            rank[shuffled] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.argsort(rank, kind="stable")
    else:
        order = rng.permutation(n)
    return np.sort(order[: n - n_test]), np.sort(order[n - n_test :])
