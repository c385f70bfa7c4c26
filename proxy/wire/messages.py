"""PostgreSQL v3 wire protocol codec: bytes <-> messages, and nothing else.

Owns: framing of the startup phase (untyped, length-prefixed packets) and of the
typed phase (1 type byte + int32 length), decoding of the few messages the proxy
must understand, and ``encode_*`` functions that build frames.

Must not: import asyncio or sockets, keep per-connection state beyond its input
buffer, or decode messages it has no use for (DataRow, Bind, ... travel as raw
bytes so that the relay costs little).

Every decoder raises :class:`proxy.errors.ProtocolViolation` (SQLSTATE 08P01) on
malformed input; any other exception escaping from here is a bug.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from proxy.errors import ProtocolViolation

# Request codes sent in place of a protocol version in the startup packet.
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_MAJOR_3 = 3

# A startup packet holds a handful of parameters; libpq caps it at 10 000 bytes
# and so does the server (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET = 10_000

# Message types a frontend may send once startup is over (protocol.html,
# "Message Formats"). Anything else is a protocol violation.
FRONTEND_TYPES = frozenset(b"BCcdDEfFHpPQSX")

# Authentication request codes (AuthenticationXXX, type 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")
_STARTUP_HEADER = struct.Struct("!ii")


# --------------------------------------------------------------------------- #
# Startup-phase messages (client -> server, no type byte)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks to switch to TLS before the startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; the proxy always declines."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Out-of-band cancel: backend pid and secret key (4 bytes in 3.0, up to 256 in 3.2)."""

    pid: int
    key: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol version plus the connection parameters (user, database, ...)."""

    major: int
    minor: int
    params: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return default


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


class StartupReader:
    """Incremental reader of one untyped startup packet at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes buffered beyond what has been returned so far."""
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Hand over whatever is buffered (the typed phase continues with it)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_packet(self) -> StartupPacket | None:
        """Return the next complete packet, or None when more bytes are needed."""
        if len(self._buf) < 8:
            return None
        length, code = _STARTUP_HEADER.unpack_from(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return decode_startup(code, body)


def decode_startup(code: int, body: bytes) -> StartupPacket:
    """Decode a startup packet given its 4-byte code and the bytes after it."""
    if code == SSL_REQUEST_CODE and not body:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and not body:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) < 8 or len(body) > 260:
            raise ProtocolViolation("invalid length of cancel request packet")
        return CancelRequest(pid=_I32.unpack_from(body, 0)[0], key=body[4:])
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_MAJOR_3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}")
    return StartupMessage(major=major, minor=minor, params=_decode_params(body))


def _decode_params(body: bytes) -> tuple[tuple[str, str], ...]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    # name\0value\0 ... \0: every string is NUL-terminated, then one final NUL.
    parts = body[:-1].split(b"\0")[:-1] if len(body) > 1 else []
    if len(body) > 1 and not body[:-1].endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: unpaired parameter")
    try:
        texts = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid byte sequence in startup packet") from exc
    return tuple(zip(texts[0::2], texts[1::2], strict=True))


def encode_startup(msg: StartupPacket) -> bytes:
    """Encode any startup-phase packet (used to talk to the upstream)."""
    match msg:
        case SSLRequest():
            return _STARTUP_HEADER.pack(8, SSL_REQUEST_CODE)
        case GSSENCRequest():
            return _STARTUP_HEADER.pack(8, GSSENC_REQUEST_CODE)
        case CancelRequest(pid=pid, key=key):
            return _STARTUP_HEADER.pack(12 + len(key), CANCEL_REQUEST_CODE) + _I32.pack(pid) + key
        case StartupMessage(major=major, minor=minor, params=params):
            body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
            return _STARTUP_HEADER.pack(8 + len(body), (major << 16) | minor) + body


# --------------------------------------------------------------------------- #
# Typed phase: framing
# --------------------------------------------------------------------------- #


class Frame(NamedTuple):
    """One typed message: its type byte (as int) and its whole raw frame."""

    type: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[5:]


class FrameReader:
    """Incremental splitter of typed messages (``type byte + int32 length + body``).

    ``allowed`` restricts the type bytes accepted (the frontend set for client
    traffic); ``max_bytes`` bounds one message so a hostile length cannot make
    us buffer without limit. On client traffic, nothing after a Terminate is
    read (as the server reads nothing more): bytes behind it are dropped, not
    judged.
    """

    __slots__ = ("_allowed", "_ended", "_have", "_max", "_need", "_parts")

    def __init__(self, max_bytes: int, allowed: frozenset[int] | None = None) -> None:
        # An incomplete message waits in pieces until ``_need`` bytes are there: joined once, so a
        # large message arriving in many reads costs linear time, not a copy of the buffer per read.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._max = max_bytes
        self._allowed = allowed
        self._ended = False

    @property
    def pending(self) -> int:
        return self._have

    def scan(self, data: bytes) -> tuple[bytes, bytearray, int]:
        """Add bytes; return the complete messages as one chunk, their type bytes, and the last ReadyForQuery status.

        This is the relay's hot path: no per-message objects, so a chunk that
        needs no change is forwarded as the very bytes that arrived. The status
        is the byte of the last 'Z' in the chunk (-1 when there is none).
        """
        if self._ended:
            return b"", bytearray(), -1
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", bytearray(), -1
            buf = b"".join(self._parts)
            self._parts, self._have = [], 0
        else:
            buf = data
        kinds = bytearray()
        pos, end, last_z = 0, len(buf), -1
        allowed, limit = self._allowed, self._max
        need = 5  # bytes of the message begun at ``pos``: its header, then all of it
        while end - pos >= 5:
            code = buf[pos]
            length = (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
            if allowed is not None and code not in allowed:
                raise ProtocolViolation(f"invalid frontend message type {code}")
            if length < 4 or length > limit:
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(code)!r}")
            stop = pos + 1 + length
            if stop > end:
                need = 1 + length
                break
            kinds.append(code)
            if code == 90 and length == 5:  # 'Z'
                last_z = buf[pos + 5]
            pos = stop
            if code == 88 and allowed is not None:  # 'X' from a client: the rest is never read
                self._ended = True
                return buf[:pos], kinds, last_z
        if pos == end:
            return buf, kinds, last_z
        rest = buf[pos:]
        self._parts, self._have, self._need = [rest], len(rest), need
        return buf[:pos], kinds, last_z

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes and return every message they complete, in order."""
        return split_frames(self.scan(data)[0])


