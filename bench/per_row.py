"""The temp-table path of per-row pgml calls (a call in WHERE): this checkout vs another, side by side.

    .venv/bin/python bench/per_row.py [--rows 100000] [--rounds 3] [--baseline /path/to/checkout]

Runs ``SELECT id FROM t WHERE pgml.predict(project, ARRAY[f1, …, f20]) > 0`` over ``--rows`` rows of 20 real
features (bench/ml.py's table; about half the rows pass) through a pgml-proxy of this checkout and, with
``--baseline``, one of another checkout (e.g. ``git archive <commit> | tar -x -C /tmp/base``) in front of the
same throwaway PostgreSQL 18, rounds alternated and the order flipped every round; medians, rows/s and the
ratio baseline/this are printed (nothing is asserted). Both give the same ids (checked). One more pass of
each, with the upstream's ``log_min_duration_statement = 0``, splits the upstream's time by phase (gather
query, temp-table DDL, COPY into it, final lookup) and counts the proxy's round trips of the statement
(internal exchanges: each ends with one Sync).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pgml_proxy, timed, upstream, upstream_phases
from ml import ARRAY, TABLE, WARM_VIEW, make_data, ml_table, train_sql

PROJECT = "bench_per_row"
WHERE = f"SELECT id FROM {TABLE} WHERE pgml.predict('{PROJECT}', {ARRAY}) > 0 ORDER BY id"


def phases(proxy: str, server_log: Path) -> dict[str, float]:
    """One pass with every upstream statement's duration logged: seconds per phase, and the statements executed."""
    return upstream_phases(proxy, server_log, WHERE)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (its proxy/ and engine/)")
    args = parser.parse_args()
    started = time.perf_counter()
    x, y = make_data(args.rows)
    with tempfile.TemporaryDirectory(prefix="pgml-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)
        direct = stack.enter_context(upstream(work))
        stack.enter_context(ml_table(direct, x, y))
        checkouts = {"this": Path(__file__).resolve().parent.parent}
        if args.baseline is not None:
            checkouts["baseline"] = args.baseline.resolve()
        proxies = {}
        for name, root in checkouts.items():
            (work / name).mkdir()
            proxies[name] = stack.enter_context(pgml_proxy(direct, work / name, root=root, PYTHONPATH=str(root)))
        with psycopg.connect(proxies["this"][0], autocommit=True) as conn:  # a small model: the call, not the fit
            conn.execute(train_sql(json.dumps({"n_estimators": 20}), PROJECT, WARM_VIEW)).fetchall()
        seconds: dict[str, list[float]] = defaultdict(list)
        answers = {}
        for name, (dsn, _) in proxies.items():  # warm: model load, schema check
            with psycopg.connect(dsn, autocommit=True) as conn:
                answers[name] = conn.execute(WHERE).fetchall()
        if len({json.dumps(a) for a in answers.values()}) != 1:
            raise SystemExit("the proxies gave different ids")
        print(f"{args.rows} rows, {len(answers['this'])} pass the WHERE; {args.rounds} alternated rounds")
        for rnd in range(args.rounds):
            order = list(proxies) if rnd % 2 == 0 else list(reversed(proxies))
            for name in order:
                with psycopg.connect(proxies[name][0], autocommit=True) as conn:
                    elapsed, _ = timed(lambda conn=conn: conn.execute(WHERE).fetchall())
                seconds[name].append(elapsed)
                print(f"  round {rnd + 1} {name:<8}: {elapsed:6.2f} s", flush=True)
        log = work / "data" / "server.log"
        breakdown = {name: phases(dsn, log) for name, (dsn, _) in proxies.items()} if log.exists() else {}
        report(args, seconds, breakdown)
    print(f"\ntotal run time {time.perf_counter() - started:.0f} s")


def report(args: argparse.Namespace, seconds: dict[str, list[float]], breakdown: dict[str, dict[str, float]]) -> None:
    print(f"\n=== per-row pgml.predict in WHERE, {args.rows} rows x 20 features ===")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        print(f"{name:<8}: median {value:.2f} s, {args.rows / value:,.0f} rows/s")
    if "baseline" in median:
        print(f"per-row WHERE predict, baseline/this: {median['baseline'] / median['this']:.2f}x faster")
    for name, parts in breakdown.items():
        shown = ", ".join(f"{k} {v:.3f} s" for k, v in parts.items() if k != "statements executed")
        print(f"{name:<8}: upstream by phase: {shown}; {parts.get('statements executed', 0):.0f} statements")


if __name__ == "__main__":
    main()
