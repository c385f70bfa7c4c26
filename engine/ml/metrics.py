"""Scoring for ``pgml.train``: the metrics stored in ``pgml.models.metrics``.

Owns: each task's key metric (name, and whether higher is better), and the metric
set PostgresML stores per classical task (values rounded through float32 as its
Rust code stores them). The search over hyperparameters is ``engine.ml.search``'s.

Must not: build estimators, touch storage or SQL, nor import an ML library at import
time (``sklearn.metrics`` is imported when a model is scored).

Undefined values: where PostgresML's f32 would be NaN or infinite (e.g. ``roc_auc``
when the test set has one class) the value is None, as serde_json writes JSON
``null`` for those. Where PostgresML's training would fail inside scikit-learn
(``silhouette`` with one cluster, or one cluster per sample) the value is None too,
rather than an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.api import NotSupported
from engine.ml.algorithms import normalize_task
from engine.ml.statistics import f32

Metrics = dict[str, float | None]

# task label -> (key metric, higher is better); embedding has none.
KEY_METRICS: dict[str, tuple[str, bool] | None] = {
    "regression": ("r2", True),
    "classification": ("f1", True),
    "decomposition": ("cumulative_explained_variance", True),
    "clustering": ("silhouette", True),
    "question_answering": ("f1", True),
    "translation": ("blue", True),  # sic: PostgresML's spelling
    "summarization": ("rouge_ngram_f1", True),
    "text_classification": ("f1", True),
    "text_generation": ("perplexity", False),
    "text2text": ("perplexity", False),
    "text_pair_classification": ("f1", True),
    "conversation": ("bleu", True),
    "embedding": None,
}
SILHOUETTE_SAMPLE = 10_000  # silhouette is O(n²): larger test sets are scored on a fixed sample


def key_metric(task: str) -> tuple[str, bool]:
    """The metric ``deploy`` strategies and the search compare, and whether higher is better."""
    found = KEY_METRICS[normalize_task(task)]
    if found is None:
        raise NotSupported(f"{task} models have no key metric")
    return found


def _sk(name: str) -> Any:
    """A scikit-learn metric, imported on first use (sklearn takes a second to import)."""
    return getattr(importlib.import_module("sklearn.metrics"), name)


# --------------------------------------------------------------------------- #
# Test metrics
# --------------------------------------------------------------------------- #


def evaluate(
    task: str, estimator: Any, x_test: Any, y_test: Any, *, fit_time: float, score_time: float, predicted: Any = None
) -> Metrics:
    """The metrics JSON of a fitted ``estimator`` on the test split (``y_test`` None when unsupervised).

    fit_time and score_time are added for every task, as PostgresML's Rust code does. ``predicted``: the
    estimator's predictions for ``x_test`` when the caller has them already (timing them as score_time).
    """
    label = normalize_task(task)
    scorers: dict[str, Callable[[Any, Any, Any, Any], Metrics]] = {
        "regression": _regression,
        "classification": _classification,
        "clustering": _clustering,
        "decomposition": _decomposition,
    }
    if label not in scorers:
        raise NotSupported(f"No test metrics available for task: {label}")
    x, y = np.asarray(x_test), None if y_test is None else np.asarray(y_test)
    if predicted is None and label != "decomposition":  # a decomposition transforms: its metric needs no output
        predicted = estimator.predict(x)
    metrics = scorers[label](estimator, x, y, predicted)
    metrics["fit_time"] = f32(fit_time)
    metrics["score_time"] = f32(score_time)
    return metrics


def _regression(estimator: Any, x: Any, y: Any, predicted: Any) -> Metrics:
    y_hat = np.asarray(predicted).reshape(y.shape)
    return {
        "r2": f32(_sk("r2_score")(y, y_hat)) if len(y) > 1 else None,
        "mean_absolute_error": f32(_sk("mean_absolute_error")(y, y_hat)),
        "mean_squared_error": f32(_sk("mean_squared_error")(y, y_hat)),
    }


def _classification(estimator: Any, x: Any, y: Any, predicted: Any) -> Metrics:
    y_hat = np.asarray(predicted).reshape(y.shape)
    metrics: Metrics = {
        "f1": f32(_sk("f1_score")(y, y_hat, average="macro", zero_division=0)),
        "precision": f32(_sk("precision_score")(y, y_hat, average="macro", zero_division=0)),
        "recall": f32(_sk("recall_score")(y, y_hat, average="macro", zero_division=0)),
        "accuracy": f32(_sk("accuracy_score")(y, y_hat)),
        "mcc": f32(_sk("matthews_corrcoef")(y, y_hat)),
    }
    classes = np.asarray(getattr(estimator, "classes_", np.unique(y)))
    if len(classes) == 2:
        metrics.update(_binary(estimator, x, y == classes[1], y_hat == classes[1]))
    return metrics


def _binary(estimator: Any, x: Any, truth: Any, predicted: Any) -> Metrics:
    """roc_auc and log_loss of the positive class (classes_[1]).

    From predict_proba when the estimator has it; else roc_auc from
    decision_function, and otherwise (and for log_loss) from the hard
    predictions, which is what PostgresML always uses.
    """
    proba = _positive_proba(estimator, x)
    ranking = proba if proba is not None else _decision(estimator, x)
    ranking = predicted.astype(np.float64) if ranking is None else ranking
    probabilities = proba if proba is not None else predicted.astype(np.float64)
    one_class = len(np.unique(truth)) < 2
    return {
        "roc_auc": None if one_class else f32(_sk("roc_auc_score")(truth, ranking)),
        "log_loss": f32(_sk("log_loss")(truth, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[False, True])),
    }


def _positive_proba(estimator: Any, x: Any) -> Any:
    try:
        return np.asarray(estimator.predict_proba(x))[:, 1]
    except (AttributeError, NotSupported):
        return None


def _decision(estimator: Any, x: Any) -> Any:
    try:
        return np.asarray(estimator.decision_function(x)).reshape(-1)
    except AttributeError:
        return None


def _clustering(estimator: Any, x: Any, y: Any, predicted: Any) -> Metrics:
    labels = np.asarray(predicted)
    return {"silhouette": _silhouette(x, labels)}


def _silhouette(x: Any, labels: Any) -> float | None:
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None  # undefined (sklearn raises; PostgresML's train would fail)
    sample = SILHOUETTE_SAMPLE if len(labels) > SILHOUETTE_SAMPLE else None
    return f32(_sk("silhouette_score")(x, labels, sample_size=sample, random_state=0))


def _decomposition(estimator: Any, x: Any, y: Any, predicted: Any) -> Metrics:
    ratios = getattr(estimator, "explained_variance_ratio_", None)
    return {"cumulative_explained_variance": None if ratios is None else f32(np.sum(ratios))}


def score(task: str, estimator: Any, x_test: Any, y_test: Any) -> float | None:
    """The key metric alone (what the search compares)."""
    name, _ = key_metric(task)
    return evaluate(task, estimator, x_test, y_test, fit_time=0.0, score_time=0.0)[name]
