"""Rewrite decisions without sockets or a session: each case's requests answered from recorded results.

A case (``tests/rewrite_cases/*.json``) gives a Query, or a Parse and then Binds of it, and the
requests the rewriter must yield in order — the statements it runs on the client's session, with
the server's recorded answer (or error), and the engine calls, with the stand-in engine's results —
then the decision. Look, Settle and Compute requests are answered here (the session's facts, the
computation itself) and not listed. Run steps list their SQL; one ending in ``...`` matches by prefix;
``{"install": true}`` is the schema installation script. A per-row call's gather is a ``{"gather": sql,
"columns": …, "rows": …}`` step: the Run of its Prepare and its binary COPY, answered with the columns
described and the rows (as text here) in binary COPY. A Bind whose portal streams is followed by the
``executes`` of that portal: each an Execute's row limit and the steps it takes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pglast
import pytest

from engine.api import Result
from engine.pg.binary import SEND
from engine.pg.text import from_text
from engine.pg.types import READ_AS, TYPE_NAMES
from proxy import schema
from proxy.rewrite import per_row
from proxy.rewrite.decide import DeferToBind, Forward, OwnPortal, Rebound, Respond, Rewriter, Rewritten
from proxy.rewrite.schema_check import SessionState
from proxy.rewrite.steps import Begin, Compute, Emit, Evaluate, Facts, Look, Request, Run, Settle, Wait, replay
from proxy.session.exchange import BatchFailed, Described, Portion, Prepare, Rows, Statement, UpstreamError
from proxy.wire import messages as pq
from proxy.wire.frames import split_frames
from proxy.wire.rows import RowBlock
from tests.binary_rows import copy_messages, joined
from tests.test_rewrite import Unused, fake_results

CASES = Path(__file__).parent / "rewrite_cases"


def load_cases() -> list[Any]:
    cases = []
    for path in sorted(CASES.glob("*.json")):
        for case in json.loads(path.read_text()):
            cases.append(pytest.param(case, id=f"{path.stem}: {case['case']}"))
    return cases


@dataclass
class Script:
    """Answers a rewrite's requests from one case's recorded steps, checking each request against its step."""

    steps: list[dict[str, Any]]
    facts: Facts
    seen: list[Request] = field(default_factory=list)

    def __call__(self, request: Request) -> Any:
        self.seen.append(request)
        match request:
            case Look() | Settle():
                return self.facts
            case Compute(function=function):
                return function()
            case Wait(handle=handle):  # a Begin's results, answered from its step when it began
                return handle
        assert self.steps, f"an unexpected request after the last step: {request}"
        step = self.steps.pop(0)
        match request:
            case Run():
                return self._run(request, step)
            case Begin(run=run):
                assert step.get("begin"), f"{request} where the case has {step}"
                return self._run(run, step)
            case Emit(frames=frames):
                sent = split_frames(frames)
                emitted = [pq.DataRow.decode(f).values if f.type == ord("D") else bytes([f.type]) for f in sent]
                assert _plain(emitted) == _plain(_bytes(step["emit"])), f"{emitted} where the case has {step}"
                return None
            case Evaluate(signature=signature, rows=rows):
                assert step.get("evaluate") == signature.function, f"{request} where the case has {step}"
                assert _plain(rows) == step["rows"]
                return step["answer"] if "answer" in step else fake_results(signature, rows)
        raise AssertionError(f"not a rewrite request: {request}")

    def _run(self, request: Run, step: dict[str, Any]) -> list[Result]:
        statements = [s.sql for s in request.statements]
        install = step.get("install") and list(pglast.split(schema.script(set(), self.facts.in_transaction) or ""))
        gather = step.get("gather")
        expected = install or step.get("run") or (gather and [gather, f"COPY ({gather}) TO STDOUT (FORMAT binary)"])
        assert expected is not None, f"{request} where the case has {step}"
        assert len(statements) == len(expected), f"{statements} where the case has {expected}"
        for sql, want in zip(statements, expected, strict=True):
            assert sql.startswith(want[:-3]) if want.endswith("...") else sql == want, f"{sql!r} is not {want!r}"
        assert [s.visible for s in request.statements] == [step.get("visible", False)] * len(statements)
        assert (request.keep_open, request.finish) == (step.get("keep_open", False), step.get("finish", False))
        assert list(request.temp_tables) == step.get("temp_tables", [])
        if "params" in step:
            assert [list(s.params) for s in request.statements] == [step["params"]]
        if step.get("batch_failed"):
            raise BatchFailed()
        if "error" in step:
            fields = tuple(sorted({"S": "ERROR", **step["error"]}.items()))
            status = step.get("status", self.facts.tx_status)
            raise UpstreamError(fields, status, delivered=step.get("delivered", False))
        if gather is not None:
            return _gathered(step["columns"], step["rows"])
        answers = step.get("answer", [{}] * len(statements))
        return [_result(answer, statement) for answer, statement in zip(answers, request.statements, strict=True)]


def _result(answer: dict[str, Any], statement: Statement) -> Result:
    """A recorded Result: columns as (name, type OID), rows as text values ("@migrations": every version applied);
    for a Rows statement raw values (strings as their UTF-8 bytes) and whether the portal was suspended."""
    rows = answer.get("rows", [])
    if rows == "@migrations":
        rows = [[str(m.version)] for m in schema.migrations()]
    described = [tuple(c) for c in answer.get("columns", [])]  # (name, type OID[, format code])
    columns = [(c[0], c[1]) for c in described]
    if isinstance(statement, Rows):
        fields = tuple(pq.Column(c[0], c[1], format=c[2] if len(c) > 2 else 0) for c in described)
        description = pq.RowDescription(fields) if fields else None
        block = RowBlock()
        for row in rows:
            frame = pq.DataRow(tuple(_bytes(row))).encode()
            block.add(frame, (len(frame),))
        return Portion(columns=columns, block=block, description=description, suspended=answer.get("suspended", False))
    if isinstance(statement, Prepare):
        return Described(columns=columns)
    return Result(columns=columns, rows=[tuple(r) for r in rows])


def _bytes(value: Any) -> Any:
    """Strings in a recorded stream as the bytes sent; ``{"send": type, "value": v}`` as the binary form of v."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_bytes(v) for v in value]
    if isinstance(value, dict):
        return SEND[value["send"]](value["value"])
    return value


