"""The functions migration 009 adds, in detail: the sklearn_* metrics equal scikit-learn's values (f32), the
vector helpers take PostgresML's parameter names (and a user's view on the old ones survives the migration),
auto_updated_at / set_updated_at move updated_at only on a change, clear_gpu_cache evicts the engine's models,
activate_venv says the environment is fixed, dump_all / load_all move a registry between databases inside
[engine] data_dirs only, and loading options that cannot be are clear errors (22023 devices, 0A000 GGML)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from sklearn import metrics

from engine.api import EngineConfig, InvalidArgument, NotSupported
from engine.runtime import device, memory
from engine.runtime.cache import ModelCache
from engine.runtime.confine import refuse_unsupported_loading
from engine.runtime.context import Context
from proxy import schema
from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database
from tests.test_callback import Setting, ready, setting  # noqa: F401  (fixtures: a cluster in callback mode)

pytestmark = pytest.mark.pg_matrix


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


def f32(value: float) -> float:
    """As the server's float4 output reads back: the shortest text of the f32."""
    return float(str(np.float32(value)))


# --------------------------------------------------------------------------- #
# sklearn_* metric functions
# --------------------------------------------------------------------------- #


def test_metric_functions_equal_scikit_learn(conn: psycopg.Connection) -> None:
    rng = np.random.default_rng(7)
    truth = rng.normal(size=50).astype(np.float32)
    guess = (truth + rng.normal(scale=0.3, size=50)).astype(np.float32)
    args = [truth.tolist(), guess.tolist()]
    r2, regression = (
        conn.execute(
            "SELECT pgml.sklearn_r2_score(%s::real[], %s::real[]),"
            " pgml.sklearn_regression_metrics(%s::real[], %s::real[])",
            args * 2,
        ).fetchone()
        or ()
    )
    assert r2 == f32(metrics.r2_score(truth, guess))
    assert regression == {
        "r2": f32(metrics.r2_score(truth, guess)),
        "mse": f32(metrics.mean_squared_error(truth, guess)),
        "mae": f32(metrics.mean_absolute_error(truth, guess)),
    }
    labels, predicted = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    binary = [labels.astype(float).tolist(), predicted.astype(float).tolist()]
    f1, scores = (
        conn.execute(
            "SELECT pgml.sklearn_f1_score(%s::real[], %s::real[]),"
            " pgml.sklearn_classification_metrics(%s::real[], %s::real[], 2)",
            binary * 2,
        ).fetchone()
        or ()
    )
    assert f1 == f32(metrics.f1_score(labels, predicted))
    assert scores == {
        "f1": f32(metrics.f1_score(labels, predicted)),
        "f1_micro": f32(metrics.f1_score(labels, predicted, average="micro")),
        "precision": f32(metrics.precision_score(labels, predicted)),
        "recall": f32(metrics.recall_score(labels, predicted)),
        "accuracy": f32(metrics.accuracy_score(labels, predicted)),
        "mcc": f32(metrics.matthews_corrcoef(labels, predicted)),
        "roc_auc": f32(metrics.roc_auc_score(labels, predicted)),
    }


def test_multiclass_metrics_average_by_macro_and_have_no_roc_auc(conn: psycopg.Connection) -> None:
    truth, guess = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 2, 1, 1, 0]
    (scores,) = (
        conn.execute("SELECT pgml.sklearn_classification_metrics(%s::real[], %s::real[], 3)", [truth, guess]).fetchone()
        or ()
    )
    assert "roc_auc" not in scores
    assert scores["f1"] == f32(metrics.f1_score(truth, guess, average="macro"))
    assert scores["precision"] == f32(metrics.precision_score(truth, guess, average="macro"))


def test_metrics_over_a_table_through_array_agg(conn: psycopg.Connection) -> None:
    """The usual form: arguments aggregated from rows (the proxy evaluates the call on the result)."""
    (r2,) = (
        conn.execute(
            "SELECT pgml.sklearn_r2_score(array_agg(y ORDER BY i), array_agg(y + (i % 3) * 0.1 ORDER BY i))"
            " FROM (SELECT i, i::real AS y FROM generate_series(1, 30) AS i) AS t"
        ).fetchone()
        or ()
    )
    truth = np.arange(1, 31, dtype=np.float32)
    assert r2 == pytest.approx(f32(metrics.r2_score(truth, truth + (np.arange(1, 31) % 3) * np.float32(0.1))), 1e-6)


