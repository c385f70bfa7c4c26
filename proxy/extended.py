"""Extended-protocol pieces for calls that depend on ``$n``: Bind decoding, parameter values, substitution.

Owns: the :class:`Bind` message (decode/encode), turning bound parameter bytes
(text or binary format) into Python values by type OID, and replacing ``$n``
references inside ``pgml.*`` call arguments with typed literals so the call
becomes constant.

Must not: do I/O, or substitute parameters outside pgml call arguments (the
rest of the statement keeps its ``$n`` and the server binds them as usual).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, visitors

from proxy import protocol as pq
from proxy.errors import FeatureNotSupported, ProtocolViolation
from proxy.literals import from_text, literal

# Type OID -> (SQL type name used for the literal, catalogue type for decoding).
PARAM_TYPES: dict[int, str] = {
    25: "text", 1043: "text", 1042: "text", 19: "text", 705: "text", 0: "text",
    3802: "jsonb", 114: "jsonb", 20: "bigint", 23: "bigint", 21: "bigint", 16: "boolean",
    700: "real", 701: "double precision", 1009: "text[]", 1015: "text[]", 1021: "real[]", 1022: "double precision[]",
    1016: "bigint[]", 1007: "bigint[]", 1005: "bigint[]", 199: "jsonb[]", 3807: "jsonb[]",
}  # fmt: skip
ARRAY_ELEMENTS = {1009: 25, 1015: 1043, 1021: 700, 1022: 701, 1016: 20, 1007: 23, 1005: 21, 3807: 3802, 199: 114}


FIRST_USER_OID = 16384  # FirstNormalObjectId: types created after initdb (enums, domains)


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def format_of(self, index: int) -> int:
        if not self.formats:
            return 0
        return self.formats[0] if len(self.formats) == 1 else self.formats[index]


def decode_bind(frame: pq.Frame) -> Bind:
    raw = frame.raw
    try:
        nul = raw.index(b"\0", 5)
        portal = raw[5:nul].decode()
        end = raw.index(b"\0", nul + 1)
        statement = raw[nul + 1 : end].decode()
        pos = end + 1
        (count,) = struct.unpack_from("!h", raw, pos)
        formats = struct.unpack_from(f"!{count}h", raw, pos + 2)
        pos += 2 + 2 * count
        (nparams,) = struct.unpack_from("!h", raw, pos)
        pos += 2
        params: list[bytes | None] = []
        for _ in range(nparams):
            (length,) = struct.unpack_from("!i", raw, pos)
            pos += 4
            if length < 0:
                params.append(None)
            else:
                params.append(raw[pos : pos + length])
                pos += length
        (rcount,) = struct.unpack_from("!h", raw, pos)
        result_formats = struct.unpack_from(f"!{rcount}h", raw, pos + 2)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolViolation("malformed Bind message") from exc
    return Bind(portal, statement, tuple(formats), tuple(params), tuple(result_formats))


def encode_bind(bind: Bind) -> bytes:
    parts = [bind.portal.encode() + b"\0", bind.statement.encode() + b"\0"]
    parts.append(struct.pack(f"!h{len(bind.formats)}h", len(bind.formats), *bind.formats))
    parts.append(struct.pack("!h", len(bind.params)))
    for value in bind.params:
        parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    parts.append(struct.pack(f"!h{len(bind.result_formats)}h", len(bind.result_formats), *bind.result_formats))
    return pq.encode(b"B", b"".join(parts))


def param_value(data: bytes | None, binary: bool, type_oid: int) -> Any:
    """The Python value of one bound parameter."""
    if data is None:
        return None
    kind = PARAM_TYPES.get(type_oid)
    if kind is None and type_oid >= FIRST_USER_OID and not binary:
        return data.decode()  # a user-defined type such as pgml's enums (algorithm, strategy…): its label
    if kind is None:
        raise FeatureNotSupported(f"pgml-proxy cannot read a parameter of type OID {type_oid} in a pgml call")
    if not binary:
        return from_text(data.decode(), kind)
    return _binary(data, type_oid)


def _binary(data: bytes, type_oid: int) -> Any:
    match type_oid:
        case 25 | 1043 | 1042 | 19 | 705 | 0:
            return data.decode()
        case 114:
            return json.loads(data.decode())
        case 3802:
            return json.loads(data[1:].decode())  # version byte 1, then the text
        case 20:
            return struct.unpack("!q", data)[0]
        case 23:
            return struct.unpack("!i", data)[0]
        case 21:
            return struct.unpack("!h", data)[0]
        case 16:
            return data != b"\0"
        case 700:
            return struct.unpack("!f", data)[0]
        case 701:
            return struct.unpack("!d", data)[0]
        case _ if type_oid in ARRAY_ELEMENTS:
            return _binary_array(data)
    raise FeatureNotSupported(f"pgml-proxy cannot read a binary parameter of type OID {type_oid}")


def _binary_array(data: bytes) -> list[Any]:
    ndim, _flags, element = struct.unpack_from("!iiI", data, 0)
    if ndim == 0:
        return []
    if ndim != 1:
        raise FeatureNotSupported("multidimensional array parameters in pgml calls")
    (length, _lower) = struct.unpack_from("!ii", data, 12)
    pos = 20
    out: list[Any] = []
    for _ in range(length):
        (size,) = struct.unpack_from("!i", data, pos)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(_binary(data[pos : pos + size], element))
            pos += size
    return out


def substitute_params(roots: Sequence[ast.Node], values: dict[int, tuple[Any, int]]) -> None:
    """Replace ``$n`` under ``roots`` by typed literals of the bound values (in place).

    Only numbers present in ``values`` are replaced; a root itself is never a ParamRef
    (callers pass FuncCall nodes or whole statements).
    """

    class Swap(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> Any:
            number = int(node.number or 0)
            if number not in values:
                return None
            value, oid = values[number]
            return literal(value, PARAM_TYPES.get(oid, "text"))

    for root in roots:
        Swap()(root)


def referenced_params(roots: Sequence[ast.Node]) -> set[int]:
    """The ``$n`` numbers used under ``roots``."""
    found: set[int] = set()

    class Find(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            found.add(int(node.number or 0))

    for root in roots:
        Find()(root)
    return found
