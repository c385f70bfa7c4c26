"""What happens to each client message: one table, message kind x phase -> route.

Owns: :class:`Kind` (what a client message is to the proxy), :class:`Route` (relay / decide /
answer / forget / inject / check), :data:`ROUTES` (the table; a kind a phase does not list is
relayed as it is), and :class:`Router`, which tells one connection's frames apart — per chunk,
cheaply, for the hot path (:meth:`Router.plain`: may any frame here be of a kind the phase routes?),
and per frame (:meth:`Router.route`). Both read the same table and the same kinds in the same
order, so they cannot disagree; the chunk test may only say "look" more often, never less.

A frame is of the first kind in :data:`ORDER` that it matches among the kinds its phase routes.
Proxy-owned statements, portals and cursors (:meth:`proxy.streams.owned.Owned.claims`) come first.

Must not: decode more than a kind needs, do I/O, or change state (the core relays, forgets, injects
and starts decisions; :meth:`Owned.claims` forgets the names a message takes back from the proxy).
"""

from __future__ import annotations

import enum

from proxy.rewrite import decide, params
from proxy.rewrite.decide import Rewriter
from proxy.session.decisions import Decider
from proxy.session.state import Phase, State
from proxy.session.traffic import Traffic
from proxy.wire.messages import Frame


class Kind(enum.Enum):
    """What a client message is, as far as the proxy is concerned (:data:`TYPES`: the type bytes it can have)."""

    OWNED = "owned"  # P/B/D/E/C naming a proxy-owned statement, portal or cursor
    STATEMENT = "statement"  # Q/P the rewriter must see: pgml, an EXECUTE of a pgml PREPARE, a proxy cursor's FETCH
    DEFERRED_BIND = "deferred-bind"  # B of a statement whose pgml calls wait for their $n values
    REDEFINING = "redefining"  # Q/P/C that may drop or redefine a deferred statement
    BARRIER_SYNC = "barrier-sync"  # S while barrier statements of the batch wait to be closed
    PASSWORD = "password"  # p while the server authenticates the client
    PLAIN = "plain"  # anything else


class Route(enum.Enum):
    RELAY = "relay"  # forward the frame as it came
    DECIDE = "decide"  # the rewriter decides (the frame and all after it wait)
    ANSWER = "answer"  # the proxy answers it itself, after every earlier response (the frames after it wait)
    FORGET = "forget"  # relay it, forgetting the deferred statements it drops
    INJECT = "inject"  # relay it after the proxy's own messages (Closes of the batch's barrier statements)
    CHECK = "check"  # relay it unless the authentication watch refuses it (the connection then ends)


ORDER = (Kind.OWNED, Kind.STATEMENT, Kind.DEFERRED_BIND, Kind.REDEFINING, Kind.BARRIER_SYNC, Kind.PASSWORD)
TYPES: dict[Kind, frozenset[int]] = {
    Kind.OWNED: frozenset(b"PBDEC"),
    Kind.STATEMENT: frozenset(b"QP"),
    Kind.DEFERRED_BIND: frozenset(b"B"),
    Kind.REDEFINING: frozenset(b"QPC"),
    Kind.BARRIER_SYNC: frozenset(b"S"),
    Kind.PASSWORD: frozenset(b"p"),
}
_LIVE = {
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
# Per phase, the kinds it routes other than RELAY, in ORDER, with their type bytes.
_LOOKS: dict[Phase, tuple[tuple[Kind, frozenset[int]], ...]] = {
    phase: tuple((kind, TYPES[kind]) for kind in ORDER if kind in routes) for phase, routes in ROUTES.items()
}
_Q, _P, _C = ord("Q"), ord("P"), ord("C")
_PLAIN = (Kind.PLAIN, Route.RELAY)


class Router:
    """One connection's routing: the table applied to its phase and to what the proxy owns on it."""

    def __init__(self, state: State, decider: Decider, traffic: Traffic, rewriter: Rewriter) -> None:
        self._state = state
        self._decider = decider
        self._traffic = traffic
        self._rewriter = rewriter

    def plain(self, chunk: bytes, kinds: bytearray) -> bool:
        """True when no frame of the chunk can be of a kind the phase routes: the hot path relays it as it came."""
        for kind, types in _LOOKS[self._state.phase]:
            if not types.isdisjoint(kinds) and self._may_be(kind, chunk, kinds):
                return False
        return True

    def route(self, frame: Frame) -> tuple[Kind, Route]:
        """The frame's kind and what happens to it now."""
        phase = self._state.phase
        for kind, types in _LOOKS[phase]:
            if frame.type in types and self._is(kind, frame):
                return kind, ROUTES[phase][kind]
        return _PLAIN

    def _may_be(self, kind: Kind, chunk: bytes, kinds: bytearray) -> bool:
        """Whether frames of ``kind``'s types in this chunk may be of that kind (cheap, never a false "no")."""
        decider = self._decider
        match kind:
            case Kind.OWNED:  # a Parse of a new own statement mentions pgml: STATEMENT's test catches it
                return bool(decider.cursors.open) or decider.owned.active
            case Kind.STATEMENT:
                return (
                    decide.might_use_pgml(chunk)
                    or (bool(decider.cursors.open) and _Q in kinds)
                    or (self._rewriter.sql_prepared(self._traffic) and decide.might_execute(chunk))
                )
            case Kind.DEFERRED_BIND:
                return bool(decider.deferred)
            case Kind.REDEFINING:
                return bool(decider.deferred) and (_P in kinds or _C in kinds or decide.might_deallocate(chunk))
            case Kind.BARRIER_SYNC:
                return bool(self._traffic.barriers)
        return True  # PASSWORD

    def _is(self, kind: Kind, frame: Frame) -> bool:
        decider, raw = self._decider, frame.raw
        match kind:
            case Kind.OWNED:
                return decider.owned.claims(frame, decider.cursors.open)
            case Kind.STATEMENT:
                if frame.type == _Q and decider.cursors.open and not decide.undecodable(raw):
                    return True  # FETCH / CLOSE / COMMIT may concern a proxy-owned cursor
                return decide.might_use_pgml(raw) or (
                    self._rewriter.sql_prepared(self._traffic) and decide.might_execute(raw)
                )
            case Kind.DEFERRED_BIND:
                return bool(decider.deferred) and params.bound_statement(frame) in decider.deferred
            case Kind.REDEFINING:
                if not decider.deferred:
                    return False
                if frame.type == _Q:
                    return decide.might_deallocate(raw)
                if frame.type == _P:
                    return not decide.undecodable(raw)
                return raw[5:6] == b"S"  # Close of a statement
            case Kind.BARRIER_SYNC:
                return bool(self._traffic.barriers)
        return True  # PASSWORD
