"""The torch device a model runs on: ``[engine] device`` and what a client's ``"device"`` may ask for.

Owns: the choice for ``auto`` (CUDA, then MPS, then CPU; decided once), the devices this host has, and what a
requested device becomes: itself when present; the ``[engine] device`` choice, with a warning for the client,
when it names CUDA or MPS and the host has none (PostgresML's examples ask for ``"cuda"``); an error (22023)
naming the devices that exist for anything else (an unknown kind, a GPU index beyond the host's, a
``device_map`` naming one).

Must not: load models.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from engine.api import InvalidArgument

# device_map values that are placement strategies, not devices (accelerate's).
DEVICE_MAP_STRATEGIES = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})


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


@lru_cache(maxsize=1)
def devices() -> list[str]:
    """The devices of this host, as torch names them: ``cpu``, each ``cuda:<n>``, ``mps``."""
    import torch  # lazy: torch takes seconds to import; only model code needs it

    found = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]
    mps = getattr(torch.backends, "mps", None)
    return [*found, "mps"] if mps is not None and mps.is_available() else found


def _missing(requested: Any, present: list[str]) -> InvalidArgument:
    return InvalidArgument(
        f"device {requested!r} does not exist on the pgml-proxy host",
        detail=f"Devices here: {', '.join(present)}.",
        hint='Name one of them, or leave "device" out to use [engine] device.',
    )


def usable_device(requested: Any, setting: str) -> tuple[Any, str | None]:
    """A device a client asked for (``"device": "cuda"``, ``"cuda:1"``, an index as transformers takes it), or —
    when this host has no CUDA (MPS) at all and it asks for one — the ``[engine] device`` choice instead, with a
    warning for the client; 22023 naming the host's devices for a device that cannot be."""
    if isinstance(requested, int) and not isinstance(requested, bool):
        requested = "cpu" if requested < 0 else f"cuda:{requested}"  # transformers' pipeline(device=n)
    if not isinstance(requested, str):
        raise InvalidArgument('"device" must be a device name such as "cpu" or "cuda:0"')
    present = devices()
    kind, _, index = requested.lower().partition(":")
    if kind in ("cuda", "mps") and not any(d.startswith(kind) for d in present):
        fallback = pick_device(setting)
        return fallback, f'device "{requested}" is not available on the pgml-proxy host; using "{fallback}" instead'
    if kind == "cpu" and not index:
        return requested, None
    if kind == "cuda" and (not index or f"cuda:{index}" in present):
        return requested, None
    if kind == "mps" and (not index or index == "0"):
        return requested, None
    raise _missing(requested, present)


def usable_device_map(requested: Any, setting: str) -> tuple[Any, str | None]:
    """A ``device_map``: strategies and per-module maps as given; a device name checked as ``"device"`` is."""
    if not isinstance(requested, str) or requested in DEVICE_MAP_STRATEGIES:
        return requested, None
    return usable_device(requested, setting)
