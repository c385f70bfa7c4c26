"""The hyperparameter search of ``pgml.train``: grid or random over ``search_params``, cross-validated.

Owns: the candidates (``hyperparams`` merged with each combination of ``search_params``), the folds
((Stratified)KFold, or the test split when ``cv`` < 2, as PostgresML), one fit per candidate and fold
(:func:`fit_one`, run by a :data:`FanOut`: in order with cancellation between fits, or in parallel by the
Ray backend) with progress reports, and the ``search_results`` PostgresML stores.

Must not: build estimators (the caller passes ``make_estimator``, normally from ``engine.ml.algorithms``),
touch storage or SQL, nor import an ML library at import time (``sklearn.model_selection`` is imported
when folds are made).
"""

from __future__ import annotations

import importlib
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from engine.api import CANCELED, Canceled, InvalidArgument
from engine.ml.algorithms import normalize_task
from engine.ml.metrics import key_metric, score
from engine.ml.statistics import f32

T = TypeVar("T")
# How the fits of a search run: fan_out(fn, shared, items, cancelled) = [fn(*shared, *item) for item in items],
# in order here (in_order), or in parallel (the Ray backend's tasks, ``Context.offload``).
# (fn, shared arguments, per-item arguments, cancelled, done(k, outcome) as item k is done) -> the outcomes in order
FanOut = Callable[
    [Callable[..., Any], tuple[Any, ...], list[tuple[Any, ...]], Callable[[], bool], Callable[[int, Any], None]],
    list[Any],
]
SEARCH_ARGS = frozenset({"n_iter", "cv"})
DEFAULT_N_ITER = 10
DEFAULT_CV = 5


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
    fan_out: FanOut | None = None,
    info: Callable[[str], None] = lambda line: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cross-validate every candidate; returns (best hyperparams, ``search_results``).

    Candidates are ``hyperparams`` merged with each combination of
    ``search_params`` (all for grid or no ``search``, ``n_iter`` distinct ones
    for random). Folds come from (Stratified)KFold over ``x``/``y`` (the
    training split); with ``cv`` < 2 each candidate is scored on ``test``
    instead, as PostgresML does. Best = highest mean key metric (first on ties).
    When there is nothing to compare (one candidate, no folds) nothing is fitted
    and the results are ``{}``. ``on_progress`` gets a dict after each fit;
    ``cancelled`` is checked before each fit (raises Canceled). ``fan_out`` runs the fits (default
    :func:`in_order`). ``info`` gets PostgresML's line on the search's size first.
    """
    n_iter, cv = _search_args(search, search_args)
    candidates = _candidates(search, search_params, hyperparams, n_iter, rng or random.Random())
    info(f"Hyperparameter searches: {len(candidates)}, cross validation folds: {cv}")
    if len(candidates) == 1 and cv < 2:
        return candidates[0], {}
    x = np.asarray(x)
    y = None if y is None else np.asarray(y)
    splits = _splits(task, x, y, cv, test)
    scores, fit_times, score_times = _run(
        task, make_estimator, candidates, splits, on_progress, cancelled, fan_out or in_order
    )
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


def in_order(fn: Callable[..., T], shared: tuple[Any, ...], items: list[tuple[Any, ...]],
             cancelled: Callable[[], bool], done: Callable[[int, Any], None]) -> list[T]:  # fmt: skip
    """The fits one after another, each reported as it ends, ``cancelled`` checked before each (raises Canceled)."""
    out = []
    for k, item in enumerate(items):
        if cancelled():
            raise Canceled(CANCELED)
        out.append(fn(*shared, *item))
        done(k, out[-1])
    return out


def fit_one(
    task: str, make_estimator: Callable[[dict[str, Any]], Any], candidates: list[dict[str, Any]], splits: list[Split],
    candidate: int, fold: int,
) -> tuple[float | None, float, float]:  # fmt: skip
    """One candidate fitted on one fold: (score, fit time, score time)."""
    x_train, y_train, x_test, y_test = splits[fold]
    started = time.perf_counter()
    fitted = make_estimator(candidates[candidate])
    if y_train is None:
        fitted.fit(x_train)
    else:
        fitted.fit(x_train, y_train)
    fit_time = time.perf_counter() - started
    started = time.perf_counter()
    value = score(task, fitted, x_test, y_test)
    return value, fit_time, time.perf_counter() - started


def _run(
    task: str,
    make_estimator: Callable[[dict[str, Any]], Any],
    candidates: list[dict[str, Any]],
    splits: list[Split],
    on_progress: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool],
    fan_out: FanOut,
) -> tuple[list[list[float | None]], list[list[float]], list[list[float]]]:
    """Fit and score every (fold, candidate), folds outermost as PostgresML does; progress in that order."""
    n = len(candidates)
    scores: list[list[float | None]] = [[None] * len(splits) for _ in range(n)]
    fit_times = [[0.0] * len(splits) for _ in range(n)]
    score_times = [[0.0] * len(splits) for _ in range(n)]
    items = [(i, fold) for fold in range(len(splits)) for i in range(n)]

    def done(k: int, outcome: tuple[float | None, float, float]) -> None:
        (i, fold), (value, fit_time, score_time) = items[k], outcome
        scores[i][fold], fit_times[i][fold], score_times[i][fold] = value, fit_time, score_time
        on_progress(
            {
                "candidate": i,
                "candidates": n,
                "fold": fold,
                "folds": len(splits),
                "params": candidates[i],
                "score": value,
                "fit_time": f32(fit_time),
            }
        )

    fan_out(fit_one, (task, make_estimator, candidates, splits), items, cancelled, done)
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
