"""``pgml.train`` / ``pgml.train_joint``: PostgresML's training algorithm through the client's own session.

Owns: the order of a training run — project rules, its rows (``engine.ml.source``), the fit in a worker
thread (``engine.ml.fit``, its progress told to the client as INFO lines), the automatic deploy rule, and one
batch of registry writes at the end (so a failed run leaves nothing behind; ``pgml.logs`` gets the progress
events and the run's library warnings, once each) — and ``pgml.snapshot`` (a materialized snapshot without
training).

Must not: build SQL with values in it (``engine.pg.registry`` binds them), or
block the event loop (model work goes through ``Context.work``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

from engine.api import Call, Database, InvalidArgument, Statement, UnknownModel
from engine.ml import algorithms
from engine.ml.algorithms import CLASSICAL_TASKS, normalize_task
from engine.ml.deploy import better_or_equal
from engine.ml.fit import Fitted, fit
from engine.ml.metrics import key_metric
from engine.ml.signing import Signer
from engine.ml.snapshot import Snapshot, analyze
from engine.ml.source import Source, TrainArgs, data_source, read_rows, split
from engine.pg import registry
from engine.runtime.context import Context

log = logging.getLogger(__name__)


async def train(call: Call, ctx: Context) -> list[Any]:
    joint = call.signature.function == "train_joint"
    return [[await _train(TrainArgs.from_row(tuple(row)), joint, ctx)] for row in call.rows]  # one row each


async def _train(args: TrainArgs, joint: bool, ctx: Context) -> tuple[str, str, str, bool]:
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
    fan_out = None if ctx.offload is None else ctx.offload.fan_out  # search candidates and folds: parallel tasks
    ctx.inform("INFO", f"Training Model {{ task: {task}, algorithm: {algorithm}, runtime: {runtime} }}")
    fitted = await ctx.work(
        fit, args, source, table, nullable, task, algorithm, runtime, joint, ctx.cancelled.is_set, fan_out,
        functools.partial(ctx.inform, "INFO"),
    )  # fmt: skip
    fitted = dataclasses.replace(fitted, events=[*fitted.events, *ctx.library_warnings()])
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
    db = ctx.database()
    source = await data_source(db, None, args, "regression")
    table, nullable = await read_rows(db, source, ctx)

    def analyze_rows() -> Snapshot:
        train_rows, _ = split(table.num_rows, source.test_size, source.test_sampling, None)
        return analyze(table, source.y_columns, args.preprocess, train_rows, nullable)

    columns, analysis = (await ctx.work(analyze_rows)).to_json()
    (snapshot_id,) = await registry.next_ids(db, "snapshots")
    await db.execute(
        registry.snapshot_statements(
            snapshot_id, source.stored_name, source.relation, source.y_columns, source.test_size,
            source.test_sampling, columns, analysis, materialize=True,
        )
    )  # fmt: skip
    return (source.stored_name, source.y_columns[0])


def not_better(task: str, new: dict[str, Any], current: dict[str, Any]) -> str:
    name, _ = key_metric(task)
    return f"New model's {name} is not better than current model. New: {new.get(name)}, Current {current.get(name)}"


def _task(project: registry.Project | None, args: TrainArgs) -> str:
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
# Writing the registry rows
# --------------------------------------------------------------------------- #

_DEPLOYED_METRICS = """
SELECT m.metrics::text FROM pgml.deployments d JOIN pgml.models m ON m.id = d.model_id
WHERE d.project_id = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT 1"""


async def deployed_metrics(db: Database, project: registry.Project | None) -> dict[str, Any] | None:
    if project is None:
        return None
    found = (await registry.rows(db, _DEPLOYED_METRICS, project.id)).rows
    return json.loads(found[0][0]) if found and found[0][0] else None


async def _write(
    db: Database, args: TrainArgs, project: registry.Project | None, task: str, algorithm: str, runtime: str,
    source: Source, fitted: Fitted, deploy: bool, signer: Signer,
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
