"""The proxy host's files: ``load_dataset`` reads only inside ``[engine] data_dirs``, model names that are
paths load only inside ``[engine] model_dirs``, and nothing outside can be read, created or told apart.

Through a real proxy (psycopg, a database of its own, a non-superuser role) and at the engine level. Each
refused path lies next to a real file or a loadable model outside the allowed directories, so a check that
let it through would load it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from engine.api import EngineConfig, EngineError, InvalidArgument, PermissionDenied, SessionSettings, UnknownModel
from engine.ml.datasets.load import load
from engine.nlp.transform import transform_rows
from engine.runtime.cache import ModelCache
from engine.runtime.confine import confine_kwargs
from engine.runtime.context import Context
from engine.runtime.locate import owned_dir, resolve
from tests.conftest import MINILM, Postgres, ProxyProcess, start_proxy
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2

DATABASE = "pgml_confinement"
ROLE = "confinement_user"


@dataclass(frozen=True)
class Area:
    """A data directory and a model directory, and an ``outside`` with a readable file and a loadable model."""

    data: Path
    models: Path
    outside: Path


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory) -> Area:
    root = tmp_path_factory.mktemp("confinement")
    data, models, outside = root / "data", root / "models", root / "outside"
    for directory in (data / "sub", models, outside):
        directory.mkdir(parents=True)
    (data / "people.csv").write_text("id,name\n1,ann\n2,bob\n")
    (data / "sub" / "train.csv").write_text("id,name\n3,cy\n")
    (outside / "secret.csv").write_text("id,name\n9,secret\n")
    (data / "secret.csv").symlink_to(outside / "secret.csv")  # a link inside that leads out
    (data / "link_out").symlink_to(outside)
    tiny_bert_classifier(models / "tiny-bert")
    tiny_bert_classifier(outside / "model")  # would load, if a path could reach it
    (models / "escape").symlink_to(outside / "model")
    return Area(data, models, outside)


@pytest.fixture(scope="module")
def confined(pg: Postgres, area: Area, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone():
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(ROLE)))
    workdir = tmp_path_factory.mktemp("confined-proxy")
    handle = start_proxy(
        pg.dsn(),
        workdir,
        PGML_PROXY_ENGINE_DATA_DIRS=str(area.data),
        PGML_PROXY_ENGINE_MODEL_DIRS=str(area.models),
        PGML_PROXY_ENGINE_DEVICE="cpu",
        PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(workdir / "artifact.key"),
    )
    try:
        with psycopg.connect(handle.dsn(dbname=DATABASE), autocommit=True) as conn:  # installs the pgml schema
            conn.execute("SELECT * FROM pgml.load_dataset('iris', \"limit\" => 1)")
        yield handle
    finally:
        handle.stop()
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))


@pytest.fixture
def conn(confined: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(confined.dsn(dbname=DATABASE), autocommit=True) as connection:
        yield connection


def answer(conn: psycopg.Connection, query: str, params: list[Any], shown: str) -> tuple[str | None, ...]:
    """The error a statement gets, with the client's own ``shown`` text taken out of the message."""
    with pytest.raises(errors.Error) as info:
        conn.execute(query, params)
    diag = info.value.diag
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    message = diag.message_primary or ""
    if shown:
        message = message.replace(shown, "<input>")
    return diag.sqlstate, message, diag.message_detail, diag.message_hint


LOAD = "SELECT * FROM pgml.load_dataset(%s, kwargs => %s::jsonb)"


def load_answer(conn: psycopg.Connection, kwargs: dict[str, Any], shown: str, source: str = "csv") -> Any:
    return answer(conn, LOAD, [source, json.dumps(kwargs)], shown)


# --------------------------------------------------------------------------- #
# load_dataset through the proxy
# --------------------------------------------------------------------------- #


