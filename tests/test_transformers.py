"""pgml.transform, pgml.rank, pgml.tune and pgml.generate through the proxy (tiny random models built on the fly).

Generated text of random weights is arbitrary: the tests check result shapes, counts, order and registry rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from tests.conftest import MINILM, Postgres, ProxyProcess
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(model_dir: Path) -> dict[str, str]:
    for name, build in (("tiny-gpt2", tiny_gpt2), ("tiny-bert-sentiment", tiny_bert_classifier)):
        if not (model_dir / name).exists():
            build(model_dir / name)
    return {"gpt2": "tiny-gpt2", "bert": "tiny-bert-sentiment"}


@pytest.fixture
def conn(proxy: ProxyProcess, models: dict[str, str]) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def test_text_classification(conn: psycopg.Connection) -> None:
    task = json.dumps({"task": "text-classification", "model": "tiny-bert-sentiment"})
    (result,) = conn.execute("SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['good day', 'the cat'])",
                             [task]).fetchone() or (None,)  # fmt: skip
    assert isinstance(result, list) and len(result) == 2
    assert all(set(r) == {"label", "score"} and r["label"] in ("negative", "positive") for r in result)


def test_text_generation_per_row(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS prompts")
    conn.execute("CREATE TABLE prompts (id int, body text)")
    conn.execute("INSERT INTO prompts VALUES (1, 'the cat'), (2, 'a dog'), (3, 'the cat')")
    task = json.dumps({"task": "text-generation", "model": "tiny-gpt2"})
    rows = conn.execute(
        "SELECT id, pgml.transform(task => %s::jsonb, inputs => ARRAY[body],"
        ' args => \'{"max_new_tokens": 3, "min_new_tokens": 3}\') FROM prompts ORDER BY id',
        [task],
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    for _, result in rows:
        assert isinstance(result, list) and len(result) == 1 and isinstance(result[0][0]["generated_text"], str)


def test_rank(conn: psycopg.Connection) -> None:
    documents = ["paris is the capital of france", "the lazy dog", "i love postgres"]
    cur = conn.execute("SELECT * FROM pgml.rank(%s, 'capital of france', %s, '{\"return_documents\": true}')",
                       [MINILM, documents])  # fmt: skip
    assert [d.name for d in cur.description or ()] == ["corpus_id", "score", "text"]
    rows = cur.fetchall()
    assert sorted(r[0] for r in rows) == [0, 1, 2]
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert {r[2] for r in rows} == set(documents)


def test_trust_remote_code_refused(conn: psycopg.Connection) -> None:
    task = json.dumps({"task": "text-classification", "model": "tiny-bert-sentiment", "trust_remote_code": True})
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['x'])", [task])


def test_tune_text_classification_then_transform_by_project(conn: psycopg.Connection, pg: Postgres) -> None:
    conn.execute("DROP TABLE IF EXISTS reviews")
    conn.execute("CREATE TABLE reviews (text text, class text)")
    rows = [("good day good", "positive"), ("the cat sat on the mat", "negative")] * 10
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO reviews VALUES (%s, %s)", rows)
    hyperparams = json.dumps({"training_args": {"max_steps": 2, "per_device_train_batch_size": 4},
                              "dataset_args": {"text_column": "text", "class_column": "class"}})  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.tune('Review Sentiment', task => 'text-classification',"
                       " relation_name => 'reviews', model_name => %s, hyperparams => %s::jsonb, test_size => 0.2)",
                       ["tiny-bert-sentiment", hyperparams]).fetchone()  # fmt: skip
    assert row == ("Review Sentiment", "text-classification", "transformers", True)
    found = conn.execute("SELECT m.id, m.metrics FROM pgml.models m JOIN pgml.projects p"
                         " ON p.id = m.project_id WHERE p.name = 'Review Sentiment'").fetchone()  # fmt: skip
    assert found is not None
    model_id, metrics = found
    assert {"f1", "accuracy"} <= set(metrics)
    paths = {p for (p,) in conn.execute("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", [model_id])}
    assert "config.json" in paths and any(p.endswith(".safetensors") for p in paths)
    task = json.dumps({"task": "text-classification", "model": "Review Sentiment"})
    (result,) = conn.execute("SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['good day'])",
                             [task]).fetchone() or (None,)  # fmt: skip
    assert result[0]["label"] in ("positive", "negative")


def test_tune_conversation_then_generate(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS chats")
    conn.execute('CREATE TABLE chats (system text, "user" text, assistant text)')
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO chats VALUES (%s, %s, %s)", [("be nice", "hello", "good day")] * 12)
    hyperparams = json.dumps({"training_args": {"max_steps": 2, "per_device_train_batch_size": 4},
                              "dataset_args": {"system_column": "system", "user_column": "user",
                                               "assistant_column": "assistant"}})  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.tune('Chat Bot', 'conversation', 'chats', model_name => 'tiny-gpt2',"
                       " hyperparams => %s::jsonb)", [hyperparams]).fetchone()  # fmt: skip
    assert row is not None and row[1:3] == ("conversation", "transformers")
    (text,) = conn.execute("SELECT pgml.generate('Chat Bot', 'hello', '{\"max_new_tokens\": 3, \"min_new_tokens\": 3}')"
                           ).fetchone() or (None,)  # fmt: skip
    assert isinstance(text, str)
    (texts,) = conn.execute("SELECT pgml.generate('Chat Bot', ARRAY['hello', 'good'], '{\"max_new_tokens\": 2}')"
                            ).fetchone() or (None,)  # fmt: skip
    assert isinstance(texts, list) and len(texts) == 2


def test_text_generation_is_greedy_by_default_like_the_stream(conn: psycopg.Connection) -> None:
    task = json.dumps({"task": "text-generation", "model": "tiny-gpt2"})
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['the cat'], args => '{\"max_new_tokens\": 8}')"
    first, second = (conn.execute(sql, [task]).fetchone() for _ in range(2))
    assert first == second  # transformers 5's pipeline would sample; PostgresML's was greedy
    streamed = conn.execute("SELECT pgml.transform_stream(%s::jsonb, '{\"max_new_tokens\": 8}', 'the cat')",
                            [task]).fetchall()  # fmt: skip
    words = "".join(f[0][0] for f in streamed).split()  # the same tokens (this tokenizer's spacing differs)
    assert first is not None and "".join(words) == first[0][0][0]["generated_text"].replace(" ", "")
