"""Library warnings (scikit-learn deprecations, transformers' notes), collected once per engine call.

Owns: the process-wide ``warnings.showwarning`` hook (:func:`install`, at engine start), the :class:`Collector`
of one call (each distinct warning once, with how often it came), and which call a worker thread runs
(:func:`running`, entered by ``engine.runtime.turns`` around a job's work): a warning shown in that thread
goes to that call's collector, and its first occurrence per call to the debug log; a warning shown outside
any call goes to the debug log. ``warnings.catch_warnings`` cannot do this: it swaps process-wide state and
is not thread-safe, and the libraries' own uses of it reset the "show once per location" registry, which is
why one grid search used to print the same warning at every fit.

Must not: change the warning filters (what is shown stays Python's and the libraries' decision), or log at info
and above (warning texts may quote client data: column names, values).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger(__name__)
# Distinct warnings kept per call (a library warning in a loop over the client's columns could name each one).
MAX_DISTINCT = 100

_current = threading.local()  # .key: the call this worker thread runs now (its cancel flag, a Job)
_lock = threading.Lock()


class Collector:
    """One call's distinct warnings, in the order they first came, with how often Python showed each (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}

    def add(self, category: str, message: str) -> bool:
        """Count one warning; True the first time this call sees it (past MAX_DISTINCT: False, not kept)."""
        key = (category, message)
        with self._lock:
            if key in self._seen:
                self._seen[key] += 1
                return False
            if len(self._seen) >= MAX_DISTINCT:
                return False
            self._seen[key] = 1
            return True

    def entries(self) -> list[dict[str, Any]]:
        """The warnings as ``pgml.logs`` entries: ``{"warning": category, "message": text, "count": n}``."""
        with self._lock:
            return [{"warning": c, "message": m, "count": n} for (c, m), n in self._seen.items()]


_collectors: weakref.WeakKeyDictionary[object, Collector] = weakref.WeakKeyDictionary()


def collector(call: object) -> Collector:
    """The collector of ``call`` (its cancel flag: one per call), made on first use, gone with the flag."""
    with _lock:
        found = _collectors.get(call)
        if found is None:
            found = _collectors[call] = Collector()
        return found


@contextmanager
def running(call: object) -> Iterator[None]:
    """This thread runs ``call``'s work for the block: the warnings it shows are that call's."""
    previous = getattr(_current, "key", None)
    _current.key = call
    try:
        yield
    finally:
        _current.key = previous


def show(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None,
) -> None:  # fmt: skip
    """``warnings.showwarning``: to the running call's collector, and once per call to the debug log."""
    call = getattr(_current, "key", None)
    text = str(message)
    if call is not None and not collector(call).add(category.__name__, text):
        return
    log.debug("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def install() -> None:
    """Route every warning Python shows through :func:`show` (once, at engine start; process-wide)."""
    warnings.showwarning = show
