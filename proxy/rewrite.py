"""The rewrite seam: for every Query/Parse, one decision.

Owns: the cheap ``pgml`` pre-check and the :class:`Decision` values a session acts
on (forward as is / forward rewritten frames / answer the client / fail).

Must not: write to sockets. The session executes decisions; this module only
decides. Detection and evaluation of ``pgml.*`` calls plug in behind
:meth:`Rewriter.decide`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import ProxyError
from proxy.protocol import Parse, Query

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive)."""
    return _PGML.search(raw) is not None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the original frame upstream unchanged."""


@dataclass(frozen=True, slots=True)
class Rewritten:
    """Send these frames upstream in place of the original."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client directly with these frames; nothing goes upstream."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The statement fails with this error (the upstream transaction must fail too)."""

    error: ProxyError


Decision = Forward | Rewritten | Respond | Fail
FORWARD = Forward()


class Rewriter:
    """Decides what happens to a statement that mentions ``pgml``.

    The foundation forwards everything; ``pgml.*`` evaluation plugs in here.
    """

    async def decide(self, message: Query | Parse) -> Decision:
        return FORWARD
