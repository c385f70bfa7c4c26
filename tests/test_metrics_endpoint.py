"""The ``[metrics] listen`` endpoint of a real proxy: /metrics counts what ran through psycopg, /healthz
follows the upstream (README: Metrics and health). Not the ML metrics of pgml.train (tests/test_metrics.py)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.api import evaluated_functions
from proxy.embedded import Cluster, free_port
from proxy.metrics import DECISIONS
from tests.conftest import MINILM, Postgres, ProxyProcess, start_proxy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SECRET_TEXT = "confidential-4f1d text nobody may see"
SECRET_MODEL = "no-such-org/secret-model-9c2e"


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of an HTTP request to the endpoint."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def wait_for(port: int) -> None:
    """The endpoint starts right after the proxy's listener: until it answers."""
    deadline = time.monotonic() + 10
    while True:
        try:
            get(port, "/metrics")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def scrape(port: int) -> Samples:
    status, kind, text = get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def start_watched(upstream: str, workdir: Path) -> tuple[ProxyProcess, int]:
    port = free_port()
    handle = start_proxy(upstream, workdir, PGML_PROXY_METRICS_LISTEN=f"127.0.0.1:{port}")
    wait_for(port)
    return handle, port


@pytest.fixture(scope="module")
def watched(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, int]]:
    handle, port = start_watched(pg.dsn(), tmp_path_factory.mktemp("watched"))
    try:
        yield handle, port
    finally:
        handle.stop()


def test_metrics_count_what_ran(watched: tuple[ProxyProcess, int]) -> None:
    proxy, port = watched
    before = scrape(port)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")  # relayed as it came
        assert conn.execute("SELECT pgml.version()").fetchone() is not None  # rewritten to its result
        with pytest.raises(psycopg.errors.UndefinedObject):  # a pgml call that fails in the engine
            conn.execute("SELECT pgml.embed(%s, %s)", [SECRET_MODEL, SECRET_TEXT])
        during = scrape(port)
    assert delta(before, during, "pgml_proxy_sessions_total") == 1
    assert delta(before, during, "pgml_proxy_sessions_open") == 1
    assert delta(before, during, "pgml_proxy_statements_relayed_total") == 3
    assert delta(before, during, "pgml_proxy_statements_rewritten_total", decision="rewritten") == 1
    assert delta(before, during, "pgml_proxy_statements_rewritten_total", decision="failed") == 1
    assert delta(before, during, "pgml_proxy_pgml_calls_total", function="version", outcome="ok") == 1
    assert delta(before, during, "pgml_proxy_pgml_calls_total", function="embed", outcome="42") == 1
    assert delta(before, during, "pgml_proxy_pgml_call_seconds_count", function="version") == 1
    assert delta(before, during, "pgml_proxy_engine_batch_rows_count", function="embed") == 1
    assert delta(before, during, "pgml_proxy_engine_batch_rows_sum", function="embed") == 1  # one argument row
    assert delta(before, during, "pgml_proxy_engine_wait_seconds_count") >= 1  # version() took a compute turn
    assert value(during, "pgml_proxy_engine_queue_depth") == 0
    assert value(during, "pgml_proxy_engine_calls_admitted") == 0
    assert ("pgml_proxy_model_cache_bytes", ()) in during
    deadline = time.monotonic() + 10
    while value(after := scrape(port), "pgml_proxy_sessions_open") != value(before, "pgml_proxy_sessions_open"):
        assert time.monotonic() < deadline, "the closed session still counts as open"
        time.sleep(0.05)
    assert delta(before, after, "pgml_proxy_sessions_total") == 1


