"""Classical-ML benchmark: pgml.train / pgml.predict through pgml-proxy vs XGBoost in-process.

Three measurements, side by side in one run (the machine is shared and noisy; rounds alternate and
the order flips every round; medians are reported, nothing is asserted):

(a) ``pgml.train`` (xgboost, explicit ``--hyperparams`` on both sides) over ``--rows`` rows x 20 real
    features + a real label, through the proxy, vs ``XGBRegressor(**hyperparams).fit`` here on the same
    numpy arrays (the same 75 % training-split size), ``--train-rounds`` rounds; median seconds and the
    ratio proxy/raw (target <= 1.3). The proxy's INFO log gives a breakdown of its run (read, fit, ...).
(b) ``SELECT id, pgml.predict(project, ARRAY[f1, …, f20]) FROM t`` over all rows (fetched with psycopg)
    vs ``model.predict`` here on the numpy array, with the very model the proxy deployed (read back from
    ``pgml.files``); rows/s and the ratio (target >= 0.5). Also vs a client doing it by hand: fetch
    ``SELECT id, ARRAY[f1, …, f20] FROM t`` directly from PostgreSQL, then ``model.predict``. One extra
    proxy pass runs with the upstream's ``log_min_duration_statement = 0`` for a per-phase breakdown
    (the streamed statement's parts as the server runs them — or, on the temp-table path, gather query,
    temp-table COPY, final lookup; the rest is the proxy's own work: reading the rows, the engine call,
    writing the rows).
(c) latency of one ``SELECT pgml.predict(project, ARRAY[<20 constants>])`` (different constants each
    time) vs ``SELECT 1``, both through the proxy, alternated, ``--latency-runs`` each: p50/p99.

    .venv/bin/python bench/ml.py [--rows 100000] [--rounds 3] [--train-rounds 2] [--latency-runs 300]
    .venv/bin/python bench/ml.py --train-only [--baseline /path/to/other/checkout] [--hyperparams JSON]

Set PGML_BENCH_DSN to use an existing server instead of a throwaway PG 18 (the table lives in a
``pgml_bench`` schema, dropped at the end; the project's models stay in ``pgml.*``; the per-phase
breakdown of (b) needs the throwaway server's log and is skipped then).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentile, pgml_proxy, timed, upstream, upstream_phases

NUM_FEATURES = 20
FEATURES = [f"f{i}" for i in range(1, NUM_FEATURES + 1)]
TABLE = "pgml_bench.ml"
TRAIN_VIEW = "pgml_bench.ml_train"  # features and label only: pgml.train uses every other column as a feature
WARM_VIEW = "pgml_bench.ml_warm"  # the first 1000 rows, for the proxy's warm-up run
PROJECT = "bench_xgb"
WARM_PROJECT = "bench_xgb_warm_up"
TEST_SIZE = 0.25  # pgml.train's default
ARRAY = "ARRAY[" + ", ".join(FEATURES) + "]"
PREDICT_ALL = f"SELECT id, pgml.predict('{PROJECT}', {ARRAY}) FROM {TABLE}"
FETCH_ALL = f"SELECT id, {ARRAY} FROM {TABLE}"


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def make_data(rows: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """float32 features (standard normal) and a label: a linear function, a little non-linearity, noise."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((rows, NUM_FEATURES)).astype(np.float32)
    weights = rng.uniform(-2, 2, NUM_FEATURES)
    y = x @ weights + 0.5 * np.sin(3 * x[:, 0]) + 0.1 * rng.standard_normal(rows)
    return x, y.astype(np.float32)


