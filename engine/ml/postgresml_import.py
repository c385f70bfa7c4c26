"""Models trained by PostgresML (``pgml.files`` ``estimator.rmp``), rebuilt as the estimators this project stores.

Owns: recognising what PostgresML 2.x wrote into ``estimator.rmp`` and rebuilding it as a
fitted estimator that ``engine.ml.artifacts`` stores and wraps, with the same predictions
(PostgresML's source, ``pgml-extension/src/bindings``, is the reference for every layout):

* Rust runtime, ``xgboost``: ``Booster::save`` to a ``.bin`` file, i.e. XGBoost's binary
  layout (read by ``engine.ml.xgboost_legacy``; JSON/UBJSON boosters load as they are);
  PostgresML 2.0.0 put 16 bytes before it (num_features, num_classes: u64 big-endian).
  Rebuilt as ``XGBRegressor``/``XGBClassifier`` (classification used ``multi:softprob``,
  whose argmax is the class index PostgresML predicts).
* Rust runtime, ``lightgbm``: the booster's model text (also 16-byte-prefixed in 2.0.0).
* Rust runtime, ``linear``: linfa's ``FittedLinearRegression`` (regression) or
  ``FittedLogisticRegression`` / ``MultiFittedLogisticRegression`` (classification) in
  rmp-serde MessagePack (structs as arrays, or maps when written with names), rebuilt as
  scikit-learn ``LinearRegression`` / ``LogisticRegression`` with the same coefficients.
* Rust runtime, ``svm``: linfa-svm's ``Svm<f32, f32>`` (postgresml/linfa ``9d615fc``), for
  regression and classification alike, so PostgresML predicts ``weighted_sum(x) - rho`` (the
  raw value, no threshold). Rebuilt as a fitted scikit-learn ``SVR`` with the same kernel
  (``Gaussian(eps)``: rbf with gamma ``1/eps``; ``Polynomial(c, d)``: poly with gamma 1, coef0
  ``c``, degree ``d``; ``Linear``: the stored hyperplane as its one support vector), support
  vectors, dual coefficients (the alphas linfa counts: ``|alpha| > 100 * f32::EPSILON``) and
  intercept ``-rho``. libsvm sums in f64 where linfa sums in f32: equal within f32 rounding.
* Python runtime: a pickled scikit-learn estimator, unpickled only with ``trust_pickle``.

And the snapshot ``columns`` that ``predict(project, ROW(…))`` replays (:func:`snapshot_columns`):
PostgresML 2.2 and later write the shape ``engine.ml.snapshot`` reads (``orm/snapshot.rs`` Column with
its Preprocessor and Statistics) and are kept as they are; 2.0 and 2.1 wrote only name, pg_type,
nullable, label, position and size (no preprocessing existed), translated to that shape with the
defaults PostgresML applied (native, no impute, no scale), in position order.

Must not: unpickle anything unless its caller passes ``trust_pickle`` (only the
administrator's ``pgml-proxy import-postgresml --trust-pickle`` does), touch the database,
or serialize (``engine.ml.artifacts`` does; the caller signs). ML libraries are imported
when a model is rebuilt, not at import time.
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from engine.api import EngineError, NotSupported, UntrustedArtifact
from engine.ml import xgboost_legacy
from engine.ml.snapshot import Snapshot

PATH = "estimator.rmp"  # PostgresML's one file per classical model
PREFIX = 16  # PostgresML 2.0.0: num_features and num_classes (u64 big-endian) before the booster
KINDS = ("pickle", "xgboost", "lightgbm", "linfa-linear", "linfa-logistic", "linfa-svm")
_PICKLE_HINT = (
    "An administrator who trusts this database can convert it with `pgml-proxy import-postgresml --trust-pickle`."
)


@dataclass(frozen=True)
class Imported:
    """What PostgresML stored (one of :data:`KINDS`) and the estimator rebuilt from it."""

    kind: str
    estimator: Any


def detect(data: bytes, algorithm: str | None = None, runtime: str | None = None) -> str:
    """The kind of artifact: from the model row's runtime and algorithm when known, else from the bytes."""
    if runtime == "python" or (runtime is None and data[:1] == b"\x80"):  # pickle protocol 2 and later
        return "pickle"
    if algorithm in ("xgboost", "lightgbm"):
        return algorithm
    if algorithm in ("linear", "svm") or data[:1] in (b"\x92", b"\x94", b"\x82", b"\x84"):  # linfa: fixarray/fixmap
        return _linfa_kind(_unpack(data))
    return "lightgbm" if _lightgbm_text(data) is not None else "xgboost"