def split_frames(chunk: bytes) -> list[Frame]:
    """Split a chunk of complete, already validated messages (from :meth:`FrameReader.scan`)."""
    frames: list[Frame] = []
    pos, end = 0, len(chunk)
    while pos < end:
        stop = pos + 1 + _I32.unpack_from(chunk, pos + 1)[0]
        frames.append(Frame(chunk[pos], chunk[pos:stop]))
        pos = stop
    return frames


# --------------------------------------------------------------------------- #
# Typed messages the proxy decodes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Query:
    """Simple-protocol query ('Q')."""

    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    """Extended-protocol Parse ('P'): statement name, SQL and declared parameter type OIDs."""

    name: str
    sql: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Authentication:
    """AuthenticationXXX ('R'): the request code and whatever follows it."""

    code: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """The cancel key of the backend ('K')."""

    pid: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """'Z': transaction status 'I' (idle), 'T' (in transaction) or 'E' (failed transaction)."""

    status: str


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """'E' (or 'N' for NoticeResponse): the field code -> value pairs."""

    fields: tuple[tuple[str, str], ...]

    def get(self, code: str) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return None


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    nul = body.find(b"\0", pos)
    if nul < 0:
        raise ProtocolViolation("unterminated string in message")
    try:
        return body[pos:nul].decode("utf-8"), nul + 1
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid UTF-8 in message") from exc


def decode_query(frame: Frame) -> Query:
    sql, pos = _cstring(frame.raw, 5)
    if pos != len(frame.raw):
        raise ProtocolViolation("malformed Query message")
    return Query(sql)


