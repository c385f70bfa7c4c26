"""The shared model cache: one loaded copy per (kind, name, init kwargs) for the whole process.

Owns: :class:`ModelCache` (loads of one key wait for the first; least-recently-used eviction past
``[engine] cache_bytes``; :meth:`ModelCache.clear` for ``pgml.clear_gpu_cache``), how big a loaded model is
(:func:`model_bytes`), the bytes it holds and how long each load took (told to a callback: the metrics'
model load times).

Must not: resolve names or load anything itself (callers pass the loader), block the event loop
(everything here runs in workers), or log a cache key (it holds the client's init kwargs).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


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

    def __init__(self, limit_bytes: int, loaded: Callable[[float], None] | None = None) -> None:
        self._limit = limit_bytes
        self._loaded = loaded  # told the seconds of each load (engine.api.Observer.loaded)
        # Names already resolved to a path (hits only: a model added later is still found).
        self.resolved: dict[str, str] = {}
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @staticmethod
    def key(kind: str, name: str, init: dict[str, Any]) -> str:
        return json.dumps([kind, name, init], sort_keys=True, default=str)

    @staticmethod
    def label(key: str) -> str:
        """What the log may say about ``key``: the kind and the model, never the init kwargs (client data)."""
        try:
            decoded = json.loads(key)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and len(decoded) == 3:
            return f"{decoded[0]} model {decoded[1]}"
        return key if key.startswith("tuned/") else "a model"  # tuned/<database>/<model id>/<created>

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
            start = time.monotonic()
            model = loader()
            if self._loaded is not None:
                self._loaded(time.monotonic() - start)
            size = model_bytes(model)
            with self._lock:
                self._models[key] = (model, size)
                self._loading.pop(key, None)
                self._evict()
            log.info("loaded %s (%.1f MB)", self.label(key), size / 1e6)
            return model

    def _evict(self) -> None:
        total = sum(size for _, size in self._models.values())
        while total > self._limit and len(self._models) > 1:
            key, (_, size) = self._models.popitem(last=False)
            total -= size
            log.info("evicted %s from the model cache", self.label(key))

    def clear(self) -> int:
        """Forget every loaded model (calls using one keep it until they end); how many there were."""
        with self._lock:
            count = len(self._models)
            self._models.clear()
        if count:
            log.info("evicted %d models from the model cache", count)
        return count

    def bytes(self) -> int:
        """Bytes of the models held now."""
        with self._lock:
            return sum(size for _, size in self._models.values())

    def __len__(self) -> int:
        return len(self._models)
