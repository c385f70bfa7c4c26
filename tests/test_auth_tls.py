"""Authentication relayed for every method, client TLS terminated at the proxy, upstream TLS per sslmode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Postgres, ProxyProcess, make_cert, start_proxy

pytestmark = pytest.mark.pg_matrix

ROLES = {"pw_clear": "password", "pw_md5": "md5", "pw_scram": "scram-sha-256"}


def create_roles(pg: Postgres) -> None:
    assert pg.cluster is not None, "these tests configure pg_hba.conf of the throwaway cluster"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for role, method in ROLES.items():
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            encryption = "md5" if method == "md5" else "scram-sha-256"
            conn.execute(f"SET password_encryption = '{encryption}'")
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 's3cret-{role}'")
    pg.cluster.set_hba([f"host all {role} 127.0.0.1/32 {method}" for role, method in ROLES.items()])


@pytest.fixture(scope="module")
def password_roles(pg: Postgres) -> Iterator[None]:
    create_roles(pg)
    yield
    assert pg.cluster is not None
    pg.cluster.set_hba([])


@pytest.mark.parametrize("role", sorted(ROLES))
def test_password_methods_relayed(proxy: ProxyProcess, password_roles: None, role: str) -> None:
    with psycopg.connect(proxy.dsn(user=role, password=f"s3cret-{role}")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(user=role, password="wrong"))
    assert "password authentication failed" in str(info.value)


def test_missing_password_is_reported(proxy: ProxyProcess, password_roles: None) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(user="pw_scram"), connect_timeout=5)
    assert "password" in str(info.value)


@pytest.fixture(scope="module")
def tls_proxy(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, Path]]:
    workdir = tmp_path_factory.mktemp("tlsproxy")
    cert, key = make_cert(workdir, "proxy")
    handle = start_proxy(pg.dsn(), workdir, PGML_PROXY_PROXY_TLS_CERT=str(cert), PGML_PROXY_PROXY_TLS_KEY=str(key))
    yield handle, cert
    handle.stop()


def test_client_tls_terminated_at_proxy(tls_proxy: tuple[ProxyProcess, Path], password_roles: None) -> None:
    handle, cert = tls_proxy
    with psycopg.connect(handle.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    dsn = handle.dsn(user="pw_scram", password="s3cret-pw_scram", sslmode="verify-full", sslrootcert=str(cert))
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("pw_scram",)
    with psycopg.connect(handle.dsn(sslmode="disable")) as conn:  # TLS stays optional
        assert not conn.pgconn.ssl_in_use


def test_client_tls_required_but_not_configured(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(sslmode="require"))
    assert "does not support SSL" in str(info.value)


def test_upstream_tls_and_scram(tls_pg: Postgres, tmp_path: Path) -> None:
    """SCRAM through the proxy with TLS on the upstream leg: -PLUS is never offered to the client.

    With TLS on both legs, SCRAM's downgrade protection makes a relay impossible
    (the client's proof covers the binding flag); the client gets a clear 28000.
    """
    create_roles(tls_pg)
    assert tls_pg.ca is not None
    cert, key = make_cert(tmp_path, "proxy")
    upstream = f"postgresql://127.0.0.1:{tls_pg.port}/postgres?sslmode=verify-full&sslrootcert={tls_pg.ca}"
    handle = start_proxy(upstream, tmp_path, PGML_PROXY_PROXY_TLS_CERT=str(cert), PGML_PROXY_PROXY_TLS_KEY=str(key),
                         PGML_PROXY_UPSTREAM_SSLROOTCERT=str(tls_pg.ca))  # fmt: skip
    try:
        base = handle.dsn(user="pw_scram", password="s3cret-pw_scram")
        for dsn in (base + "?sslmode=disable", base + "?sslmode=require&channel_binding=disable"):
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
                assert row == (True,)  # the proxy's own upstream leg is encrypted
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(base + "?sslmode=require")  # channel_binding=prefer on TLS
        assert "channel_binding=disable" in str(info.value)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(base + "?sslmode=require&channel_binding=require")
        assert "channel binding" in str(info.value)
    finally:
        handle.stop()


@pytest.mark.parametrize(
    ("sslmode", "ok"), [("disable", True), ("prefer", True), ("require", True), ("verify-full", False)]
)
def test_upstream_sslmodes(tls_pg: Postgres, tmp_path: Path, sslmode: str, ok: bool) -> None:
    """verify-full against a certificate from an unknown CA must fail; the rest connect."""
    other_ca, _ = make_cert(tmp_path, "other")
    upstream = f"postgresql://127.0.0.1:{tls_pg.port}/postgres?sslmode={sslmode}"
    handle = start_proxy(upstream, tmp_path, PGML_PROXY_UPSTREAM_SSLROOTCERT=str(other_ca))
    try:
        if ok:
            with psycopg.connect(handle.dsn()) as conn:
                row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
                assert row == (sslmode != "disable",)
        else:
            with pytest.raises(psycopg.OperationalError) as info:
                psycopg.connect(handle.dsn())
            assert "TLS handshake with upstream server failed" in str(info.value)
    finally:
        handle.stop()
