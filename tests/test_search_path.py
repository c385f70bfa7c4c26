"""Unqualified pgml calls through the session's search_path: ``SET search_path = pgml, public; SELECT embed(…)``.

Through the proxy with psycopg and psql: SET, startup options, RESET, SET LOCAL and SET in a
rolled-back transaction, a ``public.embed`` listed first shadowing pgml's, ``rank()`` and
``version()`` staying pg_catalog's, per-row calls, prepared statements (extended protocol and SQL
PREPARE). A session on the default path sends the server nothing more than its own statements.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database, start_proxy

pytestmark = pytest.mark.pg_matrix


@pytest.fixture(scope="module")
def db(pg: Postgres, proxy: ProxyProcess) -> Iterator[str]:
    with scratch_database(pg, "path") as name:
        with psycopg.connect(proxy.dsn(dbname=name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pgml")
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
            conn.execute("INSERT INTO docs VALUES (1, 'red fox'), (2, 'blue sky')")
        yield name


@pytest.fixture
def through(proxy: ProxyProcess, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        yield conn


def one(conn: psycopg.Connection[Any], sql: str, params: Any = None, **kwargs: Any) -> Any:
    row = conn.execute(sql, params, **kwargs).fetchone()
    assert row is not None
    return row[0]


def sqlstate(conn: psycopg.Connection[Any], sql: str) -> str | None:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql)
    return caught.value.sqlstate


EMBED = f"SELECT embed('{MINILM}', 'red fox')"


@pytest.fixture(scope="module")
def reference(proxy: ProxyProcess, db: str) -> list[float]:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        return list(one(conn, f"SELECT pgml.embed('{MINILM}', 'red fox')"))


def test_set_and_reset(through: psycopg.Connection[Any], reference: list[float]) -> None:
    assert sqlstate(through, EMBED) == "42883"  # "$user", public: the server has no embed()
    through.execute("SET search_path = pgml, public")
    assert one(through, EMBED) == pytest.approx(reference)
    rows = through.execute(f"SELECT id, embed('{MINILM}', body) FROM docs ORDER BY id").fetchall()  # per row
    assert rows[0][1] == pytest.approx(reference) and len(rows) == 2
    through.execute("RESET search_path")
    assert sqlstate(through, EMBED) == "42883"
    through.execute("SET search_path TO pgml")
    assert one(through, EMBED) == pytest.approx(reference)
    through.execute("SET search_path TO DEFAULT")
    assert sqlstate(through, EMBED) == "42883"


def test_startup_options(proxy: ProxyProcess, db: str, reference: list[float]) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True, options="-c search_path=pgml,public") as conn:
        assert one(conn, EMBED) == pytest.approx(reference)
        conn.execute("RESET search_path")  # to the session's default: the startup packet's
        assert one(conn, EMBED) == pytest.approx(reference)


def test_transactions_undo_it(through: psycopg.Connection[Any], reference: list[float]) -> None:
    through.execute("BEGIN")
    through.execute("SET LOCAL search_path = pgml, public")
    assert one(through, EMBED) == pytest.approx(reference)
    through.execute("COMMIT")  # SET LOCAL ends with its transaction
    assert sqlstate(through, EMBED) == "42883"
    through.execute("BEGIN")
    through.execute("SET search_path = pgml, public")
    through.execute("ROLLBACK")  # undoes a plain SET too
    assert sqlstate(through, EMBED) == "42883"
    through.execute("SELECT pg_catalog.set_config('search_path', 'pgml, public', false)")
    assert one(through, EMBED) == pytest.approx(reference)


def test_an_earlier_schema_wins(through: psycopg.Connection[Any], reference: list[float]) -> None:
    through.execute(
        "CREATE FUNCTION public.embed(transformer text, t text) RETURNS real[]"
        " LANGUAGE sql AS 'SELECT ARRAY[42]::real[]'"
    )
    try:
        through.execute("SET search_path = public, pgml")
        assert one(through, EMBED) == [42.0]  # the user's function, run by the server
        through.execute("SET search_path = pgml, public")
        assert one(through, EMBED) == pytest.approx(reference)
    finally:
        through.execute("DROP FUNCTION public.embed(text, text)")


def test_pg_catalog_comes_first(through: psycopg.Connection[Any]) -> None:
    ranks = "SELECT rank() OVER (ORDER BY x) FROM (VALUES (1), (2)) v(x)"
    for path in ("pgml, public", "pgml, pg_catalog, public"):
        through.execute(f"SET search_path = {path}")
        assert [r[0] for r in through.execute(ranks)] == [1, 2]  # a window call: never pgml.rank
    through.execute("SET search_path = pgml, public")
    assert one(through, "SELECT version()").startswith("PostgreSQL")  # pg_catalog's, searched first
    through.execute("SET search_path = pgml, pg_catalog")
    assert one(through, "SELECT version()") == one(through, "SELECT pgml.version()")  # listed after pgml


def test_prepared_statements(through: psycopg.Connection[Any], reference: list[float]) -> None:
    through.execute("SET search_path = pgml, public")
    for _ in range(3):  # psycopg prepares it server-side from the second run on
        assert one(through, "SELECT embed(%s, %s)", (MINILM, "red fox"), prepare=True) == pytest.approx(reference)
    through.execute("PREPARE e(text) AS SELECT embed($1, 'red fox')")
    assert one(through, f"EXECUTE e('{MINILM}')") == pytest.approx(reference)


def test_psql(pg: Postgres, proxy: ProxyProcess, db: str) -> None:
    script = f"""
