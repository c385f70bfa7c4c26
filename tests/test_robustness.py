"""Bad input, broken upstreams, limits and shutdown: one connection fails cleanly, nothing else does."""

from __future__ import annotations

import signal
import socket
import struct
import time
from pathlib import Path

import psycopg
import pytest

from proxy.embedded import Cluster, find_bin_dir, free_port
from proxy.wire import messages as pq
from proxy.wire.frames import FrameReader, SSLRequest, StartupMessage, encode_startup
from tests.conftest import Postgres, ProxyProcess, start_proxy

pytestmark = pytest.mark.pg_matrix


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def errors_in(data: bytes) -> list[pq.ErrorResponse]:
    frames = FrameReader(1 << 24).feed(data)
    return [pq.ErrorResponse.decode(f) for f in frames if f.type == ord("E")]


def startup(sock: socket.socket) -> None:
    """Complete a trust-auth startup as user postgres; return once ReadyForQuery arrives."""
    sock.sendall(encode_startup(StartupMessage(3, 0, (("user", "postgres"), ("database", "postgres")))))
    reader, deadline = FrameReader(1 << 24), time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(f.type == ord("Z") for f in reader.feed(sock.recv(65536))):
            return
    raise AssertionError("no ReadyForQuery")


def assert_healthy(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x04",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\xff" * 64,
    ],
    ids=["http", "short", "tls-hello", "ones"],
)
def test_garbage_before_startup(proxy: ProxyProcess, garbage: bytes) -> None:
    with psycopg.connect(proxy.dsn()) as bystander:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            answer = read_until_closed(sock)
        if answer:  # a complete bad packet gets FATAL 08P01; a truncated one just a close
            assert [e.get("C") for e in errors_in(answer)] == ["08P01"]
            assert errors_in(answer)[0].get("S") == "FATAL"
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert proxy.proc.poll() is None