def rebuild(data: bytes, task: str = "", algorithm: str | None = None, runtime: str | None = None,
            trust_pickle: bool = False) -> Imported:  # fmt: skip
    """The estimator in a PostgresML artifact (``task`` empty: told by the booster's objective).

    UntrustedArtifact for a pickle without ``trust_pickle``, NotSupported for a linfa SVM whose
    polynomial degree is not a whole number, EngineError for bytes that are none of PostgresML's layouts.
    """
    data = bytes(data)
    kind = detect(data, algorithm, runtime)
    try:
        match kind:
            case "pickle":
                if not trust_pickle:
                    raise UntrustedArtifact(
                        "the model is a pickled scikit-learn estimator (PostgresML's Python runtime);"
                        " pickles are never loaded implicitly",
                        hint=_PICKLE_HINT,
                    )
                estimator = pickle.loads(data)  # only with the administrator's --trust-pickle
            case "xgboost":
                estimator = _xgboost(data, task)
            case "lightgbm":
                estimator = _lightgbm(data, task)
            case _:
                estimator = _linfa(_unpack(data), kind)
    except EngineError:
        raise
    except Exception as exc:  # the libraries' and the parsers' errors: damaged or foreign bytes
        raise EngineError(f"cannot read the PostgresML {kind} model: {exc}") from exc
    return Imported(kind, estimator)


# PostgresML 2.0's Column (orm/snapshot.rs at f50dc012): all there was before preprocessing (#470, 2.2.0).
_V2_0_COLUMN = frozenset({"name", "pg_type", "nullable", "label", "position", "size"})
_NO_STATISTICS = {
    **dict.fromkeys(("min", "max", "max_abs", "mean", "median", "mode", "variance", "std_dev")),  # NaN: null
    "missing": 0, "distinct": 0, "histogram": [0] * 20, "ventiles": [None] * 19, "categories": None,
}  # fmt: skip


def snapshot_columns(columns: Any) -> list[dict[str, Any]] | None:
    """The snapshot's ``columns`` as this project reads them, or None when they already are (or absent)."""
    if columns is None:
        return None
    if isinstance(columns, list) and columns and all(isinstance(c, dict) and set(c) == _V2_0_COLUMN for c in columns):
        translated = [
            {
                **column,
                "array": str(column["pg_type"]).endswith("[]"),
                "preprocessor": {"encode": "native", "impute": "error", "scale": "preserve"},
                "statistics": dict(_NO_STATISTICS),
            }
            for column in sorted(columns, key=lambda c: int(c["position"]))
        ]
        Snapshot.from_json(translated)
        return translated
    try:
        Snapshot.from_json(columns)
    except EngineError as exc:
        raise EngineError(f"the snapshot's columns are none of PostgresML's layouts: {exc.message}") from None
    return None


# --------------------------------------------------------------------------- #
# XGBoost and LightGBM
# --------------------------------------------------------------------------- #


