"""The pgml schema's life through the proxy: CREATE / ALTER / DROP EXTENSION pgml, DROP SCHEMA and re-install.

The server's own answers for a real extension (plpgsql, which every database has, and pgvector
where the server has it available) are the reference for the texts, SQLSTATEs and command tags
the proxy gives for ``pgml``; the schema's state is always read back over a direct connection.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import Postgres, ProxyProcess, scratch_database, start_proxy

pytestmark = pytest.mark.pg_matrix

INSTALLED = "SELECT to_regclass('pgml.schema_migrations') IS NOT NULL"
ADD = "SELECT pgml.add(ARRAY[1, 2]::real[], ARRAY[10, 20]::real[])"


@dataclass
class Conn:
    """A psycopg connection that keeps the notices it receives as (severity, SQLSTATE, message, hint)."""

    conn: psycopg.Connection[Any]
    notices: list[tuple[str, str, str, str | None]] = field(default_factory=list)

    def run(self, sql: str, *, prepare: bool | None = None) -> psycopg.Cursor[Any]:
        self.notices.clear()
        return self.conn.execute(sql, prepare=prepare)

    def error(self, sql: str, *, prepare: bool | None = None) -> psycopg.Error:
        self.notices.clear()
        with pytest.raises(psycopg.Error) as caught:
            self.conn.execute(sql, prepare=prepare)
        return caught.value


def connect(dsn: str) -> Conn:
    conn = Conn(psycopg.connect(dsn, autocommit=True))
    conn.conn.add_notice_handler(
        lambda d: conn.notices.append((d.severity or "", d.sqlstate or "", d.message_primary or "", d.message_hint))
    )
    return conn


@pytest.fixture
def db(pg: Postgres) -> Iterator[str]:
    with scratch_database(pg, "life") as name:
        yield name


@pytest.fixture
def direct(pg: Postgres, db: str) -> Iterator[Conn]:
    conn = connect(pg.dsn(dbname=db))
    yield conn
    conn.conn.close()


@pytest.fixture
def through(proxy: ProxyProcess, db: str) -> Iterator[Conn]:
    conn = connect(proxy.dsn(dbname=db))
    yield conn
    conn.conn.close()


def installed(direct: Conn) -> bool:
    return bool(direct.run(INSTALLED).fetchone()[0])  # type: ignore[index]


def applied(direct: Conn) -> list[int]:
    return [v for (v,) in direct.run("SELECT version FROM pgml.schema_migrations ORDER BY version")]


def vector_available(direct: Conn) -> bool:
    return direct.run("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is not None


def psql(pg: Postgres, dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pg.tool("psql"), dsn, "-X", "-v", "ON_ERROR_STOP=1"],
        input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# --------------------------------------------------------------------------- any reference installs it


@pytest.mark.parametrize(
    "sql",
    [
        ADD,  # a vector helper: plain SQL, no engine call
        "SELECT count(*) FROM pgml.overview",  # a registry view
        "SELECT count(*) FROM pgml.models",
        "SELECT 'xgboost'::pgml.algorithm",  # a type
    ],
)
def test_first_reference_in_a_fresh_database_finds_the_schema(direct: Conn, through: Conn, sql: str) -> None:
    assert not installed(direct)
    rows = through.run(sql).fetchall()
    assert installed(direct)
    assert rows == direct.run(sql).fetchall()  # the server's own answer, now that the schema is there


def test_pgml_version_unchanged(through: Conn) -> None:
    (version,) = through.run("SELECT pgml.version()").fetchone()  # type: ignore[misc]
    assert version.startswith("2.10.0 (pgml-proxy ")


def test_strings_and_other_schemas_install_nothing(direct: Conn, through: Conn) -> None:
    through.run("CREATE SCHEMA other")
    through.run("CREATE TABLE other.pgml (pgml text)")
    assert through.run("SELECT pgml, 'pgml.models' FROM other.pgml AS pgml").fetchall() == []
    assert not installed(direct)


# --------------------------------------------------------------------------- PostgresML's tests/test.sql prologue


def test_drop_schema_then_create_extension_with_psql(pg: Postgres, proxy: ProxyProcess, direct: Conn, db: str) -> None:
    through = connect(proxy.dsn(dbname=db))
    through.run(ADD)  # the proxy has seen the schema complete (and remembers it)
    through.conn.close()
    script = (  # the prologue of PostgresML's pgml-extension/tests/test.sql, as it is
        "\\set ON_ERROR_STOP true\n"
        "DROP EXTENSION IF EXISTS pgml CASCADE;\nDROP SCHEMA IF EXISTS pgml CASCADE;\nCREATE EXTENSION pgml;\n"
        f"{ADD};\n"
        "DROP SCHEMA pgml CASCADE;\n"  # gone again: the next pgml call puts it back
        f"{ADD};\nSELECT count(*) FROM pgml.deployed_models;\n"
    )
    done = psql(pg, proxy.dsn(dbname=db), script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("CREATE EXTENSION") == 1 and done.stdout.count("DROP EXTENSION") == 1
    assert done.stdout.count("{11,22}") == 2
    assert applied(direct) == applied_all(direct)


def applied_all(direct: Conn) -> list[int]:
    from proxy.schema import migrations

    return [m.version for m in migrations()]


def test_schema_dropped_by_another_client_is_installed_again(
    pg: Postgres, proxy: ProxyProcess, direct: Conn, through: Conn, db: str
) -> None:
    through.run(ADD)
    direct.run("DROP SCHEMA pgml CASCADE")
    # A new session checks at its first pgml statement, whatever the proxy remembers.
    fresh = connect(proxy.dsn(dbname=db))
    assert fresh.run(ADD).fetchone() == ([11.0, 22.0],)
    fresh.conn.close()
    direct.run("DROP SCHEMA pgml CASCADE")
    # A session that checked already sees it again once the proxy's memory of the schema runs out.
    deadline = time.monotonic() + 60
    while True:
        try:
            assert through.run(ADD).fetchone() == ([11.0, 22.0],)
            break
        except (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedFunction):
            assert time.monotonic() < deadline, "the schema was never installed again"
            time.sleep(0.2)
    assert installed(direct)


def test_registry_read_finds_the_schema_gone_and_puts_it_back(direct: Conn, through: Conn) -> None:
    predict = "SELECT pgml.predict('nobody', ARRAY[1.0, 2.0])"
    before = through.error(predict)  # no such project: the engine's own answer
    direct.run("DROP SCHEMA pgml CASCADE")
    after = through.error(predict)  # the same answer, not "relation pgml.models does not exist"
    assert (after.sqlstate, after.diag.message_primary) == (before.sqlstate, before.diag.message_primary)
    assert installed(direct)


def test_schema_dropped_through_another_proxy(
    pg: Postgres, proxy: ProxyProcess, direct: Conn, db: str, tmp_path: Any
) -> None:
    other = start_proxy(pg.dsn(), tmp_path)
    try:
        first, second = connect(proxy.dsn(dbname=db)), connect(other.dsn(dbname=db))
        first.run(ADD)
        second.run("DROP SCHEMA pgml CASCADE")
        assert second.run(ADD).fetchone() == ([11.0, 22.0],)  # its own DROP: checked at once
        assert installed(direct)
        first.conn.close()
        second.conn.close()
    finally:
        other.stop()


# --------------------------------------------------------------------------- CREATE EXTENSION, as the server answers


def test_create_extension_answers_as_the_server(direct: Conn, through: Conn) -> None:
    cur = through.run("CREATE EXTENSION pgml")
    assert cur.statusmessage == "CREATE EXTENSION" and through.notices == []
    assert installed(direct) and applied(direct) == applied_all(direct)

    reference = direct.run("CREATE EXTENSION IF NOT EXISTS plpgsql")
    expected = [(s, c, m.replace("plpgsql", "pgml"), h) for s, c, m, h in direct.notices]
    cur = through.run("CREATE EXTENSION IF NOT EXISTS pgml")
    assert cur.statusmessage == reference.statusmessage == "CREATE EXTENSION"
    assert through.notices == expected == [("NOTICE", "42710", 'extension "pgml" already exists, skipping', None)]

    for conn in (direct, through):  # the server sends no NOTICE below client_min_messages, nor does the proxy
        conn.run("SET client_min_messages = warning")
    direct.run("CREATE EXTENSION IF NOT EXISTS plpgsql")
    assert through.run("CREATE EXTENSION IF NOT EXISTS pgml").statusmessage == "CREATE EXTENSION"
    assert through.notices == direct.notices == []
    through.run("RESET client_min_messages")

    server = direct.error("CREATE EXTENSION plpgsql")
    error = through.error("CREATE EXTENSION pgml")
    assert (error.sqlstate, error.diag.message_primary) == (
        server.sqlstate,
        (server.diag.message_primary or "").replace("plpgsql", "pgml"),
    )
    assert through.run("SELECT 1").fetchone() == (1,)  # the session goes on


def test_create_extension_if_not_exists_upgrades(direct: Conn, through: Conn) -> None:
    through.run("CREATE EXTENSION pgml")
    last = applied_all(direct)[-1]
    direct.run(f"DELETE FROM pgml.schema_migrations WHERE version = {last}")  # an older install
    through.run("CREATE EXTENSION IF NOT EXISTS pgml")
    assert [n[1] for n in through.notices] == ["42710"]
    assert applied(direct) == applied_all(direct)


def test_create_extension_options(direct: Conn, through: Conn) -> None:
    version = through.run("SELECT pgml.version()").fetchone()[0].split()[0]  # type: ignore[index]
    direct.run("DROP SCHEMA pgml CASCADE")
    missing = through.error("CREATE EXTENSION pgml WITH SCHEMA nosuch")
    assert (missing.sqlstate, missing.diag.message_primary) == ("3F000", 'schema "nosuch" does not exist')
    wrong = through.error("CREATE EXTENSION pgml WITH SCHEMA public")
    assert (wrong.sqlstate, wrong.diag.message_primary) == (
        "0A000",
        'extension "pgml" must be installed in schema "pgml"',
    )
    bad = through.error("CREATE EXTENSION pgml VERSION '9.9'")
    assert bad.sqlstate == "22023"
    assert bad.diag.message_primary == 'extension "pgml" has no installation script nor update path for version "9.9"'
    if vector_available(direct):  # the same checks of a real extension, in the same order
        for sql, ours in [
            ("CREATE EXTENSION vector WITH SCHEMA nosuch", missing),
            ("CREATE EXTENSION vector VERSION '9.9'", bad),
        ]:
            server = direct.error(sql)
            assert (server.sqlstate, (server.diag.message_primary or "").replace("vector", "pgml")) == (
                ours.sqlstate,
                ours.diag.message_primary,
            )
    assert not installed(direct)
    # WITH SCHEMA pgml needs the schema to exist (as for any extension); CASCADE takes pgml's own schema.
    direct.run("CREATE SCHEMA pgml")
    cur = through.run(f"CREATE EXTENSION IF NOT EXISTS pgml WITH SCHEMA pgml VERSION '{version}' CASCADE")
    assert cur.statusmessage == "CREATE EXTENSION" and installed(direct)
    direct.run("DROP SCHEMA pgml CASCADE")
    assert through.run("CREATE EXTENSION pgml SCHEMA public CASCADE").statusmessage == "CREATE EXTENSION"
    assert installed(direct)


def test_create_extension_is_transactional(direct: Conn, through: Conn) -> None:
    through.run("BEGIN")
    assert through.run("CREATE EXTENSION pgml").statusmessage == "CREATE EXTENSION"
    assert through.run("SELECT count(*) FROM pgml.schema_migrations").fetchone() == (len(applied_all(direct)),)
    assert not installed(direct)  # not committed yet
    through.run("ROLLBACK")
    assert not installed(direct)
    # The proxy does not take the rolled-back schema for installed: the next reference installs it.
    assert through.run(ADD).fetchone() == ([11.0, 22.0],)
    assert installed(direct)
    direct.run("DROP SCHEMA pgml CASCADE")
    through.run("BEGIN")
    through.run("CREATE EXTENSION pgml")
    through.run("COMMIT")
    assert installed(direct)


def test_create_extension_in_a_failing_transaction_block(direct: Conn, through: Conn) -> None:
    through.run("BEGIN")
    through.run("SELECT 1")
    with pytest.raises(psycopg.errors.DivisionByZero):
        through.run("SELECT 1 / 0")
    failed = through.error("CREATE EXTENSION pgml")
    assert failed.sqlstate == "25P02"  # the aborted transaction rejects it, as any statement
    through.run("ROLLBACK")
    assert not installed(direct)


def test_extension_statements_in_one_query_string(direct: Conn, through: Conn) -> None:
    # One implicit transaction: a later error takes the schema away with everything else.
    with pytest.raises(psycopg.errors.DivisionByZero):
        through.run("CREATE EXTENSION pgml; SELECT 1 / 0")
    assert not installed(direct)
    cur = through.run("SELECT 1; CREATE EXTENSION IF NOT EXISTS pgml; SELECT pgml.add(ARRAY[1]::real[], 1)")
    results = [cur.fetchall()]
    while cur.nextset():
        results.append(cur.fetchall() if cur.description else [])
    assert results == [[(1,)], [], [([2.0],)]]
    assert installed(direct)
    cur = through.run("CREATE EXTENSION IF NOT EXISTS pgml; SELECT 2")
    assert [n[:3] for n in through.notices] == [("NOTICE", "42710", 'extension "pgml" already exists, skipping')]
    with pytest.raises(psycopg.errors.DuplicateObject):
        through.run("SELECT 1; CREATE EXTENSION pgml; SELECT 2")
    assert through.run("SELECT 3").fetchone() == (3,)


def test_extension_statements_in_the_extended_protocol(
    proxy: ProxyProcess, db: str, direct: Conn, through: Conn
) -> None:
    through.run("CREATE EXTENSION pgml", prepare=True)
    assert installed(direct)
    through.run("CREATE EXTENSION IF NOT EXISTS pgml", prepare=True)
    assert [n[:3] for n in through.notices] == [("NOTICE", "42710", 'extension "pgml" already exists, skipping')]
    error = through.error("CREATE EXTENSION pgml", prepare=True)
    assert (error.sqlstate, error.diag.message_primary) == ("42710", 'extension "pgml" already exists')
    direct.run("DROP SCHEMA pgml CASCADE")
    through.run("CREATE EXTENSION IF NOT EXISTS pgml", prepare=True)  # the same prepared statement, run again
    assert through.notices == [] and installed(direct)
    with through.conn.transaction(force_rollback=True):
        through.run("DROP SCHEMA pgml CASCADE")
        through.run("CREATE EXTENSION pgml", prepare=True)
        assert through.run(ADD, prepare=True).fetchone() == ([11.0, 22.0],)
    assert installed(direct)  # rolled back: the drop too

    async def with_asyncpg() -> list[Any]:
        conn = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            messages: list[str] = []
            conn.add_log_listener(lambda _conn, message: messages.append(message.sqlstate))
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pgml")  # simple protocol
            await conn.fetch("CREATE EXTENSION IF NOT EXISTS pgml")  # extended
            await asyncio.sleep(0)
            return [messages, await conn.fetchval(ADD)]
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == [["42710", "42710"], [11.0, 22.0]]


# --------------------------------------------------------------------------- ALTER and DROP EXTENSION


def test_alter_extension_update(direct: Conn, through: Conn) -> None:
    error = through.error("ALTER EXTENSION pgml UPDATE")
    server = direct.error("ALTER EXTENSION nosuch UPDATE")
    assert (error.sqlstate, error.diag.message_primary) == (
        server.sqlstate,
        (server.diag.message_primary or "").replace("nosuch", "pgml"),
    )
    through.run("CREATE EXTENSION pgml")
    last = applied_all(direct)[-1]
    direct.run(f"DELETE FROM pgml.schema_migrations WHERE version = {last}")
    cur = through.run("ALTER EXTENSION pgml UPDATE")
    assert cur.statusmessage == "ALTER EXTENSION" and through.notices == []
    assert applied(direct) == applied_all(direct)
    (version,) = direct.run("SELECT extversion FROM pg_extension WHERE extname = 'plpgsql'").fetchone()  # type: ignore[misc]
    direct.run("ALTER EXTENSION plpgsql UPDATE")
    expected = [(s, c, m.replace(version, "2.10.0").replace("plpgsql", "pgml"), h) for s, c, m, h in direct.notices]
    cur = through.run("ALTER EXTENSION pgml UPDATE")
    assert cur.statusmessage == "ALTER EXTENSION"
    assert (
        through.notices
        == expected
        == [("NOTICE", "00000", 'version "2.10.0" of extension "pgml" is already installed', None)]
    )
    through.run("ALTER EXTENSION pgml UPDATE TO '2.10.0'")
    wrong = through.error("ALTER EXTENSION pgml UPDATE TO '9.9'")
    assert wrong.sqlstate == "22023"
    moved = through.error("ALTER EXTENSION pgml SET SCHEMA public")
    server = direct.error("ALTER EXTENSION plpgsql SET SCHEMA public")
    assert (moved.sqlstate, moved.diag.message_primary) == (
        server.sqlstate,
        (server.diag.message_primary or "").replace("plpgsql", "pgml"),
    )


def test_drop_extension_keeps_the_schema(direct: Conn, through: Conn) -> None:
    server_missing = direct.error("DROP EXTENSION nosuch")
    missing = through.error("DROP EXTENSION pgml")
    assert (missing.sqlstate, missing.diag.message_primary) == (
        server_missing.sqlstate,
        (server_missing.diag.message_primary or "").replace("nosuch", "pgml"),
    )
    direct.run("DROP EXTENSION IF EXISTS nosuch")
    expected = [(s, c, m.replace("nosuch", "pgml"), h) for s, c, m, h in direct.notices]
    cur = through.run("DROP EXTENSION IF EXISTS pgml")
    assert cur.statusmessage == "DROP EXTENSION" and through.notices == expected
    assert not installed(direct)  # and nothing was installed by it

    through.run("CREATE EXTENSION pgml")
    cur = through.run("DROP EXTENSION pgml CASCADE")
    assert cur.statusmessage == "DROP EXTENSION"
    ((severity, code, message, hint),) = through.notices
    assert (severity, code) == ("NOTICE", "00000") and 'schema "pgml" is left in place' in message
    assert hint is not None and "DROP SCHEMA pgml CASCADE" in hint
    assert installed(direct) and through.run(ADD).fetchone() == ([11.0, 22.0],)


def test_drop_extension_of_pgml_and_a_real_one(direct: Conn, through: Conn) -> None:
    if not vector_available(direct):
        pytest.skip("the server has no extension to drop alongside")
    direct.run("CREATE EXTENSION vector")
    through.run("CREATE EXTENSION pgml")
    # Carried out by a DO statement on the server (the client sees its command tag, "DO"): vector is dropped
    # for real, pgml's schema stays, and the client is told so.
    through.run("DROP EXTENSION pgml, vector")
    assert [n[2] for n in through.notices] == [
        'extension "pgml" owns no objects under pgml-proxy: its schema "pgml" is left in place'
    ]
    assert direct.run("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone() == (0,)
    assert installed(direct)
    error = through.error("DROP EXTENSION pgml, vector")  # vector is gone now: the server's own error
    assert (error.sqlstate, error.diag.message_primary) == ("42704", 'extension "vector" does not exist')


def test_create_extension_if_not_exists_on_a_current_schema_takes_no_lock(
    proxy: ProxyProcess, db: str, through: Conn
) -> None:
    """An open transaction that ran CREATE EXTENSION IF NOT EXISTS pgml (nothing to apply) does not make
    other sessions' extension commands wait (PostgreSQL's own IF NOT EXISTS takes no such lock)."""
    through.run("CREATE EXTENSION IF NOT EXISTS pgml")  # installed and current
    holder = connect(proxy.dsn(dbname=db))
    with holder.conn:
        holder.run("BEGIN")
        holder.run("CREATE EXTENSION IF NOT EXISTS pgml")
        through.run("SET lock_timeout = '2s'")
        through.run("CREATE EXTENSION IF NOT EXISTS pgml")  # would wait for the holder's advisory lock
        through.run("ALTER EXTENSION pgml UPDATE")
        holder.run("ROLLBACK")
