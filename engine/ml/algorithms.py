"""The classical-ML algorithm table behind ``pgml.train``: names, tasks, runtimes, estimators.

Owns: the ``pgml.task`` and ``pgml.algorithm`` enums (labels, dash/underscore
spellings), which of the 45 algorithm names PostgresML maps to which
scikit-learn / XGBoost / LightGBM / CatBoost class per task (its Python-runtime
table), the names it rejects per task, ``train_joint``'s MultiOutputRegressor
wrapping, hyperparameter-name checking, library defaults PostgresML sets, the
default algorithm of a task and the runtime PostgresML would record.

Must not: fit, score or serialise anything (``engine.ml.metrics`` and
``engine.ml.artifacts`` do), nor import an ML library at import time: classes are
imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from engine.api import InvalidArgument, NotSupported

# --------------------------------------------------------------------------- #
# Enums
# --------------------------------------------------------------------------- #

TASKS: tuple[str, ...] = (
    "regression",
    "classification",
    "decomposition",
    "clustering",
    "question_answering",
    "summarization",
    "translation",
    "text_classification",
    "text_generation",
    "text2text",
    "embedding",
    "text_pair_classification",
    "conversation",
)
CLASSICAL_TASKS = frozenset({"regression", "classification", "clustering", "decomposition"})
SUPERVISED_TASKS = frozenset({"regression", "classification"})
# Labels older PostgresML versions used (upgraded databases still carry them).
_TASK_ALIASES = {"cluster": "clustering"}

ALGORITHMS: tuple[str, ...] = (
    "linear",
    "xgboost",
    "xgboost_random_forest",
    "svm",
    "lasso",
    "elastic_net",
    "ridge",
    "kmeans",
    "dbscan",
    "knn",
    "random_forest",
    "least_angle",
    "lasso_least_angle",
    "orthogonal_matching_pursuit",
    "bayesian_ridge",
    "automatic_relevance_determination",
    "stochastic_gradient_descent",
    "perceptron",
    "passive_aggressive",
    "ransac",
    "theil_sen",
    "huber",
    "quantile",
    "kernel_ridge",
    "gaussian_process",
    "nu_svm",
    "ada_boost",
    "bagging",
    "extra_trees",
    "gradient_boosting_trees",
    "hist_gradient_boosting",
    "linear_svm",
    "lightgbm",
    "transformers",
    "affinity_propagation",
    "birch",
    "feature_agglomeration",
    "mini_batch_kmeans",
    "mean_shift",
    "optics",
    "spectral",
    "spectral_bi",
    "spectral_co",
    "catboost",
    "pca",
)
# In the enum of databases upgraded from old versions, never trainable.
LEGACY_ALGORITHMS = frozenset({"agglomerative"})
RUNTIMES = ("python", "rust", "openai")


def normalize_task(task: str) -> str:
    """The ``pgml.task`` label for a spelling (``text-classification`` → ``text_classification``)."""
    label = task.strip().lower().replace("-", "_")
    label = _TASK_ALIASES.get(label, label)
    if label not in TASKS:
        raise InvalidArgument(f'invalid input value for enum pgml.task: "{task}"')
    return label


def dashed_task(task: str) -> str:
    """The spelling ``pgml.train`` returns (``question-answering``); classical labels have no dash."""
    return normalize_task(task).replace("_", "-")


def normalize_algorithm(algorithm: str) -> str:
    name = algorithm.strip().lower()
    if name not in ALGORITHMS and name not in LEGACY_ALGORITHMS:
        raise InvalidArgument(f'invalid input value for enum pgml.algorithm: "{algorithm}"')
    return name


# --------------------------------------------------------------------------- #
# The Python-runtime table (pgml-extension/src/bindings/sklearn/sklearn.py)
# --------------------------------------------------------------------------- #

_LM = "sklearn.linear_model"
_SVM = "sklearn.svm"
_ENS = "sklearn.ensemble"
_CL = "sklearn.cluster"


def _rc(module: str, regressor: str, classifier: str) -> dict[str, str]:
    return {"regression": f"{module}:{regressor}", "classification": f"{module}:{classifier}"}


def _ens(name: str) -> dict[str, str]:
    return _rc(_ENS, f"{name}Regressor", f"{name}Classifier")


# algorithm -> task -> "module:Class". A name absent for a task is rejected for it.
_CLASSES: dict[str, dict[str, str]] = {
    "linear": _rc(_LM, "LinearRegression", "LogisticRegression"),
    "ridge": _rc(_LM, "Ridge", "RidgeClassifier"),
    "svm": _rc(_SVM, "SVR", "SVC"),
    "nu_svm": _rc(_SVM, "NuSVR", "NuSVC"),
    "linear_svm": _rc(_SVM, "LinearSVR", "LinearSVC"),
    "stochastic_gradient_descent": _rc(_LM, "SGDRegressor", "SGDClassifier"),
    "passive_aggressive": _rc(_LM, "PassiveAggressiveRegressor", "PassiveAggressiveClassifier"),
    "ada_boost": _ens("AdaBoost"),
    "bagging": _ens("Bagging"),
    "extra_trees": _ens("ExtraTrees"),
    "random_forest": _ens("RandomForest"),
    "gradient_boosting_trees": _ens("GradientBoosting"),
    "hist_gradient_boosting": _ens("HistGradientBoosting"),
    "xgboost": _rc("xgboost", "XGBRegressor", "XGBClassifier"),
    "xgboost_random_forest": _rc("xgboost", "XGBRFRegressor", "XGBRFClassifier"),
    "lightgbm": _rc("lightgbm", "LGBMRegressor", "LGBMClassifier"),
    "catboost": _rc("catboost", "CatBoostRegressor", "CatBoostClassifier"),
    # PostgresML maps classification to the key "gaussian_process", which its Python
    # table lacks (the entry is "gaussian_process_classification"), so training fails
    # there with a KeyError. We build the GaussianProcessClassifier it meant.
    "gaussian_process": _rc("sklearn.gaussian_process", "GaussianProcessRegressor", "GaussianProcessClassifier"),
    "lasso": {"regression": f"{_LM}:Lasso"},
    "elastic_net": {"regression": f"{_LM}:ElasticNet"},
    "least_angle": {"regression": f"{_LM}:Lars"},
    "lasso_least_angle": {"regression": f"{_LM}:LassoLars"},
    "orthogonal_matching_pursuit": {"regression": f"{_LM}:OrthogonalMatchingPursuit"},
    "bayesian_ridge": {"regression": f"{_LM}:BayesianRidge"},
    "automatic_relevance_determination": {"regression": f"{_LM}:ARDRegression"},
    "ransac": {"regression": f"{_LM}:RANSACRegressor"},
    "theil_sen": {"regression": f"{_LM}:TheilSenRegressor"},
    "huber": {"regression": f"{_LM}:HuberRegressor"},
    "quantile": {"regression": f"{_LM}:QuantileRegressor"},
    "kernel_ridge": {"regression": "sklearn.kernel_ridge:KernelRidge"},
    "perceptron": {"classification": f"{_LM}:Perceptron"},
    "affinity_propagation": {"clustering": f"{_CL}:AffinityPropagation"},
    "birch": {"clustering": f"{_CL}:Birch"},
    "kmeans": {"clustering": f"{_CL}:KMeans"},
    "mini_batch_kmeans": {"clustering": f"{_CL}:MiniBatchKMeans"},
    "mean_shift": {"clustering": f"{_CL}:MeanShift"},
    "pca": {"decomposition": "sklearn.decomposition:PCA"},
    # dbscan, optics, spectral, spectral_bi, spectral_co, feature_agglomeration, knn,
    # transformers: in the enum, rejected for every classical task.
}

# train_joint wraps these (as PostgresML does) in MultiOutputRegressor.
JOINT_WRAPPED = frozenset(
    {
        "bayesian_ridge",
        "automatic_relevance_determination",
        "stochastic_gradient_descent",
        "passive_aggressive",
        "theil_sen",
        "huber",
        "quantile",
        "svm",
        "nu_svm",
        "linear_svm",
        "ada_boost",
        "gradient_boosting_trees",
        "lightgbm",
    }
)
# Single-output only, not wrapped by PostgresML (so train_joint fails there): we wrap them too.
_JOINT_ALSO_WRAPPED = frozenset({"hist_gradient_boosting", "catboost"})

# Algorithms PostgresML can train in its Rust runtime (regression/classification only).
RUST_ALGORITHMS = frozenset({"xgboost", "lightgbm", "linear", "svm"})
# xgboost-rs trains 10 boosting rounds unless told otherwise (TrainingParameters' default),
# and PostgresML's default runtime for xgboost is rust: this is what a plain train gets.
RUST_XGBOOST_ROUNDS = 10


def supported_tasks(algorithm: str) -> frozenset[str]:
    """The classical tasks PostgresML trains ``algorithm`` for (empty: rejected everywhere)."""
    return frozenset(_CLASSES.get(normalize_algorithm(algorithm), {}))


def estimator_paths() -> frozenset[str]:
    """Every estimator class the table can produce, as ``module:Class`` (the skops allow-list is built from it)."""
    return frozenset(path for tasks in _CLASSES.values() for path in tasks.values())


def default_algorithm(task: str) -> str:
    """The algorithm a default ``train`` uses: ``linear``, which becomes kmeans / pca."""
    return {"clustering": "kmeans", "decomposition": "pca"}.get(normalize_task(task), "linear")


def default_runtime(algorithm: str, task: str, joint: bool = False) -> str:
    """The runtime PostgresML records when ``runtime`` is NULL (we always run Python)."""
    if joint:
        return "python"
    match (normalize_algorithm(algorithm), normalize_task(task)):
        case ("xgboost" | "lightgbm", _):
            return "rust"
        case ("linear", "regression"):
            return "rust"
        case _:
            return "python"


def resolve_runtime(algorithm: str, task: str, runtime: str | None, joint: bool = False) -> str:
    """``runtime`` checked as PostgresML would, or the default when None."""
    if runtime is None:
        return default_runtime(algorithm, task, joint)
    if runtime not in RUNTIMES:
        raise InvalidArgument(f'invalid input value for enum pgml.runtime: "{runtime}"')
    if runtime == "openai":
        raise NotSupported("OpenAI runtime is not supported for training or inference")
    if runtime == "rust":
        if joint:
            raise NotSupported("Joint regression is only supported in the python runtime")
        if normalize_task(task) not in SUPERVISED_TASKS or normalize_algorithm(algorithm) not in RUST_ALGORITHMS:
            raise NotSupported(f"{algorithm} is not available in the rust runtime for {task}")
    return runtime


# --------------------------------------------------------------------------- #
# Estimators
# --------------------------------------------------------------------------- #


def estimator(
    algorithm: str,
    task: str,
    hyperparams: dict[str, Any],
    *,
    joint: bool = False,
    runtime: str | None = None,
) -> Any:
    """An unfitted estimator for ``algorithm`` on ``task`` built with ``hyperparams``.

    ``joint`` (``train_joint``: regression with several y columns) wraps the
    single-output algorithms in MultiOutputRegressor; hyperparameters go to the
    inner estimator. ``runtime`` (default: what PostgresML would pick) only
    changes defaults PostgresML's Rust runtime has (xgboost's 10 rounds).
    """
    name, label = normalize_algorithm(algorithm), normalize_task(task)
    if label not in CLASSICAL_TASKS:
        raise NotSupported(f"use pgml.tune for transformers tasks (task {label})")
    path = _CLASSES.get(name, {}).get(label)
    if path is None:
        raise NotSupported(f"{name} does not support {label}")
    if joint and label != "regression":
        raise NotSupported(f"train_joint supports regression only, not {label}")
    if not isinstance(hyperparams, dict):
        raise InvalidArgument(f"hyperparams must be a JSON object, not {type(hyperparams).__name__}")
    cls = _import(path)
    params = _with_defaults(name, cls, dict(hyperparams), resolve_runtime(name, label, runtime, joint))
    _check_names(name, cls, params)
    instance = cls(**params)
    if joint and (name in JOINT_WRAPPED or name in _JOINT_ALSO_WRAPPED):
        return _import("sklearn.multioutput:MultiOutputRegressor")(instance)
    return instance


def _import(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _with_defaults(name: str, cls: Any, params: dict[str, Any], runtime: str) -> dict[str, Any]:
    """Library defaults PostgresML sets, plus quiet logging; the user's values win."""
    match name:
        case "xgboost" | "xgboost_random_forest":
            if "boost_rounds" in params:  # xgboost-rs's name for n_estimators
                params.setdefault("n_estimators", params.pop("boost_rounds"))
            if name == "xgboost" and runtime == "rust":
                params.setdefault("n_estimators", RUST_XGBOOST_ROUNDS)
        case "lightgbm":
            if not {"verbose", "verbosity"} & params.keys():
                params["verbosity"] = -1
        case "catboost":
            if not {"verbose", "logging_level", "silent", "verbose_eval"} & params.keys():
                params["verbose"] = False
            params["allow_writing_files"] = False  # never write catboost_info/ into the server's cwd
    return params


