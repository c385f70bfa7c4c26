"""Two proxy replicas in front of one database: no state between them but the database (and the artifact key they
share by configuration), and CancelRequests that land on either replica ([proxy] peers).

Replica A lists itself and B as peers (one list may serve every replica); B lists A, a peer that accepts
connections and never answers (hung) and a port nobody listens on (down), with peer_timeout = 1 s.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from proxy.config import ConfigError, load
from proxy.embedded import free_port
from proxy.wire import messages as pq
from proxy.wire.frames import CancelRequest, Frame, StartupReader, encode_startup
from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database, start_proxy

pytestmark = pytest.mark.pg_matrix

PEER_TIMEOUT = 1.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Replicas:
    a: ProxyProcess
    b: ProxyProcess


@pytest.fixture(scope="module")
def replicas(pg: Postgres, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    hung = socket.create_server(("127.0.0.1", 0), backlog=16)  # connects, never answers
    port_a, port_b, down = free_port(), free_port(), free_port()
    base = tmp_path_factory.mktemp("replicas")
    shared = {
        "PGML_PROXY_ENGINE_MODEL_DIRS": str(model_dir),
        "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(base / "artifact.key"),  # shared, as replicas must
        "PGML_PROXY_PROXY_PEER_TIMEOUT": str(PEER_TIMEOUT),
    }
    peers_a = f"127.0.0.1:{port_a},127.0.0.1:{port_b}"
    peers_b = f"127.0.0.1:{port_a},127.0.0.1:{hung.getsockname()[1]},127.0.0.1:{down}"
    (base / "a").mkdir()
    (base / "b").mkdir()
    a = start_proxy(pg.dsn(), base / "a", port_a, PGML_PROXY_PROXY_PEERS=peers_a, **shared)
    try:
        b = start_proxy(pg.dsn(), base / "b", port_b, PGML_PROXY_PROXY_PEERS=peers_b, **shared)
        try:
            yield Replicas(a, b)
        finally:
            b.stop()
    finally:
        a.stop()
        hung.close()


class Raw:
    """A protocol client on a raw socket, to learn the cancel key the proxy relayed (libpq does not tell it)."""

    def __init__(self, port: int, minor: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        body = struct.pack("!i", (3 << 16) | minor) + b"user\0postgres\0database\0postgres\0\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.buf = b""
        self.key = pq.BackendKeyData(0, b"")
        while (frame := self.next()).type != ord("Z"):
            if frame.type == ord("K"):
                self.key = pq.BackendKeyData.decode(frame)
        assert self.key.key, "no BackendKeyData"

    def next(self) -> Frame:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!i", self.buf, 1)[0]:
            data = self.sock.recv(65536)
            assert data, "the proxy closed the connection"
            self.buf += data
        n = 1 + struct.unpack_from("!i", self.buf, 1)[0]
        raw, self.buf = self.buf[:n], self.buf[n:]
        return Frame(raw[0], raw)

    def query(self, sql: str) -> None:
        self.sock.sendall(pq.Query(sql).encode())

    def outcome(self) -> str:
        """The SQLSTATE of the statement sent (``""``: it completed), once it is ready for the next."""
        state = ""
        while (frame := self.next()).type != ord("Z"):
            if frame.type == ord("E"):
                state = dict(pq.ErrorResponse.decode(frame).fields).get("C", "")
        return state

    def close(self) -> None:
        self.sock.close()


def send_cancel(port: int, pid: int, key: bytes) -> float:
    """The client's CancelRequest, by hand to ``port``; seconds until that replica closed the connection."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_startup(CancelRequest(pid, key)))
        assert sock.recv(1) == b""
    return time.monotonic() - started


def lines(proxy: ProxyProcess, text: str) -> int:
    return sum(text in line for line in proxy.log_text().splitlines())


def test_forwarded_cancel_codec() -> None:
    for request in (CancelRequest(77, b"\x00\x00\x00\x09", forwarded=True), CancelRequest(5, bytes(range(32)), True)):
        reader = StartupReader()
        reader.feed(encode_startup(request))
        assert reader.next_packet() == request
    assert encode_startup(CancelRequest(1, b"abcd", True))[4:8] != encode_startup(CancelRequest(1, b"abcd"))[4:8]


