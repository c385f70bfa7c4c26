"""Wire-level sequences around pgml rewriting: pipelining, hidden responses, errors (a raw protocol client).

Each test sends exact message sequences and checks the exact responses the client gets back,
as a driver would see them.
"""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest

from proxy.wire import messages as pq
from proxy.wire.frames import Frame, Frontend, pack

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
                fields = dict(pq.ErrorResponse.decode(Frame(m[0], m)).fields)
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
    return pq.Parse(name, sql, tuple(types)).encode()


def B(portal="", stmt="", params=()):
    parts = [portal.encode() + b"\0", stmt.encode() + b"\0", struct.pack("!h", 0), struct.pack("!h", len(params))]
    for p in params:
        parts.append(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p)
    parts.append(struct.pack("!h", 0))
    return pack(Frontend.BIND, b"".join(parts))


def E(portal=""):
    return pack(Frontend.EXECUTE, portal.encode() + b"\0" + b"\0\0\0\0")


S = pack(Frontend.SYNC, b"")


def Q(sql):
    return pq.Query(sql).encode()


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
    r.send(P("s1", "SELECT pgml.chunk('character', $1)"), pack(Frontend.DESCRIBE, b"Ss1\0"), S)
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
    F = pack(
        Frontend.FUNCTION_CALL,
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


def _table(pg, name: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")
        c.execute(f"CREATE TABLE {name} (id int, body text)")
        c.execute(f"INSERT INTO {name} VALUES (1, 'a b c'), (2, 'd e')")


def _count(pg, table: str) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_per_row_mid_batch_keeps_the_implicit_transaction(proxy, pg):
    """Gather + temp-table load in the middle of an extended batch must not commit what came before."""
    _table(pg, "rvdocs5")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(
        P("", "INSERT INTO rvdocs5 VALUES (3, 'x y')"), B(), E(),
        P("", "SELECT id, pgml.chunk('character', body) FROM rvdocs5 ORDER BY id"), B(), E(),
        P("", "SELECT 1/0"), B(), E(),
        S,
    )  # fmt: skip
    got = r.read_until_z(1)
    assert got[:3] == ["1", "2", "C"], got
    assert got[3:5] == ["1", "2"] and got.count("D") == 3, got  # the INSERT's row is visible to the pgml call
    assert got[-2].startswith("E:22012") and got[-1] == "ZI", got
    assert _count(pg, "rvdocs5") == 2  # the whole implicit transaction rolled back, the INSERT too


def test_per_row_mid_batch_commits_with_the_batch(proxy, pg):
    _table(pg, "rvdocs6")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(
        P("", "INSERT INTO rvdocs6 VALUES (3, 'x y')"), B(), E(),
        P("", "SELECT id, pgml.chunk('character', body) FROM rvdocs6 ORDER BY id"), B(), E(),
        S,
    )  # fmt: skip
    got = r.read_until_z(1)
    assert got == ["1", "2", "C", "1", "2", "D", "D", "D", "C", "ZI"], got
    assert _count(pg, "rvdocs6") == 3


def test_internal_error_mid_batch_is_the_batch_error(proxy, pg):
    """The gather fails (no such column): that error answers the batch, the rest is skipped, nothing committed."""
    _table(pg, "rvdocs7")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(
        P("", "INSERT INTO rvdocs7 VALUES (3, 'x y')"), B(), E(),
        P("", "SELECT pgml.chunk('character', nosuch) FROM rvdocs7"), B(), E(),
        P("", "SELECT 1"), B(), E(),
        S,
        Q("SELECT 2"),
    )  # fmt: skip
    got = r.read_until_z(2)
    assert got[:3] == ["1", "2", "C"], got
    assert got[3].startswith("E:42703") and got[4] == "ZI", got
    assert got[5:] == ["T", "D", "C", "ZI"], got
    assert _count(pg, "rvdocs7") == 2


def test_per_row_mid_batch_inside_begin(proxy, pg):
    _table(pg, "rvdocs8")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("BEGIN"))
    r.read_until_z(1)
    r.send(
        P("", "SELECT id, pgml.chunk('character', body) FROM rvdocs8"), B(), E(),
        P("", "SELECT nosuch FROM rvdocs8"), B(), E(),
        S,
    )  # fmt: skip
    got = r.read_until_z(1)
    assert got[-2].startswith("E:42703") and got[-1] == "ZE", got
    r.send(Q("COMMIT"))
    assert r.read_until_z(1) == ["C", "ZI"]


@pytest.mark.parametrize("drop", ["DEALLOCATE s9", "DEALLOCATE ALL", "DISCARD ALL", "deallocate prepare s9"])
@pytest.mark.parametrize("extended", [False, True])
def test_sql_deallocate_forgets_deferred_statement(proxy, drop, extended):
    """After SQL DEALLOCATE/DISCARD, a Bind of the statement fails exactly as on the server (26000)."""
    prime(proxy)
    r = Raw(proxy.port)
    r.send(P("s9", "SELECT pgml.chunk('character', $1)"), S)
    assert r.read_until_z(1) == ["1", "ZI"]
    r.send(B("", "s9", [b"hello"]), E(), S)
    assert r.read_until_z(1) == ["2", "D", "C", "ZI"]
    r.send(*([P("", drop), B(), E(), S] if extended else [Q(drop)]))
    assert r.read_until_z(1)[-1] == "ZI"
    r.send(B("", "s9", [b"hello"]), E(), S)
    got = r.read_until_z(1)
    assert got[0].startswith("E:26000") and got[-1] == "ZI", got


def test_per_row_call_after_other_statements_in_one_query(proxy, pg):
    """The earlier statements run first (their answers reach the client in order) and the per-row call sees them."""
    _table(pg, "rvdocs10")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("INSERT INTO rvdocs10 VALUES (3, 'x y'); SELECT id, pgml.chunk('character', body) FROM rvdocs10"
             " ORDER BY id; SELECT 'after'"))  # fmt: skip
    got = r.read_until_z(1)
    assert got == ["C", "T", "D", "D", "D", "C", "T", "D", "C", "ZI"], got
    assert _count(pg, "rvdocs10") == 3


