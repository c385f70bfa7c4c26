"""SQL ``PREPARE`` / ``EXECUTE`` / ``DEALLOCATE`` / ``DISCARD ALL`` of statements with ``$n`` inside pgml calls.

Through the proxy with psql, psycopg (simple protocol, and the extended one with ``prepare=True``)
and asyncpg (which prepares every ``fetch``). EXECUTE must give what the statement gives with its
arguments written in (the reference: the same statement through the proxy), the result shape the
server describes for that EXECUTE, and the server's own errors where the server refuses it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database

pytestmark = pytest.mark.pg_matrix

SPLIT = """'{"chunk_size": 4, "chunk_overlap": 0, "separator": " "}'"""


@pytest.fixture
def db(pg: Postgres, proxy: ProxyProcess) -> Iterator[str]:
    with scratch_database(pg, "prep") as name:
        with psycopg.connect(proxy.dsn(dbname=name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pgml")
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, tag text, body text)")
            conn.execute(
                "INSERT INTO docs VALUES (1, 'a', 'red fox'), (2, 'a', 'blue sky'), (3, 'b', 'red fox'), (4, 'b', NULL)"
            )
        yield name


@pytest.fixture
def through(proxy: ProxyProcess, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        yield conn


@pytest.fixture
def direct(pg: Postgres, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as conn:
        yield conn


def results(cur: psycopg.Cursor[Any]) -> list[list[Any]]:
    """Every result of a multi-statement query (an empty list for a statement without rows)."""
    out = [cur.fetchall() if cur.description else []]
    while cur.nextset():
        out.append(cur.fetchall() if cur.description else [])
    return out


def error_of(conn: psycopg.Connection[Any], sql: str, **kwargs: Any) -> tuple[str | None, str | None]:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql, **kwargs)
    return caught.value.sqlstate, caught.value.diag.message_primary


def test_psql_prepare_execute_deallocate(pg: Postgres, proxy: ProxyProcess, db: str) -> None:
    script = f"""
