"""Pieces the benchmark scripts share: a throwaway upstream, a pgml-proxy process, port waiting."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.dsn import parse_dsn  # noqa: E402
from proxy.embedded import Cluster, find_bin_dir, free_port  # noqa: E402


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    """Until something listens on ``port``; exits with the log's tail if ``proc`` dies or never listens."""
    tail = (lambda: "\n" + log.read_text()[-4000:]) if log is not None else (lambda: "")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:{tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start:{tail()}")


@contextmanager
def upstream(work: Path) -> Iterator[str]:
    """``$PGML_BENCH_DSN``, else a throwaway PostgreSQL 18 in ``work``."""
    if os.environ.get("PGML_BENCH_DSN"):
        yield os.environ["PGML_BENCH_DSN"]
        return
    cluster = Cluster(find_bin_dir(18), work / "data")
    cluster.start()
    try:
        yield cluster.dsn()
    finally:
        cluster.stop("immediate")


def dsn_on_port(dsn: str, port: int) -> str:
    parsed = parse_dsn(dsn)
    return f"postgresql://{parsed.user or 'postgres'}@127.0.0.1:{port}/{parsed.dbname or 'postgres'}"


@contextmanager
def pgml_proxy(dsn: str, work: Path, root: Path = ROOT, **settings: str) -> Iterator[tuple[str, Path]]:
    """A ``python -m proxy`` of the checkout ``root`` in front of ``dsn``; yields its DSN and log file.
    ``settings``: extra env."""
    port = free_port()
    log = work / "proxy.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")},
        "PGML_PROXY_LISTEN": f"127.0.0.1:{port}",
        "PGML_PROXY_UPSTREAM": dsn,
        "PGML_PROXY_PROXY_SHUTDOWN_GRACE": "2",
        "PGML_PROXY_LOG_LEVEL": "warning",
        **settings,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy"], env=env, cwd=root, stdout=out, stderr=out)
    try:
        wait_port(port, proc, "pgml-proxy", log)
        yield dsn_on_port(dsn, port), log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def texts_table(dsn: str, table: str, texts: list[str]) -> Iterator[None]:
    """``table`` (id, body) in schema pgml_bench, filled by COPY; the schema is dropped afterwards."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS pgml_bench CASCADE")
        conn.execute("CREATE SCHEMA pgml_bench")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text NOT NULL)")
        with conn.cursor().copy(f"COPY {table} (id, body) FROM STDIN") as copy:
            for i, text in enumerate(texts, 1):
                copy.write_row((i, text))
        conn.execute(f"ANALYZE {table}")
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS pgml_bench CASCADE")


# One upstream statement's duration line (log_min_duration_statement = 0): milliseconds, step, statement text.
DURATION = re.compile(r"LOG:\s+duration: ([\d.]+) ms\s+(statement|parse|bind|execute)[^:]*: (.*)")
_DDL = ("CREATE TEMP", "CREATE INDEX", "ALTER TABLE pgml_proxy_", "ANALYZE pgml_proxy_", "DROP TABLE")


def upstream_phases(proxy: str, server_log: Path, sql: str) -> tuple[float, dict[str, float]]:
    """``sql`` run once through ``proxy`` with every upstream statement's duration logged: its seconds, and the
    server's seconds per phase of a per-row call (gather, temp-table COPY, DDL, final statement, the parts of a
    streamed statement's row portal, other) with the count of statements executed (round trips; a count, not
    seconds)."""
    import psycopg

    offset = server_log.stat().st_size
    with psycopg.connect(proxy, autocommit=True) as conn:
        conn.execute("SET log_min_duration_statement = 0")
        total, _ = timed(lambda: conn.execute(sql).fetchall())
        conn.execute("RESET log_min_duration_statement")
    with open(server_log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    out: dict[str, float] = defaultdict(float)
    for match in DURATION.finditer(text):
        seconds, step, statement = float(match.group(1)) / 1000, match.group(2), match.group(3)
        if "log_min_duration_statement" in statement:
            continue
        if statement.startswith(("SELECT DISTINCT", "COPY (SELECT DISTINCT")):
            out["gather"] += seconds
        elif statement.startswith("COPY pgml_proxy_"):
            out["COPY into the temp table"] += seconds
        elif statement.startswith(_DDL):
            out["create/index/analyze/drop"] += seconds
        elif "pg_temp.pgml_proxy_" in statement:
            out["final statement"] += seconds
        elif "pgml_proxy_arg_" in statement:  # the row portal of a streamed statement, one Execute per part
            out["streamed parts"] += seconds
        else:
            out["other"] += seconds
        if step == "execute":
            out["statements executed"] += 1
    return total, dict(out)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


class Background:
    """``action`` timed in a thread of its own (another session's big batch): ``done``, then ``join()``."""

    def __init__(self, action: Callable[[], Any], name: str = "background") -> None:
        self.done = threading.Event()
        self.elapsed = 0.0
        self._failure: BaseException | None = None
        self._action = action
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.elapsed, _ = timed(self._action)
        except BaseException as exc:
            self._failure = exc
        finally:
            self.done.set()

    def join(self) -> float:
        """The action's seconds; its exception, if it raised one."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self.elapsed
