"""Configured directories the engine may read from (``[engine] data_dirs``, ``model_dirs``), and containment.

Owns: a list of directories as configured (made absolute) and resolved (symbolic links
followed), and the two questions asked of a path: does its text name something under one
of them, and does it — every link resolved — really lie under one.

Must not: open, list or create anything (``os.path.realpath`` only resolves links), or
decide what a refusal says (``engine.ml.datasets.files`` and ``engine.runtime.locate`` do, each alike for
existing and missing paths).
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def contains(root: str, path: str) -> bool:
    """``path`` is ``root`` or lies under it (both absolute and normalized)."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


class Roots:
    """Directories as configured (made absolute) and resolved (symbolic links followed)."""

    def __init__(self, dirs: Sequence[str]) -> None:
        configured = [d for d in dirs if d]
        self.real = tuple(os.path.realpath(d) for d in configured)
        self.lexical = tuple(dict.fromkeys([*(os.path.abspath(d) for d in configured), *self.real]))

    @property
    def base(self) -> str | None:
        """Where relative paths start: the first directory (None: none configured)."""
        return self.real[0] if self.real else None

    def within(self, path: str) -> bool:
        """``path`` (absolute, normalized) names something under one of the directories, by its text alone."""
        return any(contains(root, path) for root in self.lexical)

    def really_within(self, path: str) -> bool:
        """``path`` with every symbolic link resolved (existing or not) lies under a resolved directory."""
        real = os.path.realpath(path)
        return any(contains(root, real) for root in self.real)
