"""``pgml.load_dataset``'s engine side: the built-in tables, Hugging Face sources read from local files, the
offline failure, and COPY text that a real PostgreSQL reads back as the same values."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.api import EngineError, InvalidArgument, UnknownModel
from engine.ml.datasets.builtins import BREAST_CANCER_FEATURES
from engine.ml.datasets.load import load
from engine.ml.datasets.table import TableData, encode_copy
from engine.pg.text import quote_ident
from tests.conftest import Postgres

WINE_COLUMNS = (
    "alcohol",
    "malic_acid",
    "ash",
    "alcalinity_of_ash",
    "magnesium",
    "total_phenols",
    "flavanoids",
    "nonflavanoid_phenols",
    "proanthocyanins",
    "hue",  # PostgresML's order: hue before color_intensity
    "color_intensity",
    "od280/od315_of_diluted_wines",
    "proline",
)
# name -> (rows, columns in table order)
BUILTINS: dict[str, tuple[int, list[tuple[str, str]]]] = {
    "breast_cancer": (569, [*((f, "real") for f in BREAST_CANCER_FEATURES), ("malignant", "boolean")]),
    "diabetes": (442, [(c, "real") for c in ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "target")]),
    "digits": (1797, [("image", "smallint[][]"), ("target", "smallint")]),
    "iris": (
        150,
        [*((c, "real") for c in ("sepal_length", "sepal_width", "petal_length", "petal_width")), ("target", "integer")],
    ),
    "linnerud": (20, [(c, "real") for c in ("chins", "situps", "jumps", "weight", "waist", "pulse")]),
    "wine": (178, [*((c, "real") for c in WINE_COLUMNS), ("target", "integer")]),
}


def parse_copy(data: bytes) -> list[list[str | None]]:
    """A small reader of COPY text format: tab-separated fields, ``\\N`` = NULL, backslash escapes."""
    text = data.decode()
    assert text == "" or text.endswith("\n")
    unescape = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "v": "\v"}
    rows: list[list[str | None]] = []
    for line in text.split("\n")[:-1]:
        row: list[str | None] = []
        for raw in line.split("\t"):
            if raw == "\\N":
                row.append(None)
                continue
            out, i = [], 0
            while i < len(raw):
                if raw[i] == "\\":
                    out.append(unescape[raw[i + 1]])
                    i += 2
                else:
                    out.append(raw[i])
                    i += 1
            row.append("".join(out))
        rows.append(row)
    return rows


def column(table: TableData, name: str) -> list[str | None]:
    index = [c for c, _ in table.columns].index(name)
    return [row[index] for row in parse_copy(table.copy_data)]


def builtin(name: str, limit: int | None = None) -> TableData:
    return load(name, None, limit, {}, allow_downloads=False)


# --------------------------------------------------------------------------- #
# Built-ins
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_table_shape(name: str) -> None:
    rows, columns = BUILTINS[name]
    table = builtin(name)
    assert (table.schema, table.name, table.returned_name) == ("pgml", name, f"pgml.{name}")
    assert list(table.columns) == columns
    assert table.rows == rows
    parsed = parse_copy(table.copy_data)
    assert len(parsed) == rows and all(len(r) == len(columns) and None not in r for r in parsed)
    assert table.statements() == [
        f'DROP TABLE IF EXISTS "pgml"."{name}" CASCADE',
        f'CREATE TABLE "pgml"."{name}" (' + ", ".join(f'"{c}" {t}' for c, t in columns) + ")",
        f'COPY "pgml"."{name}" FROM STDIN',
    ]


def test_breast_cancer_labels() -> None:
    table = builtin("breast_cancer")
    assert table.columns[0] == ("mean radius", "real") and table.columns[7] == ("mean concave points", "real")
    assert (
        table.columns[19] == ("fractal dimension error", "real") and table.columns[29][0] == "worst fractal dimension"
    )
    assert Counter(column(table, "malignant")) == {"t": 212, "f": 357}
    assert float(column(table, "mean radius")[0] or 0) == 17.99  # the first sample is malignant
    assert column(table, "malignant")[0] == "t"


def test_diabetes_is_unscaled() -> None:
    table = builtin("diabetes")
    target = [float(v or 0) for v in column(table, "target")]
    assert abs(sum(target) / len(target) - 152.13) < 0.01 and min(target) == 25 and max(target) == 346
    assert column(table, "age")[0] == "59.0" and set(column(table, "sex")) == {"1.0", "2.0"}


def test_digits_are_8x8_images() -> None:
    table = builtin("digits")
    images = [json.loads((v or "").replace("{", "[").replace("}", "]")) for v in column(table, "image")]
    assert all(len(image) == 8 and all(len(row) == 8 for row in image) for image in images)
    values = {v for image in images for row in image for v in row}
    assert values <= set(range(17)) and {0, 16} <= values
    assert Counter(column(table, "target")).keys() == {str(d) for d in range(10)}
    assert images[0][0] == [0, 0, 5, 13, 9, 1, 0, 0] and column(table, "target")[0] == "0"


def test_class_balance() -> None:
    assert Counter(column(builtin("iris"), "target")) == {"0": 50, "1": 50, "2": 50}
    assert Counter(column(builtin("wine"), "target")) == {"0": 59, "1": 71, "2": 48}


def test_wine_and_linnerud_values_follow_their_columns() -> None:
    wine = builtin("wine")
    # UCI wine, first sample: color intensity 5.64, hue 1.04, OD280/OD315 3.92 (sklearn has them in another order).
    assert (column(wine, "hue")[0], column(wine, "color_intensity")[0]) == ("1.04", "5.64")
    assert column(wine, "od280/od315_of_diluted_wines")[0] == "3.92" and column(wine, "proline")[0] == "1065.0"
    linnerud = builtin("linnerud")
    assert parse_copy(linnerud.copy_data)[0] == ["5.0", "162.0", "60.0", "191.0", "36.0", "50.0"]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_limit_takes_the_first_rows(name: str) -> None:
    full = parse_copy(builtin(name).copy_data)
    for limit in (0, 1, 7):
        table = builtin(name, limit)
        assert table.rows == limit and parse_copy(table.copy_data) == full[:limit]
    assert builtin(name, 10_000).rows == len(full)


def test_invalid_arguments() -> None:
    cases: list[tuple[tuple[Any, ...], str]] = [
        (("iris", None, -1, {}), "negative"),
        (("iris", "setosa", None, {}), "no subsets"),
        (("iris", None, None, {"split": "train"}), "takes no kwargs"),
        (("", None, None, {}), "non-empty"),
        (("iris", None, None, ["x"]), "JSON object"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidArgument, match=message) as info:
            load(*args, allow_downloads=False)
        assert info.value.sqlstate == "22023"


def test_quote_ident() -> None:
    assert quote_ident("iris") == '"iris"'
    assert quote_ident('we"ird name') == '"we""ird name"'
    assert quote_ident("jdxcosta/diamonds") == '"jdxcosta/diamonds"'
    for bad in ("", "a\0b"):
        with pytest.raises(InvalidArgument):
            quote_ident(bad)


def test_copy_encoding_of_awkward_values() -> None:
    columns = (("t", "text"), ("j", "jsonb"), ("a", "text[]"), ("f", "double precision"), ("b", "boolean"))
    rows = [
        ("tab\tnew\nline\r\\", {"k": ["a\tb", float("nan")]}, ["x", None, "", "NULL", 'q"{,}\\ s'], 1e-310, True),
        (None, None, None, float("-inf"), False),
    ]
    data, count = encode_copy(columns, rows)
    assert count == 2
    first, second = parse_copy(data)
    assert first[0] == "tab\tnew\nline\r\\"
    assert json.loads(first[1] or "") == {"k": ["a\tb", None]}
    assert first[2] == '{x,NULL,"","NULL","q\\"{,}\\\\ s"}'
    assert float(first[3] or 0) == 1e-310 and first[4] == "t"
    assert second == [None, None, None, "-Infinity", "f"]
    with pytest.raises(InvalidArgument, match='column "t" holds a NUL'):
        encode_copy(columns[:1], [("a\0b",)])
    with pytest.raises(InvalidArgument, match='column "j" holds a NUL'):
        encode_copy(columns[1:2], [({"k": "a\0b"},)])


# --------------------------------------------------------------------------- #
# Hugging Face sources (local files only: no network)
# --------------------------------------------------------------------------- #


@pytest.fixture(autouse=True)
def hub_mode_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """load() switches the hub off process-wide when downloads are off; undo that after each test."""
    import datasets
    import huggingface_hub.constants as hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)


TEXTS = ["tab\there", "line\nbreak", 'back\\slash "quoted" ,{}', "ünïcødé 🎉"]


def local(source: str, tmp_path: Path, limit: int | None = None, **kwargs: Any) -> TableData:
    """A load with ``tmp_path`` as the one data directory (the engine converts in a cache of its own)."""
    return load(source, None, limit, kwargs, allow_downloads=False, data_dirs=(str(tmp_path),))


def write_csv(tmp_path: Path) -> Path:
    path = tmp_path / "people.csv"
    pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "text": TEXTS,
            "score": [0.1, -2.5e-10, 1e300, float("nan")],
            "flag": [True, False, True, False],
        }
    ).to_csv(path, index=False)
    return path


def write_jsonl(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    records = [
        {"id": i, "meta": {"name": text, "vals": list(range(i))}, "tags": [text, "{x,y}", "NULL", ""]}
        for i, text in enumerate(TEXTS)
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def write_parquet(tmp_path: Path, **extra: pa.Array) -> Path:
    table = pa.table(
        {
            "i8": pa.array([1, -2], pa.int8()),
            "i16": pa.array([300, -300], pa.int16()),
            "i32": pa.array([70000, -1], pa.int32()),
            "i64": pa.array([2**40, None], pa.int64()),
            "f16": pa.array(np.array([1.5, -0.25], dtype=np.float16)),
            "f32": pa.array([0.1, 3.0], pa.float32()),
            "f64": pa.array([0.1, -1e-300], pa.float64()),
            "b": pa.array([True, None], pa.bool_()),
            "s": pa.array(["a\tb", None], pa.string()),
            "lst": pa.array([[1, 2], []], pa.list_(pa.int64())),
            "st": pa.array([{"x": 1, "y": "z"}, {"x": None, "y": "w"}]),
            **extra,
        }
    )
    path = tmp_path / "types.parquet"
    pq.write_table(table, path)
    return path


def test_csv_file(tmp_path: Path) -> None:
    table = local("csv", tmp_path, data_files=str(write_csv(tmp_path)))
    assert (table.schema, table.name, table.returned_name, table.rows) == ("pgml", "csv", "csv", 4)
    assert table.columns == (("id", "bigint"), ("text", "text"), ("score", "double precision"), ("flag", "boolean"))
    assert table.statements()[0] == 'DROP TABLE IF EXISTS "pgml"."csv" CASCADE'
    assert parse_copy(table.copy_data) == [
        ["1", TEXTS[0], "0.1", "t"],
        ["2", TEXTS[1], "-2.5e-10", "f"],
        ["3", TEXTS[2], "1e+300", "t"],
        ["4", TEXTS[3], None, "f"],  # NaN in a CSV reads as missing
    ]


def test_json_file_with_dict_and_list_columns(tmp_path: Path) -> None:
    path, records = write_jsonl(tmp_path)
    table = local("json", tmp_path, data_files=str(path))
    assert table.columns == (("id", "bigint"), ("meta", "jsonb"), ("tags", "jsonb"))
    parsed = parse_copy(table.copy_data)
    assert [json.loads(row[1] or "") for row in parsed] == [r["meta"] for r in records]
    assert [json.loads(row[2] or "") for row in parsed] == [r["tags"] for r in records]


def test_parquet_dtypes(tmp_path: Path) -> None:
    table = local("parquet", tmp_path, data_files=str(write_parquet(tmp_path)))
    assert dict(table.columns) == {
        "i8": "smallint",
        "i16": "smallint",
        "i32": "integer",
        "i64": "bigint",
        "f16": "real",
        "f32": "real",
        "f64": "double precision",
        "b": "boolean",
        "s": "text",
        "lst": "jsonb",
        "st": "jsonb",
    }
    first, second = parse_copy(table.copy_data)
    assert first[:4] == ["1", "300", "70000", str(2**40)] and second[:4] == ["-2", "-300", "-1", None]
    assert np.float32(first[5]) == np.float32(0.1) and first[6] == "0.1" and second[6] == "-1e-300"
    assert (first[7], second[7], first[8], second[8]) == ("t", None, "a\tb", None)
    assert (json.loads(first[10] or ""), json.loads(second[10] or "")) == ({"x": 1, "y": "z"}, {"x": None, "y": "w"})


def test_unsupported_dtype_names_the_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path, when=pa.array([0, 1], pa.timestamp("s")))
    with pytest.raises(InvalidArgument, match=r'column "when" has the unsupported feature type timestamp\[\w+\]'):
        local("parquet", tmp_path, data_files=str(path))


def test_splits_are_concatenated_and_limit_reads_train(tmp_path: Path) -> None:
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]}).to_csv(train, index=False)
    pd.DataFrame({"x": [4, 5], "y": ["d", "e"]}).to_csv(test, index=False)
    files = {"train": str(train), "test": str(test)}
    table = local("csv", tmp_path, data_files=files)
    assert table.rows == 5 and [row[0] for row in parse_copy(table.copy_data)] == ["1", "2", "3", "4", "5"]
    assert parse_copy(local("csv", tmp_path, 2, data_files=files).copy_data) == [["1", "a"], ["2", "b"]]
    empty = local("csv", tmp_path, 0, data_files=files)
    assert (empty.rows, empty.copy_data, empty.columns) == (0, b"", (("x", "bigint"), ("y", "text")))
    assert local("csv", tmp_path, data_files=files, split="test").rows == 2
    pd.DataFrame({"x": [6], "z": [1.0]}).to_csv(test, index=False)
    with pytest.raises(EngineError, match="column names don't match") as info:  # datasets' own check
        local("csv", tmp_path, data_files=files)  # (a fresh conversion: no cache is shared between calls)
    assert info.value.sqlstate == "38000"


def test_features_of_an_in_memory_dataset_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    features = datasets.Features(
        {
            "label": datasets.ClassLabel(names=["neg", "pos"]),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "nothing": datasets.Value("null"),
        }
    )
    train = datasets.Dataset.from_dict({"label": [1], "tokens": [["a", "b"]], "nothing": [None]}, features=features)
    test = datasets.Dataset.from_dict({"label": [0], "tokens": [[]], "nothing": [None]}, features=features)
    calls: list[tuple[Any, ...]] = []

    def fake_load(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append((*args, kwargs))
        return datasets.DatasetDict({"train": train, "test": test})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    table = load("someone/reviews", "default", None, {"revision": "main"}, allow_downloads=True)
    # A hub id goes to the hub only, never to a directory of that name under the proxy's working directory.
    assert calls == [("hf://datasets/someone/reviews", "default", {"revision": "main"})]
    assert (table.name, table.returned_name) == ("someone/reviews", "someone/reviews")
    assert table.columns == (("label", "bigint"), ("tokens", "jsonb"), ("nothing", "text"))
    assert parse_copy(table.copy_data) == [["1", '["a", "b"]', None], ["0", "[]", None]]
    assert (
        table.statements()[1]
        == 'CREATE TABLE "pgml"."someone/reviews" ("label" bigint, "tokens" jsonb, "nothing" text)'
    )

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [test, train])  # {"split": ["test", "train"]}
    assert parse_copy(load("someone/reviews", None, None, {}, allow_downloads=True).copy_data)[0][0] == "0"

    other = datasets.Dataset.from_dict({"label": [0.5]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": train, "x": other}))
    with pytest.raises(InvalidArgument, match="different columns"):
        load("someone/reviews", None, None, {}, allow_downloads=True)


def test_bad_hf_arguments(tmp_path: Path) -> None:
    data = str(write_csv(tmp_path))
    with pytest.raises(InvalidArgument, match="either"):
        local("csv", tmp_path, 5, data_files=data, split="train")
    with pytest.raises(InvalidArgument, match="no_such_option"):
        local("csv", tmp_path, data_files=data, no_such_option=1)
    with pytest.raises(InvalidArgument, match=r"nope\.csv"):
        local("csv", tmp_path, data_files=str(tmp_path / "nope.csv"))
    with pytest.raises(InvalidArgument, match="streaming"):
        local("csv", tmp_path, data_files=data, streaming=True)


def test_hub_dataset_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants as hub

    # As if datasets had been imported with the hub on: load() must still not touch the network.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    for source in ("someone/not-a-cached-dataset", "california_housing"):
        with pytest.raises(UnknownModel) as info:
            load(source, None, None, {}, allow_downloads=False)
        assert info.value.sqlstate == "42704"
        assert info.value.message == f'dataset "{source}" is not available offline'
        assert info.value.hint and "allow_downloads" in info.value.hint and "data_files" in info.value.hint
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- #
# Round trip through a real PostgreSQL
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def dataset_db(pg: Postgres) -> Iterator[str]:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS pgml_datasets_test")
        admin.execute("CREATE DATABASE pgml_datasets_test")
    dsn = pg.dsn(dbname="pgml_datasets_test")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgml")
    yield dsn
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE pgml_datasets_test WITH (FORCE)")


def store(dsn: str, table: TableData) -> list[tuple[Any, ...]]:
    """Run the statements and the COPY; return the table's rows and check its column names and types."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        *ddl, copy = table.statements()
        for statement in ddl:
            conn.execute(statement)
        with conn.cursor() as cur:
            with cur.copy(copy) as sink:
                sink.write(table.copy_data)
            cur.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
                (table.qualified,),
            )
            assert cur.fetchall() == [(name, type_.replace("[][]", "[]")) for name, type_ in table.columns]
            cur.execute(f"SELECT * FROM {table.qualified}")
            return cur.fetchall()


