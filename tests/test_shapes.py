"""Statement shapes real clients send (issue 10), end to end through a real proxy and server.

Each shape is checked against the same values computed from plain, constant calls: nested calls,
calls reading rows that other calls produce (Korvus's RAG and rerank), scalar-subquery and CTE
arguments, data-modifying CTEs (Korvus's chunking statement), multi-row VALUES, computed arguments,
overloads by argument type, and output column names and types as PostgreSQL gives them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from langchain_text_splitters import RecursiveCharacterTextSplitter

from tests.conftest import MINILM, Postgres, scratch_database, start_proxy
from tests.tiny_models import tiny_cross_encoder

pytestmark = pytest.mark.pg_matrix

TEXTS = ["alpha beta gamma delta epsilon", "one two three four five six", "the cat sat on the mat"]
RECORD_OID, REAL_ARRAY_OID = 2249, 1021


@pytest.fixture(scope="module")
def shapes_proxy(pg: Postgres, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = tmp_path_factory.mktemp("shape_models")
    tiny_cross_encoder(models / "tiny-cross")
    with scratch_database(pg, "shapes") as db:
        with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as admin:
            admin.execute("CREATE TABLE docs (id serial8 PRIMARY KEY, document jsonb)")
            admin.execute("CREATE TABLE splitters (id serial8 PRIMARY KEY, name text, parameters jsonb)")
            admin.execute(
                "CREATE TABLE chunks (id serial8 PRIMARY KEY, document_id int8, chunk_index int8, chunk text,"
                " emb real[], UNIQUE (document_id, chunk_index))"
            )
            admin.execute(
                "INSERT INTO splitters (name, parameters) VALUES"
                " ('recursive_character', '{\"chunk_size\": 12, \"chunk_overlap\": 0}')"
            )
            for text in TEXTS:
                admin.execute("INSERT INTO docs (document) VALUES (%s)", (json.dumps({"text": text}),))
        handle = start_proxy(
            pg.dsn(dbname=db),
            tmp_path_factory.mktemp("shapes_proxy"),
            PGML_PROXY_ENGINE_MODEL_DIRS=f"{model_dir},{models}",
        )
        try:
            yield handle.dsn(dbname=db)
        finally:
            handle.stop()


@pytest.fixture
def conn(shapes_proxy: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(shapes_proxy, autocommit=True) as c:
        yield c


def embed(conn: psycopg.Connection, text: str) -> list[float]:
    return list(conn.execute("SELECT pgml.embed(%s, %s)", (MINILM, text)).fetchone()[0])  # type: ignore[index]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


# Korvus's GENERATE_CHUNKS_FOR_DOCUMENT_IDS_WITH_SPLITTER (korvus/src/queries.rs), with its tables renamed.
KORVUS_CHUNKS = """
WITH splitter AS (SELECT name, parameters FROM splitters WHERE id = %s),
new AS (
    SELECT documents.id AS document_id,
           pgml.chunk((SELECT name FROM splitter), (documents.document #>> '{text}'),
                      (SELECT parameters FROM splitter)) AS chunk_t
    FROM docs AS documents WHERE id = ANY (%s)),
del AS (
    DELETE FROM chunks
    WHERE chunk_index > (SELECT MAX((chunk_t).chunk_index) FROM new
                         WHERE new.document_id = chunks.document_id GROUP BY new.document_id)
      AND chunks.document_id = ANY (SELECT document_id FROM new))
INSERT INTO chunks (document_id, chunk_index, chunk)
SELECT new.document_id, (chunk_t).chunk_index, (chunk_t).chunk
FROM new LEFT OUTER JOIN chunks ON chunks.document_id = new.document_id AND chunks.chunk_index = (chunk_t).chunk_index
WHERE (chunk_t).chunk <> COALESCE(chunks.chunk, '')
ON CONFLICT (document_id, chunk_index) DO UPDATE SET chunk = EXCLUDED.chunk
RETURNING id
"""


def test_data_modifying_cte_with_per_row_chunks(conn: psycopg.Connection) -> None:
    """Korvus's chunking statement (a DELETE CTE next to a per-row pgml.chunk with subquery arguments)."""
    splitter = RecursiveCharacterTextSplitter(chunk_size=12, chunk_overlap=0)
    expected = [(i + 1, n + 1, c) for i, text in enumerate(TEXTS) for n, c in enumerate(splitter.split_text(text))]
    for params in [(1, [1, 2, 3])]:
        inserted = conn.execute(KORVUS_CHUNKS, params).fetchall()  # extended protocol: $n bound
        assert len(inserted) == len(expected)
    assert conn.execute("SELECT document_id, chunk_index, chunk FROM chunks ORDER BY 1, 2").fetchall() == expected
    # Re-running changes nothing (every chunk is unchanged), in the simple protocol too.
    simple = KORVUS_CHUNKS.replace("%s", "1", 1).replace("%s", "ARRAY[1, 2, 3]", 1)
    assert conn.execute(simple, prepare=False).fetchall() == []
    # A shorter document deletes its surplus chunks through the DELETE CTE, in the same statement.
    conn.execute("UPDATE docs SET document = '{\"text\": \"one two\"}' WHERE id = 2")
    conn.execute(KORVUS_CHUNKS, (1, [2]))
    assert conn.execute("SELECT chunk FROM chunks WHERE document_id = 2 ORDER BY chunk_index").fetchall() == [
        ("one two",)
    ]
    conn.execute(f"UPDATE docs SET document = '{json.dumps({'text': TEXTS[1]})}' WHERE id = 2")
    conn.execute(KORVUS_CHUNKS, (1, [2]))
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (len(expected),)


@pytest.mark.parametrize("bound", [False, True], ids=["simple", "extended"])
def test_arguments_from_returning_rows(conn: psycopg.Connection, bound: bool) -> None:
    """Calls in the output of a SELECT over RETURNING rows are computed on its one run (streamed); a call that
    decides which rows qualify would need the rows gathered first, running the DELETE twice: refused, with a hint."""
    gone = "WITH gone AS (DELETE FROM chunks WHERE false RETURNING chunk) SELECT "
    model = "%s" if bound else f"'{MINILM}'"
    args = (MINILM,) if bound else None
    assert conn.execute(gone + f"pgml.embed({model}, chunk) FROM gone", args).fetchall() == []
    with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
        conn.execute(gone + f"chunk FROM gone WHERE pgml.embed({model}, chunk) IS NOT NULL", args)
    assert "RETURNING" in str(info.value) and info.value.diag.message_hint
    assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def embedded(conn: psycopg.Connection) -> None:
    if conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,):
        conn.execute(KORVUS_CHUNKS, (1, [1, 2, 3]))
    conn.execute("UPDATE chunks SET emb = pgml.embed(%s, chunk) WHERE emb IS NULL", (MINILM,))


