"""Messages while a call runs: a model's first load (NOTICE), train and tune progress (INFO, also in pgml.logs),
and library warnings collected once per call.

End to end through a proxy of this module's own (its model cache starts empty): psql, which prints each notice as
it comes; psycopg's notice handlers; an async psycopg client that sees progress while a long search still runs and
then cancels it. Sans-IO: Traffic.notify's frames and the startup packet's client_min_messages, the warnings
collector with threads.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from engine.api import Call, Signature
from engine.runtime import library_warnings
from proxy.rewrite import steps
from proxy.session.state import State
from proxy.session.traffic import Traffic
from proxy.wire import messages as pq
from proxy.wire.frames import StartupMessage, split_frames
from tests.conftest import MINILM, Postgres, ProxyProcess, link_tree, scratch_database, start_proxy
from tests.tiny_models import tiny_bert_classifier

TRAIN = (
    "SELECT * FROM pgml.train('warned', 'classification', 'pgml.iris', 'target', 'linear', '{\"max_iter\": 1}',"
    " 'grid', '{\"C\": [0.1, 1, 10]}', '{\"cv\": 3}')"
)


@pytest.fixture(scope="module")
def models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress-models")
    link_tree(model_dir / MINILM, root / MINILM)
    tiny_bert_classifier(root / "tiny-bert")
    return root


@pytest.fixture
def fresh(pg: Postgres, models: Path, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy of the test's own: nothing loaded in its model cache yet."""
    handle = start_proxy(pg.dsn(), tmp_path, PGML_PROXY_ENGINE_MODEL_DIRS=str(models), PGML_PROXY_ENGINE_DEVICE="cpu")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def database(pg: Postgres) -> Iterator[str]:
    with scratch_database(pg, "progress") as name:
        yield name


