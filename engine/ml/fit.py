"""The worker side of ``pgml.train``: preprocess, search, fit and score, off the event loop.

Owns: what one training run produces (:class:`Fitted`: the snapshot's columns and analysis, the
estimator's artifact, metrics, progress events), the progress lines told to the client as it goes
(PostgresML's INFO wording: ``Hyperparams: …`` and ``Metrics: …`` per search fit and for the final fit), and a
fit that stops between boosting rounds when canceled.

Must not: talk to a database (``engine.ml.train`` reads the rows and writes the results), or import an
ML library at import time (``engine.ml.algorithms`` imports the estimator classes on first use).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.api import CANCELED, Canceled
from engine.ml import algorithms, artifacts, metrics, preprocess
from engine.ml.search import FanOut, search
from engine.ml.snapshot import analyze
from engine.ml.source import Source, TrainArgs, split
from engine.pg.table import Table

log = logging.getLogger(__name__)
MAX_LOG_ROWS = 10_000


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


def _strata(table: Table, source: Source, task: str) -> list[Any] | None:
    if task != "classification" or not source.y_columns:
        return None
    column = table.column(source.y_columns[0])
    return list(column.texts) if column.kind == "text" else column.floats.tolist()


def fit(
    args: TrainArgs, source: Source, table: Table, nullable: dict[str, bool], task: str, algorithm: str,
    runtime: str, joint: bool, cancelled: Any, fan_out: FanOut | None = None,
    info: Callable[[str], None] = lambda line: None,
) -> Fitted:  # fmt: skip
    """Split, analyse, search, fit and score; ``info`` gets each progress line (from this worker thread)."""
    train_rows, test_rows = split(table.num_rows, source.test_size, source.test_sampling, _strata(table, source, task))
    snapshot = analyze(table, source.y_columns, args.preprocess, train_rows, nullable)
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
        for line in progress_lines(task, event):
            info(line)

    def make(params: dict[str, Any]) -> Any:
        return algorithms.estimator(algorithm, task, params, joint=joint, runtime=runtime)

    best, results = search(
        task, make, x_train, y_train, args.search, args.search_params, args.search_args, args.hyperparams,
        progress, cancelled, test=(x_test, y_test), fan_out=fan_out, info=info,
    )  # fmt: skip
    estimator = make(best)
    info(f"Hyperparams: {json.dumps(best, indent=4, default=str)}")
    if cancelled():  # a checkpoint before the final fit (metrics.search checks before each candidate and fold)
        raise Canceled(CANCELED)
    started = time.perf_counter()
    _fit_checked(estimator, x_train, y_train, cancelled)
    fit_time = time.perf_counter() - started
    started = time.perf_counter()
    predicted = estimator.transform(x_test) if task == "decomposition" else estimator.predict(x_test)
    score_time = time.perf_counter() - started
    reuse = None if task == "decomposition" else predicted
    scores: dict[str, Any] = dict(
        metrics.evaluate(task, estimator, x_test, y_test, fit_time=fit_time, score_time=score_time, predicted=reuse)
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


def progress_lines(task: str, event: dict[str, Any]) -> list[str]:
    """The INFO lines of one progress event, as PostgresML words them (``{:?}`` of its metrics map is JSON-like).

    A search fit: its hyperparameters and its key metric, with where it stands (search i of n, fold k of m); the
    final fit: its metrics.
    """
    if "metrics" in event:
        return [f"Metrics: {json.dumps(event['metrics'], default=str)}"]
    if "candidate" not in event:
        return []
    name, _ = metrics.key_metric(task)
    scored = {name: event["score"], "fit_time": event["fit_time"]}
    where = f"search {event['candidate'] + 1} of {event['candidates']}, fold {event['fold'] + 1} of {event['folds']}"
    hyperparams = json.dumps(event["params"], indent=4, default=str)
    return [f"Hyperparams: {hyperparams}", f"Metrics: {json.dumps(scored)} ({where})"]


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
        from xgboost.callback import TrainingCallback  # lazy: xgboost loads its native library on import

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
