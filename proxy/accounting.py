"""Which upstream responses belong to the client, and which answer messages the proxy injected.

Owns: the responses the upstream still owes, grouped in *segments* — the
messages up to and including one message answered by ReadyForQuery (Query, Sync,
FunctionCall). Responses arrive in order, so the oldest open segment is the one
being answered, and its ReadyForQuery closes it (after an error the server skips
the rest of that segment, which is then simply forgotten). Inside a segment, the
n-th ParseComplete/BindComplete/CloseComplete answers its n-th Parse/Bind/Close:
that is how the completion of a message the proxy injected is found and hidden.
Barriers are injected Parses whose completion proves every earlier response of
the segment has arrived.

Must not: do I/O. The session reports what it sends and receives.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

ONE, TWO, THREE = ord("1"), ord("2"), ord("3")
Z, E = ord("Z"), ord("E")
# Client message -> the completion message that answers it.
ANSWERS = {ord("P"): ONE, ord("B"): TWO, ord("C"): THREE}
# Client messages answered by ReadyForQuery: each closes a segment.
CLOSERS = frozenset(b"QSF")
_P, _B, _C, _Q, _S, _F = b"PBCQSF"


@dataclass
class Segment:
    sent: dict[int, int] = field(default_factory=lambda: {ONE: 0, TWO: 0, THREE: 0})
    received: dict[int, int] = field(default_factory=lambda: {ONE: 0, TWO: 0, THREE: 0})
    hidden: set[tuple[int, int]] = field(default_factory=set)
    hidden_errors: int = 0  # ErrorResponses the proxy provoked on purpose (to make the server skip to Sync)
    barriers: dict[int, asyncio.Future[bool]] = field(default_factory=dict)

    def fail_barriers(self) -> None:
        for waiter in self.barriers.values():
            if not waiter.done():
                waiter.set_result(False)
        self.barriers.clear()


class Responses:
    """Segments still owed a ReadyForQuery (oldest first); the last one is still being written."""

    def __init__(self) -> None:
        self.segments: deque[Segment] = deque([Segment()])
        self._hidden = 0  # hidden completions not yet seen, over all segments

    @property
    def busy(self) -> bool:
        """True while some response must be inspected one frame at a time."""
        return self._hidden > 0

    def sent(self, kinds: bytes | bytearray) -> None:
        """Client messages forwarded (their type bytes, in order)."""
        if _P not in kinds and _B not in kinds and _C not in kinds:  # simple queries: only boundaries
            for _ in range(kinds.count(_Q) + kinds.count(_S) + kinds.count(_F)):
                self.segments.append(Segment())
            return
        current = self.segments[-1]
        for kind in kinds:
            answer = ANSWERS.get(kind)
            if answer is not None:
                current.sent[answer] += 1
            elif kind in CLOSERS:
                current = Segment()
                self.segments.append(current)

    def received(self, kinds: bytes | bytearray) -> None:
        """Responses seen on the fast path (nothing hidden is pending): count them, close segments."""
        if ONE not in kinds and TWO not in kinds and THREE not in kinds:
            for _ in range(kinds.count(Z)):
                self._close_oldest()
            return
        for kind in kinds:
            self.keep(kind)

    def inject(self, answer: int) -> int:
        """The proxy sends a message answered by ``answer`` now: hide that answer; returns its ordinal."""
        current = self.segments[-1]
        ordinal = current.sent[answer]
        current.sent[answer] += 1
        current.hidden.add((answer, ordinal))
        self._hidden += 1
        return ordinal

    def inject_error(self) -> None:
        """The proxy sends a message that fails on purpose: hide the ErrorResponse."""
        self.segments[-1].hidden_errors += 1
        self._hidden += 1

    def barrier(self) -> asyncio.Future[bool]:
        """An injected Parse is about to be sent: the future tells whether it completed (True)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.segments[-1].barriers[self.inject(ONE)] = future
        return future

    def keep(self, kind: int) -> bool:
        """One response frame: False when it answers an injected message (hide it)."""
        oldest = self.segments[0]
        if kind in oldest.received:
            ordinal = oldest.received[kind]
            oldest.received[kind] += 1
            if (kind, ordinal) in oldest.hidden:
                oldest.hidden.discard((kind, ordinal))
                self._hidden -= 1
                waiter = oldest.barriers.pop(ordinal, None) if kind == ONE else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(True)
                return False
        elif kind == E:
            oldest.fail_barriers()  # the server now skips the rest of this segment
            if oldest.hidden_errors:
                oldest.hidden_errors -= 1
                self._hidden -= 1
                return False
        elif kind == Z:
            self._close_oldest()
        return True

    def _close_oldest(self) -> None:
        oldest = self.segments[0]
        oldest.fail_barriers()
        self._hidden -= len(oldest.hidden) + oldest.hidden_errors
        if len(self.segments) > 1:
            self.segments.popleft()
        else:  # a ReadyForQuery nothing was waiting for (end of authentication)
            self.segments[0] = Segment()
