"""``pgml.clear_gpu_cache(memory_usage)``: the engine's loaded models evicted and torch's cached GPU memory freed.

Owns: when a call frees memory (always without ``memory_usage``; with it, once the GPU's memory use, as
``torch.cuda.memory_usage()`` reports it in percent, reaches ``memory_usage * 100``, as PostgresML compares;
without a GPU always: PostgresML raises "No GPU available" there, the engine still frees its models),
and what it frees: every model of the shared :class:`~engine.runtime.cache.ModelCache`, then — when CUDA is
present — the CUDA caching allocator's unused blocks (``torch.cuda.empty_cache``).

Must not: import torch when nothing imported it yet (then no GPU memory was ever cached in this process), or
free memory a running call uses (models it holds stay alive until it ends).
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from engine.api import InvalidArgument
from engine.runtime.context import Context


def _cuda() -> Any:
    """torch.cuda when torch is loaded and CUDA is present, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


def clear_gpu_cache(rows: list[tuple[Any, ...]], ctx: Context) -> list[bool]:
    results = []
    for (memory_usage,) in rows:
        if memory_usage is not None and not 0 <= memory_usage <= 1:
            raise InvalidArgument("memory_usage must be a fraction between 0 and 1 (or NULL)")
        cuda = _cuda()
        if memory_usage and cuda is not None and cuda.memory_usage() < int(memory_usage * 100.0):
            results.append(False)
            continue
        ctx.cache.clear()
        gc.collect()  # the evicted models' tensors go now, so their blocks return to the allocator's cache
        if cuda is not None:
            cuda.empty_cache()
        results.append(True)
    return results
