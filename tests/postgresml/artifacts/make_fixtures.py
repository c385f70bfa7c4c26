"""Write the PostgresML ``estimator.rmp`` fixtures of this folder, serialised as PostgresML 2.x does.

Run with an XGBoost that still writes the binary layout (2.1 is the last: ``save_raw("deprecated")``):
    python -m venv /tmp/old && /tmp/old/bin/pip install xgboost-cpu==2.1.4 lightgbm==4.7.0 \
        scikit-learn==1.9.1 msgpack==1.2.4 && /tmp/old/bin/python tests/postgresml/artifacts/make_fixtures.py
Only some of them (the linfa ones need no old XGBoost), their expected predictions merged into expected.json:
    python tests/postgresml/artifacts/make_fixtures.py linfa_svm_rbf linfa_svm_linear linfa_svm_poly
See README.md beside this file for the PostgresML source each layout follows.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import sys
from pathlib import Path

import lightgbm
import msgpack
import numpy as np
import xgboost
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.svm import SVR
from sklearn.tree import DecisionTreeRegressor

HERE = Path(__file__).parent
FEATURES = 4


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(15)
    x = rng.normal(size=(200, FEATURES)).astype(np.float32)
    y = (x @ np.asarray([1.5, -2.0, 0.5, 3.0]) + 0.1 * rng.normal(size=200)).astype(np.float32)
    y3 = np.digitize(y, np.quantile(y, [1 / 3, 2 / 3])).astype(np.float32)
    return x, y, (y > 0).astype(np.float32), y3


def prefix(num_features: int, num_classes: int) -> bytes:
    """PostgresML 2.0.0's 16 bytes before a booster (bindings/xgboost.rs, lightgbm.rs at that version)."""
    return struct.pack(">QQ", num_features, num_classes)


def f32(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32).ravel()]


def ndarray(values: np.ndarray) -> list:
    """ndarray's serde: the struct Array {v: 1, dim, data} (rmp_serde::to_vec writes structs as arrays)."""
    return [1, list(values.shape), f32(values)]


def linfa_fixtures(x: np.ndarray, y: np.ndarray, y2: np.ndarray, y3: np.ndarray) -> dict[str, bytes]:
    ridge = Ridge(alpha=1e-6).fit(x, y)
    linear = [[float(np.float32(ridge.intercept_)), ndarray(ridge.coef_)], FEATURES]  # LinearRegression binding
    binary = LogisticRegression().fit(x, y2.astype(np.int32))
    labels = [[1, 1.0], [0, 0.0]]  # BinaryClassLabels {pos: ClassLabel {class, label}, neg}
    fitted = [0.5, float(np.float32(binary.intercept_[0])), ndarray(binary.coef_[0]), labels]
    multi = LogisticRegression().fit(x, y3.astype(np.int32))
    fitted_multi = [ndarray(multi.intercept_), ndarray(multi.coef_.T), [0, 1, 2]]  # params: (features, classes)
    pack = lambda v: msgpack.packb(v, use_single_float=True)  # noqa: E731 - serde f32 is msgpack float 32
    return {
        "linfa_linear_regression": pack(linear),
        "linfa_logistic_binary": pack([fitted, None, FEATURES, 2]),  # LogisticRegression binding
        "linfa_logistic_multi": pack([None, fitted_multi, FEATURES, 3]),
    }


# --------------------------------------------------------------------------- #
# linfa-svm: Svm<f32, f32> (postgresml/linfa 9d615fcb, algorithms/linfa-svm/src/lib.rs) as rmp-serde 1.3 writes it
# --------------------------------------------------------------------------- #

