"""What happens to each client message: one table, message kind x phase -> route.

Owns: :class:`Kind` (what a client message is to the proxy), :class:`Route` (relay / decide /
answer / forget / inject / check), :data:`ROUTES` (the table; a kind a phase does not list is
relayed as it is), and :class:`Router`, which tells one connection's frames apart — per chunk,
cheaply, for the hot path (:meth:`Router.plain`: may any frame here be of a kind the phase routes?),
and per frame (:meth:`Router.route`). Both read the same table and the same kinds in the same
order, and the chunk test takes the phase a Sync inside the chunk leads to (a chunk's frames are routed
one at a time, each in the phase the frames before it left): the chunk test may only say "look" more
often than the frame tests, never less.

A frame is of the first kind in :data:`ORDER` that it matches among the kinds its phase routes.
In a callback session every Q/P/B/D/E/C/F is routed to DECIDE (:mod:`proxy.rewrite.callback_guard` refuses all
but a stub's calls); else proxy-owned statements, portals and cursors (:meth:`proxy.streams.owned.Owned.claims`)
come first.

Must not: decode more than a kind needs, do I/O, or change state (the core relays, forgets, injects
and starts decisions; :meth:`Owned.claims` forgets the names a message takes back from the proxy).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from proxy.rewrite import decide, unqualified
from proxy.rewrite.decide import Rewriter
from proxy.session.decisions import Decider
from proxy.session.state import BATCH_ENDS, Phase, State
from proxy.session.traffic import Traffic
from proxy.wire import messages as pq
from proxy.wire.frames import Frame, Frontend, Kinds


class Kind(enum.Enum):
    """What a client message is, as far as the proxy is concerned (:data:`TYPES`: the type bytes it can have)."""

    __hash__ = object.__hash__  # identity, as for Phase

    CALLBACK = "callback"  # Q/P/B/D/E/C/F of a callback session (proxy.rewrite.callback_guard decides first)
    OWNED = "owned"  # P/B/D/E/C naming a proxy-owned statement, portal or cursor
    STATEMENT = "statement"  # Q/P the rewriter must see: pgml, a bare pgml name, an EXECUTE of a pgml PREPARE, a FETCH
    DEFERRED_BIND = "deferred-bind"  # B of a statement whose pgml calls wait for their $n values
    REDEFINING = "redefining"  # Q/P/C that may drop or redefine a deferred statement
    BARRIER_SYNC = "barrier-sync"  # S while barrier statements of the batch wait to be closed
    PASSWORD = "password"  # p while the server authenticates the client
    PLAIN = "plain"  # anything else


class Route(enum.Enum):
    """What happens to a client message."""

    __hash__ = object.__hash__  # identity, as for Phase

    RELAY = "relay"  # forward the frame as it came
    DECIDE = "decide"  # the rewriter decides (the frame and all after it wait)
    ANSWER = "answer"  # the proxy answers it itself, after every earlier response (the frames after it wait)
    FORGET = "forget"  # relay it, forgetting the deferred statements it drops
    INJECT = "inject"  # relay it after the proxy's own messages (Closes of the batch's barrier statements)
    CHECK = "check"  # relay it unless the authentication watch refuses it (the connection then ends)


# Kinds a frame can be only while the proxy owns something on the connection: deferred statements, cursors, its
# own prepared statements or portals, barrier statements (with none, :meth:`Router.plain` tests only the others).
OWNING = frozenset({Kind.OWNED, Kind.DEFERRED_BIND, Kind.REDEFINING, Kind.BARRIER_SYNC})
ORDER = (
    Kind.CALLBACK,
    Kind.OWNED,
    Kind.STATEMENT,
    Kind.DEFERRED_BIND,
    Kind.REDEFINING,
    Kind.BARRIER_SYNC,
    Kind.PASSWORD,
)
TYPES: dict[Kind, frozenset[int]] = {
    Kind.CALLBACK: frozenset(b"QPBDECF"),
    Kind.OWNED: frozenset(b"PBDEC"),
    Kind.STATEMENT: frozenset(b"QP"),
    Kind.DEFERRED_BIND: frozenset(b"B"),
    Kind.REDEFINING: frozenset(b"QPC"),
    Kind.BARRIER_SYNC: frozenset(b"S"),
    Kind.PASSWORD: frozenset(b"p"),
}
_LIVE = {
    Kind.CALLBACK: Route.DECIDE,
    Kind.OWNED: Route.ANSWER,
    Kind.STATEMENT: Route.DECIDE,
    Kind.DEFERRED_BIND: Route.DECIDE,
    Kind.REDEFINING: Route.FORGET,
    Kind.BARRIER_SYNC: Route.INJECT,
}
ROUTES: dict[Phase, dict[Kind, Route]] = {
    Phase.STARTUP: {},
    Phase.AUTHENTICATING: {Kind.PASSWORD: Route.CHECK},
    Phase.READY: _LIVE,
    Phase.IN_BATCH: _LIVE,
    Phase.OWN_BATCH: _LIVE,
    # The server discards every message up to the batch's end, so nothing the client sends takes effect: none is
    # decided, answered or noted (a proxy-owned message is relayed and discarded with the rest).
    Phase.SKIP_TO_SYNC: {Kind.BARRIER_SYNC: Route.INJECT},
    Phase.TERMINATING: {},
    Phase.UPSTREAM_FAILED: {},
    Phase.CLOSED: {},
}
_SKIP_TO_SYNC, _READY = Phase.SKIP_TO_SYNC, Phase.READY
_Q, _P, _C = int(Frontend.QUERY), int(Frontend.PARSE), int(Frontend.CLOSE)
_PLAIN = (Kind.PLAIN, Route.RELAY)
_ChunkTests = tuple[tuple[frozenset[int], Callable[[bytes, Kinds], bool]], ...]
_FrameTests = tuple[tuple[frozenset[int], Callable[[Frame], bool], Kind, Route], ...]


class Router:
    """One connection's routing: the table applied to its phase and to what the proxy owns on it."""

    def __init__(self, state: State, decider: Decider, traffic: Traffic, rewriter: Rewriter) -> None:
        self._state = state
        self._decider = decider
        self._traffic = traffic
        self._rewriter = rewriter
        chunk_tests: dict[Kind, Callable[[bytes, Kinds], bool]] = {
            Kind.CALLBACK: lambda chunk, kinds: decider.callback,
            Kind.OWNED: self._may_be_owned,
            Kind.STATEMENT: self._may_be_statement,
            Kind.DEFERRED_BIND: self._may_be_deferred_bind,
            Kind.REDEFINING: self._may_be_redefining,
            Kind.BARRIER_SYNC: self._barriers_wait,
            Kind.PASSWORD: _always,
        }
        frame_tests: dict[Kind, Callable[[Frame], bool]] = {
            Kind.CALLBACK: lambda frame: decider.callback,
            Kind.OWNED: self._is_owned,
            Kind.STATEMENT: self._is_statement,
            Kind.DEFERRED_BIND: self._is_deferred_bind,
            Kind.REDEFINING: self._is_redefining,
            Kind.BARRIER_SYNC: self._barriers_wait_for,
            Kind.PASSWORD: _always,
        }
        # Per phase, the kinds it routes other than RELAY, in ORDER, with their types and tests (and routes).
        self._chunk_tests: dict[Phase, _ChunkTests] = {
            phase: tuple((TYPES[kind], chunk_tests[kind]) for kind in ORDER if kind in routes)
            for phase, routes in ROUTES.items()
        }
        self._quiet_tests: dict[Phase, _ChunkTests] = {
            phase: tuple((TYPES[kind], chunk_tests[kind]) for kind in ORDER if kind in routes and kind not in OWNING)
            for phase, routes in ROUTES.items()
        }
        self._frame_tests: dict[Phase, _FrameTests] = {
            phase: tuple((TYPES[kind], frame_tests[kind], kind, routes[kind]) for kind in ORDER if kind in routes)
            for phase, routes in ROUTES.items()
        }

    def plain(self, chunk: bytes, kinds: Kinds) -> bool:
        """True when no frame of the chunk can be of a kind the phase routes: the hot path relays it as it came.

        The chunk's frames may move the phase on: a Sync in it ends skip-to-sync, and the frames after it are
        routed as in READY (whose tests include skip-to-sync's), so a chunk holding a batch end is tested so.
        """
        decider = self._decider  # inline (this runs for every chunk): does the proxy own anything here?
        owning = decider.deferred or decider.cursors.open or self._traffic.barriers or decider.owned.active
        phase = self._state.phase
        if phase is _SKIP_TO_SYNC and not BATCH_ENDS.isdisjoint(kinds):
            phase = _READY
        for types, may_be in (self._chunk_tests if owning else self._quiet_tests)[phase]:
            if not types.isdisjoint(kinds) and may_be(chunk, kinds):
                return False
        return True

    def route(self, frame: Frame) -> tuple[Kind, Route]:
        """The frame's kind and what happens to it now."""
        for types, is_, kind, route in self._frame_tests[self._state.phase]:
            if frame.type in types and is_(frame):
                return kind, route
        return _PLAIN

    # -- chunk tests: may frames of the kind's types in this chunk be of that kind? (never a false "no") -- #

    def _may_be_owned(self, chunk: bytes, kinds: Kinds) -> bool:
        # A Parse of a new own statement mentions pgml: the STATEMENT test catches that one.
        return bool(self._decider.cursors.open) or self._decider.owned.active

    def _may_be_statement(self, chunk: bytes, kinds: Kinds) -> bool:
        return (
            decide.might_use_pgml(chunk)
            or (bool(self._decider.cursors.open) and _Q in kinds)
            or (self._rewriter.sql_prepared(self._traffic) and decide.might_execute(chunk))
            or self._bare_call(chunk)
        )

    def _may_be_deferred_bind(self, chunk: bytes, kinds: Kinds) -> bool:
        return bool(self._decider.deferred)

    def _may_be_redefining(self, chunk: bytes, kinds: Kinds) -> bool:
        return bool(self._decider.deferred) and (_P in kinds or _C in kinds or decide.might_deallocate(chunk))

    def _barriers_wait(self, chunk: bytes, kinds: Kinds) -> bool:
        return bool(self._traffic.barriers)

    # -- frame tests ---------------------------------------------------------------------------------- #

    def _is_owned(self, frame: Frame) -> bool:
        return self._decider.owned.claims(frame, self._decider.cursors.open)

    def _is_statement(self, frame: Frame) -> bool:
        raw = frame.raw
        if frame.type == _Q and self._decider.cursors.open and not decide.undecodable(raw):
            return True  # FETCH / CLOSE / COMMIT may concern a proxy-owned cursor
        if self._bare_call(raw):
            return not decide.undecodable(raw)
        return decide.might_use_pgml(raw) or (self._rewriter.sql_prepared(self._traffic) and decide.might_execute(raw))

    def _bare_call(self, raw: bytes) -> bool:
        """The text may call a pgml function by its bare name on the session's search_path."""
        return unqualified.might_call(self._traffic.search_path, raw)

    def _is_deferred_bind(self, frame: Frame) -> bool:
        deferred = self._decider.deferred
        if not deferred:
            return False
        bind = pq.try_decode(pq.Bind, frame)
        return bind is not None and bind.statement in deferred

    def _is_redefining(self, frame: Frame) -> bool:
        if not self._decider.deferred:
            return False
        if frame.type == _Q:
            return decide.might_deallocate(frame.raw)
        if frame.type == _P:
            return not decide.undecodable(frame.raw)
        close = pq.try_decode(pq.Close, frame)
        return close is not None and close.target == pq.Target.STATEMENT

    def _barriers_wait_for(self, frame: Frame) -> bool:
        return bool(self._traffic.barriers)


def _always(*_: object) -> bool:
    return True
