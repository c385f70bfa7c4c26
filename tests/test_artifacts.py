"""engine.ml.artifacts: pickle-free round trips for every library, the adapter, refusing untrusted content
(the exact skops allow-list, crafted payloads that would run code)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sklearn.datasets import load_diabetes, load_digits, load_iris
from sklearn.preprocessing import FunctionTransformer

from engine.api import EngineError, NotSupported, UntrustedArtifact
from engine.ml.algorithms import ALGORITHMS, estimator, supported_tasks
from engine.ml.artifacts import MAGIC, EstimatorModel, LoadedModel, dump, load, wrap
from engine.ml.skops import skops_allowed_types

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
BINARY_X, BINARY_Y = IRIS_X[:100], IRIS_Y[:100]
_DX, _DY = load_diabetes(return_X_y=True)
DIABETES_X, DIABETES_Y = _DX[:120], _DY[:120]
JOINT_Y = np.column_stack([DIABETES_Y, DIABETES_X[:, 2] * 100])


def fitted(name: str, task: str, x: Any, y: Any = None, *, joint: bool = False, **hyperparams: Any) -> Any:
    model = estimator(name, task, hyperparams, joint=joint)
    return model.fit(x) if y is None else model.fit(x, y)


def round_trip(model: Any, expected_tag: str) -> LoadedModel:
    tag, data = dump(model)
    assert tag == expected_tag and isinstance(data, bytes)
    assert b"pickle" not in data[:64]
    return load(tag, data)


CLASSIFIERS = [
    ("random_forest", "skops", {"n_estimators": 5}),
    ("xgboost", "xgboost", {"n_estimators": 5}),
    ("xgboost_random_forest", "xgboost", {"n_estimators": 3}),
    ("lightgbm", "lightgbm", {"n_estimators": 5}),
    ("catboost", "catboost", {"iterations": 5}),
]


@pytest.mark.parametrize(("name", "tag", "hyperparams"), CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
def test_classifier_round_trip(name: str, tag: str, hyperparams: dict[str, Any], binary: bool) -> None:
    x, y = (BINARY_X, BINARY_Y) if binary else (IRIS_X, IRIS_Y)
    model = fitted(name, "classification", x, y, **hyperparams)
    loaded = round_trip(model, tag)
    assert loaded.is_classifier and list(loaded.classes_) == list(np.unique(y))  # type: ignore[arg-type]
    assert np.array_equal(loaded.predict(x), np.asarray(model.predict(x)).ravel())
    assert np.array_equal(loaded.predict_proba(x), model.predict_proba(x))
    assert loaded.predict_proba(x).shape == (len(x), 2 if binary else 3)
    assert np.array_equal(loaded.predict(x), wrap(model).predict(x))


REGRESSORS = [
    ("ridge", "skops", {}),
    ("hist_gradient_boosting", "skops", {"max_iter": 5}),
    ("xgboost", "xgboost", {"n_estimators": 5}),
    ("lightgbm", "lightgbm", {"n_estimators": 5}),
    ("catboost", "catboost", {"iterations": 5}),
]


@pytest.mark.parametrize(("name", "tag", "hyperparams"), REGRESSORS, ids=[r[0] for r in REGRESSORS])
def test_regressor_round_trip(name: str, tag: str, hyperparams: dict[str, Any]) -> None:
    model = fitted(name, "regression", DIABETES_X, DIABETES_Y, **hyperparams)
    loaded = round_trip(model, tag)
    assert not loaded.is_classifier and loaded.classes_ is None
    assert np.array_equal(loaded.predict(DIABETES_X), model.predict(DIABETES_X))
    with pytest.raises(NotSupported, match="You can't predict probabilities for a regression model"):
        loaded.predict_proba(DIABETES_X)


@pytest.mark.parametrize(
    ("name", "tag"),
    [("lightgbm", "multioutput"), ("catboost", "multioutput"), ("huber", "skops"), ("xgboost", "xgboost")],
)
def test_joint_round_trip(name: str, tag: str) -> None:
    hyperparams = {"lightgbm": {"n_estimators": 5}, "catboost": {"iterations": 5}, "xgboost": {"n_estimators": 5}}
    model = fitted(name, "regression", DIABETES_X, JOINT_Y, joint=True, **hyperparams.get(name, {}))
    loaded = round_trip(model, tag)
    assert loaded.predict(DIABETES_X).shape == (len(DIABETES_X), 2)
    assert np.array_equal(loaded.predict(DIABETES_X), model.predict(DIABETES_X))


def test_pca_transform_and_first_component() -> None:
    x = load_digits().data[:200]
    model = fitted("pca", "decomposition", x, n_components=5)
    loaded = round_trip(model, "skops")
    assert np.array_equal(loaded.transform(x), model.transform(x)) and loaded.transform(x).shape == (200, 5)
    assert np.array_equal(loaded.predict(x), model.transform(x)[:, 0])
    with pytest.raises(NotSupported):
        loaded.predict_proba(x)


@pytest.mark.parametrize(("name", "tag"), [("kmeans", "skops"), ("birch", "birch"), ("mean_shift", "skops")])
def test_clustering_round_trip(name: str, tag: str) -> None:
    model = fitted(name, "clustering", IRIS_X)
    loaded = round_trip(model, tag)
    assert np.array_equal(loaded.predict(IRIS_X), model.predict(IRIS_X))
    if name != "mean_shift":
        assert np.array_equal(loaded.transform(IRIS_X), model.transform(IRIS_X))


def test_every_algorithm_round_trips() -> None:
    small = {"n_estimators": 3, "iterations": 3, "max_iter": 3}
    data = {"regression": (DIABETES_X, DIABETES_Y), "classification": (IRIS_X, IRIS_Y), "clustering": (IRIS_X, None)}
    data["decomposition"] = (IRIS_X, None)
    for name in ALGORITHMS:
        for task in supported_tasks(name):
            model = estimator(name, task, {})
            params = {k: v for k, v in small.items() if k in model.get_params()}
            x, y = data[task]
            model = estimator(name, task, params)
            model.fit(x) if y is None else model.fit(x, y)
            loaded = load(*dump(model))
            # Bitwise equal except where BLAS rounds by memory alignment (KernelRidge: 1 ulp).
            np.testing.assert_allclose(loaded.predict(x), wrap(model).predict(x), rtol=1e-12, err_msg=name)


def test_classifiers_without_probabilities() -> None:
    loaded = round_trip(fitted("svm", "classification", IRIS_X, IRIS_Y), "skops")
    assert loaded.is_classifier
    with pytest.raises(NotSupported, match="SVC does not support predict_proba"):
        loaded.predict_proba(IRIS_X)
    with pytest.raises(NotSupported, match="does not support transform"):
        loaded.transform(IRIS_X)


def test_concurrent_predictions_agree() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(100_000, 4)) * IRIS_X.std(axis=0) + IRIS_X.mean(axis=0)
    for name, tag, hyperparams in CLASSIFIERS[:1] + CLASSIFIERS[3:]:
        loaded = round_trip(fitted(name, "classification", IRIS_X, IRIS_Y, **hyperparams), tag)
        reference = loaded.predict_proba(big)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(loaded.predict_proba, [big[:20_000]] * 8))
        assert all(np.array_equal(r, reference[:20_000]) for r in results), name


def test_untrusted_skops_content_is_refused() -> None:
    hostile = FunctionTransformer(func=os.getcwd).fit(IRIS_X)  # a sklearn object holding a foreign function
    with pytest.raises(NotSupported, match=r"posix\.getcwd"):
        dump(hostile)
    with pytest.raises(EngineError, match=r"refusing to load a model holding untrusted types: posix\.getcwd"):
        load("skops", skops.io.dumps(hostile))


def test_a_pickle_or_damaged_bytes_are_refused() -> None:
    model = fitted("ridge", "regression", DIABETES_X, DIABETES_Y)
    for tag in ("skops", "xgboost", "lightgbm", "catboost", "multioutput", "birch"):
        with pytest.raises(EngineError):
            load(tag, pickle.dumps(model))
    with pytest.raises(EngineError, match="unknown model artifact format"):
        load("pickle", pickle.dumps(model))
    tag, data = dump(fitted("xgboost", "regression", DIABETES_X, DIABETES_Y, n_estimators=2))
    with pytest.raises(EngineError, match="truncated"):
        load(tag, data[:-10])
    with pytest.raises(EngineError):
        load("skops", b"PK\x03\x04 not really a zip")


def test_an_envelope_cannot_name_other_classes() -> None:
    head = json.dumps({"class": "os.system", "parts": [0]}).encode()
    data = MAGIC + len(head).to_bytes(4, "big") + head
    for tag in ("xgboost", "catboost"):
        with pytest.raises(EngineError, match="unexpected class"):
            load(tag, data)


def test_skops_zip_naming_a_foreign_type_is_refused() -> None:
    good = skops.io.dumps(fitted("ridge", "regression", DIABETES_X, DIABETES_Y))
    source, target = zipfile.ZipFile(io.BytesIO(good)), io.BytesIO()
    with zipfile.ZipFile(target, "w") as out:
        for item in source.infolist():
            content = source.read(item)
            if item.filename == "schema.json":
                content = content.replace(b'"__module__": "sklearn.linear_model._ridge"', b'"__module__": "subprocess"')
                content = content.replace(b'"__class__": "Ridge"', b'"__class__": "Popen"')
            out.writestr(item, content)
    with pytest.raises(EngineError, match=r"subprocess\.Popen"):
        load("skops", target.getvalue())


def test_unknown_estimators_are_not_stored() -> None:
    with pytest.raises(NotSupported, match="cannot store"):
        dump(object())
    assert isinstance(wrap(fitted("ridge", "regression", DIABETES_X, DIABETES_Y)), EstimatorModel)


# --------------------------------------------------------------------------- #
# The skops allow-list
# --------------------------------------------------------------------------- #


def _schema_names(data: bytes) -> set[tuple[str, str, str]]:
    """(loader, module, class) of every node of a skops file's schema."""
    out: set[tuple[str, str, str]] = set()
    stack: list[Any] = [json.loads(zipfile.ZipFile(io.BytesIO(data)).read("schema.json"))]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
            if "__loader__" in node:
                out.add((node["__loader__"], node["__module__"], node["__class__"]))
    return out


