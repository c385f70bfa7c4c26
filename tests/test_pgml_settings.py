"""PostgresML's session settings through the proxy: they narrow ``[engine]``, never widen it.

A throwaway cluster with ``log_statement = all`` (so the server's log shows each query the proxy sends on a
client's session), tiny local models (``sst-a``, ``sst-b``, ``sst-c`` BERT classifiers, a GPT-2 ``gpt``, and
``evil`` / ``evil-2``, BERTs whose own code writes a marker file when it runs), and a proxy with
``[engine] allowed_models`` = sst-a, sst-b, gpt, evil, evil-2 and ``trust_remote_code`` on, at log level debug.
Clients: psycopg (extended protocol) and psql (simple query strings).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from engine.api import Result, SessionSettings, signatures
from engine.runtime.threads import limited
from proxy.embedded import Cluster, find_bin_dir
from proxy.errors import InvalidParameterValue
from proxy.rewrite.pgml_settings import READ, Once, parse, reading
from proxy.rewrite.steps import Evaluate, Request, Run, Steps, replay
from tests.conftest import ProxyProcess, start_proxy
from tests.test_remote_code import EVIL
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2

ROLE = "pgml_settings_role"
ALLOWED = "sst-a,sst-b,gpt,evil,evil-2"
TRANSFORM = "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['hello world'])"


@dataclass
class Setup:
    cluster: Cluster
    proxy: ProxyProcess
    models: Path
    marker: Path

    def ran(self) -> bool:
        """Whether a model's own code ran since the last look."""
        found = self.marker.exists()
        self.marker.unlink(missing_ok=True)
        return found

    def reads(self) -> int:
        """How many settings reads the server has logged so far."""
        return (self.cluster.data_dir / "server.log").read_text().count(READ)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("settings")
    models, marker = base / "models", base / "ran"
    for name in ("sst-a", "sst-b", "sst-c"):
        tiny_bert_classifier(models / name)
    tiny_gpt2(models / "gpt")
    for name in ("evil", "evil-2"):
        evil = tiny_bert_classifier(models / name)
        config = json.loads((evil / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig"}
        (evil / "config.json").write_text(json.dumps(config))
        (evil / "evil_code.py").write_text(EVIL.format(marker=str(marker)))
    cluster = Cluster(find_bin_dir(int(os.environ.get("PGML_TEST_PG", "18"))), base / "data")
    cluster.init()
    cluster.configure({"log_statement": "all"})
    cluster.start()
    dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    handle = start_proxy(
        dsn,
        base,
        PGML_PROXY_ENGINE_MODEL_DIRS=str(models),
        PGML_PROXY_ENGINE_DEVICE="cpu",
        PGML_PROXY_ENGINE_ALLOWED_MODELS=ALLOWED,
        PGML_PROXY_ENGINE_TRUST_REMOTE_CODE="true",
        PGML_PROXY_LOG_LEVEL="debug",
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(ROLE)))
        with psycopg.connect(handle.dsn(), autocommit=True) as conn:  # installs the pgml schema
            conn.execute("SELECT pgml.version()")
        yield Setup(cluster, handle, models, marker)
    finally:
        handle.stop()
        cluster.stop("immediate")


@pytest.fixture
def conn(setup: Setup) -> Iterator[psycopg.Connection]:
    with psycopg.connect(setup.proxy.dsn(), autocommit=True) as connection:
        yield connection


def task(model: str, **kwargs: object) -> str:
    return json.dumps({"task": "text-classification", "model": model, **kwargs})


def labels(conn: psycopg.Connection, model: str) -> list[str]:
    row = conn.execute(TRANSFORM, [task(model)]).fetchone()
    assert row is not None
    return [item["label"] for item in row[0]]


def refused(conn: psycopg.Connection, query: str, params: list[object]) -> errors.Error:
    with pytest.raises(errors.Error) as info:
        conn.execute(query, params)
    if conn.autocommit:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    return info.value


def attempt(conn: psycopg.Connection, model_task: str) -> None:
    """Run a transform whose model's own code may run: whether the load then succeeds does not matter here."""
    with contextlib.suppress(errors.Error):
        conn.execute(TRANSFORM, [model_task])


def test_set_narrows_the_whitelist(conn: psycopg.Connection) -> None:
    assert labels(conn, "sst-a")
    conn.execute("SET pgml.huggingface_whitelist = 'sst-b'")
    error = refused(conn, TRANSFORM, [task("sst-a")])
    assert error.sqlstate == "42501"
    assert error.diag.message_primary == "model sst-a is not whitelisted"  # PostgresML's message
    assert "pgml.huggingface_whitelist" in (error.diag.message_hint or "")
    assert labels(conn, "sst-b")
    conn.execute("SELECT set_config('pgml.huggingface_whitelist', '\"sst-a,sst-b\"', false)")  # PostgresML's quotes
    assert labels(conn, "sst-a") and labels(conn, "sst-b")
    conn.execute("RESET pgml.huggingface_whitelist")
    assert labels(conn, "sst-a")


def test_a_session_setting_never_widens_engine(conn: psycopg.Connection) -> None:
    conn.execute("SET pgml.huggingface_whitelist = 'sst-c,sst-a'")
    error = refused(conn, TRANSFORM, [task("sst-c")])
    assert error.sqlstate == "42501"
    assert error.diag.message_primary == 'model "sst-c" is not in the allowed models'
    assert labels(conn, "sst-a")


def test_set_local_ends_with_its_transaction(conn: psycopg.Connection) -> None:
    conn.autocommit = False
    with conn.transaction():
        conn.execute("SET LOCAL pgml.huggingface_whitelist = 'sst-b'")
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():  # a savepoint
            conn.execute(TRANSFORM, [task("sst-a")])
        assert labels(conn, "sst-b")
        conn.execute("SELECT set_config('pgml.huggingface_whitelist', 'sst-a', true)")
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            conn.execute(TRANSFORM, [task("sst-b")])
    conn.autocommit = True
    assert labels(conn, "sst-a") and labels(conn, "sst-b")  # both gone with the transaction


def test_alter_role_and_database_apply_to_new_sessions(setup: Setup, conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("ALTER ROLE {} SET pgml.huggingface_whitelist = 'sst-b'").format(sql.Identifier(ROLE)))
    try:
        with psycopg.connect(setup.proxy.dsn(user=ROLE), autocommit=True) as role:
            assert refused(role, TRANSFORM, [task("sst-a")]).sqlstate == "42501"
            assert labels(role, "sst-b")
        assert labels(conn, "sst-a")  # another role's sessions keep their own
        conn.execute("ALTER DATABASE postgres SET pgml.huggingface_whitelist = 'sst-a'")
        with psycopg.connect(setup.proxy.dsn(), autocommit=True) as fresh:
            assert refused(fresh, TRANSFORM, [task("sst-b")]).sqlstate == "42501"
            assert labels(fresh, "sst-a")
    finally:
        conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(ROLE)))
        conn.execute("ALTER DATABASE postgres RESET pgml.huggingface_whitelist")


