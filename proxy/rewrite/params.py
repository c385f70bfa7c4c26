"""Extended-protocol pieces for calls that depend on ``$n``: Bind decoding, parameter values, substitution.

Owns: the :class:`Bind` message (decode/encode), turning bound parameter bytes
(text or binary format) into Python values by type OID — with the server's own
SQLSTATE for bytes that do not fit (22021 not UTF-8, 22P03 bad binary data, 54000
beyond :mod:`proxy.rewrite.literals`' limits) — and replacing ``$n`` references inside
``pgml.*`` call arguments with typed literals so the call becomes constant. A ``$n``
under an explicit cast (``$1::jsonb`` with ``$1`` bound as varchar, as pgjdbc binds
strings) becomes a literal of the cast's type, the value converted as the server's
cast would convert it (text input of the target type, number conversions).

Must not: do I/O, or substitute parameters outside pgml call arguments (the
rest of the statement keeps its ``$n`` and the server binds them as usual).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, visitors

from proxy.errors import (
    DatatypeMismatch,
    FeatureNotSupported,
    InvalidBinaryRepresentation,
    InvalidParameterValue,
    NumericValueOutOfRange,
    ProgramLimitExceeded,
    ProtocolViolation,
    ProxyError,
)
from proxy.rewrite.literals import literal
from proxy.rewrite.text_format import MAX_ARRAY_ELEMENTS, check_length, decode_utf8, from_text, parse_json
from proxy.wire import messages as pq

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
    """A Bind message; ProtocolViolation (08P01, as the server's own check) when it is malformed."""
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
        if nparams < 0 or count not in (0, 1, nparams):
            raise ProtocolViolation(f"bind message has {count} parameter formats but {nparams} parameters")
        params: list[bytes | None] = []
        for _ in range(nparams):
            (length,) = struct.unpack_from("!i", raw, pos)
            pos += 4
            if length == -1:
                params.append(None)
            elif length < 0 or pos + length > len(raw):
                raise ProtocolViolation("insufficient data left in message")
            else:
                params.append(raw[pos : pos + length])
                pos += length
        (rcount,) = struct.unpack_from("!h", raw, pos)
        result_formats = struct.unpack_from(f"!{rcount}h", raw, pos + 2)
        if pos + 2 + 2 * rcount != len(raw):
            raise ProtocolViolation("invalid message format")
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolViolation("malformed Bind message") from exc
    return Bind(portal, statement, tuple(formats), tuple(params), tuple(result_formats))


def bound_statement(frame: pq.Frame) -> str | None:
    """The statement a Bind names, None when the message is malformed (the server then rejects it itself)."""
    try:
        return decode_bind(frame).statement
    except ProtocolViolation:
        return None


def encode_bind(bind: Bind) -> bytes:
    parts = [bind.portal.encode() + b"\0", bind.statement.encode() + b"\0"]
    parts.append(struct.pack(f"!h{len(bind.formats)}h", len(bind.formats), *bind.formats))
    parts.append(struct.pack("!h", len(bind.params)))
    for value in bind.params:
        parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    parts.append(struct.pack(f"!h{len(bind.result_formats)}h", len(bind.result_formats), *bind.result_formats))
    return pq.encode(b"B", b"".join(parts))


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


MAX_DIMENSIONS = 6  # PostgreSQL's MAXDIM


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


def substitute_params(roots: Sequence[ast.Node], values: dict[int, tuple[Any, int]]) -> None:
    """Replace ``$n`` under ``roots`` by typed literals of the bound values (in place).

    ``$n::type`` becomes one literal of ``type`` when the server's cast from the parameter's type
    is one :func:`cast_value` performs (text input, numbers); otherwise ``$n`` becomes a literal of
    its own type under the cast. Only numbers present in ``values`` are replaced; a root itself is
    never a ParamRef (callers pass FuncCall nodes or whole statements).
    """

    class Swap(visitors.Visitor):
        def visit_TypeCast(self, ancestors: Any, node: ast.TypeCast) -> Any:
            names: list[ast.TypeName | None] = []  # the casts around the parameter, outermost first
            inner: Any = node
            while isinstance(inner, ast.TypeCast):
                names.append(inner.typeName)
                inner = inner.arg
            if not isinstance(inner, ast.ParamRef) or int(inner.number or 0) not in values:
                return None
            value, oid = values[int(inner.number or 0)]
            kind = PARAM_TYPES.get(oid, "text")
            for done, name in enumerate(reversed(names)):  # innermost first, as the server applies them
                target = cast_target(name) or ""
                converted = cast_value(value, kind, target) if target else NOT_CAST
                if converted is NOT_CAST:  # this cast and those around it stay, over the value so far
                    result: ast.Node = literal(value, kind)
                    for outer in names[len(names) - done - 1 :: -1]:
                        result = ast.TypeCast(arg=result, typeName=outer)
                    return result
                value, kind = converted, target
            return literal(value, kind)

        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> Any:
            number = int(node.number or 0)
            if number not in values:
                return None
            value, oid = values[number]
            return literal(value, PARAM_TYPES.get(oid, "text"))

    for root in roots:
        Swap()(root)


# The target of an explicit cast, spelled as the parser leaves it (``pg_catalog.int4``), in the type names
# of :mod:`proxy.rewrite.literals`. Types with a modifier (``varchar(3)`` truncates) and other types are left alone.
_CAST_TARGETS = {
    "text": "text", "varchar": "text", "jsonb": "jsonb", "int8": "bigint", "int4": "integer", "int2": "smallint",
    "float4": "real", "float8": "double precision", "bool": "boolean",
}  # fmt: skip
_INTEGERS = {"bigint": 1 << 63, "integer": 1 << 31, "smallint": 1 << 15}
_FLOATS = ("real", "double precision")
NOT_CAST: Any = object()  # a conversion cast_value leaves to the server


def cast_target(name: ast.TypeName | None) -> str | None:
    """The type of ``CAST(x AS name)`` in :mod:`proxy.rewrite.literals`' names (None: one not handled here)."""
    if name is None or name.typmods or name.setof or name.pct_type:
        return None
    names = [n.sval for n in name.names or () if isinstance(n, ast.String)]
    if len(names) == 2 and names[0] == "pg_catalog":
        names = names[1:]
    if len(names) != 1 or names[0] not in _CAST_TARGETS:
        return None
    bounds = name.arrayBounds or ()
    if len(bounds) > 1:
        return None
    return _CAST_TARGETS[names[0]] + ("[]" if bounds else "")


def cast_value(value: Any, source: str, target: str) -> Any:
    """``value`` of type ``source`` cast explicitly to ``target`` as PostgreSQL casts it, else NOT_CAST.

    Text to anything is the target's text input (``'{"a": 1}'::text::jsonb``, ``'7'::varchar::int8``);
    numbers convert between themselves (rounding half to even into integers, range-checked with
    22003) and with boolean (the server has that cast for int4 only, and it prepared the statement,
    so an integer reaching here is one). Arrays cast element by element.
    """
    if value is None:
        return None
    if source == target or (source in _INTEGERS and target in _INTEGERS):
        return _checked(value, target)
    if source == "text":
        return from_text(value, target)  # the cast of text to any type is the type's input function
    if source.endswith("[]") and target.endswith("[]"):
        elements = [cast_value(v, source[:-2], target[:-2]) for v in value]
        return NOT_CAST if any(v is NOT_CAST for v in elements) else elements
    if target == "text" and source in _INTEGERS:
        return str(value)
    if target == "text" and source == "boolean":
        return "true" if value else "false"
    if source in _INTEGERS and target in _FLOATS:
        return _checked(float(value), target)
    if source in _FLOATS and target in _INTEGERS:
        if value != value or value in (float("inf"), float("-inf")):
            raise NumericValueOutOfRange(f"{target} out of range")
        return _checked(round(value), target)
    if source in _FLOATS and target in _FLOATS:
        return _checked(value, target)
    if source in _INTEGERS and target == "boolean":  # only int4 has this cast: the server let the statement through
        return value != 0
    if source == "boolean" and target in _INTEGERS:
        return int(value)
    return NOT_CAST


def _checked(value: Any, sql_type: str) -> Any:
    """``value`` within the range of ``sql_type`` (22003 beyond, as the server's casts report it)."""
    if sql_type in _INTEGERS and not -_INTEGERS[sql_type] <= value < _INTEGERS[sql_type]:
        raise NumericValueOutOfRange(f"{sql_type} out of range")
    if sql_type == "real" and isinstance(value, float) and value == value and abs(value) != float("inf"):
        try:
            return struct.unpack("!f", struct.pack("!f", value))[0]
        except OverflowError:
            raise NumericValueOutOfRange("value out of range: overflow") from None
    return value


def referenced_params(roots: Sequence[ast.Node]) -> set[int]:
    """The ``$n`` numbers used under ``roots``."""
    found: set[int] = set()

    class Find(visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            found.add(int(node.number or 0))

    for root in roots:
        Find()(root)
    return found
