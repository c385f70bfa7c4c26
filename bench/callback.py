"""Callback mode's costs: a pgml call the database makes itself (through dblink to pgml-proxy) vs through the proxy.

    .venv/bin/python bench/callback.py [--calls 200] [--rows 1000] [--rounds 3]

On a throwaway system PostgreSQL 15 (the bundled 16/18 lack dblink) with a pgml-proxy in front of it, callbacks
set up as ``pgml-proxy init --callback`` does (``proxy.callback.enable``), all-MiniLM-L6-v2 on the CPU:

* per call: ``SELECT cb_embed(text)`` sent directly to the server (a SQL function calling ``pgml.embed``, so
  through the callback) vs ``SELECT pgml.embed(m, text)`` through the proxy, one client, one call per round
  trip, the same texts on both paths; once with a new text per call (the model runs every time), once with
  one repeated text (the proxy's cache of constant calls answers), and ``pgml.predict`` of a tiny linear model
  with new features each call (``cb_predict``: the transport's cost, not the model's). Printed: median
  milliseconds and the callback's overhead (the target: at most +2 ms on loopback);
* rows/s of ``INSERT … SELECT`` of ``--rows`` rows into a table with a generated embedding column, sent
  directly (one callback per row) vs the batched ``UPDATE … SET emb = pgml.embed(m, body)`` of the same rows
  through the proxy, and their ratio.

Rounds alternate the two paths and flip their order every round (the machine is noisy); nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, pgml_proxy, timed
from embed import MODEL, make_texts, model_dir

from proxy import callback, schema
from proxy.embedded import Cluster, system_bin_dir

PROJECT = "bench_callback"
FUNCTIONS = (
    f"CREATE FUNCTION cb_embed(t text) RETURNS real[] LANGUAGE sql AS $$ SELECT pgml.embed('{MODEL}', t) $$",
    f"CREATE FUNCTION cb_predict(f real[]) RETURNS real LANGUAGE sql AS $$ SELECT pgml.predict('{PROJECT}', f) $$",
)
GENERATED = (
    "CREATE TABLE {name} (id int PRIMARY KEY, body text,"
    f" emb real[] GENERATED ALWAYS AS (pgml.embed('{MODEL}', body)) STORED)"
)


def per_call(
    direct: psycopg.Connection, through: psycopg.Connection, calls: list[tuple[str, str]]
) -> tuple[float, float]:
    """Median seconds of one call on each path: (the callback's statement, sent directly; the proxy's), interleaved
    call by call, the order flipped every call."""
    callback_times: list[float] = []
    proxy_times: list[float] = []
    for i, (on_server, on_proxy) in enumerate(calls):
        pairs = [(callback_times, direct, on_server), (proxy_times, through, on_proxy)]
        for times, conn, sql in pairs if i % 2 else reversed(pairs):
            start = time.perf_counter()
            conn.execute(sql).fetchone()
            times.append(time.perf_counter() - start)
    return statistics.median(callback_times), statistics.median(proxy_times)


def embed_calls(texts: list[str]) -> list[tuple[str, str]]:
    """The text as a literal on both paths: the proxy's constant path, as the callback's own statement takes it."""
    quoted = ["'" + t.replace("'", "''") + "'" for t in texts]
    return [(f"SELECT cb_embed({q})", f"SELECT pgml.embed('{MODEL}', {q})") for q in quoted]


def predict_calls(count: int, offset: int) -> list[tuple[str, str]]:
    """A tiny linear model with new features every call: the transport, not the model, is what is timed."""
    features = [f"ARRAY[{offset + i}.5]::real[]" for i in range(count)]
    return [(f"SELECT cb_predict({f})", f"SELECT pgml.predict('{PROJECT}', {f})") for f in features]


def rows_round(
    direct: psycopg.Connection, through: psycopg.Connection, texts: list[str], n: int
) -> tuple[float, float]:
    """Seconds of the generated-column INSERT (callbacks) and of the batched UPDATE through the proxy."""
    rows = "SELECT n, t FROM unnest(%s::text[]) WITH ORDINALITY u(t, n)"
    direct.execute(GENERATED.format(name=f"gen_{n}"))
    direct.execute(f"CREATE TABLE upd_{n} (id int PRIMARY KEY, body text, emb real[])")
    direct.execute(f"INSERT INTO upd_{n} (id, body) {rows}", (texts,))
    insert = f"INSERT INTO gen_{n} (id, body) {rows}"
    update = f"UPDATE upd_{n} SET emb = pgml.embed('{MODEL}', body)"
    if n % 2:
        batched, _ = timed(lambda: through.execute(update))
    generated, _ = timed(lambda: direct.execute(insert, (texts,)))
    if not n % 2:
        batched, _ = timed(lambda: through.execute(update))
    return generated, batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bin_dir = system_bin_dir(15)
    if bin_dir is None:
        raise SystemExit("the system PostgreSQL 15 (with contrib: dblink) is required")
    with tempfile.TemporaryDirectory(prefix="pgml-bench-callback-") as tmp:
        work = Path(tmp)
        cluster = Cluster(bin_dir, work / "data")
        cluster.start()
        try:
            schema.init(cluster.dsn())
            models = model_dir(work)
            with pgml_proxy(cluster.dsn(), work, ROOT, PGML_PROXY_ENGINE_MODEL_DIRS=str(models),
                            PGML_PROXY_ENGINE_DEVICE="cpu") as (proxy_dsn, _):  # fmt: skip
                port = int(proxy_dsn.rsplit(":", 1)[1].split("/")[0])
                callback.enable(cluster.dsn(), callback.Setup((("host", "127.0.0.1"), ("port", str(port))), "postgres"))
                run(cluster.dsn(), proxy_dsn, args)
        finally:
            cluster.stop("immediate")


def run(direct_dsn: str, proxy_dsn: str, args: argparse.Namespace) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as direct, psycopg.connect(proxy_dsn, autocommit=True) as through:
        for sql in FUNCTIONS:
            direct.execute(sql)
        direct.execute("CREATE TABLE cb_train AS SELECT g::real x, (2 * g + 1)::real y FROM generate_series(1, 50) g")
        through.execute(f"SELECT * FROM pgml.train('{PROJECT}', 'regression', 'cb_train', 'y')")
        direct.execute("SELECT cb_embed('warm up'), cb_predict(ARRAY[0.25]::real[])")  # models loaded, dblink open
        through.execute(f"SELECT pgml.embed('{MODEL}', 'warm up'), pgml.predict('{PROJECT}', ARRAY[0.25]::real[])")
        fresh = [f"{t} (one call)" for t in make_texts(args.calls * args.rounds)]
        medians: dict[str, list[tuple[float, float]]] = {"embed, new text": [], "embed, repeated": [], "predict": []}
        for r in range(args.rounds):
            texts = fresh[r * args.calls : (r + 1) * args.calls]
            medians["embed, new text"].append(per_call(direct, through, embed_calls(texts)))
            medians["embed, repeated"].append(per_call(direct, through, embed_calls(["the same text"] * args.calls)))
            medians["predict"].append(per_call(direct, through, predict_calls(args.calls, r * args.calls)))
        print(f"per call ({args.calls} calls x {args.rounds} rounds, median of the round medians):")
        for kind, values in medians.items():
            cb, px = (statistics.median(v[i] for v in values) * 1000 for i in (0, 1))
            print(f"  {kind:16s} callback {cb:7.2f} ms   through the proxy {px:7.2f} ms   overhead {cb - px:+6.2f} ms")
        # Texts of their own each round: the proxy's cache of constant calls would answer the callbacks' repeats.
        rounds = [
            rows_round(direct, through, [f"{t} (round {n})" for t in make_texts(args.rows)], n)
            for n in range(max(1, args.rounds - 1))
        ]
        generated = statistics.median(g for g, _ in rounds)
        batched = statistics.median(b for _, b in rounds)
        print(f"{args.rows} rows: generated-column INSERT (callbacks) {args.rows / generated:8.1f} rows/s;"
              f" batched UPDATE through the proxy {args.rows / batched:8.1f} rows/s;"
              f" ratio batched/callback {generated / batched:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