@contextmanager
def ml_table(dsn: str, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Iterator[None]:
    """``pgml_bench.ml`` (id, f1..f20 real, y real) by COPY; ``%.9g`` round-trips every float4 exactly."""
    columns = ", ".join(f"{f} real NOT NULL" for f in FEATURES)
    ids = np.arange(1, len(x) + 1, dtype=np.float64)[:, None]
    text = io.StringIO()
    np.savetxt(text, np.hstack([ids, x.astype(np.float64), y.astype(np.float64)[:, None]]),
               fmt=["%d"] + ["%.9g"] * (NUM_FEATURES + 1), delimiter="\t")  # fmt: skip
    data = text.getvalue().encode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS pgml_bench CASCADE")
        conn.execute("CREATE SCHEMA pgml_bench")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, {columns}, y real NOT NULL)")
        with conn.cursor().copy(f"COPY {TABLE} FROM STDIN") as copy:
            for start in range(0, len(data), 1 << 20):
                copy.write(data[start : start + (1 << 20)])
        conn.execute(f"CREATE VIEW {TRAIN_VIEW} AS SELECT {', '.join(FEATURES)}, y FROM {TABLE}")
        conn.execute(f"CREATE VIEW {WARM_VIEW} AS SELECT * FROM {TRAIN_VIEW} LIMIT 1000")
        conn.execute(f"VACUUM ANALYZE {TABLE}")
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS pgml_bench CASCADE")


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def train_sql(hyperparams: str, project: str = PROJECT, relation: str = TRAIN_VIEW) -> str:
    return (
        f"SELECT * FROM pgml.train('{project}', 'regression', '{relation}', 'y', algorithm => 'xgboost',"
        f" hyperparams => '{hyperparams}')"
    )


def train_rounds(
    proxies: dict[str, str], x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], hyperparams: dict[str, Any], rounds: int
) -> tuple[dict[str, list[float]], list[tuple[datetime, datetime]]]:
    """Seconds per training run of each proxy (``proxy``: this checkout's) and the raw fit, rotated (the order
    flips every round); also each ``proxy`` run's wall-clock span (for its log)."""
    from xgboost import XGBRegressor

    n_train = len(x) - round(len(x) * TEST_SIZE)
    order = np.random.default_rng(7).permutation(len(x))
    x_train, y_train = x[np.sort(order[:n_train])], y[np.sort(order[:n_train])]
    sql = train_sql(json.dumps(hyperparams))
    seconds: dict[str, list[float]] = defaultdict(list)
    spans: list[tuple[datetime, datetime]] = []
    sides = [*proxies, "raw"]
    for rnd in range(rounds):
        for side in sides if rnd % 2 == 0 else reversed(sides):
            began = datetime.now()
            if side == "raw":
                elapsed, _ = timed(lambda: XGBRegressor(**hyperparams).fit(x_train, y_train))
            else:
                with psycopg.connect(proxies[side], autocommit=True) as conn:
                    elapsed, _ = timed(lambda conn=conn: conn.execute(sql).fetchall())
            if side == "proxy":
                spans.append((began, datetime.now()))
            seconds[side].append(elapsed)
            print(f"  round {rnd + 1} {side:<8}: {elapsed:7.2f} s", flush=True)
    return seconds, spans


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.-]+: (.*)$")


def train_breakdown(log: Path, spans: list[tuple[datetime, datetime]]) -> list[dict[str, float]]:
    """Per proxy training run, from engine.ml.train's INFO line (logged once the rows are decoded): the read
    (project and relation lookups, COPY, decode) and the rest (snapshot statistics, fit, metrics, writes)."""
    lines = []
    for line in log.read_text().splitlines():
        match = _LOG_LINE.match(line)
        if match:
            lines.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"), match.group(2)))
    out = []
    for began, ended in spans:
        read = next((at for at, text in lines if began <= at <= ended and text.startswith("pgml.train: ")), None)
        if read is not None:
            out.append(
                {
                    "read (lookups, COPY, decode)": (read - began).total_seconds(),
                    "rest (statistics, fit, metrics, write)": (ended - read).total_seconds(),
                }
            )
    return out