def test_metric_argument_errors_are_22023_and_null_gives_null(conn: psycopg.Connection) -> None:
    for sql in (
        "SELECT pgml.sklearn_f1_score('{1,0}', '{1}')",
        "SELECT pgml.sklearn_f1_score('{0,1,2}', '{0,1,2}')",  # multiclass with binary averaging, as in PostgresML
        "SELECT pgml.sklearn_r2_score('{1,NULL}', '{1,2}')",
        "SELECT pgml.sklearn_r2_score('{}', '{}')",
    ):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(sql)
    assert conn.execute("SELECT pgml.sklearn_r2_score(NULL, '{1}')").fetchone() == (None,)


# --------------------------------------------------------------------------- #
# Vector helpers: PostgresML's parameter names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("element", ["real", "double precision"])
def test_vector_helpers_take_postgresml_parameter_names(conn: psycopg.Connection, element: str) -> None:
    v = f"ARRAY[2, 4]::{element}[]"
    row = conn.execute(
        f"SELECT pgml.add(vector => {v}, addend => 1), pgml.subtract(vector => {v}, subtahend => 1),"
        f" pgml.multiply(vector => {v}, multiplicand => 2), pgml.divide(vector => {v}, dividend => 2),"
        f" pgml.add({v}, addend => {v}), pgml.subtract({v}, subtahend => {v}),"
        f" pgml.multiply({v}, multiplicand => {v}), pgml.divide({v}, dividend => {v}),"
        f" pgml.normalize_l1({v}), pgml.distance_l1({v}, other => {v})"
    ).fetchone()
    assert row == (
        [3, 5],
        [1, 3],
        [4, 8],
        [1, 2],
        [4, 8],
        [0, 0],
        [4, 16],
        [1, 1],
        [pytest.approx(1 / 3), pytest.approx(2 / 3)],
        0,
    )


def test_a_view_on_an_old_vector_helper_survives_the_migration(pg: Postgres) -> None:
    """Renaming a parameter drops the function: where a user's view depends on one, nothing of the user's is
    dropped, and that element type's helpers keep their old names (with a WARNING)."""
    with scratch_database(pg, "vecdep") as database:
        dsn = pg.dsn(dbname=database)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA pgml; {schema.CREATE_TABLE}")
            for m in schema.migrations():
                if m.version < 9:
                    conn.execute(m.sql.encode())
                    conn.execute("INSERT INTO pgml.schema_migrations VALUES (%s, %s)", [m.version, m.name])
            conn.execute("CREATE VIEW doubled AS SELECT pgml.multiply(ARRAY[1, 2]::real[], 2::real) AS v")
        assert schema.init(dsn) == sum(m.version >= 9 for m in schema.migrations())
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT v FROM doubled").fetchone() == ([2, 4],)
            names = conn.execute(
                "SELECT oidvectortypes(proargtypes), proargnames FROM pg_proc"
                " WHERE proname = 'multiply' AND pronamespace = 'pgml'::regnamespace ORDER BY 1"
            ).fetchall()
    assert names == [
        ("double precision[], double precision", ["vector", "multiplicand"]),
        ("double precision[], double precision[]", ["vector", "multiplicand"]),
        ("real[], real", ["vector", "scalar"]),
        ("real[], real[]", ["vector", "other"]),
    ]


def test_callback_mode_answers_the_new_stubs_from_the_server(ready: Setting) -> None:  # noqa: F811
    """A direct connection (a view, a trigger…) reaches the proxy through dblink: a void result as well."""
    with ready.direct() as conn:
        assert conn.execute("SELECT pgml.python_version()").fetchone() == (sys.version,)
        assert conn.execute("SELECT pgml.validate_shared_library()").fetchone() == (None,)
        assert conn.execute("SELECT count(*) > 10 FROM pgml.python_pip_freeze()").fetchone() == (True,)
        assert conn.execute("SELECT pgml.sklearn_r2_score('{1,2,3}', '{1,2,3}')").fetchone() == (1.0,)


# --------------------------------------------------------------------------- #
# auto_updated_at, activate_venv
# --------------------------------------------------------------------------- #