SVM_TRAIN = 60  # training rows of the SVM fixtures: linfa stores one alpha per training row
SVM_KERNELS = {  # name: (linfa KernelMethod as rmp-serde writes it, the SVR that supplies the coefficients, labels)
    "linfa_svm_rbf": ({"Gaussian": 8.0}, SVR(kernel="rbf", gamma=1 / 8.0, C=4.0), "y"),
    "linfa_svm_linear": ("Linear", SVR(kernel="linear", C=1.0), "y"),
    "linfa_svm_poly": ({"Polynomial": [1.0, 2.0]}, SVR(kernel="poly", gamma=1.0, coef0=1.0, degree=2, C=1.0), "y2"),
}


def svm_fixture(kernel: object, fit: SVR, x: np.ndarray, y: np.ndarray) -> list:
    """``bindings/linfa.rs`` ``Svm { estimator, num_features }`` with the fields of ``linfa_svm::Svm`` in order:
    alpha (one per training row), rho, r (nu-SVMs only), exit_reason (unit variant: its name), iterations, obj,
    kernel_method, sep_hyperplane (Linear(w) for the linear kernel, else WeightedCombination(support vectors)),
    probability_coeffs, phantom (PhantomData: a unit struct, an empty array)."""
    fit.fit(x[:SVM_TRAIN], y[:SVM_TRAIN])
    alpha = np.zeros(SVM_TRAIN, dtype=np.float32)
    alpha[fit.support_] = fit.dual_coef_[0]
    alpha[np.setdiff1d(np.arange(SVM_TRAIN), fit.support_)[0]] = 5e-6  # under linfa's 100 * f32::EPSILON: not counted
    if kernel == "Linear":  # solver_smo.rs: w = sum(alpha_i * x_i), no support vectors kept
        plane = {"Linear": ndarray(np.asarray(fit.coef_[0], dtype=np.float32))}
    else:
        counted = np.abs(alpha) > np.float32(100) * np.finfo(np.float32).eps
        plane = {"WeightedCombination": ndarray(x[:SVM_TRAIN][counted])}
    rho = float(np.float32(-fit.intercept_[0]))
    fields = [f32(alpha), rho, None, "ReachedThreshold", int(fit.n_iter_), -1.0, kernel, plane, None, []]
    return [fields, FEATURES]


def rust_sum(values: list[np.float32]) -> np.float32:
    """ndarray's ``sum()`` (numeric_util::unrolled_fold: eight f32 accumulators, then the rest in order)."""
    parts, acc = [np.float32(0)] * 8, np.float32(0)
    while len(values) >= 8:
        parts, values = [np.float32(p + v) for p, v in zip(parts, values[:8], strict=True)], values[8:]
    for i in range(4):
        acc = np.float32(acc + np.float32(parts[i] + parts[i + 4]))
    for v in values:
        acc = np.float32(acc + v)
    return acc


def linfa_svm_predict(svm: list, x: np.ndarray) -> list[float]:
    """linfa-svm's ``Svm::predict`` for f32 targets (regression.rs): ``weighted_sum(x) - rho``, in f32 as Rust does
    (expf / powf correctly rounded, as glibc's are); an independent reading of the stored fields."""
    alpha, rho, _, _, _, _, kernel, plane, _, _ = svm[0]
    ((kind, array),) = plane.items()
    data = np.asarray(array[2], dtype=np.float32).reshape(array[1])

    def distance(a: np.ndarray, b: np.ndarray) -> np.float32:  # linfa-kernel KernelMethod::distance
        if kernel == "Linear":
            return rust_sum(list(a * b))
        if "Gaussian" in kernel:
            squares = np.float32(0)
            for u, v in zip(a, b, strict=True):  # an iterator's sum: in order
                squares = np.float32(squares + np.float32((u - v) * (u - v)))
            return np.float32(math.exp(float(np.float32(-squares / np.float32(kernel["Gaussian"])))))
        c, d = (np.float32(v) for v in kernel["Polynomial"])
        return np.float32(math.pow(float(np.float32(rust_sum(list(a * b)) + c)), float(d)))

    out = []
    for row in x:
        if kind == "Linear":
            total = rust_sum(list(data * row))
        else:
            total = np.float32(0)
            counted = np.float32(100) * np.finfo(np.float32).eps
            weights = [a for a in np.asarray(alpha, dtype=np.float32) if abs(a) > counted]
            for vector, a in zip(data, weights, strict=True):
                total = np.float32(total + np.float32(distance(vector, row) * a))
        out.append(float(np.float32(total - np.float32(rho))))
    return out


