"""The predict family: ``predict``, ``predict_proba``, ``predict_joint``, ``predict_batch``, ``decompose``.

Owns: finding the model (a project's current deployment, looked up once per statement, or a model id), loading
it from ``pgml.files`` once where it is held (``Context.on_model``: this process, or a model actor of the Ray
backend; keyed by database, id and creation time, so a new deployment is picked up at once and an old one is
never served; only artifacts whose signature verifies are ever deserialized), and one vectorised library call
per model for all the rows of a statement, with PostgresML's value semantics and errors. A project whose model
was tuned by ``pgml.tune`` (algorithm ``transformers``) is answered by ``engine.nlp.finetune.tuned.classify``:
``predict(project, text | text[])`` gives the training label (jsonb), ``predict_proba`` the class
probabilities in label order (jsonb).

Must not: run model code on the event loop (``Context.work``), or write rows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.api import Call, Columns, Database, InvalidArgument
from engine.ml import artifacts
from engine.ml.artifacts import LoadedModel
from engine.ml.preprocess import replay_rows
from engine.nlp.finetune import tuned
from engine.pg import registry
from engine.pg.text import parse_array_literal
from engine.runtime.context import Context, Hosted

FUNCTIONS = ("predict", "predict_proba", "predict_joint", "predict_batch", "decompose")
# Feature rows per library call: a large per-row predict is a series of jobs that share the workers
# fairly with other sessions and stop at the next slice on cancel or disconnect.
PREDICT_SLICE = 8192


@dataclass(frozen=True)
class Deployed:
    """A loaded model and what its predictions mean."""

    row: registry.Model
    model: LoadedModel
    classes: list[float] | None  # label values by encoded class index (classification)
    nbytes: int  # artifact size: the model cache's measure


async def predict(call: Call, ctx: Context) -> list[Any]:
    db = ctx.database()
    function = call.signature.function
    by_model = _by_model(call.rows)
    out: list[Any] = [None] * len(call.rows)
    texts = call.signature.params[-1].type in ("text", "text[]")
    for key, indices in by_model.items():
        row = await (registry.model(db, key) if isinstance(key, int) else registry.deployed_model(db, str(key)))
        features = _features(call.rows, indices)
        values: list[Any] = []
        if row.algorithm == "transformers":
            values = await _tuned(ctx, row, function, features, texts)
        elif texts:
            raise InvalidArgument(
                f"pgml.{function}(project_name, text) classifies texts with a model tuned by pgml.tune;"
                f" the model of project `{row.project}` is {row.algorithm}",
                hint="Pass its features as an array, e.g. ARRAY[…] or '{…}'::real[].",
            )
        else:
            hosted = _hosted(db, ctx, row)
            for start in range(0, len(features), PREDICT_SLICE):  # one job per slice: other sessions go in between
                values += await ctx.on_model(hosted, _apply, function, features[start : start + PREDICT_SLICE])
        if len(indices) == len(out):
            return values
        for i, value in zip(indices, values, strict=True):
            out[i] = value
    return out


def _by_model(rows: Sequence[tuple[Any, ...]]) -> dict[Any, Sequence[int]]:
    """The rows of each model key (STRICT: a NULL key or features are a NULL result, in no group); the rows of a
    :class:`Columns` batch with one key and a feature matrix are all one group, found without a loop."""
    if isinstance(rows, Columns) and rows.shared[0] and _is_matrix(rows.columns[1]):
        return {rows.columns[0]: range(rows.length)} if rows.columns[0] is not None and rows.length else {}
    by_model: dict[Any, list[int]] = {}
    for i, (key, features) in enumerate(rows):
        if key is not None and features is not None:
            by_model.setdefault(key, []).append(i)
    return dict(by_model)


def _features(rows: Sequence[tuple[Any, ...]], indices: Sequence[int]) -> Any:
    """The feature arguments of those rows: a :class:`Columns` batch's feature matrix as it is."""
    if isinstance(rows, Columns) and isinstance(indices, range) and _is_matrix(rows.columns[1]):
        return rows.columns[1]
    return [rows[i][1] for i in indices]


