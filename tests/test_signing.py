"""Signed model artifacts: engine.ml.signing's keys and signatures, and the whole path through real proxies.

Every database-backed test gets a database of its own (``pgml resign`` works on a whole database)
on the session's throwaway cluster; artifacts are tampered with as the superuser, directly on the
server, the way a role that can write ``pgml.files`` would.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from engine.api import UntrustedArtifact
from engine.ml import signing
from proxy import schema
from proxy.embedded import free_port
from tests.conftest import Postgres, ProxyProcess, scratch_database, start_proxy

ROOT = Path(__file__).resolve().parent.parent
HINT = "pgml-proxy resign --trust-unsigned"

# --------------------------------------------------------------------------- #
# engine.ml.signing
# --------------------------------------------------------------------------- #

KEY = bytes(range(32))


def test_the_signature_covers_every_field() -> None:
    base = ("db", 1, 2, "estimator.skops", b"bytes")
    reference = signing.sign(KEY, *base)
    assert len(reference) == 32 and signing.verify(KEY, *base, reference)
    variants = [
        ("db2", 1, 2, "estimator.skops", b"bytes"),
        ("db", 3, 2, "estimator.skops", b"bytes"),
        ("db", 1, 3, "estimator.skops", b"bytes"),
        ("db", 1, 2, "estimator.xgboost", b"bytes"),
        ("db", 1, 2, "estimator.skops", b"bytez"),
        ("db", 12, 2, "estimator.skops", b"bytes"),
    ]
    for variant in variants:
        assert signing.sign(KEY, *variant) != reference, variant
        assert not signing.verify(KEY, *variant, reference)
    assert signing.sign(bytes(32), *base) != reference
    assert not signing.verify(KEY, *base, None) and not signing.verify(KEY, *base, reference[:-1])


def test_fields_are_length_prefixed() -> None:
    # Moving bytes from one field to the next changes the message (no concatenation ambiguity).
    assert signing.message("ab", 1, 2, "p", b"x") != signing.message("a", 1, 2, "bp", b"x")
    assert signing.message("d", 1, 2, "estimator.a", b"bc") != signing.message("d", 1, 2, "estimator.ab", b"c")
    assert signing.sign(KEY, "d", 1, 2, "ab", b"c") != signing.sign(KEY, "d", 1, 2, "a", b"bc")


def test_ensure_key_creates_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "artifact.key"
    assert signing.ensure_key(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    content = path.read_text()
    assert len(bytes.fromhex(content.strip())) == 32 and content.endswith("\n")
    assert signing.ensure_key(path) is False and path.read_text() == content  # never overwritten
    assert signing.load_key(path) == bytes.fromhex(content.strip())
    assert not [p for p in path.parent.iterdir() if p.name != "artifact.key"]  # no temporary file left behind
    other = tmp_path / "other.key"
    signing.ensure_key(other)
    assert signing.load_key(other) != signing.load_key(path)


def test_load_key_accepts_hex_or_raw_and_caches_per_path(tmp_path: Path) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\xff" * 40)
    raw.chmod(0o600)
    assert signing.load_key(raw) == b"\xff" * 40
    hexed = tmp_path / "hex.key"
    hexed.write_text(("ab" * 32) + "\n")
    hexed.chmod(0o400)
    assert signing.load_key(hexed) == b"\xab" * 32
    hexed.chmod(0o600)
    hexed.write_text("cd" * 32)
    assert signing.load_key(hexed) == b"\xab" * 32  # read once per process: rotation means a restart


@pytest.mark.parametrize(
    ("content", "mode", "why"),
    [
        (b"ab" * 32, 0o644, "permissions"),
        (b"ab" * 32, 0o602, "permissions"),
        (b"ab" * 32, 0o620, "permissions"),
        (b"ab" * 31, 0o600, "holds 31 bytes"),
        (b"short", 0o600, "holds 5 bytes"),
        (b"", 0o600, "holds 0 bytes"),
    ],
)
def test_load_key_refuses_unsafe_or_short_keys(tmp_path: Path, content: bytes, mode: int, why: str) -> None:
    path = tmp_path / f"key-{secrets.token_hex(4)}"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(UntrustedArtifact, match=why) as refused:
        signing.load_key(path)
    assert str(path) in refused.value.message and refused.value.sqlstate == "58000"
    assert content.decode() not in refused.value.message or not content  # the key is never in the message


def test_load_key_refuses_missing_files_and_warns_on_group_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(UntrustedArtifact, match="cannot open it"):
        signing.load_key(tmp_path / "absent.key")
    with pytest.raises(UntrustedArtifact, match="not a regular file"):
        signing.load_key(tmp_path)
    shared = tmp_path / "group.key"
    shared.write_text("ef" * 32)
    shared.chmod(0o640)
    with caplog.at_level(logging.WARNING, "pgml-proxy.engine"):
        assert signing.load_key(shared) == b"\xef" * 32
    assert "readable by its group" in caplog.text and "ef" * 32 not in caplog.text


def test_default_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tmp_path / "cluster" / ".pgdata"
    assert signing.default_key_file(str(data)) == tmp_path / "cluster" / ".pgml-proxy-artifact.key"
    monkeypatch.chdir(tmp_path)
    assert signing.default_key_file(".pgdata") == tmp_path / ".pgml-proxy-artifact.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert signing.default_key_file(None) == tmp_path / "xdg" / "pgml-proxy" / "artifact.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the spec: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert signing.default_key_file(None) == tmp_path / "home" / ".config" / "pgml-proxy" / "artifact.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert signing.default_key_file("") == tmp_path / "home" / ".config" / "pgml-proxy" / "artifact.key"


def test_the_repository_ignores_the_embedded_default_key() -> None:
    assert signing.DEFAULT_FILE_NAME in (ROOT / ".gitignore").read_text().split()


# --------------------------------------------------------------------------- #
# Through real proxies
# --------------------------------------------------------------------------- #


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")}, **extra}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def signed_proxy(pg: Postgres, keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose key file does not exist yet: it creates it."""
    handle = start_proxy(
        pg.dsn(), tmp_path_factory.mktemp("signed"), PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(keys / "first.key")
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def database(pg: Postgres) -> Iterator[str]:
    """A fresh database with the pgml schema, a regression table ``sig_data`` and a classification one."""
    with scratch_database(pg, "signing") as name:
        schema.init(pg.dsn(dbname=name))
        with psycopg.connect(pg.dsn(dbname=name), autocommit=True) as c:
            c.execute(
                "CREATE TABLE sig_data AS SELECT i::float4 AS x1, (i % 7)::float4 AS x2,"
                " (2 * i + 3 * (i % 7) + 1)::float4 AS y FROM generate_series(1, 60) i"
            )
            c.execute(
                "CREATE TABLE sig_classes AS SELECT i::float4 AS x1, (i % 7)::float4 AS x2, (i > 30) AS big"
                " FROM generate_series(1, 60) i"
            )
        yield name


def connect(proxy: ProxyProcess, database: str) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=database), autocommit=True)


