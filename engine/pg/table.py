"""A relation's rows, read with ``COPY … TO STDOUT (FORMAT binary)``, decoded column-wise into numpy arrays.

Owns: the mapping from ``format_type()`` spellings to PostgresML's type names (``udt_name``
style: ``float4``, ``int2[]``, ``varchar``…); the SELECT list that copies each column in a form
read here (numbers, booleans, text, varchar and char as stored, ``numeric`` as ``float8``, any
other type as its text); and :class:`Table`, the decoded result.

Numbers, booleans and numeric/boolean arrays become float64 numpy arrays (NaN for NULL,
plus a row NULL mask); text-like values (text, varchar, char, json, jsonb and any type
not known here) stay Python strings.

Strategy: no value is decoded by Python code. ``engine.pg.fields`` finds each column's fields
for all rows at once; fixed-width values are read by numpy straight from the bytes, array
elements the same way (rows with NULL elements element by element, all such rows at once),
and text bytes are gathered into one buffer that pyarrow turns into strings.

Must not: know about snapshots, preprocessing or models, talk to a database, or guess
types from the data (the caller passes ``format_type()`` of every column).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from numpy.typing import NDArray

from engine.api import DatatypeMismatch, EngineError, InvalidArgument
from engine.pg import types
from engine.pg.binary import MAX_DIMENSIONS
from engine.pg.fields import Fields, Positions, gather, read_fields, strings, words
from engine.pg.text import quote_ident

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


@dataclass(frozen=True)
class _Read:
    """How a column (or each element of an array column) is copied and read."""

    cast: str | None  # the SQL type it is copied as; None: as stored
    element: int  # the type OID of the values read (array elements)
    dtype: str | None  # the numpy dtype of a fixed-width value; None: UTF-8 text


_READS = {
    "float4": _Read(None, types.FLOAT4, ">f4"),
    "float8": _Read(None, types.FLOAT8, ">f8"),
    "int2": _Read(None, types.INT2, ">i2"),
    "int4": _Read(None, types.INT4, ">i4"),
    "int8": _Read(None, types.INT8, ">i8"),
    "bool": _Read(None, types.BOOL, "?"),
    # numeric_send is base-10000 digits; the server's own float8 cast reads them as the text path did.
    "numeric": _Read("float8", types.FLOAT8, ">f8"),
    "text": _Read(None, types.TEXT, None),
    "varchar": _Read(None, types.VARCHAR, None),
    "bpchar": _Read(None, types.BPCHAR, None),  # blank-padded, as the server prints it (a cast to text trims)
}
_AS_TEXT = _Read("text", types.TEXT, None)  # json, jsonb, dates, enums, domains, …: their text


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


def _read_of(type_name: str) -> tuple[_Read, bool]:
    pg_type, kind, array = pg_type_of(type_name)
    read = _READS.get(pg_type.removesuffix("[]"), _AS_TEXT)
    return (read if kind != "text" or read.dtype is None else _AS_TEXT), array


def copy_select_list(columns: Sequence[tuple[str, str]]) -> str:
    """The SELECT list of the COPY that :func:`decode_copy_binary` reads: each (name, ``format_type()``) column,
    cast where it is not read as stored."""
    items = []
    for name, type_name in columns:
        read, array = _read_of(type_name)
        column = quote_ident(name)
        items.append(column if read.cast is None else f"CAST({column} AS {read.cast}{'[]' if array else ''})")
    return ", ".join(items)


def decode_column(fields: Fields, index: int, name: str, type_name: str) -> Column:
    """Column ``index`` of ``fields`` decoded as ``type_name`` (a ``format_type()`` spelling, read as stored)."""
    try:
        return _decode_column(fields.buf, name, type_name, fields.at[index], fields.lengths[index])
    except IndexError:
        raise EngineError("malformed COPY data: a field beyond the data") from None


def decode_copy_binary(data: bytes, messages: Sequence[int], columns: Sequence[tuple[str, str]]) -> Table:
    """Decode ``COPY (SELECT <copy_select_list(columns)> …) TO STDOUT (FORMAT binary)`` data, which came in
    CopyData messages of the lengths ``messages`` (:attr:`engine.api.Result.copy_rows`).

    ``columns`` lists (name, ``format_type()``) for every output column, in order.
    Raises :class:`InvalidArgument` when an array column's rows have different flattened
    lengths, :class:`EngineError` (22P03 …) when the data is not rows of those columns.
    """
    fields = read_fields(data, messages, len(columns))
    decoded = [decode_column(fields, i, name, type_name) for i, (name, type_name) in enumerate(columns)]
    return Table(decoded, fields.num_rows)


# --------------------------------------------------------------------------- #
# Columns
# --------------------------------------------------------------------------- #


def _decode_column(buf: NDArray[np.uint8], name: str, type_name: str, at: Positions, lengths: Positions) -> Column:
    pg_type, kind, array = pg_type_of(type_name)
    read, _ = _read_of(type_name)
    nulls = lengths < 0
    values: FloatArray | list[str | None] | list[TextArrayRow | None]
    shape: tuple[int, ...] = ()
    width = 1
    if array:
        values, shape = _arrays(buf, name, read, at, lengths)
        width = int(np.prod(shape)) if shape else 0
    elif read.dtype is None:
        values = strings(buf, at, lengths)
    else:
        if np.any((lengths != np.dtype(read.dtype).itemsize) & ~nulls):
            raise EngineError(f"malformed COPY data: column {name!r} is not {type_name}")
        if nulls.any():
            values = np.full(len(at), np.nan)
            values[~nulls] = words(buf, at[~nulls], read.dtype)
        else:
            values = words(buf, at, read.dtype).astype(np.float64)
    return Column(name, type_name, pg_type, kind, array, values, nulls, shape, width)


def _arrays(
    buf: NDArray[np.uint8], name: str, read: _Read, at: Positions, lengths: Positions
) -> tuple[FloatArray | list[TextArrayRow | None], tuple[int, ...]]:
    """Array values (array_send: dimensions, has-NULLs flag, element type, (length, lower bound) per dimension,
    then each element's length and bytes) -> flattened rows, and the shape of the first."""
    present = np.flatnonzero(lengths >= 0)
    start = at[present]
    ndim, flags = words(buf, start, ">i4").astype(np.int64), words(buf, start + 4, ">i4")
    if np.any((ndim < 0) | (ndim > MAX_DIMENSIONS) | ((flags != 0) & (flags != 1))):
        raise EngineError(f"malformed COPY data: column {name!r} holds no arrays")
    if np.any(words(buf, start + 8, ">u4") != read.element):
        raise DatatypeMismatch(f"COPY data of column {name!r} has another array element type")
    counts = np.where(ndim > 0, 1, 0)
    shape: tuple[int, ...] = () if len(start) == 0 else (0,) if ndim[0] == 0 else ()
    for d in range(int(ndim.max(initial=0))):
        deep = ndim > d
        sizes = np.ones(len(start), np.int64)
        sizes[deep] = words(buf, start[deep] + 12 + 8 * d, ">i4")
        counts *= sizes
        shape += (int(sizes[0]),) if deep[0] else ()
    width = _common_width(name, counts)
    elements = start + 12 + 8 * ndim
    if read.dtype is None:
        return _text_arrays(buf, len(at), present, elements, width), shape
    out = np.full((len(at), width), np.nan)
    if width:
        plain = flags == 0
        size = np.dtype(read.dtype).itemsize
        if np.any(plain & (lengths[present] != 12 + 8 * ndim + width * (4 + size))):
            raise EngineError(f"malformed COPY data: column {name!r} is not an array of {width} {read.dtype} values")
        # No NULL element: each element is its length word and value, one after the other, in one block.
        blocks = gather(buf, elements[plain], np.full(int(plain.sum()), width * (4 + size)))
        pairs = np.ascontiguousarray(blocks.reshape(-1, width, 4 + size)[:, :, 4:])
        out[present[plain]] = pairs.view(read.dtype).reshape(-1, width)
        _walk_elements(buf, name, read.dtype, out, present[~plain], elements[~plain])
    return out, shape


def _walk_elements(
    buf: NDArray[np.uint8], name: str, dtype: str, out: FloatArray, rows: NDArray[np.intp], pos: Positions
) -> None:
    """Arrays with NULL elements: element by element, for all such rows at once."""
    for j in range(out.shape[1]):
        sizes = words(buf, pos, ">i4").astype(np.int64)
        has = sizes >= 0
        if np.any(has & (sizes != np.dtype(dtype).itemsize)):
            raise EngineError(f"malformed COPY data: column {name!r} has an element that is not {dtype}")
        out[rows[has], j] = words(buf, pos[has] + 4, dtype)
        pos = pos + 4 + np.maximum(sizes, 0)


def _text_arrays(
    buf: NDArray[np.uint8], n: int, present: NDArray[np.intp], elements: Positions, width: int
) -> list[TextArrayRow | None]:
    """Text array rows: the elements' (position, length) walked for all rows at once, then read as one."""
    at = np.empty((len(present), width), np.int64)
    sizes = np.empty((len(present), width), np.int64)
    pos = elements
    for j in range(width):
        sizes[:, j] = words(buf, pos, ">i4")
        at[:, j] = pos + 4
        pos = pos + 4 + np.maximum(sizes[:, j], 0)
    flat = strings(buf, at.reshape(-1), sizes.reshape(-1))
    out: list[TextArrayRow | None] = [None] * n
    for k, row in enumerate(present.tolist()):
        out[row] = flat[k * width : (k + 1) * width]
    return out


def _common_width(name: str, counts: Positions) -> int:
    """The one flattened length of all non-NULL arrays (0 when all are NULL)."""
    if len(counts) == 0:
        return 0
    low, high = int(counts.min()), int(counts.max())
    if low != high:
        raise InvalidArgument(
            f"Mismatched array length for feature `{name}`: rows have between {low} and {high} "
            "elements; every row must have the same (flattened) length"
        )
    return low
