"""Bad input never ends a session: invalid UTF-8, deep JSON, huge values, odd arguments (issue 9, section 4).

Each input is sent as real clients send it (psycopg text parameters, asyncpg binary parameters,
raw protocol frames) and, where the server has an answer of its own for the same bytes, compared
with a direct connection. Every answer must be an ErrorResponse with a real SQLSTATE — never
XX000 — and the session must go on: a following ``SELECT 1`` works, and inside ``BEGIN`` the
transaction is aborted as for any server error.

The seeded fuzz at the end throws random ``pgml.*`` statements (argument values, types, NULLs,
named arguments, casts, huge or odd numbers, odd Unicode, odd JSON) at the proxy in the simple
and the extended protocol and holds it to the same rules.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.adapt import Dumper

from engine.api import InvalidArgument, InvalidTextRepresentation, signatures
from engine.pg import scalars
from engine.pg.text import parse_array
from proxy.wire import messages as pq
from proxy.wire.frames import Frame, Frontend, StartupMessage, encode_startup, pack
from tests.conftest import MINILM, Postgres, ProxyProcess

pytestmark = pytest.mark.pg_matrix

# --------------------------------------------------------------------------- #
# A raw protocol client (also used by test_protocol_fuzz and test_log_secrets)
# --------------------------------------------------------------------------- #

Message = tuple[str, bytes]


def query(sql: str | bytes) -> bytes:
    return pack(Frontend.QUERY, (sql.encode() if isinstance(sql, str) else sql) + b"\0")


def parse(sql: str | bytes, name: str = "", oids: Sequence[int] = ()) -> bytes:
    text = sql.encode() if isinstance(sql, str) else sql
    return pack(Frontend.PARSE, name.encode() + b"\0" + text + b"\0" + struct.pack(f"!h{len(oids)}I", len(oids), *oids))


def bind(
    params: Sequence[bytes | None] = (),
    *,
    statement: str = "",
    portal: str = "",
    formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    parts = [
        portal.encode() + b"\0",
        statement.encode() + b"\0",
        struct.pack(f"!h{len(formats)}h", len(formats), *formats),
    ]
    parts.append(struct.pack("!h", len(params)))
    for value in params:
        parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    parts.append(struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats))
    return pack(Frontend.BIND, b"".join(parts))


def describe(name: str = "", kind: bytes = b"P") -> bytes:
    return pack(Frontend.DESCRIBE, kind + name.encode() + b"\0")


def execute(portal: str = "", limit: int = 0) -> bytes:
    return pack(Frontend.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", limit))


SYNC = pack(Frontend.SYNC, b"")
FLUSH = pack(Frontend.FLUSH, b"")
TERMINATE = pack(Frontend.TERMINATE, b"")


def startup_packet(user: str = "postgres", database: str = "postgres") -> bytes:
    return encode_startup(StartupMessage(3, 0, (("user", user), ("database", database))))


class Wire:
    """One raw connection: frames out, typed messages in."""

    def __init__(self, port: int, *, user: str = "postgres", timeout: float = 60, start: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if start:
            self.sock.sendall(startup_packet(user))
            self.until_ready()

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def message(self) -> Message:
        """The next message (EOFError once the proxy closed the connection)."""
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!i", self.buf, 1)
                if len(self.buf) >= length + 1:
                    raw, self.buf = self.buf[: length + 1], self.buf[length + 1 :]
                    return chr(raw[0]), raw
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("connection closed")
            self.buf += data

    def until_ready(self, count: int = 1) -> list[Message]:
        """Messages up to and including the ``count``-th ReadyForQuery."""
        out: list[Message] = []
        while count:
            kind, raw = self.message()
            out.append((kind, raw))
            count -= kind == "Z"
        return out

    def until_closed(self) -> list[Message]:
        out: list[Message] = []
        try:
            while True:
                out.append(self.message())
        except (EOFError, TimeoutError, OSError):
            return out

    def close(self) -> None:
        self.sock.close()


def fields(raw: bytes) -> dict[str, str]:
    return dict(pq.ErrorResponse.decode(Frame(raw[0], raw)).fields)


def codes(messages: Sequence[Message]) -> list[str]:
    """SQLSTATEs of the ErrorResponses among ``messages``."""
    return [fields(raw)["C"] for kind, raw in messages if kind == "E"]


def status(messages: Sequence[Message]) -> str:
    """The transaction status of the last ReadyForQuery."""
    return chr([raw for kind, raw in messages if kind == "Z"][-1][5])


def select_one(wire: Wire) -> None:
    """The session is usable: SELECT 1 answers 1 (simple protocol)."""
    wire.send(query("SELECT 1"))
    got = wire.until_ready()
    assert codes(got) == [] and [kind for kind, _ in got] == ["T", "D", "C", "Z"], got


# --------------------------------------------------------------------------- #
# Clients that send bytes as a text parameter
# --------------------------------------------------------------------------- #


class RawText(bytes):
    """Bytes psycopg sends as they are, as a text-format parameter of type text."""


class RawTextDumper(Dumper):
    oid = 25

    def dump(self, obj: Any) -> bytes:
        return bytes(obj)


def connect(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.adapters.register_dumper(RawText, RawTextDumper)
    return conn


def sqlstate(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> str | None:
    """The statement's SQLSTATE (None: it succeeded)."""
    try:
        conn.execute(sql, params).fetchall()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def assert_usable(conn: psycopg.Connection[Any]) -> None:
    assert conn.execute("SELECT 1").fetchone() == (1,)