def _sklearn_cases() -> list[tuple[str, str, bool, bool]]:
    """(algorithm, task, joint, binary) for every scikit-learn-backed entry of the algorithm table."""
    cases = []
    for name in ALGORITHMS:
        for task in sorted(supported_tasks(name)):
            with warnings.catch_warnings():  # deprecated estimators warn when built (collection time)
                warnings.simplefilter("ignore")
                sklearn_backed = type(estimator(name, task, {})).__module__.startswith("sklearn.")
            if sklearn_backed:
                cases.append((name, task, False, False))
                if task == "classification":
                    cases.append((name, task, False, True))
                if task == "regression":
                    cases.append((name, task, True, False))
    return cases


SKLEARN_CASES = _sklearn_cases()


@pytest.mark.parametrize(
    ("name", "task", "joint", "binary"),
    SKLEARN_CASES,
    ids=[f"{n}-{t}{'-joint' if j else ''}{'-binary' if b else ''}" for n, t, j, b in SKLEARN_CASES],
)
def test_every_sklearn_algorithm_loads_under_the_allow_list(name: str, task: str, joint: bool, binary: bool) -> None:
    small = {"n_estimators": 3, "max_iter": 5}
    params = {k: v for k, v in small.items() if k in estimator(name, task, {}).get_params()}
    model = estimator(name, task, params, joint=joint)
    x, y = {"regression": (DIABETES_X, JOINT_Y if joint else DIABETES_Y), "classification": (IRIS_X, IRIS_Y)}.get(
        task, (IRIS_X, None)
    )
    if binary:
        x, y = BINARY_X, BINARY_Y
    model.fit(x) if y is None else model.fit(x, y)
    tag, data = dump(model)
    assert tag in ("skops", "birch")
    if tag == "skops":
        nodes = _schema_names(data)
        allowed = skops_allowed_types()
        assert {(m, c) for _, m, c in nodes} <= allowed, {(m, c) for _, m, c in nodes} - allowed
        assert not {loader for loader, _, _ in nodes} & {"FunctionNode", "MethodNode", "PartialNode"}
        assert (type(model).__module__, type(model).__name__) in allowed
    loaded = load(tag, data)
    np.testing.assert_allclose(loaded.predict(x), wrap(model).predict(x), rtol=1e-12, err_msg=name)


