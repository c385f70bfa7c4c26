"""A bounded, seeded protocol fuzz: ≥ 10,000 malformed frames over many connections, a healthy client alongside.

Three kinds of connection, each with its own proxy process so that its log is ours alone:

- **fatal**: garbage in the startup phase, or after startup a frame the proxy itself must refuse
  (a type byte no frontend sends, a length below 4 or beyond ``max_message_bytes``, bytes after
  Terminate). The answer is FATAL 08P01 (or nothing, when the frame is incomplete) and the
  connection is closed.
- **relayed**: well-framed messages with malformed bodies (field counts, missing terminators,
  truncations, garbage) that do not mention pgml. The proxy relays them untouched, so the answer
  must be exactly the server's own: the same frames sent to the server directly give the same
  SQLSTATEs and transaction states.
- **pgml**: the same malformations in statements that mention pgml (the rewriter's path): every
  answer is 08P01 or another real SQLSTATE — never XX000 — and the session is either still usable
  or closed after a FATAL.

A healthy client runs real queries (plain, extended with parameters, pgml calls, transactions)
through the same proxy the whole time; none of them may fail. At the end the proxy still runs and
its log holds no traceback.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.wire.frames import (
    CANCEL_REQUEST_CODE,
    FRONTEND_TYPES,
    SSL_REFUSE,
    FrameReader,
    Frontend,
    SSLRequest,
    encode_startup,
    pack,
)
from tests.conftest import Postgres, ProxyProcess, start_proxy
from tests.test_bad_input import (
    FLUSH,
    SYNC,
    TERMINATE,
    Message,
    Wire,
    bind,
    codes,
    describe,
    execute,
    fields,
    parse,
    query,
    select_one,
    startup_packet,
)

pytestmark = pytest.mark.pg_matrix

SEED = 20260901
MAX_MESSAGE = 1 << 20  # the fuzz proxy's max_message_bytes: oversized lengths are cheap to produce
FRONTEND = sorted(FRONTEND_TYPES)
NOT_FRONTEND = [t for t in range(256) if t not in FRONTEND_TYPES]
RELAYED = [t for t in FRONTEND if chr(t) not in "Xpdcf"]
ROLE = "pgml_fuzz"  # an ordinary role: a random FunctionCall cannot reach superuser-only functions


# --------------------------------------------------------------------------- #
# Frame generators
# --------------------------------------------------------------------------- #


def frame(kind: bytes, body: bytes) -> bytes:
    return pack(kind[0], body)


class Frames:
    """Malformed frames from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def garbage(self, low: int = 0, high: int = 40) -> bytes:
        return self.rng.randbytes(self.rng.randrange(low, high))

    def count(self) -> int:
        return self.rng.choice([-32768, -2, -1, 0, 1, 2, 3, 7, 255, 32767])

    def sql(self, pgml: bool, params: bool = True) -> bytes:
        texts = ["SELECT 1", "SELECT $1", "SELECT $1::int + $2", "BEGIN", "COMMIT", "SELECT 'x'", ""]
        if pgml:
            texts = [
                "SELECT pgml.version()", "SELECT pgml.chunk('character', 'a b')", "SELECT pgml.embed('no/such', 'x')",
                "SELECT pgml.embed('m', 'x', '[[[[]]]]'::jsonb)", "BEGIN; SELECT pgml.predict('p', ARRAY[1])",
            ]  # fmt: skip
            if params:  # statements rewritten at each Bind (the proxy decodes those Binds itself)
                texts += ["SELECT * FROM pgml.chunk('character', $1)", "SELECT pgml.predict('p', $1::real[])"]
        text = self.rng.choice(texts).encode()
        match self.rng.randrange(6):
            case 0:  # invalid UTF-8 inside
                cut = self.rng.randrange(len(text) + 1)
                bad = self.rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
                return text[:cut] + bad + text[cut:]
            case 1:
                return text + self.garbage(1, 8).replace(b"\0", b"")
            case _:
                return text

    def body(self, kind: int, pgml: bool, params: bool = True) -> bytes:
        """A malformed body for a frame of this type (the frame's length stays consistent)."""
        sql = self.sql(pgml, params)
        rng = self.rng
        match chr(kind):
            case "Q":
                return rng.choice([sql, sql + b"\0" + self.garbage(1, 9), sql + b"\0\0", b"", sql + b"\0"])
            case "P":
                name = rng.choice([b"", b"s1", b"\xff", b"pgml_proxy_s"])
                tail = rng.choice([
                    b"", b"\0", struct.pack("!h", self.count()), struct.pack("!hI", 2, 25),
                    struct.pack("!hI", 1, 25) + b"x", struct.pack("!hI", -1, 0),
                ])  # fmt: skip
                return name + b"\0" + sql + rng.choice([b"\0", b""]) + tail
            case "B":
                parts = [rng.choice([b"", b"p", b"\xfe"]) + b"\0", rng.choice([b"", b"s1", b"nosuch"]) + b"\0"]
                nformats = self.count()
                parts.append(struct.pack("!h", nformats))
                parts += [struct.pack("!h", self.count()) for _ in range(min(max(nformats, 0), 3))]
                nparams = self.count()
                parts.append(struct.pack("!h", nparams))
                for _ in range(min(max(nparams, 0), 3)):
                    size = rng.choice([-2, -1, 0, 1, 4, 1000, 2**31 - 1])
                    parts.append(struct.pack("!i", size) + self.garbage(0, 6))
                parts.append(struct.pack("!h", self.count()))
                body = b"".join(parts)
                return body[: rng.randrange(len(body) + 1)] if rng.random() < 0.3 else body
            case "E":
                return rng.choice([b"", b"p", b"\0", b"\0\0\0", b"p\0" + self.garbage(1, 9), b"\xff\0\0\0\0\0"])
            case "D" | "C":
                return rng.choice([b"", b"S", b"X\0", b"P", b"Sname", b"P\xff\0", b"S\0\0", self.garbage()])
            case "F":
                # A FunctionCall of now() (OID 1299) or of no function, with malformed argument fields.
                return struct.pack("!I", rng.choice([1299, 0, 4294967295])) + self.garbage(0, 24)
            case "S" | "H":
                return self.garbage(1, 16)
            case "d" | "c" | "f":
                return self.garbage()
            case "p":
                return self.garbage(0, 30)
            case _:  # X: Terminate with a body
                return self.garbage(1, 8)

    def relayed(self, pgml: bool, params: bool = True) -> bytes:
        """One well-framed frame whose body is malformed (Terminate, password and COPY messages excluded)."""
        kind = self.rng.choice(RELAYED)
        return frame(bytes([kind]), self.body(kind, pgml, params))

    def fatal(self) -> tuple[str, bytes]:
        """A frame the proxy itself refuses, and what it is."""
        choice = self.rng.randrange(5)
        if choice == 0:
            kind = self.rng.choice(NOT_FRONTEND)
            return "type", bytes([kind]) + struct.pack("!i", self.rng.randrange(4, 64)) + self.garbage()
        if choice == 1:
            kind = self.rng.choice(FRONTEND)
            return "short", bytes([kind]) + struct.pack("!i", self.rng.choice([-(2**31), -1, 0, 1, 3]))
        if choice == 2:
            kind = self.rng.choice(FRONTEND)
            size = self.rng.choice([MAX_MESSAGE + 1, 2**30, 2**31 - 1])
            return "oversized", bytes([kind]) + struct.pack("!i", size) + self.garbage()
        if choice == 3:
            return "after-terminate", TERMINATE + self.garbage(1, 64)
        kind = self.rng.choice(FRONTEND)  # a frame that never completes before the client stops sending
        return "truncated", bytes([kind]) + struct.pack("!i", self.rng.randrange(64, 4096)) + self.garbage(0, 60)

    def startup(self) -> tuple[str, bytes]:
        """Garbage in the startup phase."""
        rng = self.rng
        choice = rng.randrange(7)
        if choice == 0:
            return "random", self.garbage(8, 80)
        if choice == 1:
            return "length", struct.pack("!i", rng.choice([0, 4, 7, 10_001, 2**31 - 1, -1])) + self.garbage(4, 20)
        if choice == 2:
            version = rng.choice([0x00020000, 0x00040000, 0x12345678, 0])
            return "version", struct.pack("!ii", 8, version)
        if choice == 3:
            body = rng.choice([b"user\0", b"user\0postgres", b"user\0postgres\0database\0", b"\xff\xfe\0x\0\0"])
            return "params", struct.pack("!ii", 8 + len(body), 196608) + body
        if choice == 4:
            return "cancel", struct.pack("!ii", rng.choice([12, 300]), CANCEL_REQUEST_CODE) + self.garbage(4, 8)
        if choice == 5:
            return "after-ssl", encode_startup(SSLRequest()) + startup_packet()
        return "http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + self.garbage()


