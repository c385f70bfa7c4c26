"""No session stalls the engine for others: disconnect, Terminate and CancelRequest stop a session's engine
work at its next mini-batch, and a large per-row batch interleaves with other sessions' calls.

A proxy with one worker (``[engine] workers = 1``) in front of the test cluster, the real all-MiniLM-L6-v2,
real clients. Every bound is relative to times measured in the same run: one mini-batch (a constant embed
of an array of the 32 longest texts: one engine batch), the whole batch computed alone, an idle call. That the
engine work stopped is read from the proxy process's CPU time (busy while the batch runs, idle after).
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import pytest
from psycopg import errors

from proxy.wire import messages as pq
from proxy.wire.frames import FrameReader
from tests.conftest import MINILM, Postgres, ProxyProcess, start_proxy
from tests.tiny_models import tiny_gpt2

ROWS = 3000  # ~94 mini-batches: seconds on two cores
MINI = 32  # texts per engine mini-batch ([engine] batch_size)
BIG = f"SELECT id, pgml.embed('{MINILM}', body) FROM fair_docs"


@pytest.fixture(scope="module")
def fair_proxy(pg: Postgres, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fair_docs")
        conn.execute(
            "CREATE TABLE fair_docs AS SELECT i AS id, 'document ' || i || ' is about'"
            " || repeat(' word', 2 + i %% 6) AS body FROM generate_series(1, %s) AS i",
            [ROWS],
        )
    handle = start_proxy(
        pg.dsn(),
        tmp_path_factory.mktemp("fair"),
        PGML_PROXY_ENGINE_MODEL_DIRS=str(model_dir),
        PGML_PROXY_ENGINE_WORKERS="1",
    )
    try:
        yield handle
    finally:
        handle.stop()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS fair_docs")


_probes = iter(range(1, 1 << 30))


def single(conn: psycopg.Connection) -> float:
    """Seconds of one constant embed (a new text each time: a repeated statement is answered from cache)."""
    started = time.perf_counter()
    row = conn.execute(f"SELECT pgml.embed('{MINILM}', 'probe number {next(_probes)}')").fetchone()
    elapsed = time.perf_counter() - started
    assert row is not None and len(row[0]) == 384
    return elapsed


def vectors(rows: list[tuple[Any, ...]]) -> dict[int, np.ndarray]:
    return {int(i): np.asarray(v, dtype=np.float32) for i, v in rows}


class Cpu:
    """CPU seconds the proxy process (all its threads) spends per wall second."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)

    def rate(self, seconds: float) -> float:
        before, started = sum(self.process.cpu_times()[:2]), time.perf_counter()
        time.sleep(seconds)
        return (sum(self.process.cpu_times()[:2]) - before) / (time.perf_counter() - started)


@dataclass
class Baseline:
    idle: float  # one constant embed on an idle proxy
    mini: float  # one mini-batch: a constant embed of the 32 longest texts
    full: float  # the whole per-row batch, alone
    alone: dict[int, np.ndarray]
    idle_cpu: float

    @property
    def window(self) -> float:
        """A CPU sampling window: long against a mini-batch, short against the whole batch."""
        return max(2 * self.mini, self.full * 0.1)

    def single_bound(self) -> float:
        """What one constant embed may take while another session's batch runs (or was just stopped)."""
        return 4 * self.mini + 10 * self.idle


@pytest.fixture(scope="module")
def baseline(fair_proxy: ProxyProcess) -> Baseline:
    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as conn:
        for _ in range(6):  # loads the model; the first calls after a load are slow
            single(conn)
        idle = statistics.median(single(conn) for _ in range(5))
        longest = conn.execute("SELECT body FROM fair_docs ORDER BY length(body) DESC, id LIMIT %s", [MINI]).fetchall()
        minis = []
        for run in range(3):  # new texts each time (of the same lengths): no cached rewrite answers
            texts = [f"{body[:-2]}{run:02d}" for (body,) in longest]
            started = time.perf_counter()
            got = conn.execute(f"SELECT pgml.embed('{MINILM}', %s::text[])", [texts]).fetchall()  # a row each
            minis.append(time.perf_counter() - started)
            assert len(got) == MINI
        started = time.perf_counter()
        alone = vectors(conn.execute(BIG).fetchall())
        full = time.perf_counter() - started
    assert len(alone) == ROWS
    # The scenario needs a batch of many mini-batches; else nothing here could tell fair from unfair.
    assert full > 6 * min(minis), f"the batch ({full:.2f} s) is not much longer than a mini-batch ({minis} s)"
    return Baseline(idle, statistics.median(minis), full, alone, Cpu(fair_proxy.proc.pid).rate(1.0))


