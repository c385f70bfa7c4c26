"""PostgreSQL value formats (engine.pg: types, scalars, text, binary, copy): round trips, the array literal's
quoting rules, NULLs, nested arrays, records, the server's own errors, binary values and rows, COPY text and
binary (real[] both ways, and as the real server writes and reads them)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import psycopg
import pytest

from engine.api import (
    CharacterNotInRepertoire,
    DatatypeMismatch,
    EngineError,
    InvalidArgument,
    InvalidBinaryRepresentation,
    InvalidTextRepresentation,
    NotSupported,
    NumericValueOutOfRange,
    ProgramLimitExceeded,
    StatementTooComplex,
    UntranslatableCharacter,
)
from engine.pg import types
from engine.pg.binary import (
    binary_value,
    decode_fields,
    encode_fields,
    send_jsonb,
    send_real_array,
    send_text,
)
from engine.pg.copy import copy_field, decode_binary, decode_text, encode_binary, encode_text, unescape
from engine.pg.scalars import (
    MAX_ARRAY_ELEMENTS,
    MAX_JSON_DEPTH,
    decode_utf8,
    parse_bool,
    parse_float,
    parse_integer,
    parse_json,
)
from engine.pg.text import (
    array_out,
    format_floats,
    from_text,
    parse_array,
    parse_array_literal,
    parse_record,
    quote_element,
    quote_ident,
    to_text,
)
from proxy.wire.frames import Frame
from proxy.wire.messages import DataRow, RowDescription

# --------------------------------------------------------------------------- #
# Type OIDs
# --------------------------------------------------------------------------- #


def test_type_tables_agree() -> None:
    assert types.READ_AS[types.FLOAT4_ARRAY] == "real[]" and types.READ_AS[types.JSON] == "jsonb"
    assert types.TYPE_NAMES[types.INT4] == "integer" and types.TYPE_NAMES[types.UNKNOWN] == "text"
    assert set(types.TYPE_NAMES) == set(types.READ_AS)
    for array, element in types.ELEMENTS.items():  # an array type reads as its element type's array
        assert types.READ_AS[array] == types.READ_AS[element] + "[]"
    assert set(types.PARAM_TYPES) == {types.UNSPECIFIED, *types.ELEMENTS, *types.ELEMENTS.values(), types.UNKNOWN,
                                      types.BPCHAR, types.NAME}  # fmt: skip
    assert types.PARAM_TYPES[types.UNSPECIFIED] == "text"


# --------------------------------------------------------------------------- #
# Text: values of catalogue types, both directions
# --------------------------------------------------------------------------- #

ROUND_TRIPS: list[tuple[Any, str, str]] = [
    ("plain", "text", "plain"),
    ('q"uote\\back, {x}', "text", 'q"uote\\back, {x}'),
    ({"a": [1, 2.5, None], "é": "ü"}, "jsonb", '{"a": [1, 2.5, null], "é": "ü"}'),
    (-(2**63), "bigint", "-9223372036854775808"),
    (True, "boolean", "true"),
    (False, "boolean", "false"),
    (0.1, "double precision", "0.1"),
    ([1.5, -2.0, 3.25], "real[]", "{1.5,-2,3.25}"),
    (["a", "b c", None, "NULL", "", 'q"\\'], "text[]", '{"a","b c",NULL,"NULL","",' + '"q\\"\\\\"}'),
    ([{"k": 1}, None], "jsonb[]", '{"{\\"k\\": 1}",NULL}'),
    ([1, None, -3], "bigint[]", '{"1",NULL,"-3"}'),
    ([True, False], "boolean[]", '{"true","false"}'),
    ([0.5, None], "double precision[]", '{"0.5",NULL}'),
]


@pytest.mark.parametrize(("value", "sql_type", "text"), ROUND_TRIPS)
def test_to_text_and_back(value: Any, sql_type: str, text: str) -> None:
    assert to_text(value, sql_type) == text
    assert from_text(text, sql_type) == value


def test_null_and_records() -> None:
    assert to_text(None, "text[]") is None and from_text(None, "jsonb") is None
    assert to_text((1, "a b", None, 'x"y'), "record") == '("1","a b",,"x\\"y")'
    assert parse_record('(1,"a b",,"x\\"y")') == ("1", "a b", None, 'x"y')
    assert parse_record('("",a""b,"c""d")') == ("", "ab", 'c"d')  # "" inside: a quote, or an empty quoted run
    assert parse_record('(,"")') == (None, "")  # an empty unquoted field is NULL, '""' the empty string
    with pytest.raises(InvalidTextRepresentation, match="malformed record literal"):
        parse_record("1,2")
    assert from_text("xgboost", "pgml.algorithm") == "xgboost"  # pgml's enums: their labels


def test_quoting_rules() -> None:
    assert quote_element(None) == "NULL" and quote_element("") == '""' and quote_element("NULL") == '"NULL"'
    assert quote_element('a"b\\c') == '"a\\"b\\\\c"'
    assert format_floats(np.array([1.0, 0.1], dtype=np.float32)) == "{1,0.100000001}"  # 9 digits: float4 exact
    assert np.float32(float("0.100000001")) == np.float32(0.1) and format_floats([0.5, None]) == "{0.5,NULL}"
    # array_out quotes only where the server does: empty, NULL (any case), braces, quotes, commas, spaces
    assert array_out(["x", None, "", "null", 'q"{,}\\ s', "a\tb"], str) == '{x,NULL,"","null","q\\"{,}\\\\ s","a\tb"}'
    assert array_out([[1, 2], [3, None]], str) == "{{1,2},{3,NULL}}"
    assert quote_ident('My "Table"') == '"My ""Table"""'
    with pytest.raises(InvalidArgument):
        quote_ident("")