# Booster parameters (and xgboost-rs aliases) XGBModel passes through **kwargs.
_XGBOOST_NATIVE = frozenset(
    {
        "eta",
        "gamma",
        "min_split_loss",
        "lambda",
        "alpha",
        "nthread",
        "seed",
        "sketch_eps",
        "updater",
        "refresh_leaf",
        "process_type",
        "predictor",
        "rate_drop",
        "one_drop",
        "skip_drop",
        "sample_type",
        "normalize_type",
        "tweedie_variance_power",
        "huber_slope",
        "quantile_alpha",
        "aft_loss_distribution",
        "aft_loss_distribution_scale",
        "feature_selector",
        "top_k",
        "lambdarank_pair_method",
        "lambdarank_num_pair_per_sample",
        "disable_default_eval_metric",
    }
)


def _known_names(name: str, cls: Any) -> set[str]:
    names = {p for p in inspect.signature(cls.__init__).parameters if p not in {"self", "args", "kwargs"}}
    names |= set(cls().get_params(deep=False)) if name != "catboost" else set()
    if name.startswith("xgboost"):
        names |= _XGBOOST_NATIVE
    elif name == "lightgbm":
        names |= _lightgbm_names()
    return names


@functools.cache
def _lightgbm_names() -> frozenset[str]:
    """Every LightGBM parameter and alias (LGBMModel passes unknown keywords to the booster)."""
    try:
        aliases: dict[str, list[str]] = importlib.import_module(
            "lightgbm.basic"
        )._ConfigAliases._get_all_param_aliases()
    except AttributeError:  # a private API: without it, only the constructor's names are accepted
        return frozenset()
    return frozenset(alias for group in aliases.values() for alias in group) | frozenset(aliases)


def _check_names(name: str, cls: Any, params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - _known_names(name, cls))
    if unknown:
        raise InvalidArgument(
            f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} for {name}: {', '.join(unknown)}",
            hint=f"See the parameters of {cls.__module__.split('.')[0]}'s {cls.__name__}.",
        )
