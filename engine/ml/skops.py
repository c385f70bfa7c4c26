"""The skops format of scikit-learn artifacts, with its schema checked before skops reads a byte.

Owns: the exact allow-list of types an artifact may name (:func:`skops_allowed_types`: the estimators of
the algorithm table and the helper classes they hold; never a function), the node kinds that only rebuild
data, and dumping and loading through ``skops.io`` trusting exactly the names that were checked.

Must not: wrap loaded estimators (``engine.ml.artifacts`` does), or import skops or scikit-learn at import
time (both are imported when an artifact is written or read: seconds).
"""

from __future__ import annotations

import collections
import functools
import importlib
import io
import json
import zipfile
from typing import Any

import numpy as np

from engine.api import EngineError, NotSupported, UntrustedArtifact
from engine.ml import algorithms

#
# Every node of a skops file names a type (``__module__`` + ``__class__``) that skops imports and,
# for most node kinds, calls. skops' own defaults trust far more than this proxy ever writes, so the
# file's schema is checked here first, node by node, against an exact allow-list: the kinds of node
# that only rebuild data (no functions, bound methods, partials or operators) and the exact classes the
# algorithm table can produce plus the helper classes those estimators hold. Only then does skops
# see the bytes, trusting exactly the names that were checked. This is defence in depth: artifacts
# are signed (``engine.ml.signing``) and only verified bytes reach :func:`load` at all, which matters
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


def dumps(estimator: Any) -> bytes:
    """A scikit-learn estimator in the skops format; NotSupported when it holds a type the allow-list lacks."""
    data: bytes = importlib.import_module("skops.io").dumps(estimator)
    try:
        _skops_check(data)
    except EngineError as e:
        raise NotSupported(f"cannot store this model safely: {e.message}") from None
    return data


def loads(data: bytes) -> Any:
    """The estimator in ``data``; UntrustedArtifact when its schema names a type off the allow-list."""
    trusted = _skops_check(data)
    return importlib.import_module("skops.io").loads(data, trusted=trusted)