def test_one_dimensional_arrays() -> None:
    assert parse_array('{a,"b c",NULL,"NULL",""}') == ["a", "b c", None, "NULL", ""]
    assert parse_array("  [0:2]={ 1 , 2 ,3}  ") == ["1", "2", "3"]
    assert parse_array("{}") == [] and parse_array("{ }") == []
    assert parse_array('{"a\\"b","c\\\\d", "{x,y}"}') == ['a"b', "c\\d", "{x,y}"]
    for bad in ("{a", "a}", '{"a"b}', "{a,,b}", '{a,"b}', "{a b}}"):
        with pytest.raises(InvalidTextRepresentation, match="malformed array literal") as info:
            parse_array(bad)
        assert info.value.sqlstate == "22P02"
    with pytest.raises(InvalidArgument, match="multidimensional"):
        parse_array("{{1,2},{3,4}}")
    assert from_text("{{1,2},{3,4}}", "bigint[]") == [1, 2, 3, 4]  # numbers of any dimensions: flattened


def test_nested_arrays() -> None:
    assert parse_array_literal("{{1,2},{3,4}}") == (["1", "2", "3", "4"], (2, 2))
    assert parse_array_literal('{{"a b",NULL},{null,"x\\\\y"}}') == (["a b", None, None, "x\\y"], (2, 2))
    assert parse_array_literal('[1:2][1:1]={{"{"},{"}"}}') == (["{", "}"], (2, 1))
    assert parse_array_literal("{{{1},{2}},{{3},{4}}}") == (["1", "2", "3", "4"], (2, 2, 1))
    assert parse_array_literal(" { {1} , {2} } ") == (["1", "2"], (2, 1))
    assert parse_array_literal("[0:1]={7,8}") == (["7", "8"], (2,))
    assert parse_array_literal("{}") == ([], (0,)) and parse_array_literal("{{}}") == ([], (0,))
    for bad in ("{{1},2}", "{1,{2}}", "{{1}{2}}", "{{1},}", "{{1}", "{{1}}}", '{"a",{1}}', "{{1}} x", "x"):
        with pytest.raises(InvalidTextRepresentation, match="malformed array literal"):
            parse_array_literal(bad)


def test_limits() -> None:
    many = "{" + ",".join(["1"] * (MAX_ARRAY_ELEMENTS + 1)) + "}"
    with pytest.raises(ProgramLimitExceeded) as info:
        parse_array(many)
    assert info.value.sqlstate == "54000"
    with pytest.raises(StatementTooComplex):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None


