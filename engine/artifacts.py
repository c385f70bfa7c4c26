"""Fitted classical models as bytes, and back, without pickle.

Owns: the artifact formats stored in ``pgml.files`` (a format tag plus bytes) and
the read-only adapter every loaded model is used through. Formats:

* ``skops``: scikit-learn estimators via ``skops.io``; before skops reads a file,
  every node of its schema must be a data-rebuilding kind naming a class on an
  exact allow-list (:func:`skops_allowed_types`: the estimators of the algorithm
  table and the helper classes they hold; never a function), else UntrustedArtifact.
* ``xgboost``: the booster in UBJSON (``save_raw("ubj")``), rebuilt into its
  scikit-learn wrapper class; ``lightgbm``: the booster's model text;
  ``catboost``: the model in CatBoost's ``cbm`` format.
* ``multioutput``: a MultiOutputRegressor over XGBoost / LightGBM / CatBoost
  models, stored as the list of its inner artifacts.
* ``birch``: skops refuses Birch, so its prediction arrays go in an ``.npz``
  (loaded with ``allow_pickle=False``) next to its JSON parameters.

All but skops share an envelope: ``MAGIC``, a 4-byte big-endian header length, a
JSON header (class names come from a fixed table, never imported by name from the
data), then the payload parts whose lengths the header lists.

Must not: decide what a prediction means for SQL (class index, first component…
that is the caller's) nor keep mutable state in an adapter: adapters only call
the libraries' predict functions, which are safe to call from several threads.
"""

from __future__ import annotations

import collections
import functools
import importlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.api import EngineError, NotSupported, UntrustedArtifact

MAGIC = b"PGMLPX\x01\n"
# The only classes an envelope may name.
_XGBOOST_CLASSES = frozenset({"XGBRegressor", "XGBClassifier", "XGBRFRegressor", "XGBRFClassifier"})
_CATBOOST_CLASSES = frozenset({"CatBoostRegressor", "CatBoostClassifier"})


# --------------------------------------------------------------------------- #
# Adapters
# --------------------------------------------------------------------------- #


class LoadedModel:
    """A fitted model behind one interface: predict, predict_proba, transform, ``classes_``.

    ``classes_`` is the class labels (in predict_proba column order) for
    classifiers and None otherwise. Every method takes a 2-D array of rows.
    """

    def __init__(self, estimator: Any, classes: Any) -> None:
        self.estimator = estimator
        self.classes_: np.ndarray[Any, Any] | None = None if classes is None else np.asarray(classes)

    @property
    def is_classifier(self) -> bool:
        return self.classes_ is not None

    def predict(self, x: Any) -> np.ndarray[Any, Any]:
        raise NotImplementedError

    def predict_proba(self, x: Any) -> np.ndarray[Any, Any]:
        raise NotSupported(f"{self._name()} does not support predict_proba")

    def transform(self, x: Any) -> np.ndarray[Any, Any]:
        raise NotSupported(f"{self._name()} does not support transform")

    def _name(self) -> str:
        return type(self.estimator).__name__

    def _regression_check(self) -> None:
        if not self.is_classifier:
            raise NotSupported("You can't predict probabilities for a regression model")


class EstimatorModel(LoadedModel):
    """Any estimator with the scikit-learn API (sklearn, XGBoost and CatBoost wrappers)."""

    def __init__(self, estimator: Any) -> None:
        classes = getattr(estimator, "classes_", None)
        super().__init__(estimator, classes if classes is not None and len(classes) else None)

    def predict(self, x: Any) -> np.ndarray[Any, Any]:
        if not hasattr(self.estimator, "predict"):  # decomposition: the first component
            return self.transform(x)[:, 0]
        y = np.asarray(self.estimator.predict(x))
        return y.ravel() if y.ndim == 2 and y.shape[1] == 1 else y  # CatBoost classifiers give (n, 1)

    def predict_proba(self, x: Any) -> np.ndarray[Any, Any]:
        self._regression_check()
        if not hasattr(self.estimator, "predict_proba"):
            raise NotSupported(f"{self._name()} does not support predict_proba")
        return np.asarray(self.estimator.predict_proba(x))

    def transform(self, x: Any) -> np.ndarray[Any, Any]:
        if not hasattr(self.estimator, "transform"):
            raise NotSupported(f"{self._name()} does not support transform")
        return np.asarray(self.estimator.transform(x))


