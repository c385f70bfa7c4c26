"""Configuration: defaults, file < env < flags, validation naming the key, DSN parsing, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, load
from proxy.dsn import DSNError, parse_dsn

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_file() -> None:
    config = load(None, {})
    assert config == Config()
    assert config.proxy.port == 6432 and config.proxy.host == "127.0.0.1"
    assert config.upstream.dsn == "" and config.engine.model_dirs == ()


def test_reference_file_is_complete_and_equals_defaults() -> None:
    """config.toml documents every key, at its default value."""
    import tomllib

    data = tomllib.loads((ROOT / "config.toml").read_text())
    assert load(ROOT / "config.toml", {}) == Config()
    for section, cls in [("proxy", Config().proxy), ("upstream", Config().upstream), ("engine", Config().engine)]:
        assert set(data[section]) == set(vars(cls)), section


def test_partial_file_and_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proxy]\nlisten = "0.0.0.0:7000"\nmax_clients = 5\n[engine]\nmodel_dirs = ["/m"]\n')
    config = load(path, {})
    assert (config.proxy.listen, config.proxy.max_clients, config.engine.model_dirs) == ("0.0.0.0:7000", 5, ("/m",))
    assert config.upstream.connect_timeout == 10.0  # default filled in
    env = {"PGML_PROXY_LISTEN": "127.0.0.1:7001", "PGML_PROXY_PROXY_MAX_CLIENTS": "9",
           "PGML_PROXY_ENGINE_ALLOW_DOWNLOADS": "yes", "PGML_PROXY_ENGINE_MODEL_DIRS": "/a,/b"}  # fmt: skip
    config = load(path, env)
    assert config.proxy.listen == "127.0.0.1:7001" and config.proxy.max_clients == 9
    assert config.engine.allow_downloads is True and config.engine.model_dirs == ("/a", "/b")
    config = load(path, env, {"proxy.listen": "127.0.0.1:7002", "upstream.dsn": None})
    assert config.proxy.listen == "127.0.0.1:7002"


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[proxy]\nlisten_port = 1\n", {}, "proxy.listen_port"),
        ("[prox]\n", {}, "[prox]"),
        ("[proxy]\nmax_clients = 'many'\n", {}, "proxy.max_clients"),
        ("[proxy]\nmax_clients = 0\n", {}, "proxy.max_clients"),
        ("[proxy]\nlisten = 'nohost'\n", {}, "proxy.listen"),
        ("[proxy]\ntls_cert = '/nonexistent.pem'\ntls_key = '/nonexistent.key'\n", {}, "proxy.tls_cert"),
        ("[upstream]\nsslmode = 'sometimes'\n", {}, "upstream.sslmode"),
        ("[upstream]\ndsn = 'mysql://x'\n", {}, "upstream.dsn"),
        ("[engine]\ndevice = 'tpu'\n", {}, "engine.device"),
        ("[engine]\nallow_downloads = 'yes'\n", {}, "engine.allow_downloads"),
        ("[engine]\nmodel_dirs = '/m'\n", {}, "engine.model_dirs"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level"),
        ("", {"PGML_PROXY_NOPE": "1"}, "PGML_PROXY_NOPE"),
        ("", {"PGML_PROXY_ENGINE_ALLOW_DOWNLOADS": "maybe"}, "PGML_PROXY_ENGINE_ALLOW_DOWNLOADS"),
        ("[proxy\n", {}, "invalid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, env)
    assert key in str(info.value)


def test_config_is_frozen() -> None:
    config = load(None, {})
    with pytest.raises(AttributeError):
        config.proxy.listen = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "host", "port", "user", "dbname", "sslmode"),
    [
        ("postgresql://u:p%40ss@db.example:6543/app?sslmode=require", "db.example", 6543, "u", "app", "require"),
        ("postgres://localhost", "localhost", 5432, None, None, None),
        ("postgresql:///mydb?host=/var/run/postgresql&port=5433", "/var/run/postgresql", 5433, None, "mydb", None),
        ("postgresql://%2Ftmp%2Fsock/db", "/tmp/sock", 5432, None, "db", None),
        ("postgresql://[::1]:5444/db", "::1", 5444, None, "db", None),
        ("postgresql://h1:1,h2:2/db", "h1", 1, None, "db", None),
        ("host=/tmp port=5999 user=bob dbname='my db'", "/tmp", 5999, "bob", "my db", None),
    ],
)
def test_parse_dsn(text: str, host: str, port: int, user: str | None, dbname: str | None, sslmode: str | None) -> None:
    dsn = parse_dsn(text)
    assert (dsn.host, dsn.port, dsn.user, dsn.dbname, dsn.param("sslmode")) == (host, port, user, dbname, sslmode)
    assert "p@ss" not in dsn.redacted()


def test_unix_socket_path() -> None:
    dsn = parse_dsn("postgresql:///db?host=/run/pg&port=5433")
    assert dsn.is_unix and dsn.unix_path == "/run/pg/.s.PGSQL.5433"


@pytest.mark.parametrize("text", ["mysql://x", "postgresql://h:notaport/db", "postgresql://h/db?bogus=1", "just words"])
def test_parse_dsn_errors(text: str) -> None:
    with pytest.raises(DSNError):
        parse_dsn(text)


def test_cli_reports_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy]\nmax_clientz = 3\n")
    proc = subprocess.run([sys.executable, "-m", "proxy", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "proxy.max_clientz" in proc.stderr
