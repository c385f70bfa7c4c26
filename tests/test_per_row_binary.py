"""Per-row calls whose gather is read in binary (float arrays, text, integers) or, where it cannot be, from text:
both give what one call per row gives, through a real proxy and PostgreSQL.

Each statement puts the call where the temp-table path serves it (UPDATE … SET, WHERE, ORDER BY), and every
row's value is checked against a constant call with that row's own arguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import ProxyProcess

# Feature rows: ordinary values, -0 and 0 (one DISTINCT group: equal as floats), a duplicate, huge and tiny.
ROWS = [
    (1, [12.5, 3.0]), (2, [-0.0, 3.0]), (3, [0.0, 3.0]), (4, [12.5, 3.0]), (5, [3.4e38, 1e-45]),
    (6, [30.1, 5.2]), (7, None), (8, [20.25, 1.5]),
]  # fmt: skip


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS binary_fit, binary_rows")
        connection.execute("CREATE TABLE binary_fit AS SELECT g::real AS a, (g % 7)::real AS b, g * 2.0 AS y"
                           " FROM generate_series(1, 40) g")  # fmt: skip
        connection.execute(
            "SELECT * FROM pgml.train('Binary Rows', 'regression', 'binary_fit', 'y', 'xgboost',"
            " hyperparams => '{\"n_estimators\": 20}')"
        )  # xgboost: NaN features are missing values, not an error
        connection.execute("CREATE TABLE binary_rows (id int, f real[], d float8[], label text, n bigint, p real)")
        for row_id, features in ROWS:
            d = None if features is None else [float(v) for v in features]
            connection.execute(
                "INSERT INTO binary_rows VALUES (%s, %s, %s, %s, %s)", (row_id, features, d, f"t{row_id % 3}", row_id)
            )
        yield connection


def _constant(conn: psycopg.Connection, features: list[float] | None) -> float | None:
    if features is None:
        return None
    literal = "ARRAY[" + ", ".join(f"'{v!r}'::real" for v in features) + "]"  # 'nan' and 'inf' read too
    return conn.execute(f"SELECT pgml.predict('Binary Rows', {literal})").fetchone()[0]  # type: ignore[index]


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6))


def test_float_arrays_read_in_binary_give_the_constant_calls_results(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE binary_rows SET p = pgml.predict('Binary Rows', f)")
    got = dict(conn.execute("SELECT id, p FROM binary_rows").fetchall())
    assert all(_same(got[row_id], _constant(conn, features)) for row_id, features in ROWS), got
    assert got[7] is None and got[2] == got[3]  # NULL in, NULL out; -0 and 0 look up one key
    conn.execute("UPDATE binary_rows SET p = pgml.predict('Binary Rows', d)")  # float8[] keys
    assert dict(conn.execute("SELECT id, p FROM binary_rows").fetchall()) == got
    where = conn.execute(
        "SELECT id FROM binary_rows WHERE pgml.predict('Binary Rows', f) > CAST(%s AS real)"
        " ORDER BY pgml.predict('Binary Rows', f), id",
        (got[8],),
    ).fetchall()
    expected = sorted((v, k) for k, v in got.items() if v is not None and v > got[8])  # type: ignore[operator]
    assert [r for (r,) in where] == [k for _, k in expected] and len(set(got.values())) > 3


def test_null_and_nan_elements_and_other_types_go_the_text_way(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO binary_rows VALUES (10, '{1,NULL}', NULL, 't', 10), (11, '{NaN,1}', NULL, 't', 11)")
    conn.execute("UPDATE binary_rows SET p = pgml.predict('Binary Rows', f) WHERE id >= 10 AND f[2] IS NOT NULL")
    nan = conn.execute("SELECT p FROM binary_rows WHERE id = 11").fetchone()
    assert nan is not None and _same(nan[0], _constant(conn, [math.nan, 1.0]))
    conn.execute("UPDATE binary_rows SET p = pgml.predict('Binary Rows', f) WHERE id = 10")
    null_element = conn.execute("SELECT pgml.predict('Binary Rows', '{1,NULL}'::real[])").fetchone()
    assert null_element is not None
    assert conn.execute("SELECT p FROM binary_rows WHERE id = 10").fetchone() == null_element
    # Integer arrays (read from text) and text/bigint arguments (read in binary) in one statement.
    conn.execute("UPDATE binary_rows SET p = pgml.predict('Binary Rows', ARRAY[n, length(label)]) WHERE id < 10")
    rows = conn.execute("SELECT id, label, n, p FROM binary_rows WHERE id < 10").fetchall()
    assert len(rows) == 8 and all(_same(p, _constant(conn, [float(n), float(len(label))])) for _, label, n, p in rows)
