"""A relation's rows, read with ``COPY … TO STDOUT`` (text format), decoded into typed columns.

Owns: the mapping from ``format_type()`` spellings to PostgresML's type names (``udt_name``
style: ``float4``, ``int2[]``, ``varchar``…), and :class:`Table`, the decoded result. The COPY TEXT
grammar (escapes) is ``engine.pg.copy``'s, the array literal grammar ``engine.pg.text``'s.

Numbers, booleans and numeric/boolean arrays become float64 numpy arrays (NaN for NULL,
plus a row NULL mask); text-like values (text, varchar, char, json, jsonb and any type
not known here) stay Python strings. Splitting and number parsing go through pyarrow's
multi-threaded CSV reader, so 100k rows x 20 columns decode in well under a second.

Must not: know about snapshots, preprocessing or models, talk to a database, or guess
types from the data (the caller passes ``format_type()`` of every column).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray

from engine.api import EngineError, InvalidArgument
from engine.pg.copy import END_OF_DATA, NULL, unescape
from engine.pg.text import parse_array_literal

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
Kind = Literal["number", "bool", "text"]
TextArrayRow = list[str | None]

# format_type() spelling (typmod stripped) -> PostgresML's pg_type (information_schema udt_name)
_TYPES: dict[str, tuple[str, Kind]] = {
    "real": ("float4", "number"),
    "double precision": ("float8", "number"),
    "smallint": ("int2", "number"),
    "integer": ("int4", "number"),
    "bigint": ("int8", "number"),
    "numeric": ("numeric", "number"),
    "boolean": ("bool", "bool"),
    "text": ("text", "text"),
    "character varying": ("varchar", "text"),
    "character": ("bpchar", "text"),
    "bpchar": ("bpchar", "text"),
    "json": ("json", "text"),
    "jsonb": ("jsonb", "text"),
}
# udt_name spellings are accepted too (float4, int8, bool, varchar, …)
_TYPES.update({udt: (udt, kind) for udt, kind in list(_TYPES.values())})

_TYPMOD = re.compile(r"\([^)]*\)")


@dataclass(frozen=True, eq=False)
class Column:
    """One decoded column.

    ``values`` is, by ``kind`` and ``array``:

    * number / bool scalars: float64 array of shape (rows,), NaN for NULL, booleans as 0/1;
    * number / bool arrays: float64 array of shape (rows, width), the row-major flattened
      elements, NaN for NULL elements and for every element of a NULL array;
    * text scalars: ``list[str | None]``;
    * text arrays: ``list[list[str | None] | None]`` (each flattened, all of one width).

    ``nulls`` marks rows whose whole value is NULL. ``shape`` is the array shape of the first
    non-NULL value (``()`` for scalars and for all-NULL array columns); ``width`` is the
    flattened element count (1 for scalars).
    """

    name: str
    type_name: str
    pg_type: str
    kind: Kind
    array: bool
    values: FloatArray | list[str | None] | list[TextArrayRow | None]
    nulls: BoolArray
    shape: tuple[int, ...]
    width: int

    @property
    def floats(self) -> FloatArray:
        """The values of a number or bool column (scalar or array)."""
        if self.kind == "text":
            raise TypeError(f"column {self.name!r} is {self.type_name}, not numeric")
        return cast(FloatArray, self.values)

    @property
    def texts(self) -> list[str | None]:
        """The values of a scalar text-like column."""
        if self.kind != "text" or self.array:
            raise TypeError(f"column {self.name!r} is {self.type_name}, not a text scalar")
        return cast(list[str | None], self.values)

    @property
    def text_arrays(self) -> list[TextArrayRow | None]:
        """The values of a text-like array column (each row flattened)."""
        if self.kind != "text" or not self.array:
            raise TypeError(f"column {self.name!r} is {self.type_name}, not a text array")
        return cast(list[TextArrayRow | None], self.values)


@dataclass(frozen=True, eq=False)
class Table:
    """Decoded columns in the order given, all ``num_rows`` long."""

    columns: list[Column]
    num_rows: int

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)


@functools.cache
def _arrow() -> tuple[Any, Any, Any]:
    """pyarrow and its compute and csv modules, imported on first use: half a second to import, and only
    reading a relation (pgml.train, pgml.snapshot, pgml.tune) needs them."""
    return (
        importlib.import_module("pyarrow"),
        importlib.import_module("pyarrow.compute"),
        importlib.import_module("pyarrow.csv"),
    )


def pg_type_of(type_name: str) -> tuple[str, Kind, bool]:
    """``format_type()`` spelling -> (PostgresML pg_type, element kind, is array).

    Unknown types are text-like and keep their spelling (typmods dropped), e.g.
    ``timestamp without time zone``; arrays get ``[]`` appended, like PostgresML's
    ``_int2`` -> ``int2[]``.
    """
    name = _TYPMOD.sub("", type_name).strip()
    array = name.endswith("[]") or name.startswith("_")
    if name.endswith("[]"):
        name = name[:-2].rstrip("[]").strip()
    elif name.startswith("_"):
        name = name[1:]
    pg_type, kind = _TYPES.get(name, (name, "text"))
    return (pg_type + "[]" if array else pg_type), kind, array


def decode_copy_text(data: bytes, columns: Sequence[tuple[str, str]]) -> Table:
    """Decode the bytes of ``COPY (SELECT …) TO STDOUT`` (text format, default options).

    ``columns`` lists (name, ``format_type()``) for every output column, in order.
    Raises :class:`InvalidArgument` when an array column's rows have different flattened
    lengths, :class:`EngineError` when the data does not have that many fields per row.
    """
    names = [f"c{i}" for i in range(len(columns))]
    raw = _read_fields(data, names)
    num_rows = len(raw[0]) if raw else data.count(b"\n")
    decoded = [_decode_column(name, type_name, field) for (name, type_name), field in zip(columns, raw, strict=True)]
    return Table(decoded, num_rows)


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #


def _read_fields(data: bytes, names: list[str]) -> list[Any]:
    """Split into one arrow string array per column, with COPY's ``\\N`` as null."""
    pa, _, pcsv = _arrow()
    if not names:
        return []
    if data.endswith(END_OF_DATA):  # only sent by very old servers
        data = data[: -len(END_OF_DATA)]
    if not data:
        return [pa.array([], pa.string()) for _ in names]
    if not data.endswith(b"\n"):
        data += b"\n"
    parse = pcsv.ParseOptions(
        delimiter="\t",
        quote_char=False,
        double_quote=False,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=False,
    )
    convert = pcsv.ConvertOptions(
        column_types={name: pa.string() for name in names},
        null_values=[NULL],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    block = 1 << 22
    while True:
        read = pcsv.ReadOptions(column_names=names, block_size=block)
        try:
            table = pcsv.read_csv(pa.py_buffer(data), read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            if "straddling" in str(e) and block < len(data):  # a row longer than one block
                block = len(data) + 1
                continue
            raise EngineError(f"malformed COPY data: {e}") from None
        return [table.column(name).combine_chunks() for name in names]


# --------------------------------------------------------------------------- #
# Columns
# --------------------------------------------------------------------------- #


def _decode_column(name: str, type_name: str, field: Any) -> Column:
    pg_type, kind, array = pg_type_of(type_name)
    nulls = cast(BoolArray, field.is_null().to_numpy(zero_copy_only=False))
    values: FloatArray | list[str | None] | list[TextArrayRow | None]
    shape: tuple[int, ...] = ()
    width = 1
    if array:
        first = field.drop_null()[:1].to_pylist()
        if first:
            shape = parse_array_literal(unescape(first[0]))[1]
        if kind == "text":
            values, width = _text_arrays(name, field)
        else:
            values, width = _number_arrays(name, kind, field)
    elif kind == "number":
        values = _to_float(name, field)
    elif kind == "bool":
        values = _bools(field)
    else:
        values = [None if v is None else unescape(v) for v in field.to_pylist()]
    return Column(name, type_name, pg_type, kind, array, values, nulls, shape, width)


def _to_float(name: str, strings: Any) -> FloatArray:
    pa, pc, _ = _arrow()
    try:
        floats = pc.cast(strings, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise EngineError(f"column {name!r}: not a number: {e}") from None
    return _writable(floats.to_numpy(zero_copy_only=False))


def _bools(strings: Any) -> FloatArray:
    """``t``/``f`` -> 1.0/0.0, NULL -> NaN."""
    _, pc, _ = _arrow()
    return _writable(pc.if_else(pc.equal(strings, "t"), 1.0, 0.0).to_numpy(zero_copy_only=False))


def _writable(values: Any) -> FloatArray:
    out = np.asarray(values, dtype=np.float64)
    return out if out.flags.writeable else out.copy()


def _number_arrays(name: str, kind: Kind, strings: Any) -> tuple[FloatArray, int]:
    """Numeric/boolean array literals -> (rows, width) floats, NaN for NULL rows and elements."""
    pa, pc, _ = _arrow()
    fast = not pc.any(pc.match_substring_regex(strings, r'^\[|"|\\')).as_py()
    if not fast:  # bounds decoration, quotes or escapes: the full parser, row by row
        rows = [None if v is None else parse_array_literal(unescape(v))[0] for v in strings.to_pylist()]
        strings = pa.array(
            [None if r is None else "{" + ",".join("NULL" if e is None else e for e in r) + "}" for r in rows],
            pa.string(),
        )
    bare = pc.replace_substring_regex(strings, r"[{}\s]", "")
    parts = pc.split_pattern(bare, ",")
    lengths = pc.if_else(pc.equal(bare, ""), 0, pc.list_value_length(parts))
    width = _common_width(name, lengths)
    elements = pc.list_flatten(pc.if_else(pc.equal(bare, ""), pa.scalar(None, parts.type), parts))
    elements = pc.if_else(pc.equal(pc.utf8_upper(elements), "NULL"), pa.scalar(None, pa.string()), elements)
    flat = _bools(elements) if kind == "bool" else _to_float(name, elements)
    out = np.full((len(strings), width), np.nan)
    present = np.flatnonzero(pc.is_valid(strings).to_numpy(zero_copy_only=False))
    if width:
        out[present] = flat.reshape(len(present), width)
    return out, width


def _text_arrays(name: str, strings: Any) -> tuple[list[TextArrayRow | None], int]:
    pa, _, _ = _arrow()
    rows = [None if v is None else parse_array_literal(unescape(v))[0] for v in strings.to_pylist()]
    lengths = pa.array([None if r is None else len(r) for r in rows], pa.int64())
    return rows, _common_width(name, lengths)


def _common_width(name: str, lengths: Any) -> int:
    """The one flattened length of all non-NULL arrays (0 when all are NULL)."""
    _, pc, _ = _arrow()
    valid = lengths.drop_null()
    if len(valid) == 0:
        return 0
    bounds = pc.min_max(valid)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low != high:
        raise InvalidArgument(
            f"Mismatched array length for feature `{name}`: rows have between {low} and {high} "
            "elements; every row must have the same (flattened) length"
        )
    return int(low)
