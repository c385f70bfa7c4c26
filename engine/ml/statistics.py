"""Numbers as PostgresML's Rust code stores them: f32 rounding, and the statistics of a snapshot column.

Owns: :func:`f32` (a value rounded through float32 and written in its shortest form, as serde_json does;
None for NaN and infinities) and :func:`statistics` (PostgresML's ``Statistics`` of one column's
training values, after ``Column::analyze`` of ``orm/snapshot.rs``: upper median, population variance,
the "middle of the longest streaks" mode, histogram and ventiles).

Must not: know about snapshots' columns or preprocessors (``engine.ml.snapshot`` does), or import an ML
library.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

STAT_FLOATS = ("min", "max", "max_abs", "mean", "median", "mode", "variance", "std_dev")


def f32(value: Any) -> float | None:
    """``value`` as PostgresML stores it: an f32, written in its shortest form; None for NaN/inf."""
    if value is None:
        return None
    with np.errstate(over="ignore"):  # beyond f32's range: inf, so None
        single = np.float32(value)
    if not np.isfinite(single):
        return None
    return float(str(single))


def statistics(values: NDArray[np.floating[Any]]) -> dict[str, Any]:
    """PostgresML's Statistics of one column's training values (NaN = missing), JSON-ready."""
    data = np.sort(values[~np.isnan(values)].astype(np.float32))
    out: dict[str, Any] = {key: None for key in STAT_FLOATS}
    out |= {"missing": int(len(values) - len(data)), "distinct": 0, "histogram": [0] * 20, "ventiles": [None] * 19}
    if len(data) == 0:
        return out
    n = len(data)
    low, high = data[0], data[-1]
    mean = np.float32(data.astype(np.float64).mean())
    variance = np.float32(((data.astype(np.float64) - np.float64(mean)) ** 2).mean())
    uniques, counts = np.unique(data, return_counts=True)
    step = np.float32((high - low) / np.float32(20))
    bounds = (low + step * np.arange(20, dtype=np.float32)).astype(np.float32)
    bins = np.searchsorted(bounds, data, side="right") - 1
    out |= {
        "min": low,
        "max": high,
        "max_abs": max(abs(low), abs(high)),
        "mean": mean,
        "median": data[n // 2],
        "mode": _mode(uniques, counts),
        "variance": variance,
        "std_dev": np.sqrt(variance),
        "distinct": len(uniques),
        "histogram": [int(c) for c in np.bincount(bins, minlength=20)[:20]],
        "ventiles": [f32(v) for v in _ventiles(data)],
    }
    return {key: f32(value) if key in STAT_FLOATS else value for key, value in out.items()}


def _mode(uniques: NDArray[np.float32], counts: NDArray[np.intp]) -> np.float32:
    """snapshot.rs: the last value if its streak is the longest, else the middle of the earlier ties."""
    if len(uniques) == 1 or counts[-1] > counts[:-1].max():
        return np.float32(uniques[-1])
    tied = uniques[:-1][counts[:-1] == counts[:-1].max()]
    return np.float32(tied[len(tied) // 2])


def _ventiles(data: NDArray[np.float32]) -> NDArray[np.float32]:
    """ventiles[v] = the last sorted value whose index i has floor(i / (n / 20)) == v, gaps forward-filled."""
    size = np.float32(len(data)) / np.float32(20)
    v = (np.arange(len(data), dtype=np.float32) / size).astype(np.int64)
    last = np.searchsorted(v, np.arange(19), side="right") - 1
    found = (last >= 0) & (v[np.maximum(last, 0)] == np.arange(19))
    out = np.where(found, data[np.maximum(last, 0)], np.float32(np.nan)).astype(np.float32)
    for i in range(1, 19):
        if np.isnan(out[i]):
            out[i] = out[i - 1]
    return out
