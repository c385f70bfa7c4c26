"""The Ray backend (``[engine] backend = "ray"``) against a real local Ray cluster and a real proxy.

The same statements give the same results as on the local backend (embed, predict, train with a grid
search, transform, transform_stream, tune and generate), a model actor killed mid-call or mid-stream gives a
clean error and the next call works, and a cancel stops a long embed or stream running in an actor.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import ray
from ray._private import state  # the GCS actor table (the state API needs the dashboard, which is off)

from engine.runtime.ray_backend import DEFAULT_TOKEN_FILE, actor_name, deal, worker_key
from proxy.embedded import free_port
from tests.conftest import MINILM, ROOT, Postgres, ProxyProcess, start_proxy
from tests.tiny_models import tiny_gpt2_no_eos

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"  # the venv's ray command


@pytest.fixture(scope="session")
def ray_client_port() -> int:
    """The port of the test cluster's Ray Client server (``ray://127.0.0.1:<port>``)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory, ray_client_port: int) -> Iterator[str]:
    """A local Ray cluster (head only, 2 CPUs, one logical GPU, no dashboard, a Ray Client server) whose workers
    import this checkout.

    Token authentication is off for the cluster and every driver of these tests (RAY_AUTH_MODE=disabled), so a
    ``~/.ray/auth_token`` left by some other local ``ray.init`` neither turns it on for ``ray start`` nor
    matters. GRPC_ENABLE_FORK_SUPPORT=0: the client server forks a server per Ray Client connection, and gRPC's
    fork handlers crash it now and then (ray-project/ray#63202).
    """
    port = free_port()
    temp = Path(f"/tmp/pgml-ray-{secrets.token_hex(4)}")  # Ray's socket paths must stay short
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    auth = pytest.MonkeyPatch()
    auth.setenv("RAY_AUTH_MODE", "disabled")  # this process's driver and the proxies started from it
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "GRPC_ENABLE_FORK_SUPPORT": "0"}  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             "--num-cpus=2", "--num-gpus=1", f"--ray-client-server-port={ray_client_port}", "--disable-usage-stats",
             f"--temp-dir={temp}", "--block"],
            env=env, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ray.init(address=address, namespace="pgml-test-ray", logging_level=logging.WARNING, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGINT)  # `ray start --block` stops every process it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
        auth.undo()


