"""The connection's phase and every transition between phases, as data (h11's ``_state.py`` rule).

Owns: :class:`Phase` (where one client connection stands), :class:`Event` (what moves it),
:data:`TRANSITIONS` (``(phase, event) -> phase``; a pair not listed leaves the phase as it is),
and :class:`State`, one per connection: its phase, the server's transaction status from the last
ReadyForQuery, and how many ReadyForQuery messages the server still owes.

The client's messages move the phase by their type byte (:data:`CLIENT_EVENTS`): Query, Sync and
FunctionCall end a batch (each is answered by ReadyForQuery), Parse, Bind, Describe, Execute and
Close are inside one, Terminate ends the connection, and the rest (Flush, COPY data, password
messages) move nothing — a COPY is part of the Query or the batch that started it, so it needs no
phase of its own. Skip-until-Sync is one phase, :attr:`Phase.SKIP_TO_SYNC` (asyncpg's
``ERROR_CONSUME``): entered when the server answered the batch with an error or the proxy failed it
on purpose, left at the next batch end.

Must not: do I/O, decode messages (callers pass type bytes and events), or know about statements.
Its one asyncio object is :attr:`State.idle`, which decisions wait on (a future made only for a
waiter: the relay's hot path counts ReadyForQuery messages and touches no asyncio object).
"""

from __future__ import annotations

import asyncio
import enum

from proxy.wire.frames import Frontend


class Phase(enum.Enum):
    """Where the connection stands, seen from the messages that went upstream."""

    # Members are singletons: identity is their hash (Enum's own hashes the name, a Python call per lookup).
    __hash__ = object.__hash__

    STARTUP = "startup"  # the shell negotiates with the client (SSL, startup packet) and connects upstream
    AUTHENTICATING = "authenticating"  # the server authenticates the client (relayed) until its first ReadyForQuery
    READY = "ready"  # between batches: the last batch end (Query, Sync, FunctionCall) went upstream
    IN_BATCH = "in-batch"  # extended-protocol messages went upstream since then: an implicit transaction is open
    OWN_BATCH = "own-batch"  # the proxy's own statements (ended by Flush) opened it, for the Query being decided
    SKIP_TO_SYNC = "skip-to-sync"  # the batch failed: the server discards everything up to its end
    TERMINATING = "terminating"  # the client sent Terminate
    UPSTREAM_FAILED = "upstream-failed"  # the server sent a FATAL error; it closes the connection
    CLOSED = "closed"


class Event(enum.Enum):
    """What moves the phase."""

    __hash__ = object.__hash__

    CONNECTED = "connected"  # the shell sent the startup packet upstream
    AUTHENTICATED = "authenticated"  # the ReadyForQuery that ends authentication arrived
    BATCH_END = "batch-end"  # a Query, Sync or FunctionCall went upstream (the client's or the proxy's)
    EXTENDED = "extended"  # a Parse, Bind, Describe, Execute or Close went upstream
    OWN_FLUSH = "own-flush"  # the proxy's own statements went upstream, ended by Flush
    ERROR = "error"  # the server answered the batch being sent with an ErrorResponse
    FAILED = "failed"  # the proxy failed the batch on purpose (the server is made to fail it too)
    DECIDED = "decided"  # a decision was applied
    TERMINATE = "terminate"  # the client's Terminate
    FATAL = "fatal"  # the server's FATAL error
    CLOSE = "close"  # the shell closes both sides


# Phases in which the client's statements are relayed and decided (authentication is over, nothing ended).
ACTIVE = frozenset({Phase.READY, Phase.IN_BATCH, Phase.OWN_BATCH, Phase.SKIP_TO_SYNC})
# Phases in which the connection is ending: nothing more is said to the client about the upstream going away.
ENDING = frozenset({Phase.TERMINATING, Phase.UPSTREAM_FAILED, Phase.CLOSED})


