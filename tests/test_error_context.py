"""Errors of the proxy without the mechanism showing (issue 10, item 10).

A pgml error is raised by the server itself (a DO block), so that the transaction state is the server's;
the client must see its SQLSTATE, message, DETAIL, HINT (and position) and no CONTEXT naming that DO block
nor the location of PL/pgSQL's RAISE — in the simple protocol, the extended one and in a multi-statement
string. Errors the user's own SQL causes keep the server's CONTEXT, even in the same query string.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from proxy.wire import messages as pq
from proxy.wire.frames import Frame
from tests.conftest import Postgres, ProxyProcess
from tests.test_wire_pgml import B, E, P, Q, Raw, S

MISSING = "SELECT pgml.embed('no-such-model', 'some text')"  # 42704, DETAIL and HINT
MECHANISM = ("W", "F", "L", "R")  # CONTEXT, and the server source file, line and routine of RAISE


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        connection.execute("CREATE TEMP TABLE docs (body text)")
        connection.execute("INSERT INTO docs VALUES ('a'), ('b')")
        yield connection


def error_fields(port: int, *frames: bytes, syncs: int = 1) -> list[dict[str, str]]:
    """The fields of each ErrorResponse the frames get (a raw client: nothing interprets them)."""
    r = Raw(port)
    r.send(Q("CREATE TEMP TABLE docs (body text); INSERT INTO docs VALUES ('a')"))
    r.read_until_z(1)
    r.send(*frames)
    found = []
    for _ in range(syncs):
        while (m := r._msg())[:1] != b"Z":
            if m[:1] == b"E":
                found.append(dict(pq.ErrorResponse.decode(Frame(m[0], m)).fields))
    return found


CASES = {
    "simple": (Q(MISSING),),
    "after-statements": (Q(f"SELECT 1; CREATE TEMP TABLE t2 (x int); {MISSING}; SELECT 2"),),
    "in-a-transaction": (Q("BEGIN"), Q(f"SELECT 1; {MISSING}"), Q("ROLLBACK")),
    "per-row-after-statements": (Q("SELECT 1; SELECT pgml.embed('no-such-model', body) FROM docs"),),
    "extended": (P("", "SELECT pgml.embed($1, 'x')"), B("", "", [b"no-such-model"]), E(), S),
    "extended-constant": (P("", MISSING), B(), E(), S),
}


@pytest.mark.parametrize("case", CASES)
def test_proxy_errors_carry_no_context(proxy: ProxyProcess, case: str) -> None:
    frames = CASES[case]
    (fields,) = error_fields(proxy.port, *frames, syncs=sum(f[:1] in (b"Q", b"S") for f in frames))
    assert fields["C"] == "42704" and "no-such-model" in fields["M"] and fields["D"] and fields["H"], fields
    assert not set(MECHANISM) & set(fields), fields


def test_the_users_own_errors_keep_their_context(proxy: ProxyProcess) -> None:
    user_do = "DO $$BEGIN RAISE EXCEPTION 'mine' USING ERRCODE = 'P0001'; END$$"
    (own,) = error_fields(proxy.port, Q(f"{user_do}; {MISSING}"))  # the user's DO fails first, in the same string
    assert own["C"] == "P0001" and "inline_code_block" in own["W"] and own["R"], own
    boom = (
        "CREATE FUNCTION pg_temp.boom(t text) RETURNS text LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'boom %', t; END$$"
    )
    (gathered,) = error_fields(
        proxy.port, Q(boom), Q("SELECT pgml.embed('no-such-model', pg_temp.boom(body)) FROM docs"), syncs=2
    )  # the user's function fails while the proxy reads the per-row arguments
    assert gathered["M"] == "boom a" and "boom(text)" in gathered["W"], gathered
    (division,) = error_fields(proxy.port, Q("SELECT 1/0"))
    assert division["C"] == "22012" and division["R"] == "int4div", division


def test_psycopg_sees_no_context(conn: psycopg.Connection) -> None:
    for sql, params in [
        (MISSING, None),
        ("SELECT pgml.embed(%s, 'x')", ["no-such-model"]),
        (f"SELECT 1; {MISSING}", None),
    ]:
        with pytest.raises(errors.UndefinedObject) as caught:
            conn.execute(sql, params)
        diag = caught.value.diag
        assert diag.context is None and diag.source_file is None and diag.source_function is None
        assert diag.message_detail and diag.message_hint and diag.sqlstate == "42704"
    conn.execute("BEGIN")
    with pytest.raises(errors.UndefinedObject) as caught:
        conn.execute(f"SELECT 1; {MISSING}")
    assert caught.value.diag.context is None
    with pytest.raises(errors.InFailedSqlTransaction):  # the server's transaction failed with it
        conn.execute("SELECT 1")
    conn.execute("ROLLBACK")
    with pytest.raises(errors.UndefinedFunction) as caught:
        conn.execute("SELECT 1, pgml.embed('a', 'b', 'c', 'd', 'e')")
    assert caught.value.diag.statement_position == "11"  # the position in the client's text, which RAISE lacks
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psql_verbose_shows_no_do_block(pg: Postgres, proxy: ProxyProcess) -> None:
    script = "\n".join(
        [
            r"\set VERBOSITY verbose",
            "CREATE TEMP TABLE docs (body text); INSERT INTO docs VALUES ('a');",
            f"{MISSING};",
            rf"SELECT 1 \; {MISSING};",
            r"SELECT 1 \; SELECT pgml.embed('no-such-model', body) FROM docs;",
            "BEGIN;",
            f"{MISSING};",
            "ROLLBACK;",
            "SELECT 1/0;",
        ]
    )
    done = subprocess.run(
        [pg.tool("psql"), proxy.dsn(), "-X", "-q"], input=script, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert output.count("ERROR:  42704") == 4, output
    assert output.count("DETAIL:") == 4 and output.count("HINT:") == 4, output
    assert "inline_code_block" not in output and "exec_stmt_raise" not in output, output
    assert "LOCATION:  int4div" in output, output  # the server's own error, as verbose as ever


def test_extension_command_in_a_longer_string_has_no_do_context(proxy: ProxyProcess) -> None:
    """CREATE EXTENSION pgml inside a multi-statement string runs as the proxy's DO block: its error (already
    installed, no IF NOT EXISTS) reaches the client as the server's 42710, without that block's CONTEXT."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pgml.version()")  # installed
        with pytest.raises(psycopg.errors.DuplicateObject) as info:
            conn.execute("SELECT 1; CREATE EXTENSION pgml")
        assert info.value.diag.context is None
        assert conn.execute("SELECT 1").fetchone() == (1,)