def test_auto_updated_at_moves_updated_at_only_on_a_change(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS touched")
    conn.execute("CREATE TABLE touched (id int, v text, updated_at timestamp DEFAULT '2000-01-01')")
    conn.execute("INSERT INTO touched (id, v) VALUES (1, 'a')")
    conn.execute("SELECT pgml.auto_updated_at('touched')")
    conn.execute("UPDATE touched SET v = 'a'")  # no change
    assert conn.execute("SELECT updated_at::text FROM touched").fetchone() == ("2000-01-01 00:00:00",)
    conn.execute("UPDATE touched SET v = 'b'")
    (moved,) = conn.execute("SELECT updated_at > '2001-01-01' FROM touched").fetchone() or ()
    assert moved
    conn.execute("UPDATE touched SET v = 'c', updated_at = '1999-01-01'")  # set by the statement: kept
    assert conn.execute("SELECT updated_at::text FROM touched").fetchone() == ("1999-01-01 00:00:00",)
    conn.execute("SELECT pgml.auto_updated_at('touched')")  # again: replaced, not doubled
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'touched'::regclass").fetchone() == (1,)
    conn.execute("DROP TABLE touched")


def test_activate_venv_answers_false_with_a_notice(conn: psycopg.Connection) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(f"{d.severity} {d.message_primary}"))
    assert conn.execute("SELECT pgml.activate_venv('/opt/venv')").fetchone() == (False,)
    assert any(n.startswith("NOTICE") and "fixed" in n for n in notices), notices


# --------------------------------------------------------------------------- #
# clear_gpu_cache
# --------------------------------------------------------------------------- #


def test_clear_gpu_cache_evicts_the_engine_models() -> None:
    cache = ModelCache(1 << 30)
    cache.get("a", lambda: object())
    cache.get("b", lambda: object())
    ctx = Context(EngineConfig(device="cpu"), cache, threading.Event())
    assert memory.clear_gpu_cache([(None,), (0.5,)], ctx) == [True, True]
    assert len(cache) == 0
    with pytest.raises(InvalidArgument):
        memory.clear_gpu_cache([(2.0,)], ctx)


def test_clear_gpu_cache_through_the_proxy_frees_loaded_models(conn: psycopg.Connection, proxy: ProxyProcess) -> None:
    conn.execute(f"SELECT pgml.embed('{MINILM}', 'load me')")
    assert conn.execute("SELECT pgml.clear_gpu_cache()").fetchone() == (True,)
    assert "models from the model cache" in proxy.log_text()
    assert conn.execute(f"SELECT cardinality(pgml.embed('{MINILM}', 'again'))").fetchone() == (384,)


# --------------------------------------------------------------------------- #
# dump_all / load_all
# --------------------------------------------------------------------------- #


WIPE = (
    "DELETE FROM pgml.deployments; DELETE FROM pgml.files; DELETE FROM pgml.models; DELETE FROM pgml.snapshots;"
    " DELETE FROM pgml.projects"
)


def test_dump_all_and_load_all_restore_the_registry(pg: Postgres, proxy: ProxyProcess, data_dir: Path) -> None:
    """PostgresML's files, one per table with a header; a load restores the rows as they were (artifact
    signatures included: they name the database, so a restore into another database verifies nothing)."""
    with scratch_database(pg, "dump") as database, scratch_database(pg, "other") as other:
        with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
            conn.execute("CREATE TABLE xy AS SELECT i::real AS x, (3 * i)::real AS y FROM generate_series(1, 20) i")
            conn.execute("SELECT * FROM pgml.train('moved', 'regression', 'xy', 'y')")
            (before,) = conn.execute("SELECT pgml.predict('moved', ARRAY[5]::real[])").fetchone() or ()
            conn.execute("SELECT pgml.dump_all('dumps/one')")
            written = sorted(p.name for p in (data_dir / "dumps" / "one").iterdir())
            assert written == ["deployments.csv", "files.csv", "models.csv", "projects.csv", "snapshots.csv"]
            assert (data_dir / "dumps" / "one" / "projects.csv").read_text().startswith("id,name,task,")
            conn.execute(WIPE)
            conn.execute(f"SELECT pgml.load_all('{data_dir / 'dumps' / 'one'}')")  # absolute, inside data_dirs
            assert conn.execute("SELECT pgml.predict('moved', ARRAY[5]::real[])").fetchone() == (before,)
            conn.execute("SELECT * FROM pgml.train('fresh', 'regression', 'xy', 'x')")  # ids past the loaded ones
        with psycopg.connect(proxy.dsn(dbname=other), autocommit=True) as conn:
            conn.execute("SELECT pgml.version()")
            conn.execute("SELECT pgml.load_all('dumps/one')")
            assert conn.execute("SELECT count(*) FROM pgml.models").fetchone() == (1,)
            with pytest.raises(psycopg.errors.SystemError):  # 58000: not this database's artifact
                conn.execute("SELECT pgml.predict('moved', ARRAY[5]::real[])")