def assert_aborts_transaction(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any], code: str) -> None:
    """Inside BEGIN the failed call aborts the transaction, as a server error does; ROLLBACK recovers."""
    conn.execute("BEGIN")
    assert sqlstate(conn, sql, params) == code
    assert sqlstate(conn, "SELECT 1") == "25P02"
    conn.execute("ROLLBACK")
    assert_usable(conn)


EMBED = "SELECT pgml.embed(%s, %s)"
EMBED_KWARGS = "SELECT pgml.embed(%s, 'x', %s::jsonb)"

# --------------------------------------------------------------------------- #
# Invalid UTF-8 -> 22021
# --------------------------------------------------------------------------- #

BAD_UTF8 = [b"ab\xffcd", b"\xc3\x28", b"\xe2\x82", b"ok \xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80"]


@pytest.mark.parametrize("data", BAD_UTF8, ids=["ff", "c3-28", "truncated", "surrogate", "beyond-10ffff"])
def test_invalid_utf8_text_parameter_psycopg(proxy: ProxyProcess, pg: Postgres, data: bytes) -> None:
    with connect(pg.dsn()) as direct:
        assert sqlstate(direct, "SELECT length(%s)", [RawText(data)]) == "22021"  # the server's own answer
    with connect(proxy.dsn()) as conn:
        assert sqlstate(conn, EMBED, [MINILM, RawText(data)]) == "22021"
        assert_usable(conn)
        assert sqlstate(conn, "SELECT * FROM pgml.chunk('character', %s)", [RawText(data)]) == "22021"
        assert_usable(conn)
        assert_aborts_transaction(conn, EMBED, [MINILM, RawText(data)], "22021")


