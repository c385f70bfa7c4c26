"""The engine's Python environment, as PostgresML's environment functions report theirs.

Owns: ``pgml.python_version()`` (the engine's ``sys.version``), ``python_package_version(name)`` (an installed
distribution's version, by its distribution or its top-level module name), ``python_pip_freeze()`` (every
installed distribution as ``name==version``), ``validate_python_dependencies()`` (true once the libraries the
classical algorithms need are installed), ``validate_shared_library()`` (nothing to load here: the proxy is
there) and ``xgboost_version()``.

Must not: import a package a client names (versions come from installed metadata: nothing runs), or change
the environment (``pgml.activate_venv`` is plain SQL that says it is fixed).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import metadata
from importlib.util import find_spec
from typing import Any, ClassVar

from engine.api import EngineError
from engine.runtime.context import Context

# What PostgresML's validate_python_dependencies checks: module -> distribution.
DEPENDENCIES = {"xgboost": "xgboost", "lightgbm": "lightgbm", "numpy": "numpy", "sklearn": "scikit-learn"}


class UnknownPackage(EngineError):
    sqlstate: ClassVar[str] = "42704"  # undefined_object: no such package in the engine's environment


class MissingDependency(EngineError):
    sqlstate: ClassVar[str] = "58000"  # system_error: the engine's environment lacks a library it needs


def python_version(rows: list[tuple[Any, ...]], ctx: Context) -> list[str]:
    return [sys.version for _ in rows]


@lru_cache(maxsize=1)
def _modules() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def package_version(name: str) -> str:
    """The version of the distribution ``name`` (``scikit-learn``), or of the one that provides the top-level
    module ``name`` (``sklearn``, as PostgresML reads ``<module>.__version__``)."""
    try:
        return metadata.version(name)
    except (metadata.PackageNotFoundError, ValueError):
        pass
    for distribution in _modules().get(name, ()):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    raise UnknownPackage(
        f'Python package "{name}" is not installed in pgml-proxy\'s engine',
        hint="pgml.python_pip_freeze() lists the installed packages.",
    )


def python_package_version(rows: list[tuple[Any, ...]], ctx: Context) -> list[str | None]:
    return [None if name is None else package_version(name) for (name,) in rows]


def python_pip_freeze(rows: list[tuple[Any, ...]], ctx: Context) -> list[list[str]]:
    found = {(d.metadata["Name"] or "").strip(): d.version for d in metadata.distributions()}
    packages = [f"{name}=={version}" for name, version in sorted(found.items(), key=lambda i: i[0].lower()) if name]
    return [packages for _ in rows]


def validate_python_dependencies(rows: list[tuple[Any, ...]], ctx: Context) -> list[bool]:
    for module, distribution in DEPENDENCIES.items():
        if find_spec(module) is None:
            raise MissingDependency(
                f"The {module} package is missing from pgml-proxy's engine",
                hint=f"Install {distribution} into the environment pgml-proxy runs in (pip install {distribution}).",
            )
    return [True for _ in rows]


def validate_shared_library(rows: list[tuple[Any, ...]], ctx: Context) -> list[None]:
    """PostgresML raises unless ``pgml`` is preloaded; pgml-proxy has no server library: its answer is the check."""
    return [None for _ in rows]


def xgboost_version(rows: list[tuple[Any, ...]], ctx: Context) -> list[str]:
    return [package_version("xgboost") for _ in rows]