SET search_path = pgml, public;
SELECT array_length(embed('{MINILM}', 'red fox'), 1) AS dims;
SELECT chunk_index, chunk FROM chunk('character', 'abcd efgh', '{{"chunk_size": 4, "chunk_overlap": 0}}');
"""
    done = subprocess.run(
        [pg.tool("psql"), proxy.dsn(dbname=db), "-X", "-A", "-v", "ON_ERROR_STOP=1"],
        input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[lines.index("dims") + 1] == "384" and lines[lines.index("chunk_index|chunk") + 1].startswith("1|")


def test_the_default_path_costs_nothing(pg: Postgres, db: str, model_dir: Path, tmp_path: Path) -> None:
    """On "$user", public the proxy sends the server exactly the client's statements (its protocol trace). A server
    before PostgreSQL 18 does not report its search_path: the first statement naming a pgml function by a bare name
    costs one lookup per session (a role's default could list pgml), none after it."""
    traced = start_proxy(
        pg.dsn(), tmp_path, PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir), PGML_PROXY_LOG_TRACE_PROTOCOL="1"
    )
    statements = [
        "SELECT rank() OVER (ORDER BY x) FROM (VALUES (1), (2)) v(x)",
        "SELECT version()",
        "SELECT 1 AS embed",
        "SELECT count(*) FROM docs",
    ]
    try:
        with psycopg.connect(traced.dsn(dbname=db), autocommit=True) as conn:
            for sql in statements * 2:
                conn.execute(sql)
            sqlstate(conn, EMBED)  # 42883 from the server
    finally:
        traced.stop()
    sent = re.findall(r"proxy>server (\w+)", traced.log_text())
    lookups = 0 if pg.version >= 18 else 1
    assert sent.count("Query") + sent.count("Parse") == 2 * len(statements) + 1 + lookups, sent


