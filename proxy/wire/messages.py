"""PostgreSQL v3 messages: every message the proxy reads or writes, decoded and encoded here.

Owns: one frozen dataclass per message, named as in the PostgreSQL documentation
("Message Formats"), each with its type byte (``TYPE``), its decoder
(``Message.decode(frame)``) and its encoder (``message.encode()``, the whole frame);
the tables of message classes by type byte for each direction (:data:`FRONTEND`,
:data:`BACKEND`: the same byte means different messages in each); and the few
helpers that build or rebuild part of a message (SASL offers, ErrorResponse fields).

Must not: import asyncio or sockets, keep per-connection state, or be called for
messages the proxy only relays — those travel as raw frames (:mod:`proxy.wire.frames`),
so the relay costs little.

Every decoder raises :class:`proxy.errors.ProtocolViolation` (SQLSTATE 08P01) on
malformed input; any other exception escaping from here is a bug.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Protocol, Self, TypeVar

from proxy.errors import ProtocolViolation, error_fields
from proxy.wire.frames import Backend, Frame, Frontend, pack

# Authentication request codes (the int32 after the type byte of an Authentication message).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_COLUMN = struct.Struct("!IhIhih")  # table OID, attribute number, type OID, type size, type modifier, format


def _cstring(raw: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated UTF-8 string at ``pos``, and the position after it."""
    nul = raw.find(b"\0", pos)
    if nul < 0:
        raise ProtocolViolation("unterminated string in message")
    try:
        return raw[pos:nul].decode("utf-8"), nul + 1
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid UTF-8 in message") from exc


def _z(text: str) -> bytes:
    return text.encode() + b"\0"


def _strings(frame: Frame, count: int, what: str) -> list[str]:
    """A body of exactly ``count`` strings (``what``: the message, for the error)."""
    out, pos = [], 5
    for _ in range(count):
        text, pos = _cstring(frame.raw, pos)
        out.append(text)
    if pos != len(frame.raw):
        raise ProtocolViolation(f"malformed {what} message")
    return out


def _oids(types: tuple[int, ...]) -> bytes:
    return struct.pack(f"!h{len(types)}I", len(types), *types)


