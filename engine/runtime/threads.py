"""``pgml.omp_num_threads``: at most that many compute threads for one call's model work.

Owns: :func:`limited`, which lowers the thread count of the calling engine worker thread for the duration of one
piece of a call's work under its compute turn, and puts back the engine's configured count after (torch's, as
recorded once before any limit applied): torch's intra-op threads (``torch.set_num_threads``: OpenMP's
per-thread setting and MKL's, which torch also keeps as the default of threads that first use it meanwhile)
and, through threadpoolctl, every other OpenMP runtime loaded (XGBoost's, LightGBM's, scikit-learn's). A thread
that picked up a lowered count that way (its first torch use while another session's limit held, ``[engine]
workers`` > 1) is raised back to the configured count when it next computes, limited or not. BLAS pools
(OpenBLAS) are process-wide and are left alone.

Must not: raise a thread count above the configured one, or import torch unless a limit applies (lazy loading
of ML libraries, as everywhere in the engine).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no type information

from engine.api import SessionSettings

log = logging.getLogger(__name__)


class _Configured:
    """torch's thread count as configured for the engine: recorded once, before any limit lowered it."""

    def __init__(self) -> None:
        self.count: int | None = None
        self.lock = threading.Lock()

    def record(self, torch: Any) -> int:
        with self.lock:
            if self.count is None:
                self.count = int(torch.get_num_threads())
            return self.count


_CONFIGURED = _Configured()


@contextmanager
def limited(settings: SessionSettings | None, function: str) -> Iterator[None]:
    """Within it, the calling thread computes with at most ``settings.omp_num_threads`` threads (unset: the
    configured count, once a limit was ever applied); after it, with the configured count."""
    wanted = settings.omp_num_threads if settings is not None else None
    if wanted is None:
        if _CONFIGURED.count is not None:  # torch is imported: undo a lowered count this thread picked up
            _restore(_torch(), _CONFIGURED.count)
        yield
        return
    torch = _torch()
    configured = _CONFIGURED.record(torch)
    count = min(wanted, configured)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="openmp"):
            log.debug("pgml.%s computes with %d threads (pgml.omp_num_threads)", function, torch.get_num_threads())
            yield
    finally:
        _restore(torch, configured)


def _torch() -> Any:
    import torch  # lazy: torch takes seconds to import; only once a session asks for fewer threads

    return torch


def _restore(torch: Any, configured: int) -> None:
    """The calling thread (and torch's default for new ones) back at the configured count."""
    if torch.get_num_threads() != configured:
        torch.set_num_threads(configured)