@pytest.fixture(scope="module")
def ray_proxy(
    pg: Postgres, proxy: ProxyProcess, model_dir: Path, ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy with backend = "ray" beside the shared local one (``proxy``), sharing its artifact key, with metrics.

    A quarter CPU per actor and task: the detached actors of every model these tests use (embed, two predict
    models, the GPT-2) stay alive and keep their share of the 2 CPUs, and a tune task needs one more.
    """
    handle = start_proxy(
        pg.dsn(), tmp_path_factory.mktemp("ray-proxy"),
        PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir), PGML_PROXY_ENGINE_BACKEND="ray",
        PGML_PROXY_RAY_ADDRESS=ray_address, PGML_PROXY_RAY_NAMESPACE="pgml-test-ray", PGML_PROXY_RAY_NUM_CPUS="0.25",
        PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(proxy.log.parent / "artifact.key"),
        PGML_PROXY_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    try:
        yield handle
    finally:
        handle.stop()


def rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def texts(pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS ray_texts; CREATE TABLE ray_texts AS SELECT i, 'text number ' || i || "
                      "repeat(' word', i % 7) AS body FROM generate_series(1, 40) i")  # fmt: skip
        admin.execute("DROP TABLE IF EXISTS ray_long; CREATE TABLE ray_long AS SELECT i, repeat('word ', 120) || i "
                      "AS body FROM generate_series(1, 3000) i")  # fmt: skip


def test_fan_out_deals_fits_into_twice_the_tasks_that_run_at_once() -> None:
    """Sans-IO: 40 fits (8 candidates x 5 folds) on 2 workers are 4 tasks of 10, dealt round-robin (candidates of
    different cost mix)."""
    shares = deal(40, 2)
    assert shares[:2] == [list(range(0, 40, 4)), list(range(1, 40, 4))] and len(shares) == 4
    assert sorted(k for s in shares for k in s) == list(range(40))
    assert deal(3, 8) == [[0], [1], [2]]  # fewer items than tasks: one each
    assert deal(5, 0) == [[0], [1], [2], [3], [4]]  # no worker yet (an autoscaler starts them on demand): one each
    assert deal(0, 2) == []


def test_embed_same_as_local(proxy: ProxyProcess, ray_proxy: ProxyProcess, texts: None) -> None:
    for sql in (
        f"SELECT pgml.embed('{MINILM}', 'hello ray')",
        f"SELECT i, pgml.embed('{MINILM}', body) FROM ray_texts ORDER BY i",
        f"SELECT pgml.embed('{MINILM}', ARRAY['a', 'b c'], '{{\"normalize_embeddings\": true}}')",
    ):
        local, remote = rows(proxy.dsn(), sql), rows(ray_proxy.dsn(), sql)
        assert len(local) == len(remote)
        for a, b in zip(local, remote, strict=True):
            assert a[:-1] == b[:-1]
            assert a[-1] == pytest.approx(b[-1], abs=1e-6)  # torch threads differ: last-bit float differences


TRAIN = (
    "SELECT * FROM pgml.train('{project}', 'regression', 'ray_fit', 'y', 'ridge', search => 'grid',"
    " search_params => '{{\"alpha\": [0.01, 0.1, 1, 3, 10, 30, 100, 300]}}', search_args => '{{\"cv\": 2}}',"
    " test_sampling => 'last')"
)


@pytest.fixture(scope="module")
def fit_table(pg: Postgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS ray_fit; CREATE TABLE ray_fit AS SELECT i::real AS a, (i % 7)::real AS b,"
                      " (3 * i - 2 * (i % 7) + (i % 5))::real AS y FROM generate_series(1, 200) i")  # fmt: skip


def search_results(dsn: str, project: str) -> tuple[dict[str, object], dict[str, object]]:
    sql = ("SELECT m.metrics, m.hyperparams FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
           f" WHERE p.name = '{project}' ORDER BY m.id DESC LIMIT 1")  # fmt: skip
    ((metrics, hyperparams),) = rows(dsn, sql)
    assert isinstance(metrics, dict) and isinstance(hyperparams, dict)
    return metrics["search_results"], hyperparams


def test_train_grid_search_and_predict_same_as_local(proxy: ProxyProcess, ray_proxy: ProxyProcess,
                                                     fit_table: None) -> None:  # fmt: skip
    assert rows(proxy.dsn(), TRAIN.format(project="ray local")) == [("ray local", "regression", "ridge", True)]
    assert rows(ray_proxy.dsn(), TRAIN.format(project="ray remote")) == [("ray remote", "regression", "ridge", True)]
    local, remote = search_results(proxy.dsn(), "ray local"), search_results(ray_proxy.dsn(), "ray remote")
    assert remote[1] == local[1]  # the same best candidate
    assert len(remote[0]["params"]) == 8  # type: ignore[arg-type]
    for key in ("params", "best_index", "mean_test_score", "split0_test_score", "split1_test_score"):
        assert remote[0][key] == local[0][key], key
    for project in ("ray local", "ray remote"):
        sql = f"SELECT a, pgml.predict('{project}', ARRAY[a, b]) FROM ray_fit ORDER BY a"
        assert rows(ray_proxy.dsn(), sql) == rows(proxy.dsn(), sql)
    sql = "SELECT pgml.predict('ray remote', ARRAY[1, 2]::real[]), pgml.predict('ray local', ARRAY[5, 1])"
    assert rows(ray_proxy.dsn(), sql) == rows(proxy.dsn(), sql)


def _embed_actor_pid() -> tuple[str, int]:
    name = actor_name(worker_key("embed", (MINILM, "", {})), 0)
    for actor in state.actors().values():
        if actor.get("Name") == name and actor.get("State") == "ALIVE":
            return name, int(actor["Pid"])
    raise AssertionError(f"no live actor {name}")


def test_killed_actor_gives_a_clean_error_then_a_fresh_actor(ray_proxy: ProxyProcess, texts: None) -> None:
    rows(ray_proxy.dsn(), f"SELECT pgml.embed('{MINILM}', 'warm')")
    _, pid = _embed_actor_pid()
    killer = threading.Timer(1.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    with psycopg.connect(ray_proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SystemError) as caught:
            conn.execute(f"SELECT pgml.embed('{MINILM}', body) FROM ray_long").fetchall()
        assert caught.value.sqlstate == "58000" and "Ray worker" in str(caught.value)
        vector = conn.execute(f"SELECT pgml.embed('{MINILM}', 'after')").fetchone()
    killer.join()
    assert vector is not None and len(vector[0]) == 384
    assert _embed_actor_pid()[1] != pid


def test_cancel_stops_a_long_embed_in_the_actor(ray_proxy: ProxyProcess, texts: None) -> None:
    rows(ray_proxy.dsn(), f"SELECT pgml.embed('{MINILM}', 'warm')")
    with psycopg.connect(ray_proxy.dsn()) as conn:
        timer = threading.Timer(1.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"SELECT pgml.embed('{MINILM}', body) FROM ray_long").fetchall()
        assert time.monotonic() - started < 20
        conn.rollback()
        started = time.monotonic()
        assert conn.execute(f"SELECT pgml.embed('{MINILM}', 'next') IS NOT NULL").fetchone() == (True,)
        assert time.monotonic() - started < 10  # the actor stopped the canceled batch: it is free again


# --------------------------------------------------------------------------- #
# transform, transform_stream, tune and generate (a tiny random GPT-2 built here)
# --------------------------------------------------------------------------- #

GPT2 = "ray-tiny-gpt2"
TASK = json.dumps({"task": "text-generation", "model": GPT2})


def tokens(n: int) -> str:
    return json.dumps({"max_new_tokens": n})


@pytest.fixture(scope="module")
def gpt2(model_dir: Path) -> str:
    if not (model_dir / GPT2).exists():
        tiny_gpt2_no_eos(model_dir / GPT2)  # every generation makes exactly the tokens asked for
    return GPT2


def _stream_actor_pid() -> int:
    name = actor_name(worker_key("transform_stream", (json.loads(TASK),)), 0)
    for actor in state.actors().values():
        if actor.get("Name") == name and actor.get("State") == "ALIVE":
            return int(actor["Pid"])
    raise AssertionError(f"no live actor {name}")


def test_transform_and_stream_same_as_local(proxy: ProxyProcess, ray_proxy: ProxyProcess, gpt2: str) -> None:
    for sql in (
        f"SELECT pgml.transform('{TASK}', '{tokens(6)}', ARRAY['the cat', 'a dog sat'])",
        "SELECT pgml.transform('text-classification', '{}', ARRAY['x']) IS NULL",  # no such model: the same error
        f"SELECT pgml.transform_stream('{TASK}', '{tokens(12)}', 'the cat')",
        f"SELECT count(*), min(s::text) FROM pgml.transform_stream('{TASK}', '{tokens(5)}', 'the dog') AS s",
    ):
        try:
            local = rows(proxy.dsn(), sql)
        except psycopg.Error as exc:
            with pytest.raises(type(exc)) as caught:
                rows(ray_proxy.dsn(), sql)
            assert (caught.value.sqlstate, str(caught.value)) == (exc.sqlstate, str(exc))
            continue
        assert rows(ray_proxy.dsn(), sql) == local, sql
    with psycopg.connect(ray_proxy.dsn(), autocommit=True) as c:  # the model is warm in its actor
        started = time.monotonic()
        arrivals = [time.monotonic() for _ in c.cursor().stream(
            f"SELECT pgml.transform_stream('{TASK}', '{tokens(300)}', 'the cat')")]  # fmt: skip
    assert len(arrivals) > 100
    first, last = arrivals[0] - started, arrivals[-1] - started
    assert first < last / 3, (first, last)  # fragments come from the actor while it generates
    url = f"http://{ray_proxy.env['PGML_PROXY_METRICS_LISTEN']}/metrics"
    with urllib.request.urlopen(url, timeout=20) as response:
        gauge = [line for line in response.read().decode().splitlines() if line.startswith("pgml_proxy_ray_actors ")]
    assert gauge and float(gauge[0].split()[1]) >= 1
    pid = _stream_actor_pid()
    assert rows(ray_proxy.dsn(), "SELECT pgml.clear_gpu_cache()") == [(True,)]  # the actors' models freed too
    assert rows(ray_proxy.dsn(), f"SELECT pgml.transform('{TASK}', '{tokens(6)}', ARRAY['the cat'])") == rows(
        proxy.dsn(), f"SELECT pgml.transform('{TASK}', '{tokens(6)}', ARRAY['the cat'])"
    )  # loaded again, in the same actor
    assert _stream_actor_pid() == pid


def test_session_settings_narrow_the_actors_too(proxy: ProxyProcess, ray_proxy: ProxyProcess, gpt2: str) -> None:
    """The caller's pgml.huggingface_whitelist travels with the call: the actor refuses what the proxy would."""
    for sql in (
        f"SELECT pgml.transform('{TASK}', '{tokens(2)}', ARRAY['the cat'])",
        f"SELECT pgml.transform_stream('{TASK}', '{tokens(2)}', 'the cat')",
    ):
        errors = []
        for dsn in (proxy.dsn(), ray_proxy.dsn()):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SET pgml.huggingface_whitelist = 'some/other-model'")
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
                    conn.execute(sql).fetchall()
                errors.append(str(caught.value))
                conn.execute(f"SET pgml.huggingface_whitelist = '{GPT2}'")  # listed: allowed again
                assert conn.execute(sql).fetchall()
        assert errors[0] == errors[1] and GPT2 in errors[0], errors


def test_killed_actor_mid_stream_then_the_next_stream_works(ray_proxy: ProxyProcess, gpt2: str) -> None:
    rows(ray_proxy.dsn(), f"SELECT pgml.transform_stream('{TASK}', '{tokens(2)}', 'warm')")
    pid = _stream_actor_pid()
    with psycopg.connect(ray_proxy.dsn(), autocommit=True) as conn:
        stream = conn.cursor().stream(f"SELECT pgml.transform_stream('{TASK}', '{tokens(20000)}', 'the cat')")
        with pytest.raises(psycopg.errors.SystemError) as caught:
            for i, _ in enumerate(stream):
                if i == 3:
                    os.kill(pid, signal.SIGKILL)
        assert caught.value.sqlstate == "58000" and "Ray worker" in str(caught.value)
        got = conn.execute(f"SELECT pgml.transform_stream('{TASK}', '{tokens(3)}', 'the cat')").fetchall()
    assert len(got) == 5  # the prompt's two words, then one fragment per token: from a fresh actor
    assert _stream_actor_pid() != pid


def test_cancel_stops_a_stream_in_the_actor(ray_proxy: ProxyProcess, gpt2: str) -> None:
    rows(ray_proxy.dsn(), f"SELECT pgml.transform_stream('{TASK}', '{tokens(2)}', 'warm')")
    with psycopg.connect(ray_proxy.dsn(), autocommit=True) as c:
        timer = threading.Timer(1.5, c.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute(f"SELECT pgml.transform_stream('{TASK}', '{tokens(20000)}', 'the cat')").fetchall()
        timer.join()
        assert time.monotonic() - started < 20
        started = time.monotonic()
        assert len(c.execute(f"SELECT pgml.transform_stream('{TASK}', '{tokens(3)}', 'a')").fetchall()) == 4
        assert time.monotonic() - started < 10  # the canceled generation stopped: the actor is free again


TUNE = (
    "SELECT * FROM pgml.tune('{project}', task => 'text-generation', relation_name => 'ray_book',"
    " y_column_name => 'body', model_name => '" + GPT2 + "', hyperparams => '{{\"max_steps\": 2,"
    " \"per_device_train_batch_size\": 4, \"logging_steps\": 1}}', test_size => 0.25, test_sampling => 'last')"
)


@pytest.fixture(scope="module")
def book(pg: Postgres, gpt2: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS ray_book; CREATE TABLE ray_book AS SELECT i, 'the cat sat on the mat '"
                      " || repeat('one two ', i % 4) AS body FROM generate_series(1, 16) i")  # fmt: skip


def test_tune_and_generate_same_as_local(pg: Postgres, proxy: ProxyProcess, ray_proxy: ProxyProcess,
                                         book: None) -> None:  # fmt: skip
    assert rows(proxy.dsn(), TUNE.format(project="tune local")) == [
        ("tune local", "text-generation", "transformers", True)
    ]
    assert rows(ray_proxy.dsn(), TUNE.format(project="tune remote")) == [
        ("tune remote", "text-generation", "transformers", True)
    ]
    sql = ("SELECT m.metrics, m.hyperparams, (SELECT count(*) FROM pgml.files f WHERE f.model_id = m.id) FROM"
           " pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = '{}'")  # fmt: skip
    ((local_metrics, local_hyper, local_files),) = rows(pg.dsn(), sql.format("tune local"))
    ((remote_metrics, remote_hyper, remote_files),) = rows(pg.dsn(), sql.format("tune remote"))
    assert (remote_hyper, remote_files) == (local_hyper, local_files)
    assert isinstance(local_metrics, dict) and isinstance(remote_metrics, dict)
    timing = ("fit_time", "eval_runtime", "eval_steps_per_second", "eval_samples_per_second")
    scores = {k: v for k, v in local_metrics.items() if k not in timing}
    assert {k: remote_metrics[k] for k in scores} == pytest.approx(scores, rel=1e-3)  # last-bit torch differences
    for project in ("tune local", "tune remote"):
        generate = f"SELECT pgml.generate('{project}', ARRAY['the cat', 'one'], '{tokens(4)}')"
        assert rows(ray_proxy.dsn(), generate) == rows(proxy.dsn(), generate)


def test_cancel_stops_a_tune_task(ray_proxy: ProxyProcess, book: None) -> None:
    sql = TUNE.format(project="tune canceled").replace('"max_steps": 2', '"max_steps": 100000')
    with psycopg.connect(ray_proxy.dsn(), autocommit=True) as c:
        timer = threading.Timer(4, c.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute(sql).fetchall()
        timer.join()
        assert time.monotonic() - started < 30
        assert c.execute("SELECT count(*) FROM pgml.projects WHERE name = 'tune canceled'").fetchone() == (0,)


# --------------------------------------------------------------------------- #
# Ray Client (ray://), a model actor on a (logical) GPU, the local instance's token
# --------------------------------------------------------------------------- #


def _other_ray_proxy(pg: Postgres, proxy: ProxyProcess, model_dir: Path, workdir: Path, address: str,
                     namespace: str, gpus: str = "0") -> ProxyProcess:  # fmt: skip
    """One more Ray-backend proxy, in a namespace of its own (its actors are its own), a twentieth CPU per actor."""
    return start_proxy(
        pg.dsn(), workdir, PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir), PGML_PROXY_ENGINE_BACKEND="ray",
        PGML_PROXY_RAY_ADDRESS=address, PGML_PROXY_RAY_NAMESPACE=namespace, PGML_PROXY_RAY_NUM_CPUS="0.05",
        PGML_PROXY_RAY_NUM_GPUS=gpus, PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(proxy.log.parent / "artifact.key"),
    )  # fmt: skip


def _kill_actors(namespace: str) -> None:
    """End the detached actors of ``namespace``, so that their resources go back to the test cluster."""
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named["namespace"] == namespace:
            ray.kill(ray.get_actor(named["name"], namespace=namespace))


@pytest.fixture(scope="module")
def client_proxy(pg: Postgres, proxy: ProxyProcess, model_dir: Path, ray_address: str, ray_client_port: int,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:  # fmt: skip
    """A Ray-backend proxy connected through Ray Client: ``[ray] address = "ray://127.0.0.1:<port>"``."""
    handle = _other_ray_proxy(pg, proxy, model_dir, tmp_path_factory.mktemp("ray-client-proxy"),
                              f"ray://127.0.0.1:{ray_client_port}", "pgml-test-ray-client")  # fmt: skip
    try:
        yield handle
    finally:
        handle.stop()
        _kill_actors("pgml-test-ray-client")


def test_ray_client_same_as_local_and_a_stream_refused(proxy: ProxyProcess, client_proxy: ProxyProcess,
                                                        texts: None, gpt2: str) -> None:  # fmt: skip
    for sql in (f"SELECT pgml.embed('{MINILM}', 'hello ray client')",
                f"SELECT i, pgml.embed('{MINILM}', body) FROM ray_texts ORDER BY i"):  # fmt: skip
        local, remote = rows(proxy.dsn(), sql), rows(client_proxy.dsn(), sql)
        assert len(local) == len(remote)
        for a, b in zip(local, remote, strict=True):
            assert a[:-1] == b[:-1]
            assert a[-1] == pytest.approx(b[-1], abs=1e-6)
    for sql in (
        f"SELECT pgml.transform('{TASK}', '{tokens(6)}', ARRAY['the cat', 'a dog sat'])",
        # inside a larger statement every fragment comes from one actor call: that works through Ray Client
        f"SELECT count(*), min(s::text) FROM pgml.transform_stream('{TASK}', '{tokens(5)}', 'the dog') AS s",
    ):
        assert rows(client_proxy.dsn(), sql) == rows(proxy.dsn(), sql), sql
    started = time.monotonic()
    with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:  # Ray Client has no Ray generators
        rows(client_proxy.dsn(), f"SELECT pgml.transform_stream('{TASK}', '{tokens(12)}', 'the cat')")
    assert time.monotonic() - started < 10
    assert "cannot stream through Ray Client" in str(caught.value)
    assert caught.value.diag.message_hint is not None and "6379" in caught.value.diag.message_hint
    assert rows(client_proxy.dsn(), f"SELECT pgml.embed('{MINILM}', 'still fine') IS NOT NULL") == [(True,)]


GPU_NAMESPACE = "pgml-test-ray-gpu"


@pytest.fixture(scope="module")
def gpu_proxy(pg: Postgres, proxy: ProxyProcess, model_dir: Path, ray_address: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:  # fmt: skip
    """A Ray-backend proxy whose model actors each need half of a GPU (the test cluster declares one)."""
    handle = _other_ray_proxy(pg, proxy, model_dir, tmp_path_factory.mktemp("ray-gpu-proxy"), ray_address,
                              GPU_NAMESPACE, gpus="0.5")  # fmt: skip
    try:
        yield handle
    finally:
        handle.stop()
        _kill_actors(GPU_NAMESPACE)


def _with_notices(dsn: str, sql: str) -> tuple[list[tuple[object, ...]], list[tuple[str | None, str | None]]]:
    notices: list[tuple[str | None, str | None]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        return conn.execute(sql).fetchall(), notices


def _free_gpu(expected: float) -> None:
    deadline = time.monotonic() + 20  # the raylet reports its resources every few hundred milliseconds
    while (free := ray.available_resources().get("GPU", 0.0)) != expected:  # type: ignore[no-untyped-call]
        assert time.monotonic() < deadline, free
        time.sleep(0.2)


def test_model_actor_on_a_gpu_falls_back_to_the_cpu(proxy: ProxyProcess, gpu_proxy: ProxyProcess) -> None:
    assert ray.cluster_resources()["GPU"] == 1  # type: ignore[no-untyped-call]
    sql = f"SELECT pgml.embed('{MINILM}', 'hello gpu', '{{\"device\": \"cuda\"}}')"
    (local,), local_notices = _with_notices(proxy.dsn(), sql)
    (remote,), remote_notices = _with_notices(gpu_proxy.dsn(), sql)
    assert remote[0] == pytest.approx(local[0], abs=1e-6)
    # the actor runs where Ray found half a GPU free; torch there sees no CUDA: the CPU, with the same warning
    warning = ("WARNING", 'device "cuda" is not available on the pgml-proxy host; using "cpu" instead')
    assert remote_notices == local_notices == [warning]
    actor = ray.get_actor(actor_name(worker_key("embed", (MINILM, "", {"device": "cuda"})), 0), GPU_NAMESPACE)
    _free_gpu(0.5)  # the actor holds its half of the GPU ...
    ray.kill(actor)
    _free_gpu(1.0)  # ... which comes back when it ends


def test_local_instance_leaves_no_token_file(pg: Postgres, proxy: ProxyProcess, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """An empty ``[ray] address`` starts a Ray instance in the proxy, token-protected, but writes no
    ``~/.ray/auth_token`` (which would turn on token authentication for every later ``ray start`` here)."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's default: token authentication on
    home = tmp_path / "home"
    home.mkdir()
    local = start_proxy(pg.dsn(), tmp_path, HOME=str(home), PGML_PROXY_ENGINE_BACKEND="ray",
                        PGML_PROXY_RAY_NAMESPACE="pgml-test-ray-local", PGML_PROXY_RAY_NUM_CPUS="0.05")  # fmt: skip
    try:
        assert rows(local.dsn(), "SELECT pgml.version() IS NOT NULL") == [(True,)]
    finally:
        local.stop()
    assert not (home / DEFAULT_TOKEN_FILE.relative_to("~")).exists()
