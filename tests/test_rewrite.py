"""Call detection and AST rewriting, without a database: golden cases, negatives, reparse checks.

The engine here is a deterministic stand-in (the real one is tested end to end), answering the
rewriter's Evaluate requests; statements with constant arguments never touch the upstream, so
every Run request is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pglast import parse_sql

from engine.api import InvalidTextRepresentation, Signature
from proxy.errors import FeatureNotSupported, UndefinedFunction
from proxy.rewrite import analyze, evaluate
from proxy.rewrite.analyze import Analysis
from proxy.rewrite.calls import find_calls
from proxy.rewrite.decide import Rewriter, Rewritten, might_use_pgml, raise_statement
from proxy.rewrite.schema_check import SessionState
from proxy.rewrite.steps import Compute, Evaluate, Facts, Look, Request, replay
from proxy.rewrite.tree import deparse_all
from proxy.wire.messages import Query

CASES = Path(__file__).parent / "rewrite_cases"
FACTS = Facts(
    session_id=1, database="db", tx_status="I", in_transaction=False, standard_strings=True, client_encoding="UTF8"
)


def fake_results(signature: Signature, rows: tuple[tuple[Any, ...], ...]) -> list[Any]:
    out: list[Any] = []
    for row in rows:
        match signature.function, row:
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


class FakeEngine:
    """A deterministic stand-in answering Evaluate requests; any other request but Look must not come."""

    def __init__(self) -> None:
        self.calls: list[Evaluate] = []

    def __call__(self, request: Request) -> Any:
        match request:
            case Evaluate(signature=signature, rows=rows):
                self.calls.append(request)
                return fake_results(signature, rows)
            case Look():
                return FACTS
            case Compute(function=function):
                return function()
        raise AssertionError(f"constant rewrites must not query the upstream: {request}")


class Unused:
    """An engine the rewriter holds but never calls: its requests are answered by a FakeEngine."""

    async def evaluate(self, call: Any) -> list[Any]:
        raise AssertionError("the engine is asked through Evaluate requests")

    def cancel(self, session: int) -> None:
        pass

    async def close(self) -> None:
        pass


def analysis_of(sql: str) -> Analysis | None:
    stmts = replay(analyze.parse(sql), FakeEngine())
    if stmts is None:
        return None
    analysis = analyze.of(stmts)
    return analysis if analysis.calls else None


async def rewrite(sql: str, dependent_ok: bool = True) -> str | None:
    analysis = analysis_of(sql)
    if analysis is None:
        return None
    return replay(evaluate.rewrite(analysis, dependent_ok=dependent_ok), FakeEngine())


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
    assert deparse_all(parse_sql(out)) == out


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


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t (body text, e real[] GENERATED ALWAYS AS (pgml.embed('m', body)) STORED)",
        "CREATE TABLE t (body text, e real[] DEFAULT pgml.embed('m', 'x'), CHECK (pgml.embed('m', body) IS NOT NULL))",
        "CREATE VIEW v AS SELECT pgml.embed('m', body) FROM docs",
        "CREATE VIEW v AS SELECT pgml.embed('m', 'x')",  # a constant call too: never baked in
        "CREATE MATERIALIZED VIEW v AS SELECT pgml.embed('m', body) FROM docs",
        "CREATE FUNCTION f(t text DEFAULT pgml.version()) RETURNS real[] BEGIN ATOMIC SELECT pgml.embed('m', t); END",
        "CREATE FUNCTION f(t text) RETURNS real[] LANGUAGE sql RETURN pgml.embed('m', t)",
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT pgml.embed('m', 'x'); END",
        "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW WHEN (pgml.embed('m', NEW.b) IS NULL) EXECUTE FUNCTION f()",
        "CREATE RULE r AS ON INSERT TO t DO ALSO SELECT pgml.embed('m', NEW.body)",
        "CREATE POLICY p ON t USING (pgml.predict('p', ARRAY[1]) > 0)",
        "ALTER POLICY p ON t WITH CHECK (pgml.predict('p', ARRAY[1]) > 0)",
        "ALTER TABLE t ADD COLUMN e real[] GENERATED ALWAYS AS (pgml.embed('m', body)) STORED",
        "ALTER TABLE t ALTER COLUMN e SET DEFAULT pgml.embed('m', 'x')",
        "ALTER TABLE t ALTER COLUMN e SET EXPRESSION AS (pgml.embed('m', body))",
        "ALTER TABLE t ADD CONSTRAINT c CHECK (pgml.embed('m', body) IS NOT NULL)",
        "CREATE DOMAIN d AS real[] DEFAULT pgml.embed('m', 'x') CHECK (VALUE <> pgml.embed('m', 'y'))",
        "ALTER DOMAIN d SET DEFAULT pgml.embed('m', 'x')",
        "CREATE INDEX i ON t ((pgml.embed('m', body))) WHERE pgml.predict('p', ARRAY[1]) > 0",
        "CREATE STATISTICS s ON (pgml.embed('m', body)) FROM t",
        "CREATE TABLE p (a int) PARTITION BY RANGE ((pgml.predict('p', ARRAY[a])))",
        "CREATE PUBLICATION pub FOR TABLE t WHERE (pgml.predict('p', ARRAY[a]) > 0)",
        "CREATE SCHEMA s CREATE VIEW v AS SELECT pgml.embed('m', 'x')",
        "DO $$ BEGIN PERFORM pgml.embed('m', 'x'); END $$",  # a string: the server runs it
        "COMMENT ON VIEW v IS 'SELECT pgml.embed(''m'', ''x'')'",
        "REFRESH MATERIALIZED VIEW v",
    ],
)
async def test_definitions_go_to_the_server_untouched(sql: str) -> None:
    assert await rewrite(sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t2 AS SELECT pgml.embed('m', 'x')",
        "SELECT pgml.embed('m', 'x') INTO t2",
        "UPDATE t SET e = pgml.embed('m', 'x')",
        "ALTER TABLE t ALTER e TYPE real[] USING pgml.embed('m', 'x')",  # run now, on every row
        "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (pgml.version())",  # evaluated once, at CREATE
    ],
)
async def test_what_runs_now_is_evaluated_here(sql: str) -> None:
    assert await rewrite(sql) is not None


def test_unparsable_sql_is_forwarded() -> None:
    assert analysis_of("SELEC pgml.embed('m', 'x')") is None


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
    analysis = analysis_of("SELECT pgml.embed('m', 'a'), pgml.embed('m', 'bb'), pgml.embed('m', ARRAY['c'])")
    assert analysis is not None
    replay(evaluate.rewrite(analysis, dependent_ok=True), engine)
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
    engine = FakeEngine()
    rewriter = Rewriter(Unused())
    state = SessionState(checked=True)
    rewriter.schema.ready.add("db")  # the schema check needs an upstream; these answers have none
    first = replay(rewriter.deciding(Query("SELECT pgml.embed('m', 'abc')"), state), engine)
    second = replay(rewriter.deciding(Query("SELECT pgml.embed('m', 'abc')"), state), engine)
    assert isinstance(first, Rewritten) and first == second
    assert len(engine.calls) == 1
    replay(rewriter.deciding(Query("SELECT pgml.embed('m', 'abcd')"), state), engine)
    assert len(engine.calls) == 2
