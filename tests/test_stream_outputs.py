"""Per-row calls that stand in a SELECT's output, computed on its result stream (issue 12).

Every statement shape of the case table runs through two proxies in front of one server — one streaming
(the default), one with ``stream_outputs = false`` (every per-row call through a session temp table) —
and must give the same columns (names, type OIDs) and the same rows. A LIMIT query computes only the rows
it returns (the engine's inputs are counted from the proxy's debug log).
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import psycopg
import pytest
from psycopg.types.string import TextLoader

from proxy.wire import messages as pq
from proxy.wire.frames import FrameReader, StartupMessage, encode_startup
from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database, start_proxy
from tests.tiny_models import tiny_bert_classifier

ROWS = 300
PREDICT_ROWS = 20_000  # more than one part of the predict family
CLASSIFY = '{"task": "text-classification", "model": "tiny-bert"}'
STREAMED = "streamed pgml."


@pytest.fixture(scope="module")
def both(
    pg: Postgres, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ProxyProcess, str]]:
    models = tmp_path_factory.mktemp("stream_models")
    tiny_bert_classifier(models / "tiny-bert")
    key = tmp_path_factory.mktemp("stream_key") / "artifact.key"  # both proxies read the models either signs
    with scratch_database(pg, "streams") as db:
        with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
            admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
            admin.execute("CREATE TABLE t (id int PRIMARY KEY, body text, grp int, f real[], n numeric)")
            admin.execute(
                "INSERT INTO t SELECT i, 'text number ' || (i % 50), i % 7, ARRAY[i, i * 0.5, 1e-5 * i]::real[],"
                f" i / 3.0 FROM generate_series(1, {ROWS}) i"
            )
            admin.execute("CREATE TABLE tr (id int PRIMARY KEY, f1 real, f2 real, y real)")
            admin.execute(
                "INSERT INTO tr SELECT i, (i % 97) / 7.0, (i % 13) * 1.5, (i % 97) / 7.0 * 2 - (i % 13) * 0.25"
                f" FROM generate_series(1, {PREDICT_ROWS}) i"
            )
            admin.execute("CREATE VIEW tr_train AS SELECT f1, f2, y FROM tr WHERE id <= 500")
            admin.execute(
                "CREATE FUNCTION noisy(int) RETURNS int LANGUAGE plpgsql AS"
                " $$BEGIN RAISE NOTICE 'row %', $1; RETURN $1; END$$"
            )
        handles = [
            start_proxy(pg.dsn(dbname=db), tmp_path_factory.mktemp(f"streams_{name}"),
                        PGML_PROXY_ENGINE_MODEL_DIRS=f"{model_dir},{models}", PGML_PROXY_LOG_LEVEL="debug",
                        PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(key), **extra)
            for name, extra in (("on", {}), ("off", {"PGML_PROXY_PROXY_STREAM_OUTPUTS": "false"}))
        ]  # fmt: skip
        try:
            with psycopg.connect(handles[0].dsn(dbname=db), autocommit=True) as conn:
                conn.execute("SELECT * FROM pgml.train('stream_p', 'regression', 'tr_train', 'y', 'linear')")
            yield handles[0], handles[1], db
        finally:
            for handle in handles:
                handle.stop()


CASES = [
    f"SELECT id, pgml.embed('{MINILM}', body) FROM t ORDER BY id LIMIT 5",
    f"SELECT id, pgml.embed('{MINILM}', body) AS e FROM t WHERE id <= 4 ORDER BY id",
    f"SELECT pgml.embed('{MINILM}', body)::text, id FROM t WHERE id IN (3, 9) ORDER BY id",
    f"SELECT grp, pgml.embed('{MINILM}', min(body)) FROM t GROUP BY grp ORDER BY grp",
    f"SELECT DISTINCT ON (grp) grp, id, pgml.embed('{MINILM}', body) FROM t ORDER BY grp, id",
    f"SELECT id, pgml.embed('{MINILM}', body), pgml.embed('{MINILM}', 'constant') FROM t ORDER BY id LIMIT 3 OFFSET 7",
    f"SELECT id, row_number() OVER (ORDER BY id DESC), pgml.embed('{MINILM}', body || '!') FROM t WHERE id < 6"
    " ORDER BY id",
    f"WITH s AS (SELECT * FROM t WHERE id > {ROWS - 3}) SELECT s.id, pgml.embed('{MINILM}', s.body) FROM s ORDER BY 1",
    f"SELECT a.id, pgml.embed('{MINILM}', b.body) FROM t a JOIN t b ON b.id = a.id + 1 WHERE a.id < 4 ORDER BY 1",
    f"SELECT id, pgml.embed('{MINILM}', CASE WHEN id % 2 = 0 THEN NULL ELSE body END) FROM t WHERE id < 5 ORDER BY id",
    f"SELECT id, pgml.embed('{MINILM}', body)::vector(384) AS v, pgml.embed('{MINILM}', body)::vector FROM t"
    " WHERE id < 4 ORDER BY id",
    f"SELECT id, pgml.embed('{MINILM}', body, '{{\"normalize_embeddings\": true}}') FROM t WHERE grp = 2"
    " ORDER BY id LIMIT 4",
    f"SELECT id, pgml.transform(task => '{CLASSIFY}'::jsonb, inputs => ARRAY[body]) FROM t WHERE id < 8 ORDER BY id",
    f"SELECT id, pgml.transform(task => '{CLASSIFY}'::jsonb, inputs => ARRAY[body])::text AS label FROM t"
    " ORDER BY id DESC LIMIT 3",
    "SELECT id, pgml.predict('stream_p', ARRAY[f1, f2]) FROM tr ORDER BY id",
    "SELECT pgml.predict('stream_p', ARRAY[f1, f2]) AS p, id FROM tr WHERE id % 1000 = 0 ORDER BY id",
    "SELECT id, pgml.predict('stream_p', ARRAY[f1::float8, f2::float8]) FROM tr ORDER BY id LIMIT 10",
    "SELECT id, pgml.predict('stream_p', ARRAY[[f1], [f2]]) FROM tr WHERE id < 4 ORDER BY id",
    "SELECT noisy(id), pgml.predict('stream_p', ARRAY[f1, f2]) FROM tr WHERE id <= 3 ORDER BY id",
]
# Shapes the stream leaves to the temp table (both proxies answer alike; the streaming one does not stream them).
NOT_STREAMED = [
    f"SELECT *, pgml.embed('{MINILM}', body) FROM t ORDER BY id LIMIT 2",
    f"SELECT pgml.embed('{MINILM}', body) AS e, t.* FROM t ORDER BY id LIMIT 2",
    f"SELECT grp, pgml.embed('{MINILM}', 'x' || grp)::text AS e, count(*) FROM t GROUP BY ROLLUP (grp) ORDER BY 1, 3",
    f"SELECT id, pgml.embed('{MINILM}', body) AS e FROM t ORDER BY e LIMIT 2",
    f"SELECT id, pgml.embed('{MINILM}', body) FROM t ORDER BY 2 LIMIT 2",
    f"SELECT DISTINCT pgml.embed('{MINILM}', body) FROM t WHERE id < 5",
]


TEXT_TYPES = ("real", "double precision", "jsonb", "numeric", 1021)  # 1021: real[]


# How a client sends a statement: a simple Query; Parse/Describe first, then Bind/Describe/Execute with text results
# (psycopg's prepare=True, like asyncpg and pgjdbc after their thresholds); one unnamed Parse/Bind/Describe/Execute
# batch with binary results (psycopg's binary cursor).
PROTOCOLS = ["simple", "prepared", "binary"]


def _execute(conn: psycopg.Connection, sql: str, protocol: str) -> psycopg.Cursor[Any]:
    if protocol == "simple":
        return conn.execute(sql)
    return conn.cursor(binary=protocol == "binary").execute(sql, prepare=protocol == "prepared")


def _run(
    dsn: str, sql: str, setup: str = "", protocol: str = "simple"
) -> tuple[list[tuple[str, int]], list[tuple[object, ...]], list[str]]:
    """Column names and type OIDs, the rows (text as the server sent it: every value compared as sent; binary
    decoded), the notices."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))
        for name in TEXT_TYPES:
            conn.adapters.register_loader(name, TextLoader)
        vector = conn.execute("SELECT 'vector'::regtype::oid").fetchone()
        assert vector is not None
        conn.adapters.register_loader(vector[0], TextLoader)
        if setup:
            conn.execute(setup)
        cur = _execute(conn, sql, protocol)
        assert cur.description is not None
        # A proxy's own model-load notices tell its cache's state (and a load time), not the statement's path.
        said = [n for n in notices if not n.startswith(("loading model ", "loaded model "))]
        return [(d.name, d.type_code) for d in cur.description], cur.fetchall(), said