def test_load_all_refuses_a_header_naming_other_columns(conn: psycopg.Connection, data_dir: Path) -> None:
    bad = data_dir / "dumps" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    for table in ("projects", "snapshots", "models", "files", "deployments"):
        (bad / f"{table}.csv").write_text('id,"x"")--"\n')
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT pgml.load_all('dumps/bad')")


@pytest.mark.parametrize("path", ["/tmp", "../outside", "dumps/../../outside"])
def test_dump_all_outside_data_dirs_is_refused(conn: psycopg.Connection, path: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml.dump_all(%s)", [path])
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml.load_all(%s)", [path])


def test_dump_all_and_load_all_need_the_registry_owner(pg: Postgres, proxy: ProxyProcess) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS dumper")
        admin.execute("CREATE ROLE dumper LOGIN")
    try:
        with psycopg.connect(proxy.dsn(user="dumper"), autocommit=True) as conn:
            for function in ("dump_all", "load_all"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match=function):
                    conn.execute(f"SELECT pgml.{function}('dumps/mine')")
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("DROP ROLE dumper")


def test_dump_all_through_a_link_leading_out_is_refused(
    conn: psycopg.Connection, data_dir: Path, tmp_path: Path
) -> None:
    link = data_dir / "leads-out"
    if not link.exists():
        link.symlink_to(tmp_path)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml.dump_all('leads-out/x')")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- #
# Devices and loading options that cannot be
# --------------------------------------------------------------------------- #


def test_a_device_kind_that_does_not_exist_is_22023_naming_the_devices(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        conn.execute(f"SELECT pgml.embed('{MINILM}', 'x', '{{\"device\": \"gpu\"}}')")
    assert raised.value.diag.message_detail is not None and "cpu" in raised.value.diag.message_detail


def test_a_gpu_index_beyond_the_host_is_22023(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "devices", lambda: ["cpu", "cuda:0"])
    assert device.usable_device("cuda:0", "auto") == ("cuda:0", None)
    assert device.usable_device(0, "auto") == ("cuda:0", None)  # transformers' pipeline(device=0)
    for requested in ("cuda:1", 3, "xpu", "cuda:x", ["cuda"]):
        with pytest.raises(InvalidArgument) as raised:
            device.usable_device(requested, "auto")
        assert requested == ["cuda"] or "cpu, cuda:0" in (raised.value.detail or "")
    assert device.usable_device_map("auto", "auto") == ("auto", None)
    with pytest.raises(InvalidArgument):
        device.usable_device_map("cuda:4", "auto")


def test_cuda_on_a_host_without_it_still_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "devices", lambda: ["cpu"])
    assert device.usable_device("cuda", "cpu") == ("cpu", 'device "cuda" is not available on the pgml-proxy host;'
                                                          ' using "cpu" instead')  # fmt: skip


@pytest.mark.parametrize(
    ("name", "init"),
    [
        ("marella/gpt-2-ggml", {}),
        ("TheBloke/MPT-7B-Storywriter-GGML", {"model_file": "mpt-7b-storywriter.ggmlv3.q8_0.bin"}),
        ("gpt2", {"model_type": "gpt2"}),
        ("gpt2", {"model_kwargs": {"load_in_8bit": True}}),
        ("gpt2", {"load_in_4bit": True}),
    ],
)
def test_ggml_and_bitsandbytes_loading_is_0a000_with_a_hint(name: str, init: dict[str, object]) -> None:
    with pytest.raises(NotSupported) as raised:
        refuse_unsupported_loading(name, init)
    assert raised.value.hint


def test_ggml_through_the_proxy_is_0a000(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.FeatureNotSupported) as raised:
        conn.execute(
            'SELECT pgml.transform(\'{"task": "text-generation", "model": "marella/gpt-2-ggml"}\'::jsonb,'
            " inputs => ARRAY['Once'])"
        )
    assert raised.value.diag.message_hint and "ctransformers" in raised.value.diag.message_hint
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        conn.execute(f"SELECT pgml.embed('{MINILM}', 'x', '{{\"model_kwargs\": {{\"load_in_8bit\": true}}}}')")
