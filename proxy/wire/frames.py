"""PostgreSQL v3 framing: message types, typed frames, the startup packets.

Owns: the message-type bytes of both directions (:class:`Frontend`, :class:`Backend` —
one byte may mean different messages per direction: 'E' is Execute from a client and
ErrorResponse from a server), the startup request codes, splitting typed traffic
(1 type byte + int32 length + body) into :class:`Frame` values without decoding them
(:class:`FrameReader`, the relay's hot path; a run of CopyData messages of one length is
checked in one numpy comparison, not walked message by message), framing a body (:func:`pack`), and the
untyped startup-phase packets (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage)
in both directions.

Must not: import asyncio or sockets, keep state beyond its input buffer (and the layouts
of a few recent chunks, which only spare walking them again), or decode message bodies
(that is :mod:`proxy.wire.messages`).

Every reader raises :class:`proxy.errors.ProtocolViolation` (SQLSTATE 08P01) on
malformed input; any other exception escaping from here is a bug.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from proxy.errors import ProtocolViolation


class Frontend(IntEnum):
    """Type bytes of the messages a client sends once startup is over (protocol-message-formats.html)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse: one byte for all
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class Backend(IntEnum):
    """Type bytes of the messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


# The types a client may send after startup (plain ints: membership is tested per message on the
# hot path). Anything else is a protocol violation.
FRONTEND_TYPES = frozenset(int(kind) for kind in Frontend)

# Request codes sent in place of a protocol version in the startup packet.
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
# Not PostgreSQL's: a CancelRequest one pgml-proxy replica forwards to its peers (proxy.peers). The packet is
# a CancelRequest in all but this code, which tells the peer not to forward it again (no loops).
PEER_CANCEL_REQUEST_CODE = (1234 << 16) | 5700
PROTOCOL_MAJOR_3 = 3
# The one-byte answers to SSLRequest (and GSSENCRequest): go ahead with TLS, or continue in the clear.
SSL_ACCEPT = b"S"
SSL_REFUSE = b"N"

# A startup packet holds a handful of parameters; libpq caps it at 10 000 bytes
# and so does the server (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET = 10_000

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!Bi")
_UHEADER = struct.Struct("!BI")  # as read: an out-of-range length is reported as the unsigned number it is
_STARTUP_HEADER = struct.Struct("!ii")
_Z, _X = int(Backend.READY_FOR_QUERY), int(Frontend.TERMINATE)  # plain ints for the scan loop
_COPY_DATA = int(Backend.COPY_DATA)  # the same byte from a client
# A CopyData with more than this many messages' worth of bytes after it is looked at for a run of equal ones.
_RUN_AT_LEAST = 32
_RUN_KINDS = b"d" * 4096
_ANY_TYPE = frozenset(range(256))  # server traffic: every type byte is read
# Chunks of at most this many messages have their layout remembered; at most this many layouts per reader.
LAYOUT_MESSAGES = 8
LAYOUTS = 16


def pack(kind: int, body: bytes) -> bytes:
    """Frame ``body`` as a typed message of type ``kind`` (a :class:`Frontend` or :class:`Backend` member)."""
    return _HEADER.pack(kind, len(body) + 4) + body


# --------------------------------------------------------------------------- #
# Startup-phase packets (client -> server, no type byte)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks to switch to TLS before the startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; the proxy always declines."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Out-of-band cancel: backend pid and secret key (4 bytes in 3.0, up to 256 in 3.2).

    ``forwarded``: sent by a peer replica (PEER_CANCEL_REQUEST_CODE), honoured here but never forwarded again.
    """

    pid: int
    key: bytes
    forwarded: bool = False


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
    if code in (CANCEL_REQUEST_CODE, PEER_CANCEL_REQUEST_CODE):
        if len(body) < 8 or len(body) > 260:
            raise ProtocolViolation("invalid length of cancel request packet")
        return CancelRequest(_I32.unpack_from(body, 0)[0], body[4:], code == PEER_CANCEL_REQUEST_CODE)
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
        case CancelRequest(pid=pid, key=key, forwarded=forwarded):
            code = PEER_CANCEL_REQUEST_CODE if forwarded else CANCEL_REQUEST_CODE
            return _STARTUP_HEADER.pack(12 + len(key), code) + _I32.pack(pid) + key
        case StartupMessage(major=major, minor=minor, params=params):
            body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
            return _STARTUP_HEADER.pack(8 + len(body), (major << 16) | minor) + body


# --------------------------------------------------------------------------- #
# Typed phase
# --------------------------------------------------------------------------- #


class Frame(NamedTuple):
    """One typed message: its type byte (as int) and its whole raw frame."""

    type: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[5:]


# The type bytes of a chunk's messages, in order (read-only: a remembered layout's may be shared).
Kinds = bytes | bytearray


class _Layout(NamedTuple):
    """How a chunk of whole messages was framed: where its headers are, what they said, what they were."""

    headers: Callable[[bytes], object]  # the header (type byte + length) of every message, in one C call
    expected: object  # what ``headers`` gave for the chunk this layout was taken from
    kinds: bytes
    ready: int  # offset of the last ReadyForQuery's status byte (-1: none)


