"""engine.ml.algorithms: the 45 algorithm names per task, rejections, hyperparameters, joint wrapping, runtimes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

from engine.api import InvalidArgument, NotSupported
from engine.ml.algorithms import (
    ALGORITHMS,
    JOINT_WRAPPED,
    TASKS,
    dashed_task,
    default_algorithm,
    default_runtime,
    estimator,
    normalize_task,
    resolve_runtime,
    supported_tasks,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
_DX, _DY = load_diabetes(return_X_y=True)
DIABETES_X, DIABETES_Y = _DX[:120], _DY[:120]
DATA: dict[str, tuple[Any, Any]] = {
    "regression": (DIABETES_X, DIABETES_Y),
    "classification": (IRIS_X, IRIS_Y),
    "clustering": (IRIS_X, None),
    "decomposition": (IRIS_X, None),
}
# Small models keep the whole sweep to a few seconds.
SMALL: dict[str, dict[str, Any]] = {
    "xgboost": {"n_estimators": 5},
    "xgboost_random_forest": {"n_estimators": 5},
    "lightgbm": {"n_estimators": 5},
    "catboost": {"iterations": 5},
    "random_forest": {"n_estimators": 5},
    "extra_trees": {"n_estimators": 5},
    "bagging": {"n_estimators": 3},
    "ada_boost": {"n_estimators": 5},
    "gradient_boosting_trees": {"n_estimators": 5},
    "hist_gradient_boosting": {"max_iter": 5},
}
SUPPORTED = [(name, task) for name in ALGORITHMS for task in sorted(supported_tasks(name))]
REJECTED = {
    "dbscan": "clustering",
    "optics": "clustering",
    "spectral": "clustering",
    "spectral_bi": "clustering",
    "spectral_co": "clustering",
    "feature_agglomeration": "clustering",
    "knn": "regression",
    "transformers": "classification",
    "lasso": "classification",
    "perceptron": "regression",
    "pca": "clustering",
    "kmeans": "regression",
    "agglomerative": "clustering",
}


def test_the_enum_has_45_algorithms_and_13_tasks() -> None:
    assert len(ALGORITHMS) == len(set(ALGORITHMS)) == 45
    assert len(TASKS) == 13
    trainable = {name for name, _ in SUPPORTED}
    assert set(ALGORITHMS) - trainable == {
        "dbscan",
        "knn",
        "transformers",
        "feature_agglomeration",
        "optics",
        "spectral",
        "spectral_bi",
        "spectral_co",
    }
    assert len(SUPPORTED) == 55  # 18 x both supervised tasks, 12 regression-only, perceptron, 5 clustering, pca


@pytest.mark.parametrize(("name", "task"), SUPPORTED, ids=[f"{n}-{t}" for n, t in SUPPORTED])
def test_every_supported_name_trains_and_predicts(name: str, task: str) -> None:
    x, y = DATA[task]
    model = estimator(name, task, SMALL.get(name, {}))
    if y is None:
        model.fit(x)
    else:
        model.fit(x, y)
    if task == "decomposition":
        assert model.transform(x).shape == (len(x), x.shape[1])
        return
    predicted = np.asarray(model.predict(x)).ravel()
    assert predicted.shape == (len(x),)
    if task == "classification":
        assert set(np.unique(predicted)) <= {0, 1, 2}
        assert np.mean(predicted == y) > 0.3


@pytest.mark.parametrize(("name", "task"), sorted(REJECTED.items()))
def test_rejected_combinations_are_not_supported(name: str, task: str) -> None:
    with pytest.raises(NotSupported) as info:
        estimator(name, task, {})
    assert info.value.message == f"{name} does not support {task}"
    assert info.value.sqlstate == "0A000"


def test_regression_only_and_classification_only_names() -> None:
    for name in ("lasso", "elastic_net", "least_angle", "ransac", "theil_sen", "quantile", "kernel_ridge"):
        assert supported_tasks(name) == {"regression"}
    assert supported_tasks("perceptron") == {"classification"}
    assert supported_tasks("gaussian_process") == {"regression", "classification"}


def test_classes_per_task() -> None:
    assert type(estimator("linear", "regression", {})).__name__ == "LinearRegression"
    assert type(estimator("linear", "classification", {})).__name__ == "LogisticRegression"
    assert type(estimator("gaussian_process", "classification", {})).__name__ == "GaussianProcessClassifier"
    assert type(estimator("xgboost_random_forest", "classification", {})).__name__ == "XGBRFClassifier"
    assert type(estimator("lightgbm", "regression", {})).__name__ == "LGBMRegressor"
    assert type(estimator("catboost", "classification", {})).__name__ == "CatBoostClassifier"
    assert type(estimator("automatic_relevance_determination", "regression", {})).__name__ == "ARDRegression"


def test_bad_names_and_tasks_are_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument, match=re.escape('pgml.algorithm: "nope"')):
        estimator("nope", "regression", {})
    with pytest.raises(InvalidArgument, match=re.escape('pgml.task: "forecasting"')):
        estimator("linear", "forecasting", {})
    with pytest.raises(NotSupported, match=r"pgml\.tune"):
        estimator("linear", "text-classification", {})
    with pytest.raises(InvalidArgument, match="JSON object"):
        estimator("linear", "regression", [])  # type: ignore[arg-type]


def test_task_spellings() -> None:
    assert normalize_task("text-classification") == "text_classification"
    assert normalize_task("Question-Answering") == "question_answering"
    assert normalize_task("cluster") == "clustering"
    assert normalize_task("text-pair-classification") == "text_pair_classification"
    assert dashed_task("text_generation") == "text-generation"
    assert dashed_task("regression") == "regression"
    assert type(estimator("ridge", "Regression", {})).__name__ == "Ridge"


def test_hyperparams_are_passed_through() -> None:
    assert (
        estimator("random_forest", "classification", {"n_estimators": 7, "max_depth": 3}).get_params()["max_depth"] == 3
    )
    assert estimator("svm", "classification", {"probability": True}).probability is True
    xgb = estimator("xgboost", "regression", {"eta": 0.5, "max_depth": 2, "lambda": 2.0})
    assert xgb.get_params()["eta"] == 0.5 and xgb.get_params()["lambda"] == 2.0
    assert estimator("xgboost", "regression", {"boost_rounds": 3}).n_estimators == 3  # xgboost-rs's name
    lgbm = estimator("lightgbm", "classification", {"num_iterations": 4, "num_leaves": 5})
    assert lgbm.get_params()["num_iterations"] == 4 and lgbm.num_leaves == 5
    assert estimator("catboost", "regression", {"depth": 3}).get_params()["depth"] == 3


def test_library_defaults_and_quiet_logging() -> None:
    assert estimator("xgboost", "regression", {}).n_estimators == 10  # default runtime rust: xgboost-rs's 10 rounds
    assert estimator("xgboost", "regression", {}, runtime="python").n_estimators is None  # the library's default
    assert estimator("xgboost", "regression", {"n_estimators": 50}).n_estimators == 50
    assert estimator("lightgbm", "regression", {}).get_params()["verbosity"] == -1
    assert estimator("lightgbm", "regression", {"verbose": 1}).get_params().get("verbosity") is None
    cat = estimator("catboost", "classification", {}).get_params()
    assert cat["verbose"] is False and cat["allow_writing_files"] is False
    cat = estimator("catboost", "classification", {"logging_level": "Silent"}).get_params()
    assert "verbose" not in cat and cat["logging_level"] == "Silent"


def test_unknown_hyperparams_are_rejected_by_name() -> None:
    with pytest.raises(InvalidArgument) as info:
        estimator("random_forest", "regression", {"n_trees": 3, "depth": 2, "max_depth": 2})
    assert info.value.message == "unknown hyperparameters for random_forest: depth, n_trees"
    assert info.value.sqlstate == "22023"
    for name in ("xgboost", "lightgbm", "catboost", "kmeans"):
        task = "clustering" if name == "kmeans" else "regression"
        with pytest.raises(InvalidArgument, match="not_a_parameter"):
            estimator(name, task, {"not_a_parameter": 1})
    with pytest.raises(InvalidArgument, match="bogus"):  # joint: checked against the inner estimator
        estimator("huber", "regression", {"bogus": 1}, joint=True)


def test_joint_wraps_the_listed_algorithms() -> None:
    for name in JOINT_WRAPPED:
        wrapped = estimator(name, "regression", SMALL.get(name, {}), joint=True)
        assert type(wrapped).__name__ == "MultiOutputRegressor"
    assert type(estimator("huber", "regression", {"epsilon": 2.0}, joint=True).estimator).__name__ == "HuberRegressor"
    assert estimator("huber", "regression", {"epsilon": 2.0}, joint=True).estimator.epsilon == 2.0
    for name in ("linear", "ridge", "random_forest", "xgboost", "kernel_ridge"):
        assert type(estimator(name, "regression", {}, joint=True)).__name__ != "MultiOutputRegressor"
    # Single-output only and not wrapped by PostgresML (which then fails): wrapped here.
    assert type(estimator("catboost", "regression", {}, joint=True)).__name__ == "MultiOutputRegressor"
    with pytest.raises(NotSupported, match="regression only"):
        estimator("linear", "classification", {}, joint=True)


@pytest.mark.parametrize("name", ["huber", "lightgbm", "catboost", "hist_gradient_boosting", "xgboost", "ridge"])
def test_joint_models_predict_every_target(name: str) -> None:
    y = np.column_stack([DIABETES_Y, DIABETES_X[:, 2] * 100])
    model = estimator(name, "regression", SMALL.get(name, {}), joint=True).fit(DIABETES_X, y)
    assert np.asarray(model.predict(DIABETES_X)).shape == (len(DIABETES_X), 2)


def test_default_algorithm() -> None:
    assert default_algorithm("regression") == "linear"
    assert default_algorithm("classification") == "linear"
    assert default_algorithm("clustering") == "kmeans"
    assert default_algorithm("decomposition") == "pca"


def test_default_and_checked_runtime() -> None:
    assert default_runtime("xgboost", "classification") == "rust"
    assert default_runtime("lightgbm", "regression") == "rust"
    assert default_runtime("linear", "regression") == "rust"
    assert default_runtime("linear", "classification") == "python"
    assert default_runtime("random_forest", "regression") == "python"
    assert default_runtime("kmeans", "clustering") == "python"
    assert default_runtime("xgboost", "regression", joint=True) == "python"
    assert resolve_runtime("svm", "regression", "rust") == "rust"
    assert resolve_runtime("svm", "regression", None) == "python"
    with pytest.raises(NotSupported, match="OpenAI"):
        resolve_runtime("linear", "regression", "openai")
    with pytest.raises(NotSupported, match="rust runtime"):
        resolve_runtime("random_forest", "regression", "rust")
    with pytest.raises(InvalidArgument):
        resolve_runtime("linear", "regression", "java")
