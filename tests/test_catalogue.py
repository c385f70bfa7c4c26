"""The pgml catalogue is declared in three places — the proxy's (engine/api.py), the engine's handler table
(engine/runtime/executor.py) and the server-side stubs (sql/003_stubs.sql, 007) — and they must agree: every
evaluated function has exactly one handler and every handler a catalogue entry; every evaluated overload has a
stub with the same argument types (so PostgreSQL resolves and describes statements the way the proxy evaluates
them), and every stub of an evaluated function is an overload the proxy evaluates.
"""

from __future__ import annotations

import psycopg
import pytest

from engine.api import CATALOGUE, evaluated_functions
from engine.runtime.executor import HANDLERS, Procedure, Worker
from tests.conftest import Postgres, ProxyProcess

pytestmark = pytest.mark.pg_matrix

# Overloads the server cannot declare: SQL functions take no "record" argument, and PostgresML's
# "row anyelement" would make every ARRAY[…] argument ambiguous (sql/007_overloads.sql).
NO_STUB = {("predict", ("text", "record")), ("predict", ("bigint", "record"))}
# Stubs with no overload of their own: they keep ARRAY[1.5, 2] (numeric[]) unambiguous next to a parameter;
# the proxy evaluates such arguments under its real[] overload.
STUB_ONLY = {("predict", ("text", "numeric[]")), ("predict", ("bigint", "numeric[]"))}


def test_stubs_and_catalogue_declare_the_same_overloads(pg: Postgres, proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pgml.version()")  # the schema is installed
    evaluated = {s.function for s in CATALOGUE}
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT proname, proargtypes::regtype[]::text[] FROM pg_proc"
            " WHERE pronamespace = 'pgml'::regnamespace AND proname = ANY(%s)",
            (sorted(evaluated),),
        ).fetchall()
    stubs = {(name, tuple(t.removeprefix("pgml.") for t in types)) for name, types in rows}
    declared = {(s.function, tuple(p.type.removeprefix("pgml.") for p in s.params)) for s in CATALOGUE}
    assert declared - stubs == NO_STUB
    assert stubs - declared == STUB_ONLY


def test_every_evaluated_function_has_one_handler_and_every_handler_a_catalogue_entry() -> None:
    assert sorted(HANDLERS) == sorted(evaluated_functions())  # dict keys: one handler per function
    procedures = {s.function for s in CATALOGUE if s.procedure}
    for name, handler in HANDLERS.items():
        assert isinstance(handler, Worker | Procedure), name
        if name in procedures:  # effects through the client's session: only a procedure has it
            assert isinstance(handler, Procedure), name