async def test_invalid_utf8_binary_parameter_asyncpg(proxy: ProxyProcess, pg: Postgres) -> None:
    async def raw_text(dsn: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn)
        await conn.set_type_codec("text", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary")
        return conn

    direct = await raw_text(pg.dsn())
    try:
        with pytest.raises(asyncpg.CharacterNotInRepertoireError):
            await direct.fetchval("SELECT length($1::text)", b"ab\xffcd")
    finally:
        await direct.close()
    conn = await raw_text(proxy.dsn())
    try:
        for statement in ("SELECT pgml.embed($1, $2::text)", "SELECT count(*) FROM pgml.chunk($1, $2::text)"):
            first = MINILM if "embed" in statement else "character"
            with pytest.raises(asyncpg.CharacterNotInRepertoireError, match="0xff"):
                await conn.fetchval(statement, first.encode(), b"ab\xffcd")
            assert await conn.fetchval("SELECT 1") == 1
        async with conn.transaction():  # asyncpg rolls back on the error
            with pytest.raises(asyncpg.CharacterNotInRepertoireError):
                await conn.fetchval("SELECT pgml.embed($1, $2::text)", MINILM.encode(), b"\xff")
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("data", "binary"),
    [(b"ab\xffcd", False), (b"ab\xffcd", True), (b"nul\x00byte", False), (b"nul\x00byte", True)],
    ids=["text-ff", "binary-ff", "text-nul", "binary-nul"],
)
def test_invalid_utf8_raw_bind(proxy: ProxyProcess, pg: Postgres, data: bytes, binary: bool) -> None:
    """A well-formed Bind with such bytes is a statement error (the server's 22021), not a frame error."""
    formats = [1] if binary else [0]
    direct = Wire(pg.port)
    direct.send(parse("SELECT length($1::text)", oids=[25]), bind([data], formats=formats), execute(), SYNC)
    assert codes(direct.until_ready()) == ["22021"]
    direct.close()
    wire = Wire(proxy.port)
    wire.send(
        parse("SELECT * FROM pgml.chunk('character', $1)", oids=[25]), bind([data], formats=formats), execute(), SYNC
    )
    got = wire.until_ready()
    assert codes(got) == ["22021"] and status(got) == "I", got
    select_one(wire)
    wire.send(query("BEGIN"), parse("SELECT pgml.embed($1, $2)", "s", [25, 25]), SYNC)
    wire.until_ready(2)
    wire.send(bind([MINILM.encode(), data], statement="s", formats=formats), execute(), SYNC)
    got = wire.until_ready()
    assert codes(got) == ["22021"] and status(got) == "E", got
    wire.send(query("ROLLBACK"))
    wire.until_ready()
    select_one(wire)
    wire.close()


def test_invalid_utf8_bind_of_a_streaming_statement(proxy: ProxyProcess) -> None:
    """A prepared ``transform_stream`` SELECT is the proxy's own statement: its Bind is decoded here too."""
    wire = Wire(proxy.port)
    wire.send(parse("SELECT pgml.transform_stream($1::jsonb, $2::jsonb, $3::text)", "st"), SYNC)
    assert codes(wire.until_ready()) == []
    wire.send(bind([b"{}", b"{}", b"caf\xe9"], statement="st"), execute(), SYNC)
    got = wire.until_ready()
    assert codes(got) == ["22021"] and status(got) == "I", got
    select_one(wire)
    wire.close()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_invalid_utf8_statement_text(proxy: ProxyProcess, pg: Postgres, protocol: str) -> None:
    """A pgml statement whose own text is not UTF-8 gets the server's answer; the session goes on."""
    sql = b"SELECT pgml.embed('" + MINILM.encode() + b"', 'caf\xe9')"
    frames = [query(sql)] if protocol == "simple" else [parse(sql), bind(), execute(), SYNC]
    answers = []
    for port in (pg.port, proxy.port):
        wire = Wire(port)
        wire.send(*frames)
        answers.append(codes(wire.until_ready()))
        select_one(wire)
        wire.close()
    assert answers == [["22021"], ["22021"]]