NUMBER = re.compile(r"-?[0-9.]+(?:e[-+]?[0-9]+)?")


def _same(a: object, b: object) -> bool:
    """Equal values; texts that differ only in float digits past float32 noise count as equal (a model's
    output for one input depends in its last bits on what else is in its batch)."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-4, atol=1e-6))
    if a == b or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return False
    x, y = (np.array([float(n) for n in NUMBER.findall(t)]) for t in (a, b))
    return bool(np.allclose(x, y, rtol=1e-4, atol=1e-6))


def _streams(handle: ProxyProcess) -> list[str]:
    return [line for line in handle.log_text().splitlines() if STREAMED in line]


def _both_ways(both: tuple[ProxyProcess, ProxyProcess, str], sql: str, protocol: str = "simple") -> bool:
    """``sql`` through both proxies: the same columns, rows and notices; whether the streaming one streamed it."""
    on, off, db = both
    before = len(_streams(on))
    streamed = _run(on.dsn(dbname=db), sql, protocol=protocol)
    tabled = _run(off.dsn(dbname=db), sql, protocol=protocol)
    assert streamed[0] == tabled[0]
    assert _same(streamed[1], tabled[1]), (streamed[1][:3], tabled[1][:3])
    assert streamed[2] == tabled[2]  # the server's notices
    assert streamed[1]
    assert not _streams(off)
    return len(_streams(on)) > before


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("sql", CASES)
def test_stream_and_table_paths_agree(both: tuple[ProxyProcess, ProxyProcess, str], sql: str, protocol: str) -> None:
    assert _both_ways(both, sql, protocol), "the statement was not streamed"


@pytest.mark.parametrize("protocol", ["simple", "binary"])
@pytest.mark.parametrize("sql", NOT_STREAMED)
def test_shapes_left_to_the_temp_table(both: tuple[ProxyProcess, ProxyProcess, str], sql: str, protocol: str) -> None:
    assert not _both_ways(both, sql, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_limit_computes_only_the_rows_returned(both: tuple[ProxyProcess, ProxyProcess, str], protocol: str) -> None:
    on, _, db = both
    sql = f"SELECT id, pgml.embed('{MINILM}', body || id) FROM t LIMIT 5"
    rows = _run(on.dsn(dbname=db), sql, protocol=protocol)[1]
    assert len(rows) == 5
    assert _streams(on)[-1].endswith(f"{STREAMED}embed over 5 rows: 5 inputs computed")


def test_duplicate_inputs_are_computed_once(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    on, _, db = both
    rows = _run(on.dsn(dbname=db), f"SELECT pgml.embed('{MINILM}', body) FROM t")[1]
    assert len(rows) == ROWS
    assert _streams(on)[-1].endswith(f"{STREAMED}embed over {ROWS} rows: 50 inputs computed")


@pytest.mark.parametrize("digits", [-3, 0, 1, 3])
def test_floats_print_as_the_server_prints_them(
    pg: Postgres, both: tuple[ProxyProcess, ProxyProcess, str], digits: int
) -> None:
    """Computed floats printed under the session's extra_float_digits exactly as the server prints them."""
    on, _, db = both
    sql = f"SELECT pgml.predict('stream_p', ARRAY[f1, f2]), pgml.embed('{MINILM}', body) FROM tr JOIN t USING (id)"
    exact = _run(on.dsn(dbname=db), sql, "SET extra_float_digits = 3")[1]
    printed = _run(on.dsn(dbname=db), sql, f"SET extra_float_digits = {digits}")[1]
    with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as direct:
        direct.adapters.register_loader("real", TextLoader)
        direct.execute(f"SET extra_float_digits = {digits}")
        for (value, vector), (shown, shown_vector) in zip(exact, printed, strict=True):
            row = direct.execute("SELECT %s::real, %s::real[]::text", [value, vector]).fetchone()
            assert row == (shown, shown_vector)