def deployed_estimator(direct: str) -> Any:
    """The XGBRegressor the proxy deployed for the project, read back from pgml.files."""
    from engine.ml import artifacts

    with psycopg.connect(direct, autocommit=True) as conn:
        model_id = conn.execute(
            "SELECT d.model_id FROM pgml.deployments d JOIN pgml.projects p ON p.id = d.project_id"
            " WHERE p.name = %s ORDER BY d.created_at DESC, d.id DESC LIMIT 1",
            (PROJECT,),
        ).fetchone()[0]  # type: ignore[index]
        parts = conn.execute(
            "SELECT path, data FROM pgml.files WHERE model_id = %s ORDER BY path, part", (model_id,)
        ).fetchall()
    data: dict[str, bytes] = defaultdict(bytes)
    for path, chunk in parts:
        data[path] += bytes(chunk)
    (path,) = [p for p in data if p.startswith("estimator.")]
    return artifacts.load(path.removeprefix("estimator."), data[path]).estimator


def fetch_then_predict(conn: psycopg.Connection[Any], model: Any) -> Any:
    """What a client does by hand: fetch the feature arrays, then predict here."""
    rows = conn.execute(FETCH_ALL).fetchall()
    return model.predict(np.array([r[1] for r in rows], dtype=np.float32))


def predict_rounds(
    proxy: str, direct: str, model: Any, x: np.ndarray[Any, Any], rounds: int
) -> tuple[dict[str, list[float]], list[tuple[Any, ...]]]:
    """Seconds per full pass: proxy, raw predict, direct fetch + raw predict; the order rotates each round."""
    seconds: dict[str, list[float]] = defaultdict(list)
    rows: list[tuple[Any, ...]] = []
    actions: dict[str, Callable[[], Any]] = {}
    with psycopg.connect(proxy, autocommit=True) as via_proxy, psycopg.connect(direct, autocommit=True) as via_direct:
        actions = {
            "proxy": lambda: via_proxy.execute(PREDICT_ALL).fetchall(),
            "raw": lambda: model.predict(x),
            "fetch+raw": lambda: fetch_then_predict(via_direct, model),
        }
        names = list(actions)
        for rnd in range(rounds):
            for name in names[rnd % 3 :] + names[: rnd % 3]:
                took, result = timed(actions[name])
                seconds[name].append(took)
                if name == "proxy":
                    rows = result
                print(f"  round {rnd + 1} {name:<9}: {took:7.3f} s  ({len(x) / took:10.0f} rows/s)", flush=True)
    return seconds, rows


def check_predictions(rows: list[tuple[Any, ...]], model: Any, x: np.ndarray[Any, Any]) -> float:
    """Largest |proxy - raw| over all rows."""
    assert len(rows) == len(x), f"proxy returned {len(rows)} rows for {len(x)}"
    got = np.zeros(len(x), dtype=np.float32)  # real values: compare as float4, as printed and parsed
    for row_id, value in rows:
        got[int(row_id) - 1] = value
    return float(np.abs(got - model.predict(x).astype(np.float32)).max())


def predict_breakdown(proxy: str, server_log: Path) -> tuple[float, dict[str, float]] | None:
    """One proxy pass with the upstream session's statement durations logged; seconds per upstream phase."""
    if not server_log.exists():
        return None
    return upstream_phases(proxy, server_log, PREDICT_ALL)


