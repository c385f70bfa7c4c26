"""COPY data: the text and binary formats of ``COPY … FROM STDIN`` and ``COPY … TO STDOUT``, both ways.

Owns: COPY TEXT (tab-separated fields, one row per line, ``\\N`` for NULL, backslash escapes: written as
``\\\\ \\n \\r \\t``, read as ``\\b \\f \\n \\r \\t \\v \\ooo \\xhh`` and ``\\<char>``) and COPY BINARY
(the signature header, one tuple per row in ``engine.pg.binary``'s field layout, the trailer), and
where the rows of a ``COPY … TO STDOUT (FORMAT binary)`` start and end.

Must not: know the types of the fields (text here is each field's text representation, binary each
field's binary form: ``engine.pg.text`` and ``engine.pg.binary`` make and read those), talk to a
database, or decode COPY text into typed columns (``engine.pg.table`` does, fast).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from engine.api import InvalidBinaryRepresentation
from engine.pg.binary import decode_fields, encode_fields

NULL = "\\N"
END_OF_DATA = b"\\.\n"  # the end-of-data marker very old servers send after COPY TO STDOUT text
BINARY_HEADER = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)  # signature, flags, no header extension
BINARY_TRAILER = b"\xff\xff"  # a tuple of -1 fields
_COPY_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_COPY_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


# --------------------------------------------------------------------------- #
# Text format
# --------------------------------------------------------------------------- #


def copy_field(value: str | None) -> str:
    """One field of COPY TEXT: ``\\N`` for NULL, else the text with backslash, newline, CR and tab escaped."""
    if value is None:
        return NULL
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def encode_text(rows: Iterable[Sequence[str | None]]) -> bytes:
    """Rows of field texts (None: NULL) as COPY TEXT, one line per row."""
    return "".join("\t".join(map(copy_field, row)) + "\n" for row in rows).encode()


def _copy_escape(match: re.Match[bytes]) -> bytes:
    octal, hexa, char = match.groups()
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if hexa is not None:
        return bytes([int(hexa, 16)])
    return _COPY_SIMPLE.get(char, char)


def unescape(field: str) -> str:
    """Undo COPY TEXT backslash escapes (the server's encoding is assumed to be UTF-8)."""
    if "\\" not in field:
        return field
    return _COPY_ESCAPE.sub(_copy_escape, field.encode()).decode("utf-8", errors="replace")


def decode_text(data: bytes) -> list[tuple[str | None, ...]]:
    """COPY TEXT (as ``COPY … TO STDOUT`` sends it) -> rows of field texts (None: NULL)."""
    if data.endswith(END_OF_DATA):
        data = data[: -len(END_OF_DATA)]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [
        tuple(None if field == b"\\N" else unescape(field.decode()) for field in line.split(b"\t")) for line in lines
    ]


# --------------------------------------------------------------------------- #
# Binary format
# --------------------------------------------------------------------------- #


def encode_binary(rows: Iterable[Sequence[bytes | None]]) -> bytes:
    """Rows of fields in binary form (None: NULL) as COPY BINARY: header, one tuple per row, trailer."""
    return b"".join([BINARY_HEADER, *map(encode_fields, rows), BINARY_TRAILER])


def decode_binary(data: bytes) -> list[list[bytes | None]]:
    """COPY BINARY -> rows of fields in binary form (None: NULL); 22P03 when it is not COPY BINARY."""
    if not data.startswith(BINARY_HEADER[:11]):
        raise InvalidBinaryRepresentation("COPY file signature not recognized")
    try:
        (extension,) = struct.unpack_from("!i", data, 15)
        pos = 19 + extension
        rows: list[list[bytes | None]] = []
        while data[pos : pos + 2] != BINARY_TRAILER:
            fields, pos = decode_fields(data, pos)
            rows.append(fields)
    except struct.error:
        raise InvalidBinaryRepresentation("unexpected end of COPY BINARY data") from None
    return rows


def binary_row_spans(data: bytes, messages: Sequence[int]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Where each row of ``COPY … TO STDOUT (FORMAT binary)`` data starts and ends, from the lengths of the
    CopyData messages that brought it.

    PostgreSQL sends one CopyData message per row ("always one per row", protocol docs, COPY
    Operations): the header comes with the first row, the trailer alone (with the header when there
    are no rows). So the rows' bounds are the messages' bounds, found without reading a field;
    a reader that walks the fields checks that each row ends where its message does. 22P03 when
    the data is not COPY BINARY.
    """
    if sum(messages) != len(data):
        raise InvalidBinaryRepresentation("COPY data does not match its messages")
    if not data.startswith(BINARY_HEADER[:11]) or len(data) < 21:
        raise InvalidBinaryRepresentation("COPY file signature not recognized")
    if not data.endswith(BINARY_TRAILER):
        raise InvalidBinaryRepresentation("unexpected end of COPY BINARY data")
    (extension,) = struct.unpack_from("!i", data, 15)
    stops = np.cumsum(np.asarray(messages, np.int64))
    starts = np.concatenate((np.array([19 + extension], np.int64), stops[:-1]))
    stops[-1] -= len(BINARY_TRAILER)
    rows = stops > starts
    return starts[rows], stops[rows]