def test_a_big_batch_interleaves_with_another_sessions_call(fair_proxy: ProxyProcess, baseline: Baseline) -> None:
    result: dict[str, Any] = {}

    def run_a() -> None:
        with psycopg.connect(fair_proxy.dsn(), autocommit=True) as a:
            started = time.perf_counter()
            result["rows"] = a.execute(BIG).fetchall()
            result["end"] = time.perf_counter()
            result["took"] = result["end"] - started

    thread = threading.Thread(target=run_a)
    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as b:
        single(b)  # connected and warm before A starts
        thread.start()
        time.sleep(baseline.window)  # A's batch is in the engine now
        latencies = [single(b) for _ in range(5)]
        b_done = time.perf_counter()
    thread.join(timeout=baseline.full * 10)
    assert not thread.is_alive() and "rows" in result
    # B finished long before A's batch, waiting about one mini-batch per call, not the batch.
    assert b_done < result["end"], "B's calls waited for A's whole batch"
    assert max(latencies) < baseline.single_bound(), (latencies, baseline)
    assert max(latencies) < baseline.full / 3, (latencies, baseline)
    # A's result is complete and the same as computed alone.
    shared = vectors(result["rows"])
    assert shared.keys() == baseline.alone.keys()
    for key, vector in baseline.alone.items():
        np.testing.assert_allclose(shared[key], vector, rtol=1e-4, atol=1e-5)


def raw_connect(proxy: ProxyProcess) -> socket.socket:
    """A raw protocol client, authenticated and idle (trust authentication on the test cluster)."""
    return raw_startup(proxy)[0]


def raw_startup(proxy: ProxyProcess, timeout: float = 30) -> tuple[socket.socket, bytes]:
    """:func:`raw_connect`, and the messages that answered its startup (BackendKeyData among them)."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    body = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    data = b""
    while not (len(data) >= 6 and data[-6:-5] == b"Z"):
        chunk = s.recv(65536)
        assert chunk, "the proxy closed the connection during startup"
        data += chunk
    return s, data


@pytest.mark.parametrize("how", ["disconnect", "terminate", "cancel"])
def test_stopping_a_session_frees_the_worker(fair_proxy: ProxyProcess, baseline: Baseline, how: str) -> None:
    cpu = Cpu(fair_proxy.proc.pid)
    outcome: dict[str, Any] = {}
    with (
        psycopg.connect(fair_proxy.dsn(), autocommit=True) as b,
        psycopg.connect(fair_proxy.dsn(), autocommit=True) as a,
    ):
        single(b)  # B is connected and warm before A starts
        raw = raw_connect(fair_proxy) if how != "cancel" else None

        def run_a() -> None:
            try:
                a.execute(BIG).fetchall()
            except psycopg.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run_a)
        if raw is None:
            thread.start()
        else:
            raw.sendall(pq.Query(BIG).encode())
        busy = cpu.rate(baseline.window)  # A's batch is running
        assert busy > 4 * baseline.idle_cpu + 0.2, f"A's batch is not running ({busy:.2f} vs {baseline.idle_cpu:.2f})"
        stopped_at = time.perf_counter()
        if how == "disconnect":  # abruptly: RST, no Terminate
            assert raw is not None
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        elif how == "terminate":  # Terminate while the statement runs; the socket stays open
            assert raw is not None
            raw.sendall(pq.Terminate().encode())
        else:
            a.cancel()
        # Another session's call is answered within about a mini-batch ...
        assert single(b) < baseline.single_bound()
        # ... and A's work is gone: the proxy idles although A's batch had far to go.
        time.sleep(2 * baseline.mini)
        after = cpu.rate(baseline.window)
        assert time.perf_counter() - stopped_at < baseline.full * 0.6, "too slow to tell: raise ROWS"
        assert after < busy / 4, f"the engine still works for the stopped session ({after:.2f} vs {busy:.2f})"
        assert single(b) < baseline.single_bound()
        if raw is not None and how == "terminate":
            # Rows streamed before the Terminate may have come (a SELECT-list call is computed on the result
            # stream, as the server sends rows as they come); the statement is never completed after it.
            raw.settimeout(baseline.full)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := raw.recv(1 << 20):
                    received += chunk
            kinds = [bytes([frame.type]) for frame in FrameReader(1 << 30).feed(received)]  # whole messages
            assert not {b"C", b"Z", b"E"} & set(kinds), f"the proxy answered after Terminate: {kinds[-3:]}"
            raw.close()
        if raw is None:
            thread.join(timeout=baseline.full)
            assert isinstance(outcome.get("error"), errors.QueryCanceled)
            assert a.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def test_two_sessions_generating_with_one_model_do_not_deadlock(fair_proxy: ProxyProcess, model_dir: Path) -> None:
    """text-generation runs under the model's lock and checks for cancel at every token: a checkpoint there
    must not hand the turn to a session that then waits for the same lock (one worker)."""
    if not (model_dir / "tiny-gpt2").exists():
        tiny_gpt2(model_dir / "tiny-gpt2")
    task = json.dumps({"task": "text-generation", "model": "tiny-gpt2"})
    args = json.dumps({"max_new_tokens": 12, "min_new_tokens": 12, "batch_size": 4})
    prompts = [f"the cat number {i}" for i in range(64)]

    def generate(conn: psycopg.Connection) -> list[Any]:
        row = conn.execute("SELECT pgml.transform(%s::jsonb, %s::jsonb, %s::text[])", [task, args, prompts]).fetchone()
        assert row is not None
        return list(row[0])

    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as conn:
        generate(conn)  # loads the model
        started = time.perf_counter()
        assert len(generate(conn)) == len(prompts)
        alone = time.perf_counter() - started
    results: dict[int, Any] = {}

    def session(n: int) -> None:
        with psycopg.connect(fair_proxy.dsn(), autocommit=True) as conn:
            try:
                results[n] = generate(conn)
            except psycopg.Error as exc:
                results[n] = exc

    threads = [threading.Thread(target=session, args=(n,), daemon=True) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30 * alone + 30)  # a hang guard (a deadlock never ends), not a timing bound
    assert not any(thread.is_alive() for thread in threads), "sessions sharing a model deadlocked"
    for n in range(3):
        assert isinstance(results[n], list) and len(results[n]) == len(prompts), results[n]


def test_engine_failures_are_logged_without_client_data(fair_proxy: ProxyProcess) -> None:
    secret = "Secret-Prompt-7f3a9"
    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(
                    f"SELECT pgml.embed('{MINILM}', %s, %s::jsonb)",
                    [f"some text {i}", f'{{"prompt_name": "{secret}-{i}"}}'],
                )
            assert info.value.sqlstate == "38000" and secret in str(info.value)  # the client sees its own data
        assert conn.execute("SELECT 1").fetchone() == (1,)
    log = fair_proxy.log_text()
    assert "ValueError" in log and "pgml.embed" in log and MINILM in log and "38000" in log
    assert secret not in log and "Traceback" not in log


def test_a_long_generation_under_its_model_lock_still_lets_others_go(
    fair_proxy: ProxyProcess, baseline: Baseline, model_dir: Path
) -> None:
    """One slice of text-generation holds its model's lock for all its tokens; its checkpoints still hand
    the turn to another session's call (which, needing the same model, would step aside while it waits)."""
    if not (model_dir / "tiny-gpt2").exists():
        tiny_gpt2(model_dir / "tiny-gpt2")
    task = json.dumps({"task": "text-generation", "model": "tiny-gpt2"})
    args = json.dumps({"max_new_tokens": 1500, "min_new_tokens": 1500, "batch_size": 8})
    prompts = [f"the dog number {i}" for i in range(8)]  # one slice: one pass under the lock
    sql = "SELECT pgml.transform(%s::jsonb, %s::jsonb, %s::text[])"
    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as conn:
        conn.execute(sql, [task, json.dumps({"max_new_tokens": 2}), prompts[:1]]).fetchall()  # loads the model
        started = time.perf_counter()
        conn.execute(sql, [task, args, prompts]).fetchall()
        alone = time.perf_counter() - started
    assert alone > 6 * baseline.mini, f"the generation ({alone:.2f} s) is not much longer than a mini-batch"
    result: dict[str, float] = {}

    def run_a() -> None:
        with psycopg.connect(fair_proxy.dsn(), autocommit=True) as a:
            a.execute(sql, [task, args, prompts]).fetchall()
            result["end"] = time.perf_counter()

    thread = threading.Thread(target=run_a)
    with psycopg.connect(fair_proxy.dsn(), autocommit=True) as b:
        single(b)
        thread.start()
        time.sleep(min(alone / 4, 1.0))  # A's generation holds the model now
        latency = single(b)
        b_done = time.perf_counter()
    thread.join(timeout=alone * 10 + 30)
    assert not thread.is_alive() and "end" in result
    assert b_done < result["end"], "B's call waited for A's whole generation"
    assert latency < alone / 3, (latency, alone)


