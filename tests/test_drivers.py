"""Drivers and ORMs through the proxy, unchanged (issue 10): psycopg 2 and 3, SQLAlchemy (psycopg and asyncpg
dialects), asyncpg, pgjdbc (tests/clients/java), node-postgres with pg-cursor and postgres.js (tests/clients/node),
Django.

Every scenario's values are compared with the same values computed by constant SQL (literal arguments, the
proxy's constant path): the bound, per-row, batched, prepared and cursor forms each driver generates must agree
with it. Errors must leave the session usable after ROLLBACK, and each driver's plain (non-pgml) traffic must
give what a direct connection to the server gives. The expected values come from all-MiniLM-L6-v2
(embeddings), two small linear models trained here (predict) and a tiny random GPT-2 (transform_stream, greedy
and so deterministic).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import psycopg2.extras
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from tests.conftest import MINILM, ROOT, Postgres, ProxyProcess, scratch_database
from tests.tiny_models import tiny_gpt2

TEXTS = ("the cat sat on the mat", "hello world", "a red dog", "good night")
TASK = {"task": "text-generation", "model": "tiny-gpt2"}
ARGS = {"max_new_tokens": 6, "min_new_tokens": 6}
PROMPT = "the cat"
REG = "drivers regression"  # features a, b, c (real)
BOOLS = "drivers booleans"  # features p, q, r (boolean)
STREAM = "SELECT pgml.transform_stream(%s::jsonb, %s::jsonb, %s)"
NO_MODEL = "no-such-model"  # 42704 undefined_object
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
CLIENTS = ROOT / "tests" / "clients"

Vector = list[float]


@dataclass(frozen=True)
class World:
    """The scratch database behind the shared proxy, and the expected values (computed with constant SQL)."""

    pg: Postgres
    proxy: ProxyProcess
    db: str
    embeddings: dict[str, Vector]  # text -> pgml.embed(MINILM, text)
    features: dict[int, tuple[float, float, float]]  # feats.id -> (a, b, c)
    predictions: dict[int, float]  # feats.id -> pgml.predict(REG, ARRAY[a, b, c])
    model_id: int  # REG's deployed model
    bool_predictions: dict[tuple[bool, bool, bool], float]  # (p, q, r) -> pgml.predict(BOOLS, ARRAY[p, q, r])

    def dsn(self, direct: bool = False) -> str:
        return self.pg.dsn(dbname=self.db) if direct else self.proxy.dsn(dbname=self.db)

    def url(self, scheme: str, direct: bool = False) -> str:
        port = self.pg.port if direct else self.proxy.port
        return f"{scheme}://postgres@127.0.0.1:{port}/{self.db}"

    def fresh_table(self, name: str) -> str:
        """An empty table ``name`` (id, body, emb real[]) for a scenario's inserts."""
        with psycopg.connect(self.dsn(direct=True), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text, emb real[])").format(
                sql.Identifier(name)))  # fmt: skip
        return name

    def stored(self, table: str) -> dict[str, Vector]:
        with psycopg.connect(self.dsn(direct=True)) as conn:
            rows = conn.execute(sql.SQL("SELECT body, emb FROM {} ORDER BY id").format(sql.Identifier(table)))
            return {body: emb for body, emb in rows}


def constant(conn: psycopg.Connection, template: str, *values: object) -> Any:
    """The one value of ``template`` with ``values`` as SQL literals (no parameters: the constant form)."""
    query = sql.SQL(template).format(*(sql.Literal(v) for v in values))  # type: ignore[arg-type]
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture(scope="module")
def world(pg: Postgres, proxy: ProxyProcess, model_dir: Path) -> Iterator[World]:
    if not (model_dir / "tiny-gpt2").exists():
        tiny_gpt2(model_dir / "tiny-gpt2")
    features = {i: ((i % 5) / 4, (i % 3) / 2, i / 8) for i in range(1, 25)}  # exact in real and float8
    with scratch_database(pg, "drivers") as db:
        with psycopg.connect(pg.dsn(dbname=db), autocommit=True) as conn:
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO docs VALUES (%s, %s)", list(enumerate(TEXTS, 1)))
                conn.execute("CREATE TABLE feats (id int PRIMARY KEY, a real, b real, c real, y real)")
                rows = [(i, a, b, c, 3 * a - 2 * b + c + 0.5) for i, (a, b, c) in features.items()]
                cur.executemany("INSERT INTO feats VALUES (%s, %s, %s, %s, %s)", rows)
                conn.execute("CREATE TABLE bfeats (id int PRIMARY KEY, p bool, q bool, r bool, y real)")
                combos = [((i >> 2) & 1 == 1, (i >> 1) & 1 == 1, i & 1 == 1) for i in range(8)]
                cur.executemany("INSERT INTO bfeats VALUES (%s, %s, %s, %s, %s)",
                                [(n, *bits, 2 * bits[0] + bits[1] - 0.5 * bits[2] + 1)
                                 for n, bits in enumerate(combos * 2)])  # fmt: skip
            conn.execute("CREATE VIEW feats_train AS SELECT a, b, c, y FROM feats")
            conn.execute("CREATE VIEW bfeats_train AS SELECT p, q, r, y FROM bfeats")
        with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
            conn.execute(f"SELECT * FROM pgml.train('{REG}', 'regression', 'feats_train', 'y', 'linear')")
            conn.execute(f"SELECT * FROM pgml.train('{BOOLS}', 'regression', 'bfeats_train', 'y', 'linear')")
            (model_id,) = conn.execute(
                "SELECT m.id FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = %s",
                [REG],
            ).fetchone() or (0,)
            expected = World(
                pg, proxy, db,
                embeddings={t: constant(conn, "SELECT pgml.embed({}, {})", MINILM, t) for t in TEXTS},
                features=features,
                predictions={i: constant(conn, f"SELECT pgml.predict({{}}, ARRAY[{a}, {b}, {c}]::real[])", REG)
                             for i, (a, b, c) in features.items()},
                model_id=model_id,
                bool_predictions={bits: constant(conn, "SELECT pgml.predict({}, ARRAY[{}, {}, {}]::boolean[])",
                                                 BOOLS, *bits) for bits in combos},
            )  # fmt: skip
        yield expected