def test_roundtrip_builtins(dataset_db: str) -> None:
    from sklearn.datasets import load_breast_cancer, load_digits

    digits = load_digits()
    rows = store(dataset_db, builtin("digits"))
    assert [image for image, _ in rows] == digits.images.astype(int).tolist()
    assert [target for _, target in rows] == digits.target.tolist()

    cancer = load_breast_cancer()
    assert len(store(dataset_db, builtin("breast_cancer", 3))) == 3
    with psycopg.connect(dataset_db, autocommit=True) as conn:  # replacing must go through dependent views
        conn.execute("CREATE VIEW pgml.malignant AS SELECT * FROM pgml.breast_cancer WHERE malignant")
    rows = store(dataset_db, builtin("breast_cancer"))
    assert np.array([row[:30] for row in rows], dtype=np.float32).tolist() == cancer.data.astype(np.float32).tolist()
    assert [row[30] for row in rows] == (cancer.target == 0).tolist()


def test_roundtrip_local_files(dataset_db: str, tmp_path: Path) -> None:
    rows = store(dataset_db, local("csv", tmp_path, data_files=str(write_csv(tmp_path))))
    expected = [(1, TEXTS[0], 0.1, True), (2, TEXTS[1], -2.5e-10, False), (3, TEXTS[2], 1e300, True)]
    assert rows == [*expected, (4, TEXTS[3], None, False)]
    path, records = write_jsonl(tmp_path)
    rows = store(dataset_db, local("json", tmp_path, data_files=str(path)))
    assert rows == [(r["id"], r["meta"], r["tags"]) for r in records]
    rows = store(dataset_db, local("parquet", tmp_path, data_files=str(write_parquet(tmp_path))))
    assert rows[1] == (-2, -300, -1, None, -0.25, 3.0, -1e-300, None, None, [], {"x": None, "y": "w"})
    assert rows[0][8:] == ("a\tb", [1, 2], {"x": 1, "y": "z"})


def test_roundtrip_awkward_names(dataset_db: str) -> None:
    columns = (('a"b', "text"), ("Mixed Case", "integer"), ("select", "smallint[][]"))
    data, count = encode_copy(columns, [("x", 1, [[1, 2], [3, 4]]), (None, None, None)])
    table = TableData("pgml", 'we"ird/Name', columns, data, count, 'we"ird/Name')
    assert store(dataset_db, table) == [("x", 1, [[1, 2], [3, 4]]), (None, None, None)]
