"""Callback mode: pgml.* run by the database itself (generated columns, triggers, views, SQL functions, DO
blocks, server-side training) call pgml-proxy back through dblink, with the same values as the proxy's batched
path, the original SQLSTATE on errors, no recursion, and non-superusers authorized by their user mappings.

On the system's PostgreSQL 15 (the bundled 16/18 lack dblink), whatever ``PGML_TEST_PG`` says: a cluster of its
own whose roles other than postgres authenticate by SCRAM password (dblink demands one of non-superusers), and a
proxy in front of it whose ``[callback]`` section lets ``CREATE EXTENSION pgml`` set callbacks up too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.callback import Setup
from proxy.config import ConfigError, load
from proxy.embedded import Cluster, system_bin_dir
from tests.conftest import MINILM, ROOT, Postgres, ProxyProcess, scratch_database, start_proxy

PASSWORD = "cb-secret-4711"
ROLES = {"cb": PASSWORD, "alice": "alice-pw", "bob": "bob-pw", "owner": "owner-pw"}


@dataclass
class Setting:
    """The cluster, the proxy in front of it, and a database set up for callbacks by ``pgml-proxy init``."""

    pg: Postgres
    proxy: ProxyProcess
    db: str
    password_file: Path

    def direct(self, user: str = "postgres", db: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        dsn = self.pg.dsn(user, db or self.db, ROLES.get(user))
        return psycopg.connect(dsn, autocommit=True, **kwargs)

    def through(self, user: str = "postgres", db: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(self.proxy.dsn(user, db or self.db, ROLES.get(user)), autocommit=True)

    def target(self) -> str:
        return f"host=127.0.0.1 port={self.proxy.port}"

    def init(self, user: str, db: str, *flags: str) -> subprocess.CompletedProcess[str]:
        """``pgml-proxy init`` (the real command line) on ``db`` as ``user``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")}
        env["PGML_PROXY_UPSTREAM"] = self.pg.dsn(user, db, ROLES.get(user))
        return subprocess.run(
            [sys.executable, "-m", "proxy", "init", *flags], cwd=ROOT, env=env, capture_output=True, text=True
        )


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Setting]:
    bin_dir = system_bin_dir(15)
    assert bin_dir is not None, "the system PostgreSQL 15 server is required (make test installs it: make deps)"
    base = tmp_path_factory.mktemp("callback")
    cluster = Cluster(bin_dir, base / "data")
    cluster.init()
    cluster.start()
    cluster.set_hba(["host all postgres 127.0.0.1/32 trust", "host all all 127.0.0.1/32 scram-sha-256"])
    pg = Postgres("127.0.0.1", cluster.port, cluster, 15)
    password_file = base / "callback.password"
    password_file.write_text(PASSWORD + "\n")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        for role, password in ROLES.items():
            admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    proxy = start_proxy(pg.dsn(), base, PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir))
    try:
        with scratch_database(pg, "cb") as db:
            yield Setting(pg, proxy, db, password_file)
    finally:
        proxy.stop()
        cluster.stop("immediate")


