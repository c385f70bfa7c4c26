"""The sans-IO codec, from one case table: every case fed whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import struct

import pytest

from proxy.errors import ProtocolViolation
from proxy.wire import messages as pq

# (message, its exact bytes, decoder) -- the single source for encode and decode tests.
TYPED_CASES: list[tuple[object, bytes]] = [
    (pq.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (pq.Query(""), b"Q\x00\x00\x00\x05\x00"),
    (pq.Query("SELECT 'é'"), b"Q\x00\x00\x00\x10SELECT '\xc3\xa9'\x00"),
    (pq.Parse("", "SELECT $1", ()), b"P\x00\x00\x00\x11\x00SELECT $1\x00\x00\x00"),
    (
        pq.Parse("s1", "SELECT $1, $2", (23, 25)),
        b"P\x00\x00\x00\x1fs1\x00SELECT $1, $2\x00" b"\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
    ),
    (pq.ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
    (pq.ReadyForQuery("E"), b"Z\x00\x00\x00\x05E"),
    (pq.BackendKeyData(1234, b"\x01\x02\x03\x04"), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x01\x02\x03\x04"),
    (pq.Authentication(pq.AUTH_OK, b""), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (pq.Authentication(pq.AUTH_MD5, b"salt"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"),
    (
        pq.ErrorResponse((("S", "ERROR"), ("C", "42883"), ("M", "nope"))),
        b"E\x00\x00\x00\x19SERROR\x00C42883\x00Mnope\x00\x00",
    ),
]  # fmt: skip

ENCODERS = {
    pq.Query: pq.encode_query,
    pq.Parse: pq.encode_parse,
    pq.ReadyForQuery: pq.encode_ready,
    pq.BackendKeyData: pq.encode_backend_key,
    pq.Authentication: pq.encode_authentication,
    pq.ErrorResponse: pq.encode_error,
}
DECODERS = {
    ord("Q"): pq.decode_query,
    ord("P"): pq.decode_parse,
    ord("Z"): pq.decode_ready,
    ord("K"): pq.decode_backend_key,
    ord("R"): pq.decode_authentication,
    ord("E"): pq.decode_error,
}


def feed_all(reader: pq.FrameReader, data: bytes, step: int | None) -> list[pq.Frame]:
    if step is None:
        return reader.feed(data)
    frames: list[pq.Frame] = []
    for i in range(0, len(data), step):
        got = reader.feed(data[i : i + step])
        if i + step < len(data):
            assert got == [] or len(frames) + len(got) <= 1
        frames += got
    return frames


@pytest.mark.parametrize(("message", "raw"), TYPED_CASES, ids=lambda v: type(v).__name__)
def test_encode(message: object, raw: bytes) -> None:
    assert ENCODERS[type(message)](message) == raw  # type: ignore[operator]


@pytest.mark.parametrize(("message", "raw"), TYPED_CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("step", [None, 1], ids=["whole", "bytewise"])
def test_decode(message: object, raw: bytes, step: int | None) -> None:
    reader = pq.FrameReader(1 << 20)
    frames = feed_all(reader, raw, step)
    assert len(frames) == 1 and frames[0].raw == raw and reader.pending == 0
    assert DECODERS[frames[0].type](frames[0]) == message


@pytest.mark.parametrize(("message", "raw"), TYPED_CASES, ids=lambda v: type(v).__name__)
def test_trailing_bytes_are_kept(message: object, raw: bytes) -> None:
    reader = pq.FrameReader(1 << 20)
    trailing = b"Z\x00\x00"  # the start of a next frame
    frames = reader.feed(raw + trailing)
    assert [f.raw for f in frames] == [raw]
    assert reader.pending == len(trailing)
    assert reader.feed(b"\x00\x05I") == [pq.Frame(ord("Z"), b"Z\x00\x00\x00\x05I")]


def test_many_frames_in_one_chunk() -> None:
    raw = b"".join(r for _, r in TYPED_CASES)
    frames = pq.FrameReader(1 << 20).feed(raw)
    assert [f.raw for f in frames] == [r for _, r in TYPED_CASES]


STARTUP_CASES: list[tuple[pq.StartupPacket, bytes]] = [
    (pq.SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (pq.GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (pq.CancelRequest(77, b"\x00\x00\x00\x09"), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x4d\x00\x00\x00\x09"),
    (pq.CancelRequest(77, bytes(range(32))), b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x00\x4d" + bytes(range(32))),
    (
        pq.StartupMessage(3, 0, (("user", "alice"), ("database", "db"))),
        b"\x00\x00\x00\x20\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00",
    ),
    (pq.StartupMessage(3, 2, ()), b"\x00\x00\x00\x09\x00\x03\x00\x02\x00"),
]


@pytest.mark.parametrize(("message", "raw"), STARTUP_CASES, ids=lambda v: type(v).__name__)
def test_startup_encode(message: pq.StartupPacket, raw: bytes) -> None:
    assert pq.encode_startup(message) == raw


@pytest.mark.parametrize(("message", "raw"), STARTUP_CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_startup_decode(message: pq.StartupPacket, raw: bytes, mode: str) -> None:
    reader = pq.StartupReader()
    if mode == "bytewise":
        for i, byte in enumerate(raw):
            assert reader.next_packet() is None, i
            reader.feed(bytes([byte]))
    else:
        reader.feed(raw + (b"Q\x00" if mode == "trailing" else b""))
    assert reader.next_packet() == message
    assert reader.take_rest() == (b"Q\x00" if mode == "trailing" else b"")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x04\x00\x03\x00\x00",  # length below the header size
        b"\x7f\xff\xff\xff\x00\x03\x00\x00",  # absurd length
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage: not a startup packet
        b"\x00\x00\x00\x08\x00\x02\x00\x00",  # protocol 2.0
        b"\x00\x00\x00\x0d\x00\x03\x00\x00user\x00",  # missing terminator
        b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00",  # unpaired parameter
        b"\x00\x00\x00\x0a\x04\xd2\x16\x2e\x00\x00",  # short cancel request
    ],
)
def test_startup_malformed(raw: bytes) -> None:
    reader = pq.StartupReader()
    reader.feed(raw)
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [
        (b"Q\x00\x00\x00\x03", None),  # length < 4
        (b"Q\xff\xff\xff\xff", None),  # negative length
        (b"Q\x00\x10\x00\x00", None),  # over the configured maximum
        (b"\x00\x00\x00\x00\x05", pq.FRONTEND_TYPES),  # not a frontend message type
        (b"Z\x00\x00\x00\x05I", pq.FRONTEND_TYPES),  # a backend type from a client
    ],
)
def test_frame_malformed(raw: bytes, allowed: frozenset[int] | None) -> None:
    with pytest.raises(ProtocolViolation):
        pq.FrameReader(4096, allowed).feed(raw)


@pytest.mark.parametrize(
    ("decoder", "raw"),
    [
        (pq.decode_query, b"Q\x00\x00\x00\x06ab"),  # unterminated
        (pq.decode_query, b"Q\x00\x00\x00\x07a\x00b"),  # bytes after the string
        (pq.decode_query, b"Q\x00\x00\x00\x06\xff\x00"),  # not UTF-8
        (pq.decode_parse, b"P\x00\x00\x00\x08\x00a\x00\x00"),  # truncated count
        (pq.decode_parse, b"P\x00\x00\x00\x0b\x00a\x00\x00\x02\x00\x00"),  # too few OIDs
        (pq.decode_ready, b"Z\x00\x00\x00\x05X"),
        (pq.decode_error, b"E\x00\x00\x00\x07Sx\x00"),  # no final NUL
    ],
)
def test_decode_malformed(decoder: object, raw: bytes) -> None:
    frames = pq.FrameReader(4096).feed(raw)
    with pytest.raises(ProtocolViolation):
        decoder(frames[0])  # type: ignore[operator]


def test_sasl_mechanisms_round_trip() -> None:
    frame = pq.FrameReader(4096).feed(pq.encode_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))[0]
    auth = pq.decode_authentication(frame)
    assert auth.code == pq.AUTH_SASL
    assert pq.sasl_mechanisms(auth) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert struct.unpack("!i", frame.raw[1:5])[0] == len(frame.raw) - 1