@pytest.fixture(scope="module")
def stream(world: World) -> list[Any]:
    """The jsonb values of pgml.transform_stream(TASK, ARGS, PROMPT) with literal arguments."""
    with psycopg.connect(world.dsn(), autocommit=True) as conn:
        query = sql.SQL(STREAM.replace("%s", "{}")).format(
            sql.Literal(json.dumps(TASK)), sql.Literal(json.dumps(ARGS)), sql.Literal(PROMPT))
        got = [row[0] for row in conn.execute(query)]
    assert len(got) >= 2 and all(isinstance(v, list) and len(v) == 1 for v in got)
    return got


@pytest.fixture(scope="module")
def transformed(world: World) -> Any:
    """pgml.transform(TASK, ARGS, ARRAY[PROMPT]) with literal arguments."""
    with psycopg.connect(world.dsn(), autocommit=True) as conn:
        return constant(conn, "SELECT pgml.transform({}::jsonb, {}::jsonb, ARRAY[{}])",
                        json.dumps(TASK), json.dumps(ARGS), PROMPT)  # fmt: skip


def assert_vector(got: object, want: Vector) -> None:
    """``got`` (a sequence of numbers, or an array's text form: PostgreSQL's, or pgjdbc's with quoted elements
    once it reads arrays in binary) is ``want``, to float4 rounding."""
    if isinstance(got, str):
        got = [float(x.strip('"')) for x in got.strip("{}").split(",")]
    assert isinstance(got, list | tuple), got
    assert len(got) == len(want)
    assert [float(x) for x in got] == pytest.approx(want, rel=1e-5, abs=1e-6)




def rows_by_body(world: World, rows: dict[str, Any]) -> None:
    assert set(rows) == set(TEXTS)
    for text, emb in rows.items():
        assert_vector(emb, world.embeddings[text])


# --------------------------------------------------------------------------- psycopg 3


@pytest.fixture
def conn(world: World) -> Iterator[psycopg.Connection]:
    with psycopg.connect(world.dsn()) as connection:
        yield connection


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg3_bound_and_per_row_embed(conn: psycopg.Connection, world: World, binary: bool) -> None:
    cur = conn.cursor(binary=binary)
    for text in TEXTS:
        (got,) = cur.execute("SELECT pgml.embed(%s, %s)", [MINILM, text]).fetchone() or (None,)
        assert_vector(got, world.embeddings[text])
    per_row = cur.execute("SELECT body, pgml.embed(%s, body) FROM docs ORDER BY id", [MINILM]).fetchall()
    rows_by_body(world, dict(per_row))


def test_psycopg3_named_cursor_on_transform_stream(conn: psycopg.Connection, world: World, stream: list[Any]) -> None:
    with conn.cursor(name="stream_cur") as cur:  # DECLARE, then Describe of the portal, then FETCH
        cur.execute(STREAM, [Jsonb(TASK), Jsonb(ARGS), PROMPT])
        assert cur.description is not None and cur.description[0].name == "transform_stream"
        got = cur.fetchmany(2)
        got += cur.fetchall()
    assert [v for (v,) in got] == stream
    with conn.cursor(name="iter_cur") as cur:
        cur.itersize = 2
        cur.execute(STREAM, [Jsonb(TASK), Jsonb(ARGS), PROMPT])
        assert [v for (v,) in cur] == stream
    conn.commit()
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg3_named_cursor_over_per_row_embed(conn: psycopg.Connection, world: World) -> None:
    with conn.cursor(name="emb_cur") as cur:
        cur.itersize = 2
        cur.execute("SELECT body, pgml.embed(%s, body) FROM docs ORDER BY id", [MINILM])
        rows_by_body(world, dict(cur))


def test_predict_float8_array_bound_from_a_python_list(conn: psycopg.Connection, world: World) -> None:
    """psycopg dumps a list of Python floats as float8[]: the documented predict(text, float8[]) overload."""
    for i in (1, 7, 20):
        features = list(world.features[i])
        (cast,) = conn.execute("SELECT pgml.predict(%s, %s::float8[])", [REG, features]).fetchone() or (None,)
        (plain,) = conn.execute("SELECT pgml.predict(%s, %s)", [REG, features]).fetchone() or (None,)
        assert cast == plain == pytest.approx(world.predictions[i], rel=1e-6)


def test_predict_bool_array_bound(conn: psycopg.Connection, world: World) -> None:
    for bits, want in world.bool_predictions.items():
        (got,) = conn.execute("SELECT pgml.predict(%s, %s::bool[])", [BOOLS, list(bits)]).fetchone() or (None,)
        assert got == pytest.approx(want, rel=1e-6)
    per_row = conn.execute("SELECT p, q, r, pgml.predict(%s, ARRAY[p, q, r]) FROM bfeats", [BOOLS]).fetchall()
    assert len(per_row) == 16
    for p, q, r, got in per_row:
        assert got == pytest.approx(world.bool_predictions[p, q, r], rel=1e-6)


@pytest.mark.parametrize("form", ["bound", "literal"])
def test_predict_bigint_model_id_with_per_row_features(conn: psycopg.Connection, world: World, form: str) -> None:
    if form == "bound":
        rows = conn.execute("SELECT id, pgml.predict(%s::bigint, ARRAY[a, b, c]) FROM feats ORDER BY id",
                            [world.model_id]).fetchall()  # fmt: skip
    else:
        rows = conn.execute(f"SELECT id, pgml.predict({world.model_id}::bigint, ARRAY[a, b, c]) FROM feats"
                            " ORDER BY id").fetchall()  # fmt: skip
    assert {i for i, _ in rows} == set(world.features)
    for i, got in rows:
        assert got == pytest.approx(world.predictions[i], rel=1e-6)


