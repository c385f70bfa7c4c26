"""The Ray backend vs the local backend, side by side: a per-row embed, and a grid search of 8 candidates.

    .venv/bin/python bench/ray_backend.py [--rows 10000] [--train-rows 2000] [--rounds 3] [--warm-rows 500]

Starts a throwaway PostgreSQL 18 and a local Ray cluster (``ray start --head --num-cpus 2``, no dashboard),
and in front of the database one proxy with ``backend = "local"`` and one with ``backend = "ray"``. Rounds
alternate the two, after one untimed warm-up each (model loads, Ray worker start-up; the embed's warm-up is its
first ``--warm-rows`` rows); medians and the ratio
local time / Ray time are printed (nothing is asserted; targets: >= 0.8x for the embed, the overhead of the
cluster hop, and >= 1.6x for the grid search on 2 Ray workers).

- grid search: ``pgml.train`` of ``gradient_boosting_trees`` (single-threaded scikit-learn) over
  ``--train-rows`` rows with 8 candidates, with PostgresML's default 5 folds (40 fits) and with ``cv = 2`` (16 fits),
  each followed by the final fit of the best; the Ray proxy has ``num_cpus = 1``, so
  two tasks run at a time on the cluster's 2 CPUs.
- embed: ``SELECT pgml.embed(model, body) FROM t`` over ``--rows`` rows; the Ray proxy runs with
  ``num_cpus = 2`` (its model actor gets both cores, as the local engine's torch does).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, pgml_proxy, texts_table, timed, upstream
from embed import MODEL, make_texts, model_dir
from ml import TRAIN_VIEW, make_data, ml_table

from proxy.embedded import free_port

EMBED_TABLE = "pgml_bench.ray_texts"
GRID = (
    "SELECT * FROM pgml.train('{project}', 'regression', '" + TRAIN_VIEW + "', 'y', 'gradient_boosting_trees',"
    " search => 'grid', search_params => '{{\"n_estimators\": [40, 60], \"max_depth\": [2, 3],"
    " \"learning_rate\": [0.1, 0.2]}}', search_args => '{search_args}', test_sampling => 'last')"
)
# PostgresML's default search (5 folds), and 2 folds: the fewest fits, where the final refit on all the training rows,
# which runs alone after the search on either backend, weighs most (16 half-size fits + 1 full: at most 1.67x on 2
# workers).
SEARCHES = (("5 folds (PostgresML's default)", "{{}}"), ("2 folds", '{{"cv": 2}}'))


@contextmanager
def ray_cluster(work: Path) -> Iterator[str]:
    """A head-only local Ray cluster with 2 CPUs whose workers import this checkout; yields its address."""
    port = free_port()
    log = work / "ray.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={work / 'ray'}", "--block"],
            env=env, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"ray start failed:\n{log.read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)  # `ray start --block` stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return len(conn.execute(sql).fetchall())


def compare(
    name: str,
    local: Callable[[], object],
    remote: Callable[[], object],
    rounds: int,
    goal: float,
    warm: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> None:
    for action in warm or (local, remote):  # warm-up (untimed): model loads, Ray workers
        action()
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for i in range(rounds):
        order = [("local", local), ("ray", remote)]
        for label, action in order if i % 2 == 0 else order[::-1]:
            times[label].append(timed(action)[0])
    local_s, ray_s = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"{name}: local {local_s:.2f} s, ray {ray_s:.2f} s (medians of {rounds}); "
          f"ray speed = {local_s / ray_s:.2f}x local (target >= {goal}x)", flush=True)  # fmt: skip


def grid_search(dsn: str, work: Path, local: str, ray: dict[str, str], rows: int, rounds: int) -> None:
    x, y = make_data(rows)
    (work / "ray-grid").mkdir()
    with ml_table(dsn, x, y), pgml_proxy(dsn, work / "ray-grid", **ray, PGML_PROXY_RAY_NUM_CPUS="1") as (remote, _):
        counter = iter(range(1000))
        for folds, search_args in SEARCHES:
            sql = GRID.replace("{search_args}", search_args)
            compare(
                f"grid search, 8 candidates x {folds}, {rows} rows",
                lambda sql=sql: run(local, sql.format(project=f"local {next(counter)}")),
                lambda sql=sql: run(remote, sql.format(project=f"ray {next(counter)}")),
                rounds, 1.6,
            )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--train-rows", type=int, default=2000, help="0: no grid search")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-rows", type=int, default=500, help="rows of the embed's untimed warm-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgml-ray-bench-", dir="/tmp") as tmp, ExitStack() as stack:
        work = Path(tmp)
        dsn = stack.enter_context(upstream(work))
        address = stack.enter_context(ray_cluster(work))
        common = {
            "PGML_PROXY_ENGINE_MODEL_DIRS": str(model_dir(work)),
            "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(work / "artifact.key"),
        }
        ray = {**common, "PGML_PROXY_ENGINE_BACKEND": "ray", "PGML_PROXY_RAY_ADDRESS": address}
        (work / "local").mkdir()
        local, _ = stack.enter_context(pgml_proxy(dsn, work / "local", **common))

        if args.train_rows:
            grid_search(dsn, work, local, ray, args.train_rows, args.rounds)
        with texts_table(dsn, EMBED_TABLE, make_texts(args.rows)):
            (work / "ray-embed").mkdir()
            remote, _ = stack.enter_context(pgml_proxy(dsn, work / "ray-embed", **ray, PGML_PROXY_RAY_NUM_CPUS="2",
                                                       PGML_PROXY_RAY_NAMESPACE="pgml-bench-embed"))  # fmt: skip
            sql = f"SELECT id, pgml.embed('{MODEL}', body) FROM {EMBED_TABLE}"
            warm = f"{sql} WHERE id <= {args.warm_rows}"  # the model's load and first batches, not a whole round
            compare(f"per-row embed, {args.rows} rows", lambda: run(local, sql), lambda: run(remote, sql), args.rounds,
                    0.8, (lambda: run(local, warm), lambda: run(remote, warm)))  # fmt: skip


if __name__ == "__main__":
    main()