def test_peers_configuration() -> None:
    config = load(None, {"PGML_PROXY_PROXY_PEERS": "10.0.0.5:6432,[::1]:7000", "PGML_PROXY_PROXY_PEER_TIMEOUT": "0.5"})
    assert config.proxy.peer_addresses == (("10.0.0.5", 6432), ("::1", 7000))
    assert config.proxy.peer_timeout == 0.5
    assert load(None, {}).proxy.peer_addresses == ()
    with pytest.raises(ConfigError, match=r"proxy\.peers: expected HOST:PORT, got 'replica-b'"):
        load(None, {"PGML_PROXY_PROXY_PEERS": "replica-b"})
    with pytest.raises(ConfigError, match=r"proxy\.peer_timeout"):
        load(None, {"PGML_PROXY_PROXY_PEER_TIMEOUT": "0"})


def test_trained_on_a_predicts_on_b_and_deploys_seen_by_a(replicas: Replicas, pg: Postgres) -> None:
    project = "replicated project"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS replica_data")
        admin.execute("CREATE TABLE replica_data AS SELECT i::real AS x, (3 * i + 1)::real AS y"
                      " FROM generate_series(0, 49) i")  # fmt: skip
    with (
        psycopg.connect(replicas.a.dsn(), autocommit=True) as a,
        psycopg.connect(replicas.b.dsn(), autocommit=True) as b,
    ):
        a.execute("SELECT * FROM pgml.train(%s, 'regression', 'replica_data', 'y', 'linear')", [project])
        predict = "SELECT pgml.predict(%s, ARRAY[10.5]::real[])"
        assert b.execute(predict, [project]).fetchone() == pytest.approx((32.5,), rel=1e-4)
        assert a.execute(predict, [project]).fetchone() == pytest.approx((32.5,), rel=1e-4)  # A has it cached
        b.execute("SELECT * FROM pgml.train(%s, algorithm => 'ridge',"
                  " hyperparams => '{\"alpha\": 10000}', automatic_deploy => false)", [project])  # fmt: skip
        (ridge,) = b.execute("SELECT max(id) FROM pgml.models").fetchone() or ()
        assert b.execute("SELECT * FROM pgml.deploy(%s)", [ridge]).fetchone() == (project, "specific", "ridge")
        (by_ridge,) = b.execute("SELECT pgml.predict(%s::bigint, ARRAY[10.5]::real[])", [ridge]).fetchone() or ()
        assert by_ridge != pytest.approx(32.5, rel=1e-3)
        assert a.execute(predict, [project]).fetchone() == (by_ridge,)  # A's next predict: B's deployment


