"""A statement's analysis is computed once: a Bind of a reused prepared statement parses nothing and
matches no call's arguments again; nor does a repeated Parse of the same text.

Counted at pglast's parser (every parse of the rewriter goes through ``pglast.parse_sql`` or
``pglast.split``) and at :func:`proxy.rewrite.calls.match_arguments` (binding a call's arguments to
its overloads); the requests are answered from recorded results (:mod:`tests.test_rewrite_steps`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pglast
import pytest

from proxy.rewrite import calls, per_row
from proxy.rewrite.decide import DeferToBind, Rebound, Rewriter
from proxy.rewrite.schema_check import SessionState
from proxy.rewrite.steps import Facts, replay
from proxy.wire import messages as pq
from proxy.wire.frames import split_frames
from tests.test_rewrite import Unused
from tests.test_rewrite_steps import Script

FACTS = Facts(1, "db", "I", False, True, "UTF8")


@dataclass
class Counts:
    parses: list[str]
    matches: int = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    counted = Counts([])
    parse_sql, split, match = pglast.parse_sql, pglast.split, calls.match_arguments

    def counting_parse(sql: str, *args: Any) -> Any:
        counted.parses.append(sql)
        return parse_sql(sql, *args)

    def counting_split(sql: str, *args: Any, **kwargs: Any) -> Any:
        counted.parses.append(sql)
        return split(sql, *args, **kwargs)

    def counting_match(call: Any, function: str) -> Any:
        counted.matches += 1
        return match(call, function)

    monkeypatch.setattr(pglast, "parse_sql", counting_parse)
    monkeypatch.setattr(pglast, "split", counting_split)
    monkeypatch.setattr(calls, "match_arguments", counting_match)
    monkeypatch.setattr(per_row, "_temp_ids", itertools.count(1))
    yield counted


def prepared(rewriter: Rewriter, sql: str, types: tuple[int, ...]) -> DeferToBind:
    decision = replay(rewriter.deciding(pq.Parse("s", sql, types), SessionState(checked=True)), Script([], FACTS))
    assert isinstance(decision, DeferToBind)
    return decision


def rewriter() -> Rewriter:
    made = Rewriter(Unused(), stream=False)  # a per-row Bind through the temp table: the lookup's template reused
    made.schema.ready.add(FACTS.database)
    return made


def bound(made: Rewriter, sql: str, types: tuple[int, ...], values: tuple[str, ...], steps: list[Any]) -> str:
    bind = pq.Bind("", "s", (), tuple(v.encode() for v in values), ())
    script = Script(steps, FACTS)
    decision = replay(made.binding(bind, sql, types, 1, SessionState(checked=True)), script)
    assert isinstance(decision, Rebound) and not script.steps
    return pq.Parse.decode(split_frames(decision.parse)[0]).sql


def test_a_bind_of_a_reused_prepared_statement_parses_nothing(counts: Counts) -> None:
    sql, types = "SELECT pgml.embed($1, $2)", (25, 25)
    made = rewriter()
    prepared(made, sql, types)
    assert counts.parses == [sql] and counts.matches == 1  # the Parse: one parse, one binding per call
    counts.parses.clear()
    bound(made, sql, types, ("m", "first"), [{"evaluate": "embed", "rows": [["m", "first", {}]]}])
    # The statement is not parsed again; at most the type names of its literals, once per process (cached).
    assert all(text.startswith("SELECT NULL::") for text in counts.parses)
    counts.parses.clear()
    for text in ["a", "bb", "ccc", "dddd"]:
        out = bound(made, sql, types, ("m", text), [{"evaluate": "embed", "rows": [["m", text, {}]]}])
        assert out == f"SELECT CAST('{{{len(text)},0.5}}' AS real[]) AS embed"
    assert counts.parses == []
    assert counts.matches == 1


def test_a_bind_of_a_per_row_prepared_statement_parses_nothing(counts: Counts) -> None:
    sql, types = "SELECT pgml.embed($1, body) FROM docs WHERE id = $2", (25, 20)
    made = rewriter()
    prepared(made, sql, types)
    bound(made, sql, types, ("m", "1"), _per_row_steps(1))  # the lookup's template is parsed once, then copied
    counts.parses.clear()
    for number in (2, 3, 4):
        out = bound(made, sql, types, ("m", str(number)), _per_row_steps(number))
        assert f"pg_temp.pgml_proxy_1_{number} " in out and f"id = CAST('{number}' AS bigint)" in out
    assert counts.parses == []
    assert counts.matches == 1


def test_a_repeated_parse_of_the_same_text_parses_it_once(counts: Counts) -> None:
    sql, types = "SELECT pgml.embed($1, $2)", (25, 25)
    made = rewriter()
    for _ in range(3):
        assert prepared(made, sql, types).param_types == types
    assert counts.parses == [sql] and counts.matches == 1


def test_a_kept_analysis_is_not_changed_by_a_bind(counts: Counts) -> None:
    """Each Bind rewrites its own copy: a value of one Bind never shows in the next."""
    sql, types = "SELECT pgml.embed($1, $2), $2 AS t", (25, 25)
    made = rewriter()
    prepared(made, sql, types)
    first = bound(made, sql, types, ("m", "a"), [{"evaluate": "embed", "rows": [["m", "a", {}]]}])
    second = bound(made, sql, types, ("m", "bb"), [{"evaluate": "embed", "rows": [["m", "bb", {}]]}])
    assert first == "SELECT CAST('{1,0.5}' AS real[]) AS embed, $2 AS t"
    assert second == "SELECT CAST('{2,0.5}' AS real[]) AS embed, $2 AS t"


def _per_row_steps(number: int) -> list[Any]:
    name = f"pgml_proxy_1_{number}"
    return [
        {
            "gather": f"SELECT DISTINCT body FROM docs WHERE id = CAST('{number}' AS bigint)",
            "columns": [["body", 25]],
            "rows": [[f"text {number}"]],
        },
        {"evaluate": "embed", "rows": [["m", f"text {number}", {}]]},
        {"run": ["CREATE TEMP...", "CREATE INDEX...", "COPY..."], "temp_tables": [name]},
    ]