# --------------------------------------------------------------------------- #
# Deep JSON -> 54001
# --------------------------------------------------------------------------- #


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [scalars.MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deep_json_kwargs(proxy: ProxyProcess, pg: Postgres, depth: int) -> None:
    deep = nested(depth)
    with connect(pg.dsn()) as direct:
        # The server's own limit is its stack: it takes 1,000 levels and refuses 100,000 with 54001.
        assert sqlstate(direct, "SELECT %s::jsonb IS NULL", [deep]) == ("54001" if depth > 10_000 else None)
    with connect(proxy.dsn()) as conn:
        assert sqlstate(conn, EMBED_KWARGS, [MINILM, deep]) == "54001"  # bound parameter (extended)
        assert_usable(conn)
        assert_aborts_transaction(conn, EMBED_KWARGS, [MINILM, deep], "54001")
    wire = Wire(proxy.port)
    wire.send(query(f"SELECT pgml.embed('{MINILM}', 'x', '{deep}'::jsonb)"))  # literal (simple protocol)
    assert codes(wire.until_ready()) == ["54001"]
    select_one(wire)
    wire.send(query(f"SELECT * FROM pgml.chunk('character', 'a b', kwargs => '{{\"x\": {deep}}}')"))
    assert codes(wire.until_ready()) == ["54001"]
    select_one(wire)
    wire.close()


def test_json_within_the_depth_limit_is_read(proxy: ProxyProcess) -> None:
    """At the limit the value is read and handed on: the splitter itself refuses the unknown argument."""
    with connect(proxy.dsn()) as conn:
        kwargs = json.dumps({"unused": json.loads(nested(scalars.MAX_JSON_DEPTH - 1))})
        assert sqlstate(conn, "SELECT * FROM pgml.chunk('character', 'a b', %s::jsonb)", [kwargs]) == "22023"
        too_deep = json.dumps({"unused": json.loads(nested(scalars.MAX_JSON_DEPTH))})
        assert sqlstate(conn, "SELECT * FROM pgml.chunk('character', 'a b', %s::jsonb)", [too_deep]) == "54001"


async def test_deep_json_binary_jsonb_asyncpg(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=str, decoder=str, format="text")
        with pytest.raises(asyncpg.StatementTooComplexError):
            await conn.fetchval("SELECT pgml.embed($1, 'x', $2::jsonb)", MINILM, nested(1000))
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def test_deep_expression_tree(proxy: ProxyProcess, pg: Postgres) -> None:
    """An argument expression nested deeper than Python walks: 54001 like the server's stack limit."""
    text = "'x'" + " || 'y'" * 1500
    with connect(pg.dsn()) as direct:
        assert sqlstate(direct, f"SELECT length({text})") is None
    wire = Wire(proxy.port)
    wire.send(query(f"BEGIN; SELECT pgml.embed('{MINILM}', {text})"))
    got = wire.until_ready()
    assert codes(got) == ["54001"] and status(got) == "E", got  # BEGIN ran, the transaction is aborted
    wire.send(query("ROLLBACK"))
    wire.until_ready()
    select_one(wire)
    wire.close()


# --------------------------------------------------------------------------- #
# Huge inputs -> 54000
# --------------------------------------------------------------------------- #


def test_huge_text_parameter(proxy: ProxyProcess) -> None:
    huge = "x" * (scalars.MAX_VALUE_LENGTH + 1)
    with connect(proxy.dsn()) as conn:
        assert sqlstate(conn, EMBED, [MINILM, huge]) == "54000"
        assert_usable(conn)
        assert sqlstate(conn, "SELECT * FROM pgml.chunk('character', %s)", [huge]) == "54000"
        assert_usable(conn)


def test_huge_arrays(proxy: ProxyProcess) -> None:
    many = scalars.MAX_ARRAY_ELEMENTS + 1
    with connect(proxy.dsn()) as conn:
        assert sqlstate(conn, "SELECT pgml.embed(%s, %s::text[])", [MINILM, ["x"] * many]) == "54000"
        assert_usable(conn)
        assert sqlstate(conn, "SELECT pgml.predict('nope', %s::real[])", [[1.0] * many]) == "54000"
        assert_usable(conn)
        assert sqlstate(conn, EMBED_KWARGS, [MINILM, json.dumps({"a": [0] * many})]) == "54000"
        assert_usable(conn)
        assert_aborts_transaction(conn, "SELECT pgml.embed(%s, %s::text[])", [MINILM, ["y"] * many], "54000")
    wire = Wire(proxy.port)  # a binary array header that claims 2**30 elements in a few bytes
    header = struct.pack("!iiIii", 1, 0, 700, 1 << 30, 1) + struct.pack("!if", 4, 1.0)
    wire.send(parse("SELECT pgml.predict('nope', $1)", oids=[1021]), bind([header], formats=[1]), execute(), SYNC)
    assert codes(wire.until_ready()) == ["54000"]
    select_one(wire)
    wire.close()


def test_huge_array_literal_in_sql(proxy: ProxyProcess) -> None:
    """A literal ARRAY of more elements than the limit is refused before pglast builds its tree."""
    many = ",".join(["1"] * (scalars.MAX_ARRAY_ELEMENTS + 1))
    wire = Wire(proxy.port)
    wire.send(query(f"BEGIN; SELECT pgml.predict('nope', ARRAY[{many}])"))
    got = wire.until_ready()
    assert codes(got) == ["54000"] and status(got) == "E", got
    wire.send(query("ROLLBACK"))
    wire.until_ready()
    select_one(wire)
    wire.close()


def test_long_statements_are_rewritten(proxy: ProxyProcess) -> None:
    """Statements long enough to be parsed off the event loop give the same answers."""
    text = ("word " * 100 + "\n\n") * 400  # 200 kB: beyond rewrite.THREAD_PARSE_CHARS
    with connect(proxy.dsn()) as conn:
        rows = conn.execute(f"SELECT count(*) FROM pgml.chunk('character', '{text}')").fetchall()
        assert rows == conn.execute("SELECT count(*) FROM pgml.chunk('character', %s)", [text]).fetchall()
        assert rows[0][0] > 1
        assert sqlstate(conn, f"SELECT pgml.embed('no/such/model', '{text}')") == "42704"
        assert_usable(conn)


# --------------------------------------------------------------------------- #
# Odd values with their own SQLSTATEs
# --------------------------------------------------------------------------- #

ODD_VALUES = [
    ("SELECT pgml.embed(%s, 'x', %s::jsonb)", [MINILM, '{"a": NaN}'], "22P02"),
    ("SELECT pgml.embed(%s, 'x', %s::jsonb)", [MINILM, '{"a": "\\u0000"}'], "22P05"),
    ("SELECT pgml.embed(%s, 'x', %s::jsonb)", [MINILM, '{"a": "\\ud800"}'], "22P02"),
    ("SELECT pgml.embed(%s, 'x', %s::jsonb)", [MINILM, '{"a": 1e400}'], "22003"),
    ("SELECT pgml.embed(%s, 'x', %s::jsonb)", [MINILM, '{"a": ' + "9" * 5000 + "}"], "22003"),
    ("SELECT pgml.predict(%s::bigint, ARRAY[1.0])", ["99999999999999999999"], "22003"),
    ("SELECT pgml.predict('p', %s::real[])", ["{1,abc}"], "22P02"),
    ("SELECT pgml.predict('p', %s::bigint[])", ["{1,99999999999999999999}"], "22003"),
    ("SELECT * FROM pgml.load_dataset('x', \"limit\" => %s::bigint)", ["1.5"], "22P02"),
]


@pytest.mark.parametrize(("sql", "params", "code"), ODD_VALUES, ids=lambda v: str(v)[:24])
def test_odd_values(proxy: ProxyProcess, pg: Postgres, sql: str, params: list[Any], code: str) -> None:
    with connect(pg.dsn()) as direct:  # the server refuses the same value with the same code
        value = params[-1]
        cast = sql.rsplit("%s", 1)[1].split(")")[0]
        if code != "22003" or "jsonb" not in cast:  # jsonb's numeric holds 1e400; the proxy's float does not
            assert sqlstate(direct, f"SELECT %s{cast}", [value]) == code
    with connect(proxy.dsn()) as conn:
        assert sqlstate(conn, sql, params) == code
        assert_usable(conn)


# --------------------------------------------------------------------------- #
# Seeded fuzz over pgml statements (simple and extended protocol)
# --------------------------------------------------------------------------- #

# Functions whose errors come quickly (no training on real tables, no hub downloads: those are offline).
FUNCTIONS = ["embed", "chunk", "transform", "rank", "predict", "predict_proba", "predict_joint", "predict_batch",
             "decompose", "deploy", "load_dataset", "train", "snapshot", "generate", "version", "tune"]  # fmt: skip
CASTS = ["text", "jsonb", "json", "real[]", "text[]", "bigint", "integer", "real", "boolean", "jsonb[]", "numeric"]
ODD_TEXT = [
    "", " ", "x", "character", "recursive_character", "markdown", MINILM, "no/such/model", "../../etc", "/etc/passwd",
    "é漢字🙂", "\u200b\u202e", "\ufeff", "a'b", 'a"b', "a\\b", "$1", "NULL", "{}", "[]", "{a,b}", "\t\n\r", "x" * 5000,
    "'; DROP TABLE t; --", "text-classification", "summarization", "regression", "linear", "best_score", "pg_class",
]  # fmt: skip
ODD_NUMBERS = [
    "0", "-1", "1", "0.25", "1e400", "-1e400", "NaN", "Infinity", "99999999999999999999", "9" * 400, "1_000",
    "2147483648", "-9223372036854775809", "0x10", "1.5e-400", "00000000000000000000001", " 7 ", "", "1.",
]  # fmt: skip
TYPE_OIDS = {"text": 25, "jsonb": 3802, "text[]": 1009, "real[]": 1021, "bigint": 20, "real": 700, "boolean": 16,
             "jsonb[]": 3807, "double precision[]": 1022, "bigint[]": 1016, "double precision": 701}  # fmt: skip


class Fuzz:
    """Random pgml statements from one seeded generator, mostly shaped like the catalogue's signatures."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def json_value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 3 or r < 0.35:
            return self.rng.choice([None, True, 0, -1, 1.5, 1e300, "x", "é漢字🙂", "\\u0000", "", 2**70, MINILM])
        if r < 0.6:
            return [self.json_value(depth + 1) for _ in range(self.rng.randrange(4))]
        keys = ["a", "batch_size", "device", "", "normalize", "model", "task", "data_files", "cache_dir", "role"]
        return {self.rng.choice(keys): self.json_value(depth + 1) for _ in range(self.rng.randrange(3))}

    def json_text(self) -> str:
        if self.rng.random() < 0.6:
            return json.dumps(self.json_value(), ensure_ascii=self.rng.random() < 0.5)
        return self.rng.choice(
            ['{"a":', "[1,2", "NaN", '{"a": Infinity}', '"\\ud800"', '"\\u0000"', "{'a': 1}", "[" * 300 + "]" * 300,
             "1e400", '{"a":1,"a":2}', "", " ", "null", "[" + ",".join(["0"] * 2000) + "]", '{"device": "cuda:99"}',
             '{"task": "text-classification", "model": "no/such"}', '{"batch_size": -1}',
             '{"data_files": "/etc/hosts"}',
             '{"role": "user", "content": "hi"}', "9" * 5000, '{"a": 1e-400}', '"x"', "[]", "{}"]
        )  # fmt: skip

    def text(self) -> str:
        if self.rng.random() < 0.8:
            return self.rng.choice(ODD_TEXT)
        points = [self.rng.choice([self.rng.randrange(32, 127), self.rng.randrange(0xA0, 0xD7FF), 0x1F600])]
        return "".join(chr(p) for p in points * self.rng.randrange(1, 20))

    def array_text(self, element: str = "") -> str:
        kind = self.rng.random()
        if kind < 0.4 or element in ("real", "bigint", "double precision"):
            items = [self.rng.choice([*ODD_NUMBERS, "NULL", '"1"', " 2 ", "3"]) for _ in range(self.rng.randrange(6))]
        elif kind < 0.8:
            texts = [self.json_text() if element == "jsonb" else self.text() for _ in range(self.rng.randrange(4))]
            items = ['"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in texts]
        else:
            return self.rng.choice(
                ["{", "}", "{{1,2},{3,4}}", "{1,{2}}", "[1:2]={1,2}", "{a,,b}", '{"a}', "{,}", "x", "{}"]
            )
        return "{" + ",".join(items) + "}"

    def typed(self, sql_type: str) -> str:
        """A parameter text meant for ``sql_type`` (often odd, sometimes right)."""
        if sql_type.endswith("[]"):
            return self.array_text(sql_type[:-2])
        if sql_type == "jsonb":
            return self.json_text()
        if sql_type in ("bigint", "real", "double precision"):
            return self.rng.choice(ODD_NUMBERS)
        if sql_type == "boolean":
            return self.rng.choice(["true", "f", "yes", "maybe", "", "1", "2"])
        return self.text()

    def value(self, sql_type: str) -> tuple[str | None, str | None]:
        """A parameter's text (None: NULL) and the cast written after it (None: none)."""
        kind = self.rng.random()
        if kind < 0.08:
            return None, self.rng.choice([None, *CASTS])
        if kind < 0.7:
            return self.typed(sql_type), self.rng.choice([None, None, sql_type if "." not in sql_type else "text"])
        return self.typed(self.rng.choice(CASTS)), self.rng.choice([None, *CASTS])

    def statement(self) -> tuple[str, list[str | None], list[int]]:
        """SQL with ``$n`` placeholders, the parameter texts they stand for, and declared type OIDs."""
        function = self.rng.choice(FUNCTIONS)
        candidates = signatures(function)
        params_of = self.rng.choice(candidates).params
        required = sum(1 for p in params_of if not p.optional)
        count = min(len(params_of), required + self.rng.randrange(len(params_of) - required + 1))
        if self.rng.random() < 0.1:
            count = self.rng.randrange(len(params_of) + 2)  # too few or too many
        params: list[str | None] = []
        oids: list[int] = []
        args = []
        named = False
        for i in range(count):
            param = params_of[i] if i < len(params_of) else None
            text, cast = self.value(param.type if param else self.rng.choice(CASTS))
            params.append(text)
            oids.append(TYPE_OIDS.get(cast or (param.type if param else ""), 0))
            arg = f"${len(params)}" + (f"::{cast}" if cast else "")
            named = named or (param is not None and i >= required and self.rng.random() < 0.3)
            if named:
                name = (
                    param.name if param and self.rng.random() < 0.9 else self.rng.choice(["nosuch", "kwargs", "inputs"])
                )
                arg = f'"{name}" => {arg}'
            args.append(arg)
        call = f"pgml.{function}({', '.join(args)})"
        shape = self.rng.random()
        if shape < 0.5:
            sql = f"SELECT {call}"
        elif shape < 0.75:
            sql = f"SELECT * FROM {call}"
        elif shape < 0.9:
            sql = f"SELECT {call} FROM (VALUES (1), (2)) AS v(n)"
        else:
            sql = f"SELECT n, {call.replace('$1', '$1 || n::text', 1)} FROM (VALUES (1), (2)) AS v(n)"
        return sql, params, oids

    def binary(self, text: str | None, oid: int) -> bytes | None:
        """A binary-format value: the right encoding of ``text`` when there is one, else random bytes."""
        if text is None:
            return None
        try:
            match oid:
                case 25:
                    return text.encode()
                case 3802:
                    return b"\1" + text.encode()
                case 20:
                    return struct.pack("!q", int(text))
                case 700:
                    return struct.pack("!f", float(text))
                case 16:
                    return bytes([text in ("true", "1", "yes")])
                case 1021:
                    values = [float(v) for v in text.strip("{}").split(",") if v]
                    body = b"".join(struct.pack("!if", 4, v) for v in values)
                    return struct.pack("!iiIii", 1, 0, 700, len(values), 1) + body
        except (ValueError, OverflowError, struct.error):
            pass
        return self.rng.randbytes(self.rng.randrange(12))


def inline(sql: str, params: list[str | None]) -> str:
    """The statement with its parameters written as SQL literals (the simple protocol's form)."""
    for number in range(len(params), 0, -1):
        value = params[number - 1]
        literal = "NULL" if value is None else "'" + value.replace("'", "''") + "'"
        sql = sql.replace(f"${number}", literal)
    return sql


FUZZ_SECONDS = 40.0


def test_fuzz_pgml_statements(proxy: ProxyProcess) -> None:
    """Random pgml statements: every answer is success or an error with a real SQLSTATE; the session lives."""
    fuzz = Fuzz(9)
    wire = Wire(proxy.port)
    log_start = len(proxy.log_text())
    deadline, count, seen = time.monotonic() + FUZZ_SECONDS, 0, set()
    while time.monotonic() < deadline and count < 3000:
        sql, params, oids = fuzz.statement()
        mode = fuzz.rng.random()
        in_transaction = fuzz.rng.random() < 0.2
        if in_transaction:
            wire.send(query("BEGIN"))
            wire.until_ready()
        if mode < 0.35:
            wire.send(query(inline(sql, params)))
        elif mode < 0.7:
            wire.send(
                parse(sql), bind([None if p is None else p.encode() for p in params]), describe(), execute(), SYNC
            )
        else:  # declared types, some values in binary format
            formats = [int(fuzz.rng.random() < 0.5 and oid != 0) for oid in oids]
            triples = zip(params, oids, formats, strict=True)
            values = [fuzz.binary(p, o) if f else None if p is None else p.encode() for p, o, f in triples]
            wire.send(parse(sql, oids=oids), bind(values, formats=formats), describe(), execute(), SYNC)
        try:
            got = wire.until_ready()
        except EOFError:
            pytest.fail(f"the session ended on {sql!r} {params!r}")
        found = codes(got)
        assert "XX000" not in found, (sql, params, [fields(raw) for kind, raw in got if kind == "E"])
        seen.update(found)
        if in_transaction:
            assert status(got) == ("E" if found else "T"), (sql, params, found)
            wire.send(query("ROLLBACK"))
            wire.until_ready()
        select_one(wire)
        count += 1
    wire.close()
    assert count >= 200, count  # enough cases ran to mean something
    assert len(seen) >= 8, seen  # and they reached many different error paths
    log = proxy.log_text()[log_start:]
    assert "rewrite failed" not in log and "session failed" not in log and "Fatal error" not in log, log[-3000:]


def test_client_encoding_other_than_utf8(proxy: ProxyProcess, pg: Postgres) -> None:
    """The proxy reads texts as UTF-8: in a LATIN1 session a pgml statement is refused (0A000), never fatal."""
    with psycopg.connect(pg.dsn(), autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS latin1_docs")
        setup.execute("CREATE TABLE latin1_docs (body text)")
        setup.execute("INSERT INTO latin1_docs VALUES ('café crème')")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET client_encoding = 'LATIN1'")
        assert conn.execute("SELECT body FROM latin1_docs").fetchone() == ("café crème",)  # relayed: fine
        for sql, params in [
            ("SELECT * FROM pgml.chunk('character', 'ascii only')", None),
            ("SELECT * FROM pgml.chunk('character', %s)", ["café"]),
            ("SELECT pgml.chunk('character', body) FROM latin1_docs", None),  # rows come back in LATIN1
        ]:
            assert sqlstate(conn, sql, params) == "0A000"
            assert_usable(conn)
        conn.execute("SET client_encoding = 'UTF8'")
        assert conn.execute("SELECT count(*) FROM pgml.chunk('character', 'café')").fetchone() == (1,)


ARRAY_LITERALS = [
    "{}", "{a}", '{"a"}', "{a,b}", '{ "a" , "b" }', '{"a,b",c}', '{"a\\"b"}', '{"a\\\\b"}', "{NULL,\"NULL\"}",
    '{""}', "{a,,b}", "{a,}", "{,a}", '{"a"b}', '{a"b"}', '{"a}', "{a}b}", "x", "{", '{"é漢字🙂", " spaced "}',
    "[1:2]={a,b}", "{  }", '{"a" "b"}', '{"a",,"b"}', "{ a b }",
]  # fmt: skip


@pytest.mark.parametrize("text", ARRAY_LITERALS)
def test_array_literals_read_as_the_server_reads_them(pg: Postgres, text: str) -> None:
    """parse_array against PostgreSQL's own text[] input: the same elements, or both refuse."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        try:
            server: list[str | None] | None = conn.execute("SELECT %s::text[]", [text]).fetchone()[0]  # type: ignore[index]
        except psycopg.errors.InvalidTextRepresentation:
            server = None
    try:
        ours: list[str | None] | None = parse_array(text)
    except (InvalidTextRepresentation, InvalidArgument):
        ours = None
    assert ours == server
