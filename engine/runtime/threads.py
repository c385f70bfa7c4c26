"""``pgml.omp_num_threads``: at most that many compute threads for one call's model work.

Owns: :func:`limited`, which lowers (never raises) the thread count of the calling engine worker thread for
the duration of one piece of a call's work under its compute turn, and puts it back after: torch's intra-op
threads (``torch.set_num_threads``: OpenMP's per-thread setting and MKL's thread-local one) and, through
threadpoolctl, every other OpenMP runtime loaded (XGBoost's, LightGBM's, scikit-learn's). Both are settings
of the calling thread, which is what a session's work runs in. What leaks: torch also keeps the value as the
default of threads that first use it meanwhile, and a job of another session that starts computing while
the limit holds (``[engine] workers`` > 1) may pick that up for its first use; BLAS pools (OpenBLAS) are
process-wide and are left alone.

Must not: raise a thread count, or import torch unless a limit applies (lazy loading of ML libraries, as
everywhere in the engine).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no type information

from engine.api import SessionSettings

log = logging.getLogger(__name__)


@contextmanager
def limited(settings: SessionSettings | None, function: str) -> Iterator[None]:
    """Within it, the calling thread computes with at most ``settings.omp_num_threads`` threads (unset: as is)."""
    wanted = settings.omp_num_threads if settings is not None else None
    if wanted is None:
        yield
        return
    import torch  # lazy: torch takes seconds to import; only once a session asks for fewer threads

    before = torch.get_num_threads()
    count = min(wanted, before)
    if count < before:
        torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="openmp"):
            log.debug("pgml.%s computes with %d threads (pgml.omp_num_threads)", function, torch.get_num_threads())
            yield
    finally:
        if count < before:
            torch.set_num_threads(before)
