"""Scoring for ``pgml.train``: the metrics stored in ``pgml.models.metrics`` and the hyperparameter search.

Owns: each task's key metric (name, and whether higher is better), the metric
set PostgresML stores per classical task (values rounded through float32 as its
Rust code stores them), and the grid / random search over ``search_params`` with
k-fold cross validation, progress reports and cancellation between fits.

Must not: build estimators (the caller passes ``make_estimator``, normally from
``engine.algorithms``), touch storage or SQL, nor import an ML library at import
time.

Undefined values: where PostgresML's f32 would be NaN or infinite (e.g. ``roc_auc``
when the test set has one class) the value is None, as serde_json writes JSON
``null`` for those. Where PostgresML's training would fail inside scikit-learn
(``silhouette`` with one cluster, or one cluster per sample) the value is None too,
rather than an error.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.algorithms import normalize_task
from engine.api import Canceled, InvalidArgument, NotSupported

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
SEARCH_ARGS = frozenset({"n_iter", "cv"})
DEFAULT_N_ITER = 10
DEFAULT_CV = 5


def key_metric(task: str) -> tuple[str, bool]:
    """The metric ``deploy`` strategies and the search compare, and whether higher is better."""
    found = KEY_METRICS[normalize_task(task)]
    if found is None:
        raise NotSupported(f"{task} models have no key metric")
    return found


def f32(value: Any) -> float | None:
    """``value`` as PostgresML stores it: an f32, written in its shortest form; None for NaN/inf."""
    if value is None:
        return None
    with np.errstate(over="ignore"):  # beyond f32's range: inf, so None
        single = np.float32(value)
    if not np.isfinite(single):
        return None
    return float(str(single))


def _sk(name: str) -> Any:
    return getattr(importlib.import_module("sklearn.metrics"), name)


# --------------------------------------------------------------------------- #
# Test metrics
# --------------------------------------------------------------------------- #


def evaluate(task: str, estimator: Any, x_test: Any, y_test: Any, *, fit_time: float, score_time: float) -> Metrics:
    """The metrics JSON of a fitted ``estimator`` on the test split (``y_test`` None when unsupervised).

    fit_time and score_time are added for every task, as PostgresML's Rust code does.
    """
    label = normalize_task(task)
    scorers: dict[str, Callable[[Any, Any, Any], Metrics]] = {
        "regression": _regression,
        "classification": _classification,
        "clustering": _clustering,
        "decomposition": _decomposition,
    }
    if label not in scorers:
        raise NotSupported(f"No test metrics available for task: {label}")
    metrics = scorers[label](estimator, np.asarray(x_test), None if y_test is None else np.asarray(y_test))
    metrics["fit_time"] = f32(fit_time)
    metrics["score_time"] = f32(score_time)
    return metrics


def _regression(estimator: Any, x: Any, y: Any) -> Metrics:
    y_hat = np.asarray(estimator.predict(x)).reshape(y.shape)
    return {
        "r2": f32(_sk("r2_score")(y, y_hat)) if len(y) > 1 else None,
        "mean_absolute_error": f32(_sk("mean_absolute_error")(y, y_hat)),
        "mean_squared_error": f32(_sk("mean_squared_error")(y, y_hat)),
    }


def _classification(estimator: Any, x: Any, y: Any) -> Metrics:
    y_hat = np.asarray(estimator.predict(x)).reshape(y.shape)
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


def _clustering(estimator: Any, x: Any, y: Any) -> Metrics:
    labels = np.asarray(estimator.predict(x))
    return {"silhouette": _silhouette(x, labels)}


def _silhouette(x: Any, labels: Any) -> float | None:
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None  # undefined (sklearn raises; PostgresML's train would fail)
    sample = SILHOUETTE_SAMPLE if len(labels) > SILHOUETTE_SAMPLE else None
    return f32(_sk("silhouette_score")(x, labels, sample_size=sample, random_state=0))


def _decomposition(estimator: Any, x: Any, y: Any) -> Metrics:
    ratios = getattr(estimator, "explained_variance_ratio_", None)
    return {"cumulative_explained_variance": None if ratios is None else f32(np.sum(ratios))}


def score(task: str, estimator: Any, x_test: Any, y_test: Any) -> float | None:
    """The key metric alone (what the search compares)."""
    name, _ = key_metric(task)
    return evaluate(task, estimator, x_test, y_test, fit_time=0.0, score_time=0.0)[name]


# --------------------------------------------------------------------------- #
# Hyperparameter search
# --------------------------------------------------------------------------- #


def search(
    task: str,
    make_estimator: Callable[[dict[str, Any]], Any],
    x: Any,
    y: Any,
    search: str | None,
    search_params: dict[str, Any],
    search_args: dict[str, Any],
    hyperparams: dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool],
    *,
    test: tuple[Any, Any] | None = None,
    rng: random.Random | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cross-validate every candidate; returns (best hyperparams, ``search_results``).

    Candidates are ``hyperparams`` merged with each combination of
    ``search_params`` (all for grid or no ``search``, ``n_iter`` distinct ones
    for random). Folds come from (Stratified)KFold over ``x``/``y`` (the
    training split); with ``cv`` < 2 each candidate is scored on ``test``
    instead, as PostgresML does. Best = highest mean key metric (first on ties).
    When there is nothing to compare (one candidate, no folds) nothing is fitted
    and the results are ``{}``. ``on_progress`` gets a dict after each fit;
    ``cancelled`` is checked before each fit (raises Canceled).
    """
    n_iter, cv = _search_args(search, search_args)
    candidates = _candidates(search, search_params, hyperparams, n_iter, rng or random.Random())
    if len(candidates) == 1 and cv < 2:
        return candidates[0], {}
    x = np.asarray(x)
    y = None if y is None else np.asarray(y)
    splits = _splits(task, x, y, cv, test)
    scores, fit_times, score_times = _run(task, make_estimator, candidates, splits, on_progress, cancelled)
    best = max(range(len(candidates)), key=lambda i: _mean_or_worst(scores[i], task))
    return candidates[best], _results(candidates, scores, fit_times, score_times, best, len(splits))


