"""Models trained by PostgresML, brought along: ``engine.ml.postgresml_import`` and ``pgml-proxy import-postgresml``.

The fixtures in tests/postgresml/artifacts/ are ``estimator.rmp`` files serialised the way PostgresML 2.x
does (its README says how; ``expected.json`` holds the predictions of the libraries that wrote them). The
end-to-end test inserts them as PostgresML would into a throwaway database's pgml.* tables, runs the
command, and predicts through a real proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psycopg
import pytest

from engine.api import EngineError, NotSupported, UntrustedArtifact
from engine.ml import artifacts, postgresml_import, xgboost_legacy
from engine.ml.preprocess import replay_rows
from proxy import schema
from tests.conftest import Postgres, ProxyProcess, scratch_database, start_proxy

FIXTURES = Path(__file__).resolve().parent / "postgresml" / "artifacts"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
X = np.asarray(EXPECTED["features"], dtype=np.float32)
# name: (task, algorithm, runtime) of the model row PostgresML writes for it
MODELS = {
    "xgboost_regression": ("regression", "xgboost", "rust"),
    "xgboost_classification_2.0.0": ("classification", "xgboost", "rust"),
    "lightgbm_regression": ("regression", "lightgbm", "rust"),
    "lightgbm_binary_2.0.0": ("classification", "lightgbm", "rust"),
    "linfa_linear_regression": ("regression", "linear", "rust"),
    "linfa_logistic_binary": ("classification", "linear", "rust"),
    "linfa_logistic_multi": ("classification", "linear", "rust"),
    "linfa_svm_rbf": ("regression", "svm", "rust"),
    "linfa_svm_linear": ("regression", "svm", "rust"),
    "linfa_svm_poly": ("classification", "svm", "rust"),  # Svm<f32, f32>: the raw value, as PostgresML predicts
    "sklearn_pickle": ("regression", "decision_tree", "python"),
    "corrupt": ("regression", "xgboost", "rust"),
}
CONVERTIBLE = [n for n in MODELS if n not in ("sklearn_pickle", "corrupt")]


def raw(name: str) -> bytes:
    return (FIXTURES / f"{name}.rmp").read_bytes()


def linfa_predictions(name: str) -> np.ndarray:
    """What linfa predicts (bindings/linfa.rs), from the coefficients in the MessagePack, in f32."""
    value = msgpack.unpackb(raw(name))

    def array(a: list[Any]) -> np.ndarray:
        return np.asarray(a[2], dtype=np.float32).reshape(a[1])

    if name == "linfa_linear_regression":
        intercept, params = value[0]
        return X @ array(params) + np.float32(intercept)
    binary, multi = value[0], value[1]
    if binary is not None:
        threshold, intercept, params, ((pos, _), (neg, _)) = binary
        probability = 1 / (1 + np.exp(-(X @ array(params) + np.float32(intercept))))
        return np.where(probability >= threshold, pos, neg).astype(np.float32)
    intercept, params, classes = multi
    return np.asarray(classes, dtype=np.float32)[np.argmax(X @ array(params) + array(intercept), axis=1)]


def original(name: str) -> np.ndarray:
    if name in EXPECTED["predictions"]:
        return np.asarray(EXPECTED["predictions"][name], dtype=np.float32)
    return linfa_predictions(name)


def assert_same(name: str, predictions: Any) -> None:
    got, want = np.asarray(predictions, dtype=np.float32), original(name)
    if name.startswith("linfa_linear"):  # f32 sums in another order: within a few ulps
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    elif name.startswith("linfa_svm"):  # libsvm sums in f64, linfa in f32: within linfa's own rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
    else:
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- #
# The converter
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_each_layout_is_rebuilt_with_the_same_predictions(name: str) -> None:
    task, algorithm, runtime = MODELS[name]
    imported = postgresml_import.rebuild(raw(name), task, algorithm, runtime)
    tag, stored = artifacts.dump(imported.estimator)
    assert tag in ("xgboost", "lightgbm", "skops")
    assert_same(name, artifacts.load(tag, stored).predict(X))
    # Signed as it is (resign --trust-unsigned): read in memory, the kind told by the bytes alone.
    assert_same(name, artifacts.load("rmp", raw(name)).predict(X))


def test_the_binary_xgboost_layout_becomes_json_xgboost_reads() -> None:
    data = raw("xgboost_regression")
    assert data.startswith(xgboost_legacy.MAGIC) and xgboost_legacy.is_legacy(data)
    document = json.loads(xgboost_legacy.to_json(data))
    assert document["learner"]["objective"]["name"] == "reg:squarederror"  # PostgresML's reg:linear, renamed
    assert len(document["learner"]["gradient_booster"]["model"]["trees"]) == 8
    with pytest.raises(ValueError, match="truncated"):
        xgboost_legacy.to_json(data[:-40])


def test_a_pickle_is_unpickled_only_when_trusted() -> None:
    with pytest.raises(UntrustedArtifact) as refused:
        postgresml_import.rebuild(raw("sklearn_pickle"), "regression", "decision_tree", "python")
    assert refused.value.hint is not None and "--trust-pickle" in refused.value.hint
    with pytest.raises(UntrustedArtifact):  # nor in memory at predict time, whatever signs it
        artifacts.load("rmp", raw("sklearn_pickle"))
    imported = postgresml_import.rebuild(raw("sklearn_pickle"), "regression", runtime="python", trust_pickle=True)
    assert imported.kind == "pickle"
    assert_same("sklearn_pickle", artifacts.load(*artifacts.dump(imported.estimator)).predict(X))


def test_linfa_svms_count_the_alphas_linfa_counts() -> None:
    svm = postgresml_import.rebuild(raw("linfa_svm_rbf"), "regression", "svm", "rust").estimator
    alpha = np.asarray(msgpack.unpackb(raw("linfa_svm_rbf"))[0][0], dtype=np.float32)
    assert ((alpha != 0) & (np.abs(alpha) < 1e-5)).sum() == 1  # one alpha under 100 * f32::EPSILON: not counted
    assert svm.dual_coef_.shape == (1, int((np.abs(alpha) > 1.1920929e-5).sum())) == (1, len(svm.support_vectors_))
    assert (svm.kernel, svm.gamma) == ("rbf", 1 / 8.0)


def test_svm_and_damaged_artifacts_give_clear_errors() -> None:
    value = msgpack.unpackb(raw("linfa_svm_poly"))
    value[0][6] = {"Polynomial": [1.0, 2.5]}  # powf with a fractional degree: libsvm's degree is an integer
    with pytest.raises(NotSupported, match=r"polynomial kernel of degree 2\.5"):
        postgresml_import.rebuild(msgpack.packb(value, use_single_float=True), "regression", "svm", "rust")
    value[0][6] = {"Sigmoid": [1.0, 2.0]}
    with pytest.raises(EngineError, match="unknown kernel 'Sigmoid'"):
        postgresml_import.rebuild(msgpack.packb(value, use_single_float=True), "regression", "svm", "rust")
    with pytest.raises(EngineError, match="not an XGBoost booster PostgresML writes"):
        postgresml_import.rebuild(raw("corrupt"), "regression", "xgboost", "rust")
    with pytest.raises(EngineError, match="LightGBM"):
        postgresml_import.rebuild(b"garbage", "regression", "lightgbm", "rust")
    with pytest.raises(EngineError, match="linfa"):
        postgresml_import.rebuild(b"\x92\x01", "regression", "linear", "rust")


# --------------------------------------------------------------------------- #
# pgml-proxy import-postgresml, end to end
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("import-key") / "artifact.key"


@pytest.fixture(scope="module")
def proxy(pg: Postgres, key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    handle = start_proxy(pg.dsn(), tmp_path_factory.mktemp("import"), PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=str(key))
    try:
        yield handle
    finally:
        handle.stop()


def plant(conn: psycopg.Connection, name: str, columns: list[dict[str, Any]] | None = None) -> int:
    """One trained model as PostgresML stores it: project, snapshot, model, estimator.rmp, deployment."""
    task, algorithm, runtime = MODELS[name]
    project = conn.execute(
        "INSERT INTO pgml.projects (name, task) VALUES (%s, %s) RETURNING id", [name, task]
    ).fetchone()
    snapshot = conn.execute(
        "INSERT INTO pgml.snapshots (relation_name, y_column_name, test_size, test_sampling, status, columns)"
        " VALUES ('public.data', '{y}', 0.25, 'stratified', 'successful', %s) RETURNING id",
        [None if columns is None else json.dumps(columns)],
    ).fetchone()
    assert project is not None and snapshot is not None
    model = conn.execute(
        "INSERT INTO pgml.models (project_id, snapshot_id, num_features, algorithm, runtime, hyperparams, status,"
        " search_params, search_args) VALUES (%s, %s, %s, %s, %s, '{}', 'successful', '{}', '{}') RETURNING id",
        [project[0], snapshot[0], X.shape[1], algorithm, runtime],
    ).fetchone()
    assert model is not None
    conn.execute(
        "INSERT INTO pgml.files (model_id, path, part, data) VALUES (%s, 'estimator.rmp', 0, %s)", [model[0], raw(name)]
    )
    conn.execute(
        "INSERT INTO pgml.deployments (project_id, model_id, strategy) VALUES (%s, %s, 'most_recent')",
        [project[0], model[0]],
    )
    return int(model[0])


@pytest.fixture
def restored(pg: Postgres) -> Iterator[tuple[str, dict[str, int]]]:
    """A database holding every fixture as a PostgresML database dumped and restored here would."""
    with scratch_database(pg, "pgmlimport") as database:
        schema.init(pg.dsn(dbname=database))
        with psycopg.connect(pg.dsn(dbname=database), autocommit=True) as conn:
            ids = {name: plant(conn, name) for name in MODELS}
            # What the migration records for rows that were there before pgml-proxy's schema.
            conn.execute("INSERT INTO pgml.unsigned_artifacts SELECT model_id, path FROM pgml.files")
        yield database, ids


def command(pg: Postgres, database: str, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--upstream", pg.dsn(dbname=database), "import-postgresml", *args],
        env={**env, "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(key)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def predictions(proxy: ProxyProcess, database: str, name: str) -> list[float]:
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pgml.predict(%s, f::real[]) FROM unnest(%s::text[]) WITH ORDINALITY u(f, i) ORDER BY i",
            [name, ["{" + ",".join(repr(float(v)) for v in row) + "}" for row in X]],
        ).fetchall()
    return [float(r[0]) for r in rows]


def registry_rows(pg: Postgres, database: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(dbname=database)) as conn:
        return conn.execute(
            "SELECT m.id, m.project_id, m.snapshot_id, d.id, d.model_id FROM pgml.models m"
            " JOIN pgml.deployments d ON d.model_id = m.id ORDER BY m.id"
        ).fetchall()


def test_import_converts_in_place_and_predictions_equal_the_originals(
    proxy: ProxyProcess, pg: Postgres, key: Path, restored: tuple[str, dict[str, int]]
) -> None:
    database, ids = restored
    # before: a hint, not a crash
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn, pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT pgml.predict('xgboost_regression', ARRAY[1, 2, 3, 4]::real[])")
    assert refused.value.sqlstate == "58000"
    assert "pgml-proxy import-postgresml" in (refused.value.diag.message_hint or "")
    before = registry_rows(pg, database)

    dry = command(pg, database, key, "--dry-run")
    assert dry.returncode == 1 and f"{len(CONVERTIBLE)} would be converted" in dry.stdout, dry.stdout + dry.stderr
    result = command(pg, database, key)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert f"{len(MODELS)} PostgresML model(s): {len(CONVERTIBLE)} converted, 1 skipped, 1 failed" in out, out
    assert f"model {ids['xgboost_regression']} (project xgboost_regression, rust xgboost): converted" in out
    assert "sklearn_pickle, python decision_tree): skipped: a pickled scikit-learn estimator: rerun with" in out
    assert "linfa_svm_poly, rust svm): converted: linfa-svm -> estimator.skops" in out
    assert "corrupt, rust xgboost): failed: not an XGBoost booster" in out
    for name in CONVERTIBLE:
        assert_same(name, predictions(proxy, database, name))
    assert registry_rows(pg, database) == before  # ids, snapshots and deployments as they were

    trusted = command(pg, database, key, "--trust-pickle")
    # Only what is left: the damaged one is reported again.
    assert "2 PostgresML model(s): 1 converted, 0 skipped, 1 failed" in trusted.stdout, trusted.stdout
    assert "sklearn_pickle, python decision_tree): converted: pickle -> estimator.skops" in trusted.stdout
    assert_same("sklearn_pickle", predictions(proxy, database, "sklearn_pickle"))
    with psycopg.connect(pg.dsn(dbname=database)) as conn:
        left = conn.execute("SELECT count(*) FROM pgml.files WHERE path = 'estimator.rmp'").fetchone()
        unsigned = conn.execute("SELECT count(*) FROM pgml.files WHERE signature IS NULL AND part = 0").fetchone()
    assert left == (1,) and unsigned == (1,)  # only the damaged one remains PostgresML's


def test_rows_written_after_the_schema_need_trust_unsigned(
    pg: Postgres, key: Path, restored: tuple[str, dict[str, int]]
) -> None:
    database, ids = restored
    with psycopg.connect(pg.dsn(dbname=database), autocommit=True) as conn:
        conn.execute("DELETE FROM pgml.unsigned_artifacts WHERE model_id = %s", [ids["lightgbm_regression"]])
    result = command(pg, database, key, "--dry-run")
    assert "lightgbm_regression, rust lightgbm): skipped: unsigned and written after" in result.stdout
    result = command(pg, database, key, "--dry-run", "--trust-unsigned")
    assert "lightgbm_regression, rust lightgbm): converted: lightgbm -> estimator.lightgbm" in result.stdout


def test_an_rmp_artifact_an_administrator_signed_is_rebuilt_at_first_predict(
    proxy: ProxyProcess, pg: Postgres, key: Path, restored: tuple[str, dict[str, int]]
) -> None:
    database, _ = restored
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")}
    signed = subprocess.run(
        [sys.executable, "-m", "proxy", "--upstream", pg.dsn(dbname=database), "resign", "--trust-unsigned"],
        env={**env, "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(key)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert f"{len(MODELS)} signed that were unsigned" in signed.stdout, signed.stdout + signed.stderr
    for name in ("xgboost_classification_2.0.0", "lightgbm_regression", "linfa_logistic_multi", "linfa_svm_rbf"):
        assert_same(name, predictions(proxy, database, name))
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn, pytest.raises(psycopg.Error) as pickle:
        conn.execute("SELECT pgml.predict('sklearn_pickle', ARRAY[1, 2, 3, 4]::real[])")
    assert pickle.value.sqlstate == "58000" and "--trust-pickle" in (pickle.value.diag.message_hint or "")
    with psycopg.connect(pg.dsn(dbname=database)) as conn:  # read in memory only: the rows stay PostgresML's
        assert conn.execute("SELECT count(*) FROM pgml.files WHERE path = 'estimator.rmp'").fetchone() == (len(MODELS),)


# --------------------------------------------------------------------------- #
# Snapshot columns: predict(project, ROW(…)) on imported models
# --------------------------------------------------------------------------- #

KEYS = [f"k{i}" for i in range(len(X))]  # the text column's categories: each stands for one row's third feature


def statistics(**values: Any) -> dict[str, Any]:
    """orm/snapshot.rs Statistics as serde_json writes it (f32::NAN as null)."""
    blank = dict.fromkeys(("min", "max", "max_abs", "mean", "median", "mode", "variance", "std_dev"))
    return {**blank, "missing": 0, "distinct": 16, "histogram": [1] * 20, "ventiles": [None] * 19,
            "categories": None, **values}  # fmt: skip


def column(name: str, pg_type: str, position: int, label: bool = False, **pre: Any) -> dict[str, Any]:
    """orm/snapshot.rs Column of PostgresML 2.2 and later (here 2.10)."""
    preprocessor = {"encode": "native", "impute": "error", "scale": "preserve", **pre}
    return {"name": name, "pg_type": pg_type, "nullable": True, "label": label, "position": position, "size": 1,
            "array": False, "preprocessor": preprocessor, "statistics": statistics()}  # fmt: skip


def columns_2_10() -> list[dict[str, Any]]:
    """A float4, a float8, a text column (categories numbered as PostgresML does, __NULL__ 0), the label between
    them, and a float4 whose NULL is imputed with its training mean (row 0's value)."""
    text = column("x3", "text", 4)
    categories = {"__NULL__": {"value": 0.0, "members": 0}}
    categories |= {key: {"value": float(X[i, 2]), "members": 1} for i, key in enumerate(KEYS)}
    text["statistics"] = statistics(categories=categories)
    mean = column("x4", "float4", 5, impute="mean")
    mean["statistics"] = statistics(mean=float(X[0, 3]), missing=1)
    return [column("x1", "float4", 1), column("x2", "float8", 2), column("y", "float4", 3, label=True), text, mean]


def columns_2_0() -> list[dict[str, Any]]:
    """PostgresML 2.0's Column (orm/snapshot.rs at f50dc012): no preprocessor, statistics or array; any order."""
    names = [("y", "float4", True), ("x4", "float4", False), ("x1", "float4", False), ("x3", "float8", False),
             ("x2", "float4", False)]  # fmt: skip
    positions = {"x1": 1, "x2": 2, "x3": 3, "x4": 4, "y": 5}
    return [{"name": n, "pg_type": t, "nullable": True, "label": label, "position": positions[n], "size": 1}
            for n, t, label in names]  # fmt: skip


def row_predictions(
    pg: Postgres, proxy: ProxyProcess, database: str, name: str, types: str, values: list[list[Any]]
) -> list[float]:
    """pgml.predict(project, ROW(a, b, c, d)) per row of a table with columns of the given SQL types."""
    a, b, c, d = types.split(",")
    with psycopg.connect(pg.dsn(dbname=database), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS features; CREATE TABLE features (i int, a {a}, b {b}, c {c}, d {d})")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO features VALUES (%s, %s, %s, %s, %s)", list(zip(range(len(X)), *values, strict=True))
            )
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        rows = conn.execute(f"SELECT pgml.predict('{name}', ROW(a, b, c, d)) FROM features ORDER BY i").fetchall()
    return [float(r[0]) for r in rows]


def test_snapshot_columns_of_either_layout_replay_rows_as_postgresml(
    proxy: ProxyProcess, pg: Postgres, key: Path
) -> None:
    with scratch_database(pg, "pgmlcolumns") as database:
        schema.init(pg.dsn(dbname=database))
        with psycopg.connect(pg.dsn(dbname=database), autocommit=True) as conn:
            current = plant(conn, "xgboost_regression", columns_2_10())
            old = plant(conn, "linfa_svm_rbf", columns_2_0())
            conn.execute("INSERT INTO pgml.unsigned_artifacts SELECT model_id, path FROM pgml.files")
            before = conn.execute("SELECT id, columns FROM pgml.snapshots ORDER BY id").fetchall()
        result = command(pg, database, key)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            f"model {current} (project xgboost_regression, rust xgboost): converted: xgboost -> estimator.xgboost\n"
            in (result.stdout)
        )
        assert f"model {old} (project linfa_svm_rbf, rust svm): converted: linfa-svm -> estimator.skops; snapshot" in (
            result.stdout
        )
        with psycopg.connect(pg.dsn(dbname=database)) as conn:
            after = conn.execute("SELECT id, columns FROM pgml.snapshots ORDER BY id").fetchall()
        assert after[0] == before[0]  # PostgresML 2.10's columns: read as they are
        assert [c["name"] for c in after[1][1]] == ["x1", "x2", "x3", "x4", "y"]  # 2.0's: translated, by position

        imputed = [None, *X[1:, 3].tolist()]  # row 0's NULL: the training mean, its own value
        columns = [X[:, 0].tolist(), X[:, 1].astype(np.float64).tolist(), KEYS, imputed]
        rows = row_predictions(pg, proxy, database, "xgboost_regression", "real,float8,text,real", columns)
        assert_same("xgboost_regression", rows)
        assert_same("xgboost_regression", predictions(proxy, database, "xgboost_regression"))
        columns = [X[:, i].tolist() for i in range(4)]
        assert_same(
            "linfa_svm_rbf", row_predictions(pg, proxy, database, "linfa_svm_rbf", "real,real,float8,real", columns)
        )
        assert_same("linfa_svm_rbf", predictions(proxy, database, "linfa_svm_rbf"))


def test_only_postgresml_2_0_columns_are_translated() -> None:
    assert (
        postgresml_import.snapshot_columns(columns_2_10()) is None and postgresml_import.snapshot_columns(None) is None
    )
    with pytest.raises(EngineError, match="malformed snapshot column"):
        replay_rows(columns_2_0(), [X[0].tolist()])
    translated = postgresml_import.snapshot_columns(columns_2_0())
    assert translated is not None and [c["position"] for c in translated] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(replay_rows(translated, [X[0].tolist()]), X[:1])
    with pytest.raises(EngineError, match="none of PostgresML's layouts"):
        postgresml_import.snapshot_columns([{"name": "x"}])
