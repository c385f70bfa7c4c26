"""``pgml.tune`` through the client's own session (the fine-tuning itself is ``engine.nlp.finetune.trainer``).

Owns: the database side of a fine-tuning run — project rules as for ``pgml.train``, ``y_column_name``
(the task's *y* column, checked to exist; a reused snapshot's own when NULL), reading the relation with
one COPY in the caller's transaction (labels keep their SQL type), the split, and the registry rows
written in one batch at the end (model ``transformers``, every model file in ``pgml.files``, trainer
events and the run's library warnings in ``pgml.logs``, the automatic deploy); the run's progress told to the
client as it goes (INFO: each Trainer log event, the metrics at the end).

Must not: run Trainer code on the event loop (``Context.task``: a worker, or a Ray task) or paste values into SQL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any

from engine.api import Call, Database, InvalidArgument, Statement
from engine.ml import train
from engine.ml.algorithms import dashed_task, normalize_task
from engine.ml.deploy import better_or_equal
from engine.ml.fit import MAX_LOG_ROWS
from engine.ml.signing import Signer
from engine.ml.source import Source, TrainArgs, data_source, read_rows, split
from engine.nlp.finetune.plan import TASKS
from engine.nlp.finetune.trainer import TuneResult, fine_tune
from engine.pg import registry
from engine.pg.table import Table
from engine.runtime.context import Context


async def tune(call: Call, ctx: Context) -> list[Any]:
    return [[await _tune(tuple(row), ctx)] for row in call.rows]


async def _tune(row: tuple[Any, ...], ctx: Context) -> tuple[str, str, str, bool]:
    name, task, relation, y, model_name, hyper, test_size, sampling, automatic, materialize = row
    args = TrainArgs.from_row(
        (name, task, relation, y, "linear", hyper, None, None, None, test_size, sampling, None, automatic,
         materialize, None)
    )  # fmt: skip
    db = ctx.database()
    project = await registry.project(db, args.project_name)
    label = normalize_task(args.task) if args.task is not None else (project.task if project else "")
    if project is None and args.task is None:
        raise InvalidArgument(f"Project `{args.project_name}` does not exist. To tune, you must specify a `task`.")
    if label not in TASKS:
        hint = f"Use one of {', '.join(sorted(TASKS))}."
        raise InvalidArgument(f"pgml.tune does not fine-tune {label or 'this'} task", hint=hint)
    if project is not None and project.task != label:
        raise InvalidArgument(f"Project `{args.project_name}` already exists with a different task: `{project.task}`.")
    if model_name is None:
        raise InvalidArgument("pgml.tune needs a `model_name` to fine-tune")
    source = await data_source(db, project, args, "clustering")  # y is not required
    # y_column_name names the task's y role (the label, target, text …); a reused snapshot keeps its own
    y = next(iter(args.y_column_name or source.y_columns), None)
    source = dataclasses.replace(source, y_columns=[y] if y else [])
    table, _ = await read_rows(db, source, ctx)  # checks that the y column exists
    train_rows, test_rows = split(table.num_rows, source.test_size, source.test_sampling, None)
    ctx.inform("INFO", f"Tuning Model {{ task: {label}, algorithm: transformers, model: {model_name} }}")
    result = await ctx.task(
        _fine_tune, label, model_name, _columns(table, train_rows), _columns(table, test_rows), args.hyperparams, y
    )
    ctx.inform("INFO", f"Metrics: {json.dumps(result.metrics, default=str)}")
    result = dataclasses.replace(result, events=[*result.events, *ctx.library_warnings()])
    current = await train.deployed_metrics(db, project)
    deploy = args.automatic_deploy and better_or_equal(label, result.metrics, current)
    if args.automatic_deploy and not deploy and current is not None:
        ctx.notices.append(train.not_better(label, result.metrics, current))
    await _write(db, args, project, label, source, result, deploy, y, table.num_rows, registry.signer(ctx))
    return (args.project_name, dashed_task(label), "transformers", deploy)


def _fine_tune(
    ctx: Context, label: str, model_name: str, train_columns: dict[str, list[Any]],
    test_columns: dict[str, list[Any]], hyperparams: dict[str, Any], y: str | None,
) -> TuneResult:  # fmt: skip
    """:func:`fine_tune` where ``ctx`` runs (``Context.task``: a worker of this process, or a Ray task); its
    Trainer log events come back in the result, and are told to the client as they happen where ``ctx`` has a
    live channel (this process). Code shipped with the model: ``[engine] trust_remote_code`` alone decides, as
    PostgresML's settings do not govern tune."""
    return fine_tune(label, model_name, train_columns, test_columns, hyperparams, ctx.config,
                     ctx.cancelled.is_set, functools.partial(_logged, ctx), y)  # fmt: skip


def _logged(ctx: Context, event: dict[str, Any]) -> None:
    """A Trainer log event (each logging step, each evaluation: loss, learning rate, epoch, step of max_steps) told
    to the client as PostgresML's tune does: an INFO of the event as indented JSON, with the time."""
    ctx.inform("INFO", json.dumps({**event, "timestamp": str(datetime.now())}, indent=4))


_INTEGERS = frozenset({"int2", "int4", "int8"})


def _columns(table: Table, rows: Any) -> dict[str, list[Any]]:
    """Column name -> the values of ``rows``: text as str, integers as int, booleans as bool, other numbers float.

    Labels keep their type this way (``pgml.predict`` answers with them); array columns are left out.
    """
    out: dict[str, list[Any]] = {}
    for column in table.columns:
        if column.kind == "text" and not column.array:
            values = column.texts
            out[column.name] = [values[i] for i in rows]
        elif not column.array:
            floats = column.floats
            cast: Any = bool if column.kind == "bool" else int if column.pg_type in _INTEGERS else float
            out[column.name] = [None if column.nulls[i] else cast(floats[i]) for i in rows]
    return out


async def _write(
    db: Database, args: TrainArgs, project: registry.Project | None, task: str, source: Source,
    result: TuneResult, deploy: bool, y: Any, samples: int, signer: Signer,
) -> None:  # fmt: skip
    tables = ["models", *(["projects"] if project is None else []), "snapshots"]
    ids = dict(zip(tables, await registry.next_ids(db, *tables), strict=True))
    model_id, snapshot_id = ids["models"], ids["snapshots"]
    project_id = project.id if project is not None else ids["projects"]
    s = registry.statement
    out: list[Statement] = []
    if project is None:
        out.append(registry.project_statement(project_id, args.project_name, task))
    out += registry.snapshot_statements(
        snapshot_id, source.stored_name, source.relation, [y] if y else [], source.test_size, source.test_sampling,
        None, {"samples": float(samples)}, args.materialize_snapshot, project_id,
    )  # fmt: skip
    out.append(s(
        "INSERT INTO pgml.models (id, project_id, snapshot_id, num_features, algorithm, runtime, hyperparams, status,"
        " metrics, search_params, search_args) VALUES ($1, $2, $3, 1, 'transformers', 'python', $4, 'successful',"
        " $5, '{}', '{}')",
        model_id, project_id, snapshot_id, result.hyperparams, result.metrics,
    ))  # fmt: skip
    for path, data in sorted(result.files.items()):
        out += registry.file_statements(signer, project_id, model_id, path, data)
    if deploy:
        out.append(registry.deployment_statement(project_id, model_id, "new_score"))
    if result.events:
        out.append(registry.logs_statement(model_id, project_id, result.events[:MAX_LOG_ROWS]))
    await db.execute(out)