def svm_fixtures(x: np.ndarray, y: np.ndarray, y2: np.ndarray, y3: np.ndarray) -> dict[str, bytes]:
    labels = {"y": y, "y2": y2}
    return {
        name: msgpack.packb(svm_fixture(kernel, fit, x, labels[target]), use_single_float=True)
        for name, (kernel, fit, target) in SVM_KERNELS.items()
    }


def booster_fixtures(x: np.ndarray, y: np.ndarray, y2: np.ndarray, y3: np.ndarray) -> dict[str, bytes]:
    regression = xgboost.train({"objective": "reg:linear", "max_depth": 3}, xgboost.DMatrix(x, label=y), 8)
    classes = xgboost.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, xgboost.DMatrix(x, label=y3), 6
    )
    lgb_regression = lightgbm.train({"objective": "regression", "verbose": -1}, lightgbm.Dataset(x, y), 10)
    lgb_binary = lightgbm.train({"objective": "binary", "verbose": -1}, lightgbm.Dataset(x, y2), 10)
    return {
        "xgboost_regression": bytes(regression.save_raw("deprecated")),  # 2.1+: Booster::save to a .bin file
        "xgboost_classification_2.0.0": prefix(FEATURES, 3) + bytes(classes.save_raw("deprecated")),
        "lightgbm_regression": lgb_regression.model_to_string().encode(),
        "lightgbm_binary_2.0.0": prefix(FEATURES, 2) + lgb_binary.model_to_string().encode(),
    }


def original_predictions(name: str, raw: bytes, x: np.ndarray) -> list[float] | None:
    """What PostgresML predicts for ``x`` with the model (its bindings' predict), by the library that wrote it."""
    if name.startswith("xgboost"):
        booster = xgboost.Booster()
        booster.load_model(bytearray(raw[16:] if name.endswith("2.0.0") else raw))
        y = booster.predict(xgboost.DMatrix(x))
        return f32(np.argmax(y, axis=1) if y.ndim == 2 else y)
    if name.startswith("lightgbm"):
        p = lightgbm.Booster(model_str=raw[raw.index(b"tree\n") :].decode()).predict(x)
        return f32(np.round(p) if "binary" in name else p)
    if name == "sklearn_pickle":
        return f32(pickle.loads(raw).predict(x))
    if name.startswith("linfa_svm"):
        return linfa_svm_predict(msgpack.unpackb(raw), x)
    return None  # linfa's linear models: computed by the test from the coefficients, with linfa's formulas


def main(names: list[str]) -> None:
    x, y, y2, y3 = data()
    fixtures = {**linfa_fixtures(x, y, y2, y3), **svm_fixtures(x, y, y2, y3)}
    if not names or not set(names) <= set(fixtures):  # the boosters need XGBoost 2.1
        fixtures.update(booster_fixtures(x, y, y2, y3))
        fixtures["sklearn_pickle"] = pickle.dumps(DecisionTreeRegressor(max_depth=4, random_state=0).fit(x, y))
        fixtures["corrupt"] = b"\x00\x01 not a model \xff" * 4
    probe = x[:16]
    expected = json.loads((HERE / "expected.json").read_text())["predictions"] if names else {}
    for name, raw in fixtures.items():
        if names and name not in names:
            continue
        (HERE / f"{name}.rmp").write_bytes(raw)
        predictions = original_predictions(name, raw, probe)
        if predictions is not None:
            expected[name] = predictions
    document = {"features": [f32(row) for row in probe], "predictions": expected}
    (HERE / "expected.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