@pytest.mark.parametrize("form", ["constant", "bound", "per_row"])
def test_embed_subscript_keeps_the_column_name(conn: psycopg.Connection, world: World, form: str) -> None:
    """PostgreSQL names ``(f(x))[1:3]`` after the function: ``embed``."""
    if form == "constant":
        cur = conn.execute(sql.SQL("SELECT (pgml.embed({}, {}))[1:3]").format(sql.Literal(MINILM),
                                                                               sql.Literal(TEXTS[1])))  # fmt: skip
    elif form == "bound":
        cur = conn.execute("SELECT (pgml.embed(%s, %s))[1:3]", [MINILM, TEXTS[1]])
    else:
        cur = conn.execute("SELECT (pgml.embed(%s, body))[1:3] FROM docs WHERE id = 2", [MINILM])
    assert [d.name for d in cur.description or ()] == ["embed"]
    assert cur.description is not None and cur.description[0].type_code == 1021  # real[]
    (got,) = cur.fetchone() or (None,)
    assert_vector(got, world.embeddings[TEXTS[1]][:3])


def test_server_names_subscripted_calls_after_the_function(world: World) -> None:
    """The rule the test above relies on, checked on the server itself with a built-in function."""
    with psycopg.connect(world.dsn(direct=True)) as direct:
        cur = direct.execute("SELECT (string_to_array('a,b,c', ','))[1:2]")
        assert [d.name for d in cur.description or ()] == ["string_to_array"]


def test_psycopg3_sql_prepare_and_execute(conn: psycopg.Connection, world: World) -> None:
    """SQL-level PREPARE with $1 inside the call, through the extended protocol (psycopg 3)."""
    conn.execute(f"PREPARE emb_p(text) AS SELECT pgml.embed('{MINILM}', $1)")
    for text in TEXTS[:2] * 2:
        (got,) = conn.execute(sql.SQL("EXECUTE emb_p({})").format(sql.Literal(text))).fetchone() or (None,)
        assert_vector(got, world.embeddings[text])
    conn.execute("DEALLOCATE emb_p")


def test_psycopg3_error_then_rollback(conn: psycopg.Connection, world: World) -> None:
    with pytest.raises(errors.UndefinedObject):
        conn.execute("SELECT pgml.embed(%s, %s)", [NO_MODEL, "x"])
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SELECT 1")
    conn.rollback()
    with pytest.raises(errors.UndefinedFunction):  # a wrong overload: the server's own 42883
        conn.execute("SELECT pgml.embed(%s, %s::int)", [MINILM, 1])
    conn.rollback()
    (got,) = conn.execute("SELECT pgml.embed(%s, %s)", [MINILM, TEXTS[0]]).fetchone() or (None,)
    assert_vector(got, world.embeddings[TEXTS[0]])


def plain_psycopg3(dsn: str) -> list[object]:
    out: list[object] = []
    with psycopg.connect(dsn) as c:
        for binary in (False, True):
            cur = c.cursor(binary=binary)
            cur.execute("SELECT id, body, length(body), %s::numeric * 2, %s::jsonb, ARRAY[%s, 1.5]::float8[] FROM docs"
                        " WHERE id <= %s ORDER BY id", [Decimal("1.25"), Jsonb({"k": [1]}), 0.25, 3])  # fmt: skip
            out += [[(d.name, d.type_code) for d in cur.description or ()], cur.fetchall()]
        for i in range(6):
            out.append(c.execute("SELECT %s::int * 2", [i], prepare=True).fetchone())
        with c.cursor(name="plain_cur") as cur:
            cur.itersize = 2
            cur.execute("SELECT g, g * 2 FROM generate_series(1, 5) g")
            out.append(list(cur))
        with c.pipeline():
            first = c.execute("SELECT 1")
            second = c.execute("SELECT body FROM docs WHERE id = %s", [2])
        out += [first.fetchall(), second.fetchall()]
        try:
            c.execute("SELECT 1/0")
        except errors.DivisionByZero as e:
            out.append((e.sqlstate, str(e)))
        c.rollback()
        out.append(c.execute("SELECT count(*) FROM docs").fetchone())
    return out


def test_psycopg3_plain_traffic_identical(world: World) -> None:
    assert plain_psycopg3(world.dsn()) == plain_psycopg3(world.dsn(direct=True))


# --------------------------------------------------------------------------- psycopg 2


@pytest.fixture
def conn2(world: World) -> Iterator[Any]:
    connection = psycopg2.connect(world.dsn())
    try:
        yield connection
    finally:
        connection.close()


def test_psycopg2_interpolated_and_per_row_embed(conn2: Any, world: World) -> None:
    with conn2.cursor() as cur:  # psycopg 2 interpolates on the client: the simple protocol, literal arguments
        for text in TEXTS:
            cur.execute("SELECT pgml.embed(%s, %s)", (MINILM, text))
            assert_vector(cur.fetchone()[0], world.embeddings[text])
        cur.execute("SELECT body, pgml.embed(%s, body) FROM docs ORDER BY id", (MINILM,))
        rows_by_body(world, dict(cur.fetchall()))


def test_psycopg2_named_cursor_on_transform_stream(conn2: Any, world: World, stream: list[Any]) -> None:
    with conn2.cursor("stream2") as cur:  # DECLARE "stream2" CURSOR WITHOUT HOLD FOR …; FETCH FORWARD 2
        cur.itersize = 2
        cur.execute(STREAM, (json.dumps(TASK), json.dumps(ARGS), PROMPT))
        got = [v for (v,) in cur]
    conn2.commit()
    assert got == stream


def test_psycopg2_execute_values_multi_row_insert(conn2: Any, world: World) -> None:
    table = world.fresh_table("ins_psycopg2")
    with conn2.cursor() as cur:
        psycopg2.extras.execute_values(
            cur, f"INSERT INTO {table} (id, body, emb) VALUES %s",
            [(i, text, MINILM, text) for i, text in enumerate(TEXTS, 1)], template="(%s, %s, pgml.embed(%s, %s))",
        )  # fmt: skip
        assert cur.rowcount == len(TEXTS)
    conn2.commit()
    rows_by_body(world, world.stored(table))


