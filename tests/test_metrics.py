"""engine.ml.metrics, engine.ml.search: key metrics, the stored metric sets, and the grid / random search."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

from engine.api import Canceled, InvalidArgument, NotSupported
from engine.ml.algorithms import TASKS, estimator
from engine.ml.metrics import evaluate, key_metric
from engine.ml.search import search
from engine.ml.statistics import f32

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
BINARY_X, BINARY_Y = IRIS_X[:100], IRIS_Y[:100]
_DX, _DY = load_diabetes(return_X_y=True)
DIABETES_X, DIABETES_Y = _DX[:150], _DY[:150]

REGRESSION_KEYS = {"r2", "mean_absolute_error", "mean_squared_error", "fit_time", "score_time"}
CLASSIFICATION_KEYS = {"f1", "precision", "recall", "accuracy", "mcc", "fit_time", "score_time"}


def fitted(name: str, task: str, x: Any, y: Any = None, **hyperparams: Any) -> Any:
    model = estimator(name, task, hyperparams)
    return model.fit(x) if y is None else model.fit(x, y)


def is_f32(value: Any) -> bool:
    return isinstance(value, float) and value == float(str(np.float32(value)))


def test_key_metric_of_every_task() -> None:
    expected = {
        "regression": ("r2", True),
        "classification": ("f1", True),
        "decomposition": ("cumulative_explained_variance", True),
        "clustering": ("silhouette", True),
        "question_answering": ("f1", True),
        "translation": ("blue", True),
        "summarization": ("rouge_ngram_f1", True),
        "text_classification": ("f1", True),
        "text_generation": ("perplexity", False),
        "text2text": ("perplexity", False),
        "text_pair_classification": ("f1", True),
        "conversation": ("bleu", True),
    }
    assert {task: key_metric(task) for task in TASKS if task != "embedding"} == expected
    assert key_metric("text-generation") == ("perplexity", False)
    with pytest.raises(NotSupported):
        key_metric("embedding")


def test_f32_rounding() -> None:
    assert f32(0.1) == 0.1
    assert f32(1 / 3) == 0.33333334
    assert f32(np.float64(2.5)) == 2.5 and type(f32(np.float64(2.5))) is float
    assert f32(float("nan")) is None and f32(float("inf")) is None and f32(1e39) is None and f32(None) is None


def test_regression_metrics() -> None:
    model = fitted("linear", "regression", DIABETES_X, DIABETES_Y)
    metrics = evaluate("regression", model, DIABETES_X, DIABETES_Y, fit_time=0.0123456789, score_time=0.5)
    assert set(metrics) == REGRESSION_KEYS
    assert all(is_f32(v) for v in metrics.values())
    assert metrics["fit_time"] == 0.012345679 and 0.4 < (metrics["r2"] or 0) < 1


def test_joint_regression_metrics_average_the_outputs() -> None:
    y = np.column_stack([DIABETES_Y, DIABETES_X[:, 0] * 10])
    model = fitted("ridge", "regression", DIABETES_X, y)
    metrics = evaluate("regression", model, DIABETES_X, y, fit_time=0, score_time=0)
    assert set(metrics) == REGRESSION_KEYS
    from sklearn.metrics import r2_score

    assert metrics["r2"] == f32(r2_score(y, model.predict(DIABETES_X)))


def test_multiclass_metrics() -> None:
    model = fitted("random_forest", "classification", IRIS_X, IRIS_Y, n_estimators=5)
    metrics = evaluate("classification", model, IRIS_X, IRIS_Y, fit_time=1, score_time=2)
    assert set(metrics) == CLASSIFICATION_KEYS
    assert all(is_f32(v) for v in metrics.values())


@pytest.mark.parametrize("name", ["linear", "svm", "xgboost"])  # proba, decision_function, proba (booster)
def test_binary_metrics_add_roc_auc_and_log_loss(name: str) -> None:
    model = fitted(name, "classification", BINARY_X, BINARY_Y)
    metrics = evaluate("classification", model, BINARY_X, BINARY_Y, fit_time=0, score_time=0)
    assert set(metrics) == CLASSIFICATION_KEYS | {"roc_auc", "log_loss"}
    assert metrics["roc_auc"] == 1.0 and (metrics["log_loss"] or 0) >= 0
    json.dumps(metrics, allow_nan=False)


def test_binary_metrics_with_one_class_in_the_test_set() -> None:
    model = fitted("linear", "classification", BINARY_X, BINARY_Y)
    metrics = evaluate("classification", model, BINARY_X[:10], BINARY_Y[:10], fit_time=0, score_time=0)
    assert metrics["roc_auc"] is None  # NaN in PostgresML, stored as null
    assert metrics["log_loss"] is not None


def test_clustering_and_decomposition_metrics() -> None:
    model = fitted("kmeans", "clustering", IRIS_X, n_clusters=3, n_init=1)
    metrics = evaluate("clustering", model, IRIS_X, None, fit_time=0, score_time=0)
    assert set(metrics) == {"silhouette", "fit_time", "score_time"} and 0 < (metrics["silhouette"] or 0) < 1
    one = fitted("kmeans", "clustering", IRIS_X, n_clusters=1, n_init=1)
    assert evaluate("clustering", one, IRIS_X, None, fit_time=0, score_time=0)["silhouette"] is None
    pca = fitted("pca", "decomposition", IRIS_X, n_components=2)
    metrics = evaluate("decomposition", pca, IRIS_X, None, fit_time=0, score_time=0)
    assert set(metrics) == {"cumulative_explained_variance", "fit_time", "score_time"}
    assert metrics["cumulative_explained_variance"] == f32(sum(pca.explained_variance_ratio_))
    with pytest.raises(NotSupported):
        evaluate("text_generation", pca, IRIS_X, None, fit_time=0, score_time=0)


def make(name: str, task: str) -> Any:
    return lambda params: estimator(name, task, params)


class Recorder:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.cancel_after = cancel_after

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after


def test_grid_search() -> None:
    progress = Recorder()
    best, results = search(
        "classification",
        make("random_forest", "classification"),
        IRIS_X,
        IRIS_Y,
        "grid",
        {"max_depth": [1, 3], "n_estimators": [2, 4, 6]},
        {"cv": 3},
        {"random_state": 0},
        progress,
        progress.cancelled,
    )
    assert len(progress.events) == 6 * 3
    assert {(e["candidate"], e["fold"]) for e in progress.events} == {(c, f) for c in range(6) for f in range(3)}
    assert results["n_splits"] == 3
    assert results["params"][0] == {"random_state": 0, "max_depth": 1, "n_estimators": 2}
    assert results["params"][5] == {"random_state": 0, "max_depth": 3, "n_estimators": 6}
    assert results["param_max_depth"] == [1, 1, 1, 3, 3, 3] and results["param_random_state"] == [0] * 6
    expected = {"params", "n_splits", "best_index", "split0_test_score", "split1_test_score", "split2_test_score"}
    expected |= {f"{s}_{m}" for s in ("mean", "std") for m in ("fit_time", "score_time", "test_score")}
    assert set(results) == expected | {"param_max_depth", "param_n_estimators", "param_random_state"}
    for key in expected - {"params", "n_splits", "best_index"}:
        assert len(results[key]) == 6 and all(is_f32(v) for v in results[key])
    means = results["mean_test_score"]
    assert results["best_index"] == means.index(max(means)) and best == results["params"][results["best_index"]]
    assert results["mean_test_score"][0] == f32(np.mean([results[f"split{k}_test_score"][0] for k in range(3)]))
    json.dumps(results, allow_nan=False)


def test_random_search_samples_n_iter_distinct_candidates() -> None:
    grid = {"alpha": [0.01, 0.1, 1.0, 10.0], "fit_intercept": [True, False]}
    progress = Recorder()
    _, results = search(
        "regression",
        make("ridge", "regression"),
        DIABETES_X,
        DIABETES_Y,
        "random",
        grid,
        {"n_iter": 3},
        {},
        progress,
        progress.cancelled,
        rng=random.Random(1),
    )
    assert results["n_splits"] == 5 and len(results["params"]) == 3 and len(progress.events) == 15
    assert len({json.dumps(p, sort_keys=True) for p in results["params"]}) == 3
    _, everything = search(
        "regression", make("ridge", "regression"), DIABETES_X, DIABETES_Y, "random", grid, {"n_iter": 100, "cv": 2},
        {}, Recorder(), lambda: False,
    )  # fmt: skip
    assert len(everything["params"]) == 8  # n_iter above the grid size: every combination once


def test_search_on_unsupervised_tasks() -> None:
    best, results = search(
        "clustering", make("kmeans", "clustering"), IRIS_X, None, "grid", {"n_clusters": [2, 3]}, {"cv": 2},
        {"n_init": 1, "random_state": 0}, Recorder(), lambda: False,
    )  # fmt: skip
    assert len(results["params"]) == 2 and best["n_clusters"] in (2, 3)
    _, results = search(
        "decomposition", make("pca", "decomposition"), IRIS_X, None, "grid", {"n_components": [1, 3]}, {"cv": 2},
        {}, Recorder(), lambda: False,
    )  # fmt: skip
    assert results["best_index"] == 1


def test_no_folds_score_on_the_test_split() -> None:
    progress = Recorder()
    _, results = search(
        "regression", make("ridge", "regression"), DIABETES_X[:100], DIABETES_Y[:100], None, {"alpha": [0.1, 1.0]},
        {}, {}, progress, progress.cancelled, test=(DIABETES_X[100:], DIABETES_Y[100:]),
    )  # fmt: skip
    assert results["n_splits"] == 1 and len(progress.events) == 2 and set(results) >= {"split0_test_score"}
    with pytest.raises(InvalidArgument, match="test split"):
        search("regression", make("ridge", "regression"), DIABETES_X, DIABETES_Y, None, {"alpha": [0.1, 1.0]}, {},
               {}, Recorder(), lambda: False)  # fmt: skip


def test_nothing_to_search_fits_nothing() -> None:
    progress = Recorder()
    best, results = search(
        "regression", make("ridge", "regression"), DIABETES_X, DIABETES_Y, None, {}, {}, {"alpha": 2.0},
        progress, progress.cancelled,
    )  # fmt: skip
    assert best == {"alpha": 2.0} and results == {} and progress.events == []


@pytest.mark.parametrize(
    ("search_kind", "search_params", "search_args", "hyperparams", "message"),
    [
        ("grid", {"alpha": [1.0]}, {"folds": 3}, {}, "Unknown search_args: folds"),
        ("grid", {"alpha": [1.0]}, {"cv": "3"}, {}, "cv must be an integer"),
        ("random", {"alpha": [1.0]}, {"n_iter": 0}, {}, "n_iter must be an integer >= 1"),
        ("grid", {"alpha": [1.0]}, {}, {"alpha": 2.0}, "`alpha` cannot be present in both"),
        ("grid", {"alpha": 1.0}, {}, {}, "must be a non-empty JSON array"),
        ("exhaustive", {"alpha": [1.0]}, {}, {}, "pgml.search"),
        ("grid", {"alpha": [1.0]}, {"cv": 1000}, {}, "more than the 150 training rows"),
    ],
)
def test_search_argument_errors(
    search_kind: str, search_params: dict[str, Any], search_args: dict[str, Any], hyperparams: dict[str, Any],
    message: str,
) -> None:  # fmt: skip
    with pytest.raises(InvalidArgument, match=message):
        search("regression", make("ridge", "regression"), DIABETES_X, DIABETES_Y, search_kind, search_params,
               search_args, hyperparams, Recorder(), lambda: False)  # fmt: skip


def test_cancel_stops_between_fits() -> None:
    progress = Recorder(cancel_after=4)
    fits = []

    def make_counted(params: dict[str, Any]) -> Any:
        fits.append(params)
        return estimator("ridge", "regression", params)

    with pytest.raises(Canceled) as info:
        search("regression", make_counted, DIABETES_X, DIABETES_Y, "grid", {"alpha": [0.1, 1.0, 10.0]}, {"cv": 5},
               {}, progress, progress.cancelled)  # fmt: skip
    assert len(fits) == 4 and len(progress.events) == 4 and info.value.sqlstate == "57014"