class _Message:
    """Common to every message: the frame is the type byte, the length and :meth:`body`."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return pack(self.TYPE, self.body())


class _Empty(_Message):
    """A message with no body."""

    __slots__ = ()

    @classmethod
    def decode(cls, frame: Frame) -> Self:
        if len(frame.raw) != 5:
            raise ProtocolViolation(f"malformed {cls.__name__} message")
        return cls()


class Target(StrEnum):
    """What a Describe or Close names: a prepared statement or a portal."""

    STATEMENT = "S"
    PORTAL = "P"


@dataclass(frozen=True, slots=True)
class _Named(_Message):
    """Describe and Close: a target kind and its name."""

    target: Target
    name: str

    def body(self) -> bytes:
        return self.target.encode() + _z(self.name)

    @classmethod
    def decode(cls, frame: Frame) -> Self:
        raw = frame.raw
        if raw[5:6] not in (b"S", b"P"):
            raise ProtocolViolation(f"invalid {cls.__name__} message subtype {raw[5:6]!r}")
        name, pos = _cstring(raw, 6)
        if pos != len(raw):
            raise ProtocolViolation(f"malformed {cls.__name__} message")
        return cls(Target(chr(raw[5])), name)


# --------------------------------------------------------------------------- #
# Frontend messages
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Query(_Message):
    """A simple-protocol query string."""

    sql: str
    TYPE = Frontend.QUERY

    def body(self) -> bytes:
        return _z(self.sql)

    @classmethod
    def decode(cls, frame: Frame) -> Query:
        return cls(*_strings(frame, 1, cls.__name__))


@dataclass(frozen=True, slots=True)
class Parse(_Message):
    """Statement name, SQL and the declared parameter type OIDs (0: unspecified)."""

    name: str
    sql: str
    param_types: tuple[int, ...]
    TYPE = Frontend.PARSE

    def body(self) -> bytes:
        return _z(self.name) + _z(self.sql) + _oids(self.param_types)

    @classmethod
    def decode(cls, frame: Frame) -> Parse:
        raw = frame.raw
        name, pos = _cstring(raw, 5)
        sql, pos = _cstring(raw, pos)
        count = _I16.unpack_from(raw, pos)[0] if len(raw) - pos >= 2 else -1
        if count < 0 or len(raw) - pos - 2 != 4 * count:
            raise ProtocolViolation("malformed Parse message")
        return cls(name, sql, struct.unpack_from(f"!{count}I", raw, pos + 2))


@dataclass(frozen=True, slots=True)
class Bind(_Message):
    """A portal over a prepared statement: parameter format codes and values (None: NULL), result formats."""

    portal: str
    statement: str
    formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]
    TYPE = Frontend.BIND

    def format_of(self, index: int) -> int:
        """The format code of parameter ``index`` (none given: text; one: that one for all)."""
        if not self.formats:
            return 0
        return self.formats[0] if len(self.formats) == 1 else self.formats[index]

    def body(self) -> bytes:
        formats, results = self.formats, self.result_formats
        parts = [_z(self.portal), _z(self.statement), struct.pack(f"!h{len(formats)}h", len(formats), *formats)]
        parts.append(_I16.pack(len(self.params)))
        for value in self.params:
            parts.append(_I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
        parts.append(struct.pack(f"!h{len(results)}h", len(results), *results))
        return b"".join(parts)

    @classmethod
    def decode(cls, frame: Frame) -> Bind:
        """Malformed: ProtocolViolation with the server's own message where it has one."""
        raw = frame.raw
        try:
            nul = raw.index(b"\0", 5)
            portal = raw[5:nul].decode()
            end = raw.index(b"\0", nul + 1)
            statement = raw[nul + 1 : end].decode()
            pos = end + 1
            (count,) = _I16.unpack_from(raw, pos)
            formats = struct.unpack_from(f"!{count}h", raw, pos + 2)
            pos += 2 + 2 * count
            (nparams,) = _I16.unpack_from(raw, pos)
            pos += 2
            if nparams < 0 or count not in (0, 1, nparams):
                raise ProtocolViolation(f"bind message has {count} parameter formats but {nparams} parameters")
            params: list[bytes | None] = []
            for _ in range(nparams):
                (length,) = _I32.unpack_from(raw, pos)
                pos += 4
                if length == -1:
                    params.append(None)
                elif length < 0 or pos + length > len(raw):
                    raise ProtocolViolation("insufficient data left in message")
                else:
                    params.append(raw[pos : pos + length])
                    pos += length
            (rcount,) = _I16.unpack_from(raw, pos)
            result_formats = struct.unpack_from(f"!{rcount}h", raw, pos + 2)
            if pos + 2 + 2 * rcount != len(raw):
                raise ProtocolViolation("invalid message format")
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise ProtocolViolation("malformed Bind message") from exc
        return cls(portal, statement, formats, tuple(params), result_formats)


@dataclass(frozen=True, slots=True)
class Describe(_Named):
    TYPE = Frontend.DESCRIBE


@dataclass(frozen=True, slots=True)
class Execute(_Message):
    """Run a portal for at most ``max_rows`` rows (0: all)."""

    portal: str
    max_rows: int
    TYPE = Frontend.EXECUTE

    def body(self) -> bytes:
        return _z(self.portal) + _I32.pack(self.max_rows)

    @classmethod
    def decode(cls, frame: Frame) -> Execute:
        portal, pos = _cstring(frame.raw, 5)
        if len(frame.raw) != pos + 4:
            raise ProtocolViolation("malformed Execute message")
        return cls(portal, _I32.unpack_from(frame.raw, pos)[0])


@dataclass(frozen=True, slots=True)
class Close(_Named):
    TYPE = Frontend.CLOSE


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    TYPE = Frontend.SYNC


@dataclass(frozen=True, slots=True)
class Flush(_Empty):
    TYPE = Frontend.FLUSH


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    TYPE = Frontend.TERMINATE


@dataclass(frozen=True, slots=True)
class CopyData(_Message):
    """A piece of COPY data (the same message in both directions)."""

    data: bytes
    TYPE = Frontend.COPY_DATA

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, frame: Frame) -> CopyData:
        return cls(frame.raw[5:])


