"""Binary COPY decoding (engine.pg.table, engine.pg.copy row spans): what a real server sends, for every type read.

Each case runs twice: over rows of one length (the strided path: fields at a fixed stride) and over rows of
different lengths (the gathered path), and the decoder must agree with a field-by-field reference built on
engine.pg.binary's own readers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import psycopg
import pytest

from engine.api import CharacterNotInRepertoire, EngineError, InvalidArgument, InvalidBinaryRepresentation
from engine.pg import types
from engine.pg.binary import binary_value
from engine.pg.copy import BINARY_HEADER, BINARY_TRAILER, binary_row_spans, decode_binary
from engine.pg.table import Table, copy_select_list, decode_copy_binary, pg_type_of
from tests.binary_rows import copy_messages, joined
from tests.conftest import Postgres

NAN = math.nan

# (name, SQL type, SQL values of three rows: ordinary, NULL, edge). Every row of a case has the same width.
CASES: list[tuple[str, str, list[str]]] = [
    ("r", "real", ["1.5", "NULL", "'-Infinity'"]),
    ("d", "double precision", ["-0.1", "NULL", "'NaN'"]),
    ("s", "smallint", ["-7", "NULL", "32767"]),
    ("i", "integer", ["-42", "NULL", "-2147483648"]),
    ("b8", "bigint", ["9007199254740993", "NULL", "-1"]),
    ("n", "numeric(10,2)", ["-12.50", "NULL", "99999999.99"]),
    ("big", "numeric", ["123456789012345678901234567890.5", "NULL", "'Infinity'"]),
    ("flag", "boolean", ["true", "NULL", "false"]),
    ("t", "text", ["'plain'", "NULL", "E'tab\\there\\nnl\\\\back\\r'"]),
    ("v", "character varying(10)", ["'café'", "NULL", "''"]),
    ("c", "character(3)", ["'ab'", "NULL", "'ABé'"]),
    ("j", "jsonb", ["'{\"a\": [1, 2]}'", "NULL", "'\"q\\\\\"'"]),
    ("js", "json", ["'[true]'", "NULL", "'null'"]),
    ("day", "date", ["'2024-01-02'", "NULL", "'infinity'"]),
    ("ia", "integer[]", ["'{1,-2,3}'", "NULL", "'{4,NULL,6}'"]),
    ("img", "smallint[]", ["'{{1,2},{3,4}}'", "NULL", "'[0:1][5:6]={{5,6},{7,-8}}'"]),
    ("fa", "double precision[]", ["'{0.5,-1e-05}'", "NULL", "'{NaN,-Infinity}'"]),
    ("ra", "real[]", ["'{1.25,2}'", "NULL", "'{NULL,NULL}'"]),
    ("la", "bigint[]", ["'{-9007199254740993}'", "NULL", "'{0}'"]),
    ("na", "numeric[]", ["'{1.5,-2}'", "NULL", "'{NaN,NULL}'"]),
    ("ba", "boolean[]", ["'{t,f}'", "NULL", "'{f,NULL}'"]),
    ("ta", "text[]", ['\'{a,"b c",NULL,"NULL"}\'', "NULL", '\'{"q\\"x","",",","{}"}\'']),
    ("va", "varchar(4)[]", ["'{x,y}'", "NULL", "'{é,NULL}'"]),
    ("da", "date[]", ["'{2024-01-02}'", "NULL", "'{NULL}'"]),
]


@pytest.fixture(scope="module")
def server_copies(pg: Postgres) -> dict[str, tuple[list[bytes], list[tuple[str, str]]]]:
    """The CopyData messages the server sends for each table, with (name, format_type()) of its columns."""
    rows = list(zip(*(values for _, _, values in CASES), strict=True))
    columns = ", ".join(f"{name} {sql_type}" for name, sql_type, _ in CASES)
    out: dict[str, tuple[list[bytes], list[tuple[str, str]]]] = {}
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_mixed, copy_uniform, copy_empty")
        conn.execute(f"CREATE TABLE copy_mixed ({columns})")
        conn.execute("INSERT INTO copy_mixed VALUES " + ", ".join(f"({', '.join(row)})" for row in rows))
        # Rows of one length: every value present, the same text in every row.
        conn.execute("CREATE TABLE copy_uniform AS SELECT r, d, s, i, b8, n, flag, c, ia, fa FROM copy_mixed LIMIT 0")
        conn.execute(
            "INSERT INTO copy_uniform SELECT -g, g * 0.5, g, -g, g::bigint << 40, g / 4.0, g % 2 = 0, 'x',"
            " ARRAY[g, -g, 7], ARRAY[g / 3.0, -1e300] FROM generate_series(1, 1000) g"
        )
        conn.execute("CREATE TABLE copy_empty (a integer, t text, fa real[])")
        for table in ("copy_mixed", "copy_uniform", "copy_empty"):
            found = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
                (table,),
            ).fetchall()
            names = [(str(n), str(t)) for n, t in found]
            sql = f"COPY (SELECT {copy_select_list(names)} FROM {table}) TO STDOUT (FORMAT binary)"
            with conn.cursor().copy(sql) as copy:
                out[table] = ([bytes(message) for message in copy], names)
    return out


def _decoded(copies: dict[str, tuple[list[bytes], list[tuple[str, str]]]], table: str) -> Table:
    messages, names = copies[table]
    return decode_copy_binary(*joined(messages), names)


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return bool(actual == expected)


def test_every_type_with_nulls_negatives_and_edges(server_copies: Any) -> None:
    table = _decoded(server_copies, "copy_mixed")
    assert table.num_rows == 3 and table.names == [name for name, *_ in CASES]
    expected: dict[str, list[Any]] = {
        "r": [1.5, NAN, -math.inf], "d": [-0.1, NAN, NAN], "s": [-7.0, NAN, 32767.0],
        "i": [-42.0, NAN, -2147483648.0], "b8": [9007199254740992.0, NAN, -1.0], "n": [-12.5, NAN, 99999999.99],
        "big": [1.2345678901234568e29, NAN, math.inf], "flag": [1.0, NAN, 0.0],
        "t": ["plain", None, "tab\there\nnl\\back\r"], "v": ["café", None, ""], "c": ["ab ", None, "ABé"],
        "j": ['{"a": [1, 2]}', None, '"q\\\\"'], "js": ["[true]", None, "null"],
        "day": ["2024-01-02", None, "infinity"],
    }  # fmt: skip
    for name, want in expected.items():
        column = table.column(name)
        assert not column.array and column.width == 1 and column.shape == ()
        assert column.nulls.tolist() == [False, True, False], name
        values = column.texts if column.kind == "text" else column.floats.tolist()
        assert all(_same(a, e) for a, e in zip(values, want, strict=True)), (name, values)
    assert [table.column(n).pg_type for n in ("r", "d", "s", "i", "b8", "n", "flag", "v", "c", "day")] == [
        "float4", "float8", "int2", "int4", "int8", "numeric", "bool", "varchar", "bpchar", "date",
    ]  # fmt: skip


def test_arrays_of_every_element_type(server_copies: Any) -> None:
    table = _decoded(server_copies, "copy_mixed")
    numbers = {
        "ia": [[1, -2, 3], [4, NAN, 6]], "img": [[1, 2, 3, 4], [5, 6, 7, -8]], "fa": [[0.5, -1e-05], [NAN, -math.inf]],
        "ra": [[1.25, 2], [NAN, NAN]], "la": [[-9007199254740992.0], [0]], "na": [[1.5, -2], [NAN, NAN]],
        "ba": [[1, 0], [0, NAN]],
    }  # fmt: skip
    for name, (first, last) in numbers.items():
        column = table.column(name)
        assert column.array and column.kind != "text" and column.nulls.tolist() == [False, True, False]
        floats = column.floats
        assert floats.shape == (3, len(first)) and np.isnan(floats[1]).all(), name
        for got, want in ((floats[0], first), (floats[2], last)):
            assert all(_same(a, float(e)) for a, e in zip(got.tolist(), want, strict=True)), (name, got)
    assert table.column("img").shape == (2, 2) and table.column("img").width == 4
    assert table.column("img").pg_type == "int2[]" and table.column("ia").shape == (3,)
    assert table.column("na").pg_type == "numeric[]" and table.column("ba").pg_type == "bool[]"
    assert table.column("ta").text_arrays == [["a", "b c", None, "NULL"], None, ['q"x', "", ",", "{}"]]
    assert table.column("va").text_arrays == [["x", "y"], None, ["é", None]]
    assert table.column("da").text_arrays == [["2024-01-02"], None, [None]]


def test_rows_of_one_length_read_through_the_strided_path(server_copies: Any) -> None:
    messages, _ = server_copies["copy_uniform"]
    assert len({len(m) for m in messages[1:-1]}) == 1  # every row (but the first, with the header) one length
    table = _decoded(server_copies, "copy_uniform")
    g = np.arange(1, 1001, dtype=np.float64)
    assert table.num_rows == 1000 and not any(c.nulls.any() for c in table.columns)
    assert np.array_equal(table.column("r").floats, -g) and np.array_equal(table.column("s").floats, g)
    assert np.array_equal(table.column("b8").floats, g * 2.0**40) and np.array_equal(table.column("n").floats, g / 4)
    assert np.array_equal(table.column("flag").floats, (g % 2 == 0).astype(float))
    assert table.column("c").texts == ["x  "] * 1000
    assert np.array_equal(table.column("ia").floats, np.stack([g, -g, np.full(1000, 7.0)], axis=1))
    assert np.allclose(table.column("fa").floats[:, 0], g / 3) and (table.column("fa").floats[:, 1] == -1e300).all()


@pytest.mark.parametrize("table", ["copy_mixed", "copy_uniform"])
def test_agrees_with_the_field_by_field_reference(server_copies: Any, table: str) -> None:
    """decode_copy_binary against engine.pg.copy.decode_binary + engine.pg.binary.binary_value (1-D arrays)."""
    messages, names = server_copies[table]
    decoded = decode_copy_binary(*joined(messages), names)
    rows = decode_binary(b"".join(messages))
    for index, (name, type_name) in enumerate(names):
        column = decoded.column(name)
        if column.shape not in ((), (column.width,)):
            continue  # multidimensional: no reference reader
        oid = _reference_oid(type_name)
        for row, fields in enumerate(rows):
            field = fields[index]
            want = None if field is None else binary_value(field, oid)
            got: Any
            if column.kind == "text":
                got = column.text_arrays[row] if column.array else column.texts[row]
            else:
                got = None if column.nulls[row] else column.floats[row].tolist()
            if want is not None and column.kind != "text":
                want = [NAN if v is None else float(v) for v in want] if column.array else float(want)
            assert _equal(got, want), (name, row, got, want)


def _reference_oid(type_name: str) -> int:
    pg_type, _, array = pg_type_of(type_name)
    base = {"float4": types.FLOAT4, "float8": types.FLOAT8, "numeric": types.FLOAT8, "int2": types.INT2,
            "int4": types.INT4, "int8": types.INT8, "bool": types.BOOL, "varchar": types.VARCHAR}.get(
        pg_type.removesuffix("[]"), types.TEXT)  # fmt: skip
    arrays = {v: k for k, v in types.ELEMENTS.items()}
    return arrays[base] if array else base


def _equal(got: Any, want: Any) -> bool:
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_equal, got, want))
    return _same(got, want)


def test_no_rows_and_the_spans_of_rows(server_copies: Any) -> None:
    messages, names = server_copies["copy_empty"]
    assert messages == [BINARY_HEADER + BINARY_TRAILER]  # the header and the trailer in one message
    empty = decode_copy_binary(*joined(messages), names)
    assert empty.num_rows == 0 and empty.column("t").texts == [] and empty.column("fa").width == 0
    starts, stops = binary_row_spans(*joined([BINARY_HEADER + b"\0\0", b"\0\0", BINARY_TRAILER]))
    assert starts.tolist() == [19, 21] and stops.tolist() == [21, 23]
    assert decode_copy_binary(*joined([BINARY_HEADER + b"\0\0", b"\0\0", BINARY_TRAILER]), []).num_rows == 2


def test_malformed_data_is_refused() -> None:
    columns = [("a", "integer"), ("t", "text")]
    good = copy_messages(columns, [(1, "x"), (2, "y")])
    assert decode_copy_binary(*joined(good), columns).column("t").texts == ["x", "y"]
    with pytest.raises(InvalidBinaryRepresentation, match="signature"):
        decode_copy_binary(*joined([b"a\tb\n"]), columns)
    with pytest.raises(InvalidBinaryRepresentation, match="does not match"):
        decode_copy_binary(b"".join(good), [len(good[0])], columns)
    with pytest.raises(InvalidBinaryRepresentation, match="end of COPY"):
        decode_copy_binary(*joined(good[:-1]), columns)
    with pytest.raises(EngineError, match="has 2 fields, not 1"):
        decode_copy_binary(*joined(good), [("a", "integer")])
    with pytest.raises(EngineError, match="beyond"):
        decode_copy_binary(*joined([good[0], good[1][:-1], good[2]]), columns)  # a row cut short
    with pytest.raises(EngineError, match="is not real"):
        decode_copy_binary(*joined(copy_messages([("a", "bigint")], [(1,)])), [("a", "real")])  # 8 bytes, not 4
    together = [good[0] + good[1], good[2]]  # two rows in one message: not how the server sends them
    with pytest.raises(EngineError, match="malformed COPY data"):
        decode_copy_binary(*joined(together), columns)
    bad_text = copy_messages(columns, [(1, "x")])
    bad_text[0] = bad_text[0][:-1] + b"\xff"
    with pytest.raises(CharacterNotInRepertoire):
        decode_copy_binary(*joined(bad_text), columns)


def test_mismatched_array_lengths_name_the_column() -> None:
    with pytest.raises(InvalidArgument, match="features_col"):
        columns = [("features_col", "real[]")]
        decode_copy_binary(*joined(copy_messages(columns, [([1.0, 2.0],), ([1.0, 2.0, 3.0],)])), columns)
    with pytest.raises(InvalidArgument, match="tags"):
        columns = [("tags", "text[]")]
        decode_copy_binary(*joined(copy_messages(columns, [(["a"],), (["a", "b"],)])), columns)


def test_select_list_casts_what_is_not_read_as_stored() -> None:
    columns = [("x", "real"), ("n", "numeric(10,2)"), ("na", "numeric[]"), ("j", "jsonb"), ("c", "character(3)"),
               ('we"ird', "date[]"), ("tags", "text[]"), ("e", "mood")]  # fmt: skip
    assert copy_select_list(columns) == (
        '"x", CAST("n" AS float8), CAST("na" AS float8[]), CAST("j" AS text), "c", CAST("we""ird" AS text[]),'
        ' "tags", CAST("e" AS text)'
    )


def test_type_names() -> None:
    assert pg_type_of("character varying(12)[]") == ("varchar[]", "text", True)
    assert pg_type_of("double precision") == ("float8", "number", False)
    assert pg_type_of("_int2") == ("int2[]", "number", True)
    assert pg_type_of("timestamp(3) without time zone") == ("timestamp without time zone", "text", False)