def test_psql_c_with_a_set_earlier_in_the_string(pg: Postgres, proxy: ProxyProcess, db: str) -> None:
    """``psql -c "SET search_path …; SELECT embed(…)"``: one simple Query; the SET counts for what follows it."""
    sql = f"SET search_path = pgml, public; SELECT array_length(embed('{MINILM}', 'red fox'), 1)"
    done = subprocess.run(
        [pg.tool("psql"), proxy.dsn(dbname=db), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SET", "384"]


def results(conn: psycopg.Connection[Any], sql: str) -> list[Any]:
    """Each statement's first value, or its command tag, of one simple Query string."""
    cur = conn.execute(sql)
    out: list[Any] = []
    while True:
        out.append(cur.fetchone()[0] if cur.description else cur.statusmessage)  # type: ignore[index]
        if not cur.nextset():
            return out


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET search_path = pgml, public; {embed}", ["SET", 384]),
        ("SET LOCAL search_path = pgml, public; {embed}", ["SET", 384]),  # the string's implicit transaction
        ("SET SESSION search_path TO 'pgml'; {embed}; RESET search_path", ["SET", 384, "RESET"]),
        ("BEGIN; SET LOCAL search_path = pgml, public; {embed}; COMMIT", ["BEGIN", "SET", 384, "COMMIT"]),
        ("SET search_path = pgml, public; {embed}; SET search_path = public, pgml; {embed}", ["SET", 384, "SET", 384]),
        ("SET search_path = \"pgml\"; SELECT 1; {embed}", ["SET", 1, 384]),
        ("SET SCHEMA 'pgml'; {embed}", ["SET", 384]),  # SET SCHEMA is SET search_path
        ('SET "SEARCH_PATH" = pgml; {embed}', ["SET", 384]),  # setting names are case-insensitive
        ("SET search_path = pgml, 42; {embed}", ["SET", 384]),  # a number is a schema name
        ("SET search_path = pgml; COMMIT; SELECT 1; ROLLBACK; {embed}", ["SET", "COMMIT", 1, "ROLLBACK", 384]),
        (  # ROLLBACK TO goes back to the savepoint's path
            "BEGIN; SET search_path = pgml; SAVEPOINT s; SET search_path = public; ROLLBACK TO s; {embed}; COMMIT",
            ["BEGIN", "SET", "SAVEPOINT", "SET", "ROLLBACK", 384, "COMMIT"],
        ),
    ],
)
def test_a_set_in_the_string_counts_for_what_follows(
    through: psycopg.Connection[Any], sql: str, expected: list[Any]
) -> None:
    embed = f"SELECT array_length(embed('{MINILM}', 'red fox'), 1)"
    assert results(through, sql.format(embed=embed)) == expected
    through.execute("RESET search_path")
    assert sqlstate(through, EMBED) == "42883"  # the session's own path again


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT embed('{m}', 'x'); SET search_path = pgml, public",  # before the SET: the session's path
        "SET search_path = pgml; RESET search_path; SELECT embed('{m}', 'x')",  # back to the default
        "SET search_path = pgml; SET search_path TO DEFAULT; SELECT embed('{m}', 'x')",
        "BEGIN; SET LOCAL search_path = pgml; COMMIT; SELECT embed('{m}', 'x')",  # SET LOCAL ended with it
        "SET search_path = pgml; SELECT 1; ROLLBACK; SELECT embed('{m}', 'x')",  # the implicit transaction undone
        "BEGIN; SET search_path = public; SAVEPOINT s; SET search_path = pgml; ROLLBACK TO s; SELECT embed('{m}', 'x')",
        # not followed, so not qualified: the server resolves the bare name
        "SET search_path = pgml; SELECT set_config('search_path', 'public', false); SELECT embed('{m}', 'x')",
        "SET search_path = pgml; DO $$BEGIN PERFORM set_config('search_path', 'public', false); END$$;"
        " SELECT embed('{m}', 'x')",
    ],
)
def test_a_string_that_sets_it_back_or_later_fails_as_on_the_server(
    pg: Postgres, through: psycopg.Connection[Any], db: str, sql: str
) -> None:
    """The same answer as the server gives for the same string, through the proxy: 42883 (no embed() there)."""
    text = sql.format(m=MINILM)
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as direct:
        assert sqlstate(direct, text) == "42883"
        assert sqlstate(through, text) == "42883"
        assert through.info.transaction_status == direct.info.transaction_status
        if direct.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:  # the string began a block
            direct.execute("ROLLBACK")
            through.execute("ROLLBACK")
        assert one(through, "SHOW search_path") == one(direct, "SHOW search_path")


@pytest.mark.parametrize(
    ("earlier", "sql"),
    [
        # a ROLLBACK in a later string undoes the SET of the string that began the block
        ("BEGIN; SET search_path = pgml", "SELECT 1; ROLLBACK; SELECT embed('{m}', 'x')"),
        ("BEGIN; SET search_path = pgml", "SET search_path = pgml, public; ROLLBACK; SELECT embed('{m}', 'x')"),
        ("BEGIN; SET LOCAL search_path = pgml", "SELECT 1; COMMIT; SELECT embed('{m}', 'x')"),
    ],
)
def test_a_transaction_begun_by_an_earlier_string(
    pg: Postgres, through: psycopg.Connection[Any], db: str, earlier: str, sql: str
) -> None:
    """The block an earlier string opened and set the path in ends in this one: the server's answer, not a guess."""
    text = sql.format(m=MINILM)
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as direct:
        for conn in (direct, through):
            conn.execute(earlier)
            assert sqlstate(conn, text) == "42883"
            assert one(conn, "SHOW search_path") == '"$user", public'
        through.execute(earlier)  # the path learned inside the block is forgotten at its end
        assert len(one(through, EMBED)) == 384
        through.execute("ROLLBACK")
        assert sqlstate(through, EMBED) == "42883"


