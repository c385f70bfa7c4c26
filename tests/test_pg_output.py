"""Values the proxy prints itself (rows computed on a result stream) against what the server prints for them.

floats under every extra_float_digits regime, jsonb normalisation (key order, spacing, numbers), pgvector's
text form, and the binary numeric-array reader: each against a real server's own output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from psycopg.types.string import TextLoader

from engine.api import DataException, InvalidTextRepresentation, UntranslatableCharacter
from engine.pg import output
from engine.pg.binary import numeric_matrix, send_real_array
from engine.pg.floats import float_text, real_texts
from tests.conftest import Postgres

RNG = np.random.default_rng(12)
# Every decade the printing rules treat differently, both signs, zeros, extremes, and values that round.
REALS = np.concatenate(
    [
        RNG.standard_normal(300) * 10.0 ** RNG.integers(-12, 12, 300),
        [0.0, -0.0, 1.0, 0.1, 1e-4, 9.99999e-5, 1e-5, 123456.0, 999999.0, 1e6, 1234567.0, 1e7, 3.4028235e38,
         1.1754944e-38, 1e-45, -1.5e-7, 100000.0, 0.5, 2.5, 33.333333, -88908704.0, 1.54742505e26],
    ]
).astype(np.float32)  # fmt: skip


@pytest.fixture
def conn(pg: Postgres) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        for name in ("real", "double precision", 1021):
            c.adapters.register_loader(name, TextLoader)
        yield c


@pytest.mark.parametrize("digits", [-15, -3, 0, 1, 2, 3])
def test_reals_print_as_float4out(conn: psycopg.Connection, digits: int) -> None:
    exact = [f"{v:.9g}" for v in REALS.tolist()]  # 9 digits read back to the same float4
    conn.execute(f"SET extra_float_digits = {digits}")
    rows = conn.execute("SELECT v::real::text FROM unnest(%s::text[]) AS v", [exact]).fetchall()
    assert real_texts(REALS, digits) == [r[0] for r in rows]
    assert [float_text(v, digits) for v in REALS.tolist()] == [r[0] for r in rows]
    (array,) = conn.execute("SELECT %s::text[]::real[]::text", [exact]).fetchone() or (None,)
    assert output.encode([REALS], "real[]", extra_float_digits=digits) == [array.encode()]


JSON_VALUES = [
    {"label": "positive", "score": 0.9987},
    [{"b": 1, "a": 2, "aa": [1.5, 1e-07, 1e20, -0.0, 0.1, 12345678901234567890]}],
    {"unicode é ✓": "tab\there \"quoted\" back\\slash \u0001 \u001f", "": None, "z": True, "y": False},
    [0.30000000000000004, 2.5e-05, 1e16, 123.0, -7, []],
    "just a string",
    3.14159,
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_jsonb_prints_as_jsonb_out(conn: psycopg.Connection, value: object) -> None:
    (text,) = conn.execute("SELECT %s::jsonb::text", [json.dumps(value, ensure_ascii=False)]).fetchone() or (None,)
    assert output.jsonb_text(value) == text


@pytest.mark.parametrize(
    ("value", "error"), [("nul \x00 inside", UntranslatableCharacter), (float("nan"), InvalidTextRepresentation)]
)
def test_jsonb_that_jsonb_in_rejects(conn: psycopg.Connection, value: object, error: type[Exception]) -> None:
    with pytest.raises(psycopg.Error) as server:
        conn.execute("SELECT %s::jsonb", [json.dumps(value)])
    with pytest.raises(error) as ours:
        output.jsonb_text(value)
    assert getattr(ours.value, "sqlstate", None) == server.value.sqlstate


def test_vectors_print_as_pgvector(conn: psycopg.Connection) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    vector = REALS[:64]
    exact = "[" + ",".join(f"{v:.9g}" for v in vector.tolist()) + "]"
    (text,) = conn.execute("SELECT %s::vector::text", [exact]).fetchone() or (None,)
    assert output.encode([vector], "real[]", cast="vector") == [text.encode()]
    (raw,) = conn.execute("SELECT vector_send(%s::vector)", [exact]).fetchone() or (None,)
    assert output.encode([vector], "real[]", cast="vector", binary=True) == [bytes(raw)]
    with pytest.raises(DataException, match="expected 3 dimensions, not 64"):
        output.encode([vector], "real[]", cast="vector", dimensions=3)


def test_numeric_arrays_read_as_one_matrix(conn: psycopg.Connection) -> None:
    with conn.cursor(binary=True) as cur:
        for oid in (1021, 1022, 1007, 1016, 1005):  # real[], float8[], int[], int8[], int2[]: their bytes as sent
            cur.adapters.register_loader(oid, psycopg.types.string.ByteaBinaryLoader)
        rows = cur.execute(
            "SELECT ARRAY[i, -i, i * 1000]::real[], ARRAY[i / 3.0, 1e300]::float8[], ARRAY[i, 2]::int[],"
            " ARRAY[i * 10000000000, 1]::int8[], ARRAY[i, 3]::int2[], ARRAY[i, NULL]::int[], ARRAY[i]::int[]"
            " FROM generate_series(1, 5) i"
        ).fetchall()
    columns = [[bytes(r[c]) for r in rows] for c in range(7)]
    assert numeric_matrix(columns[0], 1021).tolist() == [[i, -i, i * 1000] for i in range(1, 6)]
    assert numeric_matrix(columns[1], 1022).tolist() == [[i / 3.0, 1e300] for i in range(1, 6)]
    assert numeric_matrix(columns[2], 1007).tolist() == [[i, 2] for i in range(1, 6)]
    assert numeric_matrix(columns[3], 1016).tolist() == [[i * 10000000000, 1] for i in range(1, 6)]
    assert numeric_matrix(columns[4], 1005).tolist() == [[i, 3] for i in range(1, 6)]
    assert numeric_matrix(columns[5], 1007) is None  # NULL elements: read one by one
    assert numeric_matrix(columns[6] + [send_real_array([1.0, 2.0])], 1007) is None  # ragged / another type
