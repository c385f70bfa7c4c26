"""PostgresML's built-in datasets: scikit-learn's bundled copies of PostgresML's embedded CSVs.

Owns: the six built-ins with PostgresML's exact table and column names, column order, SQL types and label
conventions.

Must not: talk to a database, or import scikit-learn at import time (``sklearn.datasets`` is imported
when a built-in is loaded: it pulls in most of scikit-learn).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from engine.api import EngineError
from engine.ml.datasets.table import Columns, Rows

_BC_FEATURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
BREAST_CANCER_FEATURES = (
    tuple(f"mean {f}" for f in _BC_FEATURES)
    + tuple(f"{f} error" for f in _BC_FEATURES)
    + tuple(f"worst {f}" for f in _BC_FEATURES)
)
DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
# Column -> sklearn feature name.
IRIS_FEATURES = {
    "sepal_length": "sepal length (cm)",
    "sepal_width": "sepal width (cm)",
    "petal_length": "petal length (cm)",
    "petal_width": "petal width (cm)",
}
# PostgresML's order: hue before color_intensity (sklearn has them the other way round).
WINE_FEATURES = (
    "alcohol",
    "malic_acid",
    "ash",
    "alcalinity_of_ash",
    "magnesium",
    "total_phenols",
    "flavanoids",
    "nonflavanoid_phenols",
    "proanthocyanins",
    "hue",
    "color_intensity",
    "od280/od315_of_diluted_wines",
    "proline",
)
LINNERUD_COLUMNS = ("chins", "situps", "jumps", "weight", "waist", "pulse")


def _bunch(loader: str, **kwargs: Any) -> Any:
    sk_datasets: Any = importlib.import_module("sklearn.datasets")
    return getattr(sk_datasets, loader)(**kwargs)


def _features(bunch: Any, wanted: dict[str, str], limit: int | None) -> list[list[float]]:
    """The rows of ``bunch.data`` restricted to ``wanted`` (column -> sklearn name), in ``wanted``'s order."""
    names = [str(n) for n in bunch.feature_names]
    missing = [sk for sk in wanted.values() if sk not in names]
    if missing:  # a scikit-learn release renamed something: better an error than shuffled columns
        raise EngineError(f"scikit-learn's dataset lacks the features {missing}")
    data = bunch.data[:limit, [names.index(sk) for sk in wanted.values()]]
    rows: list[list[float]] = data.tolist()
    return rows


def _real(names: Iterable[str]) -> Columns:
    return tuple((name, "real") for name in names)


def _labelled(features: Columns, x: list[list[float]], label: tuple[str, str], y: list[Any]) -> tuple[Columns, Rows]:
    return (*features, label), [(*row, value) for row, value in zip(x, y, strict=True)]


def _breast_cancer(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_breast_cancer")
    x = _features(bunch, {n: n for n in BREAST_CANCER_FEATURES}, limit)
    malignant = (bunch.target[:limit] == 0).tolist()  # sklearn: 0 = malignant, 1 = benign
    return _labelled(_real(BREAST_CANCER_FEATURES), x, ("malignant", "boolean"), malignant)


def _diabetes(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_diabetes", scaled=False)
    x = _features(bunch, {n: n for n in DIABETES_FEATURES}, limit)
    return _labelled(_real(DIABETES_FEATURES), x, ("target", "real"), bunch.target[:limit].tolist())


def _digits(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_digits")
    images = bunch.images[:limit].astype("int16").tolist()  # 8x8, values 0..16
    target = bunch.target[:limit].tolist()
    return (("image", "smallint[][]"), ("target", "smallint")), list(zip(images, target, strict=True))


def _iris(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_iris")
    x = _features(bunch, IRIS_FEATURES, limit)
    return _labelled(_real(IRIS_FEATURES), x, ("target", "integer"), bunch.target[:limit].tolist())


def _linnerud(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_linnerud")  # data: Chins, Situps, Jumps; target: Weight, Waist, Pulse
    exercise = _features(bunch, {c: c.capitalize() for c in LINNERUD_COLUMNS[:3]}, limit)
    names = [str(n) for n in bunch.target_names]
    order = [names.index(c.capitalize()) for c in LINNERUD_COLUMNS[3:]]
    physiological = bunch.target[:limit, order].tolist()
    return _real(LINNERUD_COLUMNS), [(*x, *y) for x, y in zip(exercise, physiological, strict=True)]


def _wine(limit: int | None) -> tuple[Columns, Rows]:
    bunch = _bunch("load_wine")
    x = _features(bunch, {n: n for n in WINE_FEATURES}, limit)
    return _labelled(_real(WINE_FEATURES), x, ("target", "integer"), bunch.target[:limit].tolist())


BUILTINS: dict[str, Callable[[int | None], tuple[Columns, Rows]]] = {
    "breast_cancer": _breast_cancer,
    "diabetes": _diabetes,
    "digits": _digits,
    "iris": _iris,
    "linnerud": _linnerud,
    "wine": _wine,
}
