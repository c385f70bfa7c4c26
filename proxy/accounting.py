"""Which upstream responses belong to the client, and which answer messages the proxy injected.

Owns: counting Parse/Bind/Close messages sent upstream and their completions
('1', '2', '3'), so that the completion of an injected message can be hidden
from the client by position; barriers (an injected Parse whose completion
proves every earlier response has arrived). Everything resets at ReadyForQuery,
since after an error the server answers nothing more until Sync.

Must not: do I/O. The session reports what it sends and receives.
"""

from __future__ import annotations

import asyncio

ONE, TWO, THREE = ord("1"), ord("2"), ord("3")
# Client message -> the completion message that answers it.
ANSWERS = {ord("P"): ONE, ord("B"): TWO, ord("C"): THREE}


class Responses:
    """Counters of completions owed and seen, plus the hidden ones and barriers waiting."""

    def __init__(self) -> None:
        self.unanswered = {ONE: 0, TWO: 0, THREE: 0}
        self.answered = {ONE: 0, TWO: 0, THREE: 0}
        self.hidden: set[tuple[int, int]] = set()
        self.barriers: dict[int, asyncio.Future[bool]] = {}

    @property
    def busy(self) -> bool:
        """True while some response must be inspected one frame at a time."""
        return bool(self.hidden)

    def sent(self, kinds: bytes | bytearray) -> None:
        """Client messages forwarded (their type bytes)."""
        for message, answer in ANSWERS.items():
            count = kinds.count(message)
            if count:
                self.unanswered[answer] += count

    def received(self, kinds: bytes | bytearray) -> None:
        """Completions seen on the fast path (nothing hidden is pending)."""
        for answer in (ONE, TWO, THREE):
            count = kinds.count(answer)
            if count:
                self.answered[answer] += count
                self.unanswered[answer] -= count

    def inject(self, answer: int) -> int:
        """The proxy sends a message answered by ``answer``: hide that answer; returns its position."""
        index = self.answered[answer] + self.unanswered[answer]
        self.unanswered[answer] += 1
        self.hidden.add((answer, index))
        return index

    def barrier(self) -> asyncio.Future[bool]:
        """An injected Parse is about to be sent: the future tells whether it completed (True)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.barriers[self.inject(ONE)] = future
        return future

    def keep(self, kind: int) -> bool:
        """One frame on the slow path: False when it answers an injected message."""
        if kind in self.answered:
            index = self.answered[kind]
            self.answered[kind] += 1
            self.unanswered[kind] -= 1
            if (kind, index) in self.hidden:
                self.hidden.discard((kind, index))
                waiter = self.barriers.pop(index, None) if kind == ONE else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(True)
                return False
        elif kind == ord("E"):
            self._fail_barriers()  # the server now skips everything until Sync
        return True

    def ready(self) -> None:
        """ReadyForQuery: nothing is owed any more."""
        self.unanswered = {ONE: 0, TWO: 0, THREE: 0}
        self.hidden.clear()
        self._fail_barriers()

    def _fail_barriers(self) -> None:
        for waiter in self.barriers.values():
            if not waiter.done():
                waiter.set_result(False)
        self.barriers.clear()
