"""Fitted classical models as bytes, and back, without pickle.

Owns: the artifact formats stored in ``pgml.files`` (a format tag plus bytes) and
the read-only adapter every loaded model is used through. Formats:

* ``skops``: scikit-learn estimators via ``skops.io``; before skops reads a file,
  every node of its schema must be a data-rebuilding kind naming a class on an
  exact allow-list (``engine.ml.skops``), else UntrustedArtifact.
* ``xgboost``: the booster in UBJSON (``save_raw("ubj")``), rebuilt into its
  scikit-learn wrapper class; ``lightgbm``: the booster's model text;
  ``catboost``: the model in CatBoost's ``cbm`` format.
* ``multioutput``: a MultiOutputRegressor over XGBoost / LightGBM / CatBoost
  models, stored as the list of its inner artifacts.
* ``rmp``: read only: what PostgresML stored (``engine.ml.postgresml_import``), rebuilt in
  memory once verified; ``pgml-proxy import-postgresml`` converts it into one of the above.
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

import importlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.api import EngineError, NotSupported
from engine.ml import postgresml_import, skops

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
    """(format tag, bytes) for a fitted estimator from ``engine.ml.algorithms``."""
    library = _library(estimator)
    if library == "sklearn" and _is_foreign_multioutput(estimator):
        inner = [dump(e) for e in estimator.estimators_]
        return "multioutput", _pack({"inner": [tag for tag, _ in inner]}, [data for _, data in inner])
    if library == "sklearn" and type(estimator).__name__ == "Birch":  # skops refuses Birch (its CF tree)
        return "birch", _dump_birch(estimator)
    dumpers: dict[str, Callable[[Any], bytes]] = {
        "sklearn": skops.dumps,
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
        "skops": lambda data: wrap(skops.loads(data)),
        "xgboost": _load_xgboost,
        "lightgbm": _load_lightgbm,
        "catboost": _load_catboost,
        "multioutput": _load_multioutput,
        "birch": _load_birch,
        "rmp": _load_postgresml,
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


# PostgresML's estimator.rmp, signed by an administrator (``pgml-proxy resign``): rebuilt in memory, never a pickle


def _load_postgresml(data: bytes) -> LoadedModel:
    return wrap(postgresml_import.rebuild(data).estimator)


# MultiOutputRegressor over boosters


def _load_multioutput(data: bytes) -> LoadedModel:
    header, parts = _unpack(data)
    tags = header.get("inner")
    if not isinstance(tags, list) or len(tags) != len(parts) or "multioutput" in tags:
        raise EngineError("damaged multioutput model artifact")
    return MultiOutputModel([load(tag, part) for tag, part in zip(tags, parts, strict=True)])
