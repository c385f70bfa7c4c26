"""Korvus (PostgresML's SDK, PyPI ``korvus`` 1.1.x) through the proxy, unchanged: its README quickstart and its flows.

Local models only: all-MiniLM-L6-v2 for embeddings (``model_dir``), a tiny random GPT-2 with a chat template that never
stops early (``tiny/gpt2``: every generation is exactly the requested number of one-word tokens) and a tiny random
cross-encoder with one output (``tiny/cross-encoder``). Results are checked against the work's own ground truth: the
splitter's own chunks, the document a query was copied from, ``pgml.embed`` / ``pgml.rank`` called plainly, the rows
Korvus wrote (read on the server directly), the number of generated tokens.

Korvus creates a schema per collection and needs pgvector, so the module runs only on a server that has it (the bundled
PostgreSQL 18/16); the proxy and the scratch database are one per module. Korvus keeps one connection pool per database
URL in the process and its driver (sqlx) caches prepared statements by SQL text, so a statement first prepared with one
set of parameter types is reused with another (``SELECT pgml.transform(task => $1, inputs => $2, args => $3)`` with
``text[]`` inputs, then with ``jsonb[]`` chat messages: the server itself rejects the Bind, 42804). Flows that bind
different types into the same SQL text therefore get their own URL (``application_name``) here, as separate
applications would.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import korvus
import psycopg
import pytest

from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database, start_proxy
from tests.tiny_models import tiny_cross_encoder, tiny_gpt2_no_eos

pytestmark = pytest.mark.slow

GPT2 = "tiny/gpt2"
RERANKER = "tiny/cross-encoder"
CHUNK_SIZE, CHUNK_OVERLAP = 50, 10
SCHEMA = {
    "text": {
        "splitter": {
            "model": "recursive_character",
            "parameters": {"chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP},
        },
        "semantic_search": {"model": MINILM},
        "full_text_search": {"configuration": "english"},
    }
}
DOCS = [
    {"id": "korvus", "kind": "sdk", "text": "Korvus is incredibly fast and easy to use. It runs the whole RAG pipeline "
                                            "inside one SQL query, next to the data."},
    {"id": "tomato", "kind": "food", "text": "Tomatoes are incredible on burgers."},
    {"id": "postgres", "kind": "db", "text": "PostgreSQL is a relational database with a long history of "
                                             "reliability, extensibility and standards compliance."},
    {"id": "cats", "kind": "pets", "text": "Cats sleep most of the day and hunt at night."},
]  # fmt: skip
TEXT = {doc["id"]: doc["text"] for doc in DOCS}
KIND = {doc["id"]: doc["kind"] for doc in DOCS}


def split(text: str) -> list[str]:
    """The chunks Korvus's ``recursive_character`` splitter with SCHEMA's parameters must produce."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    return RecursiveCharacterTextSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP).split_text(text)


def require_pgvector(pg: Postgres) -> None:
    with psycopg.connect(pg.dsn()) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
            pytest.skip("Korvus needs pgvector: run on the bundled PostgreSQL (PGML_TEST_PG=18 or 16)")


