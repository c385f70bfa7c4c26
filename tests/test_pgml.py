"""pgml.embed / pgml.chunk / pgml.version through the proxy, with the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.embedded import PORT_FILE, Cluster, find_bin_dir
from tests.conftest import MINILM, Postgres, ProxyProcess

pytestmark = pytest.mark.pg_matrix

SENTENCES = [
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply on Monday.",
    "Investors sold shares as indexes dropped.",
    "The recipe needs two cups of flour.",
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def docs(pg: Postgres) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS docs")
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, topic text, emb real[])")
        rows = [(i + 1, s, "animals" if i < 2 else "finance" if i < 4 else "food") for i, s in enumerate(SENTENCES)]
        rows.append((6, None, "none"))
        rows.append((7, SENTENCES[0], "animals"))  # a duplicate body: computed once, looked up twice
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO docs (id, body, topic) VALUES (%s, %s, %s)", rows)
    return "docs"


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def embed_one(conn: psycopg.Connection, text: str) -> list[float]:
    row = conn.execute(f"SELECT pgml.embed('{MINILM}', '{text}')").fetchone()
    assert row is not None
    return list(row[0])


def test_version(conn: psycopg.Connection) -> None:
    cur = conn.execute("SELECT pgml.version()")
    assert cur.description is not None and cur.description[0].name == "version"
    row = cur.fetchone()
    assert row is not None and row[0].startswith("2.10.0 (pgml-proxy ")


def test_embed_constant_semantics(conn: psycopg.Connection) -> None:
    cur = conn.execute(f"SELECT pgml.embed('{MINILM}', 'The cat sat on the mat.')")
    assert cur.description is not None and cur.description[0].name == "embed"
    vectors = [embed_one(conn, s.replace("'", "''")) for s in SENTENCES[:4]]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert cosine(vectors[2], vectors[3]) > cosine(vectors[2], vectors[1]) + 0.2


def test_embed_array_form_in_order(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        f"SELECT embed FROM pgml.embed('{MINILM}', ARRAY['{SENTENCES[2]}', '{SENTENCES[0]}'])"
    ).fetchall()
    assert len(rows) == 2
    for (vector,), text in zip(rows, [SENTENCES[2], SENTENCES[0]], strict=True):
        assert cosine(list(vector), embed_one(conn, text)) > 0.9999


def test_embed_kwargs_and_local_path(conn: psycopg.Connection, model_dir: Path) -> None:
    path = model_dir / MINILM  # a local path loads only inside [engine] model_dirs
    query = sql.SQL("SELECT pgml.embed({}, 'hello', kwargs => '{{\"normalize_embeddings\": true}}')").format(
        sql.Literal(str(path))
    )
    row = conn.execute(query).fetchone()
    assert row is not None and len(row[0]) == 384
    assert abs(math.sqrt(sum(x * x for x in row[0])) - 1.0) < 1e-4  # normalized
    assert cosine(list(row[0]), embed_one(conn, "hello")) > 0.9999  # the same model as by hub name


def test_per_row_equals_per_call(conn: psycopg.Connection, docs: str) -> None:
    rows = conn.execute(f"SELECT id, pgml.embed('{MINILM}', body) AS e FROM docs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[5][1] is None  # NULL body -> NULL (STRICT)
    for (_, vector), text in zip(rows[:5], SENTENCES, strict=True):
        assert cosine(list(vector), embed_one(conn, text.replace("'", "''"))) > 0.9999
    assert rows[0][1] == rows[6][1]


def test_per_row_in_where_order_by_and_update(conn: psycopg.Connection, docs: str) -> None:
    count = conn.execute(f"SELECT count(*) FROM docs WHERE pgml.embed('{MINILM}', body) IS NOT NULL").fetchone()
    assert count == (6,)
    assert conn.execute(f"UPDATE docs SET emb = pgml.embed('{MINILM}', body)").rowcount == 7
    ranked = conn.execute(
        f"SELECT id FROM docs WHERE emb IS NOT NULL ORDER BY pgml.cosine_similarity(emb, "
        f"pgml.embed('{MINILM}', 'Shares dropped on the exchange')) DESC LIMIT 2"
    ).fetchall()
    assert {r[0] for r in ranked} == {3, 4}
    conn.execute("DROP TABLE IF EXISTS docs_copy; CREATE TABLE docs_copy (id int, e real[])")
    conn.execute(f"INSERT INTO docs_copy SELECT id, pgml.embed('{MINILM}', body) FROM docs WHERE topic = 'finance'")
    assert conn.execute("SELECT count(*), min(array_length(e, 1)) FROM docs_copy").fetchone() == (2, 384)
    deleted = conn.execute(f"DELETE FROM docs_copy WHERE pgml.embed('{MINILM}', 'x') IS NOT NULL AND id = 3")
    assert deleted.rowcount == 1


def test_per_row_in_join_condition(conn: psycopg.Connection, docs: str) -> None:
    conn.execute("DROP TABLE IF EXISTS labels; CREATE TABLE labels (name text, e real[])")
    conn.execute(f"INSERT INTO labels SELECT t, pgml.embed('{MINILM}', t) FROM (VALUES ('cats'), ('money')) v(t)")
    condition = f"pgml.cosine_similarity(pgml.embed('{MINILM}', d.body), l.e) > 0.2"
    joined = conn.execute(f"SELECT d.id, l.name FROM docs d JOIN labels l ON {condition} ORDER BY 1, 2").fetchall()
    filtered = conn.execute(f"SELECT d.id, l.name FROM docs d, labels l WHERE {condition} ORDER BY 1, 2").fetchall()
    assert joined == filtered and joined
    assert (1, "cats") in joined and (7, "cats") in joined
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        conn.execute(f"SELECT 1 FROM docs d JOIN labels l ON pgml.embed('{MINILM}', body || name) IS NOT NULL")


def test_group_by_and_expressions(conn: psycopg.Connection, docs: str) -> None:
    rows = conn.execute(
        f"SELECT topic, array_length(pgml.embed('{MINILM}', string_agg(body, ' ' ORDER BY id)), 1) "
        "FROM docs WHERE body IS NOT NULL GROUP BY topic ORDER BY topic"
    ).fetchall()
    assert rows == [("animals", 384), ("finance", 384), ("food", 384)]
    row = conn.execute(f"SELECT pgml.embed('{MINILM}', 'a' || 'b') = pgml.embed('{MINILM}', 'ab')").fetchone()
    assert row == (True,)


def test_pgvector_workflow(conn: psycopg.Connection, docs: str, pg: Postgres) -> None:
    if pg.version == 15:
        pytest.skip("the system PostgreSQL 15 has no pgvector; the bundled 16/18 servers do")
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute("DROP TABLE IF EXISTS vdocs; CREATE TABLE vdocs (id int, body text, emb vector(384))")
    conn.execute("INSERT INTO vdocs (id, body) SELECT id, body FROM docs WHERE body IS NOT NULL")
    conn.execute(f"UPDATE vdocs SET emb = pgml.embed('{MINILM}', body)::vector")
    conn.execute("CREATE INDEX ON vdocs USING hnsw (emb vector_cosine_ops)")
    rows = conn.execute(
        f"SELECT id FROM vdocs ORDER BY emb <=> pgml.embed('{MINILM}', 'a small cat lying down')::vector LIMIT 2"
    ).fetchall()
    assert {r[0] for r in rows} <= {1, 2, 7} and len(rows) == 2


def test_chunk_forms(conn: psycopg.Connection, docs: str) -> None:
    text = "alpha beta gamma delta epsilon"
    kwargs = '{"chunk_size": 11, "chunk_overlap": 0}'
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    expected = RecursiveCharacterTextSplitter(chunk_size=11, chunk_overlap=0).split_text(text)
    rows = conn.execute(f"SELECT * FROM pgml.chunk('recursive_character', '{text}', '{kwargs}')").fetchall()
    assert rows == [(i + 1, c) for i, c in enumerate(expected)] and len(rows) >= 3
    cur = conn.execute(
        f"SELECT (c).chunk_index, (c).chunk FROM (SELECT pgml.chunk('recursive_character', '{text}', '{kwargs}') c) s"
    )
    assert cur.fetchall() == rows
    per_row = conn.execute(
        f"SELECT id, (c).chunk_index FROM (SELECT id, pgml.chunk('recursive_character', body, '{kwargs}') c "
        "FROM docs WHERE id IN (1, 3)) s ORDER BY 1, 2"
    ).fetchall()
    assert [r[0] for r in per_row].count(1) >= 2 and 3 in [r[0] for r in per_row]
    markdown = conn.execute("SELECT chunk FROM pgml.chunk('markdown', E'# T\\n\\nbody text')").fetchall()
    assert markdown and "body text" in markdown[-1][0]


def test_set_returning_calls_in_from_with_columns(conn: psycopg.Connection, docs: str) -> None:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    kwargs = '{"chunk_size": 12, "chunk_overlap": 0}'
    rows = conn.execute(
        f"SELECT d.id, c.chunk_index, c.chunk FROM docs d, pgml.chunk('recursive_character', d.body, '{kwargs}') AS c "
        "WHERE d.id IN (1, 3) ORDER BY 1, 2"
    ).fetchall()
    splitter = RecursiveCharacterTextSplitter(chunk_size=12, chunk_overlap=0)
    expected = [(i, n + 1, c) for i in (1, 3) for n, c in enumerate(splitter.split_text(SENTENCES[i - 1]))]
    assert rows == expected
    vectors = conn.execute(
        # A function of a base type (SETOF real[]) in FROM: its one column is named by the table alias, as
        # PostgreSQL names it (``SELECT x.generate_series FROM generate_series(1, 2) x`` is an error).
        f"SELECT d.id, e.e FROM docs d, pgml.embed('{MINILM}', ARRAY[d.body, d.topic]) e WHERE d.id = 3"
    ).fetchall()
    assert [r[0] for r in vectors] == [3, 3]
    assert cosine(list(vectors[0][1]), embed_one(conn, SENTENCES[2])) > 0.9999
    assert cosine(list(vectors[1][1]), embed_one(conn, "finance")) > 0.9999


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SELECT pgml.embed('no-such/model', 'x')", "42704"),
        ("SELECT pgml.chunk('nope', 'x')", "22023"),
        ("SELECT * FROM pgml.chunk('character', 'x', '{\"chunk_size\": \"big\"}')", "22023"),
        ("SELECT pgml.embed('m', 'x', '{bad')", "22P02"),
        ("SELECT pgml.embed('m')", "42883"),
        (f"SELECT pgml.embed('{MINILM}', 'x', '{{\"trust_remote_code\": true}}')", "22023"),
        ("SELECT pgml.embed('m', body) FROM no_such_table", "42P01"),
    ],
)
def test_errors_have_sqlstates(conn: psycopg.Connection, sql: str, sqlstate: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    assert info.value.sqlstate == sqlstate
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_error_inside_transaction_aborts_it(proxy: ProxyProcess, docs: str) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tx_probe (i int)")
        conn.commit()
        conn.execute("INSERT INTO tx_probe VALUES (1)")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT pgml.embed('no-such/model', 'x')")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("COMMIT")  # the server turns it into a rollback
        assert conn.execute("SELECT count(*) FROM tx_probe").fetchone() == (0,)


def test_per_row_call_inside_transaction_sees_own_rows(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE mine (id int, body text)")
        conn.execute("INSERT INTO mine VALUES (1, 'uncommitted text')")
        row = conn.execute(f"SELECT array_length(pgml.embed('{MINILM}', body), 1) FROM mine").fetchone()
        assert row == (384,)
        conn.rollback()


def test_privileges_are_the_clients(proxy: ProxyProcess, pg: Postgres, docs: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS reader")
        admin.execute("CREATE ROLE reader LOGIN")
        admin.execute("GRANT USAGE ON SCHEMA pgml TO reader")
    with psycopg.connect(proxy.dsn(user="reader"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SELECT pgml.embed('{MINILM}', body) FROM docs")
        assert conn.execute(f"SELECT array_length(pgml.embed('{MINILM}', 'ok'), 1)").fetchone() == (384,)


def test_schema_is_installed_and_stubs_refuse_direct_use(pg: Postgres, conn: psycopg.Connection) -> None:
    conn.execute("SELECT pgml.version()")
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        tables = {r[0] for r in direct.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'pgml'")}
        assert {"projects", "snapshots", "models", "deployments", "files", "logs"} <= tables
        views = {r[0] for r in direct.execute("SELECT viewname FROM pg_views WHERE schemaname = 'pgml'")}
        assert views == {"overview", "trained_models", "deployed_models"}
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            direct.execute("SELECT pgml.embed('m', 'x')")
        assert "pgml-proxy" in str(info.value)
        assert direct.execute("SELECT pgml.cosine_similarity(ARRAY[1,0]::real[], ARRAY[1,0]::real[])").fetchone() == (
            1.0,
        )


def test_init_command_is_idempotent(pg: Postgres) -> None:
    cmd = [sys.executable, "-m", "proxy", "--upstream", pg.dsn(), "init"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "(0 migration(s) applied)" in second.stdout


def test_non_superuser_installs_schema(proxy: ProxyProcess, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS appdb")
        admin.execute("DROP ROLE IF EXISTS app")
        admin.execute("CREATE ROLE app LOGIN")
        admin.execute("CREATE DATABASE appdb OWNER app")
    with psycopg.connect(proxy.dsn(user="app", dbname="appdb"), autocommit=True) as conn:
        assert conn.execute("SELECT pgml.version()").fetchone() is not None
        assert conn.execute("SELECT count(*) FROM pgml.projects").fetchone() == (0,)


def test_plain_queries_answered_while_another_session_embeds(proxy: ProxyProcess, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS many; CREATE TABLE many AS SELECT i, 'sentence number ' || i AS body "
                      "FROM generate_series(1, 1500) i")  # fmt: skip
    done = threading.Event()

    def embed_all() -> None:
        with psycopg.connect(proxy.dsn()) as busy:
            busy.execute(f"SELECT pgml.embed('{MINILM}', body) FROM many").fetchall()
        done.set()

    worker = threading.Thread(target=embed_all)
    worker.start()
    latencies = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        time.sleep(0.5)
        while not done.is_set() and len(latencies) < 50:
            started = time.monotonic()
            other.execute("SELECT 1")
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    worker.join(120)
    assert (latencies and not done.is_set()) or len(latencies) >= 5
    assert max(latencies) < 1.0, latencies


def test_cancel_long_embed(proxy: ProxyProcess, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS longtexts; CREATE TABLE longtexts AS SELECT i, repeat('word ', 100) || i "
                      "AS body FROM generate_series(1, 2000) i")  # fmt: skip
    with psycopg.connect(proxy.dsn()) as conn:
        timer = threading.Timer(1.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"SELECT pgml.embed('{MINILM}', body) FROM longtexts").fetchall()
        assert time.monotonic() - started < 30
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_constant_calls_and_reused_statement(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        stmt = await conn.prepare(f"SELECT pgml.embed('{MINILM}', 'hello asyncpg') AS e")
        assert [a.name for a in stmt.get_attributes()] == ["e"]
        first = await stmt.fetchval()
        for _ in range(20):
            assert await stmt.fetchval() == first
        assert len(first) == 384
        rows = await conn.fetch("SELECT chunk_index, chunk FROM pgml.chunk('character', 'a b c', "
                                "'{\"chunk_size\": 1, \"chunk_overlap\": 0, \"separator\": \" \"}')")  # fmt: skip
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
        with pytest.raises(asyncpg.exceptions.UndefinedObjectError):
            await conn.fetchval("SELECT pgml.embed('no-such/model', 'x')")
        assert await conn.fetchval("SELECT 2") == 2
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_async (i int)")
        with pytest.raises(asyncpg.exceptions.UndefinedObjectError):
            async with conn.transaction():
                await conn.execute("INSERT INTO t_async VALUES (1)")
                await conn.fetchval("SELECT pgml.embed('no-such/model', 'x')")
        assert await conn.fetchval("SELECT count(*) FROM t_async") == 0
    finally:
        await conn.close()


async def test_asyncpg_parameters_reused_prepared_statement(proxy: ProxyProcess, docs: str) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        stmt = await conn.prepare("SELECT pgml.embed($1, $2) AS e, $3::int AS n")
        assert [a.name for a in stmt.get_attributes()] == ["e", "n"]
        seen = []
        for i in range(12):  # asyncpg reuses the named statement; each Bind is evaluated with its values
            row = await stmt.fetchrow(MINILM, f"sentence {i % 3}", i)
            assert row["n"] == i and len(row["e"]) == 384
            seen.append(row["e"])
        assert seen[0] == seen[3] and seen[0] != seen[1]
        assert await stmt.fetchval(MINILM, None, 1) is None  # STRICT
        rows = await conn.fetch(
            "SELECT id, pgml.embed($1, body) AS e FROM docs WHERE id < $2 AND topic <> $3 ORDER BY id",
            MINILM,
            5,
            "food",
        )
        assert [r["id"] for r in rows] == [1, 2, 3, 4] and all(len(r["e"]) == 384 for r in rows)
        chunks = await conn.fetch("SELECT * FROM pgml.chunk($1, $2, $3::jsonb)", "character", "a b",
                                  '{"chunk_size": 1, "chunk_overlap": 0, "separator": " "}')  # fmt: skip
        assert [tuple(r) for r in chunks] == [(1, "a"), (2, "b")]
        with pytest.raises(asyncpg.exceptions.UndefinedObjectError):
            await conn.fetchval("SELECT pgml.embed($1, 'x')", "no-such/model")
        with pytest.raises(asyncpg.exceptions.UndefinedObjectError):
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_bind (i int)")
                await conn.execute("INSERT INTO t_bind VALUES (1)")
                await conn.fetchval("SELECT pgml.embed($1, 'x')", "no-such/model")
        assert await conn.fetchval("SELECT to_regclass('pg_temp.t_bind') IS NULL") is True
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


def test_psycopg_parameters_and_pipeline(proxy: ProxyProcess, docs: str) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        one = conn.execute("SELECT pgml.embed(%s, %s)", [MINILM, SENTENCES[0]]).fetchone()
        assert one is not None and cosine(list(one[0]), embed_one(conn, SENTENCES[0].replace("'", "''"))) > 0.9999
        rows = conn.execute("SELECT id, pgml.embed(%s, body) FROM docs WHERE id <= %s ORDER BY id", [MINILM, 3])
        assert [(i, len(e)) for i, e in rows] == [(1, 384), (2, 384), (3, 384)]
        with conn.pipeline():
            first = conn.execute("SELECT pgml.embed(%s, %s)", [MINILM, "a"])
            plain = conn.execute("SELECT %s::int", [7])
            second = conn.execute("SELECT pgml.embed(%s, %s)", [MINILM, "b"], binary=True)
        assert len(first.fetchone()[0]) == 384 and plain.fetchone() == (7,)  # type: ignore[index]
        assert len(second.fetchone()[0]) == 384  # type: ignore[index]
        conn.rollback()
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT pgml.embed(%s, 'x')", ["no-such/model"])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR


def test_requested_device_missing_on_this_host_falls_back_with_a_warning(conn: psycopg.Connection) -> None:
    """PostgresML's examples ask for "device": "cuda"; a proxy host without it computes on its own device."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the requested device is used")
    warnings: list[str] = []
    conn.add_notice_handler(lambda d: warnings.append(f"{d.severity} {d.message_primary}"))
    row = conn.execute(f"SELECT pgml.embed('{MINILM}', 'hi mom', '{{\"device\": \"cuda\"}}')").fetchone()
    assert row is not None and cosine(list(row[0]), embed_one(conn, "hi mom")) > 0.9999
    assert any(w.startswith("WARNING") and '"cuda" is not available' in w for w in warnings), warnings


