"""``pgml.train`` / ``pgml.train_joint``: PostgresML's training algorithm through the client's own session.

Owns: the order of a training run — project rules, snapshot source (relation or
the project's last snapshot), reading the rows with one ``COPY … TO STDOUT`` in
the caller's transaction and privileges, the train/test split, preprocessing,
search, fit and metrics in a worker thread, the automatic deploy rule, and one
batch of registry writes at the end (so a failed run leaves nothing behind).

Must not: build SQL with values in it (``engine.registry`` binds them), or
block the event loop (model work goes through ``Context.work``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import registry
from engine.api import Call, Canceled, Database, InvalidArgument, Statement, UnknownModel
from engine.deploy import better_or_equal

if TYPE_CHECKING:
    from engine.tabular import Table
    from engine.text import Context

log = logging.getLogger(__name__)

SUPERVISED = frozenset({"regression", "classification"})
SAMPLINGS = frozenset({"random", "last", "stratified"})
MAX_LOG_ROWS = 10_000


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


@dataclass(frozen=True)
class Fitted:
    """What a training run produced, ready to be written."""

    columns: list[dict[str, Any]]
    analysis: dict[str, Any]
    num_features: int
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    artifact: tuple[str, bytes]
    classes: list[float] | None
    events: list[dict[str, Any]]


async def train(call: Call, ctx: Context) -> list[Any]:
    joint = call.signature.function == "train_joint"
    return [[await _train(TrainArgs.from_row(tuple(row)), joint, ctx)] for row in call.rows]  # one row each


async def _train(args: TrainArgs, joint: bool, ctx: Context) -> tuple[str, str, str, bool]:
    from engine import algorithms

    db = ctx.database()
    project = await registry.project(db, args.project_name)
    task = _task(project, args)
    algorithm = algorithms.default_algorithm(task) if args.algorithm == "linear" else args.algorithm
    algorithm = algorithms.normalize_algorithm(algorithm)
    runtime = algorithms.resolve_runtime(algorithm, task, args.runtime, joint)
    algorithms.estimator(algorithm, task, args.hyperparams, joint=joint, runtime=runtime)  # fail before reading
    source = await data_source(db, project, args, task)
    table, nullable = await read_rows(db, source, ctx)
    log.info("pgml.train: %s %s on %d rows", task, algorithm, table.num_rows)  # names are client data: debug only
    log.debug("training %s on %s", args.project_name, source.relation)
    fitted = await ctx.work(_fit, args, source, table, nullable, task, algorithm, runtime, joint, ctx.cancelled.is_set)
    current = await deployed_metrics(db, project)
    deploy = args.automatic_deploy and better_or_equal(task, fitted.metrics, current)
    if args.automatic_deploy and not deploy and current is not None:
        ctx.notices.append(not_better(task, fitted.metrics, current))
    await _write(db, args, project, task, algorithm, runtime, source, fitted, deploy, registry.signer(ctx))
    return (args.project_name, algorithms.dashed_task(task), algorithm, deploy)


async def snapshot(call: Call, ctx: Context) -> list[Any]:
    """``pgml.snapshot(relation, y_column_name, test_size, test_sampling, preprocess)``: a materialized snapshot."""
    out: list[Any] = []
    for relation_name, y, test_size, sampling, preprocess in call.rows:
        if relation_name is None or y is None or test_size is None or sampling is None or preprocess is None:
            out.append([])  # STRICT
            continue
        args = TrainArgs.from_row(("", None, relation_name, y, None, None, None, None, None, test_size, sampling,
                                   None, None, True, preprocess))  # fmt: skip
        out.append([await _snapshot(args, ctx)])
    return out


async def _snapshot(args: TrainArgs, ctx: Context) -> tuple[str, str]:
    from engine import preprocess

    db = ctx.database()
    source = await data_source(db, None, args, "regression")
    table, nullable = await read_rows(db, source, ctx)

    def analyze() -> preprocess.Snapshot:
        train_rows, _ = split(table.num_rows, source.test_size, source.test_sampling, None)
        return preprocess.analyze(table, source.y_columns, args.preprocess, train_rows, nullable)

    columns, analysis = (await ctx.work(analyze)).to_json()
    (snapshot_id,) = await registry.next_ids(db, "snapshots")
    await db.execute(
        registry.snapshot_statements(
            snapshot_id, source.stored_name, source.relation, source.y_columns, source.test_size,
            source.test_sampling, columns, analysis, materialize=True,
        )
    )  # fmt: skip
    return (source.stored_name, source.y_columns[0])


def not_better(task: str, new: dict[str, Any], current: dict[str, Any]) -> str:
    from engine.metrics import key_metric

    name, _ = key_metric(task)
    return f"New model's {name} is not better than current model. New: {new.get(name)}, Current {current.get(name)}"


def _task(project: registry.Project | None, args: TrainArgs) -> str:
    from engine.algorithms import CLASSICAL_TASKS, normalize_task

    if project is None and args.task is None:
        raise UnknownModel(
            f"Project `{args.project_name}` does not exist. To create a new project, you must specify a `task`."
        )
    task = normalize_task(args.task) if args.task is not None else project.task  # type: ignore[union-attr]
    if project is not None and task != project.task:
        raise InvalidArgument(
            f"Project `{args.project_name}` already exists with a different task: `{project.task}`."
            " Create a new project instead."
        )
    if task not in CLASSICAL_TASKS:
        raise InvalidArgument(f"pgml.train does not train {task} models", hint="Use pgml.tune for transformers.")
    return task


# --------------------------------------------------------------------------- #
# Reading the rows
# --------------------------------------------------------------------------- #

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
        y = registry._text_array(y_text) or []
        return Source(relation, str(stored), y, float(test_size or 0.25), str(sampling), int(sid or 0))
    y = args.y_column_name or []
    if task in SUPERVISED and not y:
        raise InvalidArgument("You must pass a `y_column_name` when you pass a `relation_name` for a supervised task.")
    if task not in SUPERVISED:
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


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def read_rows(db: Database, source: Source, ctx: Context) -> tuple[Table, dict[str, bool]]:
    from engine.tabular import decode_copy_text

    columns = (await registry.rows(db, _COLUMNS, source.relation)).rows
    names = [(str(n), str(t)) for n, t, _ in columns]
    for y in source.y_columns:
        if y not in {n for n, _ in names}:
            raise InvalidArgument(f"Column `{y}` not found. Did you pass the correct `y_column_name`?")
    select = ", ".join(quote_ident(n) for n, _ in names)
    copy = (await db.execute([Statement(f"COPY (SELECT {select} FROM {source.relation}) TO STDOUT")]))[0].copy
    table = await ctx.work(decode_copy_text, copy, names)  # ~0.2 s per 100k x 20: not on the event loop
    return table, {str(n): v == "t" for n, _, v in columns}


# --------------------------------------------------------------------------- #
# Fitting (worker thread)
# --------------------------------------------------------------------------- #


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


def _strata(table: Table, source: Source, task: str) -> list[Any] | None:
    if task != "classification" or not source.y_columns:
        return None
    column = table.column(source.y_columns[0])
    return list(column.texts) if column.kind == "text" else column.floats.tolist()


def _fit(
    args: TrainArgs, source: Source, table: Table, nullable: dict[str, bool], task: str, algorithm: str,
    runtime: str, joint: bool, cancelled: Any,
) -> Fitted:  # fmt: skip
    from engine import algorithms, artifacts, metrics, preprocess

    train_rows, test_rows = split(table.num_rows, source.test_size, source.test_sampling, _strata(table, source, task))
    snapshot = preprocess.analyze(table, source.y_columns, args.preprocess, train_rows, nullable)
    x_train, x_test = preprocess.features(snapshot, table, train_rows), preprocess.features(snapshot, table, test_rows)
    y_train: Any = None
    y_test: Any = None
    classes: Any = None
    if source.y_columns:
        y_train, y_test = preprocess.labels(snapshot, table, train_rows), preprocess.labels(snapshot, table, test_rows)
        if task == "classification":  # libraries want 0..k-1; the values are stored to map predictions back
            classes = np.unique(np.concatenate([y_train, y_test]))
            y_train, y_test = np.searchsorted(classes, y_train), np.searchsorted(classes, y_test)
    if len(test_rows) == 0:
        x_test, y_test = x_train, y_train
    events: list[dict[str, Any]] = []

    def progress(event: dict[str, Any]) -> None:
        log.debug("%s: %s", args.project_name, event)  # candidate hyperparameters are client data: not at info
        if len(events) < MAX_LOG_ROWS:
            events.append(event)

    def make(params: dict[str, Any]) -> Any:
        return algorithms.estimator(algorithm, task, params, joint=joint, runtime=runtime)

    best, results = metrics.search(
        task, make, x_train, y_train, args.search, args.search_params, args.search_args, args.hyperparams,
        progress, cancelled, test=(x_test, y_test),
    )  # fmt: skip
    estimator = make(best)
    if cancelled():  # a checkpoint before the final fit (metrics.search checks before each candidate and fold)
        raise Canceled(CANCELED)
    started = time.perf_counter()
    _fit_checked(estimator, x_train, y_train, cancelled)
    fit_time = time.perf_counter() - started
    started = time.perf_counter()
    estimator.transform(x_test) if task == "decomposition" else estimator.predict(x_test)
    score_time = time.perf_counter() - started
    scores: dict[str, Any] = dict(
        metrics.evaluate(task, estimator, x_test, y_test, fit_time=fit_time, score_time=score_time)
    )
    if results:
        scores["search_results"] = results
    progress(
        {
            "fit_time": fit_time,
            "score_time": score_time,
            "metrics": {k: scores[k] for k in scores if k != "search_results"},
        }
    )
    columns, analysis = snapshot.to_json()
    return Fitted(
        columns, analysis, preprocess.num_features(snapshot), best, scores, artifacts.dump(estimator),
        None if classes is None else [float(c) for c in classes], events,
    )  # fmt: skip


CANCELED = "canceling statement due to user request"


def _fit_checked(estimator: Any, x: Any, y: Any, cancelled: Any) -> None:
    """``estimator.fit``; XGBoost and LightGBM check ``cancelled`` (a checkpoint) after every boosting round."""
    module = type(estimator).__module__.split(".")[0]
    if type(estimator).__name__.startswith("XGBRF"):  # XGBoost's random forests take no callbacks
        module = ""

    def check() -> None:
        if cancelled():
            raise Canceled(CANCELED)

    if module == "lightgbm" and y is not None:
        estimator.fit(x, y, callbacks=[lambda env: check()])
        return
    if module == "xgboost" and y is not None and estimator.get_params().get("callbacks") is None:
        from xgboost.callback import TrainingCallback

        class Check(TrainingCallback):
            def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                check()
                return False

        estimator.set_params(callbacks=[Check()])
        try:
            estimator.fit(x, y)
        finally:
            estimator.set_params(callbacks=None)  # not part of the stored model
        return
    estimator.fit(x) if y is None else estimator.fit(x, y)


# --------------------------------------------------------------------------- #
# Writing the registry rows
# --------------------------------------------------------------------------- #

_DEPLOYED_METRICS = """
SELECT m.metrics::text FROM pgml.deployments d JOIN pgml.models m ON m.id = d.model_id
WHERE d.project_id = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT 1"""


async def deployed_metrics(db: Database, project: registry.Project | None) -> dict[str, Any] | None:
    import json

    if project is None:
        return None
    found = (await registry.rows(db, _DEPLOYED_METRICS, project.id)).rows
    return json.loads(found[0][0]) if found and found[0][0] else None


async def _write(
    db: Database, args: TrainArgs, project: registry.Project | None, task: str, algorithm: str, runtime: str,
    source: Source, fitted: Fitted, deploy: bool, signer: registry.Signer,
) -> None:  # fmt: skip
    tables = (
        ["models"] + (["projects"] if project is None else []) + (["snapshots"] if source.snapshot_id is None else [])
    )
    ids = dict(zip(tables, await registry.next_ids(db, *tables), strict=True))
    model_id = ids["models"]
    project_id = project.id if project is not None else ids["projects"]
    snapshot_id = source.snapshot_id if source.snapshot_id is not None else ids["snapshots"]
    s = registry.statement
    out: list[Statement] = []
    if project is None:
        out.append(registry.project_statement(project_id, args.project_name, task))
    if source.snapshot_id is None:
        out += registry.snapshot_statements(
            snapshot_id, source.stored_name, source.relation, source.y_columns, source.test_size,
            source.test_sampling, fitted.columns, fitted.analysis, args.materialize_snapshot, project_id,
        )  # fmt: skip
    out.append(s(
        "INSERT INTO pgml.models (id, project_id, snapshot_id, num_features, algorithm, runtime, hyperparams, status,"
        " metrics, search, search_params, search_args) VALUES ($1, $2, $3, $4, $5, $6::pgml.runtime, $7,"
        " 'successful', $8, $9, $10, $11)",
        model_id, project_id, snapshot_id, fitted.num_features, algorithm, runtime, fitted.hyperparams,
        fitted.metrics, args.search, args.search_params, args.search_args,
    ))  # fmt: skip
    tag, data = fitted.artifact
    out += registry.file_statements(signer, project_id, model_id, f"estimator.{tag}", data)
    if fitted.classes is not None:
        classes = registry.json_bytes(fitted.classes)
        out += registry.file_statements(signer, project_id, model_id, "classes.json", classes)
    if deploy:
        out.append(registry.deployment_statement(project_id, model_id, "new_score"))
    if fitted.events:
        out.append(registry.logs_statement(model_id, project_id, fitted.events))
    await db.execute(out)