def train(proxy: ProxyProcess, database: str, project: str, classification: bool = False) -> int:
    task, relation, y = ("classification", "sig_classes", "big") if classification else ("regression", "sig_data", "y")
    with connect(proxy, database) as c:
        c.execute("SELECT * FROM pgml.train(%s, %s, %s, %s, 'linear')", [project, task, relation, y]).fetchall()
        row = c.execute(
            "SELECT max(m.id) FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = %s",
            [project],
        ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def predict(proxy: ProxyProcess, database: str, project: str) -> float:
    with connect(proxy, database) as c:
        row = c.execute("SELECT pgml.predict(%s, ARRAY[10.0, 3.0]::real[])", [project]).fetchone()
    assert row is not None
    return float(row[0])


def refused(proxy: ProxyProcess, database: str, project: str) -> errors.Error:
    """predict's error; the same session then still answers queries and predictions of sound models."""
    with connect(proxy, database) as c:
        with pytest.raises(psycopg.Error) as failure:
            c.execute("SELECT pgml.predict(%s, ARRAY[10.0, 3.0]::real[])", [project])
        assert c.execute("SELECT 41 + 1").fetchone() == (42,)
        with c.transaction():  # and a failed statement inside a transaction only aborts that transaction
            with pytest.raises(psycopg.Error), c.transaction():
                c.execute("SELECT pgml.predict(%s, ARRAY[10.0, 3.0]::real[])", [project])
            assert c.execute("SELECT 1").fetchone() == (1,)
    error = failure.value
    assert isinstance(error, errors.Error)
    return error


def superuser(pg: Postgres, database: str) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(dbname=database), autocommit=True)