def test_rag_context_from_a_vector_search_that_embeds(conn: psycopg.Connection, embedded: None) -> None:
    """Korvus's RAG shape: a CTE embeds the query, another searches with it, a third call reads the result."""
    query = "alpha beta"
    sql = """
        WITH pipeline AS (SELECT %s::jsonb AS schema),
        q AS (SELECT pgml.embed(transformer => (SELECT schema #>> '{body,semantic_search,model}' FROM pipeline),
                                text => %s, kwargs => '{}'::jsonb) AS embedding),
        ctx AS (SELECT chunk FROM chunks ORDER BY pgml.cosine_similarity(emb, (SELECT embedding FROM q)) DESC
                LIMIT 2)
        SELECT jsonb_build_object('context', (SELECT string_agg(chunk, ' | ') FROM ctx)),
               pgml.embed(%s, (SELECT string_agg(chunk, ' | ') FROM ctx)) AS context_embedding
    """
    schema = json.dumps({"body": {"semantic_search": {"model": MINILM}}})
    row = conn.execute(sql, (schema, query, MINILM)).fetchone()
    assert row is not None
    # The same search done by hand with constant calls.
    ranked = conn.execute(
        "SELECT chunk FROM chunks ORDER BY pgml.cosine_similarity(emb, %s::real[]) DESC LIMIT 2", (embed(conn, query),)
    ).fetchall()
    context = " | ".join(r[0] for r in ranked)
    assert row[0] == {"context": context}
    assert close(list(row[1]), embed(conn, context))