@pytest.mark.parametrize("failing", ["SELECT 1/0", "SELECT pgml.chunk('character', nosuch) FROM rvdocs11"])
def test_multi_statement_query_with_per_row_call_is_one_transaction(proxy, pg, failing):
    _table(pg, "rvdocs11")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q(f"INSERT INTO rvdocs11 VALUES (3, 'x y'); SELECT pgml.chunk('character', body) FROM rvdocs11; {failing}"))
    got = r.read_until_z(1)
    assert got[0] == "C" and got[-2].startswith("E:") and got[-1] == "ZI", got
    assert _count(pg, "rvdocs11") == 2  # everything rolled back, as PostgreSQL does for one query string
    r.send(Q("SELECT 1"))
    assert r.read_until_z(1) == ["T", "D", "C", "ZI"]


def test_multi_statement_with_begin_before_per_row_call(proxy, pg):
    _table(pg, "rvdocs12")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("BEGIN; INSERT INTO rvdocs12 VALUES (3, 'x'); SELECT pgml.chunk('character', body) FROM rvdocs12"))
    got = r.read_until_z(1)
    assert got == ["C", "C", "T", "D", "D", "D", "C", "ZT"], got
    r.send(Q("ROLLBACK"))
    assert r.read_until_z(1) == ["C", "ZI"]
    assert _count(pg, "rvdocs12") == 2


def test_query_with_per_row_call_after_insert_commits_and_ends_idle(proxy, pg):
    _table(pg, "rvdocs13")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("INSERT INTO rvdocs13 VALUES (3, 'x'); SELECT pgml.chunk('character', body) FROM rvdocs13"))
    got = r.read_until_z(1)
    assert got[0] == "C" and got[-1] == "ZI", got
    assert _count(pg, "rvdocs13") == 3  # committed, visible to another session


def test_failing_per_row_call_after_insert_runs_the_insert_once(proxy, pg):
    _table(pg, "rvdocs14")
    prime(proxy)
    r = Raw(proxy.port)
    r.send(Q("INSERT INTO rvdocs14 VALUES (3, 'x'); SELECT pgml.chunk('no_such_splitter', body) FROM rvdocs14"))
    got = r.read_until_z(1)
    assert got[0] == "C" and got[1].startswith("E:") and got[2:] == ["ZI"], got
    assert _count(pg, "rvdocs14") == 2  # rolled back with the failing string
