"""``pgml.tune`` and ``pgml.generate`` through the client's own session (the fine-tuning itself is ``engine.tune``).

Owns: the database side of a fine-tuning run — project rules as for ``pgml.train``,
``y_column_name`` (the task's *y* column, checked to exist; a reused snapshot's own when NULL),
reading the relation with one COPY in the caller's transaction (labels keep their SQL type),
the split, the registry rows written in one batch at the end (model ``transformers``, every
model file in ``pgml.files``, trainer events in ``pgml.logs``, the automatic deploy) — and
loading a tuned project's files for ``pgml.generate``, ``pgml.transform`` and ``pgml.predict`` /
``pgml.predict_proba`` on a tuned text classifier (:func:`classify`, called by ``engine.inference``).

Must not: run Trainer code on the event loop (``Context.work``) or paste values into SQL.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from engine import registry, training
from engine.api import Call, Database, InvalidArgument, NotSupported, Statement, UnknownModel
from engine.deploy import better_or_equal

if TYPE_CHECKING:
    from engine.tabular import Table
    from engine.text import Context
    from proxy.config import EngineSection

log = logging.getLogger(__name__)
TUNE_TASKS = frozenset(
    {"text_classification", "text_pair_classification", "conversation", "text_generation", "question_answering",
     "text2text", "summarization", "translation"}
)  # fmt: skip


async def tune(call: Call, ctx: Context) -> list[Any]:
    return [[await _tune(tuple(row), ctx)] for row in call.rows]


async def _tune(row: tuple[Any, ...], ctx: Context) -> tuple[str, str, str, bool]:
    from engine.algorithms import dashed_task, normalize_task

    name, task, relation, y, model_name, hyper, test_size, sampling, automatic, materialize = row
    args = training.TrainArgs.from_row(
        (name, task, relation, y, "linear", hyper, None, None, None, test_size, sampling, None, automatic,
         materialize, None)
    )  # fmt: skip
    db = ctx.database()
    project = await registry.project(db, args.project_name)
    label = normalize_task(args.task) if args.task is not None else (project.task if project else "")
    if project is None and args.task is None:
        raise InvalidArgument(f"Project `{args.project_name}` does not exist. To tune, you must specify a `task`.")
    if label not in TUNE_TASKS:
        hint = f"Use one of {', '.join(sorted(TUNE_TASKS))}."
        raise InvalidArgument(f"pgml.tune does not fine-tune {label or 'this'} task", hint=hint)
    if project is not None and project.task != label:
        raise InvalidArgument(f"Project `{args.project_name}` already exists with a different task: `{project.task}`.")
    if model_name is None:
        raise InvalidArgument("pgml.tune needs a `model_name` to fine-tune")
    source = await training.data_source(db, project, args, "clustering")  # y is not required
    # y_column_name names the task's y role (the label, target, text …); a reused snapshot keeps its own
    y = next(iter(args.y_column_name or source.y_columns), None)
    source = dataclasses.replace(source, y_columns=[y] if y else [])
    table, _ = await training.read_rows(db, source, ctx)  # checks that the y column exists
    train_rows, test_rows = training.split(table.num_rows, source.test_size, source.test_sampling, None)
    from engine import tune as tuner

    events: list[dict[str, Any]] = []
    result = await ctx.work(
        tuner.tune, label, model_name, _columns(table, train_rows), _columns(table, test_rows), args.hyperparams,
        ctx.config, ctx.cancelled.is_set, events.append, y,
    )  # fmt: skip
    current = await training.deployed_metrics(db, project)
    deploy = args.automatic_deploy and better_or_equal(label, result.metrics, current)
    if args.automatic_deploy and not deploy and current is not None:
        ctx.notices.append(training.not_better(label, result.metrics, current))
    await _write(db, args, project, label, source, result, deploy, y, table.num_rows, registry.signer(ctx))
    return (args.project_name, dashed_task(label), "transformers", deploy)


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
    db: Database, args: training.TrainArgs, project: registry.Project | None, task: str, source: training.Source,
    result: Any, deploy: bool, y: Any, samples: int, signer: registry.Signer,
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
        out.append(registry.logs_statement(model_id, project_id, result.events[: training.MAX_LOG_ROWS]))
    await db.execute(out)


async def generate(call: Call, ctx: Context) -> list[Any]:
    """``pgml.generate(project_name, inputs, config)``: text (or text[]) from the project's tuned model."""
    from engine import tune as tuner

    db = ctx.database()
    out: list[Any] = []
    for name, inputs, config in call.rows:
        if name is None or inputs is None or config is None:
            out.append(None)  # STRICT
            continue
        row = await registry.model(db, await registry.deployed_model_id(db, name))
        if row.algorithm != "transformers":
            raise InvalidArgument(f"Project `{name}` has no tuned transformers model to generate with")
        key = f"tuned/{ctx.database_name}/{row.id}/{row.created_at}"
        files = {} if ctx.cache.peek(key) is not None else await registry.files(db, row, registry.signer(ctx))
        many = isinstance(inputs, list)
        texts = await ctx.work(
            tuner.generate, files, key, inputs if many else [inputs], dict(config), ctx.config, ctx.cache,
            cancelled=ctx.cancelled, notices=ctx.notices,
        )
        out.append(texts if many else texts[0])
    return out