def _error(dsn: str, sql: str, begin: bool, protocol: str = "simple") -> tuple[str | None, str, object]:
    """The SQLSTATE and message of ``sql``, the transaction status after it, and that the session goes on."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if begin:
            conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as raised:
            _execute(conn, sql, protocol).fetchall()
        status = conn.info.transaction_status.name
        if begin:
            conn.execute("ROLLBACK")
        row = conn.execute("SELECT 1").fetchone()
        assert row == (1,)
        return raised.value.sqlstate, str(raised.value).splitlines()[0], status


ERRORS = [
    # the engine fails on a row the stream reaches late (after other rows were computed)
    f"SELECT id, pgml.embed(CASE WHEN id > 290 THEN 'no-such-model' ELSE '{MINILM}' END, body) FROM t ORDER BY id",
    # the server fails in the middle of the rows: in the first part, and in a later one
    f"SELECT id, 1 / (id - 150), pgml.embed('{MINILM}', body) FROM t ORDER BY id",
    f"SELECT id, 1 / (id - 290), pgml.embed('{MINILM}', body) FROM t ORDER BY id",
    # … while the engine computes a part and queries the registry (predict): the server's error is the answer
    "SELECT id, 1 / (id - 9000), pgml.predict('stream_p', ARRAY[f1, f2]) FROM tr ORDER BY id",
    # the engine fails in one part while the server fails in the next (a scan in id order: no sort, under which
    # the server would compute 1 / (id - 270) for every row before the first part)
    f"SELECT id, 1 / (id - 270), pgml.embed(CASE WHEN id = 200 THEN 'nope' ELSE '{MINILM}' END, body) FROM t",
    # the proxy's own cast: pgvector's error for the wrong dimension count
    f"SELECT id, pgml.embed('{MINILM}', body)::vector(3) FROM t ORDER BY id LIMIT 2",
    # a column that does not exist: the server's error for the statement
    f"SELECT id, pgml.embed('{MINILM}', bodyy) FROM t",
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("begin", [False, True], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("sql", ERRORS)
def test_errors_agree(both: tuple[ProxyProcess, ProxyProcess, str], sql: str, begin: bool, protocol: str) -> None:
    on, off, db = both
    assert _error(on.dsn(dbname=db), sql, begin, protocol) == _error(off.dsn(dbname=db), sql, begin, protocol)


def test_query_string_with_a_streamed_statement_between_others(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    on, off, db = both
    sql = (
        "CREATE TEMP TABLE q (id int); INSERT INTO q VALUES (4), (2);"
        f" SELECT q.id, pgml.embed('{MINILM}', t.body) FROM q JOIN t USING (id) ORDER BY q.id;"
        " INSERT INTO q VALUES (9); SELECT count(*) FROM q"
    )
    results = []
    for dsn in (on.dsn(dbname=db), off.dsn(dbname=db)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(sql)
            sets = []
            while True:
                sets.append((cur.statusmessage, cur.fetchall() if cur.description else None))
                if not cur.nextset():
                    break
            results.append(sets)
    assert _same(results[0], results[1])
    assert results[0][-1] == ("SELECT 1", [(3,)])


def _asyncpg(dsn: str, sql: str, pieces: list[int], *args: object) -> list[list[tuple[object, ...]]]:
    """asyncpg (binary results, named statements): all rows at once, then a cursor read ``pieces`` rows at a time
    (Execute with a row limit on the portal, PortalSuspended between), inside a transaction."""

    async def read() -> list[list[tuple[object, ...]]]:
        conn = await asyncpg.connect(dsn)
        try:
            out = [[tuple(r) for r in await conn.fetch(sql, *args)]]
            async with conn.transaction():
                cursor = await conn.cursor(sql, *args)
                for count in pieces:
                    out.append([tuple(r) for r in await cursor.fetch(count)])
            return out
        finally:
            await conn.close()

    return asyncio.run(read())


def test_asyncpg_reads_the_stream_in_pieces(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    """Each Execute(n) gets its n rows, computed then: 300 rows in pieces of 3, 20, 1 and the rest."""
    on, off, db = both
    sql = "SELECT id, pgml.embed($1, body) AS e, body FROM t WHERE id > $2 ORDER BY id"
    pieces = [3, 20, 1, 1000, 5]
    streamed = _asyncpg(on.dsn(dbname=db), sql, pieces, MINILM, 0)
    tabled = _asyncpg(off.dsn(dbname=db), sql, pieces, MINILM, 0)
    assert [len(rows) for rows in streamed] == [ROWS, 3, 20, 1, ROWS - 24, 0]
    assert _same(streamed, tabled)
    assert _same(streamed[0], [row for rows in streamed[1:] for row in rows])
    for line in _streams(on)[-2:]:  # the fetch, and the cursor
        assert line.endswith(f"{STREAMED}embed over {ROWS} rows: 50 inputs computed")


def test_a_portal_left_early_computed_only_what_it_sent(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    """A cursor read for 3 + 20 rows, then closed: 23 inputs computed (each row's text is distinct)."""
    on, _, db = both

    async def read() -> list[int]:
        conn = await asyncpg.connect(on.dsn(dbname=db))
        try:
            async with conn.transaction():
                cursor = await conn.cursor("SELECT pgml.embed($1, body || id) FROM t ORDER BY id", MINILM)
                counts = [len(await cursor.fetch(3)), len(await cursor.fetch(20))]
            # The proxy's statement for the rows is closed with the batch after the transaction's end.
            left = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgml_proxy%'"
            return [*counts, await conn.fetchval(left), await conn.fetchval(left)]
        finally:
            await conn.close()

    counts = asyncio.run(read())
    assert counts[:2] == [3, 20] and counts[-1] == 0
    assert _streams(on)[-1].endswith(f"{STREAMED}embed over 23 rows: 23 inputs computed")


class _Raw:
    """A bare protocol-3 session through the proxy (trust auth): messages written at once, answers read by kind."""

    def __init__(self, handle: ProxyProcess, db: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", handle.port))
        self.reader = FrameReader(1 << 30)
        self.sock.sendall(encode_startup(StartupMessage(3, 0, (("user", "postgres"), ("database", db)))))
        self.read(1)

    def send(self, *messages: pq.Message) -> None:
        self.sock.sendall(b"".join(m.encode() for m in messages))

    def read(self, ready: int) -> list[tuple[str, bytes]]:
        """Every frame (type letter, body) up to the ``ready``-th ReadyForQuery; FATAL or a close fails."""
        out: list[tuple[str, bytes]] = []
        while ready:
            data = self.sock.recv(1 << 20)
            assert data, f"the proxy closed the connection after {out}"
            for frame in self.reader.feed(data):
                out.append((chr(frame.type), frame.raw[5:]))
                ready -= frame.type == ord("Z")
        return out

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(pq.Query(sql))
        return [(kind, body) for kind, body in self.read(1) if kind == "D"]

    def close(self) -> None:
        self.send(pq.Terminate())
        self.sock.close()


LEFT = "SELECT count(*) FROM pg_cursors WHERE name LIKE 'pgml_proxy%'"
STREAMED_BIND = f"SELECT id, pgml.embed('{MINILM}', body) FROM t WHERE id < $1 ORDER BY id"


def test_a_portal_closed_in_a_transaction_closes_the_servers(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    """Close of a streamed portal read in part, inside BEGIN: the server's row portal is gone before COMMIT."""
    on, _, db = both
    raw = _Raw(on, db)
    try:
        raw.query("BEGIN")
        raw.send(pq.Parse("", STREAMED_BIND, (23,)), pq.Bind("p", "", (0,), (b"50",), ()), pq.Execute("p", 2),
                 pq.Sync())  # fmt: skip
        got = raw.read(1)
        assert [k for k, _ in got] == ["1", "2", "D", "D", "s", "Z"]
        assert raw.query(LEFT) == [("D", pq.DataRow((b"1",)).body())]  # open between the client's Executes
        raw.send(pq.Close(pq.Target.PORTAL, "p"), pq.Sync())
        assert [k for k, _ in raw.read(1)] == ["3", "Z"]
        assert raw.query(LEFT) == [("D", pq.DataRow((b"0",)).body())]
        raw.query("COMMIT")
    finally:
        raw.close()


def test_a_portal_named_after_its_transaction_is_the_servers(
    both: tuple[ProxyProcess, ProxyProcess, str],
) -> None:
    """Describe and Close of a streamed portal pipelined after the Sync that ended its implicit transaction: the
    server's answers (CloseComplete; 34000 for Describe), and the session goes on."""
    on, _, db = both
    raw = _Raw(on, db)
    try:
        raw.send(pq.Parse("", STREAMED_BIND, (23,)), pq.Bind("p", "", (0,), (b"50",), ()), pq.Execute("p", 2),
                 pq.Sync(), pq.Close(pq.Target.PORTAL, "p"), pq.Sync(), pq.Describe(pq.Target.PORTAL, "p"),
                 pq.Sync())  # fmt: skip
        got = [k for k, _ in raw.read(3)]
        assert got == ["1", "2", "D", "D", "s", "Z", "3", "Z", "E", "Z"]
        assert raw.query("SELECT 1") == [("D", pq.DataRow((b"1",)).body())]
    finally:
        raw.close()


def test_a_bind_the_server_refuses_leaves_no_statement(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    """A streamed statement whose Bind fails on the server (1/0 folded at plan time): the server's error, and no
    statement of the proxy's left behind (its SQL holds the bound values)."""
    on, _, db = both
    with psycopg.connect(on.dsn(dbname=db), autocommit=True) as conn:
        for _ in range(2):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT id, pgml.embed(%s, body) FROM t WHERE id > 1/0", [MINILM])
        left = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE %s"
        counts = [conn.execute(left, ["pgml_proxy_rows%"]).fetchone() for _ in range(2)]
        assert counts[-1] == (0,)


def test_a_bind_with_a_wrong_count_of_result_formats(both: tuple[ProxyProcess, ProxyProcess, str]) -> None:
    """Three result format codes for two columns: the server's 08P01 for that Bind, and the session goes on."""
    on, _, db = both
    raw = _Raw(on, db)
    try:
        raw.send(pq.Parse("", STREAMED_BIND, (23,)), pq.Bind("", "", (0,), (b"5",), (0, 1, 1)), pq.Execute("", 0),
                 pq.Sync())  # fmt: skip
        got = raw.read(1)
        assert [k for k, _ in got] == ["1", "E", "Z"]
        assert b"C08P01\0" in got[1][1] and b"3 result formats but query has 2 columns" in got[1][1]
        assert got[-1][1] == b"I"
        assert raw.query("SELECT 1") == [("D", pq.DataRow((b"1",)).body())]
    finally:
        raw.close()