def test_set_before_the_call_in_one_query_string(setup: Setup) -> None:
    """psql's simple query: the SET earlier in the string runs first, and the call's read sees it."""
    query = (
        "SET pgml.huggingface_whitelist = 'sst-b';"
        f" SELECT pgml.transform(task => '{task('sst-a')}'::jsonb, inputs => ARRAY['x'])"
    )
    psql = find_bin_dir(int(os.environ.get("PGML_TEST_PG", "18"))) / "psql"
    done = subprocess.run(
        [str(psql), setup.proxy.dsn(), "-X", "-v", "ON_ERROR_STOP=1", "-c", query],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "model sst-a is not whitelisted" in done.stderr


def test_trust_remote_code_needs_the_session_setting(setup: Setup, conn: psycopg.Connection) -> None:
    """PostgresML's default is off: [engine] trust_remote_code alone does not run a model's code."""
    setup.ran()
    wants = task("evil", trust_remote_code=True)
    error = refused(conn, TRANSFORM, [wants])
    assert error.sqlstate == "42501"
    assert error.diag.message_primary == "model evil is not trusted to run remote code"
    assert not setup.ran()
    # As in PostgresML, the session's trust settings govern transform only: its own embedding.sql asks embed for
    # trust_remote_code with them unset, and [engine] trust_remote_code (on here) alone decides.
    embed = "SELECT pgml.embed('evil', 'x', '{\"trust_remote_code\": true}')"
    try:
        conn.execute(embed)
    except psycopg.Error as exc:
        assert exc.sqlstate != "42501", exc  # evil is no sentence-transformers model: whatever fails, not trust
    assert setup.ran()  # its code ran (imported once: a later load of evil does not run it again)
    conn.execute("SET pgml.huggingface_trust_remote_code = on")
    try:  # allowed now (whether evil then loads as a pipeline does not matter)
        conn.execute(TRANSFORM, [wants])
    except psycopg.Error as exc:
        assert exc.sqlstate != "42501", exc
    conn.execute("SET pgml.huggingface_trust_remote_code_whitelist = 'evil-2'")
    assert refused(conn, TRANSFORM, [wants]).sqlstate == "42501"
    assert not setup.ran()
    attempt(conn, task("evil-2", trust_remote_code=True))  # in the list: its code runs (loaded the first time)
    assert setup.ran()
    conn.execute("SET pgml.huggingface_trust_remote_code_whitelist = 'evil'")
    assert refused(conn, TRANSFORM, [task("evil-2", trust_remote_code=True)]).sqlstate == "42501"
    assert labels(conn, "sst-a")  # models that ask for no code of their own are not concerned
    conn.execute("SET pgml.huggingface_trust_remote_code = 'maybe'")
    error = refused(conn, TRANSFORM, [wants])
    assert error.sqlstate == "22023"
    assert error.diag.message_primary == 'invalid value for parameter "pgml.huggingface_trust_remote_code": "maybe"'


def test_every_model_named_in_the_kwargs_is_checked(setup: Setup, conn: psycopg.Connection) -> None:
    """A tokenizer (or config, processor …) is checked as the model: the session's whitelists and the trust
    whitelist; an assistant model is refused (22023) as generation args refuse it."""
    setup.ran()
    conn.execute("SET pgml.huggingface_trust_remote_code = on")
    conn.execute("SET pgml.huggingface_trust_remote_code_whitelist = 'sst-a'")
    error = refused(conn, TRANSFORM, [task("sst-a", trust_remote_code=True, tokenizer="evil")])
    assert error.sqlstate == "42501"
    assert error.diag.message_primary == "model evil is not trusted to run remote code"
    assert not setup.ran()
    for kwarg in ("video_processor", "config", "processor"):
        assert refused(conn, TRANSFORM, [task("sst-a", trust_remote_code=True, **{kwarg: "evil"})]).sqlstate == "42501"
    assert not setup.ran()
    conn.execute("RESET pgml.huggingface_trust_remote_code_whitelist")
    conn.execute("RESET pgml.huggingface_trust_remote_code")
    generation = json.dumps({"task": "text-generation", "model": "gpt", "assistant_model": "gpt"})
    assert refused(conn, TRANSFORM, [generation]).sqlstate == "22023"
    conn.execute("SET pgml.huggingface_whitelist = 'sst-a'")
    error = refused(conn, TRANSFORM, [task("sst-a", tokenizer="sst-b")])
    assert (error.sqlstate, error.diag.message_primary) == ("42501", "model sst-b is not whitelisted")
    conn.execute("SET pgml.huggingface_whitelist = 'sst-a,sst-b'")
    row = conn.execute(TRANSFORM, [task("sst-a", tokenizer="sst-b")]).fetchone()  # allowed: it loads
    assert row is not None and row[0]
    conn.execute("RESET pgml.huggingface_whitelist")


def test_engine_refusal_stays_whatever_the_session_says(setup: Setup, tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{setup.cluster.port}/postgres"
    strict = start_proxy(dsn, tmp_path, PGML_PROXY_ENGINE_MODEL_DIRS=str(setup.models), PGML_PROXY_ENGINE_DEVICE="cpu")
    try:
        with psycopg.connect(strict.dsn(), autocommit=True) as conn:
            conn.execute("SET pgml.huggingface_trust_remote_code = on")
            conn.execute("SET pgml.huggingface_trust_remote_code_whitelist = 'evil'")
            error = refused(conn, TRANSFORM, [task("evil", trust_remote_code=True)])
            assert error.sqlstate == "22023"
            assert error.diag.message_primary == "trust_remote_code is not allowed"
            assert not setup.ran()
    finally:
        strict.stop()


def test_transform_stream_is_narrowed(conn: psycopg.Connection) -> None:
    """The proxy's own streams (a top-level SELECT, a cursor) read the settings as the rewriter does."""
    stream = json.dumps({"task": "text-generation", "model": "gpt"})
    select = "SELECT pgml.transform_stream(%s::jsonb, '{\"max_new_tokens\": 2}'::jsonb, 'hello')"
    assert conn.execute(select, [stream]).fetchall()
    conn.execute("SET pgml.huggingface_whitelist = 'sst-a'")
    assert refused(conn, select, [stream]).sqlstate == "42501"
    error = refused(conn, select.replace("%s", f"'{stream}'"), [])  # a simple-protocol-shaped constant call
    assert error.sqlstate == "42501"
    conn.autocommit = False
    with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
        conn.execute(f"DECLARE c CURSOR FOR {select.replace('%s', repr(stream))}")
        conn.execute("FETCH 1 FROM c")
    conn.autocommit = True
    conn.execute("SET pgml.huggingface_whitelist = 'gpt'")
    assert conn.execute(select, [stream]).fetchall()


def test_omp_num_threads_puts_back_the_configured_count() -> None:
    """After a limited job a thread computes with the engine's configured count, also one that picked up a
    lowered count (its first torch use while another session's limit held); a limit never raises past it."""
    import torch  # lazy, as the engine imports it: seconds

    configured = torch.get_num_threads()
    with limited(SessionSettings(omp_num_threads=1), "embed"):  # the engine's count is recorded before any limit
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == configured
    seen: dict[str, int] = {}

    def worker() -> None:
        torch.set_num_threads(1)  # as a thread that first used torch under another session's limit
        with limited(SessionSettings(omp_num_threads=configured + 4), "embed"):
            seen["within"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads()
        torch.set_num_threads(1)
        with limited(None, "embed"):
            seen["unlimited"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"within": configured, "after": configured, "unlimited": configured}
    torch.set_num_threads(configured)


def test_omp_num_threads_lowers_the_jobs_threads(setup: Setup, conn: psycopg.Connection) -> None:
    """torch's thread count in the job's own thread, as the engine logs it at debug."""
    before = setup.proxy.log_text().count("(pgml.omp_num_threads)")
    assert labels(conn, "sst-a")
    assert setup.proxy.log_text().count("(pgml.omp_num_threads)") == before  # unset: left as it is
    conn.execute("SET pgml.omp_num_threads = 1")
    assert labels(conn, "sst-a")
    assert "pgml.transform computes with 1 threads (pgml.omp_num_threads)" in setup.proxy.log_text()
    conn.execute("SET pgml.omp_num_threads = 0")
    error = refused(conn, TRANSFORM, [task("sst-a")])
    assert error.sqlstate == "22023"
    assert "outside the valid range" in (error.diag.message_primary or "")


def test_only_governed_statements_read_the_settings(setup: Setup, conn: psycopg.Connection) -> None:
    """No query for relayed statements or calls the settings do not govern; one per statement that has any."""
    start = setup.reads()
    conn.execute("SELECT 1")
    conn.execute("SELECT pgml.version()")
    conn.execute("SELECT * FROM pgml.chunk('character', 'a b c')")
    conn.execute("SET pgml.huggingface_whitelist = 'sst-a,sst-b'")
    assert setup.reads() == start
    conn.execute(
        "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['x']),"
        " pgml.transform(task => %s::jsonb, inputs => ARRAY['y'])",
        [task("sst-a"), task("sst-b")],
    )
    assert setup.reads() == start + 1
    conn.execute(
        "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY[t]) FROM (VALUES ('a'), ('b')) v(t)", [task("sst-a")]
    )
    assert setup.reads() == start + 2


def test_settings_values_parse_as_postgresml_does() -> None:

    assert parse(None, None, None, None) == parse("", "", "", "")
    settings = parse('"a,b,,c"', "yes", " x , y ", "4")
    assert settings.whitelist == ("a", "b", "c")
    assert settings.trust_remote_code is True
    assert settings.trust_remote_code_whitelist == ("x", "y")
    assert settings.omp_num_threads == 4
    for text in ("on", "TRUE", "t", "1", "y"):
        assert parse(None, text, None, None).trust_remote_code
    for text in ("off", "of", "false", "F", "0", "n", "no"):
        assert not parse(None, text, None, None).trust_remote_code
    for bad in ("o", "2", "maybe"):
        with pytest.raises(InvalidParameterValue):
            parse(None, bad, None, None)
    for bad in ("0", "-1", "x", "1.5", "2147483648"):
        with pytest.raises(InvalidParameterValue):
            parse(None, None, None, bad)
    assert re.fullmatch(
        r"SELECT( pg_catalog\.current_setting\('pgml\.\w+', true\),){4} "
        r"pg_catalog\.current_setting\('client_min_messages'\)",
        READ,
    )


def test_reading_reads_once_per_statement_and_only_for_governed_calls() -> None:
    """Sans-IO: the wrapper around a decision's steps, run from recorded answers."""

    transform, chunk = signatures("transform")[0], signatures("chunk")[0]

    def decision() -> Steps[list[object]]:
        return [(yield Evaluate(chunk, ())), (yield Evaluate(transform, ())), (yield Evaluate(transform, ()))]

    seen: list[Request] = []

    def answer(request: Request) -> object:
        seen.append(request)
        if isinstance(request, Run):
            assert request.statements[0].sql == READ
            return [Result(rows=[("a,b", "on", None, "2", "error")])]
        if isinstance(request, Evaluate):
            return request.settings, request.silenced
        return None

    expected = (SessionSettings(("a", "b"), True, (), 2), frozenset({"NOTICE", "WARNING"}))
    assert replay(reading(decision()), answer) == [(None, None), expected, expected]
    assert [type(r).__name__ for r in seen] == ["Evaluate", "Run", "Evaluate", "Evaluate"]
    seen.clear()
    assert replay(reading(decision()), answer)[0] == (None, None)  # ungoverned: nothing read for it
    once = Once()
    replay(reading(decision(), once), answer)
    seen.clear()
    replay(reading(decision(), once), answer)  # a streamed portal's next Execute: read already
    assert [type(r).__name__ for r in seen] == ["Evaluate", "Evaluate", "Evaluate"]

    def failing() -> Steps[str]:
        try:
            yield Evaluate(transform, ())
        except InvalidParameterValue as exc:  # thrown in where the call was yielded
            return exc.sqlstate
        return "no error"

    def bad(request: Request) -> object:
        return [Result(rows=[(None, "maybe", None, None, "notice")])] if isinstance(request, Run) else None

    assert replay(reading(failing()), bad) == "22023"