# --------------------------------------------------------------------------- #
# Running connections
# --------------------------------------------------------------------------- #


def closed_answer(sock: socket.socket, *, complete: bool, ssl: bool = False) -> list[Message]:
    """Every message until the peer closes; ``ssl``: after an SSLRequest (maybe answered 'N' first).

    ``complete``: what was sent is a whole packet or frame, which the peer answers and then closes;
    otherwise the client stops sending (half-close) so that an incomplete one ends too.
    """
    with sock:
        if not complete:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        sock.settimeout(20)
        data = b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    if ssl and data[:1] == SSL_REFUSE:
        data = data[1:]
    frames = FrameReader(1 << 24).feed(data)
    return [(chr(f.type), f.raw) for f in frames]


def assert_fatal_08p01(answer: list[Message], what: str) -> None:
    errors = [fields(raw) for kind, raw in answer if kind == "E"]
    assert errors, (what, answer)
    assert errors[-1]["S"] == "FATAL" and errors[-1]["C"] == "08P01", (what, errors)


def outcome(wire: Wire, frames: list[bytes]) -> list[str]:
    """Send each frame followed by Sync; the SQLSTATEs and statuses seen, until the connection ends."""
    seen: list[str] = []
    for raw in frames:
        try:
            wire.send(raw, SYNC)
            for kind, message in wire.until_ready():
                if kind == "E":
                    error = fields(message)
                    seen.append(f"{error['S']}:{error['C']}")
                elif kind == "Z":
                    seen.append("Z" + chr(message[5]))
        except (EOFError, OSError):
            seen.append("closed")
            break
    return seen


