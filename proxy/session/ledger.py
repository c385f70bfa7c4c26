"""Which upstream responses belong to the client, and which answer messages the proxy injected.

Owns: the responses the upstream still owes, grouped in *segments* — the
messages up to and including one message answered by ReadyForQuery (Query, Sync,
FunctionCall). Responses arrive in order, so the oldest open segment is the one
being answered, and its ReadyForQuery closes it (after an error the server skips
the rest of that segment, which is then simply forgotten; whether that error failed
the batch still being sent is :attr:`Responses.answering_current`, and the failure
itself is the connection's phase, :mod:`proxy.session.state`). Inside a segment, the
n-th ParseComplete/BindComplete/CloseComplete answers its n-th Parse/Bind/Close:
that is how the completion of a message the proxy injected is found and hidden.
Barriers are injected Parses whose completion proves every earlier response of
the segment has arrived. A Query that runs statements of the proxy's own (the
``DO`` block raising a proxy error) marks them by position: the responses that
end statements and Executes (CommandComplete, EmptyQueryResponse, PortalSuspended)
are counted, so the ErrorResponse or notice that comes while such a statement runs
is known to be the proxy's own (the session then shows it without the mechanism),
whatever its text says.

Must not: do I/O, or keep the connection's phase. The core reports what it sends and receives.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection

from proxy.session.state import BATCH_ENDS
from proxy.wire.frames import Backend, Frontend

ONE, TWO, THREE = int(Backend.PARSE_COMPLETE), int(Backend.BIND_COMPLETE), int(Backend.CLOSE_COMPLETE)
Z, E, N = int(Backend.READY_FOR_QUERY), int(Backend.ERROR_RESPONSE), int(Backend.NOTICE_RESPONSE)
# Responses that end one statement of a Query or one Execute: how the statement being answered is known.
ENDS = frozenset(b"CIs")
_EXECUTE = int(Frontend.EXECUTE)  # a client's Execute (the same byte as a server's ErrorResponse)
# Client message -> the completion message that answers it.
ANSWERS = {int(Frontend.PARSE): ONE, int(Frontend.BIND): TWO, int(Frontend.CLOSE): THREE}
_P, _B, _C = b"PBC"


class Segment:
    """The messages up to one ReadyForQuery: completions sent/received by kind, and which to hide."""

    __slots__ = (
        "answered", "barriers", "executes", "hidden", "hidden_errors", "own", "own_fields", "received", "sent"
    )  # fmt: skip

    def __init__(self) -> None:
        self.sent = {ONE: 0, TWO: 0, THREE: 0}
        self.executes = 0  # Execute messages sent in this segment (each is ended by one of ENDS, or an error)
        self.own: frozenset[int] = frozenset()  # statements (counted in ENDS) that are the proxy's own
        self.answered = 0  # responses in ENDS received: the statement being answered (when ``own`` is set)
        self.own_fields: tuple[tuple[str, str], ...] = ()  # fields the proxy's own error adds (its position)
        self.received = {ONE: 0, TWO: 0, THREE: 0}
        self.hidden: set[tuple[int, int]] = set()
        self.hidden_errors = 0  # ErrorResponses the proxy provoked on purpose (to make the server skip to Sync)
        self.barriers: dict[int, asyncio.Future[bool]] = {}

    def fail_barriers(self) -> None:
        for waiter in self.barriers.values():
            if not waiter.done():
                waiter.set_result(False)
        self.barriers.clear()


class Responses:
    """Segments still owed a ReadyForQuery (oldest first); the last one is still being written.

    A segment with no Parse/Bind/Close and nothing injected is just ``None``: simple
    queries, the hot path, allocate nothing here.
    """

    def __init__(self) -> None:
        self.segments: deque[Segment | None] = deque([None])
        self._hidden = 0  # hidden responses not yet seen, over all segments
        self._marked = 0  # segments not yet closed with statements of the proxy's own

    @property
    def answering_current(self) -> bool:
        """True when the responses arriving now answer the messages still being sent (no batch end is owed)."""
        return len(self.segments) == 1

    @property
    def busy(self) -> bool:
        """True while some response must be inspected one frame at a time."""
        return self._hidden > 0 or self._marked > 0

    def _current(self) -> Segment:
        current = self.segments[-1]
        if current is None:
            current = self.segments[-1] = Segment()
        return current

    def sent(self, kinds: bytes | bytearray, closers: int) -> None:
        """Client messages forwarded (their type bytes, in order), ``closers`` of them batch ends (each closes a
        segment: :data:`proxy.session.state.BATCH_ENDS`, counted by :meth:`proxy.session.state.State.sent`)."""
        if self.segments[-1] is None and kinds[-1] in BATCH_ENDS:
            # Whole batches (the hot path): nothing was injected into them and nothing can be
            # any more, so their completions need no counting.
            if closers == 1:
                self.segments.append(None)
            else:
                self.segments.extend([None] * closers)
            return
        if closers <= 1 and (closers == 0 or kinds[-1] in BATCH_ENDS):  # the usual chunk: one batch at most
            if _P in kinds or _B in kinds or _C in kinds or _EXECUTE in kinds:
                current = self._current()
                sent = current.sent
                sent[ONE] += kinds.count(_P)
                sent[TWO] += kinds.count(_B)
                sent[THREE] += kinds.count(_C)
                current.executes += kinds.count(_EXECUTE)
            if closers:
                self.segments.append(None)
            return
        for kind in kinds:
            answer = ANSWERS.get(kind)
            if answer is not None:
                self._current().sent[answer] += 1
            elif kind == _EXECUTE:
                self._current().executes += 1
            elif kind in BATCH_ENDS:
                self.segments.append(None)

    def received(self, kinds: bytes | bytearray) -> None:
        """Responses seen on the fast path (nothing hidden is pending)."""
        if kinds[-1] == Z:  # every response here belongs to segments this chunk closes
            for _ in range(kinds.count(Z)):
                self._close_oldest()
            return
        for kind in kinds:
            self.keep(kind)

    def inject(self, answer: int) -> int:
        """The proxy sends a message answered by ``answer`` now: hide that answer; returns its ordinal."""
        current = self._current()
        ordinal = current.sent[answer]
        current.sent[answer] += 1
        current.hidden.add((answer, ordinal))
        self._hidden += 1
        return ordinal

    def own_statements(self, positions: Collection[int], fields: tuple[tuple[str, str], ...] = ()) -> None:
        """The Query about to be sent runs statements of the proxy's own at these 0-based positions of its
        string: an error or notice while one of them runs is the proxy's (see :meth:`own`); ``fields`` are
        what its ErrorResponse lacks (a position in the client's text)."""
        current = self._current()
        if not current.own:
            self._marked += 1
        current.own = frozenset(current.executes + position for position in positions)
        current.own_fields = fields

    def own(self, kind: int) -> tuple[tuple[str, str], ...] | None:
        """For an ErrorResponse / NoticeResponse not yet passed to :meth:`keep`: None when it is the server's,
        else the fields the proxy adds to it (none for a notice)."""
        oldest = self.segments[0]
        if kind not in (E, N) or oldest is None or oldest.answered not in oldest.own:
            return None
        return oldest.own_fields if kind == E else ()

    def inject_error(self) -> None:
        """The proxy sends a message that fails on purpose: hide the ErrorResponse."""
        self._current().hidden_errors += 1
        self._hidden += 1

    def barrier(self) -> asyncio.Future[bool]:
        """An injected Parse is about to be sent: the future tells whether it completed (True; False: an error
        came first, and the server skips the rest of the batch)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        ordinal = self.inject(ONE)
        self._current().barriers[ordinal] = future
        return future

    def keep(self, kind: int) -> bool:
        """One response frame: False when it answers an injected message (hide it)."""
        if kind == Z:
            self._close_oldest()
            return True
        oldest = self.segments[0]
        if oldest is None:
            return True
        if kind in ENDS and oldest.own:
            oldest.answered += 1
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
        return True

    def _close_oldest(self) -> None:
        oldest = self.segments.popleft()
        if oldest is not None:
            oldest.fail_barriers()
            self._hidden -= len(oldest.hidden) + oldest.hidden_errors
            self._marked -= bool(oldest.own)
        if not self.segments:  # a ReadyForQuery nothing was waiting for (end of authentication)
            self.segments.append(None)
