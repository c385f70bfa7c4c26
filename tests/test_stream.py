"""pgml.transform_stream through the proxy: the plain SELECT, and cursors (simple and extended protocol, as Korvus).

A tiny random-weight GPT-2 (tests/tiny_models.py) generates; tests check counts, shapes and order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.types.string import StrDumper

from proxy.wire import messages as pq
from proxy.wire.frames import Frontend, pack
from tests.conftest import Postgres, ProxyProcess
from tests.test_wire_pgml import B, E, P, Q, Raw, S
from tests.tiny_models import tiny_gpt2

TASK = '{"task": "text-generation", "model": "tiny-gpt2"}'


def args(tokens: int) -> str:
    return json.dumps({"max_new_tokens": tokens, "min_new_tokens": tokens})


@pytest.fixture(scope="module")
def gpt2(model_dir: Path) -> str:
    target = model_dir / "tiny-gpt2"
    if not target.exists():
        tiny_gpt2(target)
    return "tiny-gpt2"


@pytest.fixture
def conn(proxy: ProxyProcess, gpt2: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def fragments(rows: list[tuple[object, ...]]) -> list[list[str]]:
    out = []
    for (value,) in rows:
        assert isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)
        out.append(value)
    return out


def test_plain_select_streams_rows(conn: psycopg.Connection) -> None:
    cur = conn.execute("SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, 'the cat')", [TASK, args(5)])
    assert [d.name for d in cur.description or ()] == ["transform_stream"]
    assert cur.description is not None and cur.description[0].type_code == 3802
    rows = fragments(cur.fetchall())
    assert 2 <= len(rows) <= 7  # the prompt ("the ", "cat "), then one fragment per new token
    from_clause = conn.execute(f"SELECT * FROM pgml.transform_stream('{TASK}', '{args(3)}', 'the dog') AS s").fetchall()
    assert from_clause and conn.execute("SELECT 1").fetchone() == (1,)


def test_inside_a_larger_statement_all_rows_at_once(conn: psycopg.Connection) -> None:
    (count,) = conn.execute(
        f"SELECT count(*) FROM pgml.transform_stream('{TASK}', '{args(3)}', 'the dog') AS s"
    ).fetchone() or (0,)
    assert count >= 1


def test_cursor_simple_protocol(proxy: ProxyProcess, gpt2: str) -> None:
    with psycopg.connect(proxy.dsn()) as c:  # a transaction, as DECLARE needs
        c.execute(f"DECLARE c CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(8)}', 'the cat')")
        first = c.execute("FETCH 2 FROM c").fetchall()
        assert len(first) == 2
        rest = c.execute("FETCH ALL FROM c").fetchall()
        assert c.execute("FETCH 5 FROM c").fetchall() == []  # ended
        assert len(fragments(first + rest)) >= 2
        c.execute("CLOSE c")
        with pytest.raises(errors.InvalidCursorName):
            c.execute("FETCH 1 FROM c")  # the server's own answer: no such cursor
        c.rollback()
        c.execute(f"DECLARE d CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(4)}', 'the dog')")
        assert c.execute("MOVE 1 IN d").statusmessage == "MOVE 1"
        c.commit()  # COMMIT ends the cursor
        with pytest.raises(errors.InvalidCursorName):
            c.execute("FETCH 1 FROM d")


def test_declare_outside_a_transaction_fails(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.NoActiveSqlTransaction):
        conn.execute(f"DECLARE e CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(2)}', 'x')")


def _jsonb(value: str) -> bytes:
    return b"\x01" + value.encode()


def test_cursor_extended_protocol_like_korvus(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    r.send(Q("BEGIN"))
    assert r.read_until_z(1) == ["C", "ZT"]
    declare = "DECLARE k CURSOR FOR SELECT pgml.transform_stream(task => $1, input => $2, args => $3)"
    # sqlx: Parse + Describe statement + Sync, then Bind + Execute + Sync
    r.send(P("s1", declare, [3802, 25, 3802]), pack(Frontend.DESCRIBE, b"Ss1\0"), S)
    assert r.read_until_z(1) == ["1", "t", "n", "ZT"]
    bind = pack(
        Frontend.BIND,
        b"\0s1\0" + struct.pack("!h", 3) + struct.pack("!hhh", 1, 0, 1) + struct.pack("!h", 3)
        + struct.pack("!i", len(_jsonb(TASK))) + _jsonb(TASK)
        + struct.pack("!i", 7) + b"the cat"
        + struct.pack("!i", len(_jsonb(args(6)))) + _jsonb(args(6))
        + struct.pack("!h", 0),
    )  # fmt: skip
    r.send(bind, E(), S)
    assert r.read_until_z(1) == ["2", "C", "ZT"]
    r.send(P("s2", "FETCH 3 FROM k"), pack(Frontend.DESCRIBE, b"Ss2\0"), S)
    assert r.read_until_z(1) == ["1", "t", "T", "ZT"]
    r.send(B("", "s2"), E(), S)
    got = r.read_until_z(1)
    assert got[0] == "2" and got[-2:] == ["C", "ZT"] and 1 <= got.count("D") <= 3, got
    r.send(P("", "SELECT 42"), B(), E(), S)  # other statements keep going to the server
    assert r.read_until_z(1) == ["1", "2", "D", "C", "ZT"]
    r.send(P("s3", "CLOSE k"), B("", "s3"), E(), S, Q("COMMIT"))
    assert r.read_until_z(2) == ["1", "2", "C", "ZT", "C", "ZI"]


def test_plain_select_first_row_arrives_before_generation_ends(proxy: ProxyProcess, gpt2: str) -> None:
    import time

    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute(f"SELECT pgml.transform_stream('{TASK}', '{args(2)}', 'warm')").fetchall()  # model loaded
        started = time.monotonic()
        arrivals = [time.monotonic() for _ in c.cursor().stream(
            f"SELECT pgml.transform_stream('{TASK}', '{args(300)}', 'the cat')")]  # fmt: skip
    assert len(arrivals) > 100
    first, last = arrivals[0] - started, arrivals[-1] - started
    assert first < last / 3, (first, last)  # rows come while the model generates, not all at the end


async def test_asyncpg_cursor_with_parameters(proxy: ProxyProcess, gpt2: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(proxy.dsn())
    try:
        async with conn.transaction():
            await conn.execute(
                "DECLARE c CURSOR FOR SELECT pgml.transform_stream(task => $1::jsonb, input => $2, args => $3::jsonb)",
                TASK, "the cat", args(5),
            )  # fmt: skip
            first = await conn.fetch("FETCH 2 FROM c")
            rest = await conn.fetch("FETCH ALL FROM c")
            assert len(first) == 2 and len(first) + len(rest) == 7  # the prompt (2 words), then one per new token
            assert all(isinstance(json.loads(r[0]), list) for r in first + rest)
            assert await conn.fetch("FETCH 1 FROM c") == []
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("end", ["CLOSE c", "ROLLBACK", "COMMIT"])
def test_ending_mid_stream(proxy: ProxyProcess, gpt2: str, end: str) -> None:
    with psycopg.connect(proxy.dsn()) as c:
        c.execute(f"DECLARE c CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(2000)}', 'the cat')")
        assert len(c.execute("FETCH 3 FROM c").fetchall()) == 3
        c.execute(end)
        c.rollback()
        assert c.execute("SELECT 1").fetchone() == (1,)
        c.rollback()


def test_cancel_mid_stream(proxy: ProxyProcess, gpt2: str) -> None:
    import threading
    import time

    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        timer = threading.Timer(1.0, c.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            c.execute(f"SELECT pgml.transform_stream('{TASK}', '{args(8000)}', 'the cat')").fetchall()
        timer.join()
        assert time.monotonic() - started < 30
        assert c.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- #
# Regressions from a protocol review (each compared with what PostgreSQL answers)
# --------------------------------------------------------------------------- #


def _declare(r: Raw, name: str = "c", tokens: int = 20) -> None:
    declare = f"DECLARE {name} CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(tokens)}', 'the cat')"
    r.send(Q("BEGIN"), Q(declare))
    assert r.read_until_z(2) == ["C", "ZT", "C", "ZT"]


@pytest.mark.parametrize("end", ["rollback-after-error", "extended-commit", "commit-in-multi"])
def test_transaction_end_closes_proxy_cursors(proxy: ProxyProcess, gpt2: str, end: str) -> None:
    r = Raw(proxy.port)
    _declare(r)
    if end == "rollback-after-error":
        r.send(Q("SELECT 1/0"))
        assert r.read_until_z(1)[-1] == "ZE"
        r.send(Q("ROLLBACK"))
    elif end == "extended-commit":
        r.send(P("", "COMMIT"), B(), E(), S)
    else:
        r.send(Q("COMMIT; SELECT 1"))
    assert r.read_until_z(1)[-1] == "ZI"
    r.send(Q("BEGIN; FETCH 1 FROM c"))
    got = r.read_until_z(1)
    assert got[1].startswith("E:34000") and got[-1] == "ZE", got  # gone, as on the server
    r.send(Q("ROLLBACK"))
    r.read_until_z(1)
    _declare(r)  # the name is free again


def test_backward_fetch_prepared_is_an_error_not_a_disconnect(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    _declare(r)
    r.send(P("", "FETCH BACKWARD 1 FROM c"), B(), E(), S)
    got = r.read_until_z(1)
    assert got[:2] == ["1", "2"] and got[2].startswith("E:55000") and got[-1] == "ZE", got  # fails at Execute
    r.send(Q("ROLLBACK"), Q("SELECT 1"))
    assert r.read_until_z(2) == ["C", "ZI", "T", "D", "C", "ZI"]


def test_zero_and_negative_fetch_counts_are_refused(conn: psycopg.Connection) -> None:
    conn.execute("BEGIN")
    conn.execute(f"DECLARE c CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(3)}', 'the')")
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        conn.execute("FETCH -1 FROM c")
    conn.execute("ROLLBACK")


def test_failed_own_message_then_lone_sync_does_not_block_next_batch(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    _declare(r, "d")
    declare_again = f"DECLARE d CURSOR FOR SELECT pgml.transform_stream('{TASK}', '{args(2)}', 'the')"
    r.send(P("", declare_again), B(), E(), pq.Flush().encode(), S)
    got = r.read_until_z(1)
    assert got[-2].startswith("E:42P03") and got[-1] == "ZE", got
    r.send(Q("ROLLBACK"))
    r.read_until_z(1)
    _declare(r, "d")
    r.send(P("", "FETCH 2 FROM d"), B(), E(), S)
    assert r.read_until_z(1) == ["1", "2", "D", "D", "C", "ZT"]


def test_prepared_fetch_in_an_aborted_transaction(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    _declare(r)
    r.send(Q("SELECT 1/0"))
    r.read_until_z(1)
    r.send(P("", "FETCH 2 FROM c"), B(), E(), S)
    got = r.read_until_z(1)
    assert got[0].startswith("E:25P02") and got[-1] == "ZE", got


def test_normal_declare_cannot_shadow_a_proxy_cursor(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    _declare(r)
    r.send(Q("DECLARE c CURSOR FOR SELECT 42"))
    got = r.read_until_z(1)
    assert got[0].startswith("E:42P03") and got[-1] == "ZE", got


def test_barrier_statements_do_not_pile_up(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    _declare(r, "c", 200)
    for _ in range(10):
        r.send(P("", "SELECT 1"), B(), E(), P("", "FETCH 1 FROM c"), B(), E(), S)
        r.read_until_z(1)
    r.send(Q("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgml_proxy_barrier%'"))
    got = r.read_until_z(1)
    assert got[:2] == ["T", "D"], got
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_cursor_over_streaming_select_respects_fetch_sizes(proxy: ProxyProcess, gpt2: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(proxy.dsn())
    try:
        async with conn.transaction():
            cursor = await conn.cursor(
                "SELECT pgml.transform_stream(task => $1::jsonb, input => $2, args => $3::jsonb)",
                TASK, "the cat", args(6),
            )  # fmt: skip
            first = await cursor.fetch(2)
            second = await cursor.fetch(3)
            rest = await cursor.fetch(100)
            assert (len(first), len(second), len(first) + len(second) + len(rest)) == (2, 3, 8)
    finally:
        await conn.close()


def test_execute_row_limit_suspends_the_portal(proxy: ProxyProcess, gpt2: str) -> None:
    r = Raw(proxy.port)
    r.send(Q("BEGIN"))
    r.read_until_z(1)
    select = f"SELECT pgml.transform_stream('{TASK}', '{args(4)}', 'the cat')"
    limited = pack(Frontend.EXECUTE, b"\0" + struct.pack("!i", 2))
    r.send(P("", select), B(), limited, limited, limited, limited, S)
    got = r.read_until_z(1)
    assert got == ["1", "2", "D", "D", "s", "D", "D", "s", "D", "D", "s", "C", "ZT"], got
    r.send(Q("ROLLBACK"))
    r.read_until_z(1)


# --------------------------------------------------------------------------- #
# Bound parameter types: pgjdbc binds Java Strings as varchar (issue 10, item 5)
# --------------------------------------------------------------------------- #


class Varchar(StrDumper):
    """Python str bound as varchar (OID 1043), as pgjdbc binds setString by default."""

    oid = psycopg.adapters.types["varchar"].oid


@pytest.fixture
def varchar_conn(proxy: ProxyProcess, gpt2: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        connection.adapters.register_dumper(str, Varchar)
        yield connection


CAST_FORMS = {
    "select-list": "SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)",
    "from": "SELECT * FROM pgml.transform_stream(%s::jsonb, %s::jsonb, %s) AS s",
    "named": "SELECT pgml.transform_stream(task => %s::jsonb, input => %s, args => %s::jsonb)",
}


@pytest.mark.parametrize("form", CAST_FORMS)
def test_varchar_parameters_cast_to_jsonb(varchar_conn: psycopg.Connection, form: str) -> None:
    values = [TASK, "the cat", args(4)] if form == "named" else [TASK, args(4), "the cat"]
    expected = varchar_conn.execute(f"SELECT * FROM pgml.transform_stream('{TASK}', '{args(4)}', 'the cat')").fetchall()
    assert len(expected) == 6
    assert varchar_conn.execute(CAST_FORMS[form], values).fetchall() == expected
    with varchar_conn.transaction(), varchar_conn.cursor(name="c") as cur:  # DECLARE … $1::jsonb with varchar types
        cur.execute(CAST_FORMS[form], values)
        assert cur.fetchmany(2) + cur.fetchall() == expected


def test_varchar_parameters_parse_and_describe_as_the_server(proxy: ProxyProcess, pg: Postgres, gpt2: str) -> None:
    declare = "DECLARE k CURSOR FOR SELECT pgml.transform_stream($1::jsonb, $2::jsonb, $3)"
    answers = {}
    for port in (pg.port, proxy.port):  # the proxy installed the schema (stubs) in this database already
        r = Raw(port)
        r.send(Q("BEGIN"), P("s", declare, [1043, 1043, 1043]), pack(Frontend.DESCRIBE, b"Ss\0"), S)
        answers[port] = r.read_until_z(2), r.seen[-3]  # ParameterDescription: the server's types
    assert answers[proxy.port] == answers[pg.port]
    assert answers[pg.port][0] == ["C", "ZT", "1", "t", "n", "ZT"]
    r = Raw(proxy.port)
    r.send(Q("BEGIN"), P("s", declare, [1043, 1043, 1043]), S)
    r.read_until_z(2)
    values = [TASK.encode(), args(5).encode(), b"the cat"]
    r.send(B("", "s", values), E(), S, Q("FETCH ALL FROM k"))
    got = r.read_until_z(2)
    assert got[:3] == ["2", "C", "ZT"] and got[3] == "T" and got.count("D") == 7 and got[-2:] == ["C", "ZT"], got


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pgml.transform_stream(%s, %s, %s)",  # varchar where jsonb is wanted: no implicit cast exists
        "SELECT * FROM pgml.transform_stream(%s::jsonb, %s::jsonb, %s::int)",
    ],
)
def test_parameters_no_overload_accepts_fail_as_on_the_server(
    varchar_conn: psycopg.Connection, pg: Postgres, sql: str
) -> None:
    varchar_conn.execute("SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)", [TASK, args(1), "x"]).fetchall()
    values = [TASK, args(2), 3] if "int" in sql else [TASK, args(2), "the cat"]
    errors_seen = []
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.adapters.register_dumper(str, Varchar)
        for c in (direct, varchar_conn):
            with pytest.raises(errors.UndefinedFunction) as caught:
                c.execute(sql, values)
            errors_seen.append((caught.value.diag.message_primary, caught.value.diag.message_hint))
            with pytest.raises(errors.UndefinedFunction), c.transaction(), c.cursor(name="c") as cur:
                cur.execute(sql, values)  # DECLARE: the same error, at its Parse
    assert errors_seen[0] == errors_seen[1]
    assert varchar_conn.execute("SELECT 1").fetchone() == (1,)


def test_varchar_parameter_that_is_not_json(varchar_conn: psycopg.Connection, pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.adapters.register_dumper(str, Varchar)
        with pytest.raises(errors.InvalidTextRepresentation):
            direct.execute("SELECT %s::jsonb", ["{not json"])
    with pytest.raises(errors.InvalidTextRepresentation):
        varchar_conn.execute("SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)", [TASK, "{not json", "x"])
    assert varchar_conn.execute("SELECT 1").fetchone() == (1,)


def test_other_bound_types_cast_as_the_server_casts(conn: psycopg.Connection) -> None:
    literal = conn.execute(f"SELECT * FROM pgml.transform_stream('{TASK}', '{args(2)}', '42')").fetchall()
    bound = conn.execute("SELECT * FROM pgml.transform_stream(%s::jsonb, %s::jsonb, %s::text)", [TASK, args(2), 42])
    assert bound.fetchall() == literal  # an integer parameter cast to text: its text
    as_text = conn.execute(
        "SELECT * FROM pgml.transform_stream(%s::text::jsonb, %s::jsonb, %s)", [TASK, args(2), "42"]
    ).fetchall()
    assert as_text == literal


def test_varchar_parameters_in_other_pgml_calls(varchar_conn: psycopg.Connection) -> None:
    constant = f"SELECT pgml.transform('{TASK}'::jsonb, '{args(2)}'::jsonb, ARRAY['the cat', 'a dog'])"
    expected = varchar_conn.execute(constant).fetchone()
    bound = varchar_conn.execute(  # varchar cast to jsonb, varchar[] for inputs (to text[]: an implicit cast)
        "SELECT pgml.transform(%s::jsonb, %s::jsonb, %s)", [TASK, args(2), ["the cat", "a dog"]]
    )
    assert bound.fetchone() == expected and expected is not None