def resync(wire: Wire) -> None:
    """Read every answer still owed (a malformed Sync may have been answered twice): up to a marker's row.

    The ROLLBACK ends a transaction a fuzzed ``BEGIN`` may have left open (or aborted).
    """
    marker = f"resync-{random.random()}".encode()
    wire.send(query(b"ROLLBACK; SELECT '" + marker + b"'"))
    while True:
        kind, raw = wire.message()
        if kind == "D" and marker in raw:
            break
    wire.until_ready()


class Healthy(threading.Thread):
    """A client doing real work the whole time; every failure is recorded."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.rounds = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    n = self.rounds
                    assert conn.execute("SELECT %s::int + 1", [n]).fetchone() == (n + 1,)
                    rows = conn.execute("SELECT chunk FROM pgml.chunk('character', %s)", [f"healthy {n}"]).fetchall()
                    assert rows == [(f"healthy {n}",)], rows
                    with conn.transaction():
                        assert conn.execute("SELECT count(*) FROM pgml.chunk('character', 'a b')").fetchone() == (1,)
                    assert conn.execute("SELECT pgml.version()").fetchone() is not None
                    self.rounds += 1
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def fuzz_proxy(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone():
            conn.execute(f"CREATE ROLE {ROLE} LOGIN")
    handle = start_proxy(pg.dsn(), tmp_path_factory.mktemp("fuzz"), PGML_PROXY_PROXY_MAX_MESSAGE_BYTES=str(MAX_MESSAGE))
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:  # the pgml schema, once
        conn.execute("SELECT pgml.version()").fetchone()
    yield handle
    handle.stop()


def run_alongside(proxy: ProxyProcess, work: Callable[[], int]) -> int:
    """Run ``work`` with a healthy client alongside; the frames it sent."""
    healthy = Healthy(proxy.dsn())
    healthy.start()
    try:
        sent = work()
    finally:
        healthy.stop.set()
        healthy.join(30)
    assert not healthy.failures, healthy.failures
    assert healthy.rounds > 0
    assert proxy.proc.poll() is None, proxy.log_text()[-3000:]
    log = proxy.log_text()
    for bad in ("Traceback", "Fatal error", "session failed", "rewrite failed", "XX000"):
        assert bad not in log, log[-4000:]
    return sent


# --------------------------------------------------------------------------- #
# The fuzz
# --------------------------------------------------------------------------- #

FATAL_CONNECTIONS = 400
STARTUP_CONNECTIONS = 300
RELAYED_CONNECTIONS = 36
RELAYED_FRAMES = 300  # per connection
COMPARED = 6  # relayed connections also replayed against the server directly
PGML_CONNECTIONS = 30
PGML_FRAMES = 100


def test_protocol_fuzz(fuzz_proxy: ProxyProcess, pg: Postgres) -> None:
    rng = random.Random(SEED)
    gen = Frames(rng)
    started = time.monotonic()

    def work() -> int:
        sent = 0
        for _ in range(STARTUP_CONNECTIONS):
            what, data = gen.startup()
            sock = socket.create_connection(("127.0.0.1", fuzz_proxy.port), timeout=20)
            sock.sendall(data)
            answer = closed_answer(sock, complete=what not in ("random", "cancel"), ssl=what == "after-ssl")
            sent += 1
            if what in ("random", "cancel"):  # maybe incomplete (then closed without a word) or a cancel
                assert all(fields(raw)["C"] == "08P01" for kind, raw in answer if kind == "E"), (what, answer)
            else:  # a complete bad packet
                assert_fatal_08p01(answer, what)
        for _ in range(FATAL_CONNECTIONS):
            wire = Wire(fuzz_proxy.port, user=ROLE)
            before = [gen.relayed(pgml=False) for _ in range(rng.randrange(3))]
            if before:  # some well-framed messages first, each answered by the server
                outcome(wire, before)
                resync(wire)
            what, data = gen.fatal()
            wire.sock.sendall(data)
            answer = closed_answer(wire.sock, complete=what != "truncated")
            sent += len(before) + 1
            if what in ("type", "short", "oversized"):
                assert_fatal_08p01(answer, what)
            else:  # Terminate (what follows it is never read), or a frame that never completed: no answer
                assert codes(answer) == [], (what, answer)
        for index in range(RELAYED_CONNECTIONS):
            frames = [gen.relayed(pgml=False) for _ in range(RELAYED_FRAMES)]
            wire = Wire(fuzz_proxy.port, user=ROLE)
            through_proxy = outcome(wire, frames)
            wire.close()
            assert not any(s.endswith("XX000") for s in through_proxy), through_proxy
            if index < COMPARED:
                direct = Wire(pg.port, user=ROLE)
                assert outcome(direct, frames) == through_proxy  # relayed untouched: the server's own answers
                direct.close()
            sent += len(frames)
        for _ in range(PGML_CONNECTIONS):
            wire = Wire(fuzz_proxy.port, user=ROLE)
            frames = [gen.relayed(pgml=True, params=False) for _ in range(PGML_FRAMES)]
            seen = outcome(wire, frames)
            sent += len(frames)
            assert not any(s.endswith("XX000") for s in seen), seen
            if seen[-1] == "closed":  # the session may end only with FATAL 08P01 (or the server's FATAL)
                fatal = [s for s in seen if s.startswith("FATAL")]
                assert fatal and fatal[-1] == "FATAL:08P01", seen
            else:
                resync(wire)
                select_one(wire)
                wire.close()
        return sent

    sent = run_alongside(fuzz_proxy, work)
    assert sent >= 10_000, sent
    assert time.monotonic() - started < 120  # bounded (a minute on an idle machine)


def test_malformed_frames_with_deferred_statements(fuzz_proxy: ProxyProcess) -> None:
    """Malformed Bind/Parse/Describe/Execute/Close while the session holds statements the proxy rewrites at Bind.

    Here the proxy decodes the Binds itself; a malformed one is the server's to refuse (its own 08P01
    ERROR; the session goes on) or the proxy's (FATAL 08P01), never a connection dropped without a word.
    """
    rng = random.Random(SEED + 1)
    gen = Frames(rng)

    def work() -> int:
        sent = 0
        for _ in range(10):
            wire = Wire(fuzz_proxy.port, user=ROLE)
            wire.send(parse("SELECT * FROM pgml.chunk('character', $1)", "s1", [25]), SYNC)
            wire.until_ready()
            frames = []
            for _ in range(40):
                kind = rng.choice([b"B", b"B", b"B", b"P", b"D", b"E", b"C"])
                body = gen.body(kind[0], pgml=rng.random() < 0.5)
                if kind == b"B" and rng.random() < 0.7:  # a Bind of the deferred statement itself
                    body = b"\0s1\0" + body.split(b"\0", 2)[-1]
                frames.append(frame(kind, body))
            seen = outcome(wire, frames)
            sent += len(frames)
            assert not any(s.endswith("XX000") for s in seen), seen
            if seen[-1] == "closed":
                fatal = [s for s in seen if s.startswith("FATAL")]
                assert fatal and fatal[-1] == "FATAL:08P01", seen
            else:
                resync(wire)
                wire.send(bind([b"still here"], statement="s1"), describe(), execute(), SYNC)
                assert codes(wire.until_ready()) == []
                select_one(wire)
                wire.close()
        return sent

    assert run_alongside(fuzz_proxy, work) >= 400


def test_flush_and_sync_between_malformed_pgml_frames(fuzz_proxy: ProxyProcess, tmp_path: Path) -> None:
    """A pipelined batch: malformed pgml frames, Flush, then valid work in the same batch after Sync."""
    wire = Wire(fuzz_proxy.port, user=ROLE)
    bad_parse = frame(b"P", b"\0SELECT pgml.version()\0" + struct.pack("!h", 3))
    wire.send(bad_parse, FLUSH, bind(), execute(), SYNC, query("SELECT pgml.version() IS NOT NULL"))
    got = wire.until_ready(2)
    assert codes(got) == ["08P01"], got
    assert [kind for kind, _ in got][-4:] == ["T", "D", "C", "Z"], got
    wire.close()


def test_frame_reader_large_message_in_many_reads() -> None:
    """A large message arriving in many small reads is joined once: about the cost of one copy of it.

    (Joining the buffer again at every read made a 64 MiB message cost seconds of the event loop,
    every session's.) Relative timing only: reading it in 512 pieces against joining those pieces once.
    """
    message = pack(Frontend.QUERY, b"x" * (32 << 20) + b"\0")
    step = len(message) // 512 + 1
    pieces = [message[i : i + step] for i in range(0, len(message), step)]
    assert len(pieces) == 512

    def read() -> float:
        reader = FrameReader(1 << 30, FRONTEND_TYPES)
        start = time.perf_counter()
        got = [reader.scan(piece)[0] for piece in pieces]
        elapsed = time.perf_counter() - start
        assert b"".join(got) == message and reader.pending == 0
        return elapsed

    def join() -> float:
        start = time.perf_counter()
        b"".join(pieces)
        return time.perf_counter() - start

    copy = min(join() for _ in range(3))
    many = min(read() for _ in range(3))
    assert many < 20 * copy, (many, copy)  # re-joining at every read: ~250 copies