def outside_requests(area: Area) -> list[tuple[dict[str, Any], str]]:
    """(kwargs, the path the error names) for reads that leave the data directory in every way we know."""
    return [
        ({"data_files": "/etc/shadow"}, "/etc/shadow"),
        ({"data_files": "/etc/passwd"}, "/etc/passwd"),
        ({"data_files": "/nonexistent/passwd"}, "/nonexistent/passwd"),
        ({"data_files": str(area.outside / "secret.csv")}, str(area.outside / "secret.csv")),
        ({"data_files": "../outside/secret.csv"}, "../outside/secret.csv"),
        ({"data_files": "../../../../../../etc/passwd"}, "../../../../../../etc/passwd"),
        ({"data_files": "secret.csv"}, "secret.csv"),  # a symlink inside pointing out
        ({"data_files": "link_out/secret.csv"}, "link_out/secret.csv"),
        ({"data_files": "link_out/*.csv"}, "link_out/*.csv"),
        ({"data_files": "*.csv"}, "*.csv"),  # matches people.csv and the symlink out
        ({"data_files": "sub/*/../../../outside/*.csv"}, "sub/*/../../../outside/*.csv"),
        ({"data_files": f"{area.data}/../outside/*"}, f"{area.data}/../outside/*"),
        ({"data_files": "~/secret.csv"}, "~/secret.csv"),
        ({"data_files": {"train": ["people.csv", "/etc/passwd"]}}, "/etc/passwd"),
        ({"data_files": [{"split": "test", "path": "/etc/passwd"}]}, "/etc/passwd"),
        ({"data_dir": "/etc"}, "/etc"),
        ({"data_dir": "../outside"}, "../outside"),
        ({"data_dir": "link_out"}, "link_out"),
    ]


def test_files_outside_the_data_dirs_are_refused(conn: psycopg.Connection, area: Area) -> None:
    answers = {}
    for kwargs, shown in outside_requests(area):
        got = load_answer(conn, kwargs, shown, source="text")
        assert got[0] == "42501", (kwargs, got)
        assert got[1] == 'load_dataset: permission denied to read "<input>"', (kwargs, got)
        answers[json.dumps(kwargs)] = got
    assert len(set(answers.values())) == 1  # one answer, whatever exists out there
    assert conn.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgml' AND tablename = 'text'"
    ).fetchone() == (0,)


def test_missing_and_existing_files_outside_answer_alike(conn: psycopg.Connection, area: Area) -> None:
    existing = str(area.outside / "secret.csv")
    missing = str(area.outside / "no-such.csv")
    assert os.path.exists(existing) and not os.path.exists(missing)
    pairs = [("/etc/passwd", "/nonexistent"), (existing, missing), ("link_out/secret.csv", "link_out/nope.csv")]
    for there, absent in pairs:
        assert load_answer(conn, {"data_files": there}, there) == load_answer(conn, {"data_files": absent}, absent)


def test_proxy_owned_kwargs_are_refused(conn: psycopg.Connection, area: Area, tmp_path: Path) -> None:
    target = tmp_path / "client-chosen-cache"
    for key, value in (
        ("cache_dir", str(target)),
        ("download_config", {"cache_dir": str(target)}),
        ("storage_options", {"auto_mkdir": True}),
        ("save_infos", True),
    ):
        state, message, _, hint = load_answer(conn, {"data_files": "people.csv", key: value}, key)
        assert (state, message) == ("42501", 'load_dataset: the kwarg "<input>" is not allowed')
        assert hint and key in hint
    assert not target.exists()  # nothing was created


def test_remote_and_chained_urls_are_refused(conn: psycopg.Connection) -> None:
    for url in ("file:///etc/passwd", "https://example.com/x.csv", "zip://x.csv::/etc/passwd", "s3://bucket/x.csv"):
        state, message, detail, _ = load_answer(conn, {"data_files": url}, url)
        assert (state, message) == ("42501", 'load_dataset: permission denied to fetch "<input>"')
        assert detail and "allow_downloads" in detail