def latency(proxy: str, model: Any, runs: int) -> dict[str, list[float]]:
    """Single predicts with fresh constants, SELECT 1 (both through the proxy) and one-row raw predicts here,
    alternated (the order flips every run); milliseconds."""
    rng = np.random.default_rng(11)
    ms: dict[str, list[float]] = defaultdict(list)
    with psycopg.connect(proxy, autocommit=True) as conn:
        for i in range(-10, runs):  # 10 unmeasured warm-up runs
            row = rng.standard_normal((1, NUM_FEATURES)).astype(np.float32)
            values = ", ".join(f"{v:.9g}" for v in row[0])
            predict = f"SELECT pgml.predict('{PROJECT}', ARRAY[{values}])"
            actions: list[tuple[str, Callable[[], Any]]] = [
                ("predict", lambda: conn.execute(predict).fetchall()),  # noqa: B023
                ("select1", lambda: conn.execute("SELECT 1").fetchall()),
                ("raw", lambda: model.predict(row)),  # noqa: B023
            ]
            for name, action in actions if i % 2 == 0 else actions[::-1]:
                took, _ = timed(action)
                if i >= 0:
                    ms[name].append(took * 1000)
    return ms


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of (b)")
    parser.add_argument("--train-rounds", type=int, default=2, help="alternated rounds of (a)")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--hyperparams", default='{"n_estimators": 50}', help="xgboost hyperparameters (JSON)")
    parser.add_argument("--train-only", action="store_true", help="only (a): pgml.train vs the raw fit")
    parser.add_argument("--baseline", type=Path, help="with --train-only: also another checkout's proxy, rotated in")
    args = parser.parse_args()
    hyperparams = json.loads(args.hyperparams)
    started = time.perf_counter()

    x, y = make_data(args.rows)
    with tempfile.TemporaryDirectory(prefix="pgml-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)
        direct = stack.enter_context(upstream(work))
        load_s, _ = timed(lambda: stack.enter_context(ml_table(direct, x, y)))
        proxy, log = stack.enter_context(
            pgml_proxy(direct, work, PGML_PROXY_LOG_LEVEL="info", PGML_PROXY_ENGINE_CALL_TIMEOUT="3600")
        )
        with psycopg.connect(proxy, autocommit=True) as conn:  # schema install, imports, first fit at small size
            warm_s, _ = timed(lambda: conn.execute(train_sql("{}", WARM_PROJECT, WARM_VIEW)).fetchall())
        print(f"{args.rows} rows loaded by COPY in {load_s:.2f} s; proxy warm-up (schema, imports): {warm_s:.2f} s")

        proxies = {"proxy": proxy}
        if args.baseline is not None:
            (work / "baseline").mkdir()
            root = args.baseline.resolve()
            proxies["baseline"], _ = stack.enter_context(
                pgml_proxy(
                    direct, work / "baseline", root=root, PYTHONPATH=str(root), PGML_PROXY_ENGINE_CALL_TIMEOUT="3600"
                )
            )
            with psycopg.connect(proxies["baseline"], autocommit=True) as conn:
                conn.execute(train_sql("{}", WARM_PROJECT, WARM_VIEW)).fetchall()
        print(f"\n(a) pgml.train xgboost {json.dumps(hyperparams)}, {args.train_rounds} rotated rounds")
        train_s, spans = train_rounds(proxies, x, y, hyperparams, args.train_rounds)
        train_proxy, train_raw = train_s["proxy"], train_s["raw"]
        breakdown = train_breakdown(log, spans)
        if args.train_only:
            print(f"\n=== results ({args.rows} rows x {NUM_FEATURES} features, xgboost {json.dumps(hyperparams)}) ===")
            report_train(args, train_proxy, train_raw, breakdown)
            if "baseline" in train_s:
                base = statistics.median(train_s["baseline"])
                print(f"    baseline checkout {base:.2f} s, baseline/raw = {base / statistics.median(train_raw):.2f}")
            report_log(log)
            return

        model = deployed_estimator(direct)
        model.predict(x[:1000])
        with psycopg.connect(proxy, autocommit=True) as conn:  # model load into the proxy's cache
            conn.execute(f"{PREDICT_ALL} WHERE id <= 1000").fetchall()
        print(f"\n(b) SELECT pgml.predict(…) FROM t, {args.rows} rows, {args.rounds} rotated rounds")
        predict_s, rows = predict_rounds(proxy, direct, model, x, args.rounds)
        max_diff = check_predictions(rows, model, x)
        phases = predict_breakdown(proxy, work / "data" / "server.log")

        print(f"\n(c) single-row latency, {args.latency_runs} runs each")
        latency_ms = latency(proxy, model, args.latency_runs)
        report(args, hyperparams, train_proxy, train_raw, breakdown, predict_s, max_diff, phases, latency_ms)
        report_log(log)
    print(f"\ntotal run time {time.perf_counter() - started:.0f} s")


def report(
    args: argparse.Namespace,
    hyperparams: dict[str, Any],
    train_proxy: list[float],
    train_raw: list[float],
    breakdown: list[dict[str, float]],
    predict_s: dict[str, list[float]],
    max_diff: float,
    phases: tuple[float, dict[str, float]] | None,
    latency_ms: dict[str, list[float]],
) -> None:
    print(f"\n=== results ({args.rows} rows x {NUM_FEATURES} features, xgboost {json.dumps(hyperparams)}) ===")
    report_train(args, train_proxy, train_raw, breakdown)
    rate = {name: args.rows / statistics.median(values) for name, values in predict_s.items()}
    print(
        f"(b) predict, median of {len(predict_s['proxy'])}: proxy {rate['proxy']:.0f} rows/s,"
        f" raw predict {rate['raw']:.0f} rows/s, proxy/raw = {rate['proxy'] / rate['raw']:.3f} (target >= 0.5)"
    )
    print(
        f"    direct fetch + raw predict {rate['fetch+raw']:.0f} rows/s,"
        f" proxy/(fetch+raw) = {rate['proxy'] / rate['fetch+raw']:.2f}; max |proxy - raw| = {max_diff:.3g}"
    )
    if phases is not None:
        total, parts = phases
        executed = parts.pop("statements executed", 0)
        upstream_s = sum(parts.values())
        shown = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"    one more proxy pass, {total:.2f} s, upstream time by phase: {shown}; {executed:.0f} statements")
        print(
            f"    the rest (proxy: reading the rows, the engine call, writing the rows to the client):"
            f" {total - upstream_s:.2f} s"
        )
    p50, p99 = percentile(latency_ms["predict"], 50), percentile(latency_ms["predict"], 99)
    s50, s99 = percentile(latency_ms["select1"], 50), percentile(latency_ms["select1"], 99)
    r50, r99 = percentile(latency_ms["raw"], 50), percentile(latency_ms["raw"], 99)
    print(
        f"(c) single predict through the proxy, {len(latency_ms['predict'])} runs: p50 {p50:.2f} ms p99 {p99:.2f} ms;"
        f" SELECT 1 p50 {s50:.2f} ms p99 {s99:.2f} ms"
    )
    print(
        f"    predict - SELECT 1 = {p50 - s50:+.2f} ms at p50 (ratio {p50 / s50:.1f}), {p99 - s99:+.2f} ms at p99;"
        f" for scale, a one-row model.predict here: p50 {r50:.2f} ms p99 {r99:.2f} ms"
    )


