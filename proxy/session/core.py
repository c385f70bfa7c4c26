"""The connection core: bytes from the client and the server in, bytes to each out, no sockets.

Owns: :class:`Connection` — framing both directions, the hot path (a client chunk none of whose
frames the routing table routes is written upstream as it came, in one write; an upstream chunk
nothing is hidden from goes to the client the same way), relaying routed frames one by one,
holding client frames while a decision runs (the client is still read, up to HELD_LIMIT bytes,
so that a disconnect or a Terminate ends the session at once and cancels its engine work), the
decision task, and the upstream's side: authentication, ReadyForQuery, errors, and the responses
the proxy hides or rewrites. It feeds the session's search_path (:mod:`proxy.session.search_path`):
the startup packet, ReadyForQuery, and client Query/Parse chunks whose text may change it; and it counts
the Query/Parse messages it relays (:class:`proxy.metrics.Counts`).

Must not: touch sockets, tasks of the shell or the server (:class:`Shell` is what it asks of
them), decide anything about statements (:mod:`proxy.session.decisions`), or route by anything
but :mod:`proxy.session.router`. It decodes only what relaying needs: type bytes, Z, E, S.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from proxy.errors import ConnectionFailure, InternalError, ProtocolViolation, ProxyError
from proxy.metrics import Counts
from proxy.rewrite import callback_guard
from proxy.rewrite.decide import Rewriter
from proxy.session.decisions import MECHANISM, Decider
from proxy.session.router import Kind, Route, Router
from proxy.session.search_path import touches
from proxy.session.startup import AuthWatch
from proxy.session.state import ACTIVE, ENDING, Event, Phase, State
from proxy.session.traffic import Sink, Traffic
from proxy.wire import messages as pq
from proxy.wire.frames import FRONTEND_TYPES, Frame, FrameReader, Kinds, StartupMessage, encode_startup, split_frames

log = logging.getLogger(__name__)

# Backend messages are trusted but still bounded: 1 GiB is the server's own limit.
UPSTREAM_MAX_MESSAGE = (1 << 30) + 5
# Bytes of client messages held while a decision runs before reading from the client pauses. Reading goes
# on below it so that a disconnect or a Terminate is seen mid-statement, and its engine work stopped.
HELD_LIMIT = 4 << 20

_X, _Z, _E, _N, _S, _Q, _P = b"XZENSQP"
_D_BYTE, _DATA_ROW_BYTE = b"d", b"D"
_IDLE = ord("I")
_AUTHENTICATING = Phase.AUTHENTICATING  # a global: an Enum member read from its class is a slow lookup on 3.11


def _first_row(kinds: Kinds) -> int:
    """Where the first CopyData or DataRow is among a chunk's type bytes (-1: none)."""
    found = [i for i in (kinds.find(_D_BYTE), kinds.find(_DATA_ROW_BYTE)) if i >= 0]
    return min(found) if found else -1


def _size(chunk: bytes, count: int) -> int:
    """The bytes of the first ``count`` messages of ``chunk``."""
    pos = 0
    for _ in range(count):
        pos += 1 + int.from_bytes(chunk[pos + 1 : pos + 5], "big")
    return pos


class Shell(Protocol):
    """What the core asks of the I/O shell around it."""

    def fatal(self, exc: BaseException) -> None:
        """Send a FATAL ErrorResponse for ``exc`` to the client, then close both sides."""

    def close(self) -> None:
        """Close both sides."""

    def remember_key(self, key: tuple[int, bytes]) -> None:
        """The server's cancel key for this connection arrived."""


