"""Wire-level sequences around pgml rewriting: pipelining, hidden responses, errors (a raw protocol client).

Each test sends exact message sequences and checks the exact responses the client gets back,
as a driver would see them.
"""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest

from proxy import protocol as pq

pytestmark = pytest.mark.pg_matrix


class Raw:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        params = b"user\0postgres\0database\0postgres\0\0"
        body = struct.pack("!i", 196608) + params
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        self.read_until_z(1)

    def send(self, *frames: bytes) -> None:
        self.s.sendall(b"".join(frames))

    seen: list[bytes] = []

    def _msg(self):
        while True:
            if len(self.buf) >= 5:
                n = struct.unpack("!i", self.buf[1:5])[0]
                if len(self.buf) >= n + 1:
                    m, self.buf = self.buf[: n + 1], self.buf[n + 1 :]
                    self.seen.append(m[:80])
                    return m
            self.s.settimeout(10)
            d = self.s.recv(65536)
            if not d:
                raise EOFError(repr(self.seen))
            self.buf += d

    def read_until_z(self, count: int):
        out = []
        while count:
            m = self._msg()
            t = chr(m[0])
            if t == "E":
                fields = dict(pq.decode_error(pq.Frame(m[0], m)).fields)
                out.append("E:" + fields.get("C", "") + ":" + fields.get("M", "")[:60])
            elif t == "Z":
                out.append("Z" + chr(m[5]))
                count -= 1
            elif t in "NSK":
                continue
            else:
                out.append(t)
        return out


def P(name, sql, types=()):
    return pq.encode_parse(pq.Parse(name, sql, tuple(types)))


def B(portal="", stmt="", params=()):
    parts = [portal.encode() + b"\0", stmt.encode() + b"\0", struct.pack("!h", 0), struct.pack("!h", len(params))]
    for p in params:
        parts.append(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p)
    parts.append(struct.pack("!h", 0))
    return pq.encode(b"B", b"".join(parts))


def E(portal=""):
    return pq.encode(b"E", portal.encode() + b"\0" + b"\0\0\0\0")


S = pq.encode(b"S", b"")


def Q(sql):
    return pq.encode_query(pq.Query(sql))


def prime(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute("SELECT pgml.version()").fetchone()


def test_pipelined_fail_after_slow_batch(proxy):
    prime(proxy)
    r = Raw(proxy.port)
    r.send(
        P("", "SELECT pg_sleep(0.5)"),
        B(),
        E(),
        S,
        P("", "SELECT * FROM pgml.chunk('no_such_splitter', 'x')"),
        B(),
        E(),
        S,
    )
    got = r.read_until_z(2)
    assert got[:5] == ["1", "2", "D", "C", "ZI"]
    assert got[5:] == [got[5], "ZI"] and got[5].startswith("E:"), got


def test_stale_tx_status_rollback_then_pgml(proxy):
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("BEGIN"), Q("SELECT 1/0"))
    r.read_until_z(2)
    r.send(Q("ROLLBACK"), Q("SELECT pgml.version()"))
    got = r.read_until_z(2)
    assert not any(x.startswith("E:") for x in got), got


def test_pipelined_rebound_after_slow_batch(proxy):
    prime(proxy)
    r = Raw(proxy.port)
    r.send(P("s1", "SELECT pgml.chunk('character', $1)"), pq.encode(b"D", b"Ss1\0"), S)
    r.read_until_z(1)
    r.send(P("", "SELECT pg_sleep(0.5)"), B(), E(), S, B("", "s1", [b"hello"]), E(), S)
    got = r.read_until_z(2)
    assert got == ["1", "2", "D", "C", "ZI", "2", "D", "C", "ZI"], got


def test_multistatement_fail_keeps_begin(proxy):
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("BEGIN; SELECT * FROM pgml.chunk('no_such_splitter', 'x')"))
    got = r.read_until_z(1)
    assert got[-1] == "ZE", got


def test_function_call_owes_ready_for_query(proxy, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS rvdocs3")
        c.execute("CREATE TABLE rvdocs3 (id int, body text)")
        c.execute("INSERT INTO rvdocs3 VALUES (1, 'a b c')")
    prime(proxy)
    r = Raw(proxy.port)
    # FunctionCall lo_creat(-1) (OID 957): format codes 0, 1 arg (int4 binary), result text
    F = pq.encode(
        b"F",
        struct.pack("!ih", 957, 1)
        + struct.pack("!h", 1)
        + struct.pack("!h", 1)
        + struct.pack("!ii", 4, -1)
        + struct.pack("!h", 0),
    )
    r.send(F, Q("SELECT pg_sleep(0.3)::text, 'client-row'"), Q("SELECT id, pgml.chunk('character', body) FROM rvdocs3"))
    got = r.read_until_z(3)
    assert got[:2] == ["V", "ZI"] and got[2:6] == ["T", "D", "C", "ZI"] and not any(x.startswith("E") for x in got), got


def test_failure_keeps_unnamed_statement(proxy):
    prime(proxy)
    r = Raw(proxy.port)
    r.send(P("", "SELECT 42"), S)
    r.read_until_z(1)
    r.send(P("s2", "SELECT * FROM pgml.chunk('no_such_splitter', 'x')"), B("", "s2"), E(), S)
    r.read_until_z(1)
    r.send(B("", ""), E(), S)
    got = r.read_until_z(1)
    assert got == ["2", "D", "C", "ZI"], got


def test_relayed_error_in_transaction_keeps_its_code(proxy, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS rvdocs4")
        c.execute("CREATE TABLE rvdocs4 (id int, body text)")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("BEGIN"))
    r.read_until_z(1)
    r.send(P("s", "SELECT pgml.chunk('character', body) FROM rvdocs4 WHERE id = $1", [23]), S)
    r.read_until_z(1)
    r.send(Q("ALTER TABLE rvdocs4 RENAME body TO b2"))
    r.read_until_z(1)
    r.send(B("", "s", [b"1"]), E(), S)
    got = r.read_until_z(1)
    assert "25P02" not in got[0], got