def _xgboost(data: bytes, task: str) -> Any:
    xgboost = importlib.import_module("xgboost")
    errors = []
    for candidate in (data, data[PREFIX:]):  # PostgresML 2.0.0 wrote 16 bytes before the booster
        try:
            raw = bytearray(xgboost_legacy.to_json(candidate) if xgboost_legacy.is_legacy(candidate) else candidate)
            booster = xgboost.Booster()
            booster.load_model(raw)
        except (ValueError, UnicodeDecodeError, xgboost.core.XGBoostError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        objective = str(json.loads(booster.save_config())["learner"]["objective"]["name"])
        classifier = task == "classification" or (not task and objective.startswith(("multi:", "binary:")))
        model = xgboost.XGBClassifier() if classifier else xgboost.XGBRegressor()
        model.load_model(raw)
        return model
    raise EngineError(f"not an XGBoost booster PostgresML writes ({'; '.join(errors)})")


def _lightgbm_text(data: bytes) -> bytes | None:
    for candidate in (data, data[PREFIX:]):
        if candidate.startswith(b"tree\n"):
            return candidate
    return None


def _lightgbm(data: bytes, task: str) -> Any:
    text = _lightgbm_text(data)
    if text is None:
        raise EngineError("not a LightGBM model text (it starts with `tree`)")
    lightgbm = importlib.import_module("lightgbm")
    booster = lightgbm.Booster(model_str=text.decode())
    # The fitted state of the scikit-learn wrapper around that booster (what LGBMModel.fit sets).
    objective = re.search(rb"^objective=(\w+)", text, re.MULTILINE)
    classifier = task == "classification" or (
        not task and objective is not None and objective[1] in (b"binary", b"multiclass", b"multiclassova")
    )
    model = lightgbm.LGBMClassifier() if classifier else lightgbm.LGBMRegressor()
    model._Booster, model.fitted_, model._n_features = booster, True, booster.num_feature()
    if classifier:
        n_classes = max(2, booster.num_model_per_iteration())  # binary: one model, class index = round(p)
        model._classes, model._n_classes = np.arange(n_classes), n_classes
    return model


# --------------------------------------------------------------------------- #
# linfa (rmp-serde MessagePack)
# --------------------------------------------------------------------------- #


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EngineError(f"not a linfa model in MessagePack: {exc}") from exc


def _fields(value: Any, *names: str) -> list[Any]:
    """A serde struct's fields, whether rmp-serde wrote it as an array (``to_vec``) or a map (``to_vec_named``)."""
    if isinstance(value, dict) and all(n in value for n in names):
        return [value[n] for n in names]
    if isinstance(value, list) and len(value) == len(names):
        return value
    raise EngineError(f"not the linfa structure with fields {', '.join(names)}")


def _linfa_kind(value: Any) -> str:
    if isinstance(value, (list, dict)) and len(value) == 4:
        return "linfa-logistic"
    estimator, _ = _fields(value, "estimator", "num_features")
    return "linfa-linear" if isinstance(estimator, (list, dict)) and len(estimator) == 2 else "linfa-svm"


def _array(value: Any, ndim: int) -> np.ndarray[Any, Any]:
    """An ndarray serialized by ndarray's serde (``{v: 1, dim: [...], data: [...]}``, row-major)."""
    version, dim, data = _fields(value, "v", "dim", "data")
    if version != 1 or not isinstance(dim, list) or len(dim) != ndim or math.prod(dim) != len(data):
        raise EngineError("damaged ndarray in a linfa model")
    return np.asarray(data, dtype=np.float32).reshape(dim)


def _linfa(value: Any, kind: str) -> Any:
    linear_model = importlib.import_module("sklearn.linear_model")
    if kind == "linfa-svm":
        return _svm(value)
    if kind == "linfa-linear":
        estimator, num_features = _fields(value, "estimator", "num_features")
        intercept, params = _fields(estimator, "intercept", "params")
        model = linear_model.LinearRegression()
        model.coef_, model.intercept_ = _array(params, 1), np.float32(intercept)
        model.n_features_in_ = int(num_features)
        return model
    binary, multi, num_features, _labels = _fields(
        value, "estimator_binary", "estimator_multi", "num_features", "num_distinct_labels"
    )
    model = linear_model.LogisticRegression()
    if binary is not None:
        threshold, intercept, params, labels = _fields(binary, "threshold", "intercept", "params", "labels")
        positive, negative = _fields(labels, "pos", "neg")
        # linfa: positive when logistic(x·w + b) >= threshold, i.e. x·w + b - logit(threshold) >= 0
        model.coef_ = _array(params, 1).reshape(1, -1)
        model.intercept_ = np.asarray([intercept - math.log(threshold / (1.0 - threshold))], dtype=np.float32)
        model.classes_ = np.asarray([_fields(negative, "class", "label")[0], _fields(positive, "class", "label")[0]])
    elif multi is not None:
        intercept, params, classes = _fields(multi, "intercept", "params", "classes")
        model.coef_ = np.ascontiguousarray(_array(params, 2).T)  # linfa: (features, classes)
        model.intercept_, model.classes_ = _array(intercept, 1), np.asarray(classes)
    else:
        raise EngineError("a linfa logistic regression without an estimator")
    model.n_features_in_ = int(num_features)
    return model


# linfa-svm counts an alpha (and its support vector) when |alpha| > 100 * F::epsilon(), in f32.
_SVM_ALPHA = np.float32(100.0) * np.finfo(np.float32).eps
_SVM_FIELDS = ("alpha", "rho", "r", "exit_reason", "iterations", "obj", "kernel_method", "sep_hyperplane",
               "probability_coeffs", "phantom")  # fmt: skip


def _variant(value: Any) -> tuple[str, Any]:
    """A serde enum as rmp-serde writes it: a unit variant as its name, the others as ``{name: value}``."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        name, content = next(iter(value.items()))
        return str(name), content
    raise EngineError("damaged enum in a linfa SVM")


def _svm(value: Any) -> Any:
    """linfa-svm's ``Svm<f32, f32>`` as the ``SVR`` whose decision function is linfa's ``weighted_sum - rho``."""
    estimator, num_features = _fields(value, "estimator", "num_features")
    fields = dict(zip(_SVM_FIELDS, _fields(estimator, *_SVM_FIELDS), strict=True))
    method, parameters = _variant(fields["kernel_method"])
    plane, vectors = _variant(fields["sep_hyperplane"])
    if plane == "Linear":  # a linear kernel: the combined hyperplane w, predict w·x - rho
        method, support, dual = "Linear", _array(vectors, 1).reshape(1, -1), np.ones((1, 1), np.float32)
    elif plane == "WeightedCombination":
        support, alpha = _array(vectors, 2), np.asarray(fields["alpha"], dtype=np.float32)
        dual = alpha[np.abs(alpha) > _SVM_ALPHA].reshape(1, -1)
        if dual.shape[1] != len(support):
            raise EngineError("a linfa SVM whose support vectors do not match its alphas")
    else:
        raise EngineError(f"a linfa SVM with an unknown hyperplane {plane!r}")
    match method, parameters:
        case "Linear", None:
            kernel: dict[str, Any] = {"kernel": "linear"}
        case "Gaussian", eps if isinstance(eps, float | int) and eps > 0:
            kernel = {"kernel": "rbf", "gamma": 1.0 / float(eps)}
        case "Polynomial", [c, d]:
            if not float(d).is_integer() or d < 0:
                raise NotSupported(
                    f"a linfa SVM with a polynomial kernel of degree {d} has no scikit-learn equivalent",
                    hint="Retrain the project with pgml.train(..., algorithm => 'svm').",
                )
            kernel = {"kernel": "poly", "gamma": 1.0, "coef0": float(c), "degree": int(d)}
        case _:
            raise EngineError(f"a linfa SVM with an unknown kernel {method!r}")
    if support.shape[1] != int(num_features):
        raise EngineError("a linfa SVM whose support vectors do not have its number of features")
    return _fitted_svr(kernel, support, dual, -float(np.float32(fields["rho"])))


def _fitted_svr(kernel: dict[str, Any], support: Any, dual: Any, intercept: float) -> Any:
    """The state ``SVR.fit`` leaves (scikit-learn 1.x ``BaseLibSVM``), for the given support vectors."""
    model = importlib.import_module("sklearn.svm").SVR(**kernel)
    count, width = support.shape
    model.support_vectors_ = np.ascontiguousarray(support, dtype=np.float64)
    model.dual_coef_ = model._dual_coef_ = np.ascontiguousarray(dual, dtype=np.float64)
    model.intercept_ = model._intercept_ = np.asarray([intercept], dtype=np.float64)
    model.support_ = np.arange(count, dtype=np.int32)
    model._n_support = np.asarray([count, 0], dtype=np.int32)
    model._gamma = float(kernel.get("gamma", 1.0))
    model._sparse, model._effective_probability, model.shape_fit_ = False, False, (count, width)
    model._probA, model._probB = np.empty(0), np.empty(0)
    model.fit_status_, model.n_iter_, model._num_iter = 0, 0, np.zeros(1, dtype=np.int32)
    model.n_features_in_ = width
    return model