class FrameReader:
    """Incremental splitter of typed messages (``type byte + int32 length + body``).

    ``allowed`` restricts the type bytes accepted (the frontend set for client
    traffic); ``max_bytes`` bounds one message so a hostile length cannot make
    us buffer without limit. On client traffic, nothing after a Terminate is
    read (as the server reads nothing more): bytes behind it are dropped, not
    judged.

    Request/response traffic repeats its shapes (a prepared statement run in a loop, a point
    query's one-row answer): a chunk of a few whole messages whose length was seen before has
    its layout remembered, and a later chunk of that length with the very same headers at the
    same offsets (compared in one C call: a hit is exact, the same messages, already validated)
    is not walked again.
    """

    __slots__ = ("_allowed", "_ended", "_have", "_layouts", "_max", "_need", "_parts", "_special")

    def __init__(self, max_bytes: int, allowed: frozenset[int] | None = None) -> None:
        # An incomplete message waits in pieces until ``_need`` bytes are there: joined once, so a
        # large message arriving in many reads costs linear time, not a copy of the buffer per read.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._max = max_bytes
        self._allowed = _ANY_TYPE if allowed is None else allowed
        self._special = _Z if allowed is None else _X  # the one type the walk looks at
        self._ended = False
        self._layouts: dict[int, _Layout | None] = {}  # chunk length -> its layout (None: seen once)

    @property
    def pending(self) -> int:
        return self._have

    def scan(self, data: bytes) -> tuple[bytes, Kinds, int]:
        """Add bytes; return the complete messages as one chunk, their type bytes, and the last ReadyForQuery status.

        This is the relay's hot path: no per-message objects, so a chunk that
        needs no change is forwarded as the very bytes that arrived. The status
        is the byte of the last ReadyForQuery in the chunk (-1 when there is none).
        The type bytes are read-only (they may be a remembered layout's).
        """
        if self._ended:
            return b"", b"", -1
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", b"", -1
            buf = b"".join(self._parts)
            self._parts, self._have = [], 0
        else:
            buf = data
            layout = self._layouts.get(len(buf))
            if layout is not None and layout.headers(buf) == layout.expected:
                return buf, layout.kinds, -1 if layout.ready < 0 else buf[layout.ready]
        kinds = bytearray()
        append, header = kinds.append, _UHEADER.unpack_from  # one C call per message reads its type and length
        pos, end, last_z = 0, len(buf), -1
        allowed, limit, special = self._allowed, self._max, self._special
        need = 5  # bytes of the message begun at ``pos``: its header, then all of it
        while end - pos >= 5:
            code, length = header(buf, pos)
            if code not in allowed:
                raise ProtocolViolation(f"invalid frontend message type {code}")
            if length < 4 or length > limit:
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(code)!r}")
            stop = pos + 1 + length
            if stop > end:
                need = 1 + length
                break
            append(code)
            if code == _COPY_DATA and end - stop > _RUN_AT_LEAST * (1 + length):
                run = equal_run(buf, pos, 1 + length, end)  # COPY rows of one length: the next ones in one step
                kinds += _RUN_KINDS[:run] if run <= len(_RUN_KINDS) else b"d" * run
                stop += run * (1 + length)
            if code == special:  # ReadyForQuery from a server, Terminate from a client
                if special == _X:  # the rest is never read
                    self._ended = True
                    return buf[:stop], kinds, last_z
                if length == 5:
                    last_z = buf[pos + 5]
            pos = stop
        if pos == end:
            if 0 < len(kinds) <= LAYOUT_MESSAGES:
                self._remember(buf, kinds)
            return buf, kinds, last_z
        rest = buf[pos:]
        self._parts, self._have, self._need = [rest], len(rest), need
        return buf[:pos], kinds, last_z

    def _remember(self, buf: bytes, kinds: bytearray) -> None:
        """A chunk of a few whole messages: its layout is remembered the second time its length is seen."""
        layouts, size = self._layouts, len(buf)
        if size in layouts:
            layouts[size] = _layout_of(buf, kinds)
            return
        if len(layouts) >= LAYOUTS:
            layouts.clear()
        layouts[size] = None

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes and return every message they complete, in order."""
        return split_frames(self.scan(data)[0])


def _layout_of(buf: bytes, kinds: bytearray) -> _Layout:
    """The layout of ``buf``: whole messages, already validated (their type bytes: ``kinds``)."""
    offsets, pos, end, ready = [], 0, len(buf), -1
    while pos < end:
        offsets.append(pos)
        code, length = _UHEADER.unpack_from(buf, pos)
        if code == _Z and length == 5:
            ready = pos + 5
        pos += 1 + length
    headers = operator.itemgetter(*(slice(offset, offset + 5) for offset in offsets))
    return _Layout(headers, headers(buf), bytes(kinds), ready)


def equal_run(buf: bytes, pos: int, size: int, end: int) -> int:
    """How many whole messages before ``end`` right after the message of ``size`` bytes at ``pos`` have its very
    header (type and length: a COPY's rows of one length, as a numeric table's are): compared all at once, not
    walked one by one."""
    count = (end - pos) // size - 1
    rows = np.frombuffer(buf, np.uint8, count=count * size, offset=pos + size).reshape(count, size)
    same = np.all(rows[:, :5] == np.frombuffer(buf, np.uint8, count=5, offset=pos), axis=1)
    return count if bool(same.all()) else int(same.argmin())


def split_frames(chunk: bytes) -> list[Frame]:
    """Split a chunk of complete, already validated messages (from :meth:`FrameReader.scan`)."""
    frames: list[Frame] = []
    pos, end = 0, len(chunk)
    while pos < end:
        stop = pos + 1 + _I32.unpack_from(chunk, pos + 1)[0]
        frames.append(Frame(chunk[pos], chunk[pos:stop]))
        pos = stop
    return frames