@dataclass(frozen=True, slots=True)
class CopyDone(_Empty):
    """The end of COPY data (the same message in both directions)."""

    TYPE = Frontend.COPY_DONE


@dataclass(frozen=True, slots=True)
class CopyFail(_Message):
    message: str
    TYPE = Frontend.COPY_FAIL

    def body(self) -> bytes:
        return _z(self.message)

    @classmethod
    def decode(cls, frame: Frame) -> CopyFail:
        return cls(*_strings(frame, 1, cls.__name__))


# --------------------------------------------------------------------------- #
# Backend messages
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Authentication(_Message):
    """AuthenticationXXX: the request code (``AUTH_*``) and whatever follows it."""

    code: int
    payload: bytes
    TYPE = Backend.AUTHENTICATION

    def body(self) -> bytes:
        return _I32.pack(self.code) + self.payload

    @classmethod
    def decode(cls, frame: Frame) -> Authentication:
        if len(frame.raw) < 9:
            raise ProtocolViolation("malformed authentication message")
        return cls(_I32.unpack_from(frame.raw, 5)[0], frame.raw[9:])

    @classmethod
    def sasl(cls, mechanisms: list[str]) -> Authentication:
        """AuthenticationSASL offering these mechanisms."""
        return cls(AUTH_SASL, b"".join(_z(m) for m in mechanisms) + b"\0")

    def mechanisms(self) -> list[str]:
        """The mechanism names an AuthenticationSASL offers."""
        return [n.decode("ascii", "replace") for n in self.payload.split(b"\0") if n]


@dataclass(frozen=True, slots=True)
class BackendKeyData(_Message):
    """The cancel key of the backend."""

    pid: int
    key: bytes
    TYPE = Backend.BACKEND_KEY_DATA

    def body(self) -> bytes:
        return _I32.pack(self.pid) + self.key

    @classmethod
    def decode(cls, frame: Frame) -> BackendKeyData:
        if len(frame.raw) < 13:
            raise ProtocolViolation("malformed BackendKeyData message")
        return cls(_I32.unpack_from(frame.raw, 5)[0], frame.raw[9:])


@dataclass(frozen=True, slots=True)
class ParameterStatus(_Message):
    name: str
    value: str
    TYPE = Backend.PARAMETER_STATUS

    def body(self) -> bytes:
        return _z(self.name) + _z(self.value)

    @classmethod
    def decode(cls, frame: Frame) -> ParameterStatus:
        return cls(*_strings(frame, 2, cls.__name__))


@dataclass(frozen=True, slots=True)
class ReadyForQuery(_Message):
    """Transaction status 'I' (idle), 'T' (in transaction) or 'E' (failed transaction)."""

    status: str
    TYPE = Backend.READY_FOR_QUERY

    def body(self) -> bytes:
        return self.status.encode()

    @classmethod
    def decode(cls, frame: Frame) -> ReadyForQuery:
        if len(frame.raw) != 6 or frame.raw[5:6] not in (b"I", b"T", b"E"):
            raise ProtocolViolation("malformed ReadyForQuery message")
        return cls(chr(frame.raw[5]))