def test_data_injected_after_ssl_request_is_refused(proxy: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(encode_startup(SSLRequest()) + pq.Query("SELECT 1").encode())
        answer = read_until_closed(sock)
    assert [e.get("C") for e in errors_in(answer)] == ["08P01"]


@pytest.mark.parametrize(
    "frame",
    [
        b"Q\x00\x00\x00\x02",  # length below 4
        b"Q" + struct.pack("!i", 300 * 1024 * 1024),  # over proxy.max_message_bytes
        b"\x01\x00\x00\x00\x04",  # unknown message type
        b"Q\x00\x00\x00\x06\xff\x00",  # not UTF-8 ...
    ],
    ids=["short", "oversized", "unknown-type", "bad-utf8"],
)
def test_malformed_frame_after_startup(proxy: ProxyProcess, frame: bytes) -> None:
    with psycopg.connect(proxy.dsn()) as bystander, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        startup(sock)
        sock.sendall(frame + pq.Terminate().encode())  # a session that survives ends with the Terminate
        answer = read_until_closed(sock)
        codes = [e.get("C") for e in errors_in(answer)]
        # Malformed framing is caught by the proxy (08P01); a well-framed but invalid
        # query is the server's to reject (22021), and the session stays usable then.
        assert codes in (["08P01"], ["22021"]) or (codes == [] and frame.startswith(b"Q\x00\x00\x00\x06")), codes
        assert bystander.execute("SELECT 2").fetchone() == (2,)


def test_abrupt_client_disconnect_mid_transaction(proxy: ProxyProcess, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS abrupt; CREATE TABLE abrupt (i int)")
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        startup(sock)
        sock.sendall(pq.Query("BEGIN; INSERT INTO abrupt VALUES (1); SELECT pg_sleep(0.2)").encode())
        sock.recv(1)
    time.sleep(0.5)
    with psycopg.connect(pg.dsn()) as admin:
        assert admin.execute("SELECT count(*) FROM abrupt").fetchone() == (0,)
    assert_healthy(proxy.dsn())


def test_upstream_backend_terminated(proxy: ProxyProcess, pg: Postgres) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as victim, psycopg.connect(proxy.dsn()) as bystander:
        pid = victim.info.backend_pid
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT 1")
        assert info.value.sqlstate in ("57P01", None)  # FATAL relayed from the server, or a closed socket
        assert victim.closed or victim.broken
        assert bystander.execute("SELECT 3").fetchone() == (3,)


def test_upstream_restart(tmp_path: Path) -> None:
    cluster = Cluster(find_bin_dir(16), tmp_path / "data")
    cluster.start()
    handle = start_proxy(cluster.dsn(), tmp_path)
    try:
        conn = psycopg.connect(handle.dsn(), autocommit=True)
        cluster.restart()
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate in ("57P01", "08006", None)
        conn.close()
        assert_healthy(handle.dsn())
        cluster.stop()
        with pytest.raises(psycopg.OperationalError) as down:
            psycopg.connect(handle.dsn(), connect_timeout=10)
        assert "could not connect to upstream server" in str(down.value)
        assert handle.proc.poll() is None
    finally:
        handle.stop()
        cluster.stop("immediate")


def test_replication_connection_refused(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(replication="database"))
    assert "does not relay replication" in str(info.value)


def test_max_clients(pg: Postgres, tmp_path: Path) -> None:
    handle = start_proxy(pg.dsn(), tmp_path, PGML_PROXY_PROXY_MAX_CLIENTS="2")
    try:
        first, second = psycopg.connect(handle.dsn()), psycopg.connect(handle.dsn())
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(handle.dsn())
        assert "too many clients" in str(info.value)
        first.close()
        time.sleep(0.2)
        assert_healthy(handle.dsn())
        second.close()
    finally:
        handle.stop()


def test_upstream_connect_timeout(tmp_path: Path) -> None:
    """An upstream that accepts TCP but never answers the SSLRequest: 08001 after connect_timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    handle = start_proxy(f"postgresql://127.0.0.1:{port}/x?sslmode=prefer", tmp_path,
                         PGML_PROXY_UPSTREAM_CONNECT_TIMEOUT="1")  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(handle.dsn(), connect_timeout=10)
        assert "timeout connecting to upstream" in str(info.value)
        assert time.monotonic() - started < 5
    finally:
        handle.stop()
        silent.close()


def test_sigterm_graceful_shutdown(pg: Postgres, tmp_path: Path) -> None:
    handle = start_proxy(pg.dsn(), tmp_path, PGML_PROXY_PROXY_SHUTDOWN_GRACE="3")
    try:
        conn = psycopg.connect(handle.dsn(), autocommit=True)
        handle.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(psycopg.OperationalError):  # no longer accepting
            psycopg.connect(handle.dsn(), connect_timeout=2)
        assert conn.execute("SELECT 'still served'").fetchone() == ("still served",)  # within the grace period
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT pg_sleep(10)")
        assert info.value.sqlstate == "57P01"
        assert handle.proc.wait(15) == 0
    finally:
        handle.stop()


def test_unix_socket_upstream(tmp_path: Path) -> None:
    cluster = Cluster(find_bin_dir(16), tmp_path / "data", port=free_port())
    cluster.init()
    sockdir = Path("/tmp") / f"pgml-test-{cluster.port}"
    sockdir.mkdir(mode=0o777, exist_ok=True)
    sockdir.chmod(0o777)
    cluster.configure({"unix_socket_directories": str(sockdir)})
    cluster.start()
    handle = start_proxy(f"postgresql:///postgres?host={sockdir}&port={cluster.port}", tmp_path)
    try:
        with psycopg.connect(handle.dsn()) as conn:
            assert conn.execute("SELECT inet_server_addr() IS NULL").fetchone() == (True,)  # came over the socket
    finally:
        handle.stop()
        cluster.stop("immediate")
