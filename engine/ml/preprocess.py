"""Applying a snapshot's preprocessors: feature matrices for training and ``predict(project, ROW(…))``.

Owns: impute / one-hot / scale (``Column::preprocess`` of PostgresML's ``orm/snapshot.rs``),
the label vector, feature names and widths, and turning ``ROW(…)`` values into features
from the stored ``columns`` JSON alone (:func:`replay_rows`). :func:`features` goes through
the same parsed JSON, so training and prediction agree bit for bit.

* ``impute``: NaN (NULL numbers, unseen categories, NULL arrays) becomes the column's
  ``mean``/``median``/``mode``/``min``/``max`` statistic or 0; ``error`` (default) raises
  :class:`~engine.api.InvalidArgument` naming the column. NULL text is category 0, not missing.
* ``one_hot``: ``len(categories) - 1`` indicator columns per element, column *i* is 1 when
  the code equals *i* (column 0 = NULL, the last-numbered category is all zeros), as PostgresML.
* ``scale``: ``standard`` (x-mean)/std_dev, ``min_max``, ``max_abs``, ``robust``
  (x-median)/(ventiles[15]-ventiles[5]) as PostgresML; a zero or undefined divisor counts
  as 1 (*ours*: PostgresML produces inf/NaN features).

Must not: talk to a database, decode COPY data, compute statistics (``engine.ml.snapshot``)
or fit models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.api import InvalidArgument
from engine.ml.snapshot import ColumnPlan, Snapshot, key_values, raw_from_column
from engine.pg.table import Column, Table

F32 = NDArray[np.float32]
Rows = Sequence[int] | NDArray[np.integer[Any]] | None
_NUMBER_PY = frozenset({int, float, bool, type(None), Decimal, np.float32, np.float64, np.int64, np.int32})


# --------------------------------------------------------------------------- #
# Public builders
# --------------------------------------------------------------------------- #


def features(snapshot: Snapshot, table: Table, rows: Rows = None) -> F32:
    """The preprocessed float32 feature matrix (rows x :func:`num_features`) of ``table``.

    ``rows`` picks row indices (default: all rows, in order).
    """
    picked = None if rows is None else np.asarray(rows, dtype=np.intp)
    n = table.num_rows if picked is None else len(picked)
    parts = [
        _transform(plan, raw_from_column(plan, _table_column(table, plan.name), picked))
        for plan in snapshot.plans()
        if not plan.label
    ]
    return _stack(parts, n)


def labels(snapshot: Snapshot, table: Table, rows: Rows = None) -> F32:
    """The label values: bool 0/1, numbers as is, TEXT the category code (unseen in training: NaN).

    Shape (rows,) for a single scalar label, else (rows, total label width).
    """
    picked = None if rows is None else np.asarray(rows, dtype=np.intp)
    parts = []
    for plan in snapshot.plans():
        if plan.label:
            column = _table_column(table, plan.name)
            nulls = column.nulls if picked is None else column.nulls[picked]
            if nulls.any():
                raise InvalidArgument(f'The labels in "{plan.name}" contain {int(nulls.sum())} NULL values.')
            parts.append(raw_from_column(plan, column, picked))
    if not parts:
        raise InvalidArgument("this snapshot has no label column")
    out = _stack(parts, 0)
    return out[:, 0] if out.shape[1] == 1 else out


def replay_rows(snapshot: Snapshot | list[dict[str, Any]], rows: Sequence[Sequence[Any]]) -> F32:
    """``pgml.predict(project, ROW(…))`` for many rows -> (rows x :func:`num_features`) float32.

    Each row holds the values of the snapshot's non-label columns in snapshot order, as
    Python values (str, int, float, Decimal, bool, None; nested lists for arrays). Only the
    stored ``columns`` JSON is used; a list of column dicts is accepted as well.
    """
    plans = (snapshot if isinstance(snapshot, Snapshot) else Snapshot.from_json(snapshot)).plans()
    feature_plans = [p for p in plans if not p.label]
    for values in rows:
        if len(values) != len(feature_plans):
            names = ", ".join(p.name for p in feature_plans)
            raise InvalidArgument(f"expected {len(feature_plans)} values in the row ({names}), got {len(values)}")
    if not rows:
        return np.zeros((0, sum(p.width for p in feature_plans)), np.float32)
    by_column = zip(*rows, strict=True)
    parts = [_transform(p, _raw_from_values(p, list(v))) for p, v in zip(feature_plans, by_column, strict=True)]
    return _stack(parts, len(rows))


def replay_row(snapshot: Snapshot | list[dict[str, Any]], values: Sequence[Any]) -> F32:
    """``pgml.predict(project, ROW(…))`` for one row: a 1-D float32 feature vector."""
    out: F32 = replay_rows(snapshot, [values])[0]
    return out


def num_features(snapshot: Snapshot) -> int:
    """Width of a feature row after encoding (one-hot columns count once per indicator).

    PostgresML's ``models.num_features`` stores the sum of column sizes instead; the two
    differ only with one-hot encoding.
    """
    return sum(p.width for p in snapshot.plans() if not p.label)


def feature_names(snapshot: Snapshot) -> list[str]:
    """``name``, ``name[i]`` for array elements (1-based), ``name=key`` for one-hot indicators."""
    names: list[str] = []
    for plan in snapshot.plans():
        if plan.label:
            continue
        elements = [plan.name] if not plan.array else [f"{plan.name}[{i + 1}]" for i in range(plan.size)]
        if plan.encode != "one_hot":
            names.extend(elements)
            continue
        by_code = {int(v): key for key, v in plan.lookup.items() if not math.isnan(v)}
        names.extend(f"{e}={by_code.get(i, i)}" for e in elements for i in range(plan.per_element))
    return names


def num_classes(snapshot: Snapshot, label: str | None = None) -> int:
    """PostgresML's num_classes for ``label`` (default: the first label column).

    The number of categories (``__NULL__`` included) of a TEXT label, else its distinct values.
    """
    plan = next((p for p in snapshot.plans() if p.label and label in (None, p.name)), None)
    if plan is None:
        return 0
    if plan.categorical:
        return plan.num_categories
    column = next(c for c in snapshot.columns if c["name"] == plan.name)
    return int(column["statistics"]["distinct"])


def _table_column(table: Table, name: str) -> Column:
    try:
        return table.column(name)
    except KeyError:
        raise InvalidArgument(f"Column `{name}` of the snapshot is missing from the data") from None


def _stack(parts: list[F32], rows: int) -> F32:
    if not parts:
        return np.zeros((rows, 0), np.float32)
    return np.asarray(np.hstack(parts), dtype=np.float32)


# --------------------------------------------------------------------------- #
# Raw values of ROW(…) arguments, shape (rows, size), NaN = missing
# --------------------------------------------------------------------------- #


def _raw_from_values(plan: ColumnPlan, values: list[Any]) -> F32:
    """``ROW(…)`` values of one column (Python scalars / nested lists) -> (rows, size)."""
    n = len(values)
    types = set(map(type, values))
    if not plan.array:
        if any(issubclass(t, list | tuple) for t in types):
            raise InvalidArgument(f"column `{plan.name}` is not an array; got an array value")
        return (_keys(plan, values, types) if plan.categorical else _numbers(plan.name, values, types)).reshape(n, 1)
    if not plan.categorical and types <= {list, tuple}:
        dense = np.asarray(values)
        if dense.dtype.kind in "biuf" and dense.size == n * plan.size:
            return dense.astype(np.float32).reshape(n, plan.size)
    out = np.full((n, plan.size), np.nan, dtype=np.float32)
    for i, value in enumerate(values):
        if value is None:
            continue
        flat = _flatten_value(plan.name, value)
        if len(flat) != plan.size:
            raise InvalidArgument(
                f"Mismatched array length for feature `{plan.name}`. Expected: {plan.size} Received: {len(flat)}"
            )
        kinds = set(map(type, flat))
        out[i] = _keys(plan, flat, kinds) if plan.categorical else _numbers(plan.name, flat, kinds)
    return out


def _keys(plan: ColumnPlan, values: list[Any], types: set[type]) -> F32:
    if types <= {str, type(None)}:
        return key_values(plan, values)
    return key_values(plan, [_category_key(v) for v in values])


def _numbers(name: str, values: list[Any], types: set[type]) -> F32:
    """Python numbers (bool 0/1, None NaN) -> float32; anything else is an error, as in PostgresML."""
    if not types <= _NUMBER_PY:
        bad = next(v for v in values if type(v) not in _NUMBER_PY)
        raise InvalidArgument(f"Unsupported type for quantitative column: {name!r} ({type(bad).__name__})")
    return np.array(values, dtype=np.float64).astype(np.float32)


def _flatten_value(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidArgument(f"column `{name}` is an array; got {type(value).__name__}")
    out: list[Any] = []
    for item in value:
        out.extend(_flatten_value(name, item) if isinstance(item, list | tuple) else [item])
    return out


def _category_key(value: Any) -> str | None:
    """How PostgresML turns a ROW value into a category key (Rust ``to_string``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- #
# Impute, encode, scale
# --------------------------------------------------------------------------- #


def _transform(plan: ColumnPlan, raw: F32) -> F32:
    """Impute then one-hot or scale: (rows, size) -> (rows, width)."""
    missing = np.isnan(raw)
    if missing.any():
        raw = _impute(plan, raw, missing)
    if plan.encode == "one_hot":
        k = plan.per_element
        codes = np.where(np.isnan(raw), 0, np.clip(raw, 0, 1 << 30)).astype(np.int64)  # Rust `as usize`
        one_hot: F32 = (codes[:, :, None] == np.arange(k)).astype(np.float32)
        return one_hot.reshape(len(raw), plan.size * k)
    s = plan.stats
    if plan.scale == "standard":
        scaled = (raw - s["mean"]) / _divisor(s["std_dev"])
    elif plan.scale == "min_max":
        scaled = (raw - s["min"]) / _divisor(s["max"] - s["min"])
    elif plan.scale == "max_abs":
        scaled = raw / _divisor(s["max_abs"])
    elif plan.scale == "robust":
        scaled = (raw - s["median"]) / _divisor(plan.ventiles[15] - plan.ventiles[5])
    else:
        scaled = raw
    return np.asarray(scaled, dtype=np.float32)


def _divisor(value: np.float32) -> np.float32:
    return value if np.isfinite(value) and value != 0 else np.float32(1)


def _impute(plan: ColumnPlan, raw: F32, missing: NDArray[np.bool_]) -> F32:
    if plan.impute == "error":
        count = int(missing.sum())
        unseen = " (values not seen in the training data count as missing)" if plan.categorical else ""
        example = "mode" if plan.categorical and plan.encode != "target" else "mean"
        raise InvalidArgument(
            f"{count} missing values for {plan.name}{unseen}. You may provide a preprocessor to impute a value.",
            hint=f'e.g. pgml.train(..., preprocess => \'{{"{plan.name}": {{"impute": "{example}"}}}}\')',
        )
    fill = np.float32(0) if plan.impute == "zero" else plan.stats[plan.impute]
    return np.where(missing, fill, raw).astype(np.float32)
