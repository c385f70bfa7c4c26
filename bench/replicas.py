"""Replicas benchmark: one pgml-proxy vs two replicas in front of one PostgreSQL, under a many-client embed load.

``--clients`` asyncpg connections (50 by default), each sending ``SELECT pgml.embed(model, <a new text>)`` in a
loop for ``--seconds``: all through one proxy, then spread over two replicas round-robin (what a TCP balancer
with ``leastconn`` does with equal sessions). Rounds alternate; it prints throughput (calls/s) and p50/p99
latency of each set-up and the ratio two/one. Each replica loads its own model copy and runs it on the same
machine's cores, so on one small machine two replicas gain little: the figure shows what the replica split
costs; on several machines (or with ``[engine] backend = "ray"``) it is what spreads the work. Not a test:
nothing is asserted.

    .venv/bin/python bench/replicas.py [--clients 50] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pgml_proxy, upstream
from embed import MODEL, model_dir


async def load(dsns: list[str], clients: int, seconds: float) -> tuple[float, list[float]]:
    """Calls per second and every call's latency, ``clients`` sessions spread over ``dsns`` round-robin."""
    counter = itertools.count()
    latencies: list[float] = []
    conns = [await asyncpg.connect(dsns[i % len(dsns)]) for i in range(clients)]
    for conn in conns[: len(dsns)]:
        await conn.fetchval("SELECT pgml.embed($1, 'warm up')", MODEL)  # each replica's model loaded
    stop = time.perf_counter() + seconds

    async def client(conn: asyncpg.Connection) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await conn.fetchval("SELECT pgml.embed($1, $2)", MODEL, f"text number {next(counter)} for the load")
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.perf_counter() - began
    for conn in conns:
        await conn.close()
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q / 100))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgml-bench-replicas-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        dsn = stack.enter_context(upstream(work))
        models = str(model_dir(work))
        settings = {"PGML_PROXY_ENGINE_MODEL_DIRS": models, "PGML_PROXY_ENGINE_DEVICE": "cpu",
                    "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(work / "artifact.key")}  # fmt: skip
        replicas = []
        for name in ("a", "b"):
            (work / name).mkdir()
            replicas.append(stack.enter_context(pgml_proxy(dsn, work / name, **settings))[0])
        results: dict[str, list[tuple[float, list[float]]]] = {"one proxy": [], "two replicas": []}
        for r in range(args.rounds):
            order = [("one proxy", replicas[:1]), ("two replicas", replicas)]
            for label, dsns in order if r % 2 == 0 else order[::-1]:
                rate, latencies = asyncio.run(load(dsns, args.clients, args.seconds))
                results[label].append((rate, latencies))
                print(f"  round {r + 1} {label:12}: {rate:7.1f} calls/s, p99 {percentile(latencies, 99):7.1f} ms")
        print(f"\n{args.clients} clients, {args.seconds:g} s a round, {args.rounds} rounds (medians):")
        rates = {}
        for label, runs in results.items():
            rates[label] = statistics.median(rate for rate, _ in runs)
            every = [x for _, lat in runs for x in lat]
            print(f"  {label:12}: {rates[label]:7.1f} calls/s, p50 {percentile(every, 50):7.1f} ms,"
                  f" p99 {percentile(every, 99):7.1f} ms")  # fmt: skip
        print(f"  two replicas / one proxy = {rates['two replicas'] / rates['one proxy']:.2f}x throughput")


if __name__ == "__main__":
    main()