def _messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """The whole messages of ``data`` as (type, body)."""
    return [(bytes([frame.type]), frame.body) for frame in FrameReader(1 << 30).feed(data)]


def test_a_cancel_is_for_the_statement_running_not_the_next_one(fair_proxy: ProxyProcess) -> None:
    """Two Queries sent at once, a pg_sleep and then a pgml.embed; a CancelRequest while the sleep runs cancels the
    sleep (57014) and the embed still answers, as the server cancels only the statement running when it came."""
    s, data = raw_startup(fair_proxy, timeout=60)
    pid, key = next(struct.unpack("!ii", payload[:8]) for kind, payload in _messages(data) if kind == b"K")
    s.sendall(
        pq.Query("SELECT pg_sleep(3)").encode()
        + pq.Query(f"SELECT array_length(pgml.embed('{MINILM}', 'cancel scope'), 1)").encode()
    )
    time.sleep(1)
    with socket.create_connection(("127.0.0.1", fair_proxy.port), timeout=30) as c:
        c.sendall(struct.pack("!iiii", 16, 80877102, pid, key))
        c.recv(1)  # the proxy closes it once handled
    data = b""
    while len([kind for kind, _ in _messages(data) if kind == b"Z"]) < 2:
        chunk = s.recv(65536)
        assert chunk, "the proxy closed the connection"
        data += chunk
    s.close()
    answers = _messages(data)
    errors_ = [payload for kind, payload in answers if kind == b"E"]
    assert len(errors_) == 1 and b"C57014\0" in errors_[0]  # the sleep
    rows = [payload for kind, payload in answers if kind == b"D"]
    assert len(rows) == 1 and rows[0].endswith(b"384")  # the embed, after it