def create_vector(pg: Postgres, dbname: str) -> None:
    """pgvector, installed by the DBA as Korvus's README asks (a server extension, not the proxy's business)."""
    with psycopg.connect(pg.dsn(dbname=dbname), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("korvus-models")
    tiny_gpt2_no_eos(base / GPT2)
    tiny_cross_encoder(base / RERANKER)
    return base


@pytest.fixture(scope="module")
def kproxy(
    pg: Postgres, model_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    require_pgvector(pg)
    handle = start_proxy(
        pg.dsn(), tmp_path_factory.mktemp("korvus-proxy"), PGML_PROXY_ENGINE_MODEL_DIRS=f"{model_dir},{tiny_dir}"
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def kdb(pg: Postgres, kproxy: ProxyProcess) -> Iterator[str]:
    """The module's database: pgvector, then ``CREATE EXTENSION pgml`` through the proxy (PostgresML's setup step)."""
    with scratch_database(pg, "korvus") as name:
        create_vector(pg, name)
        with psycopg.connect(kproxy.dsn(dbname=name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgml")
        yield name


@dataclass
class Env:
    pg: Postgres
    proxy: ProxyProcess
    dbname: str

    def url(self, app: str) -> str:
        """A Korvus database URL through the proxy; one ``app`` is one Korvus connection pool."""
        return self.proxy.dsn(dbname=self.dbname, application_name=f"korvus_{app}")

    def server(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A direct connection to the server, to read what Korvus wrote."""
        return psycopg.connect(self.pg.dsn(dbname=self.dbname), autocommit=True)

    def through_proxy(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.proxy.dsn(dbname=self.dbname), autocommit=True)


@pytest.fixture(scope="module")
def env(pg: Postgres, kproxy: ProxyProcess, kdb: str) -> Env:
    return Env(pg, kproxy, kdb)


@dataclass
class Searchable:
    collection: Any
    pipeline: Any


@pytest.fixture(scope="module")
async def main(env: Env) -> Searchable:
    """Collection ``korvus_main`` with pipeline ``v1`` (splitter, semantic and full-text search) holding DOCS."""
    collection = korvus.Collection("korvus_main", env.url("main"))
    pipeline = korvus.Pipeline("v1", SCHEMA)
    await collection.add_pipeline(pipeline)
    await collection.upsert_documents(DOCS)
    return Searchable(collection, pipeline)


def chunks_by_document(env: Env, collection: str) -> dict[str, list[tuple[int, str]]]:
    with env.server() as conn:
        rows = conn.execute(
            f"SELECT d.document->>'id', c.chunk_index, c.chunk FROM \"{collection}_v1\".text_chunks c "
            f'JOIN "{collection}".documents d ON d.id = c.document_id ORDER BY 1, 2'
        ).fetchall()
    out: dict[str, list[tuple[int, str]]] = {}
    for doc_id, index, chunk in rows:
        out.setdefault(doc_id, []).append((index, chunk))
    return out


def expected_chunks(text: str) -> list[tuple[int, str]]:
    return [(i + 1, piece) for i, piece in enumerate(split(text))]


def embedding_versions(env: Env, collection: str) -> dict[tuple[str, int], str]:
    """(document id, chunk index) -> the row version (xmin) of its embedding: changes exactly when it is rewritten."""
    with env.server() as conn:
        rows = conn.execute(
            f"SELECT d.document->>'id', c.chunk_index, e.xmin::text FROM \"{collection}_v1\".text_embeddings e "
            f'JOIN "{collection}_v1".text_chunks c ON c.id = e.chunk_id '
            f'JOIN "{collection}".documents d ON d.id = c.document_id'
        ).fetchall()
    return {(doc_id, index): xmin for doc_id, index, xmin in rows}


def embedding_distances(env: Env, collection: str) -> list[tuple[str, float]]:
    """Each stored embedding's cosine distance to ``pgml.embed`` of its chunk, computed plainly through the proxy."""
    with env.through_proxy() as conn:
        rows = conn.execute(
            f'SELECT c.chunk, e.embedding <=> pgml.embed(%s, c.chunk)::vector FROM "{collection}_v1".text_embeddings e '
            f'JOIN "{collection}_v1".text_chunks c ON c.id = e.chunk_id',
            [MINILM],
        ).fetchall()
    return [(chunk, float(distance)) for chunk, distance in rows]


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    """All items of a Korvus async iterator (a failing stream panics in Korvus's binding: reported as a failure)."""
    items = []
    try:
        async for item in stream:
            items.append(item)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        pytest.fail(f"Korvus stream failed: {type(exc).__name__}: {exc} (Korvus prints the database error on stderr)")
    return items


def fragments(items: list[Any]) -> list[str]:
    """Stream rows are JSON arrays of one string (one input) each."""
    assert all(isinstance(item, list) and len(item) == 1 and isinstance(item[0], str) for item in items), items
    return [item[0] for item in items]


# -- README quickstart -----------------------------------------------------------------------------------------------


async def test_readme_quickstart_in_a_fresh_database(pg: Postgres, kproxy: ProxyProcess) -> None:
    """Korvus's README as written, in a database that has pgvector and has never seen a pgml call."""
    with scratch_database(pg, "korvusfresh") as name:
        create_vector(pg, name)
        url = kproxy.dsn(dbname=name, application_name="korvus_quickstart")
        collection = korvus.Collection("korvus-demo-v0", url)
        pipeline = korvus.Pipeline(
            "v1", {"text": {"splitter": {"model": "recursive_character"}, "semantic_search": {"model": MINILM}}}
        )
        await collection.add_pipeline(pipeline)
        await collection.upsert_documents(
            [
                {"id": "1", "text": "Korvus is incredibly fast and easy to use."},
                {"id": "2", "text": "Tomatoes are incredible on burgers."},
            ]
        )
        query = "Is Korvus fast?"
        results = await collection.rag(
            {
                "CONTEXT": {
                    "vector_search": {
                        "query": {"fields": {"text": {"query": query}}},
                        "document": {"keys": ["id"]},
                        "limit": 1,
                    },
                    "aggregate": {"join": "\n"},
                },
                "chat": {
                    "model": GPT2,
                    "messages": [
                        {"role": "system", "content": "You are a friendly and helpful chatbot"},
                        {"role": "user", "content": f"Given the context\n:{{CONTEXT}}\nAnswer the question: {query}"},
                    ],
                    "max_tokens": 100,
                },
            },
            pipeline,
        )
        assert [source["document"] for source in results["sources"]["CONTEXT"]] == [{"id": "1"}]
        assert results["sources"]["CONTEXT"][0]["chunk"] == "Korvus is incredibly fast and easy to use."
        (answer,) = results["rag"]
        assert isinstance(answer, str) and len(answer.split()) == 100


# -- documents: chunks, embeddings, re-upsert, delete ----------------------------------------------------------------


async def test_upsert_chunks_with_the_splitter_and_embeds_every_chunk(main: Searchable, env: Env) -> None:
    assert chunks_by_document(env, "korvus_main") == {doc_id: expected_chunks(text) for doc_id, text in TEXT.items()}
    assert len(split(TEXT["korvus"])) > 1 and len(split(TEXT["postgres"])) > 1  # the splitter really splits
    distances = embedding_distances(env, "korvus_main")
    assert sorted(chunk for chunk, _ in distances) == sorted(piece for text in TEXT.values() for piece in split(text))
    assert all(distance < 1e-4 for _, distance in distances), distances
    with env.server() as conn:
        (tsvectors,) = conn.execute('SELECT count(*) FROM "korvus_main_v1".text_tsvectors').fetchone() or (0,)
    assert tsvectors == len(distances)
    documents = await main.collection.get_documents({"limit": 10})
    assert sorted(d["document"]["id"] for d in documents) == sorted(TEXT)
    status = await main.collection.get_pipeline_status(main.pipeline)
    assert status["text"]["chunks"]["not_synced"] == 0 and status["text"]["embeddings"]["not_synced"] == 0


async def test_reupsert_rewrites_only_what_changed_and_delete_removes(env: Env) -> None:
    collection = korvus.Collection("korvus_sync", env.url("sync"))
    pipeline = korvus.Pipeline("v1", SCHEMA)
    await collection.add_pipeline(pipeline)
    long_text = TEXT["postgres"]
    await collection.upsert_documents([{"id": "a", "text": TEXT["korvus"]}, {"id": "b", "text": long_text}])
    before = embedding_versions(env, "korvus_sync")
    assert chunks_by_document(env, "korvus_sync") == {
        "a": expected_chunks(TEXT["korvus"]),
        "b": expected_chunks(long_text),
    }

    # Unchanged documents: no chunk and no embedding is rewritten.
    await collection.upsert_documents([{"id": "a", "text": TEXT["korvus"]}, {"id": "b", "text": long_text}])
    assert embedding_versions(env, "korvus_sync") == before

    # "b" shrinks to one chunk: its chunks are the splitter's, the stale ones gone, only "b" re-embedded.
    short_text = "PostgreSQL is reliable."
    await collection.upsert_documents([{"id": "a", "text": TEXT["korvus"]}, {"id": "b", "text": short_text}])
    assert chunks_by_document(env, "korvus_sync") == {
        "a": expected_chunks(TEXT["korvus"]),
        "b": expected_chunks(short_text),
    }
    after = embedding_versions(env, "korvus_sync")
    assert {key: v for key, v in after.items() if key[0] == "a"} == {
        key: v for key, v in before.items() if key[0] == "a"
    }
    assert after[("b", 1)] != before[("b", 1)]
    assert all(distance < 1e-4 for _, distance in embedding_distances(env, "korvus_sync"))

    hits = await collection.vector_search({"query": {"fields": {"text": {"query": short_text}}}, "limit": 1}, pipeline)
    assert [(hit["document"]["id"], hit["chunk"]) for hit in hits] == [("b", short_text)]

    await collection.delete_documents({"id": {"$eq": "b"}})
    documents = await collection.get_documents()
    assert [d["document"]["id"] for d in documents] == ["a"]
    assert set(chunks_by_document(env, "korvus_sync")) == {"a"}
    hits = await collection.vector_search({"query": {"fields": {"text": {"query": short_text}}}, "limit": 10}, pipeline)
    assert hits and {hit["document"]["id"] for hit in hits} == {"a"}


# -- vector_search and search ----------------------------------------------------------------------------------------


async def test_vector_search_top_hit_is_the_document_queried_by_its_own_text(main: Searchable) -> None:
    for doc_id, query in [("tomato", TEXT["tomato"]), ("cats", TEXT["cats"]), ("postgres", split(TEXT["postgres"])[1])]:
        hits = await main.collection.vector_search(
            {"query": {"fields": {"text": {"query": query}}}, "limit": 3}, main.pipeline
        )
        assert len(hits) == 3
        assert (hits[0]["document"]["id"], hits[0]["chunk"]) == (doc_id, query)
        assert hits[0]["score"] > 0.99 and hits[0]["rerank_score"] is None
        assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    recalled = await main.collection.query().vector_recall(TEXT["tomato"], main.pipeline).limit(2).fetch_all()
    assert next((chunk, document["id"]) for _, chunk, document in recalled) == (TEXT["tomato"], "tomato")


async def test_vector_search_with_filters(main: Searchable, env: Env) -> None:
    chunk_count = {doc_id: len(split(text)) for doc_id, text in TEXT.items()}

    async def search(query: dict[str, Any], limit: int = 20) -> list[dict[str, Any]]:
        hits: list[dict[str, Any]] = await main.collection.vector_search(
            {"query": query, "limit": limit}, main.pipeline
        )
        return hits

    fields = {"text": {"query": TEXT["tomato"]}}
    hits = await search({"fields": fields, "filter": {"kind": {"$eq": "db"}}})
    assert [hit["document"]["id"] for hit in hits] == ["postgres"] * chunk_count["postgres"]
    hits = await search({"fields": fields, "filter": {"kind": {"$ne": "food"}}})
    assert sorted(hit["document"]["id"] for hit in hits) == sorted(
        doc_id for doc_id, n in chunk_count.items() for _ in range(n) if KIND[doc_id] != "food"
    )
    hits = await search({"fields": fields, "filter": {"$or": [{"id": {"$eq": "cats"}}, {"id": {"$eq": "tomato"}}]}})
    assert [hit["document"]["id"] for hit in hits] == ["tomato", "cats"]

    with env.server() as conn:
        matching = sorted(
            row[0]
            for row in conn.execute(
                'SELECT c.chunk FROM "korvus_main_v1".text_tsvectors t JOIN "korvus_main_v1".text_chunks c '
                "ON c.id = t.chunk_id WHERE t.ts @@ plainto_tsquery('english', 'reliability')"
            )
        )
    hits = await search({"fields": {"text": {"query": TEXT["cats"], "full_text_filter": "reliability"}}})
    assert matching and sorted(hit["chunk"] for hit in hits) == matching

    hits = await main.collection.vector_search(
        {"query": {"fields": fields}, "document": {"keys": ["id"]}, "limit": 2}, main.pipeline
    )
    assert hits[0]["document"] == {"id": "tomato"}


async def test_vector_search_with_rerank(main: Searchable, env: Env) -> None:
    query = "Is Korvus fast?"
    candidates = await main.collection.vector_search(
        {"query": {"fields": {"text": {"query": query}}}, "limit": 5}, main.pipeline
    )
    reranked = await main.collection.vector_search(
        {
            "query": {"fields": {"text": {"query": query}}},
            "rerank": {"model": RERANKER, "query": query, "num_documents_to_rerank": 5},
            "limit": 3,
        },
        main.pipeline,
    )
    chunks = [hit["chunk"] for hit in candidates]
    with env.through_proxy() as conn:
        ranked = conn.execute(
            "SELECT corpus_id, score FROM pgml.rank(%s, %s, %s::text[])", [RERANKER, query, chunks]
        ).fetchall()
    expected = {chunks[corpus_id]: score for corpus_id, score in ranked}
    assert len(reranked) == 3
    scores = [hit["rerank_score"] for hit in reranked]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(sorted(expected.values(), reverse=True)[:3], abs=1e-5)
    for hit in reranked:
        assert hit["rerank_score"] == pytest.approx(expected[hit["chunk"]], abs=1e-5)
        assert hit["score"] == pytest.approx(next(c["score"] for c in candidates if c["chunk"] == hit["chunk"]))


async def test_search_semantic_and_full_text(main: Searchable) -> None:
    results = await main.collection.search(
        {
            "query": {
                "semantic_search": {"text": {"query": TEXT["tomato"], "boost": 2.0}},
                "full_text_search": {"text": {"query": "tomatoes", "boost": 1.2}},
            },
            "limit": 3,
        },
        main.pipeline,
    )
    ids = [result["document"]["id"] for result in results["results"]]
    assert ids[0] == "tomato" and len(ids) == len(set(ids)) == 3
    assert isinstance(results["search_id"], int)

    results = await main.collection.search(
        {"query": {"full_text_search": {"text": {"query": "reliability"}}}, "limit": 5}, main.pipeline
    )
    assert [result["document"]["id"] for result in results["results"]] == ["postgres"]

    results = await main.collection.search(
        {
            "query": {
                "semantic_search": {"text": {"query": TEXT["tomato"]}},
                "filter": {"kind": {"$eq": "pets"}},
            },
            "limit": 5,
        },
        main.pipeline,
    )
    assert [result["document"]["id"] for result in results["results"]] == ["cats"]


# -- RAG -------------------------------------------------------------------------------------------------------------

CONTEXT = {
    "vector_search": {
        "query": {"fields": {"text": {"query": TEXT["tomato"]}}},
        "document": {"keys": ["id"]},
        "limit": 2,
    },
    "aggregate": {"join": "\n"},
}


def prompts(template: str, sources: list[dict[str, Any]], extra: str) -> list[str]:
    """The prompts Korvus may have built: ``{CONTEXT}`` the chunks joined (any order), ``{EXTRA}`` its SQL's value."""
    chunks = [source["chunk"] for source in sources]
    return [
        template.replace("{CONTEXT}", "\n".join(o)).replace("{EXTRA}", extra) for o in itertools.permutations(chunks)
    ]


async def test_rag_completion(main: Searchable) -> None:
    template = "the cat sat on {CONTEXT} and {EXTRA}"
    results = await main.collection.rag(
        {
            "CONTEXT": CONTEXT,
            "EXTRA": {"sql": "SELECT 'a good day'"},
            "completion": {"model": GPT2, "prompt": template, "max_tokens": 4},
        },
        main.pipeline,
    )
    sources = results["sources"]["CONTEXT"]
    assert sources[0]["document"]["id"] == "tomato" and len(sources) == 2
    assert results["sources"]["EXTRA"] == "a good day"
    ((generated,),) = results["rag"]
    text = generated["generated_text"]
    prompt = next((p for p in prompts(template, sources, "a good day") if text.startswith(p)), None)
    assert prompt is not None, text
    assert len(text[len(prompt) :].split()) == 4


async def test_rag_chat(main: Searchable) -> None:
    results = await main.collection.rag(
        {
            "CONTEXT": CONTEXT,
            "chat": {
                "model": GPT2,
                "messages": [
                    {"role": "system", "content": "You are a friendly and helpful chatbot"},
                    {"role": "user", "content": "Given the context\n:{CONTEXT}\nWhat is incredible on burgers?"},
                ],
                "max_tokens": 6,
                "temperature": 0.7,
            },
        },
        main.pipeline,
    )
    assert results["sources"]["CONTEXT"][0]["document"]["id"] == "tomato"
    (answer,) = results["rag"]
    assert isinstance(answer, str) and len(answer.split()) == 6


async def test_rag_stream_completion(main: Searchable, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    context = {
        "vector_search": {"query": {"fields": {"text": {"query": TEXT["tomato"]}}}, "limit": 1},
        "aggregate": {"join": "\n"},
    }
    template = "the cat sat on {CONTEXT}"
    stream = await main.collection.rag_stream(
        {"CONTEXT": context, "completion": {"model": GPT2, "prompt": template, "max_tokens": 5}}, main.pipeline
    )
    words = "".join(fragments(await collect(stream.stream()))).split()
    # text-generation streams the prompt's tokens too, as PostgresML does (special tokens skipped: the tiny
    # word-level tokenizer knows only some of the prompt's words), then the new tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / GPT2)
    prompt = template.replace("{CONTEXT}", TEXT["tomato"])
    decoded = tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True)
    assert isinstance(decoded, str)
    prompt_words = decoded.split()
    assert prompt_words[:4] == ["the", "cat", "sat", "on"]
    assert words[: len(prompt_words)] == prompt_words and len(words) == len(prompt_words) + 5


async def test_rag_stream_chat(main: Searchable) -> None:
    stream = await main.collection.rag_stream(
        {
            "CONTEXT": CONTEXT,
            "chat": {
                "model": GPT2,
                "messages": [{"role": "user", "content": "Given the context {CONTEXT} what is on burgers?"}],
                "max_tokens": 5,
            },
        },
        main.pipeline,
    )
    pieces = fragments(await collect(stream.stream()))
    assert len(pieces) == 5 and len("".join(pieces).split()) == 5


# -- TransformerPipeline, OpenSourceAI, Builtins ---------------------------------------------------------------------


async def test_transformer_pipeline_transform_and_stream(env: Env) -> None:
    pipeline = korvus.TransformerPipeline("text-generation", GPT2, {}, env.url("transformer"))
    prompts_ = ["the cat sat", "a dog was"]
    results = await pipeline.transform(prompts_, {"max_tokens": 4})
    assert len(results) == 2
    for prompt, (generated,) in zip(prompts_, results, strict=True):
        assert generated["generated_text"].startswith(prompt)
        assert len(generated["generated_text"][len(prompt) :].split()) == 4
    (legacy,) = await pipeline.transform(["the cat sat"], {"max_new_tokens": 3})  # Korvus renames it to max_tokens
    assert len(legacy[0]["generated_text"][len("the cat sat") :].split()) == 3

    stream = await pipeline.transform_stream("the cat sat", {"max_tokens": 5})
    words = "".join(fragments(await collect(stream))).split()
    assert words[:3] == ["the", "cat", "sat"] and len(words) == 3 + 5


MESSAGES = [
    {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
    {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
]


def check_completion(result: dict[str, Any], max_tokens: int) -> None:
    assert result["object"] == "chat.completion" and result["model"] == GPT2
    (choice,) = result["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and len(choice["message"]["content"].split()) == max_tokens


def check_chunks(chunks: list[dict[str, Any]], max_tokens: int) -> None:
    assert len(chunks) == max_tokens
    assert all(
        c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"]["role"] == "assistant" for c in chunks
    )
    assert len({c["id"] for c in chunks}) == 1
    assert len("".join(c["choices"][0]["delta"]["content"] for c in chunks).split()) == max_tokens


async def test_open_source_ai_async(env: Env) -> None:
    client = korvus.OpenSourceAI(env.url("osai_async"))
    check_completion(await client.chat_completions_create_async(GPT2, MESSAGES, max_tokens=6, temperature=0.85), 6)
    stream = await client.chat_completions_create_stream_async(GPT2, MESSAGES, max_tokens=4, temperature=0.85)
    check_chunks(await collect(stream), 4)


def test_open_source_ai_sync(env: Env) -> None:
    client = korvus.OpenSourceAI(env.url("osai_sync"))
    check_completion(client.chat_completions_create(GPT2, MESSAGES, max_tokens=5, temperature=0.85), 5)
    check_chunks(list(client.chat_completions_create_stream(GPT2, MESSAGES, max_tokens=3)), 3)


async def test_builtins(env: Env) -> None:
    builtins = korvus.Builtins(env.url("builtins"))
    with env.through_proxy() as conn:
        (plain,) = conn.execute("SELECT pgml.embed(%s, 'test')", [MINILM]).fetchone() or (None,)
        (other,) = conn.execute("SELECT pgml.embed(%s, 'two')", [MINILM]).fetchone() or (None,)
    embedding = await builtins.embed(MINILM, "test")
    assert len(embedding) == 384 and embedding == pytest.approx(plain, abs=1e-6)
    batch = await builtins.embed_batch(MINILM, ["test", "two"])
    assert len(batch) == 2 and batch[0] == pytest.approx(plain, abs=1e-6) and batch[1] == pytest.approx(other, abs=1e-6)

    rows = (
        await builtins.query("SELECT pgml.embed($1, $2) AS e, $2 AS t")
        .bind_string(MINILM)
        .bind_string("two")
        .fetch_all()
    )
    assert [row["t"] for row in rows] == ["two"] and rows[0]["e"] == pytest.approx(other, abs=1e-6)

    (generated,) = await builtins.transform(
        {"task": "text-generation", "model": GPT2}, ["the cat sat"], {"max_tokens": 3}
    )
    assert generated[0]["generated_text"].startswith("the cat sat")
    assert len(generated[0]["generated_text"][len("the cat sat") :].split()) == 3