def test_rerank_over_a_search_that_embeds(conn: psycopg.Connection, embedded: None) -> None:
    """Korvus's rerank shape: pgml.rank over array_agg of a CTE ordered by an embedded query."""
    sql = """
        WITH q AS (SELECT pgml.embed(%s, %s) AS e),
        hits AS (SELECT chunk, ROW_NUMBER() OVER () AS row_number
                 FROM (SELECT chunk FROM chunks ORDER BY pgml.cosine_similarity(emb, (SELECT e FROM q)) DESC LIMIT 4) s)
        SELECT hits.chunk, (rank).score FROM hits
        JOIN (SELECT pgml.rank('tiny-cross', %s, array_agg(chunk),
                               '{"return_documents": false, "top_k": 3}'::jsonb || %s::jsonb) AS rank FROM hits) AS rank
          ON ((rank).corpus_id + 1) = hits.row_number
        ORDER BY 2 DESC
    """
    rows = conn.execute(sql, (MINILM, "alpha", "alpha", "{}")).fetchall()
    hits = conn.execute(
        "SELECT chunk FROM chunks ORDER BY pgml.cosine_similarity(emb, %s::real[]) DESC LIMIT 4",
        (embed(conn, "alpha"),),
    ).fetchall()
    expected = conn.execute(
        "SELECT score FROM pgml.rank('tiny-cross', 'alpha', %s, '{\"top_k\": 3}') ORDER BY score DESC",
        ([h[0] for h in hits],),
    ).fetchall()
    assert len(rows) == 3
    assert [pytest.approx(r[1]) for r in rows] == [e[0] for e in expected]
    assert {r[0] for r in rows} <= {h[0] for h in hits}


def test_scalar_subquery_arguments_in_from(conn: psycopg.Connection) -> None:
    """PostgresML's examples/chunking.sql shape: FROM pgml.chunk((SELECT …), (SELECT …), …)."""
    kwargs = '{"chunk_size": 3, "chunk_overlap": 0, "separator": " "}'
    rows = conn.execute(
        "WITH splitter AS (SELECT 'character' AS s), document AS (SELECT 'a b c d' AS d)"
        f" SELECT * FROM pgml.chunk((SELECT s FROM splitter), (SELECT d FROM document), '{kwargs}')"
    ).fetchall()
    constant = conn.execute(f"SELECT * FROM pgml.chunk('character', 'a b c d', '{kwargs}')").fetchall()
    assert rows == constant and len(rows) > 1


def test_nested_calls(conn: psycopg.Connection) -> None:
    text = conn.execute("SELECT (pgml.chunk('character', 'hello world')).chunk").fetchone()
    assert text is not None
    nested = conn.execute("SELECT pgml.embed(%s, (pgml.chunk('character', 'hello world')).chunk)", (MINILM,)).fetchone()
    assert nested is not None and close(list(nested[0]), embed(conn, text[0]))


