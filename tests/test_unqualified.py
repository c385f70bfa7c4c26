"""Bare pgml names on a session's search_path, without sockets: the tracker, the lookup from recorded answers.

:class:`proxy.session.search_path.SearchPath` is fed what the core feeds it (the startup packet,
ParameterStatus, statements that touch it, ReadyForQuery); :func:`proxy.rewrite.unqualified.names`
runs against recorded answers of its lookup; :func:`proxy.rewrite.unqualified.qualify` on parsed trees.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pglast import parse_sql

from engine.api import Result
from proxy.rewrite import unqualified
from proxy.rewrite.steps import Facts, Look, Request, Run, Settle, replay
from proxy.rewrite.tree import deparse_all
from proxy.rewrite.unqualified import Resolution, names, qualify, schemas
from proxy.session.search_path import SearchPath, from_startup, touches
from proxy.wire.frames import StartupMessage

FACTS = Facts(1, "db", "I", False, True, "UTF8", search_path="pgml, public", path_epoch=1, user="alice")
IDLE, IN_TX = ord("I"), ord("T")


def startup(**params: str) -> StartupMessage:
    return StartupMessage(3, 0, tuple(params.items()))


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"user": "a"}, None),
        ({"user": "a", "options": "-c search_path=pgml,public"}, "pgml,public"),
        ({"options": "--search_path=pgml -c statement_timeout=5"}, "pgml"),
        ({"options": r"-csearch_path=pgml,\ public"}, "pgml, public"),
        ({"search_path": "pgml"}, "pgml"),
        (
            {"search_path": "public", "options": "-c search_path=pgml"},
            "public",
        ),  # parameters win, as the server applies them
    ],
)
def test_the_startup_packet(params: dict[str, str], path: str | None) -> None:
    assert from_startup(startup(**params)) == path


def test_a_reporting_server_gives_every_value() -> None:
    tracked = SearchPath()
    tracked.startup(startup(user="alice"))
    assert tracked.value is None
    tracked.report('"$user", public')
    assert tracked.value == '"$user", public' and tracked.reported
    tracked.touched(in_transaction=False)  # a SET on its way: unknown until its answers came
    assert tracked.value is None
    tracked.report("pgml, public")
    tracked.ready(IDLE, idle=True)
    assert tracked.value == "pgml, public"
    tracked.touched(in_transaction=False)  # SELECT … FROM search_paths: no report, so unchanged
    tracked.ready(IDLE, idle=False)  # an earlier statement's answer: still unknown
    assert tracked.value is None
    tracked.ready(IDLE, idle=True)
    assert tracked.value == "pgml, public"


def test_a_server_that_does_not_report_it_is_asked() -> None:
    tracked = SearchPath()
    tracked.startup(startup(user="alice", options="-c search_path=pgml"))
    assert tracked.value == "pgml"
    epoch = tracked.epoch
    tracked.touched(in_transaction=True)  # SET LOCAL inside BEGIN
    tracked.ready(IN_TX, idle=True)
    assert tracked.value is None and tracked.epoch > epoch
    epoch = tracked.epoch
    tracked.ready(IDLE, idle=True)  # COMMIT or ROLLBACK: what was learned in the transaction is forgotten
    assert tracked.value is None and tracked.epoch > epoch


@pytest.mark.parametrize(
    ("text", "hit"),
    [(b"SET search_path = pgml", True), (b"reset  ALL", True), (b"DISCARD ALL", True), (b"SELECT 1", False)],
)
def test_statements_that_touch_it(text: bytes, hit: bool) -> None:
    assert touches(text) is hit


def test_schemas_of_a_path() -> None:
    assert schemas('"$user", public', "alice") == ["alice", "public"]
    assert schemas('PGML, "My,Schema" , pg_catalog', "a") == ["pgml", "My,Schema", "pg_catalog"]
    assert unqualified.names_pgml("pgml, public", "a") and not unqualified.names_pgml('"$user", public', "a")
    assert unqualified.names_pgml('"$user"', "pgml")  # a role named pgml


class Lookup:
    """Answers the lookup with ``listed`` (the server's current_setting and names); counts the runs."""

    def __init__(self, facts: Facts, current: str, listed: str) -> None:
        self.facts, self.current, self.listed, self.runs = facts, current, listed, 0

    def __call__(self, request: Request) -> Any:
        match request:
            case Look() | Settle():
                return self.facts
            case Run(statements=(statement,)):
                assert statement.sql == unqualified.LOOKUP
                self.runs += 1
                return [Result(rows=[(self.current, self.listed)])]
        raise AssertionError(request)


def test_known_paths_without_pgml_cost_nothing() -> None:
    answers = Lookup(replace(FACTS, search_path='"$user", public'), "", "")
    assert replay(names("SELECT embed('m', 'x')", Resolution()), answers) == unqualified.EMPTY
    assert answers.runs == 0


def test_a_path_with_pgml_is_read_once_and_kept() -> None:
    resolution = Resolution()
    answers = Lookup(FACTS, "pgml, public", "chunk,embed,transform")
    for _ in range(3):
        assert replay(names("SELECT embed('m', 'x')", resolution), answers) == {"chunk", "embed", "transform"}
    assert answers.runs == 1
    assert replay(names("SELECT 1", resolution), answers) == unqualified.EMPTY  # names no candidate: not asked
    replay(names("CREATE FUNCTION public.embed(a text, b text) RETURNS int RETURN 1", resolution), answers)
    replay(names("SELECT embed('m', 'x')", resolution), answers)  # DDL may have changed it: read again
    assert answers.runs == 3


def test_an_unknown_path_is_learned_for_its_epoch() -> None:
    resolution = Resolution()
    unknown = replace(FACTS, search_path=None, path_epoch=7)
    answers = Lookup(unknown, '"$user", public', "")
    assert replay(names("SELECT embed('m', 'x')", resolution), answers) == unqualified.EMPTY
    assert resolution.learned == (7, '"$user", public') and resolution.path(unknown) == '"$user", public'
    assert replay(names("SELECT embed('m', 'x')", resolution), answers) == unqualified.EMPTY
    assert answers.runs == 1
    assert resolution.path(replace(unknown, path_epoch=8)) is None  # changed since: unknown again


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT embed('m', body) FROM docs", "SELECT pgml.embed('m', body) FROM docs"),
        ("SELECT * FROM chunk('c', 'x')", "SELECT * FROM pgml.chunk('c', 'x')"),
        ("SELECT rank() OVER (ORDER BY x) FROM t", "SELECT rank() OVER (ORDER BY x) FROM t"),  # a window call
        ("SELECT embed(1)", "SELECT embed(1)"),  # no pgml overload takes one argument: the server resolves it
        ("SELECT public.embed('m', 'x')", "SELECT public.embed('m', 'x')"),
        ("CREATE VIEW v AS SELECT embed('m', 'x')", "CREATE VIEW v AS SELECT embed('m', 'x')"),  # stored
        ("PREPARE p(text) AS SELECT embed('m', $1)", "PREPARE p(text) AS SELECT pgml.embed('m', $1)"),
    ],
)
def test_qualify(sql: str, expected: str) -> None:
    assert deparse_all(qualify(tuple(parse_sql(sql)), frozenset({"embed", "chunk", "rank"}))) == expected
