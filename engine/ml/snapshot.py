"""Snapshot metadata: PostgresML's ``pgml.snapshots.columns`` / ``analysis`` jsonb, built and parsed.

Owns: validating the ``preprocess`` JSON, the per-column metadata and training statistics
in PostgresML's JSON shape (``orm/snapshot.rs``: Column, Preprocessor, Statistics, Category;
NaN is written as null, f32 values in their shortest form, as serde_json does), category
numbering, parsing stored columns back (:class:`ColumnPlan`), and the raw (pre-impute)
value of each column of a decoded table: category value or number, NaN when missing.

Semantics, after ``snapshot.rs`` (differences are marked *ours*):

* TEXT/VARCHAR/CHAR (and their arrays) are always category-coded: NULL is key ``__NULL__``
  with value 0; other categories get 1, 2, … in order of first appearance in the training
  rows. Other types are numbers (bool 0/1); NULL is NaN. ``numeric`` is a plain float (*ours*;
  PostgresML rounds it to an integer).
* ``ordinal`` codes are 1-based positions in the given list (a training value outside the
  list is an error; later values are looked up in the list, *ours*). ``target`` replaces each
  category's ``value`` by the mean of the first label over its training rows (a category
  without training rows gets the overall training mean, *ours*; PostgresML divides the total
  by the number of categories).
* Categories not seen in training, and NULL arrays, are missing (NaN), as in PostgresML.
* Statistics cover the training rows only, over the encoded values (target means for
  ``target``, *ours*; PostgresML analyses the codes), pooled over all elements of an array
  column (*ours*; PostgresML lets the last element's statistics win). ``min``…``std_dev``,
  ``histogram`` and ``ventiles`` follow ``Column::analyze`` (upper median, population
  variance, the "middle of the longest streaks" mode).

Must not: talk to a database, decode COPY data (``engine.pg.table``), compute statistics
(``engine.ml.statistics``), apply preprocessors (``engine.ml.preprocess``) or fit models.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.api import InvalidArgument, NotSupported
from engine.ml.statistics import STAT_FLOATS, f32, statistics
from engine.pg.table import Column, Table

F32 = NDArray[np.float32]
NULL_CATEGORY_KEY = "__NULL__"
NOMINAL_TYPES = frozenset({"bpchar", "text", "varchar", "bpchar[]", "text[]", "varchar[]"})
NUMERIC_TYPES = frozenset({"bool", "int2", "int4", "int8", "float4", "float8", "numeric"})
ENCODES = ("native", "target", "one_hot", "ordinal")
IMPUTES = ("error", "mean", "median", "mode", "min", "max", "zero")
SCALES = ("preserve", "standard", "min_max", "max_abs", "robust")


# --------------------------------------------------------------------------- #
# Snapshot and the parsed per-column plan
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ColumnPlan:
    """What features/replay need from one column's JSON, parsed once."""

    name: str
    label: bool
    size: int
    array: bool
    categorical: bool
    encode: str
    ordinal: tuple[str, ...]
    impute: str
    scale: str
    stats: dict[str, np.float32]
    ventiles: tuple[np.float32, ...]
    lookup: dict[str, float]
    num_categories: int

    @property
    def per_element(self) -> int:
        return max(self.num_categories - 1, 0) if self.encode == "one_hot" else 1

    @property
    def width(self) -> int:
        return self.size * self.per_element


