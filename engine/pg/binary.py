"""The binary form of PostgreSQL values, and the field layout of a row (DataRow, binary COPY tuple).

Owns: reading a value sent in binary format by type OID (``*_recv``: text, json/jsonb, integers, floats,
booleans, arrays of those; the types in :data:`READABLE`) with the server's own SQLSTATE for bytes that do
not fit, and many same-shaped numeric arrays at once into one numpy matrix (:func:`numeric_matrix`,
:func:`numeric_rows`);
writing the binary form the engine and the proxy send (:data:`SEND` by SQL type: numbers, booleans, text,
jsonb, ``real[]`` packed by numpy); and the fields of a row
— a 16-bit count, then per field a 32-bit length (-1: NULL) and its bytes — as binary COPY tuples (and
DataRow messages) carry them.

Must not: frame or decode protocol messages (``proxy.wire.messages`` decodes DataRow and RowDescription)
or COPY streams (``engine.pg.copy``): functions here take bytes and where the fields start.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engine.api import DatatypeMismatch, InvalidBinaryRepresentation, NotSupported, ProgramLimitExceeded
from engine.pg import types
from engine.pg.scalars import MAX_ARRAY_ELEMENTS, decode_utf8, parse_json

MAX_DIMENSIONS = 6  # PostgreSQL's MAXDIM
_H = struct.Struct("!h")
_I = struct.Struct("!i")
NULL_FIELD = b"\xff\xff\xff\xff"  # the length -1 of a NULL field
_JSONB_VERSION = b"\x01"  # jsonb_send: this byte, then the text


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #


# Column types whose binary form binary_value reads (result columns: the type of a parameter left unstated is
# never one).
READABLE = frozenset(
    {types.TEXT, types.VARCHAR, types.BPCHAR, types.NAME, types.JSON, types.JSONB, types.INT2, types.INT4,
     types.INT8, types.BOOL, types.FLOAT4, types.FLOAT8, *types.ELEMENTS}
)  # fmt: skip


def binary_value(data: bytes, type_oid: int) -> Any:
    """The Python value of ``data``, a value of type ``type_oid`` in binary format.

    Raises ``struct.error`` when the bytes are too short or too long for the type (the caller names the
    value: ``incorrect binary data format in bind parameter n``, 22P03), and the server's own error
    otherwise: 22021 for text that is not UTF-8, 22P03 / 42804 / 54000 for bad arrays, 0A000 for a type
    without a binary reader here.
    """
    match type_oid:
        case types.TEXT | types.VARCHAR | types.BPCHAR | types.NAME | types.UNKNOWN | types.UNSPECIFIED:
            return decode_utf8(data)
        case types.JSON:
            return parse_json(decode_utf8(data))
        case types.JSONB:
            if data[:1] != _JSONB_VERSION:
                raise InvalidBinaryRepresentation(f"unsupported jsonb version number {data[0] if data else 0}")
            return parse_json(decode_utf8(data[1:]))  # version byte 1, then the text
        case types.INT8:
            return struct.unpack("!q", data)[0]
        case types.INT4:
            return struct.unpack("!i", data)[0]
        case types.INT2:
            return struct.unpack("!h", data)[0]
        case types.BOOL:
            return struct.unpack("!?", data)[0]
        case types.FLOAT4:
            return struct.unpack("!f", data)[0]
        case types.FLOAT8:
            return struct.unpack("!d", data)[0]
        case _ if type_oid in types.ELEMENTS:
            return binary_array(data, types.ELEMENTS[type_oid])
    raise NotSupported(f"pgml-proxy cannot read a binary parameter of type OID {type_oid}")


def binary_array(data: bytes, expected: int, flatten: bool = False) -> list[Any]:
    """A one-dimensional array in array_recv's format (dimensions, flags, element type, (length, lower
    bound) per dimension, elements) whose elements are of type ``expected``; errors as :func:`binary_value`.
    ``flatten``: any number of dimensions, the elements in order (as a column's feature matrix is read)."""
    ndim, flags, element = struct.unpack_from("!iiI", data, 0)
    if ndim < 0:
        raise InvalidBinaryRepresentation(f"invalid number of dimensions: {ndim}")
    if ndim > MAX_DIMENSIONS:
        raise ProgramLimitExceeded(
            f"number of array dimensions ({ndim}) exceeds the maximum allowed ({MAX_DIMENSIONS})"
        )
    if flags not in (0, 1):
        raise InvalidBinaryRepresentation("invalid array flags")
    if element != expected:
        raise DatatypeMismatch(f"binary data has array element type {element} instead of expected {expected}")
    if ndim == 0:
        if len(data) != 12:
            raise struct.error("trailing bytes")
        return []
    if ndim != 1 and not flatten:
        raise NotSupported("multidimensional array parameters in pgml calls")
    length = 1
    for dimension in range(ndim):
        length *= struct.unpack_from("!i", data, 12 + 8 * dimension)[0]
    if length < 0:
        raise InvalidBinaryRepresentation(f"invalid array length: {length}")
    if length > MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"a pgml argument array has more than the pgml-proxy limit of {MAX_ARRAY_ELEMENTS} elements"
        )
    pos = 12 + 8 * ndim
    if length > (len(data) - pos) // 4:  # each element has at least its length word
        raise struct.error("array shorter than its length")
    out: list[Any] = []
    for _ in range(length):
        (size,) = struct.unpack_from("!i", data, pos)
        pos += 4
        if size == -1:
            out.append(None)
        elif size < 0 or pos + size > len(data):
            raise struct.error("element beyond the data")
        else:
            out.append(binary_value(data[pos : pos + size], element))
            pos += size
    if pos != len(data):
        raise struct.error("trailing bytes")
    return out