def test_multi_row_values_with_bound_calls(conn: psycopg.Connection) -> None:
    """JDBC reWriteBatchedInserts sends one INSERT with a VALUES row per batch entry."""
    conn.execute("CREATE TEMP TABLE batch (id int, emb real[])")
    conn.execute(
        "INSERT INTO batch VALUES (1, pgml.embed(%s, %s)), (2, pgml.embed(%s, %s)), (3, pgml.embed(%s, %s))",
        (MINILM, "red", MINILM, "green", MINILM, "blue"),
    )
    rows = conn.execute("SELECT id, emb FROM batch ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    for (_, vector), word in zip(rows, ["red", "green", "blue"], strict=True):
        assert close(list(vector), embed(conn, word))


def test_computed_chat_inputs(conn: psycopg.Connection) -> None:
    """ARRAY[jsonb_build_object(…)] is a jsonb[] the server computes: the chat overload takes it."""
    conn.execute("CREATE TEMP TABLE msgs (body text)")
    conn.execute("INSERT INTO msgs VALUES ('hi')")
    with pytest.raises(psycopg.Error) as info:  # no such model: the call was resolved and reached the engine
        conn.execute(
            "SELECT pgml.transform(task => '{\"task\": \"conversational\", \"model\": \"no/such\"}'::jsonb,"
            " inputs => ARRAY[jsonb_build_object('role', 'user', 'content', (SELECT body FROM msgs))])"
        )
    assert info.value.sqlstate not in ("42883", "0A000")


def test_output_names_and_types(conn: psycopg.Connection) -> None:
    def described(sql: str, *params: object) -> list[tuple[str, int]]:
        cur = conn.execute(sql, params or None)
        assert cur.description is not None
        return [(d.name, d.type_code) for d in cur.description]

    assert described("SELECT (pgml.embed(%s, 'x'))[1:3]", MINILM) == [("embed", REAL_ARRAY_OID)]
    assert described("SELECT (pgml.embed(%s, chunk))[1:3] FROM chunks LIMIT 1", MINILM) == [("embed", REAL_ARRAY_OID)]
    assert described("SELECT embed FROM pgml.embed(%s, 'x')", MINILM) == [("embed", REAL_ARRAY_OID)]
    assert described("SELECT * FROM pgml.embed(%s, 'x') AS e", MINILM) == [("e", REAL_ARRAY_OID)]
    assert described("SELECT * FROM pgml.embed(%s, ARRAY['x', 'y']) AS e", MINILM) == [("e", REAL_ARRAY_OID)]
    assert described("SELECT pgml.chunk('character', 'a b')") == [("chunk", RECORD_OID)]
    assert described("SELECT pgml.chunk('character', chunk) FROM chunks LIMIT 1") == [("chunk", RECORD_OID)]
    assert conn.execute("SELECT pgml.chunk('character', 'a b')").fetchone() == (("1", "a b"),)


def test_feature_arrays_of_every_type(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS feats")
    conn.execute("CREATE TABLE feats (a float8, b float8, y int)")
    conn.execute("INSERT INTO feats SELECT i, (i * 7) % 11, i % 2 FROM generate_series(1, 60) i")
    conn.execute("SELECT * FROM pgml.train('shapes types', 'classification', 'feats', 'y', 'linear')")
    expected = conn.execute("SELECT pgml.predict('shapes types', ARRAY[3, 10]::real[])").fetchone()
    model = conn.execute("SELECT max(id) FROM pgml.models").fetchone()
    assert expected is not None and model is not None
    for sql, params in [
        ("SELECT pgml.predict('shapes types', %s::float8[])", ([3.0, 10.0],)),
        ("SELECT pgml.predict('shapes types', %s)", ([3.0, 10.0],)),  # psycopg: float8[]
        ("SELECT pgml.predict('shapes types', ARRAY[a, b]::numeric[]) FROM feats WHERE a = 3", None),
        ("SELECT pgml.predict('shapes types', ARRAY[a::int, b::int]) FROM feats WHERE a = 3", None),
        ("SELECT pgml.predict(%s::bigint, ARRAY[a, b]) FROM feats WHERE a = 3", (model[0],)),
        ("SELECT pgml.predict(m.id, ARRAY[f.a, f.b]) FROM feats f, (SELECT %s::bigint AS id) m WHERE a = 3", model),
    ]:
        assert conn.execute(sql, params).fetchone() == expected, sql
    # Under extra_float_digits = 0 floats print rounded: the lookup must still find every row's result.
    conn.execute("SET extra_float_digits = 0")
    conn.execute("UPDATE feats SET a = a / 3")
    rounded = conn.execute("SELECT count(pgml.predict('shapes types', ARRAY[a, b])) FROM feats").fetchone()
    conn.execute("RESET extra_float_digits")
    assert rounded == (60,)
    flags = conn.execute("SELECT pgml.predict('shapes types', %s)", ([True, False],)).fetchone()
    assert flags == conn.execute("SELECT pgml.predict('shapes types', ARRAY[1, 0]::real[])").fetchone()


def test_statement_after_an_insert_sees_its_rows(conn: psycopg.Connection) -> None:
    """A per-row call in the second statement of a string reads the rows the first one inserted."""
    conn.execute("CREATE TEMP TABLE later (body text)")
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO later VALUES ('fresh'); SELECT pgml.embed('{MINILM}', body) FROM later")
        assert cur.nextset()
        row = cur.fetchone()
    assert row is not None and close(list(row[0]), embed(conn, "fresh"))


def test_calls_inside_from_functions(conn: psycopg.Connection, embedded: None) -> None:
    """A call in the arguments of another FROM function is replaced as a value, not as the FROM item."""
    assert conn.execute("SELECT count(*) FROM unnest(pgml.embed(%s, 'hello'))", (MINILM,)).fetchone() == (384,)
    chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()
    assert chunks is not None
    rows = conn.execute("SELECT count(*) FROM chunks c, unnest(pgml.embed(%s, c.chunk)) AS e", (MINILM,)).fetchone()
    assert rows == (384 * chunks[0],)


def test_cte_names_resolve_as_postgresql_resolves_them(conn: psycopg.Connection, embedded: None) -> None:
    total = conn.execute("SELECT count(*) FROM chunks").fetchone()
    # A later CTE named like the table does not change what an earlier one reads.
    later = conn.execute(
        "WITH a AS (SELECT pgml.embed(%s, chunk) AS e FROM chunks), chunks AS (SELECT 'zzz' AS chunk)"
        " SELECT count(*) FROM a WHERE e IS NOT NULL",
        (MINILM,),
    ).fetchone()
    # A CTE that shadows the table it reads.
    shadow = conn.execute(
        "WITH chunks AS (SELECT pgml.embed(%s, chunk) AS e FROM chunks)"
        " SELECT count(*) FROM chunks WHERE e IS NOT NULL",
        (MINILM,),
    ).fetchone()
    assert later == shadow == total


def test_several_calls_in_from(conn: psycopg.Connection, embedded: None) -> None:
    total = conn.execute("SELECT count(*) FROM chunks").fetchone()
    two = conn.execute(
        "SELECT count(*) FROM chunks d, pgml.embed(%s, d.chunk) AS e, pgml.embed(%s, d.chunk || '!') AS f"
        " WHERE e IS NOT NULL AND f IS NOT NULL",
        (MINILM, MINILM),
    ).fetchone()
    assert two == total
    chained = conn.execute(
        "SELECT c.chunk, e FROM docs d, pgml.chunk('character', d.document #>> '{text}') AS c,"
        " pgml.embed(%s, c.chunk) AS e WHERE d.id = 3",
        (MINILM,),
    ).fetchall()
    assert chained and all(close(list(e), embed(conn, chunk)) for chunk, e in chained)


def test_group_by_ordinals(conn: psycopg.Connection, embedded: None) -> None:
    grouped = conn.execute(
        "SELECT document_id, pgml.embed(%s, string_agg(chunk, ' ' ORDER BY chunk_index)) FROM chunks GROUP BY 1"
        " ORDER BY 1",
        (MINILM,),
    ).fetchall()
    texts = conn.execute(
        "SELECT document_id, string_agg(chunk, ' ' ORDER BY chunk_index) FROM chunks GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [g[0] for g in grouped] == [t[0] for t in texts]
    assert all(close(list(g[1]), embed(conn, t[1])) for g, t in zip(grouped, texts, strict=True))


def test_more_output_names_and_folding(conn: psycopg.Connection, embedded: None) -> None:
    cur = conn.execute("SELECT CASE WHEN false THEN NULL ELSE pgml.embed(%s, chunk) END FROM chunks LIMIT 1", (MINILM,))
    assert cur.description is not None and cur.description[0].name == "embed"
    cut = conn.execute("SELECT pgml.embed(%s, CAST('abcdef' AS varchar(3)))", (MINILM,)).fetchone()
    assert cut is not None and close(list(cut[0]), embed(conn, "abc"))
    numbered = conn.execute("SELECT * FROM pgml.chunk((SELECT 'character'), 'a b') WITH ORDINALITY").fetchall()
    assert numbered == [(1, "a b", 1)]


def test_constant_procedure_after_the_statement_that_makes_its_table(conn: psycopg.Connection) -> None:
    """In a query string, a training call reads the table the statement before it created."""
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE fresh AS SELECT i::float8 AS a, i % 2 AS y FROM generate_series(1, 40) i;"
            " SELECT * FROM pgml.train('shapes string', 'classification', 'fresh', 'y', 'linear')"
        )
        assert cur.nextset()
        assert cur.fetchone() == ("shapes string", "classification", "linear", True)


def test_generated_sql_ignores_functions_planted_on_the_search_path(conn: psycopg.Connection, embedded: None) -> None:
    """The proxy's own SQL names pg_catalog's functions and operators: a better-matching overload someone
    created in a schema on the client's search_path (public) is never what it runs."""
    trap = "LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$"
    planted = [
        ("FUNCTION public.convert_from(bytea, text)", f"RETURNS text {trap}"),
        ("FUNCTION public.unnest(text[])", f"RETURNS SETOF text {trap}"),
        ("FUNCTION public.pg_advisory_xact_lock(integer)", f"RETURNS void {trap}"),
        ("FUNCTION public.to_regclass(text)", f"RETURNS regclass {trap}"),
        ("FUNCTION public.hijack_eq(varchar, varchar)", f"RETURNS boolean {trap}"),
    ]
    try:
        for name, body in planted:
            conn.execute(f"CREATE {name} {body}")
        conn.execute("CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.hijack_eq)")
        with pytest.raises(psycopg.Error) as info:  # a proxy error, raised by its DO block
            conn.execute("SELECT pgml.embed('no/such-model', 'x')")
        assert "hijacked" not in str(info.value)
        assert conn.execute("SELECT pgml.chunk('character', 'a b')").fetchone() == (("1", "a b"),)
        assert conn.execute("SELECT count(*) FROM pgml.chunk('character', 'a b')").fetchone() == (1,)
        per_row = conn.execute(
            "SELECT count(pgml.embed(%s, CAST(chunk AS varchar))) FROM chunks", (MINILM,)
        ).fetchone()
        assert per_row == conn.execute("SELECT count(*) FROM chunks").fetchone()
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgml")
    finally:
        conn.execute("DROP OPERATOR IF EXISTS public.= (varchar, varchar)")
        for name, _ in planted:
            conn.execute(f"DROP {name.replace('FUNCTION', 'FUNCTION IF EXISTS')}")