def test_scalars_as_the_server_reads_them() -> None:
    assert parse_integer(" +1_000 ") == 1000 and parse_integer("-32768", "smallint") == -32768
    with pytest.raises(NumericValueOutOfRange, match='value "32768" is out of range for type smallint'):
        parse_integer("32768", "smallint")
    with pytest.raises(InvalidTextRepresentation, match=r'input syntax for type bigint: "1\.5"'):
        parse_integer("1.5")
    assert math.isnan(parse_float("NaN")) and parse_float("-Infinity") == -math.inf and parse_float("1e3") == 1000.0
    with pytest.raises(NumericValueOutOfRange):
        parse_float("1e999")
    with pytest.raises(InvalidTextRepresentation):
        parse_float("1_0")
    assert parse_bool(" YES ") is True and parse_bool("of") is False
    with pytest.raises(InvalidTextRepresentation, match="boolean"):
        parse_bool("maybe")
    with pytest.raises(UntranslatableCharacter):
        parse_json('"\\u0000"')
    with pytest.raises(InvalidTextRepresentation, match="invalid input syntax for type json"):
        parse_json("{nope}")
    assert decode_utf8("é".encode()) == "é"
    with pytest.raises(CharacterNotInRepertoire, match='invalid byte sequence for encoding "UTF8": 0xc3 0x28'):
        decode_utf8(b"a\xc3(")
    with pytest.raises(CharacterNotInRepertoire, match="0x00"):
        decode_utf8(b"a\0b")


# --------------------------------------------------------------------------- #
# Binary values and rows
# --------------------------------------------------------------------------- #


def _array(element: int, values: list[bytes | None], ndim: int = 1, flags: int = 0) -> bytes:
    head = struct.pack("!iiI", ndim, flags, element) + (struct.pack("!ii", len(values), 1) if ndim else b"")
    return head + b"".join(b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values)


def test_binary_values() -> None:
    assert binary_value(b"caf\xc3\xa9", types.VARCHAR) == "café"
    assert binary_value(b'\x01{"a": 1}', types.JSONB) == {"a": 1} and binary_value(b"[1]", types.JSON) == [1]
    assert send_jsonb('["é"]') == b'\x01["\xc3\xa9"]' and binary_value(send_jsonb('["é"]'), types.JSONB) == ["é"]
    assert binary_value(struct.pack("!q", -5), types.INT8) == -5 and binary_value(b"\x01", types.BOOL) is True
    assert binary_value(struct.pack("!f", 1.5), types.FLOAT4) == 1.5
    floats = _array(types.FLOAT4, [struct.pack("!f", 0.5), None])
    assert binary_value(floats, types.FLOAT4_ARRAY) == [0.5, None]
    assert binary_value(_array(types.TEXT, [b"x", b""]), types.TEXT_ARRAY) == ["x", ""]
    assert binary_value(struct.pack("!iiI", 0, 0, types.INT4), types.INT4_ARRAY) == []
    with pytest.raises(struct.error):
        binary_value(b"\x00\x01", types.INT4)  # the caller names the parameter (22P03)
    with pytest.raises(InvalidBinaryRepresentation, match="unsupported jsonb version number 2"):
        binary_value(b"\x02{}", types.JSONB)
    with pytest.raises(DatatypeMismatch, match="binary data has array element type 25 instead of expected 700"):
        binary_value(_array(types.TEXT, []), types.FLOAT4_ARRAY)
    with pytest.raises(ProgramLimitExceeded, match="exceeds the maximum allowed"):
        binary_value(struct.pack("!iiI", 7, 0, types.INT8), types.INT8_ARRAY)
    with pytest.raises(NotSupported, match="multidimensional"):
        binary_value(struct.pack("!iiIiiii", 2, 0, types.INT8, 1, 1, 1, 1), types.INT8_ARRAY)
    with pytest.raises(NotSupported):
        binary_value(b"", types.NUMERIC)


def test_rows_of_fields() -> None:
    fields = [b"a", None, b"", "é".encode()]
    encoded = encode_fields(fields)
    assert (
        encoded
        == b"\x00\x04" + b"\x00\x00\x00\x01a" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02\xc3\xa9"
    )
    assert decode_fields(b"xx" + encoded, 2) == (fields, len(encoded) + 2)
    with pytest.raises(struct.error):
        decode_fields(encoded[:-1])
    data_row = b"D" + struct.pack("!i", 4 + len(encoded)) + encoded  # a DataRow carries a row's fields
    assert DataRow.decode(Frame(data_row[0], data_row)).values == tuple(fields)
    columns = b"".join(
        name + b"\0" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0) for name, oid in ((b"k", 25), (b"v", 1021))
    )
    description = b"T" + struct.pack("!ih", 6 + len(columns), 2) + columns
    assert [(c.name, c.type_oid) for c in RowDescription.decode(Frame(description[0], description)).columns] == [
        ("k", 25),
        ("v", 1021),
    ]


# --------------------------------------------------------------------------- #
# COPY
# --------------------------------------------------------------------------- #