def _search_args(search: str | None, search_args: dict[str, Any]) -> tuple[int, int]:
    if search not in (None, "grid", "random"):
        raise InvalidArgument(f'invalid input value for enum pgml.search: "{search}"')
    if not isinstance(search_args, dict):
        raise InvalidArgument("search_args must be a JSON object")
    unknown = sorted(set(search_args) - SEARCH_ARGS)
    if unknown:
        raise InvalidArgument(f"Unknown search_args: {', '.join(unknown)}", hint="search_args accepts n_iter and cv.")
    n_iter = _positive_int(search_args, "n_iter", DEFAULT_N_ITER, minimum=1)
    cv = _positive_int(search_args, "cv", DEFAULT_CV if search is not None else 1, minimum=0)
    return n_iter, cv


def _positive_int(args: dict[str, Any], name: str, default: int, *, minimum: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"search_args {name} must be an integer >= {minimum}, not {value!r}")
    return value


def _candidates(
    search: str | None,
    search_params: dict[str, Any],
    hyperparams: dict[str, Any],
    n_iter: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    if not isinstance(search_params, dict):
        raise InvalidArgument("search_params must be a JSON object of arrays")
    both = sorted(set(search_params) & set(hyperparams))
    if both:
        raise InvalidArgument(
            f"`{both[0]}` cannot be present in both hyperparams and search_params. Please choose one or the other."
        )
    for name, values in search_params.items():
        if not isinstance(values, list) or not values:
            raise InvalidArgument(f"search_params {name} must be a non-empty JSON array")
    names = list(search_params)
    sizes = [len(search_params[n]) for n in names]
    total = math.prod(sizes)
    chosen = range(total) if search != "random" else sorted(rng.sample(range(total), min(n_iter, total)))
    return [
        {**hyperparams, **dict(zip(names, _combination(search_params, names, sizes, i), strict=True))} for i in chosen
    ]


def _combination(search_params: dict[str, Any], names: list[str], sizes: list[int], index: int) -> list[Any]:
    """The ``index``-th element of the cartesian product (last name varies fastest), without building it."""
    values = []
    for name, size in zip(reversed(names), reversed(sizes), strict=True):
        index, position = divmod(index, size)
        values.append(search_params[name][position])
    return values[::-1]


Split = tuple[Any, Any, Any, Any]  # x_train, y_train, x_test, y_test


def _splits(task: str, x: Any, y: Any, cv: int, test: tuple[Any, Any] | None) -> list[Split]:
    if cv < 2:
        if test is None:
            raise InvalidArgument("a search with cv < 2 needs the test split")
        return [(x, y, np.asarray(test[0]), None if test[1] is None else np.asarray(test[1]))]
    if cv > len(x):
        raise InvalidArgument(f"search_args cv = {cv} is more than the {len(x)} training rows")
    folds = _folds(normalize_task(task), x, y, cv)
    return [(x[a], None if y is None else y[a], x[b], None if y is None else y[b]) for a, b in folds]


def _folds(task: str, x: Any, y: Any, cv: int) -> list[tuple[Any, Any]]:
    model_selection = importlib.import_module("sklearn.model_selection")
    if task == "classification" and y is not None and y.ndim == 1:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= cv:  # otherwise StratifiedKFold warns or refuses: plain folds
            return list(model_selection.StratifiedKFold(n_splits=cv).split(x, y))
    return list(model_selection.KFold(n_splits=cv).split(x))


def _run(
    task: str,
    make_estimator: Callable[[dict[str, Any]], Any],
    candidates: list[dict[str, Any]],
    splits: list[Split],
    on_progress: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool],
) -> tuple[list[list[float | None]], list[list[float]], list[list[float]]]:
    """Fit and score every (fold, candidate), folds outermost as PostgresML does."""
    n = len(candidates)
    scores: list[list[float | None]] = [[None] * len(splits) for _ in range(n)]
    fit_times = [[0.0] * len(splits) for _ in range(n)]
    score_times = [[0.0] * len(splits) for _ in range(n)]
    for (fold, (x_train, y_train, x_test, y_test)), (i, params) in itertools.product(
        enumerate(splits), enumerate(candidates)
    ):
        if cancelled():
            raise Canceled("canceling statement due to user request")
        started = time.perf_counter()
        fitted = make_estimator(params)
        if y_train is None:
            fitted.fit(x_train)
        else:
            fitted.fit(x_train, y_train)
        fit_times[i][fold] = time.perf_counter() - started
        started = time.perf_counter()
        scores[i][fold] = score(task, fitted, x_test, y_test)
        score_times[i][fold] = time.perf_counter() - started
        on_progress(
            {
                "candidate": i,
                "candidates": n,
                "fold": fold,
                "folds": len(splits),
                "params": params,
                "score": scores[i][fold],
                "fit_time": f32(fit_times[i][fold]),
            }
        )
    return scores, fit_times, score_times