def test_psycopg2_executemany_insert(conn2: Any, world: World) -> None:
    table = world.fresh_table("ins_psycopg2_many")
    with conn2.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} (id, body, emb) VALUES (%s, %s, pgml.embed(%s, %s))",
                        [(i, text, MINILM, text) for i, text in enumerate(TEXTS, 1)])  # fmt: skip
    conn2.commit()
    rows_by_body(world, world.stored(table))


def test_psycopg2_list_of_floats_as_features(conn2: Any, world: World) -> None:
    with conn2.cursor() as cur:  # a Python list becomes ARRAY[0.25, 0.5, 0.125]: numeric[], cast by the query
        for i in (2, 9):
            cur.execute("SELECT pgml.predict(%s, %s::float8[])", (REG, list(world.features[i])))
            assert cur.fetchone()[0] == pytest.approx(world.predictions[i], rel=1e-6)


def test_psycopg2_sql_prepare_and_execute(conn2: Any, world: World) -> None:
    """SQL-level PREPARE with $1 inside the call, through the simple protocol (psycopg 2)."""
    with conn2.cursor() as cur:
        cur.execute(f"PREPARE emb_p2(text) AS SELECT pgml.embed('{MINILM}', $1)")
        for text in TEXTS[:2] * 2:
            cur.execute("EXECUTE emb_p2(%s)", (text,))
            assert_vector(cur.fetchone()[0], world.embeddings[text])


def test_psycopg2_error_then_rollback(conn2: Any, world: World) -> None:
    with conn2.cursor() as cur:
        with pytest.raises(psycopg2.errors.UndefinedObject):
            cur.execute("SELECT pgml.embed(%s, %s)", (NO_MODEL, "x"))
        conn2.rollback()
        cur.execute("SELECT pgml.embed(%s, %s)", (MINILM, TEXTS[3]))
        assert_vector(cur.fetchone()[0], world.embeddings[TEXTS[3]])


def plain_psycopg2(dsn: str) -> list[object]:
    out: list[object] = []
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT id, body, length(body), %s::numeric, %s, %s FROM docs ORDER BY id",
                        (Decimal("2.5"), [0.25, 1.5], json.dumps({"k": 1})))  # fmt: skip
            out += [[(d.name, d.type_code) for d in cur.description], cur.fetchall()]
            psycopg2.extras.execute_values(cur, "SELECT * FROM (VALUES %s) v(a, b)", [(1, "x"), (2, "y")])
            out.append(cur.fetchall())
            try:
                cur.execute("SELECT 1/0")
            except psycopg2.errors.DivisionByZero as e:
                out.append((e.pgcode, str(e)))
            connection.rollback()
        with connection.cursor("plain2") as cur:
            cur.itersize = 2
            cur.execute("SELECT g FROM generate_series(1, 5) g")
            out.append(list(cur))
        connection.commit()
    finally:
        connection.close()
    return out


def test_psycopg2_plain_traffic_identical(world: World) -> None:
    assert plain_psycopg2(world.dsn()) == plain_psycopg2(world.dsn(direct=True))


# --------------------------------------------------------------------------- SQLAlchemy


@dataclass(frozen=True)
class Schema:
    docs: Any
    vec: Any  # an ORM class mapped to table sa_vecs (id, body, emb real[])
    base: Any


@pytest.fixture(scope="module")
def sa_schema() -> Schema:
    from sqlalchemy import Column, Integer, MetaData, Table, Text
    from sqlalchemy.dialects.postgresql import ARRAY, REAL
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Vec(Base):
        __tablename__ = "sa_vecs"
        id = mapped_column(Integer, primary_key=True)
        body = mapped_column(Text)
        emb = mapped_column(ARRAY(REAL))

    docs = Table("docs", MetaData(), Column("id", Integer, primary_key=True), Column("body", Text))
    return Schema(docs, Vec, Base)


def sa_embed(text: Any) -> Any:
    from sqlalchemy import func
    from sqlalchemy.dialects.postgresql import ARRAY, REAL

    return func.pgml.embed(MINILM, text, type_=ARRAY(REAL))


def test_sqlalchemy_psycopg_core_and_orm(world: World, sa_schema: Schema) -> None:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    world.fresh_table("sa_vecs")
    engine = create_engine(world.url("postgresql+psycopg"))
    try:
        with engine.connect() as c:
            for text in TEXTS:
                assert_vector(c.execute(select(sa_embed(text))).scalar_one(), world.embeddings[text])
            docs = sa_schema.docs
            rows = c.execute(select(docs.c.body, sa_embed(docs.c.body)).order_by(docs.c.id)).all()
            rows_by_body(world, dict(rows))  # type: ignore[arg-type]
        with Session(engine) as session:  # ORM inserts: pgml.embed over bound parameters in each VALUES row
            session.add_all([sa_schema.vec(id=i, body=t, emb=sa_embed(t)) for i, t in enumerate(TEXTS, 1)])
            session.commit()
            stored = session.execute(select(sa_schema.vec.body, sa_schema.vec.emb)).all()
            rows_by_body(world, dict(stored))  # type: ignore[arg-type]
    finally:
        engine.dispose()


def sa_stream() -> Any:
    from sqlalchemy import cast, func, literal, select
    from sqlalchemy.dialects.postgresql import JSONB

    task, args = cast(literal(json.dumps(TASK)), JSONB), cast(literal(json.dumps(ARGS)), JSONB)
    return select(func.pgml.transform_stream(task, args, PROMPT))