def test_the_allow_list_holds_classes_only() -> None:
    allowed = skops_allowed_types()
    for module, name in allowed:
        obj = getattr(importlib.import_module(module), name)
        assert isinstance(obj, type), f"{module}.{name}"
    names = {f"{m}.{c}" for m, c in allowed}
    assert "sklearn.tree._tree.Tree" in names and "numpy.ndarray" in names
    assert not {n for n in names if n.startswith(("numpy.testing", "builtins.eval", "builtins.exec", "os.", "posix."))}
    # Nothing merely because of its package: other sklearn/numpy/scipy types stay out.
    assert "sklearn.preprocessing._function_transformer.FunctionTransformer" not in names
    assert "scipy.sparse._csr.csr_matrix" not in names


def _edit_schema(data: bytes, edit: Any) -> bytes:
    source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(target, "w") as out:
        for item in source.infolist():
            content = source.read(item)
            if item.filename == "schema.json":
                schema = json.loads(content)
                edit(schema)
                content = json.dumps(schema).encode()
            out.writestr(item, content)
    return target.getvalue()


def _json(value: Any) -> dict[str, Any]:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(value),
            "is_json": True}  # fmt: skip


def _runstring_payload(marker: str) -> bytes:
    """A Ridge whose ``alpha`` is ``runstring(code, {})``, i.e. ``exec``: skops calls what a constructor node names."""
    code = f"open({marker!r}, 'w').write('pwned')"

    def edit(schema: dict[str, Any]) -> None:
        schema["content"]["content"]["alpha"] = {
            "__class__": "runstring",
            "__module__": "numpy.testing._private.utils",
            "__loader__": "ConstructorFromReduceNode",
            "content": {
                "__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                "content": [_json(code), {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode",
                                          "content": {}, "key_types": {"__class__": "list", "__module__": "builtins",
                                                                       "__loader__": "ListNode", "content": []}}],
            },
        }  # fmt: skip

    return _edit_schema(skops.io.dumps(fitted("ridge", "regression", DIABETES_X, DIABETES_Y)), edit)