def test_a_rollback_gives_back_the_path_before_the_block(proxy: ProxyProcess, db: str) -> None:
    """A block an earlier string began and took pgml off the path in, rolled back in the string that calls embed()."""
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True, options="-c search_path=pgml,public") as conn:
        conn.execute("BEGIN")
        conn.execute("SET search_path = public")
        sql = f"SELECT 1; ROLLBACK; SELECT array_length(embed('{MINILM}', 'x'), 1)"
        assert results(conn, sql) == [1, "ROLLBACK", 384]
        # One string that sets it and opens a block: the SET may have committed before the block ("SET …; COMMIT;
        # BEGIN") or be in it ("BEGIN; SET …"); the proxy does not parse what it relays, so it does not qualify
        # what follows the ROLLBACK: the server's own pgml.embed (the stub) answers, never a guessed path's.
        conn.execute("BEGIN; SET search_path = public")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(sql)
        assert caught.value.sqlstate == "0A000"
        assert one(conn, "SHOW search_path") == "pgml,public"


def test_the_path_before_a_block_sans_io() -> None:
    """What a ROLLBACK of the open block gives back, as the tracker keeps it."""
    from proxy.session.search_path import SearchPath

    idle, in_block = ord("I"), ord("T")
    path = SearchPath()
    path.report("pgml, public")
    path.ready(idle, True)
    assert path.at_idle == "pgml, public" and not path.changed_in_block
    path.ready(in_block, True)  # BEGIN
    path.touched(True)  # SET search_path = public, in the block
    path.report("public")
    path.ready(in_block, True)
    assert path.at_idle == "pgml, public" and path.changed_in_block
    path.report("pgml, public")  # ROLLBACK
    path.ready(idle, True)
    assert path.at_idle == "pgml, public" and not path.changed_in_block
    path.touched(False)  # "SET search_path = public; COMMIT; BEGIN", or "BEGIN; SET …": which, is not known
    path.report("public")
    path.ready(in_block, True)
    assert path.at_idle is None and path.changed_in_block


def test_set_schema_in_its_own_string(through: psycopg.Connection[Any], reference: list[float]) -> None:
    """``SET SCHEMA 'x'`` is ``SET search_path = x``, for the session's path too (servers before 18 don't report it)."""
    through.execute("SET SCHEMA 'pgml'")
    assert list(one(through, EMBED)) == pytest.approx(reference)
    through.execute("SET SCHEMA 'public'")
    assert sqlstate(through, EMBED) == "42883"


def test_a_schema_the_role_cannot_use_is_skipped(pg: Postgres, proxy: ProxyProcess, db: str) -> None:
    """As the server resolves names: a schema without USAGE is not searched, so a later pgml's embed() is the one."""
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS path_nousage")
        admin.execute("CREATE ROLE path_nousage LOGIN")
        admin.execute("CREATE SCHEMA IF NOT EXISTS hidden")
        admin.execute("CREATE OR REPLACE FUNCTION hidden.embed(text, text) RETURNS int LANGUAGE sql AS 'SELECT 7'")
        try:
            sql = f"SET search_path = hidden, pgml; SELECT array_length(embed('{MINILM}', 'x'), 1)"
            with psycopg.connect(proxy.dsn(dbname=db, user="path_nousage"), autocommit=True) as conn:
                assert results(conn, sql) == ["SET", 384]
                conn.execute("SET search_path = hidden, pgml")
                assert one(conn, f"SELECT array_length(embed('{MINILM}', 'x'), 1)") == 384
            with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as owner:  # the superuser may: hidden's
                assert results(owner, sql.replace("array_length(", "(").replace(", 1)", ")")) == ["SET", 7]
        finally:
            admin.execute("DROP SCHEMA hidden CASCADE")
            admin.execute("DROP OWNED BY path_nousage")
            admin.execute("DROP ROLE path_nousage")