def _every(phases: frozenset[Phase], event: Event, target: Phase) -> dict[tuple[Phase, Event], Phase]:
    return {(phase, event): target for phase in phases}


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.STARTUP, Event.CONNECTED): Phase.AUTHENTICATING,
    (Phase.AUTHENTICATING, Event.AUTHENTICATED): Phase.READY,
    **_every(ACTIVE, Event.BATCH_END, Phase.READY),
    (Phase.READY, Event.EXTENDED): Phase.IN_BATCH,
    (Phase.READY, Event.OWN_FLUSH): Phase.OWN_BATCH,
    (Phase.OWN_BATCH, Event.DECIDED): Phase.IN_BATCH,  # a Respond left the proxy's implicit transaction open
    (Phase.IN_BATCH, Event.ERROR): Phase.SKIP_TO_SYNC,
    (Phase.OWN_BATCH, Event.ERROR): Phase.SKIP_TO_SYNC,
    # READY + ERROR: nothing was sent since the batch end, so the error fails no batch (the phase stays).
    # READY + FAILED: the proxy rejects the first message of a batch; what it sends to fail the server opens it.
    **_every(frozenset({Phase.READY, Phase.IN_BATCH, Phase.OWN_BATCH}), Event.FAILED, Phase.SKIP_TO_SYNC),
    **_every(ACTIVE | {Phase.AUTHENTICATING}, Event.TERMINATE, Phase.TERMINATING),
    **_every(ACTIVE | {Phase.AUTHENTICATING, Phase.TERMINATING}, Event.FATAL, Phase.UPSTREAM_FAILED),
    **_every(frozenset(Phase), Event.CLOSE, Phase.CLOSED),
}
# The event of each client message type (as relayed upstream); types not listed move nothing.
CLIENT_EVENTS: dict[int, Event] = {
    **dict.fromkeys(b"QSF", Event.BATCH_END),
    **dict.fromkeys(b"PBDEC", Event.EXTENDED),
    int(Frontend.TERMINATE): Event.TERMINATE,
}
BATCH_ENDS = frozenset(kind for kind, event in CLIENT_EVENTS.items() if event is Event.BATCH_END)
# The hot path's transition (a chunk ending with a batch end), looked up without building a key.
_AFTER_END = {phase: TRANSITIONS.get((phase, Event.BATCH_END), phase) for phase in Phase}
_END, _EXTENDED, _TERMINATE = b"s", b"x", b"t"
_CODE_OF = {Event.BATCH_END: _END[0], Event.EXTENDED: _EXTENDED[0], Event.TERMINATE: _TERMINATE[0]}
# bytes.translate table: client type byte -> one-letter event code (messages without an event are deleted).
_CODES = bytes(_CODE_OF[CLIENT_EVENTS[i]] if i in CLIENT_EVENTS else i for i in range(256))
_NO_EVENT = bytes(i for i in range(256) if i not in CLIENT_EVENTS)
_STATUS = tuple(chr(i) for i in range(256))  # a ReadyForQuery status byte as the letter it is


class Idle:
    """Awaitable moment when the server owes no ReadyForQuery: :meth:`wait` returns then (at once if it owes none)."""

    __slots__ = ("_state", "waiters")

    def __init__(self, state: State) -> None:
        self._state = state
        self.waiters: list[asyncio.Future[None]] = []  # made by wait(), woken by State.ready()

    async def wait(self) -> None:
        if self._state.owed:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def wake(self) -> None:
        """Nothing is owed any more: every waiter goes on."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class State:
    """One connection's phase, transaction status and owed ReadyForQuery messages."""

    __slots__ = ("idle", "owed", "phase", "sends", "tx_status")

    def __init__(self) -> None:
        self.phase = Phase.STARTUP
        self.tx_status = "I"  # from the server's last ReadyForQuery
        self.owed = 0  # ReadyForQuery messages the server still owes (one per batch end sent)
        self.idle = Idle(self)  # decisions wait on it until nothing is owed
        self.sends = 0  # times messages went upstream for the client (a change: something may be unanswered)

    def fire(self, event: Event) -> None:
        self.phase = TRANSITIONS.get((self.phase, event), self.phase)

    @property
    def in_batch(self) -> bool:
        """Extended-protocol messages went upstream since the last batch end (its implicit transaction is open)."""
        return self.phase is Phase.IN_BATCH or self.phase is Phase.OWN_BATCH or self.phase is Phase.SKIP_TO_SYNC

    @property
    def in_transaction(self) -> bool:
        """Inside BEGIN, or inside an extended-protocol batch: what runs now commits with the client's work."""
        return self.tx_status != "I" or self.in_batch

    def owe(self, count: int = 1) -> None:
        self.owed += count

    def ready(self, status: int, count: int = 1) -> None:
        """``count`` ReadyForQuery messages arrived, the last with this transaction status byte."""
        self.tx_status = _STATUS[status]
        owed = self.owed - count
        self.owed = owed if owed > 0 else 0
        if owed <= 0 and self.idle.waiters:
            self.idle.wake()

    def sent(self, kinds: bytes | bytearray) -> int:
        """Client messages went upstream (their type bytes, in order): what they owe (returned: how many batch
        ends they hold), and the phase after them.

        The same as firing :data:`CLIENT_EVENTS` one message at a time (a test checks it), in a few
        C-level passes: a batch end takes every active phase to READY whatever came before it, an
        extended message is idempotent, and Terminate can only be last (nothing after it is read).
        """
        ends = kinds.count(81) + kinds.count(83) + kinds.count(70)  # Q, S, F
        self.owed += ends
        self.sends += 1
        if kinds[-1] in BATCH_ENDS:  # the usual chunk: whole batches or Queries
            self.phase = _AFTER_END[self.phase]
            return ends
        codes = kinds.translate(_CODES, _NO_EVENT)
        last_end = codes.rfind(_END)
        if last_end >= 0:
            self.fire(Event.BATCH_END)
        if _EXTENDED in codes[last_end + 1 :]:
            self.fire(Event.EXTENDED)
        if codes.endswith(_TERMINATE):
            self.fire(Event.TERMINATE)
        return ends