def test_copy_text_round_trip() -> None:
    rows = [("tab\there", None, "back\\slash", "line\nbreak\rcr"), ("", "\\N", "é", "plain")]
    data = encode_text(rows)
    assert data.split(b"\n")[0] == b"tab\\there\t\\N\tback\\\\slash\tline\\nbreak\\rcr"
    assert decode_text(data) == rows and decode_text(data + b"\\.\n") == rows
    assert encode_text([]) == b"" and decode_text(b"") == []
    assert copy_field(None) == "\\N" and copy_field("\\N") == "\\\\N"
    assert unescape("\\101\\x42\\303\\251\\b\\v\\q") == "ABé\b\vq"


def test_copy_binary_real_arrays_round_trip() -> None:
    vectors = [np.array([0.5, -1.25, 3.0e38], dtype=np.float32), None, np.zeros(0, dtype=np.float32)]
    rows = [(send_text(f"key {i}"), None if v is None else send_real_array(v)) for i, v in enumerate(vectors)]
    data = encode_binary(rows)
    assert data.startswith(b"PGCOPY\n\xff\r\n\0") and data.endswith(b"\xff\xff")
    decoded = decode_binary(data)
    assert [binary_value(k or b"", types.TEXT) for k, _ in decoded] == ["key 0", "key 1", "key 2"]
    values = [None if v is None else binary_value(v, types.FLOAT4_ARRAY) for _, v in decoded]
    assert values == [[0.5, -1.25, float(np.float32(3.0e38))], None, []]
    assert decode_binary(encode_binary([])) == []
    with pytest.raises(InvalidBinaryRepresentation, match="signature"):
        decode_binary(b"not copy")
    with pytest.raises(InvalidBinaryRepresentation, match="end of COPY BINARY"):
        decode_binary(data[:-5])


def test_copy_as_the_server_writes_and_reads_it(direct_dsn: str) -> None:
    vectors = [[0.5, -1.25], [1e-30, 2.0, 3.0]]
    rows = [(send_text(f"k{i}"), send_real_array(v)) for i, v in enumerate(vectors)]
    text_rows = [("tab\there", '{"a b",NULL,"\\"q\\""}'), (None, "{}")]
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE pg_formats_b (k text, v real[])")
        conn.execute("CREATE TEMP TABLE pg_formats_t (k text, v text[])")
        with conn.cursor().copy("COPY pg_formats_b FROM STDIN WITH (FORMAT binary)") as copy:
            copy.write(encode_binary(rows))
        with conn.cursor().copy("COPY pg_formats_t FROM STDIN") as copy:
            copy.write(encode_text(text_rows))
        stored = conn.execute("SELECT k, v::text FROM pg_formats_b ORDER BY k").fetchall()
        assert [(k, [np.float32(x) for x in parse_array(v)]) for k, v in stored] == [
            ("k0", [0.5, -1.25]), ("k1", [np.float32(1e-30), 2.0, 3.0])
        ]  # fmt: skip
        with conn.cursor().copy("COPY pg_formats_b TO STDOUT WITH (FORMAT binary)") as copy:
            written = b"".join(bytes(chunk) for chunk in copy)
        with conn.cursor().copy("COPY pg_formats_t TO STDOUT") as copy:
            text_written = b"".join(bytes(chunk) for chunk in copy)
    back = {
        binary_value(k or b"", types.TEXT): binary_value(v or b"", types.FLOAT4_ARRAY)
        for k, v in decode_binary(written)
    }
    assert back == {"k0": [0.5, -1.25], "k1": [float(np.float32(1e-30)), 2.0, 3.0]}
    assert [(k, None if v is None else from_text(v, "text[]")) for k, v in decode_text(text_written)] == [
        ("tab\there", ["a b", None, '"q"']), (None, [])
    ]  # fmt: skip


def test_engine_errors_carry_the_server_sqlstates() -> None:
    codes = {cls.__name__: cls.sqlstate for cls in EngineError.__subclasses__()}
    assert codes["InvalidTextRepresentation"] == "22P02" and codes["InvalidBinaryRepresentation"] == "22P03"
    assert codes["CharacterNotInRepertoire"] == "22021" and codes["UntranslatableCharacter"] == "22P05"
    assert codes["NumericValueOutOfRange"] == "22003" and codes["DatatypeMismatch"] == "42804"
    assert codes["ProgramLimitExceeded"] == "54000" and codes["StatementTooComplex"] == "54001"