def _eval_key_payload(marker: str) -> bytes:
    """A Ridge whose attribute dict rebuilds one key with ``builtins.eval`` as its key type (a TypeNode)."""
    code = f"open({marker!r}, 'w').write('pwned')"

    def edit(schema: dict[str, Any]) -> None:
        attrs = schema["content"]
        attrs["content"] = {code: _json(1.0), **attrs["content"]}
        attrs["key_types"]["content"].insert(
            0, {"__class__": "eval", "__module__": "builtins", "__loader__": "TypeNode", "__id__": 1}
        )

    return _edit_schema(skops.io.dumps(fitted("ridge", "regression", DIABETES_X, DIABETES_Y)), edit)


@pytest.mark.parametrize(
    ("payload", "named"),
    [(_runstring_payload, r"numpy\.testing\._private\.utils\.runstring \(a constructor call\)"),
     (_eval_key_payload, r"builtins\.eval")],
    ids=["runstring", "eval-key-type"],
)  # fmt: skip
def test_a_crafted_skops_payload_is_refused_and_never_runs(tmp_path: Path, payload: Any, named: str) -> None:
    # The payload is live: skops told to trust what it names runs it.
    control = tmp_path / "control"
    with contextlib.suppress(Exception):  # the loaded object is not a usable model; only its effect matters
        skops.io.loads(payload(str(control)), trusted=skops.io.get_untrusted_types(data=payload(str(control))))
    assert control.read_text() == "pwned"
    # Through the artifact loader: refused before skops constructs anything.
    marker = tmp_path / "marker"
    with pytest.raises(UntrustedArtifact, match=named) as refused:
        load("skops", payload(str(marker)))
    assert refused.value.sqlstate == "58000"
    assert not marker.exists()


def test_a_function_node_is_refused_even_when_named_like_an_allowed_class() -> None:
    """The node kind counts, not only the name: a function node is never loaded."""

    def edit(schema: dict[str, Any]) -> None:
        schema["content"]["content"]["alpha"] = {"__class__": "ndarray", "__module__": "numpy",
                                                 "__loader__": "FunctionNode"}  # fmt: skip

    data = _edit_schema(skops.io.dumps(fitted("ridge", "regression", DIABETES_X, DIABETES_Y)), edit)
    with pytest.raises(UntrustedArtifact, match=r"numpy\.ndarray \(a function\)"):
        load("skops", data)