@dataclass(frozen=True, slots=True)
class _Fields(_Message):
    """ErrorResponse and NoticeResponse: the field code -> value pairs (S, V, C, M, D, H, P, ...), in order."""

    fields: tuple[tuple[str, str], ...]

    def body(self) -> bytes:
        return b"".join(k.encode() + _z(v) for k, v in self.fields) + b"\0"

    @classmethod
    def decode(cls, frame: Frame) -> Self:
        fields: list[tuple[str, str]] = []
        raw, pos = frame.raw, 5
        while pos < len(raw) and raw[pos] != 0:
            code = chr(raw[pos])
            value, pos = _cstring(raw, pos + 1)
            fields.append((code, value))
        if pos != len(raw) - 1:
            raise ProtocolViolation("malformed ErrorResponse message")
        return cls(tuple(fields))

    def get(self, code: str) -> str | None:
        return next((value for key, value in self.fields if key == code), None)


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    TYPE = Backend.ERROR_RESPONSE

    @classmethod
    def of(cls, exc: BaseException, severity: str = "ERROR") -> ErrorResponse:
        """The ErrorResponse for ``exc`` (:func:`proxy.errors.error_fields`; FATAL when the connection closes)."""
        return cls(error_fields(exc, severity))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    TYPE = Backend.NOTICE_RESPONSE

    @staticmethod
    def silenced(level: str) -> frozenset[str]:
        """The severities of the proxy's own notices (INFO, NOTICE, WARNING) that the server sends no client whose
        ``client_min_messages`` is ``level``: INFO reaches it at every level; NOTICE not above NOTICE; WARNING not
        at ERROR. An unknown level (the server refuses to set one) silences nothing."""
        return _SILENCED.get(level.strip().lower(), frozenset())

    @classmethod
    def warning(cls, message: str) -> NoticeResponse:
        """A notice of severity WARNING (SQLSTATE 01000)."""
        return cls((("S", "WARNING"), ("V", "WARNING"), ("C", "01000"), ("M", message)))


_SILENCED = {"warning": frozenset({"NOTICE"}), "error": frozenset({"NOTICE", "WARNING"})}


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a RowDescription (``attribute``: the column's number in its table, 0 for none)."""

    name: str
    type_oid: int
    table_oid: int = 0
    attribute: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription(_Message):
    columns: tuple[Column, ...]
    TYPE = Backend.ROW_DESCRIPTION

    def body(self) -> bytes:
        return _I16.pack(len(self.columns)) + b"".join(
            _z(c.name) + _COLUMN.pack(c.table_oid, c.attribute, c.type_oid, c.type_size, c.type_modifier, c.format)
            for c in self.columns
        )

    @classmethod
    def decode(cls, frame: Frame) -> RowDescription:
        raw = frame.raw
        count = _I16.unpack_from(raw, 5)[0] if len(raw) >= 7 else -1
        pos, columns = 7, []
        for _ in range(count):
            name, pos = _cstring(raw, pos)
            if len(raw) - pos < _COLUMN.size:
                break
            table, attribute, oid, size, modifier, fmt = _COLUMN.unpack_from(raw, pos)
            columns.append(Column(name, oid, table, attribute, size, modifier, fmt))
            pos += _COLUMN.size
        if count < 0 or len(columns) != count or pos != len(raw):
            raise ProtocolViolation("malformed RowDescription message")
        return cls(tuple(columns))


@dataclass(frozen=True, slots=True)
class DataRow(_Message):
    """Column values as sent (in the format the portal asked for); None is NULL."""

    values: tuple[bytes | None, ...]
    TYPE = Backend.DATA_ROW

    def body(self) -> bytes:
        values = self.values
        return _I16.pack(len(values)) + b"".join(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v for v in values)

    @classmethod
    def decode(cls, frame: Frame) -> DataRow:
        return cls(data_row_values(frame.raw, 0, len(frame.raw)))


def data_row_values(buf: bytes, start: int, end: int) -> tuple[bytes | None, ...]:
    """The values of the DataRow message at ``buf[start:end]`` (type byte and length included), read in place:
    the one decoder run per row (of the proxy's own queries), so local names, bounds checked once per value."""
    unpack = _I32.unpack_from
    values: list[bytes | None] = []
    append = values.append
    count, pos = -1, -1
    try:
        (count,) = _I16.unpack_from(buf, start + 5)
        pos = start + 7
        for _ in range(count):
            (length,) = unpack(buf, pos)
            pos += 4
            if length == -1:
                append(None)
            elif 0 <= length <= end - pos:
                append(buf[pos : pos + length])
                pos += length
            else:
                break
    except struct.error:  # a length word beyond the message
        pos = -1
    if len(values) != count or pos != end:
        raise ProtocolViolation("malformed DataRow message")
    return tuple(values)


@dataclass(frozen=True, slots=True)
class CommandComplete(_Message):
    tag: str
    TYPE = Backend.COMMAND_COMPLETE

    def body(self) -> bytes:
        return _z(self.tag)

    @classmethod
    def decode(cls, frame: Frame) -> CommandComplete:
        return cls(*_strings(frame, 1, cls.__name__))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):
    TYPE = Backend.EMPTY_QUERY_RESPONSE