# Per model name: the deployed model of the project of that name as the caller sees it (row-level
# security), and whether the name is another role's project (then 42501, not a Hugging Face lookup).
_TUNED = """
SELECT n.name, d.model_id, p.id IS NULL AND pgml.project_exists(n.name)
FROM unnest($1::text[]) AS n(name)
LEFT JOIN pgml.projects p ON p.name = n.name
LEFT JOIN LATERAL (SELECT model_id FROM pgml.deployments WHERE project_id = p.id
                   ORDER BY created_at DESC, id DESC LIMIT 1) d ON true"""


async def transform(call: Call, ctx: Context) -> list[Any]:
    """``pgml.transform`` where ``{"model": …}`` may name a project tuned by ``pgml.tune`` (its files are used)."""
    from engine import transform as transformers_tasks

    rows = list(call.rows)
    names = sorted({t["model"] for t, *_ in rows if isinstance(t, dict) and isinstance(t.get("model"), str)})
    if names and call.db is not None and await _has_registry(ctx.database()):
        found = (await registry.rows(ctx.database(), _TUNED, registry.text_array(names))).rows
        for name, _, foreign in found:
            # Another role's project of that name: 42501, unless the name is also a model this proxy serves
            # (a role must not make a Hugging Face name unusable for others by naming a project after it).
            if foreign == "t" and not await ctx.work(_resolvable, str(name), ctx.config):
                raise registry.foreign_project(str(name))
        paths = {str(n): await _materialize(ctx, int(model_id)) for n, model_id, _ in found if model_id is not None}
        rows = [(({**t, "model": paths[t["model"]]},) if _tuned(t, paths) else (t,)) + tuple(r) for t, *r in rows]
    result: list[Any] = await ctx.work(transformers_tasks.transform, rows, ctx)
    return result


def _resolvable(name: str, config: EngineSection) -> bool:
    from engine import models

    try:
        models.resolve(name, config)
    except UnknownModel:
        return False
    return True


def _tuned(task: Any, paths: dict[str, str]) -> bool:
    return isinstance(task, dict) and task.get("model") in paths


async def _has_registry(db: Database) -> bool:
    found = (await registry.rows(db, "SELECT to_regclass('pgml.projects') IS NOT NULL")).rows
    return bool(found) and found[0][0] == "t"


async def classify(ctx: Context, row: registry.Model, function: str, inputs: list[Any]) -> list[Any]:
    """``pgml.predict`` / ``pgml.predict_proba`` with a project's tuned text classifier.

    Each input is a text (answer: its label, or the class probabilities in label order) or an array of
    texts (answer: an array of those; NULL elements answer NULL).
    """
    from engine import tune as tuner
    from engine.algorithms import dashed_task

    if row.task != "text_classification" or function not in ("predict", "predict_proba"):
        raise NotSupported(
            f"pgml.{function} does not apply to the tuned {dashed_task(row.task)} model of project `{row.project}`",
            hint="pgml.predict and pgml.predict_proba classify texts with text-classification projects; generate"
            " text with pgml.generate, or use the project's name as the model of pgml.transform.",
        )
    texts = [t for v in inputs for t in ([v] if isinstance(v, str) else v) if t is not None]
    directory = await _materialize_row(ctx, row)
    key = f"tuned/{ctx.database_name}/{row.id}/{row.created_at}/classifier"
    values: list[Any] = []
    for start in range(0, len(texts), _SLICE):  # one job per slice: other sessions go in between
        values += await ctx.work(
            tuner.classify, directory, key, texts[start : start + _SLICE], function == "predict_proba", ctx.config,
            ctx.cache, ctx.cancelled.is_set,
        )  # fmt: skip
    answers = iter(values)
    return [next(answers) if isinstance(v, str) else [None if t is None else next(answers) for t in v] for v in inputs]


_SLICE = 1024  # texts per worker job


async def _materialize(ctx: Context, model_id: int) -> str:
    """A local directory with the tuned model's files (written once per model version)."""
    return await _materialize_row(ctx, await registry.model(ctx.database(), model_id))


async def _materialize_row(ctx: Context, row: registry.Model) -> str:
    import os
    from pathlib import Path

    from engine import models

    # A private, per-process directory (unguessable name): nothing another OS user or a client planted is reused.
    target = Path(models.owned_dir(f"tuned/{ctx.database_name}/{row.id}/{row.created_at}"))
    if not (target / ".complete").exists():
        files = await registry.files(ctx.database(), row, registry.signer(ctx))
        for path, data in files.items():
            destination = (target / path).resolve()
            if not destination.is_relative_to(target.resolve()):
                raise InvalidArgument(f"model {row.id} has a file outside its directory: {path}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
        (target / ".complete").touch()
        os.chmod(target, 0o700)
    return str(target)