def decode_parse(frame: Frame) -> Parse:
    raw = frame.raw
    name, pos = _cstring(raw, 5)
    sql, pos = _cstring(raw, pos)
    if len(raw) - pos < 2:
        raise ProtocolViolation("malformed Parse message")
    (count,) = struct.unpack_from("!h", raw, pos)
    pos += 2
    if count < 0 or len(raw) - pos != 4 * count:
        raise ProtocolViolation("malformed Parse message")
    types = struct.unpack_from(f"!{count}I", raw, pos) if count else ()
    return Parse(name, sql, tuple(types))


def decode_authentication(frame: Frame) -> Authentication:
    if len(frame.raw) < 9:
        raise ProtocolViolation("malformed authentication message")
    return Authentication(_I32.unpack_from(frame.raw, 5)[0], frame.raw[9:])


def decode_backend_key(frame: Frame) -> BackendKeyData:
    if len(frame.raw) < 13:
        raise ProtocolViolation("malformed BackendKeyData message")
    return BackendKeyData(_I32.unpack_from(frame.raw, 5)[0], frame.raw[9:])


def decode_ready(frame: Frame) -> ReadyForQuery:
    if len(frame.raw) != 6 or frame.raw[5:6] not in (b"I", b"T", b"E"):
        raise ProtocolViolation("malformed ReadyForQuery message")
    return ReadyForQuery(chr(frame.raw[5]))


def decode_error(frame: Frame) -> ErrorResponse:
    fields: list[tuple[str, str]] = []
    raw, pos = frame.raw, 5
    while pos < len(raw) and raw[pos] != 0:
        code = chr(raw[pos])
        value, pos = _cstring(raw, pos + 1)
        fields.append((code, value))
    if pos != len(raw) - 1:
        raise ProtocolViolation("malformed ErrorResponse message")
    return ErrorResponse(tuple(fields))


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


def sasl_mechanisms(auth: Authentication) -> list[str]:
    """The mechanism names listed in an AuthenticationSASL payload."""
    names = auth.payload.split(b"\0")
    return [n.decode("ascii", "replace") for n in names if n]


# --------------------------------------------------------------------------- #
# Encoders
# --------------------------------------------------------------------------- #


def encode(mtype: bytes, body: bytes) -> bytes:
    """Frame ``body`` as a typed message."""
    return _HEADER.pack(mtype, len(body) + 4) + body


def encode_query(msg: Query) -> bytes:
    return encode(b"Q", msg.sql.encode() + b"\0")


def encode_parse(msg: Parse) -> bytes:
    types = struct.pack(f"!h{len(msg.param_types)}I", len(msg.param_types), *msg.param_types)
    return encode(b"P", msg.name.encode() + b"\0" + msg.sql.encode() + b"\0" + types)


def encode_authentication(msg: Authentication) -> bytes:
    return encode(b"R", _I32.pack(msg.code) + msg.payload)


def encode_sasl(mechanisms: list[str]) -> bytes:
    payload = b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0"
    return encode_authentication(Authentication(AUTH_SASL, payload))


def encode_ready(msg: ReadyForQuery) -> bytes:
    return encode(b"Z", msg.status.encode())


def encode_error(msg: ErrorResponse, notice: bool = False) -> bytes:
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in msg.fields) + b"\0"
    return encode(b"N" if notice else b"E", body)


def replace_fields(frame: Frame, drop: str, add: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An ErrorResponse / NoticeResponse frame without the fields whose codes are in ``drop``, plus ``add``."""
    fields = tuple(f for f in decode_error(frame).fields if f[0] not in drop)
    return encode_error(ErrorResponse(fields + add), notice=frame.type == ord("N"))


def encode_backend_key(msg: BackendKeyData) -> bytes:
    return encode(b"K", _I32.pack(msg.pid) + msg.key)


TERMINATE = encode(b"X", b"")
FLUSH = encode(b"H", b"")
SSL_ACCEPT = b"S"
SSL_REFUSE = b"N"
