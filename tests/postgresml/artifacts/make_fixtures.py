"""Write the PostgresML ``estimator.rmp`` fixtures of this folder, serialised as PostgresML 2.x does.

Run with an XGBoost that still writes the binary layout (2.1 is the last: ``save_raw("deprecated")``):
    python -m venv /tmp/old && /tmp/old/bin/pip install xgboost-cpu==2.1.4 lightgbm==4.7.0 \
        scikit-learn==1.9.1 msgpack==1.2.4 && /tmp/old/bin/python tests/postgresml/artifacts/make_fixtures.py
See README.md beside this file for the PostgresML source each layout follows.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import lightgbm
import msgpack
import numpy as np
import xgboost
from sklearn.linear_model import LogisticRegression, Ridge
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
    svm = [[[0.5], 0.1, None, "ReachedThreshold", 3, 0.2, {"Linear": None}, {"Linear": ndarray(x[0])}, None, None],
           FEATURES]  # fmt: skip
    pack = lambda v: msgpack.packb(v, use_single_float=True)  # noqa: E731 - serde f32 is msgpack float 32
    return {
        "linfa_linear_regression": pack(linear),
        "linfa_logistic_binary": pack([fitted, None, FEATURES, 2]),  # LogisticRegression binding
        "linfa_logistic_multi": pack([None, fitted_multi, FEATURES, 3]),
        "linfa_svm": pack(svm),
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
    return None  # linfa: computed by the test from the coefficients, with linfa's formulas


def main() -> None:
    x, y, y2, y3 = data()
    fixtures = {**booster_fixtures(x, y, y2, y3), **linfa_fixtures(x, y, y2, y3)}
    fixtures["sklearn_pickle"] = pickle.dumps(DecisionTreeRegressor(max_depth=4, random_state=0).fit(x, y))
    fixtures["corrupt"] = b"\x00\x01 not a model \xff" * 4
    probe = x[:16]
    expected = {}
    for name, raw in fixtures.items():
        (HERE / f"{name}.rmp").write_bytes(raw)
        predictions = original_predictions(name, raw, probe)
        if predictions is not None:
            expected[name] = predictions
    document = {"features": [f32(row) for row in probe], "predictions": expected}
    (HERE / "expected.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