def test_embedded_server_keeps_its_port_and_init_finds_it(tmp_path: Path) -> None:
    """`pgml-proxy init` with no upstream runs on the embedded server, started on the port stored in its data dir
    and stopped after; a restart keeps the port (another, stored from then on, only when it was taken)."""
    data = tmp_path / "pgdata"
    env = {**os.environ, "PGML_PROXY_UPSTREAM_EMBEDDED_DATA_DIR": str(data), "PGML_PROXY_UPSTREAM": ""}
    cmd = [sys.executable, "-m", "proxy", "init"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    port = int((data / PORT_FILE).read_text())
    assert f"embedded PostgreSQL on 127.0.0.1:{port}" in first.stdout and "migration(s) applied" in first.stdout
    assert not (data / "postmaster.pid").exists()  # started for the command, stopped after
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert second.returncode == 0 and f"127.0.0.1:{port}" in second.stdout and "(0 migration(s)" in second.stdout
    cluster = Cluster(find_bin_dir(18), data)
    assert cluster.port == port
    with socket.socket() as taken:  # another program listens there now
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cluster.start()
        try:
            assert cluster.port != port and int((data / PORT_FILE).read_text()) == cluster.port
            with psycopg.connect(cluster.dsn()) as conn:
                assert conn.execute("SELECT count(*) FROM pgml.schema_migrations").fetchone()[0] > 0  # type: ignore[index]
        finally:
            cluster.stop()
    assert Cluster(find_bin_dir(18), data).port == cluster.port
