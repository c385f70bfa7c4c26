"""The one seam between the proxy and the model engine.

Owns: the ``Engine`` protocol and the request/result types the proxy may use.
Must not: import torch, transformers or any ML library at module import time
(the relay path imports this module and must stay light).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Call:
    """One evaluation request: a qualified ``pgml.*`` function name and its argument values."""

    function: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()


class Engine(Protocol):
    """Evaluates batches of ``pgml.*`` calls off the event loop."""

    async def evaluate(self, calls: list[Call]) -> list[Any]:
        """Results in the order of ``calls``; raises ProxyError subclasses for user errors."""
        ...

    async def close(self) -> None:
        """Stop workers and free models."""
        ...
