"""Call detection and AST rewriting, without a database: golden cases, negatives, reparse checks.

The engine here is a deterministic stand-in (the real one is tested end to end);
statements with constant arguments never touch the upstream, so the port refuses
every query.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pglast import parse_sql

from engine.api import Call
from proxy.errors import FeatureNotSupported, InvalidTextRepresentation, UndefinedFunction
from proxy.rewrite import plan
from proxy.rewrite.calls import find_calls
from proxy.rewrite.decide import might_use_pgml, raise_statement
from proxy.session.exchange import Result, Statement

CASES = Path(__file__).parent / "rewrite_cases"


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def evaluate(self, call: Call) -> list[Any]:
        self.calls.append(call)
        out: list[Any] = []
        for row in call.rows:
            match call.signature.function, row:
                case "version", _:
                    out.append("v")
                case "embed", (_, None, _):
                    out.append(None)
                case "embed", (_, list() as texts, _):
                    out.append([[float(len(t)), 0.5] for t in texts])
                case "embed", (_, str() as text, _):
                    out.append([float(len(text)), 0.5])
                case "chunk", (_, str() as text, _):
                    out.append([(i + 1, w) for i, w in enumerate(text.split())])
        return out

    def cancel(self, session: int) -> None:
        pass

    async def close(self) -> None:
        pass


class NoUpstream:
    session_id = 1
    tx_status = "I"
    database = "db"
    standard_strings = True
    client_encoding = "UTF8"

    def __init__(self) -> None:
        self.temp_tables: list[str] = []
        self.notices: list[str] = []

    async def settled(self) -> None:
        pass

    in_transaction = False

    async def execute(self, statements: Sequence[Statement]) -> list[Result]:
        raise AssertionError(f"constant rewrites must not query the upstream: {statements}")


async def rewrite(sql: str, dependent_ok: bool = True) -> str | None:
    analysis = plan.analyze(sql)
    if analysis is None:
        return None
    return await plan.rewrite(analysis, FakeEngine(), NoUpstream(), dependent_ok=dependent_ok)


def load_cases() -> list[Any]:
    cases = []
    for path in sorted(CASES.glob("*.sql")):
        text = path.read_text()
        for match in re.finditer(r"-- case: (.+?)\n(.+?)\n-- expect:\n(.+?)(?:\n\n|\n?$)", text, re.S):
            line = text[: match.start()].count("\n") + 1
            cases.append(pytest.param(match.group(2).strip(), match.group(3).strip(), id=f"{path.name}:{line}"))
    return cases


@pytest.mark.parametrize(("sql", "expected"), load_cases())
async def test_golden_rewrite(sql: str, expected: str) -> None:
    out = await rewrite(sql)
    assert out == expected
    # parse -> deparse -> reparse: the output is valid SQL that deparses to itself
    assert plan.deparse_all(parse_sql(out)) == out


def test_golden_cases_are_loaded() -> None:
    assert len(load_cases()) >= 12


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'pgml.embed(''m'', ''x'')'",  # in a string
        "SELECT 1 -- pgml.embed('m', 'x')",  # in a comment
        "SELECT 1 /* pgml.embed('m', 'x') */",
        'SELECT "pgml.embed" FROM t',  # an identifier
        "SELECT myschema.embed('m', 'x')",  # another schema
        "SELECT embed('m', 'x')",  # unqualified
        "SELECT * FROM pgml.models",  # a pgml table
        "SELECT pgml.cosine_similarity(a, b) FROM t",  # plain SQL helpers run in the server
        "SELECT pgml.norm_l2(ARRAY[1,2]::real[])",
        "SELECT * FROM pgml.embed",  # a relation named like the function
    ],
)
async def test_no_evaluated_call_means_forward(sql: str) -> None:
    assert await rewrite(sql) is None


def test_unparsable_sql_is_forwarded() -> None:
    assert plan.analyze("SELEC pgml.embed('m', 'x')") is None


@pytest.mark.parametrize(
    ("text", "hit"), [(b"Q\0\0\0\x10SELECT PGML.x\0", True), (b"SELECT PgMl", True), (b"SELECT pg_ml", False)]
)
def test_fast_path_is_case_insensitive(text: bytes, hit: bool) -> None:
    assert might_use_pgml(text) is hit


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("SELECT pgml.embed('m')", UndefinedFunction),
        ("SELECT pgml.embed('m', 'x', 'y', 'z')", UndefinedFunction),
        ("SELECT pgml.embed('m', 'x', nope => '{}')", UndefinedFunction),
        ("SELECT pgml.embed('m', 'x', '{not json')", InvalidTextRepresentation),
        ("SELECT pgml.embed(DISTINCT 'm', 'x')", UndefinedFunction),
    ],
)
async def test_bad_calls(sql: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await rewrite(sql)


async def test_per_row_calls_refused_where_not_supported() -> None:
    with pytest.raises(FeatureNotSupported):
        await rewrite("SELECT pgml.embed('m', body) FROM docs", dependent_ok=False)
    with pytest.raises(FeatureNotSupported):
        await rewrite("WITH gone AS (DELETE FROM docs RETURNING *) SELECT pgml.embed('m', body) FROM gone")


async def test_one_engine_call_per_overload() -> None:
    engine = FakeEngine()
    analysis = plan.analyze("SELECT pgml.embed('m', 'a'), pgml.embed('m', 'bb'), pgml.embed('m', ARRAY['c'])")
    assert analysis is not None
    await plan.rewrite(analysis, engine, NoUpstream(), dependent_ok=True)
    assert [(c.signature.params[1].type, len(c.rows)) for c in engine.calls] == [("text", 2), ("text[]", 1)]


def test_find_calls_context() -> None:
    stmt = parse_sql(
        "UPDATE docs d SET emb = pgml.embed('m', d.body) FROM t WHERE pgml.embed('m', t.x) IS NOT NULL"
        " RETURNING pgml.version()"
    )[0].stmt
    assert stmt is not None
    sites = find_calls(stmt)
    assert [(s.function, s.clause) for s in sites] == [
        ("embed", "targetList"),
        ("embed", "whereClause"),
        ("version", "returningClause"),
    ]
    join = parse_sql("SELECT 1 FROM a JOIN b ON pgml.embed('m', a.x) = b.e")[0].stmt
    assert join is not None
    assert [s.in_join for s in find_calls(join)] == [True]


def test_raise_statement_carries_code_and_hex_text() -> None:
    error = UndefinedFunction("it's $$ evil\\", hint="h")
    sql = raise_statement(error)
    assert "ERRCODE = '42883'" in sql
    assert "it's" not in sql and "$$ evil" not in sql.replace("$$BEGIN", "").replace("END$$", "")
    assert (b"it's $$ evil\\").hex() in sql
    assert parse_sql(sql)  # valid SQL


async def test_constant_rewrites_are_cached() -> None:
    from proxy.rewrite.decide import Rewriter, Rewritten
    from proxy.wire.messages import Query

    engine = FakeEngine()
    rewriter = Rewriter(engine)
    port = NoUpstream()
    rewriter._schema_ready.add("db")  # the schema check needs an upstream; this port has none
    rewriter._state(port).checked = True
    first = await rewriter.decide(Query("SELECT pgml.embed('m', 'abc')"), port)
    second = await rewriter.decide(Query("SELECT pgml.embed('m', 'abc')"), port)
    assert isinstance(first, Rewritten) and first == second
    assert len(engine.calls) == 1
    await rewriter.decide(Query("SELECT pgml.embed('m', 'abcd')"), port)
    assert len(engine.calls) == 2
