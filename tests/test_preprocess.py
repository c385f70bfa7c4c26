"""Snapshots and preprocessing (engine.ml.snapshot / engine.ml.preprocess): statistics, encodings, replay, JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from engine.api import InvalidArgument, NotSupported
from engine.ml.preprocess import (
    feature_names,
    features,
    labels,
    num_classes,
    num_features,
    replay_row,
    replay_rows,
)
from engine.ml.snapshot import NULL_CATEGORY_KEY, Snapshot, analyze
from engine.ml.statistics import statistics
from engine.pg.table import Table, decode_copy_binary
from tests.binary_rows import copy_messages, joined

COLUMN_KEYS = ["name", "pg_type", "nullable", "label", "position", "size", "array", "preprocessor", "statistics"]
STAT_KEYS = ["min", "max", "max_abs", "mean", "median", "mode", "variance", "std_dev", "missing", "distinct"]
STAT_KEYS += ["histogram", "ventiles", "categories"]


def make_table(columns: list[tuple[str, str]], rows: list[tuple[Any, ...]]) -> Table:
    return decode_copy_binary(*joined(copy_messages(columns, rows)), columns)


def column(snapshot: Snapshot, name: str) -> dict[str, Any]:
    return next(c for c in snapshot.columns if c["name"] == name)


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #


def test_statistics_of_a_small_column_by_hand() -> None:
    stats = statistics(np.array([3, 1, np.nan, 2, 10, 2], dtype=np.float32))
    data = np.array([1, 2, 2, 3, 10], dtype=np.float64)
    assert stats["min"] == 1 and stats["max"] == 10 and stats["max_abs"] == 10
    assert stats["mean"] == pytest.approx(3.6) and stats["median"] == 2  # upper median: sorted[n // 2]
    assert stats["mode"] == 2 and stats["missing"] == 1 and stats["distinct"] == 4
    assert stats["variance"] == pytest.approx(data.var(), rel=1e-6)  # population variance, 10.64
    assert stats["std_dev"] == pytest.approx(data.std(), rel=1e-6)
    # 20 bins from min to max (width 0.45): 1 -> bin 0, 2 -> bin 2, 3 -> bin 4, max -> the last bin
    assert stats["histogram"] == [1, 0, 2, 0, 1] + [0] * 14 + [1]
    # ventile v = last sorted value whose index i has int(i / (n / 20)) == v, then forward-filled
    assert stats["ventiles"] == [1.0] * 4 + [2.0] * 8 + [3.0] * 4 + [10.0] * 3
    assert "categories" not in stats  # analyze() adds the category map
    assert list(stats)[:12] == STAT_KEYS[:12]


def test_statistics_mode_ties_and_empty_columns() -> None:
    assert statistics(np.array([1, 1, 2, 2, 3], np.float32))["mode"] == 2  # middle of the tied longest streaks
    assert statistics(np.array([1, 1, 2, 2], np.float32))["mode"] == 1  # the last streak only wins when longer
    assert statistics(np.array([1, 2, 2], np.float32))["mode"] == 2
    assert statistics(np.array([0.1], np.float32))["ventiles"] == [0.1] * 19  # f32 written in its shortest form
    empty = statistics(np.array([np.nan, np.nan], np.float32))
    assert empty["missing"] == 2 and empty["mean"] is None and empty["histogram"] == [0] * 20


# --------------------------------------------------------------------------- #
# Snapshot metadata, categories, JSON
# --------------------------------------------------------------------------- #

COLUMNS = [("color", "text"), ("x", "real"), ("img", "smallint[]"), ("y", "boolean")]
ROWS = [
    ("b", 1.0, [[1, 2], [3, 4]], True),
    (None, 2.0, [[5, 6], [7, 8]], False),
    ("a", 4.0, [[9, 10], [11, 12]], True),
    ("b", 5.0, [[13, 14], [15, 16]], True),
    ("c", 8.0, [[17, 18], [19, 20]], False),
    ("a", 100.0, [[0, 0], [0, 0]], False),  # a test row: must not move any statistic
]
TRAIN = [0, 1, 2, 3, 4]


def test_snapshot_shape_and_categories_by_first_appearance() -> None:
    table = make_table(COLUMNS, ROWS)
    snapshot = analyze(table, ["y"], {}, train=TRAIN, nullable={"x": False})
    assert [c["name"] for c in snapshot.columns] == ["color", "x", "img", "y"]
    assert all(list(c) == COLUMN_KEYS and list(c["statistics"]) == STAT_KEYS for c in snapshot.columns)
    assert snapshot.analysis == {"samples": 6.0}
    color, x, img, y = snapshot.columns
    assert color["pg_type"] == "text" and x["pg_type"] == "float4" and img["pg_type"] == "int2[]"
    assert [c["position"] for c in snapshot.columns] == [1, 2, 3, 4]
    assert (x["nullable"], color["nullable"]) == (False, True)
    assert (y["label"], x["label"], img["array"], img["size"], x["size"]) == (True, False, True, 4, 1)
    assert color["preprocessor"] == {"encode": "native", "impute": "error", "scale": "preserve"}
    assert color["statistics"]["categories"] == {
        NULL_CATEGORY_KEY: {"value": 0.0, "members": 1},
        "b": {"value": 1.0, "members": 2},
        "a": {"value": 2.0, "members": 1},
        "c": {"value": 3.0, "members": 1},
    }
    assert x["statistics"]["max"] == 8.0 and x["statistics"]["categories"] is None  # train rows only
    assert img["statistics"]["min"] == 1 and img["statistics"]["max"] == 20  # pooled over the elements
    assert features(snapshot, table)[:, 0].tolist() == [1, 0, 2, 1, 3, 2]  # NULL text is category 0
    reordered = analyze(table, ["y"], {}, train=[2, 0, 1])  # numbering follows the train order given
    assert column(reordered, "color")["statistics"]["categories"]["a"]["value"] == 1.0


def test_json_round_trip() -> None:
    table = make_table(COLUMNS, ROWS)
    snapshot = analyze(table, ["y"], {"x": {"impute": "mean", "scale": "robust"}}, train=TRAIN)
    text = json.dumps(snapshot.columns, allow_nan=False)  # strict JSON: NaN is written as null
    again = Snapshot.from_json(json.loads(text), json.loads(json.dumps(snapshot.analysis)))
    assert again == snapshot and again.columns == snapshot.columns
    assert Snapshot.from_json(text, '{"samples": 6.0}') == snapshot
    assert np.array_equal(features(again, table), features(snapshot, table))
    with pytest.raises(InvalidArgument, match="malformed snapshot column"):
        Snapshot.from_json([{"name": "x"}])


def test_labels_and_classes() -> None:
    table = make_table([("t", "text"), ("n", "integer"), ("x", "real")], [("no", 3, 1.0), ("yes", 4, 2.0)])
    snapshot = analyze(table, ["t"])
    assert labels(snapshot, table).tolist() == [1.0, 2.0] and num_classes(snapshot) == 3  # NULL counts as a class
    joint = analyze(table, ["n", "t"])
    assert labels(joint, table).tolist() == [[1.0, 3.0], [2.0, 4.0]]  # table order
    booleans = make_table(COLUMNS, ROWS)
    assert labels(analyze(booleans, ["y"]), booleans).tolist() == [1, 0, 1, 1, 0, 0]
    assert num_classes(analyze(booleans, ["y"])) == 2
    with_null = make_table([("x", "real"), ("y", "boolean")], [(1.0, True), (2.0, None)])
    with pytest.raises(InvalidArgument, match=r'labels in "y" contain 1 NULL values'):
        analyze(with_null, ["y"])
    with pytest.raises(InvalidArgument, match="Column `nope` not found"):
        analyze(with_null, ["nope"])


# --------------------------------------------------------------------------- #
# Encodings
# --------------------------------------------------------------------------- #


def test_ordinal_encoding() -> None:
    table = make_table([("size", "text"), ("y", "real")], [("mid", 1.0), ("low", 2.0), (None, 3.0), ("high", 4.0)])
    order = {"ordinal": ["low", "mid", "high", "huge"]}
    snapshot = analyze(table, ["y"], {"size": {"encode": order}}, train=[0, 1, 2])
    assert column(snapshot, "size")["preprocessor"]["encode"] == order
    assert features(snapshot, table)[:, 0].tolist() == [2, 1, 0, 3]  # 1-based positions, NULL 0
    assert replay_row(snapshot, ("huge",)).tolist() == [4.0]  # in the list, never seen in training
    with pytest.raises(InvalidArgument, match="value is not present in ordinal: 'high'"):
        analyze(table, ["y"], {"size": {"encode": {"ordinal": ["low", "mid"]}}})


def test_target_encoding_uses_training_rows_only() -> None:
    rows = [("a", 1.0), ("b", 10.0), ("a", 3.0), (None, 5.0), ("b", 20.0), ("a", 1000.0), ("c", 7.0)]
    table = make_table([("city", "varchar(8)"), ("price", "double precision")], rows)
    spec = {"city": {"encode": "target", "impute": "mean", "scale": "standard"}}
    snapshot = analyze(table, ["price"], spec, train=[0, 1, 2, 3, 4])
    categories = column(snapshot, "city")["statistics"]["categories"]
    assert {k: c["value"] for k, c in categories.items()} == {NULL_CATEGORY_KEY: 5.0, "a": 2.0, "b": 15.0}
    encoded = np.array([2.0, 15.0, 2.0, 5.0, 15.0], np.float32)  # statistics are over the encoded train values
    stats = column(snapshot, "city")["statistics"]
    assert stats["mean"] == pytest.approx(encoded.mean()) and stats["std_dev"] == pytest.approx(encoded.std())
    got = features(snapshot, table)[:, 0]
    want = (np.array([2, 15, 2, 5, 15, 2, encoded.mean()], np.float32) - encoded.mean()) / encoded.std()
    assert got == pytest.approx(want, rel=1e-5)  # "c" is unseen: imputed with the mean
    no_null = analyze(table, ["price"], {"city": {"encode": "target"}}, train=[0, 1, 2])
    assert column(no_null, "city")["statistics"]["categories"][NULL_CATEGORY_KEY]["value"] == pytest.approx(14 / 3)


def test_one_hot_encoding() -> None:
    table = make_table([("c", "text"), ("y", "real")], [("r", 1.0), ("g", 2.0), (None, 3.0), ("b", 4.0), ("r", 5.0)])
    snapshot = analyze(table, ["y"], {"c": {"encode": "one_hot"}})
    # categories __NULL__ 0, r 1, g 2, b 3 -> 3 indicators: column i is set when the code is i
    assert num_features(snapshot) == 3
    assert feature_names(snapshot) == ["c=__NULL__", "c=r", "c=g"]
    assert features(snapshot, table).tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert replay_row(snapshot, ("g",)).tolist() == [0, 0, 1]


# --------------------------------------------------------------------------- #
# Impute and scale
# --------------------------------------------------------------------------- #

NUMBERS = [(1.0, 0.0), (None, 0.0), (3.0, 0.0), (4.0, 0.0), (None, 1.0)]


@pytest.mark.parametrize(
    ("impute", "fill"), [("mean", 8 / 3), ("median", 3.0), ("mode", 3.0), ("min", 1.0), ("max", 4.0), ("zero", 0.0)]
)
def test_impute(impute: str, fill: float) -> None:
    table = make_table([("x", "real"), ("y", "real")], NUMBERS)
    snapshot = analyze(table, ["y"], {"x": {"impute": impute}}, train=[0, 1, 2, 3])
    assert features(snapshot, table)[:, 0] == pytest.approx([1.0, fill, 3.0, 4.0, fill])
    assert replay_row(snapshot, (None,))[0] == pytest.approx(fill)


def test_impute_error_is_the_default() -> None:
    table = make_table([("x", "real"), ("label", "real")], NUMBERS)
    snapshot = analyze(table, ["label"])
    with pytest.raises(InvalidArgument, match="2 missing values for x") as info:
        features(snapshot, table)
    assert info.value.hint is not None and '"x": {"impute": "mean"}' in info.value.hint
    with pytest.raises(InvalidArgument, match="missing values for x"):
        replay_row(snapshot, (None,))
    text = make_table([("t", "text"), ("label", "real")], [(None, 1.0), ("a", 2.0)])
    assert features(analyze(text, ["label"]), text)[:, 0].tolist() == [0.0, 1.0]  # NULL text is not missing
    with pytest.raises(InvalidArgument, match="not seen in the training data"):
        replay_row(analyze(text, ["label"]), ("zzz",))


@pytest.mark.parametrize("scale", ["preserve", "standard", "min_max", "max_abs", "robust"])
def test_scale(scale: str) -> None:
    values = np.array([-3.0, 1.0, 2.0, 2.5, 4.0, 6.0, 7.5, 9.0, 12.0, 20.0], np.float32)
    table = make_table([("x", "double precision"), ("y", "real")], [(float(v), 0.0) for v in values])
    snapshot = analyze(table, ["y"], {"x": {"scale": scale}})
    stats = column(snapshot, "x")["statistics"]
    expected = {
        "preserve": values,
        "standard": (values - values.mean()) / values.std(),
        "min_max": (values - values.min()) / (values.max() - values.min()),
        "max_abs": values / np.abs(values).max(),
        # ventiles[15] / [5] of 10 sorted values: v = int(i / 0.5) -> indices 7 and 2; median = sorted[5]
        "robust": (values - values[5]) / (values[7] - values[2]),
    }[scale]
    assert stats["ventiles"][15] == values[7] and stats["ventiles"][5] == values[2] and stats["median"] == values[5]
    assert features(snapshot, table)[:, 0] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_constant_column_scales_without_dividing_by_zero() -> None:
    table = make_table([("x", "real"), ("y", "real")], [(5.0, 0.0), (5.0, 1.0)])
    snapshot = analyze(table, ["y"], {"x": {"scale": "standard"}})
    assert features(snapshot, table)[:, 0].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- #
# Invalid preprocess JSON
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("preprocess", "message"),
    [
        ({"nope": {"impute": "mean"}}, "Column `nope` in `preprocess` not found"),
        ({"x": {"encode": "bogus"}}, "unknown variant `bogus`, expected one of `native`"),
        ({"x": {"impute": "average"}}, "unknown variant `average`, expected one of `error`"),
        ({"x": {"scale": "log"}}, "unknown variant `log`, expected one of `preserve`"),
        ({"x": {"scaler": "standard"}}, "unknown field `scaler`"),
        ({"x": {"encode": "one_hot"}}, "does not make sense to"),
        ({"c": {"impute": "mean"}}, 'You can not specify {"impute: mean"} for a categorical'),
        ({"c": {"impute": "median"}}, 'You can not specify {"impute: median"}'),
        ({"c": {"scale": "standard"}}, 'You can not specify {"scale: standard"}'),
        ({"c": {"encode": "ordinal"}}, "`ordinal` needs its values"),
        ({"c": {"encode": {"ordinal": [1, 2]}}}, "must be e.g."),
        ({"y": {"scale": "standard"}}, "is a label"),
        ({"x": "mean"}, "invalid type"),
        (["x"], "must be a JSON object"),
    ],
)
def test_invalid_preprocess(preprocess: Any, message: str) -> None:
    table = make_table([("c", "text"), ("x", "real"), ("y", "real")], [("a", 1.0, 1.0)])
    with pytest.raises(InvalidArgument) as info:
        analyze(table, ["y"], preprocess)
    assert message in info.value.message
    assert info.value.sqlstate == "22023"


def test_target_encoding_needs_a_label_and_json_columns_are_not_features() -> None:
    table = make_table([("c", "text"), ("x", "real")], [("a", 1.0)])
    with pytest.raises(InvalidArgument, match="needs a label"):
        analyze(table, [], {"c": {"encode": "target"}})
    assert num_features(analyze(table, [])) == 2  # unsupervised: every column is a feature
    doc = make_table([("doc", "jsonb"), ("y", "real")], [('{"a": 1}', 1.0)])
    with pytest.raises(NotSupported, match="Unhandled type"):
        analyze(doc, ["y"])


# --------------------------------------------------------------------------- #
# Replay (predict with ROW(...)) and arrays
# --------------------------------------------------------------------------- #


def test_replay_matches_features_from_the_json_alone() -> None:
    table = make_table(COLUMNS, ROWS)
    spec = {"x": {"impute": "median", "scale": "min_max"}, "color": {"encode": "one_hot", "impute": "mode"}}
    snapshot = analyze(table, ["y"], spec, train=TRAIN)
    stored = json.loads(json.dumps(snapshot.columns))  # all that survives in pgml.snapshots
    matrix = features(snapshot, table)
    assert matrix.dtype == np.float32 and matrix.shape == (6, num_features(snapshot)) == (6, 3 + 1 + 4)
    for i, (color, x, img, _) in enumerate(ROWS):
        assert np.array_equal(replay_row(stored, (color, x, img)), matrix[i])
    batch = replay_rows(snapshot, [(c, x, img) for c, x, img, _ in ROWS])
    assert np.array_equal(batch, matrix)
    names = ["color=__NULL__", "color=b", "color=a", "x", "img[1]", "img[2]", "img[3]", "img[4]"]
    assert feature_names(snapshot) == names
    flat, nested = replay_row(stored, (None, None, [1, 2, 3, 4])), replay_row(stored, (None, None, [[1, 2], [3, 4]]))
    assert np.array_equal(flat, nested)


def test_replay_errors() -> None:
    table = make_table(COLUMNS, ROWS)
    snapshot = analyze(table, ["y"], train=TRAIN)
    with pytest.raises(InvalidArgument, match="expected 3 values in the row"):
        replay_row(snapshot, ("a", 1.0))
    with pytest.raises(InvalidArgument, match="Unsupported type for quantitative column: 'x'"):
        replay_row(snapshot, ("a", "1.0", [1, 2, 3, 4]))
    with pytest.raises(InvalidArgument, match=r"Mismatched array length for feature `img`\. Expected: 4 Received: 3"):
        replay_row(snapshot, ("a", 1.0, [1, 2, 3]))
    with pytest.raises(InvalidArgument, match="is an array"):
        replay_row(snapshot, ("a", 1.0, 7))
    assert replay_row(snapshot, ("b", True, [1, 2, 3, 4])).tolist() == [1, 1, 1, 2, 3, 4]  # bool -> 1.0


def test_arrays_must_keep_their_length() -> None:
    table = make_table(COLUMNS, ROWS)
    snapshot = analyze(table, ["y"])
    other = make_table(COLUMNS, [("a", 1.0, [1, 2, 3], True)])
    with pytest.raises(InvalidArgument, match="Expected: 4 Received: 3"):
        features(snapshot, other)


def test_replay_rows_speed() -> None:
    rng = np.random.default_rng(1)
    rows = [(f"c{i % 5}", *map(float, rng.standard_normal(8)), float(i % 2)) for i in range(2000)]
    columns = [("cat", "text"), *((f"f{j}", "real") for j in range(8)), ("y", "real")]
    table = make_table(columns, rows)
    snapshot = analyze(table, ["y"], {"cat": {"encode": "one_hot"}, "f0": {"scale": "standard"}})
    batch = [row[:-1] for row in rows] * 50  # 100k rows
    start = time.perf_counter()
    out = replay_rows(snapshot, batch)
    elapsed = time.perf_counter() - start
    print(f"replay_rows 100k x 9 columns: {elapsed:.3f} s")
    assert out.shape == (100_000, num_features(snapshot)) and np.array_equal(out[:2000], features(snapshot, table))
    assert elapsed < 5
