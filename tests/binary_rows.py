"""Rows of Python values as the CopyData messages of a binary ``COPY … TO STDOUT``, for building decoded tables.

What ``engine.pg.table.decode_copy_binary`` reads for each ``format_type()`` (numbers, booleans and text as
stored, numeric as float8, any other type as text, arrays of those: nested lists are dimensions), one message
per row as PostgreSQL sends them. Real server output is tested in test_copy_binary.py; this is for tests of
what comes after the decoding (snapshots, preprocessing).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from engine.pg import types
from engine.pg.copy import BINARY_HEADER, BINARY_TRAILER
from engine.pg.table import pg_type_of

_FORMS = {
    "float4": (types.FLOAT4, "!f"), "float8": (types.FLOAT8, "!d"), "numeric": (types.FLOAT8, "!d"),
    "int2": (types.INT2, "!h"), "int4": (types.INT4, "!i"), "int8": (types.INT8, "!q"), "bool": (types.BOOL, "!?"),
    "varchar": (types.VARCHAR, None), "bpchar": (types.BPCHAR, None),
}  # fmt: skip


def _form(type_name: str) -> tuple[int, str | None, bool]:
    pg_type, _, array = pg_type_of(type_name)
    oid, fmt = _FORMS.get(pg_type.removesuffix("[]"), (types.TEXT, None))
    return oid, fmt, array


def _scalar(value: Any, fmt: str | None) -> bytes:
    return str(value).encode() if fmt is None else struct.pack(fmt, value)


def _array(value: list[Any], oid: int, fmt: str | None) -> bytes:
    dims: list[int] = []
    level: Any = value
    while isinstance(level, list):
        dims.append(len(level))
        level = level[0] if level else None
    flat = _flatten(value)
    if not flat:
        return struct.pack("!iiI", 0, 0, oid)
    parts = [struct.pack("!iiI", len(dims), int(None in flat), oid)]
    parts += [struct.pack("!ii", n, 1) for n in dims]
    parts += [_field(None if v is None else _scalar(v, fmt)) for v in flat]
    return b"".join(parts)


def _flatten(value: list[Any]) -> list[Any]:
    return [e for v in value for e in (_flatten(v) if isinstance(v, list) else [v])]


def _field(data: bytes | None) -> bytes:
    return b"\xff\xff\xff\xff" if data is None else struct.pack("!i", len(data)) + data


def joined(messages: Sequence[bytes]) -> tuple[bytes, list[int]]:
    """Messages as a Result holds them: the data, and each message's length."""
    return b"".join(messages), [len(m) for m in messages]


def copy_messages(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> list[bytes]:
    """CopyData bodies: the header with the first row, one row each, the trailer alone."""
    forms = [_form(type_name) for _, type_name in columns]
    messages = []
    for row in rows:
        fields = [
            None if v is None else _array(v, oid, fmt) if array else _scalar(v, fmt)
            for v, (oid, fmt, array) in zip(row, forms, strict=True)
        ]
        messages.append(struct.pack("!h", len(fields)) + b"".join(map(_field, fields)))
    if not messages:
        return [BINARY_HEADER + BINARY_TRAILER]
    return [BINARY_HEADER + messages[0], *messages[1:], BINARY_TRAILER]