@dataclass(frozen=True, slots=True)
class ParameterDescription(_Message):
    types: tuple[int, ...]
    TYPE = Backend.PARAMETER_DESCRIPTION

    def body(self) -> bytes:
        return _oids(self.types)

    @classmethod
    def decode(cls, frame: Frame) -> ParameterDescription:
        raw = frame.raw
        count = _I16.unpack_from(raw, 5)[0] if len(raw) >= 7 else -1
        if count < 0 or len(raw) != 7 + 4 * count:
            raise ProtocolViolation("malformed ParameterDescription message")
        return cls(struct.unpack_from(f"!{count}I", raw, 7))


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):
    TYPE = Backend.PARSE_COMPLETE


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):
    TYPE = Backend.BIND_COMPLETE


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):
    TYPE = Backend.CLOSE_COMPLETE


@dataclass(frozen=True, slots=True)
class NoData(_Empty):
    TYPE = Backend.NO_DATA


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):
    TYPE = Backend.PORTAL_SUSPENDED


FrontendMessage = (
    Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate | CopyData | CopyDone | CopyFail
)
BackendMessage = (
    Authentication | BackendKeyData | ParameterStatus | ReadyForQuery | ErrorResponse | NoticeResponse
    | RowDescription | DataRow | CommandComplete | EmptyQueryResponse | ParameterDescription | ParseComplete
    | BindComplete | CloseComplete | NoData | PortalSuspended | CopyData | CopyDone
)  # fmt: skip
Message = FrontendMessage | BackendMessage

# Message classes by type byte, per direction (a byte means different messages in each).
FRONTEND: dict[int, type[FrontendMessage]] = {
    cls.TYPE: cls
    for cls in (Query, Parse, Bind, Describe, Execute, Close, Sync, Flush, Terminate, CopyData, CopyDone, CopyFail)
}
BACKEND: dict[int, type[BackendMessage]] = {
    Backend.COPY_DATA: CopyData,
    Backend.COPY_DONE: CopyDone,
    **{
        cls.TYPE: cls
        for cls in (
            Authentication, BackendKeyData, ParameterStatus, ReadyForQuery, ErrorResponse, NoticeResponse,
            RowDescription, DataRow, CommandComplete, EmptyQueryResponse, ParameterDescription, ParseComplete,
            BindComplete, CloseComplete, NoData, PortalSuspended,
        )
    },
}  # fmt: skip


class _Decodable(Protocol):
    @classmethod
    def decode(cls, frame: Frame) -> Self: ...


_M = TypeVar("_M", bound=_Decodable)


def try_decode(kind: type[_M], frame: Frame) -> _M | None:
    """``kind.decode(frame)``, None when the frame is malformed (the server then answers it with its own error)."""
    try:
        return kind.decode(frame)
    except ProtocolViolation:
        return None


def is_fatal(frame: Frame) -> bool:
    """An ErrorResponse of severity FATAL (the server sends the severity first); the frame is not decoded."""
    return frame.raw[5:11] == b"SFATAL"


def replace_fields(frame: Frame, drop: str, add: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An ErrorResponse / NoticeResponse frame without the fields whose codes are in ``drop``, plus ``add``."""
    kind = NoticeResponse if frame.type == Backend.NOTICE_RESPONSE else ErrorResponse
    return kind(tuple(f for f in kind.decode(frame).fields if f[0] not in drop) + add).encode()


def sasl_initial_gs2_flag(frame: Frame) -> str | None:
    """The GS2 channel-binding flag ('n', 'y' or 'p') of a SASLInitialResponse, else None.

    A 'p' message may also be a password or a SASLResponse; those yield None.
    """
    raw = frame.raw
    nul = raw.find(b"\0", 5)
    if nul < 0 or not raw[5:nul].startswith(b"SCRAM-") or len(raw) < nul + 6:
        return None
    flag = raw[nul + 5 : nul + 6]
    return flag.decode("ascii") if flag in (b"n", b"y", b"p") else None