def test_path_sources_are_refused(conn: psycopg.Connection, area: Area) -> None:
    for source in ("/etc", "../../etc", "./data", str(area.outside), "~"):
        state, message, _, _ = answer(conn, "SELECT * FROM pgml.load_dataset(%s)", [source], source)
        assert (state, message) == ("42501", 'load_dataset: permission denied to read "<input>"')
    state, _, _, hint = answer(conn, "SELECT * FROM pgml.load_dataset(%s)", [str(area.data)], str(area.data))
    assert state == "22023" and hint and "data_dir" in hint  # inside: refused as a source, but says how
    state, message, _, _ = load_answer(conn, {"data_files": "people.csv"}, "pandas", source="pandas")
    assert state == "0A000" and "not supported" in message  # the pandas builder unpickles
    state, _, _, hint = load_answer(conn, {}, "text", source="text")  # no files named: never the working dir
    assert state == "22023" and hint and "data_files" in hint


def test_files_inside_the_data_dirs_load(conn: psycopg.Connection, area: Area) -> None:
    for kwargs, rows in (
        ({"data_files": "people.csv"}, [(1, "ann"), (2, "bob")]),
        ({"data_files": str(area.data / "people.csv")}, [(1, "ann"), (2, "bob")]),
        ({"data_files": "sub/../people.csv"}, [(1, "ann"), (2, "bob")]),
        ({"data_files": ["people.csv", "sub/*.csv"]}, [(1, "ann"), (2, "bob"), (3, "cy")]),
        ({"data_files": {"train": "people.csv", "test": "sub/train.csv"}}, [(1, "ann"), (2, "bob"), (3, "cy")]),
        ({"data_dir": "sub"}, [(3, "cy")]),
    ):
        assert conn.execute(LOAD, ["csv", json.dumps(kwargs)]).fetchall() == [("csv", len(rows))], kwargs
        assert conn.execute('SELECT id, name FROM pgml."csv" ORDER BY id').fetchall() == rows
    state, message, _, _ = load_answer(conn, {"data_files": "nope.csv"}, "nope.csv")
    assert (state, message) == ("22023", 'load_dataset: no file "<input>"')  # inside: may say it is missing


