"""Bounded memories of the rewriter: least recently used first out.

Owns: :class:`Memo`, a map bounded by its number of entries and by the total size of its entries
(a size function given), that forgets the least recently used entry first.

Must not: know what it holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most ``entries`` entries of at most ``size_limit`` in all; one over a quarter of it is not kept."""

    def __init__(
        self, entries: int | None = None, size_limit: int | None = None, size: Callable[[K, V], int] | None = None
    ) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._entries, self._size_limit = entries, size_limit
        self._size = size or (lambda key, value: 0)
        self._total = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        size = self._size(key, value)
        if self._size_limit is not None and size > self._size_limit // 4:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._total -= self._size(key, old)
        self._items[key] = value
        self._total += size
        while (self._entries is not None and len(self._items) > self._entries) or (
            self._size_limit is not None and self._total > self._size_limit
        ):
            old_key, old_value = self._items.popitem(last=False)
            self._total -= self._size(old_key, old_value)
