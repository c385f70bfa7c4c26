"""The sans-IO codec, from one case table: every case fed whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import struct

import pytest

from proxy.errors import InvalidParameterValue, ProtocolViolation
from proxy.wire import frames
from proxy.wire import messages as pq
from proxy.wire.frames import Backend, Frame, FrameReader, Frontend

S, P = pq.Target.STATEMENT, pq.Target.PORTAL
# The decoders of each direction: the same type byte means different messages in each.
DIRECTIONS = {"frontend": pq.FRONTEND, "backend": pq.BACKEND}

# (direction, message, its exact bytes) -- the single source for encode and decode tests, every message kind.
TYPED_CASES: list[tuple[str, pq.Message, bytes]] = [
    ("frontend", pq.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    ("frontend", pq.Query(""), b"Q\x00\x00\x00\x05\x00"),
    ("frontend", pq.Query("SELECT 'é'"), b"Q\x00\x00\x00\x10SELECT '\xc3\xa9'\x00"),
    ("frontend", pq.Parse("", "SELECT $1", ()), b"P\x00\x00\x00\x11\x00SELECT $1\x00\x00\x00"),
    (
        "frontend",
        pq.Parse("s1", "SELECT $1, $2", (23, 25)),
        b"P\x00\x00\x00\x1fs1\x00SELECT $1, $2\x00" b"\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
    ),
    (
        "frontend",
        pq.Bind("p", "s1", (1,), (b"\x00\x00\x00\x07", None), (0,)),
        b"B\x00\x00\x00\x1fp\x00s1\x00" b"\x00\x01\x00\x01" b"\x00\x02\x00\x00\x00\x04\x00\x00\x00\x07\xff\xff\xff\xff"
        b"\x00\x01\x00\x00",
    ),
    ("frontend", pq.Bind("", "", (), (), ()), b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"),
    ("frontend", pq.Describe(S, "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    ("frontend", pq.Describe(P, ""), b"D\x00\x00\x00\x06P\x00"),
    ("frontend", pq.Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    ("frontend", pq.Execute("p", 2), b"E\x00\x00\x00\x0ap\x00\x00\x00\x00\x02"),
    ("frontend", pq.Close(S, "s1"), b"C\x00\x00\x00\x08Ss1\x00"),
    ("frontend", pq.Close(P, "p"), b"C\x00\x00\x00\x07Pp\x00"),
    ("frontend", pq.Sync(), b"S\x00\x00\x00\x04"),
    ("frontend", pq.Flush(), b"H\x00\x00\x00\x04"),
    ("frontend", pq.Terminate(), b"X\x00\x00\x00\x04"),
    ("frontend", pq.CopyData(b"1\t2\n"), b"d\x00\x00\x00\x081\t2\n"),
    ("frontend", pq.CopyDone(), b"c\x00\x00\x00\x04"),
    ("frontend", pq.CopyFail("no"), b"f\x00\x00\x00\x07no\x00"),
    ("backend", pq.ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
    ("backend", pq.ReadyForQuery("E"), b"Z\x00\x00\x00\x05E"),
    ("backend", pq.BackendKeyData(1234, b"\x01\x02\x03\x04"), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x01\x02\x03\x04"),
    ("backend", pq.Authentication(pq.AUTH_OK, b""), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    ("backend", pq.Authentication(pq.AUTH_MD5, b"salt"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"),
    ("backend", pq.ParameterStatus("client_encoding", "UTF8"), b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"),
    (
        "backend",
        pq.ErrorResponse((("S", "ERROR"), ("C", "42883"), ("M", "nope"))),
        b"E\x00\x00\x00\x19SERROR\x00C42883\x00Mnope\x00\x00",
    ),
    ("backend", pq.NoticeResponse((("S", "WARNING"), ("M", "w"))), b"N\x00\x00\x00\x11SWARNING\x00Mw\x00\x00"),
    (
        "backend",
        pq.RowDescription((pq.Column("transform_stream", 3802),)),
        b"T\x00\x00\x00\x29\x00\x01transform_stream\x00"
        b"\x00\x00\x00\x00" b"\x00\x00" b"\x00\x00\x0e\xda" b"\xff\xff" b"\xff\xff\xff\xff" b"\x00\x00",
    ),
    (
        "backend",
        pq.RowDescription((pq.Column("a", 23, 16385, 1, 4, -1, 1), pq.Column("b", 25))),
        b"T\x00\x00\x00\x2e\x00\x02"
        b"a\x00\x00\x00\x40\x01\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x01"
        b"b\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00",
    ),
    ("backend", pq.RowDescription(()), b"T\x00\x00\x00\x06\x00\x00"),
    (
        "backend",
        pq.DataRow((b"1", None, b"")),
        b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00",
    ),
    ("backend", pq.DataRow(()), b"D\x00\x00\x00\x06\x00\x00"),
    ("backend", pq.CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    ("backend", pq.EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
    ("backend", pq.ParameterDescription((25, 3802)), b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x19\x00\x00\x0e\xda"),
    ("backend", pq.ParameterDescription(()), b"t\x00\x00\x00\x06\x00\x00"),
    ("backend", pq.ParseComplete(), b"1\x00\x00\x00\x04"),
    ("backend", pq.BindComplete(), b"2\x00\x00\x00\x04"),
    ("backend", pq.CloseComplete(), b"3\x00\x00\x00\x04"),
    ("backend", pq.NoData(), b"n\x00\x00\x00\x04"),
    ("backend", pq.PortalSuspended(), b"s\x00\x00\x00\x04"),
    ("backend", pq.CopyData(b"\x00\x01"), b"d\x00\x00\x00\x06\x00\x01"),
    ("backend", pq.CopyDone(), b"c\x00\x00\x00\x04"),
]  # fmt: skip


def case_id(value: object) -> str:
    return type(value).__name__ if isinstance(value, pq.Message) else ""


def feed_all(reader: FrameReader, data: bytes, step: int | None) -> list[Frame]:
    if step is None:
        return reader.feed(data)
    got_frames: list[Frame] = []
    for i in range(0, len(data), step):
        got = reader.feed(data[i : i + step])
        if i + step < len(data):
            assert got == [] or len(got_frames) + len(got) <= 1
        got_frames += got
    return got_frames


def test_every_message_kind_has_a_case() -> None:
    for direction, table in DIRECTIONS.items():
        covered = {type(message) for d, message, _ in TYPED_CASES if d == direction}
        assert covered == set(table.values()), direction
        assert all(kind == cls.TYPE for kind, cls in table.items() if cls not in (pq.CopyData, pq.CopyDone))


@pytest.mark.parametrize(("direction", "message", "raw"), TYPED_CASES, ids=case_id)
def test_encode(direction: str, message: pq.Message, raw: bytes) -> None:
    assert message.encode() == raw


@pytest.mark.parametrize(("direction", "message", "raw"), TYPED_CASES, ids=case_id)
@pytest.mark.parametrize("step", [None, 1], ids=["whole", "bytewise"])
def test_decode(direction: str, message: pq.Message, raw: bytes, step: int | None) -> None:
    reader = FrameReader(1 << 20)
    got = feed_all(reader, raw, step)
    assert len(got) == 1 and got[0].raw == raw and reader.pending == 0
    assert DIRECTIONS[direction][got[0].type].decode(got[0]) == message


@pytest.mark.parametrize(("direction", "message", "raw"), TYPED_CASES, ids=case_id)
def test_trailing_bytes_are_kept(direction: str, message: pq.Message, raw: bytes) -> None:
    reader = FrameReader(1 << 20)
    trailing = b"Z\x00\x00"  # the start of a next frame
    got = reader.feed(raw + trailing)
    assert [f.raw for f in got] == [raw]
    assert reader.pending == len(trailing)
    assert reader.feed(b"\x00\x05I") == [Frame(ord("Z"), b"Z\x00\x00\x00\x05I")]


def test_many_frames_in_one_chunk() -> None:
    raw = b"".join(r for _, _, r in TYPED_CASES)
    got = FrameReader(1 << 20).feed(raw)
    assert [f.raw for f in got] == [r for _, _, r in TYPED_CASES]


def test_scan_reports_kinds_and_the_last_status() -> None:
    chunk, kinds, status = FrameReader(1 << 20).scan(b"".join(r for d, _, r in TYPED_CASES if d == "backend"))
    assert kinds.count(Backend.READY_FOR_QUERY) == 2 and status == ord("E") and len(chunk) > 0


def test_a_remembered_layout_is_used_only_for_the_same_headers() -> None:
    """A chunk framed as one seen before (same length, same headers at the same offsets) is not walked again;
    one of the same length framed otherwise is, and every answer is what a fresh reader gives."""
    answer = pq.DataRow((b"12345",)).encode() + pq.CommandComplete("SELECT 1").encode()
    chunks = [answer + pq.ReadyForQuery(status).encode() for status in "IIITE"]
    same_length = pq.DataRow((b"1234567890123456789",)).encode() + pq.ReadyForQuery("I").encode()
    error = pq.ErrorResponse((("S", "ERROR"), ("C", "XX000"), ("M", "x"))).encode()
    other = error + b"\0" * (len(chunks[0]) - len(error) - 6) + pq.ReadyForQuery("I").encode()  # not a valid frame
    assert len(same_length) == len(chunks[0]) == len(other)
    reader = FrameReader(1 << 20)
    for chunk in [*chunks, same_length, chunks[0], same_length, same_length, chunks[1]]:
        assert reader.scan(chunk) == FrameReader(1 << 20).scan(chunk)
    with pytest.raises(ProtocolViolation):
        FrameReader(1 << 20, frames.FRONTEND_TYPES).scan(chunks[0])  # a client reader keeps its own checks
    with pytest.raises(ProtocolViolation):
        reader.scan(other)


@pytest.mark.parametrize("step", [None, 1, 7, 170, 4096])
def test_runs_of_copy_data_read_as_message_by_message(step: int | None) -> None:
    """CopyData of one length in runs (checked in one step), broken by other lengths, other messages and chunk
    ends: the same messages as a walk one by one, from either direction's reader."""
    rows = [b"r" * 40] * 100 + [b"s" * 41] + [b"r" * 40] * 50 + [b""] * 40 + [b"t" * 40] * 60
    messages = [pq.CopyData(row).encode() for row in rows]
    messages.insert(120, pq.CopyDone().encode())  # another type inside a run
    raw = b"".join(messages)
    for reader in (FrameReader(1 << 20), FrameReader(1 << 20, frames.FRONTEND_TYPES)):
        size = step or len(raw)
        got = [f for i in range(0, len(raw), size) for f in reader.feed(raw[i : i + size])]
        assert [f.raw for f in got] == messages
        assert bytes(f.type for f in got) == bytes(m[0] for m in messages)
        assert FrameReader(1 << 20).scan(raw) == (raw, bytes(m[0] for m in messages), -1)  # the kinds, in one chunk