class LightGBMModel(LoadedModel):
    """A LightGBM Booster with the label mapping of the LGBMClassifier it came from."""

    def predict(self, x: Any) -> np.ndarray[Any, Any]:
        raw = np.asarray(self.estimator.predict(x))
        if self.classes_ is None:
            return raw
        return np.asarray(self.classes_[np.argmax(self._proba(raw), axis=1)])

    def predict_proba(self, x: Any) -> np.ndarray[Any, Any]:
        self._regression_check()
        return self._proba(np.asarray(self.estimator.predict(x)))

    @staticmethod
    def _proba(raw: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.column_stack((1.0 - raw, raw)) if raw.ndim == 1 else raw


class MultiOutputModel(LoadedModel):
    """One single-output model per target column (MultiOutputRegressor)."""

    def __init__(self, models: list[LoadedModel]) -> None:
        super().__init__(models, None)
        self.models = models

    def predict(self, x: Any) -> np.ndarray[Any, Any]:
        return np.column_stack([m.predict(x) for m in self.models])

    def _name(self) -> str:
        return "MultiOutputRegressor"


def wrap(estimator: Any) -> LoadedModel:
    """The adapter for a freshly fitted estimator (what ``load(*dump(estimator))`` gives back)."""
    match _library(estimator):
        case "lightgbm":
            return LightGBMModel(estimator.booster_, getattr(estimator, "classes_", None))
        case "sklearn" if _is_foreign_multioutput(estimator):
            return MultiOutputModel([wrap(inner) for inner in estimator.estimators_])
        case _:
            return EstimatorModel(estimator)


# --------------------------------------------------------------------------- #
# dump / load
# --------------------------------------------------------------------------- #


def dump(estimator: Any) -> tuple[str, bytes]:
    """(format tag, bytes) for a fitted estimator from ``engine.algorithms``."""
    library = _library(estimator)
    if library == "sklearn" and _is_foreign_multioutput(estimator):
        inner = [dump(e) for e in estimator.estimators_]
        return "multioutput", _pack({"inner": [tag for tag, _ in inner]}, [data for _, data in inner])
    if library == "sklearn" and type(estimator).__name__ == "Birch":  # skops refuses Birch (its CF tree)
        return "birch", _dump_birch(estimator)
    dumpers: dict[str, Callable[[Any], bytes]] = {
        "sklearn": _dump_skops,
        "xgboost": _dump_xgboost,
        "lightgbm": _dump_lightgbm,
        "catboost": _dump_catboost,
    }
    if library not in dumpers:
        raise NotSupported(f"cannot store a {type(estimator).__module__}.{type(estimator).__name__} model")
    return ("skops" if library == "sklearn" else library), dumpers[library](estimator)


def load(tag: str, data: bytes) -> LoadedModel:
    """The adapter for an artifact; EngineError when it is damaged or holds untrusted types."""
    loaders: dict[str, Callable[[bytes], LoadedModel]] = {
        "skops": _load_skops,
        "xgboost": _load_xgboost,
        "lightgbm": _load_lightgbm,
        "catboost": _load_catboost,
        "multioutput": _load_multioutput,
        "birch": _load_birch,
    }
    if tag not in loaders:
        raise EngineError(f"unknown model artifact format: {tag!r}")
    try:
        return loaders[tag](bytes(data))
    except EngineError:
        raise
    except Exception as e:  # the libraries' parse errors: corrupt or foreign bytes
        raise EngineError(f"cannot load the {tag} model artifact: {e}") from e


def _library(estimator: Any) -> str:
    return type(estimator).__module__.split(".")[0]


def _is_foreign_multioutput(estimator: Any) -> bool:
    inner = getattr(estimator, "estimators_", None)
    return type(estimator).__name__ == "MultiOutputRegressor" and any(_library(e) != "sklearn" for e in inner or ())


def _pack(header: dict[str, Any], parts: list[bytes]) -> bytes:
    head = json.dumps({**header, "parts": [len(p) for p in parts]}).encode()
    return MAGIC + len(head).to_bytes(4, "big") + head + b"".join(parts)


def _unpack(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    if not data.startswith(MAGIC):
        raise EngineError("not a pgml-proxy model artifact")
    start = len(MAGIC) + 4
    end = start + int.from_bytes(data[len(MAGIC) : start], "big")
    header = json.loads(data[start:end])
    if not isinstance(header, dict) or not isinstance(header.get("parts"), list):
        raise EngineError("damaged model artifact header")
    parts, offset = [], end
    for size in header["parts"]:
        parts.append(data[offset : offset + int(size)])
        offset += int(size)
    if offset != len(data):
        raise EngineError("truncated model artifact")
    return header, parts


def _class(header: dict[str, Any], allowed: frozenset[str], module: str) -> Any:
    name = header.get("class")
    if name not in allowed:
        raise EngineError(f"model artifact names an unexpected class: {name!r}")
    return getattr(importlib.import_module(module), str(name))


def _classes_json(estimator: Any) -> list[Any] | None:
    classes = getattr(estimator, "classes_", None)
    return None if classes is None or not len(classes) else np.asarray(classes).tolist()


# skops (scikit-learn)
#
# Every node of a skops file names a type (``__module__`` + ``__class__``) that skops imports and,
# for most node kinds, calls. skops' own defaults trust far more than this proxy ever writes, so the
# file's schema is checked here first, node by node, against an exact allow-list: the kinds of node
# that only rebuild data (no functions, bound methods, partials or operators) and the exact classes the
# algorithm table can produce plus the helper classes those estimators hold. Only then does skops
# see the bytes, trusting exactly the names that were checked. This is defence in depth: artifacts
# are signed (``engine.signing``) and only verified bytes reach :func:`load` at all, which matters
# because some allowed types (``sklearn.tree._tree.Tree``) cannot have their content validated.

# Node kinds that rebuild data. Refused: FunctionNode, MethodNode, PartialNode, OperatorFuncNode (they
# yield callables), ReduceNode and ConstructorFromReduceNode (they call a named constructor with
# stored arguments), DefaultDictNode (its factory), SparseMatrixNode, and anything newer.
_SKOPS_LOADERS = frozenset({
    "ObjectNode", "TreeNode", "LossNode", "NdArrayNode", "DTypeNode", "DictNode", "ListNode", "TupleNode",
    "SetNode", "JsonNode", "TypeNode", "SliceNode", "BytesNode", "BytearrayNode", "RandomStateNode",
    "RandomGeneratorNode", "CachedNode",
})  # fmt: skip
_SKOPS_KINDS = {
    "FunctionNode": "a function", "MethodNode": "a method", "PartialNode": "a partial function",
    "OperatorFuncNode": "an operator", "ReduceNode": "a constructor call",
    "ConstructorFromReduceNode": "a constructor call",
}  # fmt: skip
# The classes fitted estimators of the algorithm table hold besides themselves: inner estimators of
# ensembles and meta-estimators, trees, label encoders, kernels, losses and links (whichever the
# hyperparameters choose), binning. Names a given scikit-learn version lacks are left out.
_SKLEARN_HELPERS = (
    "sklearn.multioutput:MultiOutputRegressor",
    "sklearn.multiclass:OneVsRestClassifier",
    "sklearn.multiclass:OneVsOneClassifier",
    "sklearn.tree._classes:DecisionTreeClassifier",
    "sklearn.tree._classes:DecisionTreeRegressor",
    "sklearn.tree._classes:ExtraTreeClassifier",
    "sklearn.tree._classes:ExtraTreeRegressor",
    "sklearn.tree._tree:Tree",
    "sklearn.dummy:DummyClassifier",
    "sklearn.dummy:DummyRegressor",
    "sklearn.preprocessing._label:LabelBinarizer",
    "sklearn.preprocessing._label:LabelEncoder",
    "sklearn.gaussian_process._gpc:_BinaryGaussianProcessClassifierLaplace",
    "sklearn.gaussian_process.kernels:ConstantKernel",
    "sklearn.gaussian_process.kernels:RBF",
    "sklearn.gaussian_process.kernels:Product",
    "sklearn.ensemble._hist_gradient_boosting.binning:_BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor:TreePredictor",
    *(f"sklearn._loss.link:{name}" for name in (
        "IdentityLink", "LogLink", "LogitLink", "HalfLogitLink", "MultinomialLogit", "Interval",
    )),
    *(f"sklearn._loss.{module}:{prefix}{name}" for module, prefix in (("loss", ""), ("_loss", "Cy")) for name in (
        "HalfSquaredError", "AbsoluteError", "PinballLoss", "HuberLoss", "HalfPoissonLoss", "HalfGammaLoss",
        "HalfTweedieLoss", "HalfTweedieLossIdentity", "HalfBinomialLoss", "HalfMultinomialLoss", "ExponentialLoss",
    )),
    *(f"sklearn.linear_model._sgd_fast:{name}" for name in (
        "Hinge", "SquaredHinge", "ModifiedHuber", "EpsilonInsensitive", "SquaredEpsilonInsensitive",
    )),
)  # fmt: skip
# numpy.random bit generators a Generator may name inside its state.
_BIT_GENERATORS = frozenset({"MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64"})


@functools.cache
def skops_allowed_types() -> frozenset[tuple[str, str]]:
    """(module, class) of every type a skops artifact may name: all classes, never functions."""
    from engine import algorithms

    paths = sorted(path for path in algorithms.estimator_paths() if path.startswith("sklearn."))
    classes: list[Any] = [dict, list, tuple, set, frozenset, str, int, float, bool, bytes, bytearray, slice]
    classes += [collections.OrderedDict, np.ndarray, np.dtype, np.random.RandomState, np.random.Generator]
    classes += [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    classes += [np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.str_, np.bytes_]
    for path in [*paths, *_SKLEARN_HELPERS]:
        module, _, name = path.partition(":")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # not in this scikit-learn version: nothing can name it
            continue
    out = set()
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"the skops allow-list may only hold classes, not {cls!r}")
        out.add((cls.__module__, cls.__name__))
    return frozenset(out)


def _skops_schema(data: bytes) -> Any:
    """The schema skops would read (same zip member, same JSON parser)."""
    skops_utils = importlib.import_module("skops.io._utils")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        schema, _ = skops_utils.read_schema(archive)
    return schema


def _skops_check(data: bytes) -> list[str]:
    """The names to pass to skops as trusted for ``data``, or UntrustedArtifact naming what is refused."""
    try:
        schema = _skops_schema(data)
    except Exception as e:  # not a zip, no schema.json, bad JSON or protocol
        raise EngineError(f"damaged skops model artifact: {e}") from None
    allowed = skops_allowed_types()
    names: set[str] = set()
    refused: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        if "__loader__" not in node:
            continue
        loader, module, name = node.get("__loader__"), node.get("__module__"), node.get("__class__")
        if not (isinstance(loader, str) and isinstance(module, str) and isinstance(name, str)):
            refused.add("a malformed node")
            continue
        if loader not in _SKOPS_LOADERS:
            refused.add(f"{module}.{name} ({_SKOPS_KINDS.get(loader, 'a ' + loader)})")
        elif (module, name) not in allowed:
            refused.add(f"{module}.{name}")
        names.add(f"{module}.{name}")
        if loader == "RandomGeneratorNode":
            bit_generator = _bit_generator(node)
            if bit_generator not in _BIT_GENERATORS:
                refused.add(f"numpy.random.{bit_generator}")
            names.add(f"numpy.random.{bit_generator}")
    if refused:
        raise UntrustedArtifact(f"refusing to load a model holding untrusted types: {', '.join(sorted(refused))}")
    return sorted(names)


def _bit_generator(node: dict[str, Any]) -> str:
    """The bit generator class a Generator node names in its state (where skops reads it), or '?'."""
    try:
        name = json.loads(node["content"]["bit_generator"]["content"]["bit_generator"]["content"])
    except (KeyError, TypeError, ValueError):
        return "?"
    return name if isinstance(name, str) else "?"


def _dump_skops(estimator: Any) -> bytes:
    data: bytes = importlib.import_module("skops.io").dumps(estimator)
    try:
        _skops_check(data)
    except EngineError as e:
        raise NotSupported(f"cannot store this model safely: {e.message}") from None
    return data


def _load_skops(data: bytes) -> LoadedModel:
    trusted = _skops_check(data)
    return wrap(importlib.import_module("skops.io").loads(data, trusted=trusted))


# Birch: what predict and transform use (the CF tree only serves further fitting)

_BIRCH_ARRAYS = ("subcluster_centers_", "subcluster_labels_", "_subcluster_norms")


def _dump_birch(estimator: Any) -> bytes:
    params = {}
    for name, value in estimator.get_params(deep=False).items():
        try:
            params[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):  # e.g. an estimator as n_clusters: only used by fit
            continue
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {name: np.asarray(getattr(estimator, name)) for name in _BIRCH_ARRAYS}
    np.savez(buffer, **arrays)
    return _pack({"params": params, "n_features_in": int(estimator.n_features_in_)}, [buffer.getvalue()])


def _load_birch(data: bytes) -> LoadedModel:
    header, (arrays,) = _unpack(data)
    model = importlib.import_module("sklearn.cluster").Birch(**header["params"])
    with np.load(io.BytesIO(arrays), allow_pickle=False) as stored:
        for name in _BIRCH_ARRAYS:
            setattr(model, name, stored[name])
    model.n_features_in_ = int(header["n_features_in"])
    return EstimatorModel(model)


# xgboost


def _dump_xgboost(estimator: Any) -> bytes:
    return _pack({"class": type(estimator).__name__}, [bytes(estimator.get_booster().save_raw(raw_format="ubj"))])


def _load_xgboost(data: bytes) -> LoadedModel:
    header, (raw,) = _unpack(data)
    model = _class(header, _XGBOOST_CLASSES, "xgboost")()
    model.load_model(bytearray(raw))
    return EstimatorModel(model)


# lightgbm


def _dump_lightgbm(estimator: Any) -> bytes:
    text: str = estimator.booster_.model_to_string()
    return _pack({"classes": _classes_json(estimator)}, [text.encode()])


def _load_lightgbm(data: bytes) -> LoadedModel:
    header, (text,) = _unpack(data)
    booster = importlib.import_module("lightgbm").Booster(model_str=text.decode())
    return LightGBMModel(booster, header.get("classes"))


# catboost


def _dump_catboost(estimator: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pgml-catboost-") as directory:
        path = os.path.join(directory, "model.cbm")
        estimator.save_model(path, format="cbm")
        with open(path, "rb") as file:
            raw = file.read()
    return _pack({"class": type(estimator).__name__}, [raw])


def _load_catboost(data: bytes) -> LoadedModel:
    header, (raw,) = _unpack(data)
    model = _class(header, _CATBOOST_CLASSES, "catboost")()
    model.load_model(blob=raw)
    return EstimatorModel(model)


# MultiOutputRegressor over boosters


def _load_multioutput(data: bytes) -> LoadedModel:
    header, parts = _unpack(data)
    tags = header.get("inner")
    if not isinstance(tags, list) or len(tags) != len(parts) or "multioutput" in tags:
        raise EngineError("damaged multioutput model artifact")
    return MultiOutputModel([load(tag, part) for tag, part in zip(tags, parts, strict=True)])
