"""Classical ML through the proxy: load_dataset, train / train_joint, the predict family, deploy, the registry.

PostgresML's own example flows, run as a user would (psycopg through the proxy,
real PostgreSQL, real scikit-learn / xgboost / lightgbm / catboost), checking
the registry rows, metrics keys, result shapes and errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from tests.conftest import Postgres, ProxyProcess

pytestmark = pytest.mark.pg_matrix

REGRESSION_KEYS = {"r2", "mean_absolute_error", "mean_squared_error", "fit_time", "score_time"}
CLASSIFICATION_KEYS = {"f1", "precision", "recall", "accuracy", "mcc", "fit_time", "score_time"}


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="module")
def datasets(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        for name in ("iris", "diabetes", "breast_cancer", "digits", "linnerud", "wine"):
            c.execute("SELECT * FROM pgml.load_dataset(%s)", [name])


def one(conn: psycopg.Connection, sql: str, params: list[object] | None = None) -> tuple[object, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return tuple(row)


def model_row(conn: psycopg.Connection, project: str) -> dict[str, object]:
    cur = conn.execute(
        "SELECT m.* FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = %s"
        " ORDER BY m.id DESC LIMIT 1",
        [project],
    )
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return dict(zip([d.name for d in cur.description], row, strict=True))


# --------------------------------------------------------------------------- #
# load_dataset
# --------------------------------------------------------------------------- #


def test_load_dataset_shapes(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT * FROM pgml.load_dataset('iris')").fetchall() == [("pgml.iris", 150)]
    # Type record, as PostgreSQL types a TABLE(…) function in a SELECT list: psycopg reads it as a tuple of texts.
    assert one(conn, "SELECT pgml.load_dataset('wine', \"limit\" => 10)") == (("pgml.wine", "10"),)
    assert one(conn, "SELECT count(*) FROM pgml.wine") == (10,)
    assert conn.execute("SELECT * FROM pgml.load_dataset('digits')").fetchall() == [("pgml.digits", 1797)]
    assert one(conn, "SELECT array_dims(image), pg_typeof(target)::text FROM pgml.digits LIMIT 1") == (
        "[1:8][1:8]",
        "smallint",
    )
    conn.execute("SELECT * FROM pgml.load_dataset('breast_cancer')")
    assert one(conn, "SELECT count(*) FILTER (WHERE malignant), count(*) FROM pgml.breast_cancer") == (212, 569)


def test_load_dataset_unknown_source_offline(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.UndefinedObject, match="not available offline"):
        conn.execute("SELECT * FROM pgml.load_dataset('nobody/no-such-dataset')")


def test_load_dataset_local_csv(conn: psycopg.Connection, data_dir: Path) -> None:
    path = data_dir / "houses.csv"  # inside [engine] data_dirs: absolute, or relative to the first one
    path.write_text("rooms,area,price\n3,70.5,200000\n4,90.0,310000\n2,45.25,150000\n")
    for name in (str(path), "houses.csv"):
        kwargs = json.dumps({"data_files": name})
        rows = conn.execute("SELECT * FROM pgml.load_dataset('csv', kwargs => %s)", [kwargs]).fetchall()
        assert rows == [("csv", 3)]
    assert conn.execute('SELECT rooms, area, price FROM pgml."csv" ORDER BY rooms').fetchall() == [
        (2, 45.25, 150000),
        (3, 70.5, 200000),
        (4, 90.0, 310000),
    ]


# --------------------------------------------------------------------------- #
# PostgresML's example flows
# --------------------------------------------------------------------------- #


def test_regression_on_diabetes(conn: psycopg.Connection, datasets: None) -> None:
    got = conn.execute("SELECT * FROM pgml.train('Diabetes Progression', 'regression', 'pgml.diabetes', 'target')")
    assert [d.name for d in got.description or ()] == ["project", "task", "algorithm", "deployed"]
    assert got.fetchall() == [("Diabetes Progression", "regression", "linear", True)]
    model = model_row(conn, "Diabetes Progression")
    assert set(model["metrics"]) == REGRESSION_KEYS  # type: ignore[arg-type]
    assert model["num_features"] == 10 and model["status"] == "successful" and model["runtime"] == "rust"
    snapshot = one(conn, "SELECT relation_name, y_column_name, test_size, test_sampling::text, analysis"
                         " FROM pgml.snapshots WHERE id = %s", [model["snapshot_id"]])  # fmt: skip
    assert snapshot == ("pgml.diabetes", ["target"], 0.25, "stratified", {"samples": 442.0})
    (value,) = one(
        conn, "SELECT pgml.predict('Diabetes Progression', ARRAY[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87])"
    )
    assert isinstance(value, float) and 25 < value < 346
    rows = conn.execute(
        "SELECT target, pgml.predict('Diabetes Progression', ARRAY[age, sex, bmi, bp, s1, s2, s3, s4, s5, s6])"
        " FROM pgml.diabetes ORDER BY target LIMIT 3"
    ).fetchall()
    assert len(rows) == 3 and all(isinstance(p, float) for _, p in rows)
    deployed = "SELECT name, task::text, algorithm FROM pgml.deployed_models WHERE name = 'Diabetes Progression'"
    assert one(conn, deployed)[1:] == ("regression", "linear")


def test_binary_classification_on_breast_cancer(conn: psycopg.Connection, datasets: None) -> None:
    row = one(conn, "SELECT pgml.train('Breast Cancer Detection', 'classification', 'pgml.breast_cancer', 'malignant',"
                    " algorithm => 'xgboost')")  # fmt: skip
    assert row == (("Breast Cancer Detection", "classification", "xgboost", "t"),)  # a record, as PostgresML types it
    metrics = model_row(conn, "Breast Cancer Detection")["metrics"]
    assert set(metrics) == CLASSIFICATION_KEYS | {"roc_auc", "log_loss"}  # type: ignore[arg-type]
    assert metrics["f1"] > 0.85  # type: ignore[index]
    predictions = conn.execute(
        'SELECT malignant, pgml.predict(\'Breast Cancer Detection\', ARRAY["mean radius", "mean texture",'
        ' "mean perimeter", "mean area", "mean smoothness", "mean compactness", "mean concavity",'
        ' "mean concave points", "mean symmetry", "mean fractal dimension", "radius error", "texture error",'
        ' "perimeter error", "area error", "smoothness error", "compactness error", "concavity error",'
        ' "concave points error", "symmetry error", "fractal dimension error", "worst radius", "worst texture",'
        ' "worst perimeter", "worst area", "worst smoothness", "worst compactness", "worst concavity",'
        ' "worst concave points", "worst symmetry", "worst fractal dimension"]) FROM pgml.breast_cancer'
    ).fetchall()
    assert {p for _, p in predictions} <= {0.0, 1.0}
    accuracy = sum((p == 1.0) == m for m, p in predictions) / len(predictions)
    assert accuracy > 0.9


def test_multiclass_on_digits_with_image_arrays(conn: psycopg.Connection, datasets: None) -> None:
    conn.execute("SELECT * FROM pgml.train('Handwritten Digits', 'classification', 'pgml.digits', 'target',"
                 " algorithm => 'random_forest', hyperparams => '{\"n_estimators\": 25}')")  # fmt: skip
    model = model_row(conn, "Handwritten Digits")
    assert model["num_features"] == 64 and "roc_auc" not in model["metrics"]  # type: ignore[operator]
    rows = conn.execute(
        "SELECT target, pgml.predict('Handwritten Digits', image) FROM pgml.digits ORDER BY random() LIMIT 200"
    ).fetchall()
    assert sum(int(t) == p for t, p in rows) / len(rows) > 0.8
    proba = one(conn, "SELECT pgml.predict_proba('Handwritten Digits', image) FROM pgml.digits LIMIT 1")[0]
    assert isinstance(proba, list) and len(proba) == 10 and abs(sum(proba) - 1) < 1e-4


def test_iris_through_a_view_with_xgboost(conn: psycopg.Connection, datasets: None) -> None:
    conn.execute("CREATE OR REPLACE VIEW iris_view AS SELECT sepal_length, sepal_width, petal_length, petal_width,"
                 " target FROM pgml.iris")  # fmt: skip
    row = conn.execute("SELECT * FROM pgml.train('Iris Flower Types', 'classification', 'iris_view', 'target',"
                       " 'xgboost')").fetchall()  # fmt: skip
    assert row == [("Iris Flower Types", "classification", "xgboost", True)]
    model_id = model_row(conn, "Iris Flower Types")["id"]
    assert one(conn, "SELECT relation_name FROM pgml.snapshots s JOIN pgml.models m ON m.snapshot_id = s.id"
                     " WHERE m.id = %s", [model_id]) == ("public.iris_view",)  # fmt: skip
    assert one(conn, "SELECT pgml.predict('Iris Flower Types', ARRAY[5.1, 3.5, 1.4, 0.2])") == (0.0,)
    assert one(conn, "SELECT pgml.predict('Iris Flower Types', ARRAY[6.7, 3.0, 5.2, 2.3])") == (2.0,)


def test_joint_regression_on_linnerud(conn: psycopg.Connection, datasets: None) -> None:
    row = one(conn, "SELECT * FROM pgml.train_joint('Exercise vs Physiology', 'regression', 'pgml.linnerud',"
                    " ARRAY['weight', 'waist', 'pulse'], test_size => 5)")  # fmt: skip
    assert row == ("Exercise vs Physiology", "regression", "linear", True)
    assert model_row(conn, "Exercise vs Physiology")["num_features"] == 3
    values = one(conn, "SELECT pgml.predict_joint('Exercise vs Physiology', ARRAY[5, 162, 60])")[0]
    assert isinstance(values, list) and len(values) == 3
    with pytest.raises(errors.InvalidParameterValue, match="joint"):
        conn.execute("SELECT pgml.predict_joint('Iris Flower Types', ARRAY[1, 2, 3, 4])")


def test_clustering_and_decomposition_on_digit_vectors(conn: psycopg.Connection, datasets: None) -> None:
    conn.execute("CREATE OR REPLACE VIEW digit_vectors AS SELECT image::real[] AS image FROM pgml.digits")
    row = one(conn, "SELECT * FROM pgml.train('Handwritten Digit Clusters', 'clustering', 'digit_vectors',"
                    " hyperparams => '{\"n_clusters\": 10}')")  # fmt: skip
    assert row == ("Handwritten Digit Clusters", "clustering", "kmeans", True)
    assert set(model_row(conn, "Handwritten Digit Clusters")["metrics"]) >= {"silhouette"}  # type: ignore[arg-type]
    (cluster,) = one(conn, "SELECT pgml.predict('Handwritten Digit Clusters', image) FROM digit_vectors LIMIT 1")
    assert cluster in {float(i) for i in range(10)}
    row = one(conn, "SELECT * FROM pgml.train('Handwritten Digit Components', 'decomposition', 'digit_vectors',"
                    " hyperparams => '{\"n_components\": 3}')")  # fmt: skip
    assert row == ("Handwritten Digit Components", "decomposition", "pca", True)
    metrics = model_row(conn, "Handwritten Digit Components")["metrics"]
    assert 0 < metrics["cumulative_explained_variance"] < 1  # type: ignore[index]
    vector = one(conn, "SELECT pgml.decompose('Handwritten Digit Components', image) FROM digit_vectors LIMIT 1")[0]
    assert isinstance(vector, list) and len(vector) == 3
    first = one(conn, "SELECT pgml.predict('Handwritten Digit Components', image) FROM digit_vectors LIMIT 1")[0]
    assert first == pytest.approx(vector[0], rel=1e-5)


def test_grid_search(conn: psycopg.Connection, datasets: None) -> None:
    conn.execute("SELECT * FROM pgml.train('Iris Search', 'classification', 'pgml.iris', 'target', 'random_forest',"
                 " search => 'grid', search_params => '{\"n_estimators\": [5, 10], \"max_depth\": [2, 4]}',"
                 " search_args => '{\"cv\": 2}')")  # fmt: skip
    model = model_row(conn, "Iris Search")
    results = model["metrics"]["search_results"]  # type: ignore[index]
    assert len(results["params"]) == 4 and results["n_splits"] == 2
    assert {"mean_test_score", "split0_test_score", "split1_test_score", "param_n_estimators"} <= set(results)
    assert model["search"] == "grid" and set(model["hyperparams"]) == {"n_estimators", "max_depth"}  # type: ignore[arg-type]
    assert one(conn, "SELECT count(*) > 0 FROM pgml.logs WHERE model_id = %s", [model["id"]]) == (True,)


# --------------------------------------------------------------------------- #
# Deployments
# --------------------------------------------------------------------------- #


def test_deploy_strategies(conn: psycopg.Connection, datasets: None) -> None:
    project = "Wine Deploys"
    conn.execute("SELECT pgml.train(%s, 'classification', 'pgml.wine', 'target', 'random_forest',"
                 " hyperparams => '{\"n_estimators\": 5}')", [project])  # fmt: skip
    first = model_row(conn, project)["id"]
    conn.execute("SELECT pgml.train(%s, algorithm => 'linear', automatic_deploy => false)", [project])
    second = model_row(conn, project)["id"]

    def current() -> object:
        return one(conn, "SELECT id FROM pgml.deployed_models WHERE name = %s", [project])[0]

    assert current() == first
    assert conn.execute("SELECT * FROM pgml.deploy(%s, 'most_recent')", [project]).fetchall() == [
        (project, "most_recent", "linear")
    ]
    assert current() == second
    conn.execute("SELECT * FROM pgml.deploy(%s, 'rollback')", [project])
    assert current() == first
    conn.execute("SELECT * FROM pgml.deploy(%s, 'rollback')", [project])
    assert current() == second  # two rollbacks in a row oscillate
    conn.execute("SELECT * FROM pgml.deploy(%s, 'most_recent', 'random_forest')", [project])
    assert current() == first
    assert one(conn, "SELECT * FROM pgml.deploy(%s)", [second]) == (project, "specific", "linear")
    assert current() == second
    (best,) = one(conn, "SELECT m.id FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = %s"
                        " ORDER BY (m.metrics->>'f1')::float8 DESC, m.id DESC LIMIT 1", [project])  # fmt: skip
    conn.execute("SELECT * FROM pgml.deploy(%s, 'best_score')", [project])
    assert current() == best
    count = one(conn, "SELECT count(*) FROM pgml.deployments d JOIN pgml.projects p ON p.id = d.project_id"
                      " WHERE p.name = %s", [project])  # fmt: skip
    assert count == (7,)  # every deploy appends a row
    by_id = one(conn, "SELECT pgml.predict(%s::bigint, ARRAY[13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28,"
                      " 4.38, 1.05, 3.4, 1050])", [first])[0]  # fmt: skip
    assert by_id in (0.0, 1.0, 2.0)


def test_deploy_errors(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.UndefinedObject, match="Project named `nope` does not exist"):
        conn.execute("SELECT * FROM pgml.deploy('nope', 'best_score')")
    with pytest.raises(errors.InvalidParameterValue, match="invalid strategy"):
        conn.execute("SELECT * FROM pgml.deploy('nope', 'new_score')")
    with pytest.raises(errors.UndefinedObject, match="No deployed model exists for the project named: `nope`"):
        conn.execute("SELECT pgml.predict('nope', ARRAY[1, 2])")


# --------------------------------------------------------------------------- #
# Errors, transactions, privileges
# --------------------------------------------------------------------------- #


def test_training_errors(conn: psycopg.Connection, datasets: None) -> None:
    with pytest.raises(errors.UndefinedObject, match="To create a new project, you must specify a `task`"):
        conn.execute("SELECT pgml.train('Never Created')")
    with pytest.raises(errors.FeatureNotSupported, match="lasso does not support classification"):
        conn.execute("SELECT pgml.train('Bad Algo', 'classification', 'pgml.iris', 'target', 'lasso')")
    with pytest.raises(errors.InvalidParameterValue, match="Column `nope` not found"):
        conn.execute("SELECT pgml.train('Bad Label', 'classification', 'pgml.iris', 'nope')")
    with pytest.raises(errors.UndefinedObject, match="does not exist"):
        conn.execute("SELECT pgml.train('Bad Relation', 'regression', 'no_such_table', 'y')")
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT pgml.train('Bad Hyper', 'regression', 'pgml.diabetes', 'target',"
                     " hyperparams => '{\"no_such_param\": 1}')")  # fmt: skip
    assert one(conn, "SELECT count(*) FROM pgml.projects WHERE name LIKE 'Bad %' OR name = 'Never Created'") == (0,)
    with pytest.raises(errors.InvalidParameterValue, match="probabilities"):
        conn.execute("SELECT pgml.predict_proba('Diabetes Progression', ARRAY[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])")
    with pytest.raises(errors.InvalidParameterValue, match="expects 10 features, got 2"):
        conn.execute("SELECT pgml.predict('Diabetes Progression', ARRAY[1, 2])")


def test_train_in_transaction_rolls_back(proxy: ProxyProcess, datasets: None) -> None:
    with psycopg.connect(proxy.dsn()) as c:
        c.execute("CREATE TEMP TABLE mytmp AS SELECT * FROM pgml.iris")
        c.execute("UPDATE mytmp SET target = 0")  # uncommitted rows of a temp table: visible to training
        c.execute("INSERT INTO mytmp SELECT * FROM pgml.iris WHERE target > 0")
        assert one(c, "SELECT * FROM pgml.train('Tx Project', 'classification', 'mytmp', 'target')")[3] is True
        assert one(c, "SELECT count(*) FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
                      " WHERE p.name = 'Tx Project'") == (1,)  # fmt: skip
        c.rollback()
        assert one(c, "SELECT count(*) FROM pgml.projects WHERE name = 'Tx Project'") == (0,)


def test_training_needs_select_privilege(proxy: ProxyProcess, pg: Postgres, datasets: None) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS secret_iris")
        admin.execute("CREATE TABLE secret_iris AS SELECT * FROM pgml.iris")
        admin.execute("DROP ROLE IF EXISTS ml_user")
        admin.execute("CREATE ROLE ml_user LOGIN")
        admin.execute("GRANT USAGE ON SCHEMA pgml TO ml_user")
        admin.execute("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgml TO ml_user")
        admin.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgml TO ml_user")
    with psycopg.connect(proxy.dsn(user="ml_user"), autocommit=True) as c, pytest.raises(errors.InsufficientPrivilege):
        c.execute("SELECT * FROM pgml.train('Secret', 'classification', 'public.secret_iris', 'target')")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        assert one(admin, "SELECT count(*) FROM pgml.projects WHERE name = 'Secret'") == (0,)
        admin.execute("GRANT SELECT ON secret_iris TO ml_user")
    with psycopg.connect(proxy.dsn(user="ml_user"), autocommit=True) as c:
        assert one(c, "SELECT * FROM pgml.train('Secret', 'classification', 'public.secret_iris', 'target')")[3]


def test_per_row_predict_in_where_order_by_and_insert(conn: psycopg.Connection, datasets: None) -> None:
    conn.execute("SELECT * FROM pgml.train('Iris Rows', 'classification', 'pgml.iris', 'target', 'xgboost')")
    features = "ARRAY[sepal_length, sepal_width, petal_length, petal_width]"
    rows = conn.execute(f"SELECT target FROM pgml.iris WHERE pgml.predict('Iris Rows', {features}) = 2"
                        f" ORDER BY pgml.predict('Iris Rows', {features}), target").fetchall()  # fmt: skip
    assert len(rows) > 30 and sum(t == 2 for (t,) in rows) / len(rows) > 0.8
    conn.execute("DROP TABLE IF EXISTS iris_predictions")
    conn.execute("CREATE TABLE iris_predictions (target int, predicted real)")
    conn.execute(f"INSERT INTO iris_predictions SELECT target, pgml.predict('Iris Rows', {features}) FROM pgml.iris")
    assert one(conn, "SELECT count(*), count(predicted) FROM iris_predictions") == (150, 150)
    batch = conn.execute("SELECT pgml.predict_batch('Iris Rows', array_agg(x)) FROM (SELECT"
                         f" unnest({features}) AS x FROM (SELECT * FROM pgml.iris ORDER BY target LIMIT 3) s) t"
                         ).fetchall()  # fmt: skip
    assert len(batch) == 3


def test_preprocessing_with_text_column_and_row_predict(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS fruits")
    conn.execute("CREATE TABLE fruits (color text, weight real, sweet boolean, kind text)")
    rows = [("red", 150.0 + i % 7, True, "apple") for i in range(40)]
    rows += [("yellow", 120.0 + i % 5, True, "banana") for i in range(40)]
    rows += [("green", 60.0 + i % 3, False, "lime") for i in range(40)]
    rows += [(None, None, False, "lime")]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO fruits VALUES (%s, %s, %s, %s)", rows)
    preprocess = json.dumps({"color": {"encode": "one_hot"}, "weight": {"impute": "mean", "scale": "standard"}})
    conn.execute("SELECT * FROM pgml.train('Fruits', 'classification', 'fruits', 'kind', 'random_forest',"
                 " test_sampling => 'random', preprocess => %s)", [preprocess])  # fmt: skip
    columns = one(conn, "SELECT s.columns FROM pgml.snapshots s JOIN pgml.models m ON m.snapshot_id = s.id"
                        " ORDER BY m.id DESC LIMIT 1")[0]  # fmt: skip
    by_name = {c["name"]: c for c in columns}  # type: ignore[union-attr]
    assert by_name["color"]["preprocessor"]["encode"] == "one_hot" and by_name["kind"]["label"] is True
    # TEXT labels predict their category code: 1, 2, 3 in order of first appearance in the training scan.
    # (ROW(...) with literals: the row form has no server-side stub to describe $n parameters, see README.)
    literals = ("'red', 152.0, true", "'yellow', 121::real, true", "'green', 61, false")
    apple, banana, lime = (one(conn, f"SELECT pgml.predict('Fruits', ROW({r}))")[0] for r in literals)
    assert len({apple, banana, lime}) == 3 and {apple, banana, lime} <= {1.0, 2.0, 3.0}
    assert one(conn, "SELECT pgml.predict('Fruits', ROW('red', 152.0, true))") == (apple,)
    per_row = conn.execute("SELECT kind, pgml.predict('Fruits', (color, weight, sweet)) FROM fruits").fetchall()
    expected = {"apple": apple, "banana": banana, "lime": lime}
    assert sum(expected[k] == p for k, p in per_row) / len(per_row) > 0.95
    with pytest.raises(errors.InvalidParameterValue, match="expected 3 values"):
        conn.execute("SELECT pgml.predict('Fruits', ROW('red', 1.0))")


BOTH = [
    "linear", "ridge", "svm", "nu_svm", "linear_svm", "stochastic_gradient_descent", "passive_aggressive", "ada_boost",
    "bagging", "extra_trees", "random_forest", "gradient_boosting_trees", "hist_gradient_boosting", "xgboost",
    "xgboost_random_forest", "lightgbm", "catboost", "gaussian_process",
]  # fmt: skip
REGRESSION_ONLY = [
    "lasso", "elastic_net", "least_angle", "lasso_least_angle", "orthogonal_matching_pursuit", "bayesian_ridge",
    "automatic_relevance_determination", "ransac", "theil_sen", "huber", "quantile", "kernel_ridge",
]  # fmt: skip
CLUSTERING = ["affinity_propagation", "birch", "kmeans", "mini_batch_kmeans", "mean_shift"]
REJECTED = {
    ("lasso", "classification"), ("perceptron", "regression"), ("dbscan", "clustering"), ("optics", "clustering"),
    ("spectral", "clustering"), ("feature_agglomeration", "clustering"), ("knn", "classification"),
    ("transformers", "regression"), ("pca", "classification"), ("kmeans", "regression"),
}  # fmt: skip
SMALL = {"catboost": '{"iterations": 20}', "xgboost": '{"n_estimators": 5}', "lightgbm": '{"n_estimators": 5}'}
CASES = (
    [(a, "regression") for a in BOTH + REGRESSION_ONLY]
    + [(a, "classification") for a in [*BOTH, "perceptron"]]
    + [(a, "clustering") for a in CLUSTERING]
    + [("pca", "decomposition")]
)


@pytest.fixture(scope="module")
def small_tables(proxy: ProxyProcess, datasets: None) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute("CREATE OR REPLACE VIEW small_diabetes AS SELECT * FROM pgml.diabetes LIMIT 120")
        c.execute("CREATE OR REPLACE VIEW iris_features AS"
                  " SELECT sepal_length, sepal_width, petal_length, petal_width FROM pgml.iris")  # fmt: skip


@pytest.mark.parametrize(("algorithm", "task"), CASES)
def test_every_algorithm_trains(conn: psycopg.Connection, small_tables: None, algorithm: str, task: str) -> None:
    relation, label = {"regression": ("small_diabetes", "target"), "classification": ("pgml.iris", "target")}.get(
        task, ("iris_features", None)
    )
    project = f"every {algorithm} {task}"
    row = one(conn, "SELECT * FROM pgml.train(%s, %s, %s, %s, %s, hyperparams => %s)",
              [project, task, relation, label, algorithm, SMALL.get(algorithm, "{}")])  # fmt: skip
    assert row[:3] == (project, task, algorithm)
    features = "ARRAY[age, sex, bmi, bp, s1, s2, s3, s4, s5, s6]" if task == "regression" else (
        "ARRAY[sepal_length, sepal_width, petal_length, petal_width]")  # fmt: skip
    source = "pgml.diabetes" if task == "regression" else "pgml.iris"
    predictions = conn.execute(f"SELECT pgml.predict(%s, {features}) FROM {source} LIMIT 5", [project]).fetchall()
    assert len(predictions) == 5 and all(isinstance(p, float) for (p,) in predictions)


@pytest.mark.parametrize(("algorithm", "task"), sorted(REJECTED))
def test_rejected_algorithms(conn: psycopg.Connection, small_tables: None, algorithm: str, task: str) -> None:
    relation = {"regression": "small_diabetes", "classification": "pgml.iris"}.get(task, "iris_features")
    with pytest.raises(errors.FeatureNotSupported):
        conn.execute("SELECT * FROM pgml.train(%s, %s, %s, 'target', %s)", [f"rej {algorithm} {task}", task,
                     relation, algorithm])  # fmt: skip


def test_train_with_bound_parameters_and_materialized_snapshot(proxy: ProxyProcess, datasets: None) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        row = one(c, "SELECT * FROM pgml.train(%s, %s, %s, %s, algorithm => %s, materialize_snapshot => %s,"
                     " test_size => %s, test_sampling => 'last')",
                  ["Params Project", "regression", "pgml.diabetes", "target", "ridge", True, 42])  # fmt: skip
        assert row == ("Params Project", "regression", "ridge", True)
        snapshot_id, materialized, test_size = one(
            c, "SELECT s.id, s.materialized, s.test_size FROM pgml.snapshots s JOIN pgml.models m"
               " ON m.snapshot_id = s.id JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = 'Params Project'"
        )  # fmt: skip
        assert materialized is True and test_size == 42
        assert one(c, f"SELECT count(*) FROM pgml.snapshot_{snapshot_id}") == (442,)
        features = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]
        value = one(c, "SELECT pgml.predict(%s, %s::real[])", ["Params Project", features])[0]
        assert isinstance(value, float)
        # a retrain without relation_name reuses the project's snapshot
        assert one(c, "SELECT * FROM pgml.train('Params Project', algorithm => 'lasso')")[2] == "lasso"
        assert one(c, "SELECT count(DISTINCT m.snapshot_id) FROM pgml.models m JOIN pgml.projects p"
                      " ON p.id = m.project_id WHERE p.name = 'Params Project'") == (1,)  # fmt: skip


def test_worse_model_is_not_deployed_and_warns(conn: psycopg.Connection, datasets: None) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(f"{diag.severity}: {diag.message_primary}"))
    conn.execute("SELECT * FROM pgml.train('Warn Project', 'regression', 'pgml.diabetes', 'target',"
                 " test_sampling => 'last')")  # fmt: skip
    row = one(conn, "SELECT * FROM pgml.train('Warn Project', algorithm => 'ridge', hyperparams => '{\"alpha\": 1e9}')")
    assert row == ("Warn Project", "regression", "ridge", False)
    assert any(n.startswith("WARNING: New model's r2 is not better than current model.") for n in notices), notices
    assert one(conn, "SELECT algorithm FROM pgml.deployed_models WHERE name = 'Warn Project'") == ("linear",)


def test_snapshot_function(conn: psycopg.Connection, datasets: None) -> None:
    cur = conn.execute("SELECT * FROM pgml.snapshot('pgml.iris', 'target', test_size => 0.2)")
    assert [d.name for d in cur.description or ()] == ["relation", "y_column_name"]
    assert cur.fetchall() == [("pgml.iris", "target")]
    snapshot_id, materialized, y = one(conn, "SELECT id, materialized, y_column_name FROM pgml.snapshots"
                                             " ORDER BY id DESC LIMIT 1")  # fmt: skip
    assert materialized is True and y == ["target"]
    assert one(conn, f"SELECT count(*) FROM pgml.snapshot_{snapshot_id}") == (150,)