@dataclass(eq=True)
class Snapshot:
    """The ``columns`` and ``analysis`` jsonb of a ``pgml.snapshots`` row, exactly as stored."""

    columns: list[dict[str, Any]]
    analysis: dict[str, Any]
    _plans: list[ColumnPlan] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_json(cls, columns: list[dict[str, Any]] | str, analysis: dict[str, Any] | str | None = None) -> Snapshot:
        """Rebuild from the stored jsonb (parsed values or JSON text); validates the columns."""
        cols = json.loads(columns) if isinstance(columns, str) else columns
        info = json.loads(analysis) if isinstance(analysis, str) else analysis
        if not isinstance(cols, list) or not all(isinstance(c, dict) for c in cols):
            raise InvalidArgument("snapshot columns must be a JSON array of objects")
        snapshot = cls(cols, dict(info or {}))
        snapshot.plans()
        return snapshot

    def to_json(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return self.columns, self.analysis

    def plans(self) -> list[ColumnPlan]:
        if self._plans is None:
            self._plans = [column_plan(column) for column in self.columns]
        return self._plans

    @property
    def label_names(self) -> list[str]:
        return [p.name for p in self.plans() if p.label]

    @property
    def feature_columns(self) -> list[str]:
        return [p.name for p in self.plans() if not p.label]


def column_plan(column: Mapping[str, Any]) -> ColumnPlan:
    try:
        pre, stats = column["preprocessor"], column["statistics"]
        encode = pre.get("encode", "native")
        ordinal = tuple(encode["ordinal"]) if isinstance(encode, dict) else ()
        categories: dict[str, Any] = stats.get("categories") or {}
        lookup = {key: _nan_if_none(c["value"]) for key, c in categories.items()}
        return ColumnPlan(
            name=str(column["name"]),
            label=bool(column["label"]),
            size=int(column["size"]),
            array=bool(column["array"]),
            categorical=str(column["pg_type"]) in NOMINAL_TYPES,
            encode="ordinal" if isinstance(encode, dict) else str(encode),
            ordinal=ordinal,
            impute=str(pre.get("impute", "error")),
            scale=str(pre.get("scale", "preserve")),
            stats={key: np.float32(_nan_if_none(stats.get(key))) for key in STAT_FLOATS},
            ventiles=tuple(np.float32(_nan_if_none(v)) for v in stats.get("ventiles") or [None] * 19),
            lookup=lookup,
            num_categories=len(categories),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidArgument(f"malformed snapshot column {column.get('name')!r}: {e!r}") from None


def _nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------- #
# The preprocess JSON
# --------------------------------------------------------------------------- #


def parse_preprocess(preprocess: Any, table: Table, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Validate ``preprocess`` against the table; return column -> full Preprocessor JSON."""
    if preprocess is None:
        preprocess = {}
    if isinstance(preprocess, str):
        preprocess = json.loads(preprocess)
    if not isinstance(preprocess, dict):
        raise InvalidArgument(
            'preprocess must be a JSON object keyed by column name, e.g. \'{"age": {"impute": "mean"}}\''
        )
    out: dict[str, dict[str, Any]] = {}
    for name, spec in preprocess.items():
        if name not in table.names:
            raise InvalidArgument(f"Column `{name}` in `preprocess` not found. Valid columns: {', '.join(table.names)}")
        if name in labels:
            raise InvalidArgument(f"Column `{name}` is a label (y_column_name); `preprocess` applies to features only")
        out[name] = _preprocessor(name, spec, table.column(name).pg_type in NOMINAL_TYPES, bool(labels))
    return out


def _preprocessor(name: str, spec: Any, categorical: bool, supervised: bool) -> dict[str, Any]:
    where = f"Error initializing preprocessor for column: {name!r}."
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{where} invalid type: expected an object with `encode`, `impute` and/or `scale`")
    unknown = set(spec) - {"encode", "impute", "scale"}
    if unknown:
        raise InvalidArgument(
            f"{where} unknown field `{sorted(unknown)[0]}`, expected one of `encode`, `impute`, `scale`"
        )
    encode = spec.get("encode", "native")
    impute, scale = spec.get("impute", "error"), spec.get("scale", "preserve")
    kind = _encode_kind(where, encode)
    _check_variant(where, impute, IMPUTES)
    _check_variant(where, scale, SCALES)
    if not categorical and kind != "native":
        raise InvalidArgument(
            f'{where}\n\n  It does not make sense to {{"encode: {kind}}} a continuous variable. '
            "Please use the default `native`."
        )
    if kind == "target" and not supervised:
        raise InvalidArgument(f"{where} `target` encoding needs a label (y_column_name)")
    if categorical and impute == "mean" and kind != "target":
        raise InvalidArgument(
            f'{where}\n\n  You can not specify {{"impute: mean"}} for a categorical variable unless it is also '
            'encoded using `target`, because there is no "average" category. `{"impute: mode"}` is valid '
            "alternative, since there is a most common category."
        )
    if categorical and kind in ("native", "one_hot") and (impute == "median" or scale != "preserve"):
        what = '"impute: median"' if impute == "median" else f'"scale: {scale}"'
        raise InvalidArgument(
            f"{where}\n\n  You can not specify {{{what}}} for a categorical variable unless it is encoded using "
            "`target` or `ordinal`, because its category codes are not ordered quantities."
        )
    return {"encode": encode, "impute": impute, "scale": scale}


def _encode_kind(where: str, encode: Any) -> str:
    if isinstance(encode, dict):
        values = encode.get("ordinal")
        if set(encode) != {"ordinal"} or not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f'{where} `encode` must be e.g. {{"ordinal": ["low", "medium", "high"]}}')
        return "ordinal"
    if encode == "ordinal":
        raise InvalidArgument(f'{where} `ordinal` needs its values, e.g. {{"ordinal": ["low", "medium", "high"]}}')
    _check_variant(where, encode, ENCODES)
    return str(encode)


def _check_variant(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        expected = ", ".join(f"`{a}`" for a in allowed)
        raise InvalidArgument(f"{where} unknown variant `{value}`, expected one of {expected}")


# --------------------------------------------------------------------------- #
# analyze: metadata + statistics over the training rows
# --------------------------------------------------------------------------- #


def analyze(
    table: Table,
    label_columns: Sequence[str],
    preprocess: Any = None,
    train: Sequence[int] | NDArray[np.integer[Any]] | None = None,
    nullable: Mapping[str, bool] | None = None,
) -> Snapshot:
    """Build the snapshot metadata of ``table``; statistics use only the rows in ``train``.

    ``train`` holds row indices in scan order (default: all rows); category codes follow
    first appearance in that order. ``nullable`` maps column -> information_schema
    ``is_nullable`` (default true). ``analysis`` is ``{"samples": <all rows>}``. Target
    encoding uses the first label column in table order, as PostgresML does.
    """
    for name in label_columns:
        if name not in table.names:
            raise InvalidArgument(f"Column `{name}` not found. Did you pass the correct `y_column_name`?")
    rows = np.arange(table.num_rows) if train is None else np.asarray(train, dtype=np.intp).reshape(-1)
    if len(rows) == 0:
        raise InvalidArgument(f"There are no training rows; the relation has {table.num_rows} samples.")
    preprocessors = parse_preprocess(preprocess, table, label_columns)
    order = sorted(table.columns, key=lambda c: c.name not in label_columns)  # labels first: targets
    target: F32 | None = None
    built: dict[str, dict[str, Any]] = {}
    for column in order:
        pre = preprocessors.get(column.name, {"encode": "native", "impute": "error", "scale": "preserve"})
        label = column.name in label_columns
        built[column.name] = _analyze_column(column, label, pre, rows, target, nullable)
        if label and target is None:
            raw = raw_from_column(column_plan(built[column.name]), column, rows)
            target = np.ascontiguousarray(raw[:, 0])
    columns = [{**built[c.name], "position": i + 1} for i, c in enumerate(table.columns)]
    return Snapshot([_ordered(c) for c in columns], {"samples": float(table.num_rows)})


def _ordered(column: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "pg_type", "nullable", "label", "position", "size", "array", "preprocessor", "statistics")
    return {key: column[key] for key in keys}


def _analyze_column(
    column: Column,
    label: bool,
    pre: dict[str, Any],
    rows: NDArray[np.intp],
    target: F32 | None,
    nullable: Mapping[str, bool] | None,
) -> dict[str, Any]:
    categorical = column.pg_type in NOMINAL_TYPES
    if not categorical and column.pg_type.removesuffix("[]") not in NUMERIC_TYPES:
        where = "array" if column.array else "scalar"
        raise NotSupported(f"Unhandled type for quantitative {where} column: {column.name} {column.pg_type!r}")
    if column.array and column.width == 0:
        raise InvalidArgument(f"Array column `{column.name}` has no non-NULL values to take its length from")
    if label and bool(column.nulls.any()):
        count = int(column.nulls.sum())
        raise InvalidArgument(
            f'The training data labels in "{column.name}" contain {count} NULL values. Consider filtering these values '
            f"from the training data by creating a VIEW that includes a SQL filter like "
            f"`WHERE {column.name} IS NOT NULL`."
        )
    meta: dict[str, Any] = {
        "name": column.name,
        "pg_type": column.pg_type,
        "nullable": True if nullable is None else bool(nullable.get(column.name, True)),
        "label": label,
        "position": 0,
        "size": column.width,
        "array": column.array,
        "preprocessor": pre,
        "statistics": {"categories": None},
    }
    if categorical:
        categories = _categories(column, pre["encode"], rows)
        meta["statistics"]["categories"] = categories
        if pre["encode"] == "target":
            assert target is not None  # parse_preprocess rejects target encoding without a label
            codes = raw_from_column(column_plan(meta), column, rows)
            _target_encode(categories, codes, target)
    values = raw_from_column(column_plan(meta), column, rows)
    meta["statistics"] = {**statistics(values.reshape(-1)), "categories": meta["statistics"]["categories"]}
    return meta


def _train_keys(column: Column, rows: NDArray[np.intp]) -> list[str | None]:
    if not column.array:
        texts = column.texts
        return [texts[i] for i in rows]
    arrays = column.text_arrays
    return [key for i in rows if (row := arrays[i]) is not None for key in row]


def _categories(column: Column, encode: Any, rows: NDArray[np.intp]) -> dict[str, dict[str, Any]]:
    """Category map: ``__NULL__`` -> 0, others numbered by first appearance (or ordinal position)."""
    keys = _train_keys(column, rows)
    members = Counter(keys)
    out: dict[str, dict[str, Any]] = {NULL_CATEGORY_KEY: {"value": 0.0, "members": members.get(None, 0)}}
    ordinal = encode["ordinal"] if isinstance(encode, dict) else None
    for key in dict.fromkeys(keys):
        if key is None:
            continue
        if ordinal is None:
            value = float(len(out))
        elif key in ordinal:
            value = float(ordinal.index(key) + 1)
        else:
            raise InvalidArgument(f"value is not present in ordinal: {key!r}. Valid values: {ordinal!r}")
        out[key] = {"value": value, "members": members[key]}
    return out


def _target_encode(categories: dict[str, dict[str, Any]], codes: F32, target: F32) -> None:
    """Replace each category's value by the mean target of its training elements."""
    flat_codes = codes.reshape(len(target), -1)
    targets = np.repeat(target[:, None], flat_codes.shape[1], axis=1).reshape(-1).astype(np.float64)
    flat = flat_codes.reshape(-1)
    known = ~np.isnan(flat)
    sums = np.bincount(flat[known].astype(np.int64), weights=targets[known], minlength=len(categories) + 1)
    overall = float(target.astype(np.float64).mean())
    for category in categories.values():
        members = category["members"]
        mean = sums[int(category["value"])] / members if members else overall
        category["value"] = f32(mean)


# --------------------------------------------------------------------------- #
# Raw values: category lookup / numbers, shape (rows, size), NaN = missing
# --------------------------------------------------------------------------- #


def key_values(plan: ColumnPlan, keys: Sequence[str | None]) -> F32:
    if plan.encode == "ordinal":
        lookup = {key: float(i + 1) for i, key in enumerate(plan.ordinal)}
        null = 0.0
    else:
        lookup, null = plan.lookup, plan.lookup.get(NULL_CATEGORY_KEY, math.nan)
    nan = math.nan
    return np.array([null if key is None else lookup.get(key, nan) for key in keys], dtype=np.float32)


def raw_from_column(plan: ColumnPlan, column: Column, rows: NDArray[np.intp] | None) -> F32:
    n = column.nulls.shape[0] if rows is None else len(rows)
    picked = np.arange(n) if rows is None else rows
    if plan.categorical != (column.kind == "text") or plan.array != column.array:
        raise InvalidArgument(f"column `{plan.name}` is {column.type_name}, but the snapshot has another type")
    if column.array and column.width != plan.size:
        raise InvalidArgument(
            f"Mismatched array length for feature `{plan.name}`. Expected: {plan.size} Received: {column.width}"
        )
    if not plan.categorical:
        floats = column.floats[picked]
        return floats.astype(np.float32).reshape(n, plan.size)
    if not column.array:
        texts = column.texts
        return key_values(plan, [texts[i] for i in picked]).reshape(n, 1)
    arrays, nan_row = column.text_arrays, [None] * plan.size
    out = key_values(plan, [key for i in picked for key in (arrays[i] or nan_row)]).reshape(n, plan.size)
    out[column.nulls[picked]] = np.nan  # a NULL array is missing, not NULL categories
    return out
