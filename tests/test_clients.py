"""Real clients through the proxy behave exactly as with a direct connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.conftest import Postgres, ProxyProcess

pytestmark = pytest.mark.pg_matrix


@pytest.fixture(scope="module")
def psql(pg: Postgres) -> Callable[..., str]:
    def run(dsn: str, *args: str) -> str:
        return run_psql(pg.tool("psql"), dsn, *args)

    return run


def run_psql(binary: str, dsn: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [binary, dsn, "-X", "-v", "ON_ERROR_STOP=1", *args],
        input=stdin, capture_output=True, text=True, timeout=60, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def sample_table(pg: Postgres) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(
            "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, price numeric(8,2), tags text[],"
            " meta jsonb, created timestamptz DEFAULT now())"
        )
        conn.execute("CREATE INDEX items_name ON items (name)")
        conn.execute(
            "INSERT INTO items (name, price, tags, meta) SELECT 'item ' || i, i * 1.5, ARRAY['a', 'b' || i],"
            " jsonb_build_object('i', i) FROM generate_series(1, 200) i"
        )
    return "items"


# --------------------------------------------------------------------------- psql


@pytest.mark.parametrize("command", [r"\d items", r"\dt", r"\di", r"\df pg_catalog.now", r"\l postgres", r"\dn"])
def test_psql_meta_commands_identical(
    psql: Callable[..., str], direct_dsn: str, proxy_dsn: str, sample_table: str, command: str
) -> None:
    assert psql(proxy_dsn, "-c", command) == psql(direct_dsn, "-c", command)


def test_psql_copy_out_and_in(
    psql: Callable[..., str], direct_dsn: str, proxy_dsn: str, sample_table: str, tmp_path: Path
) -> None:
    out_direct, out_proxy = tmp_path / "direct.csv", tmp_path / "proxy.csv"
    psql(direct_dsn, "-c", rf"\copy (SELECT id, name, price, tags FROM items ORDER BY id) TO '{out_direct}' CSV")
    psql(proxy_dsn, "-c", rf"\copy (SELECT id, name, price, tags FROM items ORDER BY id) TO '{out_proxy}' CSV")
    assert out_proxy.read_bytes() == out_direct.read_bytes() and out_proxy.stat().st_size > 1000
    psql(proxy_dsn, "-c", "DROP TABLE IF EXISTS items_copy; CREATE TABLE items_copy (LIKE items)")
    psql(proxy_dsn, "-c", rf"\copy items_copy (id, name, price, tags) FROM '{out_proxy}' CSV")
    query = "SELECT count(*), sum(price), max(tags[2]) FROM items_copy"
    assert psql(direct_dsn, "-At", "-c", query) == psql(direct_dsn, "-At", "-c", query.replace("items_copy", "items"))


def test_psql_script_with_errors_and_transactions(pg: Postgres, direct_dsn: str, proxy_dsn: str) -> None:
    script = (
        "\\set ON_ERROR_STOP 0\nBEGIN;\nCREATE TEMP TABLE t(x int);\nINSERT INTO t VALUES (1);\n"
        "SELECT 1/0;\nSELECT 1;\nROLLBACK;\nSELECT 'after';\n\\echo :LAST_ERROR_SQLSTATE\n"
    )

    def run(dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([pg.tool("psql"), dsn, "-X"], input=script, capture_output=True, text=True, timeout=60)

    direct, proxied = run(direct_dsn), run(proxy_dsn)
    assert proxied.stdout == direct.stdout and proxied.stderr == direct.stderr
    assert "25P02" in direct.stdout or "current transaction is aborted" in direct.stderr


# --------------------------------------------------------------------------- psycopg

VALUES = [
    42, -(2**62), 3.25, decimal.Decimal("12345.6789"), "héllo wörld", b"\x00\x01\xffbytes", True, None,
    dt.date(2024, 2, 29), dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), dt.timedelta(days=3, seconds=7),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), [1, 2, 3], ["a", None, "c"],
]  # fmt: skip


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_parameters_of_many_types(direct_dsn: str, proxy_dsn: str, binary: bool) -> None:
    with psycopg.connect(proxy_dsn) as conn, psycopg.connect(direct_dsn) as direct:
        for value in VALUES:
            row = conn.execute("SELECT %s", [value], binary=binary).fetchone()
            assert row == direct.execute("SELECT %s", [value], binary=binary).fetchone()
            if not (isinstance(value, list) and isinstance(value[0], str)):  # str lists: sent as unknown type
                assert row == (value,), value
        row = conn.execute("SELECT %s::jsonb", [Jsonb({"k": [1, "x"]})], binary=binary).fetchone()
        assert row == ({"k": [1, "x"]},)


def test_psycopg_pipeline_mode(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pipe; CREATE TABLE pipe (i int)")
        with conn.pipeline() as pipe:
            cursors = [conn.execute("INSERT INTO pipe VALUES (%s) RETURNING i * 2", [i]) for i in range(50)]
            pipe.sync()
            conn.cursor().executemany("INSERT INTO pipe VALUES (%s)", [(i,) for i in range(50, 100)])
        assert [c.fetchone() for c in cursors] == [(i * 2,) for i in range(50)]
        assert conn.execute("SELECT count(*), sum(i) FROM pipe").fetchone() == (100, sum(range(100)))


def test_psycopg_pipeline_error_recovers(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
            conn.execute("SELECT 2")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_psycopg_named_server_side_cursor(proxy_dsn: str, sample_table: str) -> None:
    with psycopg.connect(proxy_dsn) as conn, conn.cursor(name="big") as cur:
        cur.itersize = 17
        cur.execute("SELECT id, name FROM items ORDER BY id")
        rows = list(cur)
        assert len(rows) == 200 and rows[0] == (1, "item 1") and rows[-1] == (200, "item 200")
    with psycopg.connect(proxy_dsn) as conn, conn.cursor(name="scroll", scrollable=True) as cur:
        cur.execute("SELECT generate_series(1, 10)")
        cur.scroll(7)
        assert cur.fetchone() == (8,)


def test_psycopg_copy(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS cp; CREATE TABLE cp (i int, t text)")
        with conn.cursor().copy("COPY cp FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i}"))
        with conn.cursor().copy("COPY cp TO STDOUT") as copy:
            rows = list(copy.rows())
        assert len(rows) == 5000 and rows[4999] == ("4999", "row 4999")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation), conn.cursor().copy("COPY cp FROM STDIN") as copy:
            copy.write(b"notanint\tx\n")
        assert conn.execute("SELECT count(*) FROM cp").fetchone() == (5000,)


def test_listen_notify(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, autocommit=True) as listener, psycopg.connect(proxy_dsn, autocommit=True) as other:
        listener.execute("LISTEN chan")
        other.execute("NOTIFY chan, 'hello'")
        other.execute("SELECT pg_notify('chan', 'again')")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == ["hello", "again"]


def test_notice_and_parameter_status(proxy_dsn: str) -> None:
    notices: list[str] = []
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'note %', 7; END $$")
        conn.execute("SET application_name = 'through-proxy'")
        assert conn.info.parameter_status("application_name") == "through-proxy"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert notices == ["note 7"]


def test_cancel_request_on_pg_sleep(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_transaction_status_follows_server(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn) as conn:
        status = psycopg.pq.TransactionStatus
        conn.execute("SELECT 1")
        assert conn.info.transaction_status == status.INTRANS
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")
        assert conn.info.transaction_status == status.INERROR
        conn.rollback()
        assert conn.info.transaction_status == status.IDLE


# --------------------------------------------------------------------------- asyncpg


async def test_asyncpg_prepared_statements_reused(proxy_dsn: str) -> None:
    conn = await asyncpg.connect(proxy_dsn)
    try:
        stmt = await conn.prepare("SELECT $1::int * 2, $2::text || '!'")
        for i in range(300):
            assert tuple(await stmt.fetchrow(i, f"n{i}")) == (i * 2, f"n{i}!")
        for i in range(100):  # the implicit statement cache reuses named statements too
            assert await conn.fetchval("SELECT $1::bigint + 1", i) == i + 1
        assert await conn.fetchval("SELECT $1::float8[]", [1.5, 2.5]) == [1.5, 2.5]
    finally:
        await conn.close()


async def test_asyncpg_copy_and_transactions(proxy_dsn: str) -> None:
    conn = await asyncpg.connect(proxy_dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS acp; CREATE TABLE acp (i int, t text)")
        await conn.copy_records_to_table("acp", records=[(i, f"t{i}") for i in range(3000)])
        assert await conn.fetchval("SELECT count(*) FROM acp") == 3000
        out: list[bytes] = []

        async def sink(chunk: bytes) -> None:
            out.append(chunk)

        await conn.copy_from_query("SELECT * FROM acp ORDER BY i", output=sink, format="csv")
        assert b"".join(out).count(b"\n") == 3000
        with pytest.raises(asyncpg.exceptions.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("INSERT INTO acp VALUES (-1, 'x')")
                await conn.execute("CREATE UNIQUE INDEX acp_u ON acp (i); INSERT INTO acp VALUES (1, 'dup')")
        assert await conn.fetchval("SELECT count(*) FROM acp WHERE i = -1") == 0
        async with conn.transaction():
            await conn.execute("INSERT INTO acp VALUES (-2, 'kept')")
        assert await conn.fetchval("SELECT t FROM acp WHERE i = -2") == "kept"
    finally:
        await conn.close()


async def test_hundred_concurrent_clients(proxy_dsn: str) -> None:
    async def client(n: int) -> int:
        conn = await asyncpg.connect(proxy_dsn)
        try:
            total = 0
            for i in range(10):
                total += await conn.fetchval("SELECT $1::int + $2::int", n, i)
            await conn.execute("SELECT pg_sleep(0.01)")
            return total
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(100)))
    assert results == [n * 10 + 45 for n in range(100)]


# --------------------------------------------------------------------------- pgbench


@pytest.fixture(scope="module")
def pgbench_db(pg: Postgres, proxy: ProxyProcess) -> str:
    dsn = proxy.dsn()
    proc = subprocess.run([pg.tool("pgbench"), "-i", "-q", "-s", "1", dsn], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dsn


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_modes(pg: Postgres, pgbench_db: str, mode: str) -> None:
    proc = subprocess.run(
        [pg.tool("pgbench"), "-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode, pgbench_db],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"number of transactions actually processed: 800/800", proc.stdout), proc.stdout
    assert re.search(r"number of failed transactions: 0 ", proc.stdout), proc.stdout


def test_sql_dsl_identifiers(proxy_dsn: str) -> None:
    """Quoted identifiers and odd text pass byte for byte."""
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        name = sql.Identifier('we"ird tâble')
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}; CREATE TABLE {} (v text)").format(name, name))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(name), ["\u00e9\u4e2d\U0001f600 'pgml' \\ x"])
        row = conn.execute(sql.SQL("SELECT v FROM {}").format(name)).fetchone()
        assert row == ("\u00e9\u4e2d\U0001f600 'pgml' \\ x",)