def test_labels_never_carry_statements_or_data(watched: tuple[ProxyProcess, int]) -> None:
    proxy, port = watched
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute(f"SELECT pgml.embed('{SECRET_MODEL}', '{SECRET_TEXT}')")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT pgml.embed(%s, %s)", [SECRET_MODEL, SECRET_TEXT])
    samples = scrape(port)
    labels = {(key, label) for _, pairs in samples for key, label in pairs}
    allowed = {
        "function": evaluated_functions(),
        "decision": set(DECISIONS.values()),
        "le": None,  # histogram bucket bounds
    }
    for key, label in labels:
        assert key in allowed or key == "outcome", key
        assert SECRET_TEXT not in label and SECRET_MODEL not in label and "select" not in label.lower()
        if key == "outcome":
            assert label == "ok" or (len(label) == 2 and label.isalnum()), label
        elif allowed[key] is not None:
            assert label in allowed[key], (key, label)


def test_endpoint_answers_only_its_two_paths(watched: tuple[ProxyProcess, int]) -> None:
    _, port = watched
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/metrics", method="POST")[0] == 405
    status, _, body = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == ""


def test_healthz_follows_the_upstream(pg: Postgres, tmp_path: Path) -> None:
    """200 while the upstream takes connections and the engine runs a job; 503 with the reason once it stopped."""
    if pg.cluster is None:
        pytest.skip("needs a PostgreSQL binary to start a throwaway cluster (PGML_TEST_DSN is set)")
    cluster = Cluster(pg.cluster.bin_dir, tmp_path / "data")
    cluster.start()
    try:
        proxy, port = start_watched(cluster.dsn(), tmp_path)
        try:
            assert get(port, "/healthz") == (200, "text/plain", "ok\n")
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:  # the probe left no session behind
                backends = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchone()
                assert backends == (1,)
            log = (tmp_path / "data" / "server.log").read_text()
            assert "startup packet" not in log and "cancel request" not in log, log  # nor a word in its log
            cluster.stop("fast")
            status, _, body = get(port, "/healthz")
            assert status == 503 and body.startswith("upstream unreachable:"), body
            assert get(port, "/metrics")[0] == 200  # metrics go on without the upstream
            cluster.start()
            assert get(port, "/healthz")[0] == 200
        finally:
            proxy.stop()
    finally:
        cluster.stop("immediate")


@pytest.mark.slow  # loads all-MiniLM-L6-v2 and embeds until canceled
def test_healthz_fails_while_the_engine_cannot_take_a_job(pg: Postgres, model_dir: Path, tmp_path: Path) -> None:
    """With its one queue place taken by a long embed, the engine cannot run the check's job: 503, then 200."""
    port = free_port()
    proxy = start_proxy(
        pg.dsn(), tmp_path, PGML_PROXY_METRICS_LISTEN=f"127.0.0.1:{port}", PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir),
        PGML_PROXY_ENGINE_MAX_QUEUE="1",
    )  # fmt: skip
    failures: list[BaseException] = []
    stop = threading.Event()
    try:
        wait_for(port)
        assert get(port, "/healthz")[0] == 200
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            long = threading.Thread(target=_long_embed, args=(conn, stop, failures))
            long.start()
            try:
                deadline = time.monotonic() + 120
                while (answer := get(port, "/healthz"))[0] == 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                status, _, body = answer
                assert status == 503 and body.startswith("engine unresponsive:"), (answer, failures)
            finally:
                stop.set()
                while long.is_alive():
                    conn.cancel_safe()
                    long.join(1)
        assert all(isinstance(f, psycopg.errors.QueryCanceled) for f in failures), failures
        assert get(port, "/healthz")[0] == 200
    finally:
        proxy.stop()


def _long_embed(conn: psycopg.Connection, stop: threading.Event, failures: list[BaseException]) -> None:
    """Embeds until stopped (its own next part may find the one queue place taken: 53000, and it starts over)."""
    sql = f"SELECT pgml.embed('{MINILM}', 'sentence ' || i) FROM generate_series(1, 200000) i"
    while not stop.is_set():
        try:
            conn.execute(sql).fetchall()
        except psycopg.errors.InsufficientResources:
            continue
        except psycopg.Error as exc:
            failures.append(exc)