def _mean_or_worst(values: list[float | None], task: str) -> float:
    _, higher = key_metric(task)
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return -math.inf
    mean = float(np.mean(known))
    return mean if higher else -mean


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return None, None
    return f32(np.mean(known)), f32(np.std(known))


def _results(
    candidates: list[dict[str, Any]],
    scores: list[list[float | None]],
    fit_times: list[list[float]],
    score_times: list[list[float]],
    best: int,
    n_splits: int,
) -> dict[str, Any]:
    """``search_results`` as PostgresML stores it (the layout of scikit-learn's cv_results_)."""
    fits = [_stats(list(t)) for t in fit_times]
    scored = [_stats(list(t)) for t in score_times]
    tests = [_stats(s) for s in scores]
    results: dict[str, Any] = {
        "params": candidates,
        "n_splits": n_splits,
        "best_index": best,
        "mean_fit_time": [m for m, _ in fits],
        "std_fit_time": [s for _, s in fits],
        "mean_score_time": [m for m, _ in scored],
        "std_score_time": [s for _, s in scored],
        "mean_test_score": [m for m, _ in tests],
        "std_test_score": [s for _, s in tests],
    }
    for fold in range(n_splits):
        results[f"split{fold}_test_score"] = [s[fold] for s in scores]
    for name in candidates[best]:
        results[f"param_{name}"] = [c.get(name) for c in candidates]
    return results
