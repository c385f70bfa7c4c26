"""The torch device a model runs on: ``[engine] device`` and what a client's ``"device"`` may ask for.

Owns: the choice for ``auto`` (CUDA, then MPS, then CPU; decided once) and the fallback, with a warning
for the client, when a requested device is missing on this host.

Must not: load models.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def pick_device(setting: str) -> str:
    """The torch device for ``[engine] device`` (auto: CUDA, then MPS, then CPU); decided once."""
    if setting != "auto":
        return setting
    import torch  # lazy: torch takes seconds to import; only model code needs it

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def usable_device(requested: Any, setting: str) -> tuple[Any, str | None]:
    """A device a client asked for (``"device": "cuda"``), or — when this host has no such device — the
    ``[engine] device`` choice instead, with a warning for the client (PostgresML's examples ask for CUDA;
    a CPU-only proxy host still runs them)."""
    if not isinstance(requested, str):
        return requested, None
    kind = requested.split(":", 1)[0].lower()
    if kind not in ("cuda", "mps"):
        return requested, None
    import torch  # lazy: torch takes seconds to import; only model code needs it

    if kind == "cuda" and torch.cuda.is_available():
        return requested, None
    mps = getattr(torch.backends, "mps", None)
    if kind == "mps" and mps is not None and mps.is_available():
        return requested, None
    fallback = pick_device(setting)
    return fallback, f'device "{requested}" is not available on the pgml-proxy host; using "{fallback}" instead'
