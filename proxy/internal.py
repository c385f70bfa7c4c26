"""The proxy's own queries on a client's upstream session: decoding their answers.

Owns: :class:`Exchange`, the sans-IO collector of the server's answer to one
internal simple Query (RowDescription, DataRows, CommandComplete, COPY IN
handshake, ErrorResponse, ReadyForQuery), and the :class:`Port` protocol the
rewriter uses to run such queries.

Must not: write to sockets. The session feeds frames in and sends what an
exchange asks for (COPY data); it runs exchanges only when the upstream owes
the client nothing, so every frame until the next ReadyForQuery is ours.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from proxy import protocol as pq
from proxy.errors import ProtocolViolation

_H = struct.Struct("!h")
_I = struct.Struct("!i")
_COPY_CHUNK = 256 * 1024


@dataclass
class Result:
    """Rows in text format, with column names and type OIDs."""

    columns: list[tuple[str, int]] = field(default_factory=list)
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    command: str = ""


class UpstreamError(Exception):
    """The server rejected an internal query; ``fields`` is its ErrorResponse, ``status`` the Z after it."""

    def __init__(self, fields: tuple[tuple[str, str], ...], status: str) -> None:
        super().__init__(dict(fields).get("M", "upstream error"))
        self.fields = fields
        self.status = status


class Port(Protocol):
    """What the rewriter may do on the client's own upstream session."""

    session_id: int
    tx_status: str
    database: str
    standard_strings: bool
    temp_tables: list[str]  # per-row result tables created for the statement being decided

    async def settled(self) -> None:
        """Until every ReadyForQuery owed has arrived (``tx_status`` is then current)."""
        ...

    async def query(self, sql: str, copy_data: bytes | None = None) -> Result:
        """Run one simple Query (with COPY FROM STDIN data if given); raises UpstreamError."""
        ...


def decode_row_description(raw: bytes) -> list[tuple[str, int]]:
    (count,) = _H.unpack_from(raw, 5)
    pos, columns = 7, []
    for _ in range(count):
        nul = raw.index(b"\0", pos)
        name = raw[pos:nul].decode()
        type_oid = _I.unpack_from(raw, nul + 7)[0]
        columns.append((name, type_oid))
        pos = nul + 19
    return columns


def decode_data_row(raw: bytes) -> tuple[str | None, ...]:
    (count,) = _H.unpack_from(raw, 5)
    pos = 7
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _I.unpack_from(raw, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(raw[pos : pos + length].decode())
            pos += length
    return tuple(values)


def copy_frames(data: bytes) -> list[bytes]:
    """CopyData messages for ``data`` followed by CopyDone."""
    frames = [pq.encode(b"d", data[i : i + _COPY_CHUNK]) for i in range(0, len(data), _COPY_CHUNK)]
    frames.append(pq.encode(b"c", b""))
    return frames


class Exchange:
    """Collects one internal query's answer. ``feed`` returns frames to send upstream (COPY data)."""

    def __init__(self, copy_data: bytes | None = None) -> None:
        self.result = Result()
        self.error: tuple[tuple[str, str], ...] | None = None
        self.status: str | None = None
        self._copy_data = copy_data
        self.forward: list[bytes] = []  # frames the client must still see (notifications, parameter changes)

    @property
    def done(self) -> bool:
        return self.status is not None

    def feed(self, frame: pq.Frame) -> list[bytes]:
        kind = chr(frame.type)
        match kind:
            case "T":
                self.result.columns = decode_row_description(frame.raw)
            case "D":
                self.result.rows.append(decode_data_row(frame.raw))
            case "C":
                self.result.command = frame.raw[5:-1].decode()
            case "E":
                self.error = self.error or pq.decode_error(frame).fields
            case "G":
                if self._copy_data is None:
                    return [pq.encode(b"f", b"pgml-proxy sent no COPY data\0")]
                data, self._copy_data = self._copy_data, None
                return copy_frames(data)
            case "A" | "S":
                self.forward.append(frame.raw)
            case "Z":
                self.status = chr(frame.raw[5])
            case "N" | "I" | "1" | "2" | "3" | "n":
                pass  # notices of our own statements are not the client's business
            case _:
                raise ProtocolViolation(f"unexpected message {kind!r} in an internal query")
        return []