def test_schema_installed_from_both_at_once(replicas: Replicas, pg: Postgres) -> None:
    with scratch_database(pg, "replicas") as name:
        barrier = threading.Barrier(2)
        answers: dict[str, object] = {}

        def first_pgml_statement(side: str, proxy: ProxyProcess) -> None:
            with psycopg.connect(proxy.dsn(dbname=name), autocommit=True) as conn:
                barrier.wait()
                try:
                    answers[side] = conn.execute("SELECT pgml.version()").fetchone()
                except psycopg.Error as exc:
                    answers[side] = exc

        threads = [threading.Thread(target=first_pgml_statement, args=item) for item in vars(replicas).items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert answers["a"] == answers["b"] and isinstance(answers["a"], tuple), answers


@pytest.mark.parametrize("minor", [0, 2], ids=["protocol-3.0", "protocol-3.2"])
def test_cancel_sent_to_b_stops_a_query_on_a(replicas: Replicas, pg: Postgres, minor: int) -> None:
    if minor == 2 and pg.version < 18:
        pytest.skip("protocol 3.2 (longer cancel keys) needs PostgreSQL 18")
    client = Raw(replicas.a.port, minor)
    try:
        assert len(client.key.key) == (4 if minor == 0 else 32)
        client.query("SELECT pg_sleep(30)")
        time.sleep(0.5)
        started = time.monotonic()
        took = send_cancel(replicas.b.port, client.key.pid, client.key.key)
        assert client.outcome() == "57014"
        # A acts at once; B waits for its hung peer for peer_timeout, and no longer.
        assert time.monotonic() - started < PEER_TIMEOUT + 3
        assert PEER_TIMEOUT * 0.8 < took < PEER_TIMEOUT + 2
        client.query("SELECT 1")
        assert client.outcome() == ""
    finally:
        client.close()


def test_cancel_sent_to_b_stops_a_long_embed_on_a(replicas: Replicas, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS replica_texts; CREATE TABLE replica_texts AS SELECT i, "
                      "repeat('word ', 100) || i AS body FROM generate_series(1, 3000) i")  # fmt: skip
    client = Raw(replicas.a.port)
    try:
        client.query(f"SELECT count(pgml.embed('{MINILM}', body)) FROM (SELECT body FROM replica_texts LIMIT 32) t")
        assert client.outcome() == ""  # warm: the model is loaded
        client.query(f"SELECT count(pgml.embed('{MINILM}', body)) FROM (SELECT body FROM replica_texts LIMIT 32) t")
        started = time.monotonic()
        assert client.outcome() == ""
        mini = time.monotonic() - started  # about one mini-batch (batch_size 32)
        client.query(f"SELECT pgml.embed('{MINILM}', body) FROM replica_texts")
        time.sleep(max(1.0, 2 * mini))
        cancelled = time.monotonic()
        send_cancel(replicas.b.port, client.key.pid, client.key.key)
        assert client.outcome() == "57014"
        stopped = time.monotonic() - cancelled
        # Stopped within about a mini-batch (plus B's wait for its hung peer): far before the 94 batches' end.
        assert stopped < PEER_TIMEOUT + 3 * mini + 2, (stopped, mini)
        client.query("SELECT 1")
        assert client.outcome() == ""
    finally:
        client.close()


def test_unknown_key_is_forwarded_once_and_dropped(replicas: Replicas) -> None:
    pid = 987_654
    took = send_cancel(replicas.a.port, pid, b"\x00\x01\x02\x03")
    assert took < PEER_TIMEOUT + 2  # A's peers are itself and B, both up
    deadline = time.monotonic() + 10
    forwarded = f"cancel request for backend {pid} is not ours: forwarded to 2 of 2 peers"
    ignored = f"ignoring forwarded cancel request for unknown backend {pid}"
    while time.monotonic() < deadline and not (lines(replicas.a, ignored) and lines(replicas.b, ignored)):
        time.sleep(0.05)
    time.sleep(0.5)  # anything a loop would add comes now
    assert lines(replicas.a, forwarded) == 1
    assert lines(replicas.a, ignored) == 1  # A is its own peer: it took the forwarded copy and dropped it
    assert lines(replicas.b, ignored) == 1
    assert lines(replicas.b, f"backend {pid} is not ours") == 0  # B never forwarded it again
    assert lines(replicas.a, f"backend {pid}") + lines(replicas.b, f"backend {pid}") == 3


@pytest.fixture
def balancer(replicas: Replicas, tmp_path: Path) -> Iterator[int]:
    """HAProxy with docs/haproxy.cfg in front of both replicas (the example's addresses replaced by theirs)."""
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    assert haproxy is not None, "HAProxy is required (make test installs it: make deps)"
    port = free_port()
    config = (ROOT / "docs" / "haproxy.cfg").read_text().replace("bind :6432", f"bind 127.0.0.1:{port}")
    config = re.sub(r"(?m)^    server .*\n", "", config)
    config += "".join(f"    server {n} 127.0.0.1:{p.port}\n" for n, p in vars(replicas).items())
    (tmp_path / "haproxy.cfg").write_text(config)
    proc = subprocess.Popen([str(haproxy), "-db", "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_psql_cancel_through_the_load_balancer(replicas: Replicas, balancer: int) -> None:
    """A driver's own cancel through the balancer: leastconn sends it to the replica without the session."""
    forwarded = "is not ours: forwarded to"
    before = lines(replicas.a, forwarded) + lines(replicas.b, forwarded)
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{balancer}/postgres", autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < PEER_TIMEOUT + 5
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # The replica that took the cancel logs its forward once every peer answered (or timed out), which can be after
    # the owner already cancelled the query and the client went on: wait for that line.
    deadline = time.monotonic() + PEER_TIMEOUT + 10
    while lines(replicas.a, forwarded) + lines(replicas.b, forwarded) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines(replicas.a, forwarded) + lines(replicas.b, forwarded) == before + 1