@pytest.fixture(scope="module")
def ready(setting: Setting) -> Setting:
    """``setting``'s database with callbacks on (init as a superuser), its tables readable by the callback role."""
    done = setting.init(
        "postgres", setting.db, "--callback", setting.target(), "--callback-user", "cb",
        "--callback-password-file", str(setting.password_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "callback mode is on" in done.stdout and PASSWORD not in done.stdout + done.stderr
    with setting.direct() as conn:
        # postgres's callbacks act as postgres (a mapping of its own); everyone else's as cb (FOR PUBLIC).
        conn.execute("CREATE USER MAPPING FOR postgres SERVER pgml_callback OPTIONS (user 'postgres')")
        conn.execute(
            "CREATE TABLE cb_train AS SELECT g::real AS x, (2 * g + 1)::real AS y FROM generate_series(1, 40) g"
        )
        conn.execute("GRANT SELECT ON cb_train TO PUBLIC")
    return setting


def embeddings(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> list[list[float]]:
    return [list(row[0]) for row in conn.execute(sql, params).fetchall()]


def assert_proxy_values(setting: Setting, texts: list[str], got: list[list[float]]) -> None:
    """``got`` are the vectors the proxy gives for ``texts``: the same values as its constant call of each text (the
    callback's statement), and as its batched path (one statement embedding all rows in one forward pass, where
    padding to the longest text moves the last float digits only)."""
    with setting.through() as conn:
        single = [embeddings(conn, f"SELECT pgml.embed('{MINILM}', '{text}')")[0] for text in texts]
        together = embeddings(
            conn,
            f"SELECT pgml.embed('{MINILM}', t) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
            (texts,),
        )
    assert got == single
    assert len(got) == len(together) and all(len(g) == len(t) == 384 for g, t in zip(got, together, strict=True))
    assert max(abs(a - b) for g, t in zip(got, together, strict=True) for a, b in zip(g, t, strict=True)) < 1e-5


def test_without_callbacks_the_stubs_say_how_to_enable_them(setting: Setting) -> None:
    with scratch_database(setting.pg, "nocb") as db:
        done = setting.init("postgres", db)
        assert done.returncode == 0, done.stderr
        with setting.direct(db=db) as conn, pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.embed(%s, 'x')", (MINILM,))
    assert info.value.sqlstate == "0A000"
    assert "--callback" in (info.value.diag.message_hint or "")


def test_generated_column_filled_by_a_direct_insert(ready: Setting) -> None:
    texts = ["a generated column", "filled by the server", "through a callback"]
    with ready.direct() as conn:
        conn.execute(
            "CREATE TABLE gen_docs (id serial PRIMARY KEY, body text,"
            f" emb real[] GENERATED ALWAYS AS (pgml.embed('{MINILM}', body)) STORED)"
        )
        for text in texts:
            conn.execute("INSERT INTO gen_docs (body) VALUES (%s)", (text,))
        conn.execute("INSERT INTO gen_docs (body) VALUES (NULL)")  # STRICT: no call, NULL
        stored = embeddings(conn, "SELECT emb FROM gen_docs WHERE body IS NOT NULL ORDER BY id")
        assert conn.execute("SELECT emb FROM gen_docs WHERE body IS NULL").fetchone() == (None,)
    assert_proxy_values(ready, texts, stored)


def test_trigger_embeds_on_insert_and_update(ready: Setting) -> None:
    with ready.direct() as conn:
        conn.execute("CREATE TABLE trig_docs (id int PRIMARY KEY, body text, emb real[])")
        conn.execute(
            "CREATE FUNCTION trig_embed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" NEW.emb := pgml.embed('{MINILM}', NEW.body); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER embed BEFORE INSERT OR UPDATE OF body ON trig_docs"
            " FOR EACH ROW EXECUTE FUNCTION trig_embed()"
        )
        conn.execute("INSERT INTO trig_docs (id, body) VALUES (1, 'first words'), (2, 'second words')")
        inserted = embeddings(conn, "SELECT emb FROM trig_docs ORDER BY id")
        conn.execute("UPDATE trig_docs SET body = 'changed words' WHERE id = 2")
        updated = embeddings(conn, "SELECT emb FROM trig_docs ORDER BY id")
    assert_proxy_values(ready, ["first words", "second words"], inserted)
    assert_proxy_values(ready, ["first words", "changed words"], updated)


def test_view_with_per_row_calls_directly_and_through_the_proxy(ready: Setting) -> None:
    texts = ["one view row", "another view row"]
    with ready.direct() as conn:
        conn.execute("CREATE TABLE view_docs (id int, body text)")
        conn.execute("INSERT INTO view_docs SELECT n, t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)", (texts,))
        conn.execute(f"CREATE VIEW view_embs AS SELECT id, pgml.embed('{MINILM}', body) AS emb FROM view_docs")
        direct = embeddings(conn, "SELECT emb FROM view_embs ORDER BY id")
        conn.execute("SET force_parallel_mode = on")  # PARALLEL SAFE: a parallel worker calls back on its own
        assert embeddings(conn, "SELECT emb FROM view_embs ORDER BY id") == direct
    with ready.through() as conn:
        through = embeddings(conn, "SELECT emb FROM view_embs ORDER BY id")
    assert direct == through
    assert_proxy_values(ready, texts, direct)


def test_sql_function_and_do_block_call_predict(ready: Setting) -> None:
    with ready.through() as conn:
        conn.execute("SELECT * FROM pgml.train('cb_linear', 'regression', 'cb_train', 'y')")
        expected = conn.execute("SELECT pgml.predict('cb_linear', ARRAY[3]::real[])").fetchone()
    with ready.direct() as conn:
        conn.execute(
            "CREATE FUNCTION cb_score(x real) RETURNS real LANGUAGE sql"
            " AS $$ SELECT pgml.predict('cb_linear', ARRAY[x]) $$"
        )
        assert conn.execute("SELECT cb_score(3)").fetchone() == expected
        conn.execute("CREATE TABLE cb_scores (v real)")
        conn.execute("DO $$ BEGIN INSERT INTO cb_scores VALUES (pgml.predict('cb_linear', ARRAY[3]::real[])); END $$")
        assert conn.execute("SELECT v FROM cb_scores").fetchone() == expected
        # Set-returning stubs return every row.
        batch = conn.execute("SELECT * FROM pgml.predict_batch('cb_linear', ARRAY[1, 2, 3]::real[])").fetchall()
    assert len(batch) == 3 and batch[2] == expected


def test_train_from_a_server_side_function_commits_on_its_own(ready: Setting) -> None:
    with ready.direct() as conn:
        conn.execute(
            "CREATE FUNCTION nightly() RETURNS text LANGUAGE plpgsql AS $$ DECLARE r record; BEGIN"
            " SELECT * INTO r FROM pgml.train('cb_nightly', 'regression', 'cb_train', 'y'); RETURN r.project; END $$"
        )
        count = (
            "SELECT count(*) FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = 'cb_nightly'"
        )
        assert conn.execute("SELECT nightly()").fetchone() == ("cb_nightly",)
        assert conn.execute(count).fetchone() == (1,)
        with conn.transaction(force_rollback=True):  # the callback's transaction is its own: the model stays
            conn.execute("SELECT nightly()")
        assert conn.execute(count).fetchone() == (2,)
        assert conn.execute("SELECT pgml.predict('cb_nightly', ARRAY[10]::real[])").fetchone() == (
            pytest.approx(21, abs=0.01),
        )


def test_callback_errors_keep_their_sqlstate_and_message(ready: Setting) -> None:
    with ready.direct() as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.predict('cb_no_such_project', ARRAY[1]::real[])")
        assert info.value.sqlstate == "42704"
        assert info.value.diag.message_primary == "No deployed model exists for the project named: `cb_no_such_project`"
        conn.execute(
            "CREATE TABLE err_docs (body text,"
            " emb real[] GENERATED ALWAYS AS (pgml.embed('no/such-model', body)) STORED)"
        )
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO err_docs (body) VALUES ('x')")
        assert info.value.sqlstate == "42704"
        assert conn.execute("SELECT count(*) FROM err_docs").fetchone() == (0,)
        assert conn.execute("SELECT array_length(pgml.embed(%s, 'after an error'), 1)", (MINILM,)).fetchone() == (384,)


def test_no_callback_recursion(ready: Setting) -> None:
    with ready.direct(options="-c pgml_proxy.callback=on") as conn, pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT pgml.embed(%s, 'x')", (MINILM,))
    assert info.value.sqlstate == "0A000" and "from inside a callback" in (info.value.diag.message_primary or "")
    # train over a view whose rows call pgml.embed, run by the server: the proxy reads the view in the
    # callback's session, where the embed refuses to call back again; the error reaches the caller.
    with ready.direct() as conn:
        conn.execute("CREATE TABLE rec_docs AS SELECT 'text ' || g AS body, g::real AS y FROM generate_series(1, 8) g")
        conn.execute(f"CREATE VIEW rec_features AS SELECT pgml.embed('{MINILM}', body) AS features, y FROM rec_docs")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT * FROM pgml.train('cb_rec', 'regression', 'rec_features', 'y')")
    assert info.value.sqlstate == "0A000" and "from inside a callback" in (info.value.diag.message_primary or "")
    # Through the proxy the same train works: the view's embeds call back from the client's session.
    with ready.through() as conn:
        trained = conn.execute("SELECT * FROM pgml.train('cb_rec', 'regression', 'rec_features', 'y')").fetchone()
    assert trained is not None and trained[0] == "cb_rec"


def test_the_callers_pgml_settings_reach_its_callbacks(ready: Setting) -> None:
    # The caller's SET, SET LOCAL and ALTER ROLE … SET reach the callback session (the user mapping's role, cb):
    # each stub sends them ahead of its call, all of them every time, so none outlives them on dblink's connection.
    task = json.dumps({"task": "feature-extraction", "model": MINILM})
    call = f"SELECT pgml.transform('{task}'::jsonb, inputs => ARRAY['settings'])"
    in_do = f"DO $$ BEGIN PERFORM pgml.transform('{task}'::jsonb, inputs => ARRAY['settings']); END $$"
    with ready.direct("bob") as bob:
        assert bob.execute(call).fetchone() is not None
        bob.execute("SET pgml.huggingface_whitelist = 'some/other-model'")
        for sql in (call, in_do):
            error = refused(bob, sql)
            assert error.sqlstate == "42501", sql
            assert error.diag.message_primary == f"model {MINILM} is not whitelisted", sql
        bob.execute(f"SET pgml.huggingface_whitelist = 'some/other-model, {MINILM}'")
        bob.execute(in_do)
        bob.execute("RESET pgml.huggingface_whitelist")
        assert bob.execute(call).fetchone() is not None  # nothing stale on the callback connection
        with bob.transaction():
            bob.execute("SET LOCAL pgml.omp_num_threads = 'many'")
            error = refused(bob, call)
        assert error.sqlstate == "22023" and "pgml.omp_num_threads" in (error.diag.message_primary or "")
        bob.execute(in_do)
    with ready.direct() as conn:
        conn.execute("ALTER ROLE bob SET pgml.huggingface_whitelist = 'some/other-model'")
    try:
        with ready.direct("bob") as bob:
            assert refused(bob, in_do).sqlstate == "42501"
        with ready.direct("alice") as alice:  # another caller of the same mapping role is not narrowed
            alice.execute(in_do)
    finally:
        with ready.direct() as conn:
            conn.execute("ALTER ROLE bob RESET pgml.huggingface_whitelist")


def test_config_refuses_a_target_with_credentials() -> None:
    with pytest.raises(ConfigError, match=r"callback\.target"):
        load(None, {"PGML_PROXY_CALLBACK_TARGET": "host=db user=cb password=x"})
    setup = Setup.of(
        load(
            None, {"PGML_PROXY_CALLBACK_TARGET": "host=db port=6432", "PGML_PROXY_CALLBACK_PASSWORD": PASSWORD}
        ).callback
    )
    assert setup is not None and setup.options == (("host", "db"), ("port", "6432")) and setup.password == PASSWORD
    assert PASSWORD not in repr(setup) + setup.describe()


def test_non_superusers_act_as_their_mapping(ready: Setting) -> None:
    with ready.direct() as conn:
        conn.execute("CREATE USER MAPPING FOR alice SERVER pgml_callback OPTIONS (user 'alice', password 'alice-pw')")
        conn.execute("GRANT CREATE ON SCHEMA public TO alice")
    with ready.direct("bob") as bob:  # no mapping of its own: FOR PUBLIC, as cb (by password)
        assert bob.execute("SELECT array_length(pgml.embed(%s, 'bob'), 1)", (MINILM,)).fetchone() == (384,)
    with ready.direct("alice") as alice:
        alice.execute(
            "CREATE TABLE alice_train AS SELECT g::real AS x, (3 * g)::real AS y FROM generate_series(1, 30) g"
        )
        alice.execute("SELECT * FROM pgml.train('cb_alice', 'regression', 'alice_train', 'y')")
    with ready.direct() as conn:
        owner = conn.execute("SELECT owner::text FROM pgml.projects WHERE name = 'cb_alice'").fetchone()
    assert owner == ("alice",)
    with ready.direct("bob") as bob, pytest.raises(psycopg.Error) as info:
        bob.execute("SELECT pgml.predict('cb_alice', ARRAY[1]::real[])")
    assert info.value.sqlstate == "42501"


def test_set_up_by_a_non_superuser_owner(setting: Setting) -> None:
    flags = (
        "--callback",
        setting.target(),
        "--callback-user",
        "cb",
        "--callback-password-file",
        str(setting.password_file),
    )
    with scratch_database(setting.pg, "own") as db:
        with setting.direct(db=db) as admin:
            admin.execute(f"ALTER DATABASE {db} OWNER TO owner")
        refused = setting.init("owner", db, *flags)  # dblink missing, and owner may not create it
        assert refused.returncode == 1
        assert "42501" in refused.stderr and "CREATE EXTENSION dblink" in refused.stderr
        with setting.direct(db=db) as admin:
            admin.execute("CREATE EXTENSION dblink")
            admin.execute("GRANT USAGE ON FOREIGN DATA WRAPPER dblink_fdw TO owner")
        done = setting.init("owner", db, *flags)
        assert done.returncode == 0, done.stderr
        with setting.direct("owner", db) as conn:
            assert conn.execute("SELECT array_length(pgml.embed(%s, 'own'), 1)", (MINILM,)).fetchone() == (384,)
        again = setting.init("owner", db, "--callback", setting.target() + " application_name=nightly")
        assert again.returncode == 0, again.stderr
        with setting.direct("owner", db) as conn:
            options = conn.execute(
                "SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'pgml_callback'"
            ).fetchone()
            assert options is not None and "application_name=nightly" in options[0]
            assert conn.execute("SELECT array_length(pgml.embed(%s, 'again'), 1)", (MINILM,)).fetchone() == (384,)
        off = setting.init("owner", db, "--no-callback")
        assert off.returncode == 0, off.stderr
        with setting.direct("owner", db) as conn, pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.embed(%s, 'off')", (MINILM,))
        assert info.value.sqlstate == "0A000"


def test_create_extension_through_the_proxy_sets_callbacks_up(setting: Setting, model_dir: Path) -> None:
    proxy = start_proxy(
        setting.pg.dsn(),
        setting.password_file.parent,
        PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir),
        PGML_PROXY_CALLBACK_TARGET=setting.target(),
        PGML_PROXY_CALLBACK_USER="cb",
        PGML_PROXY_CALLBACK_PASSWORD=PASSWORD,
    )
    try:
        with scratch_database(setting.pg, "ext") as db:
            with setting.direct(db=db) as admin:
                admin.execute("CREATE EXTENSION dblink")
            with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pgml")
            with setting.direct("bob", db) as conn:
                assert conn.execute("SELECT array_length(pgml.embed(%s, 'ext'), 1)", (MINILM,)).fetchone() == (384,)
    finally:
        proxy.stop()
    assert PASSWORD not in proxy.log_text()


def refused(conn: psycopg.Connection[Any], sql: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    return info.value


def test_the_callback_server_runs_only_the_stubs_calls(ready: Setting) -> None:
    through_server = [
        "SELECT * FROM dblink('pgml_callback', 'SELECT current_user') AS t(u text)",
        "SELECT dblink_exec('pgml_callback', 'CREATE TABLE cb_smuggled ()')",
        f"SELECT * FROM dblink('pgml_callback', $$SELECT pgml.embed('{MINILM}', 'x'); DROP TABLE cb_train$$) t(e text)",
        "SELECT * FROM dblink('pgml_callback', 'SELECT pgml.embed(m, body) FROM t') AS t(e real[])",
        "SELECT * FROM dblink('pgml_callback', $$SELECT pgml.predict('p', ARRAY[1,2]), version()$$) t(p text, v text)",
        "SELECT * FROM dblink('pgml_callback', $$SELECT pgml.version() INTO cb_smuggled$$) AS t(v text)",
        "SELECT * FROM dblink('pgml_callback', 'SET search_path = public') AS t(s text)",
        # a stub's leading settings, bent to set something else or to run something else
        "SELECT * FROM dblink('pgml_callback', $$SET role TO 'postgres'; SELECT pgml.version()$$) AS t(v text)",
        "SELECT * FROM dblink('pgml_callback', $$SET pgml.omp_num_threads TO '1'; DROP TABLE cb_train$$) t(v text)",
    ]
    with ready.direct("bob") as bob:
        for sql in through_server:
            error = refused(bob, sql)
            assert error.sqlstate == "42501", sql
            assert "callback session runs only the pgml calls" in (error.diag.message_primary or ""), sql
            assert error.diag.message_hint
        # A named connection: refused statements leave it usable, the stubs' calls run on it.
        bob.execute("SELECT dblink_connect('mine', 'pgml_callback')")
        assert refused(bob, "SELECT dblink_exec('mine', 'DELETE FROM cb_train')").sqlstate == "42501"
        assert refused(bob, "SELECT dblink_exec('mine', 'BEGIN')").sqlstate == "42501"
        got = bob.execute(
            f"SELECT array_length(e, 1) FROM dblink('mine', $$SELECT pgml.embed('{MINILM}'::text, 'y'::text)$$)"
            " AS t(e real[])"
        ).fetchone()
        assert got == (384,)
        # The stubs themselves still call back.
        assert bob.execute("SELECT array_length(pgml.embed(%s, 'bob'), 1)", (MINILM,)).fetchone() == (384,)
    with ready.direct() as conn:
        assert conn.execute("SELECT to_regclass('cb_smuggled')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM cb_train").fetchone() == (40,)


def test_a_direct_callback_session_is_restricted_too(ready: Setting) -> None:
    dsn = ready.proxy.dsn("bob", ready.db, ROLES["bob"])
    with psycopg.connect(
        dsn, autocommit=True, options="-c pgml_proxy.callback=on", cursor_factory=psycopg.ClientCursor
    ) as conn:
        assert refused(conn, "SELECT current_user").sqlstate == "42501"
        assert refused(conn, "SELECT 1; SELECT 2").sqlstate == "42501"
        with pytest.raises(psycopg.Error) as info, psycopg.Cursor(conn) as extended:
            extended.execute(f"SELECT pgml.embed('{MINILM}', %s)", ("x",))
        assert info.value.sqlstate == "42501"
        got = conn.execute(f"SELECT pgml.embed('{MINILM}', 'after refusals')").fetchone()
        assert got is not None and len(got[0]) == 384
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for options in ("--pgml-proxy.callback=on", "-cpgml_proxy.callback=yes", "-Ec PGML_PROXY.CALLBACK=on"):
        with psycopg.connect(dsn, autocommit=True, options=options, cursor_factory=psycopg.ClientCursor) as conn:
            assert refused(conn, "SELECT current_user").sqlstate == "42501", options
    with ready.through("bob") as normal:  # a normal session is unaffected
        assert normal.execute("SELECT current_user").fetchone() == ("bob",)
        with psycopg.connect(dsn, autocommit=True, options="-c pgml_proxy.callback=off") as off:
            assert off.execute("SELECT 1").fetchone() == (1,)


def test_dblink_sends_nothing_but_the_stubs_calls(setting: Setting, ready: Setting) -> None:
    """The protocol trace of a callback session: after the authentication, only the stub's Query (no SET, no other
    statement of dblink's or libpq's own)."""
    traced = start_proxy(
        setting.pg.dsn(), setting.password_file.parent, PGML_PROXY_LOG_TRACE_PROTOCOL="true",
        PGML_PROXY_ENGINE_MODEL_DIRS=ready.proxy.env["PGML_PROXY_ENGINE_MODEL_DIRS"],
    )  # fmt: skip
    try:
        with ready.direct() as conn:
            conn.execute(f"ALTER SERVER pgml_callback OPTIONS (SET port '{traced.port}')")
        try:
            with ready.direct("bob") as bob:
                assert bob.execute("SELECT array_length(pgml.embed(%s, 'traced'), 1)", (MINILM,)).fetchone() == (384,)
        finally:
            with ready.direct() as conn:
                conn.execute(f"ALTER SERVER pgml_callback OPTIONS (SET port '{ready.proxy.port}')")
    finally:
        traced.stop()
    sent = [
        line.split("client>proxy ", 1)[1].split(" ", 1)[0]
        for line in traced.log_text().splitlines()
        if "client>proxy" in line
    ]
    assert sent[0] == "StartupMessage" and sent.count("Query") == 1, sent  # (Terminate may come after the stop)
    first = sent.index("Query")
    assert set(sent[1:first]) <= {"PasswordMessage"} and set(sent[first + 1 :]) <= {"Terminate"}, sent