def _is_matrix(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind in "biuf"


async def _tuned(ctx: Context, row: registry.Model, function: str, inputs: list[Any], texts: bool) -> list[Any]:
    if not texts and function in ("predict", "predict_proba"):
        raise InvalidArgument(
            f"The model of project `{row.project}` was fine-tuned by pgml.tune: pass the text, not features",
            hint=f"SELECT pgml.{function}('<project>', 'some text'), or an array of texts.",
        )
    return await tuned.classify(ctx, row, function, inputs)


def _hosted(db: Database, ctx: Context, row: registry.Model) -> Hosted:
    """The deployed model of ``row``: keyed by database, id and creation time; its files read (and verified)
    through the client's session only where it is not loaded yet."""
    key = ctx.cache.key("classical", f"{ctx.database_name}/{row.id}", {"created_at": row.created_at})

    async def files() -> dict[str, bytes]:
        # Verified before anything is deserialized (UntrustedArtifact otherwise). A loaded model skips this: it
        # came from verified bytes of this very row (database, id, created_at), and a file changed since could
        # only verify if it were the same artifact, signed for this model.
        return await registry.files(db, row, registry.signer(ctx))

    return Hosted(key, files, functools.partial(_build, row))


def _build(row: registry.Model, files: dict[str, bytes]) -> Deployed:
    estimators = [p for p in files if p.startswith("estimator.")]
    if not estimators:
        raise InvalidArgument(f"model {row.id} has no stored estimator in pgml.files")
    path = estimators[0]
    classes = json.loads(files["classes.json"]) if "classes.json" in files else None
    model = artifacts.load(path.removeprefix("estimator."), files[path])
    return Deployed(row, model, classes, sum(len(v) for v in files.values()))


def _matrix(deployed: Deployed, features: Any, batch: bool = False) -> Any:
    """Feature rows as float32 (bools 0/1, nested arrays flattened; a numeric matrix as it is), checked against the
    model's width."""
    width = deployed.row.num_features
    if _is_matrix(features) and not batch:
        matrix = np.asarray(features, dtype=np.float32)
    elif len(features) and isinstance(features[0], tuple):
        return _replay(deployed, features)
    else:
        try:
            rows: list[Any] = [np.asarray(f, dtype=np.float32).ravel() for f in features]
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"features must be numbers: {exc}") from None
        if batch:
            rows = [r.reshape(-1, width) if width and r.size % width == 0 else r.reshape(1, -1) for r in rows]
        matrix = np.vstack(rows) if rows else np.zeros((0, width), np.float32)
    if matrix.shape[1] != width:
        raise InvalidArgument(
            f"The model of project `{deployed.row.project}` expects {width} features, got {matrix.shape[1]}"
        )
    return matrix


def _replay(deployed: Deployed, rows: list[tuple[Any, ...]]) -> Any:
    """``predict(project, ROW(…))``: the snapshot's preprocessing, replayed from its stored columns."""
    columns = deployed.row.columns
    if not columns:
        raise InvalidArgument(f"model {deployed.row.id} has no snapshot to replay the row's preprocessing")
    features = [c for c in columns if not c.get("label")]
    return replay_rows(columns, [_typed(features, row) for row in rows])


_NUMBER_TYPES = frozenset({"bool", "int2", "int4", "int8", "float4", "float8", "numeric"})


def _typed(columns: list[dict[str, Any]], row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fields read back as text (a per-row ROW(...)) -> numbers for the numeric columns of the snapshot."""
    out = []
    for column, value in zip(columns, row, strict=False):
        kind = str(column.get("pg_type", "")).removesuffix("[]")
        if isinstance(value, str) and kind in _NUMBER_TYPES:
            if str(column.get("pg_type", "")).endswith("[]"):
                elements, _ = parse_array_literal(value)
                value = [None if e is None else _number(kind, e) for e in elements]
            else:
                value = _number(kind, value)
        out.append(value)
    return tuple(out) + row[len(out) :]


def _number(kind: str, text: str) -> float:
    if kind == "bool":
        return 1.0 if text in ("t", "true") else 0.0
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f'invalid input syntax for type {kind}: "{text}"') from None


def _apply(deployed: Deployed, function: str, features: list[Any]) -> list[Any]:
    task, model = deployed.row.task, deployed.model
    if function == "predict_batch":
        return _predict_batch(deployed, features)
    x = _matrix(deployed, features)
    match function:
        case "predict":
            return _values(deployed, x)
        case "predict_proba":
            if task != "classification":
                raise InvalidArgument(f"You can't predict probabilities for a {task} model")
            return [[float(p) for p in row] for row in model.predict_proba(x)]
        case "predict_joint":
            if task != "regression":
                raise InvalidArgument(f"You can't predict joint values for a {task} model")
            y = np.asarray(model.predict(x), dtype=np.float32).reshape(len(x), -1)
            return [[float(v) for v in row] for row in y]
        case "decompose":
            if task != "decomposition":
                raise InvalidArgument(f"You can't decompose with a {task} model")
            return [[float(v) for v in row] for row in np.asarray(model.transform(x), dtype=np.float32)]
    raise InvalidArgument(f"unknown prediction function {function}")


def _values(deployed: Deployed, x: Any) -> list[float]:
    """``predict``: the number (regression), label value (classification), cluster, first component."""
    if deployed.row.task == "decomposition":
        y = np.asarray(deployed.model.transform(x), dtype=np.float32)[:, 0]
    else:
        y = np.asarray(deployed.model.predict(x))
        y = y.reshape(len(x), -1)[:, 0] if y.ndim > 1 else y
    if deployed.classes is not None:
        classes = np.asarray(deployed.classes, dtype=np.float32)
        y = classes[np.asarray(y).astype(np.int64)]
    return np.asarray(y, dtype=np.float32).tolist()  # type: ignore[no-any-return]


def _predict_batch(deployed: Deployed, features: list[Any]) -> list[list[float]]:
    """Each argument holds N concatenated feature rows: N predictions, in order."""
    out = []
    for f in features:
        x = _matrix(deployed, [f], batch=True)
        out.append(_values(deployed, x))
    return out