def test_empty_chunks_are_nothing_however_often() -> None:
    """No bytes (a trace of an empty write) is no messages, the first time and every later one."""
    reader = FrameReader(1 << 20)
    for _ in range(3):
        assert reader.scan(b"") == (b"", b"", -1) and reader.feed(b"") == []


def test_a_byte_means_a_message_per_direction() -> None:
    """'E' is Execute from a client and ErrorResponse from a server; 'S' Sync and ParameterStatus; ..."""
    assert Frontend.EXECUTE == Backend.ERROR_RESPONSE and Frontend.DESCRIBE == Backend.DATA_ROW
    assert Frontend.CLOSE == Backend.COMMAND_COMPLETE and Frontend.SYNC == Backend.PARAMETER_STATUS
    frame = Frame(ord("C"), b"C\x00\x00\x00\x08Ss1\x00")
    assert pq.FRONTEND[frame.type].decode(frame) == pq.Close(S, "s1")
    assert pq.BACKEND[frame.type].decode(frame) == pq.CommandComplete("Ss1")
    assert {int(kind) for kind in Frontend} == frames.FRONTEND_TYPES


STARTUP_CASES: list[tuple[frames.StartupPacket, bytes]] = [
    (frames.SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (frames.GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (
        frames.CancelRequest(77, b"\x00\x00\x00\x09"),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x4d\x00\x00\x00\x09",
    ),
    (
        frames.CancelRequest(77, bytes(range(32))),
        b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x00\x4d" + bytes(range(32)),
    ),
    (
        frames.StartupMessage(3, 0, (("user", "alice"), ("database", "db"))),
        b"\x00\x00\x00\x20\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00",
    ),
    (frames.StartupMessage(3, 2, ()), b"\x00\x00\x00\x09\x00\x03\x00\x02\x00"),
]


@pytest.mark.parametrize(("message", "raw"), STARTUP_CASES, ids=lambda v: type(v).__name__)
def test_startup_encode(message: frames.StartupPacket, raw: bytes) -> None:
    assert frames.encode_startup(message) == raw


@pytest.mark.parametrize(("message", "raw"), STARTUP_CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_startup_decode(message: frames.StartupPacket, raw: bytes, mode: str) -> None:
    reader = frames.StartupReader()
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
    reader = frames.StartupReader()
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
        (b"Q\x00\x00\x10\x01", None),  # one byte over it
        (b"\x00\x00\x00\x00\x05", frames.FRONTEND_TYPES),  # not a frontend message type
        (b"Z\x00\x00\x00\x05I", frames.FRONTEND_TYPES),  # a backend type from a client
    ],
)
def test_frame_malformed(raw: bytes, allowed: frozenset[int] | None) -> None:
    with pytest.raises(ProtocolViolation) as info:
        FrameReader(4096, allowed).feed(raw)
    assert info.value.sqlstate == "08P01"


def test_frame_at_the_limit_is_read() -> None:
    raw = frames.pack(Frontend.QUERY, b"x" * 4091 + b"\0")
    assert FrameReader(4096, frames.FRONTEND_TYPES).feed(raw) == [Frame(Frontend.QUERY, raw)]


MALFORMED: list[tuple[type[pq.Message], bytes]] = [
    (pq.Query, b"Q\x00\x00\x00\x06ab"),  # unterminated
    (pq.Query, b"Q\x00\x00\x00\x07a\x00b"),  # bytes after the string
    (pq.Query, b"Q\x00\x00\x00\x06\xff\x00"),  # not UTF-8
    (pq.Parse, b"P\x00\x00\x00\x08\x00a\x00\x00"),  # truncated count
    (pq.Parse, b"P\x00\x00\x00\x0b\x00a\x00\x00\x02\x00\x00"),  # too few OIDs
    (pq.Bind, b"B\x00\x00\x00\x06p\x00"),  # no statement name
    (pq.Bind, b"B\x00\x00\x00\x0e\x00\x00\x00\x02\x00\x00\x00\x00\x00\x01"),  # 2 formats, 1 parameter
    (pq.Bind, b"B\x00\x00\x00\x10\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    (pq.Bind, b"B\x00\x00\x00\x10\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09\x00\x00"),  # value beyond the message
    (pq.Bind, b"B\x00\x00\x00\x0d\x00\x00\x00\x00\x00\x00\x00\x00x"),  # trailing byte
    (pq.Bind, b"B\x00\x00\x00\x07\xff\x00\x00"),  # portal not UTF-8
    (pq.Describe, b"D\x00\x00\x00\x06X\x00"),  # neither 'S' nor 'P'
    (pq.Describe, b"D\x00\x00\x00\x06Ss"),  # unterminated
    (pq.Describe, b"D\x00\x00\x00\x07S\x00x"),  # bytes after the name
    (pq.Describe, b"D\x00\x00\x00\x04"),  # empty
    (pq.Close, b"C\x00\x00\x00\x07P\xff\x00"),  # not UTF-8
    (pq.Execute, b"E\x00\x00\x00\x05\x00"),  # no row limit
    (pq.Execute, b"E\x00\x00\x00\x0a\x00\x00\x00\x00\x00x"),  # a byte too many
    (pq.Sync, b"S\x00\x00\x00\x05x"),  # a body
    (pq.CopyFail, b"f\x00\x00\x00\x06no"),
    (pq.ReadyForQuery, b"Z\x00\x00\x00\x05X"),
    (pq.ErrorResponse, b"E\x00\x00\x00\x07Sx\x00"),  # no final NUL
    (pq.NoticeResponse, b"N\x00\x00\x00\x07Sx\x00"),
    (pq.Authentication, b"R\x00\x00\x00\x06\x00\x00"),
    (pq.BackendKeyData, b"K\x00\x00\x00\x08\x00\x00\x00\x01"),
    (pq.ParameterStatus, b"S\x00\x00\x00\x07ab\x00"),  # one string of two
    (pq.RowDescription, b"T\x00\x00\x00\x06\x00\x01"),  # one column announced, none there
    (pq.RowDescription, b"T\x00\x00\x00\x06\xff\xff"),  # negative count
    (pq.RowDescription, b"T\x00\x00\x00\x0a\x00\x01a\x00\x00\x00"),  # truncated column
    (pq.DataRow, b"D\x00\x00\x00\x0a\x00\x02\x00\x00\x00\x00"),  # two values announced, one there
    (pq.DataRow, b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xfe"),  # length -2
    (pq.DataRow, b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x02x"),  # value beyond the message
    (pq.DataRow, b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x00x"),  # trailing byte
    (pq.DataRow, b"D\x00\x00\x00\x05\x00"),  # no count
    (pq.CommandComplete, b"C\x00\x00\x00\x07SEL"),  # unterminated
    (pq.ParameterDescription, b"t\x00\x00\x00\x0a\x00\x02\x00\x00\x00\x19"),  # two types announced, one there
    (pq.ParseComplete, b"1\x00\x00\x00\x05x"),  # a body
]


@pytest.mark.parametrize(("kind", "raw"), MALFORMED, ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_decode_malformed(kind: type[pq.Message], raw: bytes) -> None:
    got = FrameReader(4096).feed(raw)
    assert len(got) == 1
    with pytest.raises(ProtocolViolation) as info:
        kind.decode(got[0])
    assert info.value.sqlstate == "08P01"
    assert pq.try_decode(kind, got[0]) is None


def test_try_decode_of_a_valid_frame() -> None:
    frame = Frame(Frontend.BIND, pq.Bind("", "s1", (), (b"x",), ()).encode())
    assert pq.try_decode(pq.Bind, frame) == pq.Bind("", "s1", (), (b"x",), ())


def test_bind_format_of() -> None:
    assert pq.Bind("", "", (), (b"a", b"b"), ()).format_of(1) == 0
    assert pq.Bind("", "", (1,), (b"a", b"b"), ()).format_of(1) == 1
    assert pq.Bind("", "", (0, 1), (b"a", b"b"), ()).format_of(1) == 1


def test_sasl_mechanisms_round_trip() -> None:
    frame = FrameReader(4096).feed(pq.Authentication.sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]).encode())[0]
    auth = pq.Authentication.decode(frame)
    assert auth.code == pq.AUTH_SASL
    assert auth.mechanisms() == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert struct.unpack("!i", frame.raw[1:5])[0] == len(frame.raw) - 1


@pytest.mark.parametrize(
    ("body", "flag"),
    [
        (b"SCRAM-SHA-256\x00\x00\x00\x00\x20n,,n=,r=abc", "n"),
        (b"SCRAM-SHA-256\x00\x00\x00\x00\x20y,,n=,r=abc", "y"),
        (b"SCRAM-SHA-256-PLUS\x00\x00\x00\x00\x20p=tls-server-end-point,,n=,r=abc", "p"),
        (b"secret\x00", None),  # a password
        (b"c=biws,r=abc,p=proof", None),  # a SASLResponse
    ],
)
def test_sasl_initial_gs2_flag(body: bytes, flag: str | None) -> None:
    assert pq.sasl_initial_gs2_flag(Frame(Frontend.PASSWORD, frames.pack(Frontend.PASSWORD, body))) == flag


def test_error_response_of_an_exception() -> None:
    error = pq.ErrorResponse.of(InvalidParameterValue("bad", hint="h"), "FATAL")
    assert error.fields == (("S", "FATAL"), ("V", "FATAL"), ("C", "22023"), ("M", "bad"), ("H", "h"))
    assert error.get("C") == "22023" and error.get("D") is None
    internal = pq.ErrorResponse.of(KeyError("k"))
    assert internal.get("C") == "XX000" and internal.get("S") == "ERROR"


def test_warning_notice() -> None:
    raw = pq.NoticeResponse.warning("careful").encode()
    assert raw == b"N\x00\x00\x00\x27SWARNING\x00VWARNING\x00C01000\x00Mcareful\x00\x00"


@pytest.mark.parametrize("kind", [pq.ErrorResponse, pq.NoticeResponse])
def test_replace_fields_keeps_the_kind(kind: type[pq.ErrorResponse | pq.NoticeResponse]) -> None:
    raw = kind((("S", "ERROR"), ("W", "context"), ("M", "m"), ("L", "12"))).encode()
    replaced = pq.replace_fields(Frame(raw[0], raw), "WL", (("P", "3"),))
    assert replaced == kind((("S", "ERROR"), ("M", "m"), ("P", "3"))).encode()


def test_is_fatal() -> None:
    fatal = pq.ErrorResponse((("S", "FATAL"), ("M", "bye"))).encode()
    error = pq.ErrorResponse((("S", "ERROR"), ("M", "no"))).encode()
    assert pq.is_fatal(Frame(fatal[0], fatal)) and not pq.is_fatal(Frame(error[0], error))
