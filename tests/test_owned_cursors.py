"""Server-side cursors over pgml.transform_stream, as drivers and ORMs open them (issue 10, item 6).

A proxy-owned cursor must behave as a server cursor over a function: psycopg 3 describes the portal its
DECLARE made, reads it with FETCH FORWARD n and closes it; Execute with a row limit reads a cursor's portal;
FETCH / MOVE move it as PostgreSQL moves a portal. Each sequence is compared with PostgreSQL's own answers
to the same sequence on a cursor over ``generate_series`` with as many rows as the stream has fragments.
The model is a tiny GPT-2 built to count: greedily, each word of its vocabulary is followed by the next
one, so the prompt's two words and then one fragment per new token are all different words, the same
every time (row n of the series stands for fragment n).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.wire import messages as pq
from proxy.wire.frames import Frame, Frontend, pack
from tests.conftest import Postgres, ProxyProcess
from tests.test_stream import args
from tests.test_wire_pgml import B, E, P, Q, Raw, S
from tests.tiny_models import WORDS, tiny_gpt2

TASK = '{"task": "text-generation", "model": "counting-gpt2"}'
TOKENS = 6
ROWS = TOKENS + 2  # "the ", "cat ", then one fragment per new token
STREAM = f"pgml.transform_stream('{TASK}', '{args(TOKENS)}', 'the cat')"
SERIES = f"generate_series(1, {ROWS})"


def counting_gpt2(directory: Path) -> None:
    """tests.tiny_models' GPT-2 made to count: blocks and positions silenced, one-hot word embeddings, and
    an output head whose best next word after WORDS[k] is WORDS[k + 1]."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tiny_gpt2(directory)
    model = GPT2LMHeadModel.from_pretrained(directory, tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab, width = model.config.vocab_size, model.config.n_embd
    words = tokenizer.convert_tokens_to_ids(WORDS)
    with torch.no_grad():
        for weight in model.transformer.h.parameters():
            weight.zero_()
        model.transformer.wpe.weight.zero_()
        embeddings = torch.zeros(vocab, width)
        embeddings[torch.arange(vocab), torch.arange(vocab) % width] = 1.0
        model.transformer.wte.weight.copy_(embeddings)
        normed = model.transformer.ln_f(embeddings)
        head = -normed.mean(0).repeat(vocab, 1)
        following = {token: words[(k + 1) % len(words)] for k, token in enumerate(words)}
        for token in range(vocab):
            head[following.get(token, words[0])] += 10 * normed[token]
        model.lm_head.weight.copy_(head)
    model.config.tie_word_embeddings = False
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def reference(proxy: ProxyProcess, model_dir: Path) -> list[list[str]]:
    """Every fragment of STREAM, in order (a plain SELECT through the proxy): all different."""
    if not (model_dir / "counting-gpt2").exists():
        counting_gpt2(model_dir / "counting-gpt2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = [r[0] for r in conn.execute(f"SELECT * FROM {STREAM}").fetchall()]
    assert len(rows) == ROWS and all(isinstance(r, list) and len(r) == 1 for r in rows)
    assert len({r[0].strip() for r in rows}) == ROWS, rows
    return rows


@pytest.fixture
def conn(proxy: ProxyProcess, reference: list[list[str]]) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn()) as connection:
        yield connection


# --------------------------------------------------------------------------- #
# psycopg 3 server-side cursors (what SQLAlchemy and Django use)
# --------------------------------------------------------------------------- #


QUERIES = {
    "from": "SELECT * FROM pgml.transform_stream(%s::jsonb, %s::jsonb, %s)",
    "select-list": "SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)",
}


@pytest.mark.parametrize("form", QUERIES)
@pytest.mark.parametrize("binary", [False, True])
def test_psycopg_named_cursor(conn: psycopg.Connection, reference: list[list[str]], form: str, binary: bool) -> None:
    with conn.cursor(name="c", binary=binary) as cur:
        cur.itersize = 3
        cur.execute(QUERIES[form], [TASK, args(TOKENS), "the cat"])
        assert [(d.name, d.type_code) for d in cur.description or ()] == [("transform_stream", 3802)]
        first = cur.fetchone()
        some = cur.fetchmany(2)
        rest = list(cur)  # FETCH FORWARD 3 until a short page
        assert first is not None and [first[0], *(r[0] for r in some + rest)] == reference
    conn.commit()
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_named_cursor_scroll_and_reuse(conn: psycopg.Connection, reference: list[list[str]]) -> None:
    with conn.cursor(name="c", scrollable=True) as cur:
        cur.execute(QUERIES["from"], [TASK, args(TOKENS), "the cat"])
        assert cur.fetchmany(3) == [(r,) for r in reference[:3]]
        cur.scroll(-2)  # MOVE -2: back to the first row
        assert cur.fetchone() == (reference[1],)
        cur.scroll(1, "absolute")
        assert cur.fetchall() == [(r,) for r in reference[1:]]
        cur.execute(QUERIES["select-list"], [TASK, args(TOKENS), "the cat"])  # the same name again: CLOSE, DECLARE
        assert cur.fetchall() == [(r,) for r in reference]
    conn.rollback()


def test_psycopg_withhold_cursor_in_autocommit(proxy: ProxyProcess, reference: list[list[str]]) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.cursor(name="h", withhold=True) as cur:
        cur.execute(QUERIES["from"], [TASK, args(TOKENS), "the cat"])
        assert cur.fetchmany(2) == [(r,) for r in reference[:2]]
        assert conn.execute("SELECT 1").fetchone() == (1,)  # its own transactions in between
        assert cur.fetchall() == [(r,) for r in reference[2:]]


def test_psycopg2_named_cursor(proxy: ProxyProcess, reference: list[list[str]]) -> None:
    import psycopg2

    conn = psycopg2.connect(proxy.dsn())
    try:
        for sql in QUERIES.values():
            cur = conn.cursor(name="c")  # DECLARE "c" CURSOR WITHOUT HOLD FOR …, then FETCH FORWARD n FROM "c"
            cur.itersize = 3
            cur.execute(sql, [TASK, args(TOKENS), "the cat"])
            assert cur.fetchone() == (reference[0],)
            assert cur.fetchmany(2) == [(r,) for r in reference[1:3]]
            assert list(cur) == [(r,) for r in reference[3:]]
            cur.close()
            conn.commit()
        cur = conn.cursor(name="h", withhold=True)
        cur.execute(QUERIES["from"], [TASK, args(TOKENS), "the cat"])
        conn.commit()
        assert cur.fetchall() == [(r,) for r in reference]
        cur.close()
    finally:
        conn.close()


def test_sqlalchemy_stream_results_and_yield_per(proxy: ProxyProcess, reference: list[list[str]]) -> None:
    from sqlalchemy import cast, create_engine, func, select, text
    from sqlalchemy.dialects.postgresql import JSONB
    from sqlalchemy.orm import Session

    engine = create_engine(proxy.dsn().replace("postgresql://", "postgresql+psycopg://"))
    try:
        statement = text("SELECT * FROM pgml.transform_stream(CAST(:task AS jsonb), CAST(:args AS jsonb), :input)")
        values = {"task": TASK, "args": args(TOKENS), "input": "the cat"}
        with engine.connect() as c:
            result = c.execution_options(stream_results=True, max_row_buffer=3).execute(statement, values)
            assert [row[0] for row in result] == reference
        with Session(engine) as session:
            call = func.pgml.transform_stream(cast(TASK, JSONB), cast(args(TOKENS), JSONB), "the cat", type_=JSONB)
            partitions = list(session.execute(select(call).execution_options(yield_per=3)).partitions())
            assert [len(p) for p in partitions] == [3, 3, 2]
            assert [row[0] for p in partitions for row in p] == reference
    finally:
        engine.dispose()


DJANGO = """
import json, sys
import django
from django.conf import settings

settings.configure(DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1", "PORT": sys.argv[1],
    "NAME": "postgres", "USER": "postgres",
}})
django.setup()
from django.db import connection, transaction

out = {}
with connection.chunked_cursor() as cursor:  # what QuerySet.iterator() reads with: a WITH HOLD cursor
    cursor.execute("SELECT * FROM pgml.transform_stream(%s::jsonb, %s::jsonb, %s)", sys.argv[2:5])
    out["autocommit"] = [json.loads(row[0]) for chunk in iter(lambda: cursor.fetchmany(3), []) for row in chunk]
with transaction.atomic(), connection.chunked_cursor() as cursor:
    cursor.execute("SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)", sys.argv[2:5])
    out["atomic"] = [json.loads(row[0]) for row in cursor.fetchall()]  # Django reads jsonb as text
print(json.dumps(out))
"""


def test_django_chunked_cursor(proxy: ProxyProcess, reference: list[list[str]], tmp_path: Path) -> None:
    script = tmp_path / "django_stream.py"
    script.write_text(textwrap.dedent(DJANGO))
    done = subprocess.run(
        [sys.executable, str(script), str(proxy.port), TASK, args(TOKENS), "the cat"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"autocommit": reference, "atomic": reference}


# --------------------------------------------------------------------------- #
# Message sequences on a cursor's portal, compared with the server's answers
# --------------------------------------------------------------------------- #


class Tagged(Raw):
    """A raw client whose answers show command tags, result formats and SQLSTATEs."""

    def read_until_z(self, count: int) -> list[str]:
        out = []
        while count:
            m = self._msg()
            kind = chr(m[0])
            if kind == "E":
                out.append("E:" + dict(pq.ErrorResponse.decode(Frame(m[0], m)).fields).get("C", ""))
            elif kind == "Z":
                out.append("Z" + chr(m[5]))
                count -= 1
            elif kind == "C":
                out.append("C:" + m[5:-1].decode())
            elif kind == "T":
                nul = m.index(b"\0", 7)
                out.append(f"T:{m[7:nul].decode()}/{struct.unpack_from('!h', m, nul + 17)[0]}")
            elif kind not in "NSK":
                out.append(kind)
        return out


def describe(kind: bytes, name: str) -> bytes:
    return pack(Frontend.DESCRIBE, kind + name.encode() + b"\0")


def close(kind: bytes, name: str) -> bytes:
    return pack(Frontend.CLOSE, kind + name.encode() + b"\0")


def execute(portal: str, limit: int) -> bytes:
    return pack(Frontend.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", limit))


def bind(portal: str, statement: str, result_format: int) -> bytes:
    return pack(
        Frontend.BIND,
        portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhhh", 0, 0, 1, result_format),
    )


def portal_script(source: str) -> list[tuple[bytes, ...]]:
    """Batches of messages: DECLARE, then the portal described, executed in pieces, fetched, closed."""
    return [
        (Q("BEGIN"),),
        # psycopg 3's DECLARE: Parse/Bind/Describe/Execute of the unnamed statement, then Describe of the cursor
        (P("", f"DECLARE c CURSOR FOR SELECT * FROM {source} AS g"), B(), describe(b"P", ""), E(), S),
        (describe(b"P", "c"), S),
        (execute("c", 3), execute("c", 2), S),
        (Q("FETCH FORWARD 1 FROM c"),),
        (execute("c", 2), S),  # exactly the rows left: suspended, as the server cannot know it ended
        (execute("c", 2), execute("c", 0), S),
        (Q("MOVE 0 FROM c"), Q("FETCH 0 FROM c")),
        (close(b"P", "c"), S),
        (Q("FETCH 1 FROM c"),),  # closed: 34000 (the transaction is then aborted)
        (Q("ROLLBACK"), Q("BEGIN")),
        (Q(f"DECLARE c CURSOR FOR SELECT * FROM {source} AS g"),),
        (P("", "SELECT 1"), B("c", ""), S),  # a cursor is a portal: binding another portal of its name fails
        (Q("ROLLBACK"), Q("BEGIN")),
        (Q(f"DECLARE c CURSOR FOR SELECT {source} AS g"),),
        (P("f", "FETCH 4 FROM c"), bind("", "f", 1), describe(b"P", ""), execute("", 2), execute("", 2), S),
        (execute("", 2), S),  # a FETCH portal, like a cursor's: done once a run falls short of its limit
        (P("", "FETCH 3 FROM c"), B(), execute("", 2), execute("", 2), S),
        (P("", "MOVE 1 FROM c"), B(), E(), E(), S),  # a MOVE's portal runs once: 55000 the second time
        (Q("ROLLBACK"), Q("BEGIN")),
        (P("", f"DECLARE d CURSOR FOR SELECT {source}"), B(), E(), E(), S),  # so does a DECLARE's
        (Q("ROLLBACK"), Q("BEGIN")),
        (Q(f"DECLARE b BINARY CURSOR FOR SELECT * FROM {source} AS g"), Q("FETCH 1 FROM b")),
        (describe(b"P", "b"), execute("b", 1), S),  # the portal itself answers in text, as DECLARE made it
        (Q(f"DECLARE x CURSOR FOR SELECT * FROM {source} AS g"), Q("SELECT 1/0")),  # the transaction fails
        (close(b"P", "x"), describe(b"P", "x"), S),  # Close is accepted there; Describe is not (25P02)
        (Q("COMMIT"),),
        (Q(f"DECLARE h CURSOR WITH HOLD FOR SELECT * FROM {source} AS g"),),
        (describe(b"P", "h"), execute("h", 2), close(b"P", "h"), S),
        (Q("CLOSE h"),),
    ]


def run_script(port: int, script: list[tuple[bytes, ...]]) -> list[list[str]]:
    r = Tagged(port)
    answers = []
    for batch in script:
        r.send(*batch)
        answers.append(r.read_until_z(sum(m[:1] in (b"Q", b"S") for m in batch)))
    return answers


def test_cursor_portal_messages_as_the_server_answers(
    pg: Postgres, proxy: ProxyProcess, reference: list[list[str]]
) -> None:
    expected = run_script(pg.port, portal_script(SERIES))
    got = run_script(proxy.port, portal_script(STREAM))
    assert got == expected
    # What the server's answers show (and the proxy's therefore too): the DECLARE'd portal is described in
    # text format, read in pieces that end suspended when their limit is reached, then done with SELECT 0.
    assert expected[2] == ["T:g/0", "ZT"] and expected[3] == ["D", "D", "D", "s", "D", "D", "s", "ZT"], expected
    assert expected[6] == ["C:SELECT 0", "C:SELECT 0", "ZT"] and expected[16] == ["C:FETCH 0", "ZT"], expected


# --------------------------------------------------------------------------- #
# FETCH / MOVE in every direction, as PostgreSQL moves a portal
# --------------------------------------------------------------------------- #


MOVES = [
    "FETCH 0 FROM c", "MOVE 0 FROM c", "FETCH 2 FROM c", "MOVE 0 FROM c", "FETCH 0 FROM c", "FETCH RELATIVE 0 FROM c",
    "FETCH RELATIVE 2 FROM c", "FETCH BACKWARD 2 FROM c", "FETCH PRIOR FROM c", "FETCH PRIOR FROM c",
    "FETCH NEXT FROM c", "FETCH LAST FROM c", "FETCH ABSOLUTE -2 FROM c", "FETCH ABSOLUTE 3 FROM c",
    "FETCH ABSOLUTE 6 FROM c", "MOVE ABSOLUTE 0 FROM c", "FETCH FIRST FROM c", "MOVE FORWARD ALL FROM c",
    "FETCH 0 FROM c", "FETCH 1 FROM c", "MOVE BACKWARD ALL FROM c", "MOVE 3 FROM c", "FETCH -1 FROM c",
    "MOVE RELATIVE 10 FROM c", "FETCH BACKWARD ALL FROM c", "MOVE -1 FROM c", "FETCH FORWARD ALL FROM c",
    "FETCH ABSOLUTE 1 FROM c", "FETCH RELATIVE -1 FROM c", "MOVE 100 FROM c", "FETCH BACKWARD 1 FROM c",
]  # fmt: skip

DECLARES = {
    "from": "DECLARE c CURSOR FOR SELECT * FROM {} AS g",  # a function scan: scrollable by default
    "no-scroll": "DECLARE c NO SCROLL CURSOR FOR SELECT * FROM {} AS g",
    "select-list": "DECLARE c CURSOR FOR SELECT {} AS g",  # ProjectSet: forward only by default
    "scroll": "DECLARE c SCROLL CURSOR FOR SELECT {} AS g",
}


def replay(dsn: str, declare: str, rows: Any) -> list[tuple[str, list[Any]]]:
    """Each of MOVES' answer (tag or SQLSTATE, rows); after an error the transaction is begun again and the
    statements that succeeded are replayed, so every statement runs from the position it would have."""
    answers: list[tuple[str, list[Any]]] = []
    done: list[str] = []
    with psycopg.connect(dsn) as conn:
        conn.execute(declare)
        for statement in MOVES:
            try:
                cur = conn.execute(statement)
                fetched = [rows(r[0]) for r in cur.fetchall()] if cur.description else []
                answers.append((cur.statusmessage or "", fetched))
                done.append(statement)
            except psycopg.Error as exc:
                answers.append((exc.sqlstate or "", []))
                conn.rollback()
                conn.execute(declare)
                for again in done:
                    conn.execute(again)
    return answers


@pytest.mark.parametrize("kind", DECLARES)
def test_fetch_and_move_as_the_server_moves_a_portal(
    pg: Postgres, proxy: ProxyProcess, reference: list[list[str]], kind: str
) -> None:
    expected = replay(pg.dsn(), DECLARES[kind].format(SERIES), lambda n: reference[n - 1])
    got = replay(proxy.dsn(), DECLARES[kind].format(STREAM), lambda fragment: fragment)
    assert got == expected
    assert any(tag == "55000" for tag, _ in expected) == (kind in ("no-scroll", "select-list"))