class ClientSink(Sink, Protocol):
    """The client's sink: reading from it pauses while too much waits behind a decision."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Held:
    """Client frames waiting behind a decision, and the pause of reading past HELD_LIMIT bytes of them."""

    def __init__(self, client: ClientSink) -> None:
        self.frames: deque[Frame] = deque()
        self._bytes = 0
        self._paused = False
        self._client = client

    def add(self, frames: list[Frame]) -> None:
        self.frames.extend(frames)
        self._bytes += sum(len(frame.raw) for frame in frames)
        if self._bytes > HELD_LIMIT and not self._paused:
            self._paused = True
            self._client.pause_reading()

    def take(self) -> Frame:
        frame = self.frames.popleft()
        self._bytes -= len(frame.raw)
        return frame

    def release(self) -> None:
        """The decisions are over: reading goes on."""
        self._bytes = 0
        if self._paused:
            self._paused = False
            self._client.resume_reading()


class Connection:
    """One client connection's protocol core (see the module docstring)."""

    def __init__(
        self,
        rewriter: Rewriter,
        shell: Shell,
        client: ClientSink,
        upstream: Sink,
        *,
        session_id: int,
        database: str,
        max_message_bytes: int,
        counts: Counts | None = None,
    ) -> None:
        self.state = State()
        self.traffic = Traffic(self.state, upstream, client, session_id, database)
        self._counts = counts = counts or Counts()  # statements relayed (the hot path's, and each relayed frame's)
        self.decider = Decider(rewriter, self.traffic, counts)
        self.router = Router(self.state, self.decider, self.traffic, rewriter)
        # The hot paths' objects, one attribute away.
        self._ledger, self._upstream, self._client = self.traffic.ledger, upstream, client
        self._rewriter = rewriter
        self._shell = shell
        self._held = Held(client)
        self._client_reader = FrameReader(max_message_bytes, FRONTEND_TYPES)
        self._upstream_reader = FrameReader(UPSTREAM_MAX_MESSAGE)
        self._auth = AuthWatch()
        self._task: asyncio.Task[None] | None = None  # the decisions running for held frames

    def start(self, startup: StartupMessage) -> None:
        """The upstream is connected: the client's startup packet goes there; authentication is relayed."""
        self._upstream.write(encode_startup(startup))
        self.traffic.startup(startup)
        self.decider.callback = callback_guard.is_callback(startup)
        self.state.owe()  # the ReadyForQuery that ends authentication
        self.state.fire(Event.CONNECTED)

    def cancel(self) -> None:
        """A CancelRequest for this connection: engine work and a cursor's generation stop, and so does engine work
        the decision running now would start after it (between its own queries, neither the server nor the engine
        has the statement: the cancel would be lost)."""
        if self._task is not None and not self._task.done() and self.state.owed == 0:  # not an earlier statement's
            self.traffic.canceled = True
        self._rewriter.cancel(self.traffic.session_id)
        self.decider.cursors.cancel_reading()

    def close(self) -> bool:
        """The shell closes both sides; True when the server should still be told Terminate."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.decider.stop()
        goodbye = self.state.phase in ACTIVE  # authenticated, and neither side said goodbye yet
        self.state.fire(Event.CLOSE)
        return goodbye

    def upstream_lost(self) -> bool:
        """The upstream connection closed; True when the client should be told (it did not see it coming)."""
        self.traffic.upstream_lost()
        return self.state.phase not in ENDING

    # ------------------------------------------------------------------ #
    # Client -> upstream
    # ------------------------------------------------------------------ #

    def client_data(self, data: bytes) -> None:
        try:
            chunk, kinds, _ = self._client_reader.scan(data)
        except ProtocolViolation as exc:
            self._shell.fatal(exc)
            return
        if not kinds:
            return
        search_path = self.traffic.search_path
        if (_Q in kinds or _P in kinds) and touches(chunk, search_path.reported):  # SET search_path, RESET ALL, ...
            search_path.touched(self.state.in_transaction)
        if self._task is not None:  # a decision runs: everything waits behind it
            if _X in kinds:
                self._terminate_early()
                return
            self._held.add(split_frames(chunk))
        elif self.router.plain(chunk, kinds):  # hot path: nothing to look at, forward the bytes as they came
            self._counts.relayed += kinds.count(_Q) + kinds.count(_P)
            self._ledger.sent(kinds, self.state.sent(kinds))
            self._upstream.write(chunk)
        else:
            self._relay(split_frames(chunk))

    def _relay(self, frames: list[Frame]) -> None:
        """Forward frames as routed; at the first one to decide or answer, the rest wait for a decision task."""
        out: list[bytes] = []
        for i, frame in enumerate(frames):
            kind, route = self.router.route(frame)
            if route is Route.DECIDE or route is Route.ANSWER:
                if out:
                    self._upstream.writelines(out)
                self._decide(frame, kind, frames[i + 1 :])
                return
            if not self._pass(frame, route, out):
                return
        self._upstream.writelines(out)

    def _pass(self, frame: Frame, route: Route, out: list[bytes]) -> bool:
        """Add a relayed frame (and what its route puts before it) to ``out``; False: the connection ended."""
        if route is Route.INJECT:
            out.extend(self.traffic.close_barriers())
        elif route is Route.FORGET:
            self.decider.forget(frame)
        elif route is Route.CHECK and (refused := self._auth.client(frame)) is not None:
            self._shell.fatal(refused)
            return False
        out.append(frame.raw)
        if frame.type == _Q or frame.type == _P:
            self._counts.relayed += 1
        kind = bytes((frame.type,))
        self._ledger.sent(kind, self.state.sent(kind))
        return True

    def _decide(self, frame: Frame, kind: Kind, rest: list[Frame]) -> None:
        if any(f.type == _X for f in rest):
            self._terminate_early()
            return
        self._held.add(rest)
        self.traffic.canceled = False
        self._task = asyncio.create_task(self._drain(frame, kind))

    def _terminate_early(self) -> None:
        """Terminate behind a statement still being decided: the client wants no answer; its engine work stops."""
        self._upstream.write(pq.Terminate().encode())
        self.state.fire(Event.TERMINATE)
        self._shell.close()

    async def _drain(self, frame: Frame, kind: Kind) -> None:
        """Run the decision for ``frame``, then route the held frames in order (decisions one at a time)."""
        upstream = self._upstream
        try:
            await self.decider.run(frame, kind is Kind.OWNED)
            out: list[bytes] = []
            while self._held.frames:
                frame = self._held.take()
                kind, route = self.router.route(frame)
                if route is Route.DECIDE or route is Route.ANSWER:
                    if out:
                        upstream.writelines(out)
                        out = []
                    self.traffic.canceled = False  # a cancel is for the statement running when it came
                    await self.decider.run(frame, kind is Kind.OWNED)
                elif not self._pass(frame, route, out):
                    return
            if out:
                upstream.writelines(out)
        except asyncio.CancelledError:
            self._held.frames.clear()
            raise
        except Exception as exc:  # a bug: this connection ends, the proxy goes on
            log.error("rewrite failed: %s", type(exc).__name__)
            log.debug("rewrite failed", exc_info=exc)  # the traceback may quote the statement
            self._shell.fatal(exc if isinstance(exc, ProxyError) else InternalError(str(exc)))
        finally:
            self._task = None
            self._held.release()

    # ------------------------------------------------------------------ #
    # Upstream -> client
    # ------------------------------------------------------------------ #

    def upstream_data(self, data: bytes) -> None:
        try:
            chunk, kinds, last_z = self._upstream_reader.scan(data)
        except ProtocolViolation as exc:
            log.error("malformed message from upstream: %s", exc)
            self._shell.fatal(ConnectionFailure("pgml-proxy received a malformed message from the upstream server"))
            return
        if not kinds:
            return
        traffic = self.traffic
        if self.state.phase is _AUTHENTICATING:
            chunk = b"".join(f.raw for f in self._authenticating(split_frames(chunk)))
        if traffic.exchange is not None:
            self._exchange_data(chunk, kinds)
            return
        if self._ledger.busy:
            self._route(split_frames(chunk))
            return
        self._ledger.received(kinds)
        if last_z >= 0:
            self._ready(last_z, kinds.count(_Z))
        if _E in kinds or _S in kinds:
            self._inspect(chunk, kinds)
        self._client.write(chunk)

    def _exchange_data(self, chunk: bytes, kinds: Kinds) -> None:
        """Frames during an internal exchange: runs of rows (a COPY's CopyData, a row portal's DataRows) go to it in
        bulk, every other frame one by one."""
        while chunk:
            exchange = self.traffic.exchange
            first = _first_row(kinds)
            if exchange is None or exchange.done or first < 0:
                break
            if first:  # the frames before the run, one by one (they may end the exchange)
                size = _size(chunk, first)
                self._route(split_frames(chunk[:size]))
                chunk, kinds = chunk[size:], kinds[first:]
                continue
            count = len(kinds) - len(kinds.lstrip(kinds[:1]))
            taken = exchange.feed_run(chunk, kinds[0], count)
            if not taken:
                break
            chunk, kinds = chunk[taken:], kinds[count:]
        if chunk:
            self._route(split_frames(chunk))

    def _inspect(self, chunk: bytes, kinds: Kinds) -> None:
        """ErrorResponse / ParameterStatus on the hot path: FATAL, a failed batch, settings the rewriter uses."""
        for frame in split_frames(chunk):
            if frame.type == _E and pq.is_fatal(frame):
                self.state.fire(Event.FATAL)
            elif frame.type == _S:
                self.traffic.parameter_status(frame)
        if kinds.rfind(_E) > kinds.rfind(_Z) and self._ledger.answering_current:
            self.state.fire(Event.ERROR)

    def _ready(self, status: int, count: int = 1) -> None:
        """ReadyForQuery: the batch is over; nothing else is owed for it."""
        self.state.ready(status, count)
        self.traffic.search_path.ready(status, self.state.owed == 0)
        if status == _IDLE and (self.decider.cursors.open or self.decider.owned.portals):  # a transaction ended
            self.decider.transaction_ended()

    def _route(self, frames: list[Frame]) -> None:
        """Slow path: frames of an internal exchange, or responses to hide or show without the mechanism."""
        traffic, ledger = self.traffic, self._ledger
        out: list[bytes] = []
        for frame in frames:
            kind = frame.type
            if kind == _S:
                traffic.parameter_status(frame)
            if traffic.feed(frame):
                if kind == _Z:
                    self._ready(frame.raw[5])
                continue
            own = ledger.own(kind) if kind in (_E, _N) else None
            keep = ledger.keep(kind)
            if kind == _Z:
                self._ready(frame.raw[5])
            elif kind == _E and ledger.answering_current:
                self.state.fire(Event.ERROR)
            if not keep:
                continue
            if kind == _E and pq.is_fatal(frame):
                self.state.fire(Event.FATAL)
            out.append(frame.raw if own is None else pq.replace_fields(frame, MECHANISM, own))
        if out:
            self._client.writelines(out)

    def _authenticating(self, frames: list[Frame]) -> list[Frame]:
        """Authentication relay: the watch strips channel binding; note the cancel key and the end."""
        frames = self._auth.upstream(frames)
        for frame in frames:
            if frame.type == _S:
                self.traffic.parameter_status(frame)
        if self._auth.backend_key is not None:
            self._shell.remember_key(self._auth.backend_key)
        if self._auth.done:
            self.state.fire(Event.AUTHENTICATED)
        return frames