def resign(pg: Postgres, database: str, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--upstream", pg.dsn(dbname=database), "resign", *args],
        cwd=key.parent, env=_env(PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(key)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_the_proxy_creates_its_key_and_logs_the_path_once(signed_proxy: ProxyProcess, keys: Path) -> None:
    key = keys / "first.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(signing.load_key(key)) == 32
    log = signed_proxy.log_text()
    assert log.count("artifact signing key:") == 1 and f"artifact signing key: {key} (created)" in log
    assert key.read_text().strip() not in log


def test_training_signs_every_artifact_and_predict_works(
    signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path
) -> None:
    regression = train(signed_proxy, database, "sig regression")
    classification = train(signed_proxy, database, "sig classification", True)
    assert abs(predict(signed_proxy, database, "sig regression") - (2 * 10 + 3 * 3 + 1)) < 1.0
    key = signing.load_key(keys / "first.key")
    with superuser(pg, database) as c:
        rows = c.execute(
            "SELECT f.model_id, m.project_id, f.path, f.part, f.data, f.signature FROM pgml.files f"
            " JOIN pgml.models m ON m.id = f.model_id ORDER BY 1, 3, 4"
        ).fetchall()
    assert {(r[0], r[2]) for r in rows} == {
        (regression, "estimator.skops"), (classification, "estimator.skops"), (classification, "classes.json")
    }  # fmt: skip
    for model_id, project_id, path, part, data, signature in rows:
        assert part == 0 and signature is not None and len(signature) == 32
        assert signing.verify(key, database, project_id, model_id, path, bytes(data), bytes(signature))
        assert not signing.verify(key, "postgres", project_id, model_id, path, bytes(data), bytes(signature))


def test_a_flipped_byte_is_refused_and_never_signed(
    signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path
) -> None:
    model_id = train(signed_proxy, database, "flipped")
    train(signed_proxy, database, "sound")
    with superuser(pg, database) as c:
        c.execute(
            "UPDATE pgml.files SET data = set_byte(data, 200, get_byte(data, 200) # 1)"
            " WHERE model_id = %s AND path = 'estimator.skops'",
            [model_id],
        )
    error = refused(signed_proxy, database, "flipped")
    assert error.sqlstate == "58000"
    assert f"model {model_id} of project `flipped`" in str(error) and "signature does not match" in str(error)
    assert predict(signed_proxy, database, "sound") > 0  # other models are unaffected
    # resign never signs it, not even with --trust-unsigned, and says so.
    result = resign(pg, database, keys / "first.key", "--trust-unsigned")
    assert result.returncode == 1, result.stderr
    assert f"model {model_id} (project flipped) estimator.skops: the signature does not verify" in result.stdout
    assert "1 with an invalid signature" in result.stdout
    assert refused(signed_proxy, database, "flipped").sqlstate == "58000"


def test_another_models_artifact_copied_in_is_refused(signed_proxy: ProxyProcess, pg: Postgres, database: str) -> None:
    source = train(signed_proxy, database, "source")
    target = train(signed_proxy, database, "target")
    moved = train(signed_proxy, database, "moved")
    with superuser(pg, database) as c:  # the bytes and the signature, both valid for the source model
        c.execute(
            "UPDATE pgml.files t SET data = s.data, signature = s.signature FROM pgml.files s"
            " WHERE s.model_id = %s AND t.model_id = %s AND s.path = t.path AND s.part = t.part",
            [source, target],
        )
        # a model moved into another project no longer verifies either
        c.execute(
            "UPDATE pgml.models SET project_id = (SELECT project_id FROM pgml.models WHERE id = %s) WHERE id = %s",
            [source, moved],
        )
        c.execute(
            "INSERT INTO pgml.deployments (project_id, model_id, strategy)"
            " SELECT project_id, id, 'most_recent' FROM pgml.models WHERE id = %s",
            [moved],
        )
    error = refused(signed_proxy, database, "target")
    assert error.sqlstate == "58000" and f"model {target} of project `target`" in str(error)
    error = refused(signed_proxy, database, "source")  # its current deployment is now the moved model
    assert error.sqlstate == "58000" and f"model {moved} of project `source`" in str(error)


def test_unsigned_artifacts_are_refused_until_an_administrator_signs_them(
    signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path
) -> None:
    model_id = train(signed_proxy, database, "legacy")
    planted = train(signed_proxy, database, "planted")
    with superuser(pg, database) as c:
        c.execute("UPDATE pgml.files SET signature = NULL WHERE model_id IN (%s, %s)", [model_id, planted])
        # As the migration records artifacts stored before signing existed; "planted" was written since.
        c.execute("INSERT INTO pgml.unsigned_artifacts SELECT DISTINCT model_id, path FROM pgml.files"
                  " WHERE model_id = %s", [model_id])  # fmt: skip
    error = refused(signed_proxy, database, "legacy")
    assert error.sqlstate == "58000" and "unsigned" in str(error)
    assert error.diag.message_hint is not None and HINT in error.diag.message_hint
    result = resign(pg, database, keys / "first.key")
    assert result.returncode == 1 and "2 unsigned and refused" in result.stdout, result.stdout + result.stderr
    assert f"model {model_id} (project legacy) estimator.skops: unsigned, refused" in result.stdout
    assert refused(signed_proxy, database, "legacy").sqlstate == "58000"
    result = resign(pg, database, keys / "first.key", "--trust-unsigned")
    assert result.returncode == 1, result.stdout + result.stderr  # the planted one stays refused
    assert "1 signed that were unsigned" in result.stdout and "1 unsigned and refused" in result.stdout
    assert f"model {planted} (project planted) estimator.skops: unsigned (written after signing" in result.stdout
    assert abs(predict(signed_proxy, database, "legacy") - 30) < 1.0
    assert refused(signed_proxy, database, "planted").sqlstate == "58000"
    with superuser(pg, database) as c:
        assert c.execute("SELECT count(*) FROM pgml.unsigned_artifacts").fetchone() == (0,)
        c.execute("DELETE FROM pgml.projects WHERE name = 'planted'")
    again = resign(pg, database, keys / "first.key")  # idempotent: nothing left to change
    assert again.returncode == 0 and "1 already signed with the new key" in again.stdout, again.stdout


def test_key_rotation(signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path, tmp_path: Path) -> None:
    train(signed_proxy, database, "rotated")  # signed with first.key; not predicted (so not cached) here
    train(signed_proxy, database, "rotated classes", True)
    new_key = tmp_path / "second.key"
    result = resign(pg, database, keys / "first.key", "--old-key-file", str(keys / "first.key"),
                    "--new-key-file", str(new_key))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"created the new key file {new_key}" in result.stdout and "3 re-signed" in result.stdout
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    rotated = start_proxy(pg.dsn(), tmp_path, PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(new_key))
    try:
        assert abs(predict(rotated, database, "rotated") - 30) < 1.0
        with connect(rotated, database) as c:
            assert c.execute("SELECT pgml.predict('rotated classes', ARRAY[10.0, 3.0]::real[])").fetchone() in (
                (0.0,), (1.0,),
            )  # fmt: skip
    finally:
        rotated.stop()
    assert refused(signed_proxy, database, "rotated").sqlstate == "58000"  # the old key no longer verifies
    # Rotating back with the wrong old key signs nothing.
    wrong = resign(pg, database, new_key, "--old-key-file", str(keys / "first.key"))
    assert wrong.returncode == 1 and "3 with an invalid signature" in wrong.stdout and "0 re-signed" in wrong.stdout


def test_a_renamed_database_is_resigned_with_old_database(
    signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path
) -> None:
    train(signed_proxy, database, "renamed")
    renamed = database + "_new"
    rename(pg, database, renamed)
    try:
        assert refused(signed_proxy, renamed, "renamed").sqlstate == "58000"  # signatures name the database
        assert resign(pg, renamed, keys / "first.key").returncode == 1
        result = resign(pg, renamed, keys / "first.key", "--old-database", database)
        assert result.returncode == 0 and "1 re-signed" in result.stdout, result.stdout + result.stderr
        assert abs(predict(signed_proxy, renamed, "renamed") - 30) < 1.0
    finally:
        rename(pg, renamed, database)


def rename(pg: Postgres, old: str, new: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [old])
        admin.execute(f"ALTER DATABASE {old} RENAME TO {new}")


def test_two_proxies_sharing_a_key_file(
    signed_proxy: ProxyProcess, pg: Postgres, database: str, keys: Path, tmp_path: Path
) -> None:
    train(signed_proxy, database, "shared")
    replica = start_proxy(pg.dsn(), tmp_path, PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(keys / "first.key"))
    try:
        assert "(created)" not in replica.log_text()
        train(replica, database, "from the replica")
        assert abs(predict(replica, database, "shared") - 30) < 1.0
        assert abs(predict(signed_proxy, database, "from the replica") - 30) < 1.0
        assert abs(predict(signed_proxy, database, "shared") - 30) < 1.0
    finally:
        replica.stop()


def test_an_unusable_key_file_stops_the_proxy_at_start(tmp_path: Path, pg: Postgres) -> None:
    key = tmp_path / "open.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--upstream", pg.dsn()], cwd=tmp_path, capture_output=True, text=True,
        env=_env(PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(key), PGML_PROXY_LISTEN=f"127.0.0.1:{free_port()}"),
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and f"cannot use the artifact signing key file {key}" in result.stderr
    assert "ab" * 32 not in result.stderr


def test_resign_options_belong_to_resign(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--trust-unsigned"], cwd=tmp_path, capture_output=True, text=True,
        env=_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "are options of resign" in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=60
    ).stdout
    assert "resign" in help_text and "--trust-unsigned" in help_text and "superuser" in help_text