def _gathered(columns: list[list[Any]], rows: list[list[str | None]]) -> list[Result]:
    """A gather's answers: its Prepare's columns, and its rows (their texts, read as their types) in binary COPY."""
    named = [(str(name), TYPE_NAMES[oid]) for name, oid in columns]
    values = [[from_text(v, READ_AS[oid]) for v, (_, oid) in zip(row, columns, strict=True)] for row in rows]
    described = Described(columns=[(str(name), int(oid)) for name, oid in columns])
    data, lengths = joined(copy_messages(named, values))
    return [described, Result(copy=data, copy_rows=lengths)]


def _plain(value: Any) -> Any:
    """Tuples (and the numpy rows float arrays are read into) as lists, as JSON spells them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _facts(case: dict[str, Any]) -> Facts:
    facts = Facts(1, "db", "I", False, True, "UTF8")
    return replace(facts, **case.get("facts", {}))


@pytest.fixture(autouse=True)
def _temp_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(per_row, "_temp_ids", itertools.count(1))  # the case files name pgml_proxy_1_1, …
    yield


def decided(outcome: Any) -> dict[str, Any]:
    """A decision as a case spells it."""
    match outcome:
        case Forward():
            return {"forward": True}
        case DeferToBind(param_types=types):
            return {"defer": list(types)}
        case Rewritten(frames=frames):
            (frame,) = split_frames(frames)
            sql = pq.Query.decode(frame).sql if frame.type == ord("Q") else pq.Parse.decode(frame).sql
            return {"rewritten": sql}
        case Respond(frames=frames):
            return {"respond": [chr(frame.type) for frame in split_frames(frames)]}
        case Rebound(parse=parse, bind=bind):
            (parsed,) = split_frames(parse)
            message = pq.Parse.decode(parsed)
            bound = pq.Bind.decode(split_frames(bind)[0])
            assert bound.statement == message.name
            return {"rebound": message.sql, "types": list(message.param_types)}
        case OwnPortal(portal=portal, rows=rows):
            (description,) = split_frames(rows.description)
            columns = pq.RowDescription.decode(description).columns
            return {"own_portal": portal, "columns": [[c.name, c.type_oid, c.format] for c in columns]}
        case UpstreamError(fields=fields):
            return {"error": dict(fields)["C"]}
        case Exception() as error:
            return {"error": getattr(error, "sqlstate", type(error).__name__)}
    raise AssertionError(f"not a decision: {outcome!r}")


def outcome_of(run: Any) -> Any:
    try:
        return run()
    except Exception as error:
        return error


@pytest.mark.parametrize("case", load_cases())
def test_case(case: dict[str, Any]) -> None:
    rewriter = Rewriter(Unused(), stream=case.get("stream", False))  # the other cases are the temp-table path
    state = SessionState(checked=case.get("schema_checked", True), prepares=case.get("prepares", False))
    facts = _facts(case)
    if state.checked:
        rewriter.schema.ready.add(facts.database)
    if "query" in case:
        message: pq.Query | pq.Parse = pq.Query(case["query"])
    else:
        message = pq.Parse("s", case["parse"]["sql"], tuple(case["parse"].get("types", ())))
    script = Script(list(case["steps"]), facts)
    outcome = outcome_of(lambda: replay(rewriter.deciding(message, state), script))
    assert decided(outcome) == case["decision"]
    assert not script.steps, f"steps the rewriter did not take: {script.steps}"
    for number, bind_case in enumerate(case.get("binds", []), 1):
        assert isinstance(outcome, DeferToBind)
        values = tuple(None if v is None else str(v).encode() for v in bind_case["values"])
        bind = pq.Bind("", "s", (), values, tuple(bind_case.get("result_formats", ())))
        script = Script(list(bind_case["steps"]), facts)
        steps = rewriter.binding(bind, message.sql, outcome.param_types, number, state)
        bound = outcome_of(lambda: replay(steps, script))  # noqa: B023
        assert decided(bound) == bind_case["decision"]
        assert not script.steps, f"steps the rewriter did not take: {script.steps}"
        for execute in bind_case.get("executes", []):  # Executes of a streamed portal, with a row limit each
            assert isinstance(bound, OwnPortal)
            script = Script(list(execute["steps"]), facts)
            replay(bound.rows.execute(execute["count"]), script)
            assert not script.steps, f"steps the Execute did not take: {script.steps}"


def test_cases_are_loaded() -> None:
    assert len(load_cases()) >= 10
    assert any(case.values[0].get("stream") for case in load_cases())


def test_a_result_table_of_many_rows_is_analysed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under per_row.ANALYZE_FROM rows the lookup does as well without statistics (see there); from it on,
    its keys are analysed."""
    for count, analysed in ((per_row.ANALYZE_FROM - 1, False), (per_row.ANALYZE_FROM, True)):
        texts = [f"t{i}" for i in range(count)]
        load = ["CREATE TEMP TABLE pgml_proxy_1_1 (k0 text, v real[])", "CREATE INDEX...", "COPY..."]
        analyse = ["ALTER TABLE pgml_proxy_1_1 ALTER k0 SET STATISTICS 1", "ANALYZE pgml_proxy_1_1 (k0)"]
        steps = [
            {"gather": "SELECT DISTINCT body FROM docs", "columns": [["body", 25]], "rows": [[t] for t in texts]},
            {"evaluate": "embed", "rows": [["m", t, {}] for t in texts]},
            {"run": load + analyse * analysed, "temp_tables": ["pgml_proxy_1_1"]},
        ]
        monkeypatch.setattr(per_row, "_temp_ids", itertools.count(1))
        script = Script(steps, _facts({}))
        rewriter = Rewriter(Unused(), stream=False)  # the temp-table path
        rewriter.schema.ready.add("db")
        deciding = rewriter.deciding(pq.Query("SELECT pgml.embed('m', body) FROM docs"), SessionState(checked=True))
        outcome = outcome_of(lambda: replay(deciding, script))  # noqa: B023
        assert isinstance(outcome, Rewritten) and not script.steps, outcome