PREPARE c(text) AS SELECT chunk_index, chunk FROM pgml.chunk('character', $1, {SPLIT});
EXECUTE c('abcd efgh');
SELECT name, from_sql, parameter_types FROM pg_prepared_statements;
BEGIN;
EXECUTE c('ijkl');
COMMIT;
DEALLOCATE c;
SELECT count(*) AS left_over FROM pg_prepared_statements;
"""
    done = subprocess.run(
        [pg.tool("psql"), proxy.dsn(dbname=db), "-X", "-A", "-v", "ON_ERROR_STOP=1"],
        input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "1|abcd" in lines and "2|efgh" in lines and "1|ijkl" in lines
    assert "c|t|{text}" in lines  # the server has it: the PREPARE went there as written
    assert lines[lines.index("left_over") + 1] == "0"


def test_execute_gives_the_statement_with_its_arguments(through: psycopg.Connection[Any], model_dir: Path) -> None:
    through.execute(f"PREPARE e(text) AS SELECT pgml.embed('{MINILM}', $1) AS v")
    (executed,) = through.execute("EXECUTE e('hello')").fetchone()  # type: ignore[misc]
    (written,) = through.execute(f"SELECT pgml.embed('{MINILM}', 'hello') AS v").fetchone()  # type: ignore[misc]
    assert executed == written and len(executed) == 384
    # Per-row calls: the statement's $n outside the call too.
    through.execute(
        f"PREPARE rows_of(text) AS SELECT id, pgml.embed('{MINILM}', body) FROM docs WHERE tag = $1 ORDER BY id"
    )
    prepared = through.execute("EXECUTE rows_of('a')").fetchall()
    plain = through.execute(f"SELECT id, pgml.embed('{MINILM}', body) FROM docs WHERE tag = 'a' ORDER BY id").fetchall()
    assert prepared == plain and [r[0] for r in prepared] == [1, 2]
    assert through.execute("EXECUTE rows_of('b')").fetchall()[1] == (4, None)  # NULL in, NULL out


def test_execute_result_shape_is_the_servers(
    through: psycopg.Connection[Any], direct: psycopg.Connection[Any], model_dir: Path
) -> None:
    sql = (
        f"PREPARE shape(text, int) AS SELECT $1, pgml.embed('{MINILM}', $1) AS v, $2 + 1,"
        " (SELECT count(*) FROM pgml.chunk('character', $1)) AS n"
    )
    through.execute(sql)
    direct.execute(sql)
    # The server describes EXECUTE without running it (running it would reach the stubs).
    direct.pgconn.prepare(b"described", b"EXECUTE shape('abc', 1)")
    described = direct.pgconn.describe_prepared(b"described")
    expected = [(described.fname(i), described.ftype(i)) for i in range(described.nfields)]
    cur = through.execute("EXECUTE shape('abc', 1)")
    assert [(c.name, c.type_code) for c in cur.description or ()] == [
        (name.decode() if name else None, oid) for name, oid in expected
    ]
    assert [name for name, _ in expected] == [b"?column?", b"v", b"?column?", b"n"]
    ((text, vector, number, count),) = cur.fetchall()
    (written,) = through.execute(f"SELECT pgml.embed('{MINILM}', 'abc')").fetchone()  # type: ignore[misc]
    assert (text, vector, number, count) == ("abc", written, 2, 1)


def test_errors_are_the_servers(through: psycopg.Connection[Any], direct: psycopg.Connection[Any]) -> None:
    through.execute(f"PREPARE c(text) AS SELECT chunk FROM pgml.chunk('character', $1, {SPLIT})")
    direct.execute("PREPARE plain(text) AS SELECT upper($1)")
    cases = [
        ("EXECUTE {}()", {}),  # wrong number of arguments
        ("EXECUTE {}('a', 'b')", {}),
        ("EXECUTE {}((SELECT 'x'))", {}),  # subquery
        ("EXECUTE {}(nosuch)", {}),  # a column: EXECUTE's arguments see none
        ("EXECUTE {}(count(*))", {}),  # aggregate
        ("EXECUTE {}(%s)", {"params": ["x"]}),  # a parameter of the extended protocol: none there either
    ]
    for template, kwargs in cases:
        code, message = error_of(through, template.format("c"), **kwargs)
        server_code, server_message = error_of(direct, template.format("plain"), **kwargs)
        assert (code, message) == (server_code, (server_message or "").replace("plain", "c")), template
    through.execute("DEALLOCATE c")
    assert error_of(through, "EXECUTE c('x')") == ("26000", 'prepared statement "c" does not exist')
    assert through.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("drop", ["DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE PREPARE c"])
def test_deallocated_statements_are_gone(through: psycopg.Connection[Any], drop: str) -> None:
    through.execute(f"PREPARE c(text) AS SELECT chunk FROM pgml.chunk('character', $1, {SPLIT})")
    assert through.execute("EXECUTE c('abcd')").fetchall() == [("abcd",)]
    through.execute(drop)
    assert error_of(through, "EXECUTE c('abcd')") == ("26000", 'prepared statement "c" does not exist')
    # The same name prepared again means the new statement.
    through.execute("PREPARE c(text) AS SELECT upper(chunk) FROM pgml.chunk('character', $1)")
    assert through.execute("EXECUTE c('abcd')").fetchall() == [("ABCD",)]


def test_prepare_and_execute_in_one_query_string(through: psycopg.Connection[Any]) -> None:
    cur = through.execute(
        f"PREPARE c AS SELECT chunk FROM pgml.chunk('character', $1, {SPLIT}); EXECUTE c('abcd efgh');"
        " DEALLOCATE c; PREPARE c(text) AS SELECT upper($1); EXECUTE c('plain')"
    )
    assert results(cur) == [[], [("abcd",), ("efgh",)], [], [], [("PLAIN",)]]
    # Not yet prepared when the EXECUTE is reached: the server's own error, nothing run.
    assert error_of(through, "DEALLOCATE c; EXECUTE c('x')") == ("26000", 'prepared statement "c" does not exist')
    assert through.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)  # DEALLOCATE ran


def test_create_table_as_execute(through: psycopg.Connection[Any]) -> None:
    through.execute(f"PREPARE c(text) AS SELECT chunk_index, chunk FROM pgml.chunk('character', $1, {SPLIT})")
    through.execute("CREATE TEMP TABLE pieces AS EXECUTE c('abcd efgh')")
    assert through.execute("SELECT * FROM pieces ORDER BY 1").fetchall() == [(1, "abcd"), (2, "efgh")]


def test_execute_in_the_extended_protocol(through: psycopg.Connection[Any]) -> None:
    through.execute(f"PREPARE c(text) AS SELECT chunk FROM pgml.chunk('character', $1, {SPLIT})")
    for _ in range(3):  # Parse once, Bind and Execute each time
        assert through.execute("EXECUTE c('abcd efgh')", prepare=True).fetchall() == [("abcd",), ("efgh",)]
    # The client's prepared "EXECUTE c(…)" runs what c means at each execution.
    through.execute("DEALLOCATE c")
    through.execute("PREPARE c(text) AS SELECT upper(chunk) FROM pgml.chunk('character', $1)")
    assert through.execute("EXECUTE c('abcd efgh')", prepare=True).fetchall() == [("ABCD EFGH",)]
    through.execute("DEALLOCATE c")
    assert error_of(through, "EXECUTE c('abcd efgh')", prepare=True) == (
        "26000",
        'prepared statement "c" does not exist',
    )
    with through.transaction():
        through.execute("PREPARE d(int) AS SELECT chunk FROM pgml.chunk('character', repeat('ab', $1), '{}')")
        assert through.execute("EXECUTE d(2)", prepare=True).fetchall() == [("abab",)]


def test_asyncpg(proxy: ProxyProcess, db: str) -> None:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            await conn.execute(f"PREPARE c(text) AS SELECT chunk FROM pgml.chunk('character', $1, {SPLIT}) AS piece")
            first = [r["chunk"] for r in await conn.fetch("EXECUTE c('abcd efgh')")]  # prepared by asyncpg
            again = [r["chunk"] for r in await conn.fetch("EXECUTE c('abcd efgh')")]  # its cached statement
            await conn.execute("DEALLOCATE c")
            await conn.execute("PREPARE c(text) AS SELECT upper($1) AS chunk")
            changed = [r["chunk"] for r in await conn.fetch("EXECUTE c('abcd efgh')")]
            return [first, again, changed]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [["abcd", "efgh"], ["abcd", "efgh"], ["ABCD EFGH"]]


def test_an_error_in_an_execute_keeps_the_statements_before_it(through: psycopg.Connection[Any]) -> None:
    """BEGIN; INSERT …; EXECUTE p(bad): the EXECUTE's error is answered inside the transaction BEGIN opened
    (the INSERT ran, the transaction is aborted), and a COMMIT before it commits, as without the proxy."""
    conn = through
    conn.execute("CREATE TEMP TABLE kept (x int)")
    conn.execute("PREPARE bad_p(text, text) AS SELECT pgml.embed($1, $2)")
    with pytest.raises(psycopg.Error):
        conn.execute("BEGIN; INSERT INTO kept VALUES (2); EXECUTE bad_p('no/such-model', 'x')")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    conn.execute("ROLLBACK")
    with pytest.raises(psycopg.Error):
        conn.execute("BEGIN; INSERT INTO kept VALUES (3); COMMIT; EXECUTE bad_p('no/such-model', 'x')")
    assert conn.execute("SELECT x FROM kept").fetchall() == [(3,)]  # committed before the EXECUTE failed
