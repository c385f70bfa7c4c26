"""Bound parameter values: the bytes of a Bind's parameters -> Python values, by type OID.

Owns: the type OIDs a parameter of a pgml call may have (:data:`PARAM_TYPES`, with the
SQL type each is read as), and reading a parameter's bytes in text or binary format
(``array_recv``'s layout for arrays) — with the server's own SQLSTATE for bytes that do
not fit: 22021 for text that is not UTF-8, 22P03 for bad binary data, 54000 beyond
:mod:`proxy.rewrite.text_format`' limits, 0A000 for a type the proxy does not read.

Must not: do I/O, or decide where a value goes (:mod:`proxy.rewrite.params` puts it
into the statement).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from proxy.errors import (
    DatatypeMismatch,
    FeatureNotSupported,
    InvalidBinaryRepresentation,
    InvalidParameterValue,
    ProgramLimitExceeded,
    ProxyError,
)
from proxy.rewrite.text_format import MAX_ARRAY_ELEMENTS, check_length, decode_utf8, from_text, parse_json
from proxy.wire.messages import Bind

# Type OID -> (SQL type name used for the literal, catalogue type for decoding).
PARAM_TYPES: dict[int, str] = {
    25: "text", 1043: "text", 1042: "text", 19: "text", 705: "text", 0: "text",
    3802: "jsonb", 114: "jsonb", 20: "bigint", 23: "bigint", 21: "bigint", 16: "boolean",
    700: "real", 701: "double precision", 1009: "text[]", 1015: "text[]", 1021: "real[]", 1022: "double precision[]",
    1016: "bigint[]", 1007: "bigint[]", 1005: "bigint[]", 199: "jsonb[]", 3807: "jsonb[]", 1000: "boolean[]",
}  # fmt: skip
ARRAY_ELEMENTS = {
    1009: 25, 1015: 1043, 1021: 700, 1022: 701, 1016: 20, 1007: 23, 1005: 21, 3807: 3802, 199: 114, 1000: 16,
}  # fmt: skip
FIRST_USER_OID = 16384  # FirstNormalObjectId: types created after initdb (enums, domains)
MAX_DIMENSIONS = 6  # PostgreSQL's MAXDIM


def bound_values(bind: Bind, oids: Sequence[int]) -> tuple[dict[int, tuple[Any, int]], dict[int, ProxyError]]:
    """Each ``$n``'s value and type OID, and the error of each one that cannot be read (raised where used)."""
    values: dict[int, tuple[Any, int]] = {}
    problems: dict[int, ProxyError] = {}
    for i, data in enumerate(bind.params):
        oid = oids[i] if i < len(oids) else 0
        try:
            code = bind.format_of(i)
            if code not in (0, 1):
                raise InvalidParameterValue(f"unsupported format code: {code}")
            values[i + 1] = (param_value(data, code == 1, oid, i + 1), oid)
        except ProxyError as exc:
            problems[i + 1] = exc
    return values, problems


def param_value(data: bytes | None, binary: bool, type_oid: int, number: int = 0) -> Any:
    """The Python value of one bound parameter (``number``: its 1-based position, for messages).

    Errors are the server's own for the same bytes: 22021 for text that is not UTF-8,
    22P03 for binary data that does not fit the type, 54000 beyond the size limits.
    """
    if data is None:
        return None
    check_length(len(data))
    kind = PARAM_TYPES.get(type_oid)
    if kind is None and type_oid >= FIRST_USER_OID and not binary:
        return decode_utf8(data)  # a user-defined type such as pgml's enums (algorithm, strategy…): its label
    if kind is None:
        raise FeatureNotSupported(f"pgml-proxy cannot read a parameter of type OID {type_oid} in a pgml call")
    if not binary:
        return from_text(decode_utf8(data), kind)
    try:
        return _binary(data, type_oid)
    except struct.error:
        raise InvalidBinaryRepresentation(f"incorrect binary data format in bind parameter {number}") from None


def _binary(data: bytes, type_oid: int) -> Any:
    match type_oid:
        case 25 | 1043 | 1042 | 19 | 705 | 0:
            return decode_utf8(data)
        case 114:
            return parse_json(decode_utf8(data))
        case 3802:
            if data[:1] != b"\1":
                raise InvalidBinaryRepresentation(f"unsupported jsonb version number {data[0] if data else 0}")
            return parse_json(decode_utf8(data[1:]))  # version byte 1, then the text
        case 20:
            return struct.unpack("!q", data)[0]
        case 23:
            return struct.unpack("!i", data)[0]
        case 21:
            return struct.unpack("!h", data)[0]
        case 16:
            return struct.unpack("!?", data)[0]
        case 700:
            return struct.unpack("!f", data)[0]
        case 701:
            return struct.unpack("!d", data)[0]
        case _ if type_oid in ARRAY_ELEMENTS:
            return _binary_array(data, ARRAY_ELEMENTS[type_oid])
    raise FeatureNotSupported(f"pgml-proxy cannot read a binary parameter of type OID {type_oid}")


def _binary_array(data: bytes, expected: int) -> list[Any]:
    """array_recv's format: dimensions, flags, element type, (length, lower bound) per dimension, elements."""
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
    if ndim != 1:
        raise FeatureNotSupported("multidimensional array parameters in pgml calls")
    (length, _lower) = struct.unpack_from("!ii", data, 12)
    if length < 0:
        raise InvalidBinaryRepresentation(f"invalid array length: {length}")
    if length > MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"a pgml argument array has more than the pgml-proxy limit of {MAX_ARRAY_ELEMENTS} elements"
        )
    if length > (len(data) - 20) // 4:  # each element has at least its length word
        raise struct.error("array shorter than its length")
    pos = 20
    out: list[Any] = []
    for _ in range(length):
        (size,) = struct.unpack_from("!i", data, pos)
        pos += 4
        if size == -1:
            out.append(None)
        elif size < 0 or pos + size > len(data):
            raise struct.error("element beyond the data")
        else:
            out.append(_binary(data[pos : pos + size], element))
            pos += size
    if pos != len(data):
        raise struct.error("trailing bytes")
    return out
