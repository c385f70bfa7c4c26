"""COPY TEXT decoding (engine.pg.table): types, escapes, NULLs, array literals, speed, real server output."""

from __future__ import annotations

import math
import time

import numpy as np
import psycopg
import pytest

from engine.api import EngineError, InvalidArgument
from engine.pg.table import decode_copy_text, pg_type_of
from engine.pg.text import parse_array_literal

NAN = math.nan

# One table with every supported type: (name, format_type(), [COPY field per row], expected values per row).
# Row 0: ordinary values; row 1: all NULL; row 2: edge values (escapes, empty strings, specials, 2-D arrays).
CASES: list[tuple[str, str, list[bytes], list[object]]] = [
    ("r", "real", [b"1.5", b"\\N", b"-Infinity"], [1.5, NAN, -math.inf]),
    ("d", "double precision", [b"0.1", b"\\N", b"NaN"], [0.1, NAN, NAN]),
    ("s", "smallint", [b"-7", b"\\N", b"32767"], [-7.0, NAN, 32767.0]),
    ("i", "integer", [b"42", b"\\N", b"0"], [42.0, NAN, 0.0]),
    ("b8", "bigint", [b"9007199254740993", b"\\N", b"-1"], [9007199254740992.0, NAN, -1.0]),
    ("n", "numeric(10,2)", [b"12.50", b"\\N", b"Infinity"], [12.5, NAN, math.inf]),
    ("flag", "boolean", [b"t", b"\\N", b"f"], [1.0, NAN, 0.0]),
    (
        "t",
        "text",
        [b"plain", b"\\N", b"tab\\there\\nnl\\\\back\\r\\b\\f\\v"],
        ["plain", None, "tab\there\nnl\\back\r\b\f\v"],
    ),
    ("v", "character varying(10)", [b"caf\xc3\xa9", b"\\N", b""], ["café", None, ""]),
    ("c", "character(3)", [b"ab ", b"\\N", b"\\101\\x42\\303\\251"], ["ab ", None, "ABé"]),
    ("j", "jsonb", [b'{"a": [1, 2]}', b"\\N", b'"q\\\\"'], ['{"a": [1, 2]}', None, '"q\\"']),
    ("js", "json", [b"[true]", b"\\N", b"null"], ["[true]", None, "null"]),
]
ARRAY_CASES: list[tuple[str, str, list[bytes], list[object]]] = [
    ("ia", "integer[]", [b"{1,2,3}", b"\\N", b"{4,NULL,6}"], [[1, 2, 3], None, [4, NAN, 6]]),
    ("img", "smallint[]", [b"{{1,2},{3,4}}", b"\\N", b"{{5,6},{7,8}}"], [[1, 2, 3, 4], None, [5, 6, 7, 8]]),
    (
        "fa",
        "double precision[]",
        [b"{0.5,-1e-05}", b"\\N", b"{NaN,-Infinity}"],
        [[0.5, -1e-05], None, [NAN, -math.inf]],
    ),
    ("ba", "boolean[]", [b"{t,f}", b"\\N", b"{f,NULL}"], [[1, 0], None, [0, NAN]]),
    (
        "ta",
        "text[]",
        [b'{a,"b c",NULL,"NULL"}', b"\\N", b'{"q\\\\"x","",",","{}"}'],
        [["a", "b c", None, "NULL"], None, ['q"x', "", ",", "{}"]],
    ),
]


def _copy(cases: list[tuple[str, str, list[bytes], list[object]]]) -> bytes:
    rows = zip(*(fields for _, _, fields, _ in cases), strict=True)
    return b"".join(b"\t".join(row) + b"\n" for row in rows)


def _same(actual: object, expected: object) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return actual == expected


def test_scalar_types_escapes_and_nulls() -> None:
    table = decode_copy_text(_copy(CASES), [(name, type_name) for name, type_name, _, _ in CASES])
    assert table.num_rows == 3 and table.names == [name for name, *_ in CASES]
    for name, type_name, _, expected in CASES:
        column = table.column(name)
        assert column.type_name == type_name and not column.array and column.width == 1
        assert column.nulls.tolist() == [False, True, False], name
        values = column.texts if column.kind == "text" else column.floats.tolist()
        assert all(_same(a, e) for a, e in zip(values, expected, strict=True)), (name, values)
    assert table.column("b8").floats.dtype == np.float64
    assert [table.column(n).pg_type for n in ("r", "d", "s", "i", "b8", "n", "flag", "v", "c")] == [
        "float4", "float8", "int2", "int4", "int8", "numeric", "bool", "varchar", "bpchar",
    ]  # fmt: skip


def test_array_types() -> None:
    table = decode_copy_text(_copy(ARRAY_CASES), [(name, type_name) for name, type_name, _, _ in ARRAY_CASES])
    for name, _, _, expected in ARRAY_CASES:
        column = table.column(name)
        assert column.array and column.nulls.tolist() == [False, True, False]
        if column.kind == "text":
            assert column.text_arrays == expected
            continue
        floats = column.floats
        assert floats.shape == (3, len(expected[0]))
        assert np.isnan(floats[1]).all(), name
        for got, want in ((floats[0], expected[0]), (floats[2], expected[2])):
            assert all(_same(a, float(e)) for a, e in zip(got.tolist(), want, strict=True)), (name, got)
    image = table.column("img")
    assert image.pg_type == "int2[]" and image.shape == (2, 2) and image.width == 4
    assert table.column("ia").shape == (3,) and table.column("ta").pg_type == "text[]"