def report_train(
    args: argparse.Namespace, train_proxy: list[float], train_raw: list[float], breakdown: list[dict[str, float]]
) -> None:
    tp, tr = statistics.median(train_proxy), statistics.median(train_raw)
    rows = f"{args.rows // 1000}k" if args.rows % 1000 == 0 else str(args.rows)
    print(f"pgml.train xgboost {rows} x {NUM_FEATURES} vs raw fit on numpy: {tp / tr:.2f}x (target <= 1.3)")
    print(
        f"(a) train, median of {len(train_proxy)}: proxy {tp:.2f} s, raw fit {tr:.2f} s"
        f" ({round(args.rows * (1 - TEST_SIZE))} rows), proxy/raw = {tp / tr:.2f} (target <= 1.3)"
    )
    if breakdown:
        keys = list(breakdown[0])
        median = {k: statistics.median(b[k] for b in breakdown) for k in keys}
        print("    proxy breakdown (median, from its log): " + ", ".join(f"{k} {v:.2f} s" for k, v in median.items()))


def report_log(log: Path) -> None:
    """Warnings and errors the proxy logged (INFO lines are the breakdown's source, not shown)."""
    banner = ("pgml-proxy ", "  psql ")
    lines = [
        line
        for line in log.read_text().splitlines()
        if line.strip() and not line.startswith(banner) and " INFO " not in line
    ]
    if lines:
        print(f"\nproxy log ({len(lines)} lines not INFO, last 20):\n" + "\n".join(lines[-20:]))


if __name__ == "__main__":
    main()