class Notices:
    """A psycopg notice handler recording (severity, message) and what happened between them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        self.seen.append((diagnostic.severity_nonlocalized or "", diagnostic.message_primary or ""))

    def of(self, severity: str) -> list[str]:
        return [message for s, message in self.seen if s == severity]


def test_first_load_of_a_model_is_told_before_the_result(fresh: ProxyProcess, database: str) -> None:
    with psycopg.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
        notices = Notices()
        conn.add_notice_handler(notices)
        (embedding,) = conn.execute("SELECT pgml.embed(%s, 'hello')", [MINILM]).fetchone() or (None,)
        notices.seen.append(("RESULT", ""))
        assert embedding is not None and len(embedding) == 384
        loading, loaded = notices.of("NOTICE")
        assert loading == f"loading model {MINILM} (first use)"
        assert loaded.startswith(f"loaded model {MINILM} in ") and loaded.endswith(" s")
        assert notices.seen[-1] == ("RESULT", "")
        conn.execute("SELECT pgml.embed(%s, 'again')", [MINILM])
        assert len(notices.of("NOTICE")) == 2  # in the cache now: nothing to tell


def test_client_min_messages_warning_silences_load_notices_not_progress(fresh: ProxyProcess, database: str) -> None:
    dsn = fresh.dsn(dbname=database, options="-c%20client_min_messages%3Dwarning")
    with psycopg.connect(dsn, autocommit=True) as conn:
        notices = Notices()
        conn.add_notice_handler(notices)
        conn.execute("SELECT pgml.transform('{\"task\": \"text-classification\", \"model\": \"tiny-bert\"}', "
                     "inputs => ARRAY['good day'])")  # fmt: skip
        assert notices.of("NOTICE") == []
        conn.execute("SELECT * FROM pgml.load_dataset('iris')")
        conn.execute(TRAIN.replace("warned", "quiet"))
        assert any(m.startswith("Training Model {") for m in notices.of("INFO"))  # INFO: whatever the level


def test_train_progress_in_psql_and_pgml_logs_and_warnings_once(
    pg: Postgres, fresh: ProxyProcess, database: str
) -> None:
    with psycopg.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
        conn.execute("SELECT * FROM pgml.load_dataset('iris')")
    proc = subprocess.run(
        [pg.tool("psql"), fresh.dsn(dbname=database), "-X", "-v", "ON_ERROR_STOP=1", "-c", TRAIN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    info = [line.removeprefix("INFO:  ") for line in lines if line.startswith("INFO:  ")]
    assert info[0] == "Training Model { task: classification, algorithm: linear, runtime: python }"
    assert info[1] == "Hyperparameter searches: 3, cross validation folds: 3"
    metrics = [line for line in info if line.startswith("Metrics: ")]
    assert len(metrics) == 3 * 3 + 1  # every fit of the search, and the final one
    assert metrics[0].endswith("(search 1 of 3, fold 1 of 3)") and '"f1": ' in metrics[0]
    assert set(json.loads(metrics[-1].removeprefix("Metrics: "))) >= {"f1", "accuracy", "fit_time"}
    result = next(i for i, line in enumerate(lines) if "warned" in line and "classification" in line)
    last_info = max(i for i, line in enumerate(lines) if line.startswith("INFO:  "))
    assert last_info < result  # psql printed every notice before the result
    with psycopg.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
        logs = [row[0] for row in conn.execute(
            "SELECT l.logs FROM pgml.logs l JOIN pgml.projects p ON p.id = l.project_id WHERE p.name = 'warned'"
            " ORDER BY l.id"
        )]  # fmt: skip
    warned = [entry for entry in logs if "warning" in entry]
    assert [entry["warning"] for entry in warned] == ["ConvergenceWarning"]
    assert warned[0]["count"] == 3 * 3 + 1 and "converge" in warned[0]["message"]  # every fit warned: one entry
    assert len([entry for entry in logs if "candidate" in entry]) == 9
    assert "ConvergenceWarning" not in fresh.log_text()  # at debug only: nothing in a log at info


def test_tune_progress_per_logging_step(fresh: ProxyProcess, database: str) -> None:
    with psycopg.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS reviews")
        conn.execute("CREATE TABLE reviews (text text, label text)")
        conn.execute(
            "INSERT INTO reviews SELECT w || ' day', CASE WHEN w = 'good' THEN 'positive' ELSE 'negative' END"
            " FROM unnest(ARRAY['good', 'bad', 'good', 'red', 'good', 'blue', 'good', 'green']) w"
        )
        notices = Notices()
        conn.add_notice_handler(notices)
        hyperparams = {"training_args": {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2}}
        conn.execute(
            "SELECT * FROM pgml.tune('tuned reviews', 'text-classification', 'reviews', 'label', 'tiny-bert', %s)",
            [json.dumps(hyperparams)],
        )
        info = notices.of("INFO")
        assert info[0] == "Tuning Model { task: text_classification, algorithm: transformers, model: tiny-bert }"
        steps = [json.loads(line) for line in info if line.startswith("{")]
        assert [e["step"] for e in steps if "loss" in e] == [1, 2] and all(e["max_steps"] == 2 for e in steps)
        assert all("timestamp" in e and "epoch" in e for e in steps)
        assert info[-1].startswith("Metrics: ") and "f1" in json.loads(info[-1].removeprefix("Metrics: "))
        (logged,) = conn.execute(
            "SELECT count(*) FROM pgml.logs l JOIN pgml.projects p ON p.id = l.project_id"
            " WHERE p.name = 'tuned reviews' AND l.logs ? 'step'"
        ).fetchone() or (0,)
        assert logged == len(steps)


def test_progress_arrives_while_the_call_runs(fresh: ProxyProcess, database: str) -> None:
    """A long search: its first fit's INFO comes while the statement still runs, which a cancel then stops."""

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
            await conn.execute("SELECT * FROM pgml.load_dataset('digits')")
            first_fit = asyncio.Event()
            conn.add_notice_handler(
                lambda d: first_fit.set() if (d.message_primary or "").startswith("Metrics") else None
            )
            grid = json.dumps({"C": [0.01 * (i + 1) for i in range(60)]})
            sql = ("SELECT * FROM pgml.train('long', 'classification', 'pgml.digits', 'target', 'linear',"
                   f" '{{\"max_iter\": 200}}', 'grid', '{grid}', '{{\"cv\": 5}}')")  # fmt: skip
            started = time.monotonic()
            call = asyncio.ensure_future(conn.execute(sql))
            await asyncio.wait_for(first_fit.wait(), 120)
            assert not call.done()  # live: the statement has more fits to go
            await conn.cancel_safe()
            with pytest.raises(errors.QueryCanceled):
                await call
            assert time.monotonic() - started < 120

    asyncio.run(run())


# --------------------------------------------------------------------------- #
# Sans-IO: the frames, client_min_messages, the collector
# --------------------------------------------------------------------------- #


class Recorder:
    def __init__(self) -> None:
        self.data = bytearray()
        self.is_closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.data += chunk


def _traffic(**params: str) -> tuple[Traffic, Recorder]:
    client = Recorder()
    traffic = Traffic(State(), Recorder(), client, 1, "db")
    traffic.startup(StartupMessage(3, 0, tuple({"user": "u", **params}.items())))
    return traffic, client


def _fields(data: bytes | bytearray) -> list[dict[str, str]]:
    return [dict(pq.NoticeResponse.decode(frame).fields) for frame in split_frames(bytes(data))]


def test_notify_writes_one_whole_notice_per_message() -> None:
    traffic, client = _traffic()
    traffic.notify("NOTICE", "loading model m (first use)")
    traffic.notify("INFO", "Hyperparameter searches: 1, cross validation folds: 1")
    assert _fields(client.data) == [
        {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "loading model m (first use)"},
        {"S": "INFO", "V": "INFO", "C": "00000", "M": "Hyperparameter searches: 1, cross validation folds: 1"},
    ]