def test_mismatched_array_lengths_name_the_column() -> None:
    with pytest.raises(InvalidArgument, match="features_col"):
        decode_copy_text(b"{1,2}\n{1,2,3}\n", [("features_col", "real[]")])
    with pytest.raises(InvalidArgument, match="tags"):
        decode_copy_text(b"{a}\n{a,b}\n", [("tags", "text[]")])


def test_rows_and_fields() -> None:
    assert decode_copy_text(b"", [("a", "integer")]).num_rows == 0
    empty = decode_copy_text(b"\n\n", [("a", "text")])  # two rows holding empty strings
    assert empty.column("a").texts == ["", ""]
    assert decode_copy_text(b"1\n\\.\n", [("a", "integer")]).column("a").floats.tolist() == [1.0]
    with pytest.raises(EngineError, match="malformed COPY data"):
        decode_copy_text(b"1\t2\n3\n", [("a", "integer"), ("b", "integer")])
    with pytest.raises(EngineError, match="not a number"):
        decode_copy_text(b"abc\n", [("a", "integer")])
    big = decode_copy_text(b"x" * (5 << 20) + b"\t1\n", [("t", "text"), ("n", "integer")])  # row > one block
    assert len(big.column("t").texts[0] or "") == 5 << 20
    unknown = decode_copy_text(b"2024-01-02\n", [("day", "date")])
    assert unknown.column("day").kind == "text" and unknown.column("day").texts == ["2024-01-02"]


def test_type_names_and_array_literals() -> None:
    assert pg_type_of("character varying(12)[]") == ("varchar[]", "text", True)
    assert pg_type_of("double precision") == ("float8", "number", False)
    assert pg_type_of("_int2") == ("int2[]", "number", True)
    assert pg_type_of("timestamp(3) without time zone") == ("timestamp without time zone", "text", False)
    assert parse_array_literal("[0:1]={7,8}") == (["7", "8"], (2,))
    assert parse_array_literal('{{"a b",NULL},{null,"x\\\\y"}}') == (["a b", None, None, "x\\y"], (2, 2))
    assert parse_array_literal("{ 1 , 2 }") == (["1", "2"], (2,))
    assert parse_array_literal("{}") == ([], (0,))
    with pytest.raises(EngineError):
        parse_array_literal("{1,2")


def test_speed_100k_rows_by_20_real_columns() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1000, 20)).astype(np.float32)
    block = "".join("\t".join(str(v) for v in row) + "\n" for row in values).encode()
    data = block * 100
    columns = [(f"c{i}", "real") for i in range(20)]
    decode_copy_text(block, columns)  # warm up pyarrow's thread pool
    start = time.perf_counter()
    table = decode_copy_text(data, columns)
    elapsed = time.perf_counter() - start
    print(f"decode 100k x 20 real: {elapsed:.3f} s ({len(data) / 1e6:.1f} MB)")
    assert table.num_rows == 100_000
    assert np.array_equal(table.column("c7").floats[:1000].astype(np.float32), values[:, 7])
    assert elapsed < 5


def test_real_server_copy_output(direct_dsn: str) -> None:
    """What PostgreSQL itself writes, with format_type() as the caller will pass it."""
    select = """SELECT 1.25::real AS r, NULL::bigint AS n, E'a\\tb\\\\c\\nd'::text AS t, ''::varchar(4) AS v,
        true AS flag, '{{1,2},{3,4}}'::smallint[] AS img, ARRAY['x', NULL, 'y z', 'NULL', E'q"\\\\']::text[] AS ta,
        '{"k": "é"}'::jsonb AS j, 'NaN'::float8 AS nan, '[2:3]={5,6}'::int[] AS shifted"""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE copy_case AS {select}")
        columns = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'copy_case'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
        with conn.cursor().copy("COPY (SELECT * FROM copy_case) TO STDOUT") as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
    table = decode_copy_text(data, [(str(name), str(type_name)) for name, type_name in columns])
    assert table.column("r").floats.tolist() == [1.25]
    assert table.column("n").nulls.tolist() == [True] and math.isnan(table.column("n").floats[0])
    assert table.column("t").texts == ["a\tb\\c\nd"] and table.column("v").texts == [""]
    assert table.column("flag").floats.tolist() == [1.0]
    assert table.column("img").type_name == "smallint[]" and table.column("img").shape == (2, 2)
    assert table.column("img").floats.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert table.column("ta").text_arrays == [["x", None, "y z", "NULL", 'q"\\']]
    assert table.column("j").texts == ['{"k": "é"}'] and math.isnan(table.column("nan").floats[0])
    assert table.column("shifted").floats.tolist() == [[5.0, 6.0]]
