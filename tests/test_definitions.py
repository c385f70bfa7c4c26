"""Definitions go to the server untouched: their pgml calls run where the server evaluates them.

Through the proxy with psql and psycopg: a generated column, views (per-row and constant calls),
SQL functions and procedures, a trigger's WHEN, a rule, a policy, a domain, a materialized view
WITH NO DATA are created as written (the server's catalogue shows ``pgml.embed(``). Without
callback mode the server-side functions then answer 0A000 when the server evaluates a stored call
(an INSERT into the generated-column table, a SELECT of the view, a DO block). A call visible in
the statement text (``UPDATE … SET emb = pgml.embed(…)``) is still evaluated by the proxy, batched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database

pytestmark = pytest.mark.pg_matrix


@pytest.fixture(scope="module")
def db(pg: Postgres, proxy: ProxyProcess) -> Iterator[str]:
    with scratch_database(pg, "defs") as name:
        with psycopg.connect(proxy.dsn(dbname=name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pgml")
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb real[])")
            conn.execute("INSERT INTO docs (id, body) VALUES (1, 'red fox'), (2, 'blue sky'), (3, NULL)")
        with psycopg.connect(pg.dsn(dbname=name), autocommit=True) as conn:
            # As PostgresML declares it (and callback mode's functions do): a generation expression may call it.
            conn.execute("ALTER FUNCTION pgml.embed(text, text, jsonb) IMMUTABLE")
        yield name


@pytest.fixture
def through(proxy: ProxyProcess, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        yield conn


@pytest.fixture
def direct(pg: Postgres, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as conn:
        yield conn


def one(conn: psycopg.Connection[Any], sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args or None).fetchone()
    assert row is not None
    return row[0]


def stub_error(conn: psycopg.Connection[Any], sql: str) -> psycopg.Error:
    """The error of ``sql``: a server-side pgml function evaluated by the server (no callback mode here)."""
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql)
    assert caught.value.sqlstate == "0A000", caught.value
    return caught.value


def test_generated_column_is_stored_and_evaluated_by_the_server(
    through: psycopg.Connection[Any], direct: psycopg.Connection[Any]
) -> None:
    through.execute(
        "CREATE TABLE gen (id int, body text,"
        f" embedding real[] GENERATED ALWAYS AS (pgml.embed('{MINILM}', body)) STORED)"
    )
    expression = one(
        direct,
        "SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d"
        " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
        " WHERE d.adrelid = 'gen'::regclass AND a.attname = 'embedding'",
    )
    assert f"pgml.embed('{MINILM}'::text, body)" in expression
    error = stub_error(through, "INSERT INTO gen (id, body) VALUES (1, 'red fox')")  # the server's stub answers
    assert "pgml.embed" in (error.diag.message_primary or "")
    through.execute("ALTER TABLE gen ADD COLUMN other real[] GENERATED ALWAYS AS (pgml.embed('m', body)) STORED")
    through.execute("ALTER TABLE docs ALTER COLUMN emb SET DEFAULT pgml.embed('m', 'constant, not evaluated')")
    default = one(direct, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'docs'::regclass")
    assert "pgml.embed('m'::text, 'constant, not evaluated'::text)" in default
    through.execute("ALTER TABLE docs ALTER COLUMN emb DROP DEFAULT")


def test_views_keep_their_calls(through: psycopg.Connection[Any], direct: psycopg.Connection[Any]) -> None:
    through.execute(f"CREATE VIEW per_row AS SELECT id, pgml.embed('{MINILM}', body) AS emb FROM docs")
    through.execute(f"CREATE VIEW constant AS SELECT pgml.embed('{MINILM}', 'hello') AS emb")
    through.execute(f"CREATE MATERIALIZED VIEW later AS SELECT pgml.embed('{MINILM}', body) FROM docs WITH NO DATA")
    for view in ("per_row", "constant", "later"):
        assert "pgml.embed(" in one(direct, "SELECT pg_catalog.pg_get_viewdef(%s::regclass)", view)
    stub_error(through, "SELECT * FROM constant")  # no call visible here: the server evaluates the view's
    stub_error(through, "REFRESH MATERIALIZED VIEW later")


def test_functions_triggers_rules_policies_domains(
    through: psycopg.Connection[Any], direct: psycopg.Connection[Any]
) -> None:
    through.execute(
        "CREATE FUNCTION atomic_embed(t text) RETURNS real[] LANGUAGE sql"
        f" BEGIN ATOMIC SELECT pgml.embed('{MINILM}', t); END"
    )
    through.execute(f"CREATE FUNCTION return_embed(t text) RETURNS real[] RETURN pgml.embed('{MINILM}', t)")
    through.execute(
        "CREATE PROCEDURE embed_all() LANGUAGE sql"
        f" BEGIN ATOMIC UPDATE docs SET emb = pgml.embed('{MINILM}', body); END"
    )
    through.execute(
        "CREATE FUNCTION fill() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN NEW.emb := pgml.embed('{MINILM}', NEW.body); RETURN NEW; END $$"
    )
    through.execute(
        "CREATE TRIGGER fill BEFORE INSERT ON docs FOR EACH ROW"
        f" WHEN (pgml.embed('{MINILM}', NEW.body) IS NULL) EXECUTE FUNCTION fill()"
    )
    through.execute(f"CREATE RULE noted AS ON UPDATE TO docs DO ALSO SELECT pgml.embed('{MINILM}', NEW.body)")
    through.execute("CREATE POLICY p ON docs USING (pgml.embed('m', body) IS NOT NULL)")
    through.execute("ALTER POLICY p ON docs WITH CHECK (pgml.embed('m', body) IS NOT NULL)")
    through.execute("CREATE DOMAIN vec AS real[] DEFAULT pgml.embed('m', 'x') CHECK (VALUE <> pgml.embed('m', 'y'))")
    for function in ("atomic_embed", "return_embed", "embed_all", "fill"):
        assert "pgml.embed(" in one(direct, "SELECT pg_catalog.pg_get_functiondef(%s::regproc)", function)
    assert "pgml.embed(" in one(direct, "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'fill'")
    assert "pgml.embed(" in one(direct, "SELECT pg_get_ruledef(oid) FROM pg_rewrite WHERE rulename = 'noted'")
    assert "pgml.embed(" in one(direct, "SELECT with_check FROM pg_policies WHERE policyname = 'p'")
    stub_error(through, "SELECT atomic_embed('x')")
    stub_error(through, f"DO $$ BEGIN PERFORM pgml.embed('{MINILM}', 'x'); END $$")
    for drop in ("TRIGGER fill ON docs", "RULE noted ON docs", "POLICY p ON docs", "DOMAIN vec", "PROCEDURE embed_all"):
        through.execute(f"DROP {drop}")


def test_visible_calls_are_still_batched(through: psycopg.Connection[Any], direct: psycopg.Connection[Any]) -> None:
    through.execute(f"UPDATE docs SET emb = pgml.embed('{MINILM}', body)")  # the server's stub would refuse it
    stored = direct.execute("SELECT id, emb FROM docs ORDER BY id").fetchall()
    constant = one(through, f"SELECT pgml.embed('{MINILM}', 'red fox')")
    assert stored[0][1] == pytest.approx(constant) and stored[2][1] is None
    through.execute(f"CREATE TABLE copied AS SELECT id, pgml.embed('{MINILM}', body) AS emb FROM docs")
    assert one(direct, "SELECT count(emb) FROM copied") == 2


def test_psql_script_of_definitions(pg: Postgres, proxy: ProxyProcess, db: str) -> None:
    script = f"""
CREATE TABLE psql_gen (body text, embedding real[] GENERATED ALWAYS AS (pgml.embed('{MINILM}', body)) STORED);
CREATE VIEW psql_view AS SELECT body, pgml.embed('{MINILM}', body) AS emb FROM docs;
CREATE OR REPLACE VIEW psql_view AS SELECT body, pgml.embed('{MINILM}', body) AS emb FROM docs;
SELECT pg_catalog.pg_get_viewdef('psql_view'::regclass) LIKE '%pgml.embed(%' AS stored;
"""
    done = subprocess.run(
        [pg.tool("psql"), proxy.dsn(dbname=db), "-X", "-A", "-v", "ON_ERROR_STOP=1"],
        input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2] == "t"