def test_a_role_without_create_reads_nothing(confined: ProxyProcess, pg: Postgres) -> None:
    dsn = confined.dsn(user=ROLE, dbname=DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        state, message, _, hint = load_answer(conn, {"data_files": "people.csv"}, "")
        assert (state, message) == ("42501", "permission denied for schema pgml") and hint and "GRANT CREATE" in hint
    with psycopg.connect(pg.dsn(dbname=DATABASE), autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA pgml TO {}").format(sql.Identifier(ROLE)))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(LOAD, ["text", json.dumps({"data_files": "people.csv"})]).fetchall() == [("text", 3)]
            assert load_answer(conn, {"data_files": "/etc/passwd"}, "/etc/passwd")[0] == "42501"
    finally:
        with psycopg.connect(pg.dsn(dbname=DATABASE), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(ROLE)))


# --------------------------------------------------------------------------- #
# Model names through the proxy
# --------------------------------------------------------------------------- #


def path_names(area: Area) -> list[str]:
    """Model names that are paths outside the model directory; several name a directory that exists."""
    return [
        "/etc",
        "../../etc",
        "/proc/self",
        "/root",
        "~",
        "./x",
        ".",
        "/",
        "tiny-bert/../..",
        "../outside/model",
        "escape",  # a symlink in the model directory leading to a loadable model outside
        str(area.models / "escape"),
        str(area.outside / "model"),
        f"{area.models}/../outside/model",
        f"{area.models}/tiny-bert/../../outside/model",
        "org\\name",
    ]


def transform_answer(conn: psycopg.Connection, name: str) -> tuple[str | None, ...]:
    task = json.dumps({"task": "text-classification", "model": name})
    return answer(conn, "SELECT pgml.transform(%s::jsonb, inputs => ARRAY['good day'])", [task], name)


def test_model_paths_answer_like_missing_models(conn: psycopg.Connection, area: Area) -> None:
    missing = transform_answer(conn, "no/such-model")
    assert missing[0] == "42704"
    for name in path_names(area):
        assert transform_answer(conn, name) == missing, name
    embed_missing = answer(conn, "SELECT pgml.embed(%s, 'x')", ["no/such-model"], "no/such-model")
    rank_missing = answer(conn, "SELECT * FROM pgml.rank(%s, 'q', ARRAY['a'])", ["no/such-model"], "no/such-model")
    assert embed_missing[0] == rank_missing[0] == "42704"
    for name in ("/etc", "../../etc", "/proc/self", "escape", str(area.outside / "model")):
        assert answer(conn, "SELECT pgml.embed(%s, 'x')", [name], name) == embed_missing, name
        assert answer(conn, "SELECT * FROM pgml.rank(%s, 'q', ARRAY['a'])", [name], name) == rank_missing, name


def test_a_model_inside_the_model_dirs_loads_by_name_and_path(conn: psycopg.Connection, area: Area) -> None:
    for name in ("tiny-bert", "someone/tiny-bert", str(area.models / "tiny-bert")):
        task = json.dumps({"task": "text-classification", "model": name})
        (result,) = conn.execute("SELECT pgml.transform(%s::jsonb, inputs => ARRAY['a', 'b'])", [task]).fetchone() or (
            None,
        )
        assert isinstance(result, list) and len(result) == 2 and {"label", "score"} <= set(result[0]), name


def test_loading_kwargs_cannot_name_locations(conn: psycopg.Connection, area: Area, tmp_path: Path) -> None:
    target = tmp_path / "client-cache"
    base = {"task": "text-classification", "model": "tiny-bert"}
    for extra, state in (
        ({"cache_dir": str(target)}, "42501"),
        ({"model_kwargs": {"offload_folder": str(target)}}, "42501"),
        ({"tokenizer": str(area.outside / "model")}, "42704"),
        ({"subfolder": "../../outside/model"}, "22023"),
    ):
        task = json.dumps({**base, **extra})
        got = answer(conn, "SELECT pgml.transform(%s::jsonb, inputs => ARRAY['a'])", [task], "")
        assert got[0] == state, (extra, got)
    assert not target.exists()


def test_the_model_cache_log_names_no_kwargs(conn: psycopg.Connection, confined: ProxyProcess) -> None:
    marker = "s3cr3t-revision-marker"
    task = json.dumps({"task": "text-classification", "model": "tiny-bert", "revision": marker})
    conn.execute("SELECT pgml.transform(%s::jsonb, inputs => ARRAY['a'])", [task])
    log = confined.log_text()
    assert "tiny-bert" in log and "loaded" in log  # the line is there, naming the model ...
    assert marker not in log  # ... and not the client's kwargs


# --------------------------------------------------------------------------- #
# Engine level
# --------------------------------------------------------------------------- #


def engine_answer(error: EngineError, shown: str) -> tuple[str, str, str | None, str | None]:
    return error.sqlstate, error.message.replace(shown, "<input>"), error.detail, error.hint


def test_engine_load_refuses_alike(area: Area) -> None:
    answers = set()
    for kwargs, shown in outside_requests(area):
        with pytest.raises(PermissionDenied) as info:
            load("text", None, None, kwargs, allow_downloads=False, data_dirs=(str(area.data),))
        answers.add(engine_answer(info.value, shown))
    assert len(answers) == 1
    with pytest.raises(PermissionDenied) as none:  # no data_dirs: no local file at all, not even relative ones
        load("csv", None, None, {"data_files": "people.csv"}, allow_downloads=False)
    assert none.value.detail and "none are configured" in none.value.detail
    with pytest.raises(PermissionDenied):  # a hub dataset's data_files are paths in its repository
        load("someone/data", None, None, {"data_files": "/etc/passwd"}, allow_downloads=True)
    with pytest.raises(PermissionDenied):  # with downloads on: still never file://
        load("csv", None, None, {"data_files": "file:///etc/passwd"}, allow_downloads=True, data_dirs=(str(area.data),))
    table = load("csv", None, None, {"data_files": "people.csv"}, allow_downloads=False, data_dirs=(str(area.data),))
    assert table.rows == 2


def test_engine_resolve_confines_paths(area: Area) -> None:
    config = EngineConfig(model_dirs=(str(area.models),))
    with pytest.raises(UnknownModel) as info:
        resolve("no/such-model", config)
    missing = engine_answer(info.value, "no/such-model")
    for name in [*path_names(area), "x\x01y", "a//b", "org/", str(area.models / "missing")]:
        with pytest.raises(UnknownModel) as info:
            resolve(name, config)
        shown = name if name.isprintable() else repr(name)[1:-1]
        assert engine_answer(info.value, shown) == missing, name
    inside = str((area.models / "tiny-bert").resolve())
    assert resolve("tiny-bert", config) == resolve("org/tiny-bert", config) == inside
    assert resolve(str(area.models / "tiny-bert"), config) == inside
    assert resolve(MINILM, config).endswith("model")  # hub ids still resolve (the packaged copy)
    with pytest.raises(UnknownModel):  # the same path without model_dirs
        resolve(str(area.models / "tiny-bert"), EngineConfig())


def test_engine_owned_directories(area: Area) -> None:
    config = EngineConfig()
    first, second = owned_dir("tuned/db/1/x"), owned_dir("tuned/db/2/x")
    assert first != second and os.path.dirname(first) == os.path.dirname(second)
    assert owned_dir("tuned/db/1/x") == first  # stable within the process
    os.makedirs(first)
    assert resolve(first, config) == first  # what the engine wrote itself loads
    with pytest.raises(UnknownModel):
        resolve(second, config)  # not written: missing
    with pytest.raises(UnknownModel):
        resolve(os.path.dirname(first) + "/../" + os.path.basename(str(area.outside)), config)


def test_engine_confine_kwargs(area: Area) -> None:
    config = EngineConfig(model_dirs=(str(area.models),))
    for init in ({"cache_dir": "/tmp/x"}, {"model_kwargs": {"cache_dir": "/tmp/x"}}, {"proxies": {"https": "x"}}):
        with pytest.raises(PermissionDenied):
            confine_kwargs(init, config)
    with pytest.raises(UnknownModel):
        confine_kwargs({"tokenizer": "/etc"}, config)
    for init in ({"subfolder": "../x"}, {"tokenizer_kwargs": {"gguf_file": "/etc/passwd"}}):
        with pytest.raises(InvalidArgument):
            confine_kwargs(init, config)
    resolved = confine_kwargs({"tokenizer": "tiny-bert", "revision": "main", "subfolder": "onnx"}, config)
    assert resolved == {
        "tokenizer": str((area.models / "tiny-bert").resolve()),
        "revision": "main",
        "subfolder": "onnx",
        "trust_remote_code": False,
    }


def test_engine_other_models_only_through_the_allow_list(area: Area) -> None:
    """Another model is named only as tokenizer/config/processors (resolved inside model_dirs and permitted like
    the model); every other kwarg that names a model, processor, file or code is refused, at any depth."""
    config = EngineConfig(model_dirs=(str(area.models),), trust_remote_code=True)
    outside = str(area.outside / "model")
    refused: list[dict[str, Any]] = [
        {"assistant_model": outside},
        {"assistant_tokenizer": "tiny-bert"},
        {"model_kwargs": {"assistant_model": "tiny-bert"}},
        {"custom_generate": "tiny-bert"},
        {"generation_config": {"do_sample": True}},
        {"model_kwargs": {"_adapter_model_path": outside}},
        {"use_kernels": True},
        {"tokenizer_kwargs": {"vocab_file": "/etc/passwd"}},
        {"model_kwargs": {"tokenizer_file": "/etc/passwd"}},
        {"model_kwargs": {"model": outside}},
        {"speaker_model": "tiny-bert"},  # a kwarg a later transformers might add
        {"tokenizer": ["tiny-bert", {}]},  # transformers' (name, kwargs) form skips the check: a name only
        {"model_kwargs": "tiny-bert"},
    ]
    for init in refused:
        with pytest.raises(InvalidArgument):
            confine_kwargs(init, config)
    for key in ("video_processor", "image_processor", "feature_extractor", "processor", "config", "tokenizer"):
        with pytest.raises(UnknownModel):
            confine_kwargs({key: outside}, config)
        resolved = confine_kwargs({key: "tiny-bert"}, config)[key]
        assert resolved == str((area.models / "tiny-bert").resolve())
    seen: list[str] = []
    confine_kwargs({"tokenizer": "tiny-bert", "model_kwargs": {"config": "tiny-bert"}}, config, None, "m", seen.append)
    assert seen == ["tiny-bert", "tiny-bert"]  # each named model passes the caller's allow-lists
    trusting = SessionSettings(trust_remote_code=True, trust_remote_code_whitelist=("m",))
    with pytest.raises(PermissionDenied, match="model tiny-bert is not trusted to run remote code"):
        confine_kwargs({"trust_remote_code": True, "tokenizer": "tiny-bert"}, config, trusting, "m")
    assert confine_kwargs({"tokenizer": "tiny-bert"}, config, trusting, "m")["trust_remote_code"] is False


def test_engine_transform_checks_every_model_named(area: Area, tmp_path: Path) -> None:
    """The review's reproductions at the engine level: an assistant model from outside the model dirs, a
    tokenizer not in allowed_models or not in the session's whitelist; an allowed tokenizer still loads."""
    models = tmp_path / "models"
    tiny_gpt2(models / "A")
    tiny_gpt2(models / "B")
    tiny_gpt2(area.outside / "gpt")
    config = EngineConfig(device="cpu", model_dirs=(str(models),), allowed_models=("A", "B"))

    def run(task: dict[str, Any], settings: SessionSettings | None = None) -> Any:
        ctx = Context(config, ModelCache(1 << 30), threading.Event(), settings=settings)
        return transform_rows([(task, {"max_new_tokens": 2}, ["the cat"], False)], ctx)

    generation = {"task": "text-generation", "model": "A"}
    for assistant in ({"assistant_model": str(area.outside / "gpt")}, {"assistant_tokenizer": "B"}):
        with pytest.raises(InvalidArgument, match="is not allowed") as info:
            run({**generation, **assistant})
        assert info.value.sqlstate == "22023"
    with pytest.raises(EngineError, match='model "gpt" is not in the allowed models') as denied:
        run({**generation, "tokenizer": "gpt"})
    assert denied.value.sqlstate == "42501"
    with pytest.raises(EngineError, match="model B is not whitelisted") as narrowed:
        run({**generation, "tokenizer": "B"}, SessionSettings(whitelist=("A",)))
    assert narrowed.value.sqlstate == "42501"
    assert run({**generation, "tokenizer": "B"}, SessionSettings(whitelist=("A", "B")))


def test_engine_tune_resolves_through_the_model_dirs(area: Area) -> None:
    from engine.nlp.finetune import trainer

    data = {"text": ["good", "bad"], "class": ["a", "b"]}
    for name in ("/etc", "escape", str(area.outside / "model")):
        with pytest.raises(UnknownModel):
            trainer.fine_tune("text-classification", name, data, {}, {}, EngineConfig(model_dirs=(str(area.models),)),
                      lambda: False, lambda e: None)  # fmt: skip


def test_model_cache_log_lines_name_the_model_only(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    cache = ModelCache(1)  # one byte: the second model evicts the first
    with caplog.at_level(logging.INFO, logger="engine.runtime.cache"):
        cache.get(
            ModelCache.key("transform:text-classification", "/models/m1", {"token": "hf_secret1"}), lambda: np.zeros(4)
        )
        cache.get(ModelCache.key("sentence-transformers", "/models/m2", {"token": "hf_secret2"}), lambda: np.zeros(4))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "loaded transform:text-classification model /models/m1" in text
    assert "evicted transform:text-classification model /models/m1" in text  # over the 1-byte limit
    assert "hf_secret" not in text and "token" not in text