@pytest.mark.parametrize(
    ("params", "silenced"),
    [
        ({}, set()),
        ({"options": "-c client_min_messages=warning"}, {"NOTICE"}),
        ({"client_min_messages": "ERROR"}, {"NOTICE", "WARNING"}),
        ({"options": "--client-min-messages=log"}, set()),
        ({"client_min_messages": "debug3"}, set()),
    ],
)
def test_client_min_messages_of_the_startup_packet(params: dict[str, str], silenced: set[str]) -> None:
    traffic, _ = _traffic(**params)
    assert traffic.silenced == silenced


def test_live_channel_leaves_out_the_silenced_severities() -> None:
    """INFO reaches the client at every level, as the server's; a silenced NOTICE is never written."""

    async def run() -> list[str]:
        traffic, client = _traffic()
        live = steps.Live(traffic, frozenset({"NOTICE"}))
        live.inform("NOTICE", "n")
        live.inform("INFO", "i")
        await asyncio.sleep(0)
        live.close()
        live.inform("INFO", "after the call")
        await asyncio.sleep(0)
        return [f["S"] + ":" + f["M"] for f in _fields(client.data)]

    assert asyncio.run(run()) == ["INFO:i"]


def test_load_notices_follow_a_later_set_client_min_messages(fresh: ProxyProcess, database: str) -> None:
    """The level the session has when the call runs counts, not the startup packet's: SET, SET LOCAL, RESET."""
    with psycopg.connect(fresh.dsn(dbname=database), autocommit=True) as conn:
        notices = Notices()
        conn.add_notice_handler(notices)
        conn.execute("SET client_min_messages = warning")
        conn.execute("SELECT pgml.embed(%s, 'hello')", [MINILM])
        assert notices.of("NOTICE") == []
    quiet = fresh.dsn(dbname=database, options="-c%20client_min_messages%3Dwarning")
    with psycopg.connect(quiet) as conn:
        notices = Notices()
        conn.add_notice_handler(notices)
        conn.execute("SET LOCAL client_min_messages = notice")
        conn.execute("SELECT pgml.transform('{\"task\": \"text-classification\", \"model\": \"tiny-bert\"}', "
                     "inputs => ARRAY['good day'])")  # fmt: skip
        assert [m.split(" ")[0] for m in notices.of("NOTICE")] == ["loading", "loaded"]


def test_warnings_go_to_the_running_calls_collector_once_each() -> None:
    calls = [threading.Event() for _ in range(4)]

    def work(call: threading.Event) -> None:
        with library_warnings.running(call):
            for _ in range(50):
                library_warnings.show(FutureWarning("deprecated"), FutureWarning, "lib.py", 1)
            library_warnings.show(UserWarning("other"), UserWarning, "lib.py", 2)

    threads = [threading.Thread(target=work, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for call in calls:
        assert library_warnings.collector(call).entries() == [
            {"warning": "FutureWarning", "message": "deprecated", "count": 50},
            {"warning": "UserWarning", "message": "other", "count": 1},
        ]


def test_the_hook_routes_warnings_issued_by_libraries() -> None:
    call = threading.Event()
    with warnings.catch_warnings():  # restores the hook and filters after the test
        warnings.simplefilter("always")
        library_warnings.install()
        with library_warnings.running(call):
            for _ in range(3):
                warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
        warnings.warn("outside any call", UserWarning, stacklevel=1)  # to the debug log
    assert library_warnings.collector(call).entries() == [
        {"warning": "DeprecationWarning", "message": "a library's deprecation", "count": 3}
    ]


class Informing:
    """An engine whose call tells the client from a worker thread before its result, and once more after it."""

    def __init__(self) -> None:
        self.late: Any = None

    async def evaluate(self, call: Call) -> list[Any]:
        assert call.inform is not None
        self.late = call.inform

        def work() -> list[Any]:
            assert call.inform is not None
            call.inform("INFO", "during")
            return ["result"]

        return await asyncio.get_running_loop().run_in_executor(None, work)


def test_live_messages_are_written_before_the_result_and_not_after_the_call() -> None:
    traffic, client = _traffic()
    engine = Informing()

    def decision() -> steps.Steps[Any]:
        result = yield steps.Evaluate(Signature("version", (), "text"), ((),))
        traffic.emit(b"")  # nothing: the point is what the client had when the result came
        return result, bytes(client.data)

    async def run() -> tuple[Any, bytes]:
        outcome: tuple[Any, bytes] = await steps.drive(decision(), traffic, engine)  # type: ignore[arg-type]
        engine.late("INFO", "after")  # a stopped worker's late message
        await asyncio.sleep(0)
        return outcome

    (result, before), after = asyncio.run(run()), bytes(client.data)
    assert result == ["result"]
    assert [f["M"] for f in _fields(before)] == ["during"]
    assert after == before
