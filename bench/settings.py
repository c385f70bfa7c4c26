"""Settings benchmark: what reading PostgresML's session settings costs a constant ``pgml.transform``.

Two proxies in front of one throwaway PostgreSQL 18, side by side in one run: ``with`` is pgml-proxy as it
is (a governed call makes its statement read ``pgml.huggingface_whitelist`` & co. with one query on the
client's session); ``without`` is the same code with nothing governed (``proxy.rewrite.pgml_settings.GOVERNED``
emptied in that process before it starts: no read, nothing narrowed — a measurement switch, not a setting).
Each round sends ``--statements`` constant ``SELECT pgml.transform(task => '{"task": "text-classification",
"model": "tiny"}'::jsonb, inputs => ARRAY['…'])`` statements to each proxy in turn (the order alternates
every round), simple query (psql-style) and extended protocol (psycopg with a parameter); a tiny random BERT
classifier built here, so the engine's own time is small and the read's share is as large as it gets.
Printed: median per-statement latency of each, and the ratio with / without (nothing is asserted).

    .venv/bin/python bench/settings.py [--statements 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, dsn_on_port, upstream, wait_port  # also puts the checkout on sys.path

from proxy.embedded import free_port
from tests.tiny_models import tiny_bert_classifier

# The "without" proxy: the same code, no function governed by the settings.
UNGOVERNED = (
    "import runpy, proxy.rewrite.pgml_settings as s; s.GOVERNED = frozenset(); runpy.run_module('proxy', "
    "run_name='__main__', alter_sys=True)"
)
TASK = json.dumps({"task": "text-classification", "model": "tiny"})


@contextmanager
def proxy(dsn: str, work: Path, models: Path, governed: bool) -> Iterator[str]:
    port = free_port()
    log = work / f"proxy-{port}.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")},
        "PGML_PROXY_LISTEN": f"127.0.0.1:{port}",
        "PGML_PROXY_UPSTREAM": dsn,
        "PGML_PROXY_LOG_LEVEL": "warning",
        "PGML_PROXY_ENGINE_MODEL_DIRS": str(models),
        "PGML_PROXY_ENGINE_DEVICE": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "proxy"] if governed else [sys.executable, "-c", UNGOVERNED]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        wait_port(port, proc, "pgml-proxy", log)
        yield dsn_on_port(dsn, port)
    finally:
        proc.terminate()
        proc.wait(15)


def simple(conn: psycopg.Connection, count: int) -> float:
    """Median seconds per constant transform statement, simple query protocol."""
    times = []
    for i in range(count):
        query = f"SELECT pgml.transform(task => '{TASK}'::jsonb, inputs => ARRAY['hello world {i}'])"
        start = time.perf_counter()
        conn.pgconn.exec_(query.encode())  # one simple Query, as psql sends it
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def extended(conn: psycopg.Connection, count: int) -> float:
    """Median seconds per transform statement with a parameter (extended protocol: rewritten at its Bind)."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        conn.execute("SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY[%s])", [TASK, f"hello {i}"]).fetchone()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statements", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgml-bench-settings-") as tmp:
        work = Path(tmp)
        models = work / "models"
        tiny_bert_classifier(models / "tiny")
        with (
            upstream(work) as dsn,
            proxy(dsn, work, models, True) as with_read,
            proxy(dsn, work, models, False) as without_read,
        ):
            conns = {
                "with": psycopg.connect(with_read, autocommit=True),
                "without": psycopg.connect(without_read, autocommit=True),
            }
            for conn in conns.values():  # schema installed, model loaded
                simple(conn, 3)
                extended(conn, 3)
            results: dict[tuple[str, str], list[float]] = {}
            for round_ in range(args.rounds):
                order = list(conns) if round_ % 2 == 0 else list(reversed(conns))
                for name in order:
                    results.setdefault((name, "simple"), []).append(simple(conns[name], args.statements))
                    results.setdefault((name, "extended"), []).append(extended(conns[name], args.statements))
            for conn in conns.values():
                conn.close()
    print(f"constant pgml.transform, {args.statements} statements x {args.rounds} rounds (median of round medians)")
    print(f"{'protocol':<10}{'with read ms':>14}{'without ms':>12}{'ratio':>8}")
    for protocol in ("simple", "extended"):
        with_ms = statistics.median(results[("with", protocol)]) * 1000
        without_ms = statistics.median(results[("without", protocol)]) * 1000
        print(f"{protocol:<10}{with_ms:>14.3f}{without_ms:>12.3f}{with_ms / without_ms:>8.3f}")


if __name__ == "__main__":
    main()