def test_a_reset_in_the_string_takes_the_sessions_default(proxy: ProxyProcess, db: str) -> None:
    """RESET goes back to the startup packet's value (reset_val), which here names pgml."""
    options = "-c search_path=pgml,public"
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True, options=options) as conn:
        sql = f"SET search_path = public; RESET search_path; SELECT array_length(embed('{MINILM}', 'x'), 1)"
        assert results(conn, sql) == ["SET", "RESET", 384]


def test_changes_of_a_string() -> None:
    """Sans-IO: which path each statement of a string runs on."""
    import pglast

    from proxy.rewrite.unqualified import RESET, START, UNKNOWN, SetTo, changes

    def of(sql: str) -> Any:
        return changes(tuple(pglast.parse_sql(sql)), sql)

    assert of("SELECT 1; SELECT 2") is None
    assert of("SELECT 1; SET search_path = pgml") is None  # nothing runs after it
    assert of("SET search_path = pgml, \"My S\", 'a,b', '$user'; SELECT 1") == (
        START, SetTo('pgml, "My S", "a,b", "$user"')
    )
    assert of("SET LOCAL search_path = x; SELECT 1; COMMIT; SELECT 2") == (START, SetTo("x"), SetTo("x"), START)
    assert of("SET search_path = x; SET LOCAL search_path = y; COMMIT; SELECT 1") == (
        START, SetTo("x"), SetTo("y"), SetTo("x")
    )
    assert of("SET search_path = x; ROLLBACK; SELECT 1") == (START, SetTo("x"), START)
    assert of("RESET ALL; SELECT 1") == (START, RESET)
    assert of("SET search_path TO DEFAULT; SELECT 1") == (START, RESET)
    assert of("SET work_mem = '1MB'; SELECT 1") is None
    assert of("SET SCHEMA 'x'; SELECT 1") == (START, SetTo("x"))
    assert of("SET search_path = x, 42, 1.5; SELECT 1") == (START, SetTo("x, 42, 1.5"))
    assert of("SET search_path = x; COMMIT; SET search_path = y; ROLLBACK; SELECT 1") == (
        START, SetTo("x"), SetTo("x"), SetTo("y"), SetTo("x")
    )
    assert of("BEGIN; SET search_path = x; SAVEPOINT a; SET search_path = y; ROLLBACK TO a; SELECT 1") == (
        START, START, SetTo("x"), SetTo("x"), SetTo("y"), SetTo("x")
    )
    assert of("BEGIN; SAVEPOINT a; SET search_path = x; RELEASE a; SELECT 1; ROLLBACK; SELECT 2") == (
        START, START, START, SetTo("x"), SetTo("x"), SetTo("x"), START
    )
    # a savepoint of an earlier string: the path it had there (nothing changed it in the block before this string)
    assert of("SET search_path = x; ROLLBACK TO elsewhere; SELECT 1") == (START, SetTo("x"), START)
    assert of("SET search_path = x; RELEASE elsewhere; SELECT 1") == (START, SetTo("x"), SetTo("x"))
    ends = "SET search_path = x; ROLLBACK TO elsewhere; SELECT 1"
    assert changes(tuple(pglast.parse_sql(ends)), ends, SetTo("a")) == (START, SetTo("x"), UNKNOWN)
    assert of("SELECT set_config('search_path', 'x', false); SELECT 1") == (START, UNKNOWN)
    assert of("DO $$BEGIN SET search_path = x; END$$; SELECT 1") == (START, UNKNOWN)
    assert of("SELECT current_setting('search_path'); SELECT 1") is None  # reading it changes nothing
    # a string that begins inside a block the path changed in: what its end leaves is not known
    # a string that begins inside a block the path changed in (from "a, b"): a ROLLBACK gives that back, what a
    # COMMIT leaves is not known (an earlier SET may have been LOCAL) unless this string set it
    before = SetTo("a, b")
    for sql, paths in [
        ("SELECT 1; COMMIT; SELECT 2", (START, START, UNKNOWN)),
        ("SELECT 1; ROLLBACK; SELECT 2", (START, START, before)),
        ("SET search_path = x; COMMIT; SELECT 2", (START, SetTo("x"), SetTo("x"))),
        ("SET search_path = x; ROLLBACK; SELECT 2", (START, SetTo("x"), before)),
    ]:
        assert changes(tuple(pglast.parse_sql(sql)), sql, before) == paths
        unknown = tuple(UNKNOWN if p == before else p for p in paths)
        assert changes(tuple(pglast.parse_sql(sql)), sql, UNKNOWN) == unknown