# Element types whose arrays :func:`numeric_matrix` reads, with their big-endian numpy types.
NUMERIC_ELEMENTS = {types.FLOAT4: ">f4", types.FLOAT8: ">f8", types.INT2: ">i2", types.INT4: ">i4", types.INT8: ">i8"}


def numeric_matrix(values: Sequence[bytes], array_oid: int) -> np.ndarray | None:
    """Binary one-dimensional numeric arrays of one length, without NULLs, as the rows of one native-endian
    matrix, read by numpy in one pass (None: another shape — ragged, NULL elements, empty, not numeric —
    for :func:`binary_value` to read one by one, with its errors)."""
    if not values or any(len(v) != len(values[0]) for v in values):
        return None
    return numeric_rows(b"".join(values), len(values[0]), array_oid)


def numeric_rows(joined: bytes | np.ndarray, size: int, array_oid: int) -> np.ndarray | None:
    """:func:`numeric_matrix` of arrays already joined: ``joined`` holds binary arrays of ``size`` bytes each,
    one after another (a column's fields gathered from many rows at once)."""
    element = types.ELEMENTS.get(array_oid)
    big = NUMERIC_ELEMENTS.get(element) if element is not None else None
    if big is None or not len(joined):
        return None
    width = np.dtype(big).itemsize
    count, rest = divmod(size - 20, 4 + width)
    if count <= 0 or rest or len(joined) % size:
        return None
    layout = np.dtype([("head", ">i4", 5), ("items", [("size", ">i4"), ("value", big)], count)])
    data = np.frombuffer(joined, dtype=layout)
    head = data["head"]
    expected = np.array([1, 0, element, count, head[0, 4]], dtype=np.int64)  # 1 dimension, no NULLs, lower bound
    if not (head == expected).all() or not (data["items"]["size"] == width).all():
        return None
    return data["items"]["value"].astype(big[1:])


def send_text(value: str) -> bytes:
    """text_send: the UTF-8 bytes."""
    return value.encode()


def send_jsonb(text: str) -> bytes:
    """jsonb_send of a JSON text: the version byte 1, then the text."""
    return _JSONB_VERSION + text.encode()


def send_real_array(values: Any) -> bytes:
    """array_send of a one-dimensional ``real[]`` without NULLs: the vector packed by numpy, not printed."""
    floats = np.asarray(values, dtype=np.float32)
    pairs = np.empty(len(floats), dtype=[("size", ">i4"), ("value", ">f4")])
    pairs["size"], pairs["value"] = 4, floats
    # array header: 1 dimension, no NULLs, element type float4, length, lower bound 1
    return struct.pack("!iiIii", 1, 0, types.FLOAT4, len(floats), 1) + pairs.tobytes()


# SQL type -> its send function: the binary form of a Python value of that type (a JSON value as written by
# json.dumps; jsonb_in normalises it).
SEND: dict[str, Callable[[Any], bytes]] = {
    "real": struct.Struct("!f").pack,
    "double precision": struct.Struct("!d").pack,
    "bigint": struct.Struct("!q").pack,
    "integer": struct.Struct("!i").pack,
    "boolean": struct.Struct("!?").pack,
    "real[]": send_real_array,
    "text": lambda value: send_text(str(value)),
    "jsonb": lambda value: send_jsonb(json.dumps(value, ensure_ascii=False, allow_nan=False)),
}


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #


def encode_fields(fields: Sequence[bytes | None]) -> bytes:
    """A row's fields: the count, then each field's length (-1: NULL) and bytes."""
    parts = [_H.pack(len(fields))]
    for field in fields:
        parts.append(NULL_FIELD if field is None else _I.pack(len(field)) + field)
    return b"".join(parts)


def decode_fields(data: bytes, pos: int = 0) -> tuple[list[bytes | None], int]:
    """The fields of the row at ``data[pos:]`` and where it ends (``struct.error`` when it is cut short)."""
    (count,) = _H.unpack_from(data, pos)
    pos += 2
    fields: list[bytes | None] = []
    for _ in range(count):
        (length,) = _I.unpack_from(data, pos)
        pos += 4
        if length < 0:
            fields.append(None)
        else:
            if pos + length > len(data):
                raise struct.error("field beyond the data")
            fields.append(data[pos : pos + length])
            pos += length
    return fields, pos
