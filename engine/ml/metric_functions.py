"""PostgresML's scikit-learn metric functions: ``pgml.sklearn_f1_score``, ``sklearn_r2_score``,
``sklearn_regression_metrics`` and ``sklearn_classification_metrics``.

Owns: their arguments (two ``real[]`` of equal length, no NULL elements) and results as PostgresML computes
them (``bindings/sklearn/sklearn.py``): ``f1_score`` with scikit-learn's default (binary) averaging; the
regression set ``{r2, mse, mae}``; the classification set ``{f1, f1_micro, precision, recall, accuracy, mcc}``
(binary averaging with at most two distinct labels, macro otherwise) plus ``roc_auc`` when ``num_classes`` is
2 — every value through f32, as PostgresML returns them (NaN as JSON null).

Must not: train, store or read anything (``engine.ml.metrics`` scores trained models), or import scikit-learn
at import time (``sklearn.metrics`` is imported when a call runs).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.api import InvalidArgument
from engine.ml.statistics import f32
from engine.runtime.context import Context

Pair = tuple[NDArray[np.float32], NDArray[np.float32]]


def _sk(name: str) -> Any:
    return getattr(importlib.import_module("sklearn.metrics"), name)


def _pair(function: str, ground_truth: list[float | None], y_hat: list[float | None]) -> Pair:
    if any(v is None for v in ground_truth) or any(v is None for v in y_hat):
        raise InvalidArgument(f"pgml.{function}: the arrays must not contain NULL")
    if len(ground_truth) != len(y_hat) or len(ground_truth) == 0:
        raise InvalidArgument(
            f"pgml.{function}: ground_truth and y_hat must be non-empty and of one length"
            f" (got {len(ground_truth)} and {len(y_hat)})"
        )
    return np.asarray(ground_truth, dtype=np.float32), np.asarray(y_hat, dtype=np.float32)


def _scored(function: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, scikit-learn's refusals (a multiclass f1 with binary averaging…) as 22023."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined metrics warn and give 0, as in PostgresML
            return compute()
    except ValueError as exc:
        raise InvalidArgument(f"pgml.{function}: {exc}") from exc


def _regression(y: NDArray[np.float32], p: NDArray[np.float32]) -> dict[str, float | None]:
    return {
        "r2": f32(_sk("r2_score")(y, p)),
        "mse": f32(_sk("mean_squared_error")(y, p)),
        "mae": f32(_sk("mean_absolute_error")(y, p)),
    }


def _classification(y: NDArray[np.float32], p: NDArray[np.float32], classes: int) -> dict[str, float | None]:
    average = "macro" if len(set(y.tolist()) | set(p.tolist())) > 2 else "binary"
    scores = {
        "f1": f32(_sk("f1_score")(y, p, average=average)),
        "f1_micro": f32(_sk("f1_score")(y, p, average="micro")),
        "precision": f32(_sk("precision_score")(y, p, average=average)),
        "recall": f32(_sk("recall_score")(y, p, average=average)),
        "accuracy": f32(_sk("accuracy_score")(y, p)),
        "mcc": f32(_sk("matthews_corrcoef")(y, p)),
    }
    if classes == 2:
        scores["roc_auc"] = f32(_sk("roc_auc_score")(y, p))
    return scores


def _each(function: str, rows: list[tuple[Any, ...]], score: Callable[..., Any]) -> list[Any]:
    out: list[Any] = []
    for row in rows:
        if any(v is None for v in row):
            out.append(None)
            continue
        y, p = _pair(function, row[0], row[1])
        out.append(_scored(function, functools.partial(score, y, p, *row[2:])))
    return out


def sklearn_f1_score(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    return _each("sklearn_f1_score", rows, lambda y, p: f32(_sk("f1_score")(y, p)))


def sklearn_r2_score(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    return _each("sklearn_r2_score", rows, lambda y, p: f32(_sk("r2_score")(y, p)))


def sklearn_regression_metrics(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    return _each("sklearn_regression_metrics", rows, _regression)


def sklearn_classification_metrics(rows: list[tuple[Any, ...]], ctx: Context) -> list[Any]:
    return _each("sklearn_classification_metrics", rows, _classification)