async def test_a_begun_run_that_fails_after_its_rewrite_ended_is_not_logged_as_unretrieved() -> None:
    """A streamed portal begins its next part's exchange; the client goes away and the rewrite ends before it
    waits for it, and then the upstream closes: asyncio must not log "Task exception was never retrieved" (with a
    traceback, at ERROR: the field's CI saw it in a proxy's log)."""
    import asyncio
    import gc

    from proxy.errors import ConnectionFailure
    from proxy.rewrite.steps import drive

    class ClosingPort:  # the one part of a session a Run needs: its exchange fails as a closed upstream's does
        temp_tables: list[str] = []

        async def execute(self, statements: list[Any], **_: Any) -> Any:
            await asyncio.sleep(0.01)
            raise ConnectionFailure("the upstream connection closed during an internal query")

    def rewrite() -> Iterator[Any]:
        yield Begin(Run((Statement("SELECT 1"),)))
        return "ended"  # without a Wait

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        assert await drive(rewrite(), ClosingPort(), None) == "ended"  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(before)
    assert reported == []


async def test_an_engine_call_after_a_cancel_in_the_same_decision_is_canceled() -> None:
    """A CancelRequest that came between the decision's own queries (no engine call and no server query running to
    stop) still cancels the statement: its next engine call fails with 57014 and never reaches the engine."""
    from engine.api import Canceled
    from proxy.rewrite.steps import drive

    class CanceledPort:
        canceled = True
        silenced: frozenset[str] = frozenset()

    class NoEngine:
        async def evaluate(self, call: Any) -> Any:
            raise AssertionError("the engine was called after the cancel")

    from engine.api import signatures

    signature = signatures("embed")[0]

    def rewrite() -> Iterator[Any]:
        try:
            yield Evaluate(signature, [("m", "text", {})])
        except Canceled as exc:
            return exc.sqlstate
        return "evaluated"

    assert await drive(rewrite(), CanceledPort(), NoEngine()) == "57014"  # type: ignore[arg-type]