def test_sqlalchemy_psycopg_yield_per(world: World, sa_schema: Schema) -> None:
    """``yield_per`` makes the psycopg dialect use a named (server-side) cursor."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    engine = create_engine(world.url("postgresql+psycopg"))
    try:
        with Session(engine) as session:
            docs = sa_schema.docs
            query = select(docs.c.body, sa_embed(docs.c.body)).order_by(docs.c.id).execution_options(yield_per=2)
            rows_by_body(world, dict(session.execute(query).all()))  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_sqlalchemy_psycopg_yield_per_on_transform_stream(world: World, stream: list[Any]) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(world.url("postgresql+psycopg"))
    try:
        with Session(engine) as session:
            got = [v for (v,) in session.execute(sa_stream().execution_options(yield_per=2))]
            assert got == stream
            session.rollback()
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect", ["postgresql+psycopg", "postgresql+psycopg2"])
def test_sqlalchemy_transform_with_cast_arguments(world: World, transformed: Any, dialect: str) -> None:
    """``cast(literal(json_text), JSONB)`` renders ``CAST(%(param_1)s::VARCHAR AS JSONB)``: bound by psycopg 3,
    interpolated by psycopg 2 (``CAST('…'::VARCHAR AS JSONB)``)."""
    from sqlalchemy import cast, create_engine, func, literal, select
    from sqlalchemy.dialects.postgresql import JSONB, array

    task, args = cast(literal(json.dumps(TASK)), JSONB), cast(literal(json.dumps(ARGS)), JSONB)
    engine = create_engine(world.url(dialect))
    try:
        with engine.connect() as c:
            assert c.execute(select(func.pgml.transform(task, args, array([PROMPT])))).scalar_one() == transformed
    finally:
        engine.dispose()


def test_sqlalchemy_psycopg_error_then_rollback(world: World) -> None:
    from sqlalchemy import create_engine, exc, func, select
    from sqlalchemy.orm import Session

    engine = create_engine(world.url("postgresql+psycopg"))
    try:
        with Session(engine) as session:
            with pytest.raises(exc.ProgrammingError) as raised:
                session.execute(select(func.pgml.embed(NO_MODEL, "x")))
            assert getattr(raised.value.orig, "sqlstate", None) == "42704"
            session.rollback()
            assert_vector(session.execute(select(sa_embed(TEXTS[1]))).scalar_one(), world.embeddings[TEXTS[1]])
    finally:
        engine.dispose()


async def test_sqlalchemy_asyncpg_core_and_orm(world: World, sa_schema: Schema) -> None:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    world.fresh_table("sa_vecs")
    engine = create_async_engine(world.url("postgresql+asyncpg"))
    try:
        async with engine.connect() as c:
            for text in TEXTS:
                assert_vector((await c.execute(select(sa_embed(text)))).scalar_one(), world.embeddings[text])
            docs = sa_schema.docs
            rows = (await c.execute(select(docs.c.body, sa_embed(docs.c.body)).order_by(docs.c.id))).all()
            rows_by_body(world, dict(rows))  # type: ignore[arg-type]
        async with AsyncSession(engine) as session:
            session.add_all([sa_schema.vec(id=i, body=t, emb=sa_embed(t)) for i, t in enumerate(TEXTS, 1)])
            await session.commit()
            stored = (await session.execute(select(sa_schema.vec.body, sa_schema.vec.emb))).all()
            rows_by_body(world, dict(stored))  # type: ignore[arg-type]
    finally:
        await engine.dispose()


async def test_sqlalchemy_asyncpg_stream(world: World, stream: list[Any]) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(world.url("postgresql+asyncpg"))
    try:
        async with engine.connect() as c:
            result = await c.stream(sa_stream())  # an asyncpg cursor in a transaction
            assert [json.loads(v) if isinstance(v, str) else v async for (v,) in result] == stream
            await c.rollback()
    finally:
        await engine.dispose()


def plain_sqlalchemy(url: str, schema: Schema) -> list[object]:
    from sqlalchemy import create_engine, func, select, text
    from sqlalchemy.orm import Session

    engine = create_engine(url)
    out: list[object] = []
    try:
        with Session(engine) as session:
            docs = schema.docs
            out.append(session.execute(select(docs.c.id, docs.c.body, func.length(docs.c.body))
                                       .where(docs.c.id >= 2).order_by(docs.c.id)).all())  # fmt: skip
            out.append(session.execute(text("SELECT CAST(:a AS numeric) * 2, :b || 'x'"), {"a": 1.25, "b": "y"}).all())
            out.append(session.execute(select(docs.c.id).order_by(docs.c.id).execution_options(yield_per=2)).all())
            session.rollback()
    finally:
        engine.dispose()
    return out


@pytest.mark.parametrize("dialect", ["postgresql+psycopg", "postgresql+psycopg2"])
def test_sqlalchemy_plain_traffic_identical(world: World, sa_schema: Schema, dialect: str) -> None:
    assert plain_sqlalchemy(world.url(dialect), sa_schema) == plain_sqlalchemy(world.url(dialect, True), sa_schema)


# --------------------------------------------------------------------------- asyncpg


async def test_asyncpg_prepared_statements(world: World) -> None:
    c = await asyncpg.connect(world.dsn())
    try:
        constant_stmt = await c.prepare("SELECT pgml.embed($1, $2)")
        per_row = await c.prepare("SELECT body, pgml.embed($1, body) FROM docs WHERE id = $2")
        for _ in range(2):  # the same named statements, executed again
            for i, text in enumerate(TEXTS, 1):
                assert_vector(await constant_stmt.fetchval(MINILM, text), world.embeddings[text])
                body, emb = await per_row.fetchrow(MINILM, i) or (None, None)
                assert body == text
                assert_vector(emb, world.embeddings[text])
        for i in (3, 11):  # the statement cache: fetchval prepares once and reuses it
            got = await c.fetchval("SELECT pgml.predict($1, $2::float8[])", REG, list(world.features[i]))
            assert got == pytest.approx(world.predictions[i], rel=1e-6)
        got = await c.fetchval("SELECT pgml.predict($1, $2::bool[])", BOOLS, [True, False, True])
        assert got == pytest.approx(world.bool_predictions[True, False, True], rel=1e-6)
    finally:
        await c.close()


async def test_asyncpg_executemany_with_embed_per_row(world: World) -> None:
    table = world.fresh_table("ins_asyncpg")
    c = await asyncpg.connect(world.dsn())
    try:
        await c.executemany(f"INSERT INTO {table} (id, body, emb) VALUES ($1, $2, pgml.embed($3, $2))",
                            [(i, text, MINILM) for i, text in enumerate(TEXTS, 1)])  # fmt: skip
    finally:
        await c.close()
    rows_by_body(world, world.stored(table))


async def test_asyncpg_cursor_on_transform_stream(world: World, stream: list[Any]) -> None:
    c = await asyncpg.connect(world.dsn())
    try:
        async with c.transaction():
            query = "SELECT pgml.transform_stream($1::jsonb, $2::jsonb, $3)"
            got = [json.loads(r[0]) async for r in c.cursor(query, json.dumps(TASK), json.dumps(ARGS), PROMPT,
                                                              prefetch=2)]  # fmt: skip
        assert got == stream
    finally:
        await c.close()


async def test_asyncpg_error_then_rollback(world: World) -> None:
    c = await asyncpg.connect(world.dsn())
    try:
        tr = c.transaction()
        await tr.start()
        with pytest.raises(asyncpg.UndefinedObjectError):
            await c.fetchval("SELECT pgml.embed($1, $2)", NO_MODEL, "x")
        await tr.rollback()
        assert_vector(await c.fetchval("SELECT pgml.embed($1, $2)", MINILM, TEXTS[2]), world.embeddings[TEXTS[2]])
    finally:
        await c.close()


async def plain_asyncpg(dsn: str) -> list[object]:
    c = await asyncpg.connect(dsn)
    out: list[object] = []
    try:
        stmt = await c.prepare("SELECT id, body, length(body), $1::numeric * 2 FROM docs WHERE id <= $2 ORDER BY id")
        out.append([(a.name, a.type.name) for a in stmt.get_attributes()])
        for n in (2, 4):
            out.append([tuple(r) for r in await stmt.fetch(Decimal("1.25"), n)])
        await c.executemany("SELECT $1::int", [(1,), (2,)])
        async with c.transaction():
            out.append([tuple(r) async for r in c.cursor("SELECT g FROM generate_series(1, 5) g", prefetch=2)])
        try:
            await c.fetchval("SELECT 1/0")
        except asyncpg.DivisionByZeroError as e:
            out.append((e.sqlstate, str(e)))
        out.append(await c.copy_from_query("SELECT id, body FROM docs ORDER BY id", output=lambda b: _noop(b)))
    finally:
        await c.close()
    return out


async def _noop(_: bytes) -> None:
    return None


async def test_asyncpg_plain_traffic_identical(world: World) -> None:
    assert await plain_asyncpg(world.dsn()) == await plain_asyncpg(world.dsn(direct=True))


# --------------------------------------------------------------------------- pgjdbc

JAVA_SCENARIOS = ("embed_bound", "embed_per_row", "embed_per_row_fetch_size", "threshold", "batch", "stream",
                  "stream_fetch_size", "predict_model_id", "predict_float8_array", "error_then_rollback",
                  "plain")  # fmt: skip


@pytest.fixture(scope="module")
def jdbc(world: World, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, list[list[str]]]]:
    """Runs tests/clients/java/DriverScenarios.java (compiled here) once per connection variant."""
    javac, java = shutil.which("javac"), shutil.which("java")
    assert javac and java and JDBC_JAR.exists(), "a JDK and pgjdbc are needed (make deps installs them)"
    classes = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-Xlint:all", "-Werror", "-cp", str(JDBC_JAR), "-d", str(classes),
                    str(CLIENTS / "java" / "DriverScenarios.java")], check=True, timeout=120)  # fmt: skip

    @cache
    def run(variant: str) -> dict[str, list[list[str]]]:
        direct = variant == "direct"
        port = world.pg.port if direct else world.proxy.port
        url = f"jdbc:postgresql://127.0.0.1:{port}/{world.db}"
        if variant == "unspecified":
            url += "?stringtype=unspecified"
        table = world.fresh_table(f"jdbc_batch_{variant}")
        opts = {
            "scenarios": "plain" if direct else ",".join(JAVA_SCENARIOS), "texts": "|".join(TEXTS), "model": MINILM,
            "task": json.dumps(TASK), "args": json.dumps(ARGS), "input": PROMPT, "model_id": str(world.model_id),
            "project": REG, "features": ";".join(",".join(map(str, world.features[i])) for i in (1, 5, 17)),
            "table": table,
        }  # fmt: skip
        proc = subprocess.run([java, "-cp", f"{classes}{os.pathsep}{JDBC_JAR}", "DriverScenarios", url,
                               *(f"{k}={v}" for k, v in opts.items())],
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out: dict[str, list[list[str]]] = {}
        for line in proc.stdout.splitlines():
            name, *fields = json.loads(line)
            out.setdefault(name, []).append(fields)
        return out

    return run


def jdbc_result(jdbc: Callable[[str], dict[str, list[list[str]]]], variant: str, scenario: str) -> list[list[str]]:
    got = jdbc(variant).get(scenario, [])
    errors_seen = [fields for fields in got if fields[0] == "!error"]
    assert not errors_seen, f"{scenario} ({variant}): {errors_seen}"
    assert got, f"{scenario} ({variant}) printed nothing"
    return got


VARIANTS = pytest.mark.parametrize("variant", ["default", "unspecified"])  # stringtype=unspecified


@VARIANTS
def test_pgjdbc_bound_embed(jdbc: Any, world: World, variant: str) -> None:
    got = jdbc_result(jdbc, variant, "embed_bound")
    rows_by_body(world, {text: value for text, value in got})


@VARIANTS
@pytest.mark.parametrize("scenario", ["embed_per_row", "embed_per_row_fetch_size"])
def test_pgjdbc_per_row_embed(jdbc: Any, world: World, variant: str, scenario: str) -> None:
    """Every row, read at once or two at a time (a fetch size: Execute with a row limit on the portal)."""
    got = jdbc_result(jdbc, variant, scenario)
    assert [int(i) for i, _ in got] == list(range(1, len(TEXTS) + 1))
    rows_by_body(world, {TEXTS[int(i) - 1]: value for i, value in got})


@VARIANTS
def test_pgjdbc_prepare_threshold_reached(jdbc: Any, world: World, variant: str) -> None:
    got = jdbc_result(jdbc, variant, "threshold")
    assert len(got) == 14  # 7 runs of each statement: the last ones on a named server-side statement
    for kind, _, *rest in got:
        if kind == "constant":
            label, text, value = rest
            assert label == "e"
        else:
            text, value = rest
        assert_vector(value, world.embeddings[text])


@VARIANTS
def test_pgjdbc_rewritten_batch_insert(jdbc: Any, world: World, variant: str) -> None:
    """reWriteBatchedInserts=true: one multi-row INSERT … VALUES (…, pgml.embed($3, $4)), (…, pgml.embed($7, $8))."""
    got = jdbc_result(jdbc, variant, "batch")
    assert got[0] == ["inserted", str(len(TEXTS))]
    rows_by_body(world, {body: value for _, body, value in got[1:]})
    rows_by_body(world, world.stored(f"jdbc_batch_{variant}"))


@VARIANTS
@pytest.mark.parametrize("scenario", ["stream", "stream_fetch_size"])
def test_pgjdbc_transform_stream(jdbc: Any, world: World, variant: str, scenario: str, stream: list[Any]) -> None:
    """transform_stream(?::jsonb, ?::jsonb, ?): pgjdbc types the strings varchar (text with stringtype=unspecified);
    with a fetch size it reads the portal two rows at a time."""
    got = jdbc_result(jdbc, variant, scenario)
    assert got[0] == ["column", "transform_stream"] and got[-1] == ["after", "1"]
    assert [json.loads(v) for kind, v in got if kind == "row"] == stream


@VARIANTS
def test_pgjdbc_predict(jdbc: Any, world: World, variant: str) -> None:
    by_id = jdbc_result(jdbc, variant, "predict_model_id")
    assert {int(i) for i, _ in by_id} == set(world.features)
    for i, value in by_id:
        assert float(value) == pytest.approx(world.predictions[int(i)], rel=1e-6)
    arrays = jdbc_result(jdbc, variant, "predict_float8_array")
    for (features, value), i in zip(arrays, (1, 5, 17), strict=True):
        assert features == ",".join(map(str, world.features[i]))
        assert float(value) == pytest.approx(world.predictions[i], rel=1e-6)


@VARIANTS
def test_pgjdbc_error_then_rollback(jdbc: Any, world: World, variant: str) -> None:
    got = jdbc_result(jdbc, variant, "error_then_rollback")
    assert got[0] == ["sqlstate", "42704"]
    assert got[1][0] == "after"
    assert_vector(got[1][1], world.embeddings[TEXTS[0]])


@VARIANTS
def test_pgjdbc_plain_traffic_identical(jdbc: Any, variant: str) -> None:
    got = jdbc_result(jdbc, variant, "plain")
    assert got == jdbc_result(jdbc, "direct", "plain")
    assert ["error", "22012"] in got and any(f[0] == "bound 6" for f in got)


# --------------------------------------------------------------------------- node-postgres, postgres.js

NODE_SCENARIOS = ("pg.embed_bound", "pg.embed_per_row", "pg.named_prepared", "pg.cursor_stream", "pg.cursor_per_row",
                  "pg.multi_values", "pg.error_then_rollback", "pg.plain", "pjs.embed_bound", "pjs.embed_per_row",
                  "pjs.cursor_stream", "pjs.error_then_rollback", "pjs.plain")  # fmt: skip


@pytest.fixture(scope="module")
def node(world: World) -> Callable[[bool], dict[str, list[list[Any]]]]:
    """Runs tests/clients/node/scenarios.mjs once through the proxy and once directly (plain traffic only)."""
    binary = shutil.which("node")
    assert binary and (CLIENTS / "node" / "node_modules" / "pg").exists(), "make deps installs Node.js and npm ci"

    @cache
    def run(direct: bool) -> dict[str, list[list[Any]]]:
        config = {
            "dsn": world.dsn(direct), "texts": TEXTS, "model": MINILM, "task": json.dumps(TASK),
            "args": json.dumps(ARGS), "input": PROMPT, "table": world.fresh_table(f"ins_node_{int(direct)}"),
            "scenarios": [s for s in NODE_SCENARIOS if s.endswith(".plain")] if direct else NODE_SCENARIOS,
        }  # fmt: skip
        proc = subprocess.run([binary, str(CLIENTS / "node" / "scenarios.mjs"), json.dumps(config)],
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out: dict[str, list[list[Any]]] = {}
        for line in proc.stdout.splitlines():
            name, *fields = json.loads(line)
            out.setdefault(name, []).append(fields)
        return out

    return run


def node_result(node: Callable[[bool], dict[str, list[list[Any]]]], scenario: str, direct: bool = False) -> list[Any]:
    got = node(direct).get(scenario, [])
    errors_seen = [fields for fields in got if fields[0] == "!error"]
    assert not errors_seen, f"{scenario}: {errors_seen}"
    assert got, f"{scenario} printed nothing"
    return got


@pytest.mark.parametrize("driver", ["pg", "pjs"])
def test_node_bound_and_per_row_embed(node: Any, world: World, driver: str) -> None:
    bound = node_result(node, f"{driver}.embed_bound")
    assert {column for _, column, _ in bound} == {"e"}
    rows_by_body(world, {text: value for text, _, value in bound})
    per_row = node_result(node, f"{driver}.embed_per_row")
    rows_by_body(world, {TEXTS[int(i) - 1]: value for i, value in per_row})


def test_node_pg_named_prepared_statement(node: Any, world: World) -> None:
    got = node_result(node, "pg.named_prepared")
    assert len(got) == 6
    for _, text, value in got:
        assert_vector(value, world.embeddings[text])


@pytest.mark.parametrize("driver", ["pg", "pjs"])
def test_node_cursor_on_transform_stream(node: Any, world: World, driver: str, stream: list[Any]) -> None:
    """pg-cursor and postgres.js ``.cursor(2)``: Execute with a row limit on the portal, read two rows at a time."""
    got = node_result(node, f"{driver}.cursor_stream")
    assert got[-1] == ["after", 1]
    assert [value for kind, value in got if kind == "row"] == stream


def test_node_pg_cursor_over_per_row_embed(node: Any, world: World) -> None:
    got = node_result(node, "pg.cursor_per_row")
    rows_by_body(world, {TEXTS[int(i) - 1]: value for i, value in got})


def test_node_pg_multi_row_values(node: Any, world: World) -> None:
    got = node_result(node, "pg.multi_values")
    assert got[0] == ["inserted", 2]
    assert {body for body, _ in got[1:]} == set(TEXTS[:2])
    for body, value in got[1:]:
        assert_vector(value, world.embeddings[body])


@pytest.mark.parametrize("driver", ["pg", "pjs"])
def test_node_error_then_rollback(node: Any, world: World, driver: str) -> None:
    got = node_result(node, f"{driver}.error_then_rollback")
    assert got[0] == ["sqlstate", "42704"]
    assert got[1][0] == "after"
    assert_vector(got[1][1], world.embeddings[TEXTS[0]])


@pytest.mark.parametrize("driver", ["pg", "pjs"])
def test_node_plain_traffic_identical(node: Any, driver: str) -> None:
    got = node_result(node, f"{driver}.plain")
    assert got == node_result(node, f"{driver}.plain", direct=True)
    assert any(f[0] == "error" and f[1] == "22012" for f in got)


# --------------------------------------------------------------------------- Django


@pytest.fixture(scope="module")
def django_models(world: World) -> Any:
    """Django configured with two databases, ``default`` through the proxy and ``direct``; the models' tables."""
    import django
    from django.conf import settings

    def database(direct: bool) -> dict[str, object]:
        port = world.pg.port if direct else world.proxy.port
        return {"ENGINE": "django.db.backends.postgresql", "NAME": world.db, "USER": "postgres",
                "HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip

    assert not settings.configured, "Django is configured once per process, here"
    settings.configure(
        DATABASES={"default": database(False), "direct": database(True)},
        INSTALLED_APPS=["django.contrib.postgres"], USE_TZ=True, DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )  # fmt: skip
    django.setup()
    from django.contrib.postgres.fields import ArrayField
    from django.db import connections, models

    class Doc(models.Model):
        body = models.TextField()

        class Meta:
            app_label = "drivers"
            db_table = "docs"
            managed = False

    class Vec(models.Model):
        body = models.TextField()
        emb = ArrayField(models.FloatField(), null=True)

        class Meta:
            app_label = "drivers"
            db_table = "dj_vecs"

    with connections["default"].schema_editor() as editor:  # DDL through the proxy
        editor.create_model(Vec)
    yield Doc, Vec
    connections.close_all()


def dj_embed(expression: Any) -> Any:
    from django.contrib.postgres.fields import ArrayField
    from django.db.models import FloatField, Func, Value

    return Func(Value(MINILM), expression, function="pgml.embed", output_field=ArrayField(FloatField()))


def test_django_insert_annotate_iterator(world: World, django_models: Any) -> None:
    from django.contrib.postgres.fields import ArrayField
    from django.db.models import F, FloatField, Value
    from django.db.models.expressions import RawSQL

    doc, vec = django_models
    vec.objects.all().delete()
    for text in TEXTS[:2]:  # INSERT … VALUES (…, pgml.embed(…)) RETURNING id
        vec.objects.create(body=text, emb=dj_embed(Value(text)))
    vec.objects.bulk_create([vec(body=t, emb=dj_embed(Value(t))) for t in TEXTS[2:]])  # multi-row VALUES
    rows_by_body(world, {v.body: v.emb for v in vec.objects.order_by("id")})
    raw = RawSQL("pgml.embed(%s, body)", (MINILM,), output_field=ArrayField(FloatField()))
    rows_by_body(world, {d.body: d.e for d in doc.objects.annotate(e=raw).order_by("id")})
    rows_by_body(world, {d.body: d.e for d in doc.objects.annotate(e=dj_embed(F("body"))).order_by("id")})
    # .iterator(): a server-side (named) cursor, WITH HOLD in autocommit
    rows_by_body(world, {d.body: d.e for d in doc.objects.annotate(e=raw).order_by("id").iterator(chunk_size=2)})


def test_django_chunked_cursor_on_transform_stream(world: World, django_models: Any, stream: list[Any]) -> None:
    from django.db import connection, transaction

    with transaction.atomic():
        cursor = connection.chunked_cursor()
        cursor.execute(STREAM, [json.dumps(TASK), json.dumps(ARGS), PROMPT])
        got = cursor.fetchmany(2)
        got += cursor.fetchall()
        cursor.close()
    assert [json.loads(v) if isinstance(v, str) else v for (v,) in got] == stream


def test_django_error_then_rollback(world: World, django_models: Any) -> None:
    from django.db import DatabaseError, transaction
    from django.db.models import Func, Value

    doc, _ = django_models
    with pytest.raises(DatabaseError) as raised, transaction.atomic():
        list(doc.objects.annotate(e=Func(Value(NO_MODEL), Value("x"), function="pgml.embed")))
    assert getattr(raised.value.__cause__, "sqlstate", None) == "42704"
    got = doc.objects.annotate(e=dj_embed(Value(TEXTS[0]))).get(id=1)
    assert_vector(got.e, world.embeddings[TEXTS[0]])


def plain_django(alias: str, doc: Any) -> list[object]:
    from django.db import connections, transaction
    from django.db.models import Count, Max

    out: list[object] = [
        list(doc.objects.using(alias).filter(body__contains="o").order_by("-id").values_list("id", "body")),
        doc.objects.using(alias).aggregate(n=Count("id"), longest=Max("body")),
        [d.body for d in doc.objects.using(alias).order_by("id").iterator(chunk_size=2)],
    ]
    with transaction.atomic(using=alias), connections[alias].cursor() as cur:
        cur.execute("SELECT %s::int + 1, %s || 'x'", [1, "y"])
        out.append(cur.fetchall())
    return out


def test_django_plain_traffic_identical(django_models: Any) -> None:
    doc, _ = django_models
    assert plain_django("default", doc) == plain_django("direct", doc)
