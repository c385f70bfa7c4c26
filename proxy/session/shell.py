"""One client connection and its upstream connection: startup, relay, decisions, teardown.

Owns: the per-session state (startup phase, transaction status from the last
ReadyForQuery, responses still owed by the upstream, queued client frames while a
decision is pending) and the execution of :mod:`proxy.rewrite.decide` decisions. The client
is still read while a decision runs (up to HELD_LIMIT bytes), so that a disconnect or
a Terminate ends the session at once and cancels its engine work.

The proxy's own statements never show as such: the ErrorResponse that answers the
``DO`` block raising a proxy error (known by its position in the query string, counted
by :mod:`proxy.session.ledger`) reaches the client without the block's CONTEXT and the
RAISE's source location. Messages naming a proxy-owned cursor or prepared cursor
statement are answered by :mod:`proxy.streams.owned` / :mod:`proxy.streams.cursors`.

Must not: parse SQL (the rewriter does; the session only counts the statements of a
query string the proxy built itself), open listening sockets (the server does), or
build or pick apart messages itself: it frames traffic with :mod:`proxy.wire.frames`,
forwards raw bytes, and decodes with :mod:`proxy.wire.messages` only what it decides on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING

import pglast

from engine.api import EngineError
from proxy.errors import (
    AdminShutdown,
    ConnectionFailure,
    FeatureNotSupported,
    InFailedTransaction,
    InternalError,
    ProtocolViolation,
    ProxyError,
    error_fields,
    from_fields,
)
from proxy.link import Link
from proxy.rewrite import decide as rewrite
from proxy.session.exchange import SYNC, Exchange, Statement, UpstreamError
from proxy.session.ledger import Responses
from proxy.session.startup import AuthWatch, negotiate
from proxy.session.traffic import OwnTraffic
from proxy.streams import cursors
from proxy.streams.owned import Owned
from proxy.upstream import open_link
from proxy.wire import messages as pq
from proxy.wire.frames import (
    FRONTEND_TYPES,
    Backend,
    Frame,
    FrameReader,
    Frontend,
    StartupMessage,
    encode_startup,
    split_frames,
)

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger(__name__)

# Seconds a client gets to complete SSL negotiation and send its startup packet
# (PostgreSQL's authentication_timeout defaults to 60 s as well).
STARTUP_TIMEOUT = 60.0
# Backend messages are trusted but still bounded: 1 GiB is the server's own limit.
UPSTREAM_MAX_MESSAGE = (1 << 30) + 5
# Bytes of client messages held while a decision runs before reading from the client pauses. Reading goes
# on below it so that a disconnect or a Terminate is seen mid-statement, and its engine work stopped.
HELD_LIMIT = 4 << 20

# Plain module names for the type bytes the relay tests per chunk (an enum member lookup costs ~0.2 µs).
_Q, _P, _B, _C, _F = Frontend.QUERY, Frontend.PARSE, Frontend.BIND, Frontend.CLOSE, Frontend.FUNCTION_CALL
_S, _X, _p = Frontend.SYNC, Frontend.TERMINATE, Frontend.PASSWORD
_Z, _E, _N, _STATUS = Backend.READY_FOR_QUERY, Backend.ERROR_RESPONSE, Backend.NOTICE_RESPONSE, Backend.PARAMETER_STATUS
_IDLE = ord("I")  # ReadyForQuery's status outside a transaction block
_OWNED_KINDS = frozenset({_P, _B, Frontend.DESCRIBE, Frontend.EXECUTE, _C})  # may name a proxy-owned statement/portal
_DECIDED_KINDS = frozenset({_Q, *_OWNED_KINDS})


class Session(OwnTraffic):
    """A client link, its upstream link, and the relay between them."""

    def __init__(self, server: Server, client: Link) -> None:
        self.server = server
        self.config = server.config
        self.client = client
        self.upstream: Link | None = None
        self.backend_key: tuple[int, bytes] | None = None
        self.tx_status = "I"
        self.client_tls = False
        self.admitted = False
        self.database = ""
        self.standard_strings = True  # standard_conforming_strings, from the server's ParameterStatus
        self.client_encoding = "UTF8"  # client_encoding, from the server's ParameterStatus
        self._authenticated = False
        self._client_reader = FrameReader(self.config.proxy.max_message_bytes, FRONTEND_TYPES)
        self._upstream_reader = FrameReader(UPSTREAM_MAX_MESSAGE)
        self._pending: deque[Frame] = deque()
        self._held = 0  # bytes in _pending
        self._held_paused = False  # reading paused because _held passed HELD_LIMIT
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        # ReadyForQuery messages the upstream still owes (one per Query, one per Sync).
        self._owed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._upstream_fatal = False
        self._auth = AuthWatch()
        self._terminating = False
        self._early = b""
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.session_id = server.next_session_id()
        self._exchange: Exchange | None = None
        self._exchange_done = asyncio.Event()
        self._responses = Responses()
        self._last_sent: int = _S  # type byte of the last client message forwarded
        # Statements whose pgml calls depend on $n: name -> (SQL, parameter types), rewritten at each Bind.
        self.deferred: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._private_ids = itertools.count(1)
        self._private_open: list[str] = []  # private statements whose Close may have been skipped
        self._barriers: list[str] = []  # barrier statements to deallocate at the next internal query
        self.temp_tables: list[str] = []  # per-row result tables made for the statement being decided
        self.notices: list[str] = []  # engine WARNINGs, sent to the client ahead of the statement's answer
        self.cursors = cursors.Cursors(server.rewriter.engine)  # pgml.transform_stream cursors
        self.owned = Owned()  # prepared DECLARE / FETCH statements of those cursors (extended protocol)
        self._stale_tables: list[str] = []  # ... and for earlier statements, to drop when idle
        # The proxy ran a Query's first statements itself (extended messages, no Sync yet): the
        # implicit transaction they began must end with a Sync after the rest of that Query.
        self._opened = False

    # ------------------------------------------------------------------ #
    # Lifecycle
    # ------------------------------------------------------------------ #

    async def run(self) -> None:
        """Serve the connection until either side closes."""
        try:
            negotiated = await asyncio.wait_for(
                negotiate(self.client, self.server.client_tls, self.server.cancel), STARTUP_TIMEOUT
            )
            if negotiated.startup is None:
                return
            self.client_tls, self._early = negotiated.tls, negotiated.early
            await self._connect_upstream(negotiated.startup)
            await self._done
        except TimeoutError:
            log.info("client did not complete startup within %g s", STARTUP_TIMEOUT)
        except ProxyError as exc:
            self._fatal(exc)
        except Exception as exc:  # a bug must cost one connection, never the proxy
            log.error("session failed: %s", type(exc).__name__)
            log.debug("session failed", exc_info=exc)  # the traceback may quote client data
            self._fatal(exc)
        finally:
            self.close()

    async def _connect_upstream(self, startup: StartupMessage) -> None:
        replication = (startup.get("replication") or "false").lower()
        if replication not in ("false", "off", "no", "0"):
            raise FeatureNotSupported("pgml-proxy does not relay replication connections")
        if self.server.shutting_down:
            raise AdminShutdown("the pgml-proxy is shutting down")
        self.server.admit(self)
        self.database = startup.get("database") or startup.get("user") or ""
        up = self.server.upstream
        self.upstream = await open_link(up.dsn, up.sslmode, up.sslrootcert, up.connect_timeout)
        self.upstream.peer, self.client.peer = self.client, self.upstream
        self.upstream.on_lost = self._on_upstream_lost
        self.client.on_lost = self._on_client_lost
        self.upstream.write(encode_startup(startup))
        self._owed = 1  # the ReadyForQuery that ends authentication
        self._idle.clear()
        self.upstream.set_handler(self._on_upstream_data)
        if self._early:
            self._on_client_data(self._early)
        self.client.set_handler(self._on_client_data)
        if self.client.is_closed:
            self._finish()

    def close(self) -> None:
        """Close both sides (idempotent)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.cursors.stop_all()
        self.owned.clear_portals()
        if self.upstream is not None and not self.upstream.is_closed:
            if self._authenticated and not self._upstream_fatal:
                self.upstream.write(pq.Terminate().encode())
            self.upstream.close()
        self.client.close()
        self.server.forget(self)
        self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _fatal(self, exc: BaseException) -> None:
        """Send a FATAL ErrorResponse to the client, then close everything."""
        if not self.client.is_closed:
            self.client.write(pq.ErrorResponse.of(exc, "FATAL").encode())
        self.close()

    def shutdown(self) -> None:
        """Called by the server when the shutdown grace period is over."""
        self._fatal(AdminShutdown("terminating connection due to administrator command (pgml-proxy shutdown)"))

    async def cancel(self) -> None:
        """A CancelRequest for this session arrived: stop engine work, forward upstream."""
        self.server.rewriter.cancel(self.session_id)
        self.cursors.cancel_reading()
        if self.backend_key is not None:
            await self.server.forward_cancel(*self.backend_key)

    # ------------------------------------------------------------------ #
    # Client -> upstream
    # ------------------------------------------------------------------ #

    def _on_client_data(self, data: bytes) -> None:
        try:
            chunk, kinds, _ = self._client_reader.scan(data)
        except ProtocolViolation as exc:
            self._fatal(exc)
            return
        if not kinds:
            return
        if self._busy:
            if _X in kinds:
                self._terminate_early()
                return
            self._hold(split_frames(chunk))
        elif (
            not self._authenticated
            or ((_Q in kinds or _P in kinds) and rewrite.might_use_pgml(chunk))
            or (self.deferred and (_B in kinds or _P in kinds or _C in kinds))
            or (
                (_Q in kinds or _P in kinds)
                and self.server.rewriter.sql_prepared(self)
                and rewrite.might_execute(chunk)
            )
            or (self.deferred and _Q in kinds and rewrite.might_deallocate(chunk))
            or ((self.cursors.open or self.owned.active) and not _DECIDED_KINDS.isdisjoint(kinds))
            or (self._barriers and _S in kinds)
        ):
            self._relay_client(split_frames(chunk))
        else:  # hot path: nothing to look at, forward the bytes as they came
            owed = kinds.count(_Q) + kinds.count(_S) + kinds.count(_F)
            if owed:
                self._owed += owed
                self._idle.clear()
                self.owned.failed = False
            self._responses.sent(kinds)
            self._last_sent = kinds[-1]
            if _X in kinds:
                self._terminating = True
            assert self.upstream is not None
            self.upstream.write(chunk)

    def _relay_client(self, frames: list[Frame]) -> None:
        """Forward frames; hand the rest to a decision task at the first one mentioning pgml."""
        assert self.upstream is not None
        out: list[bytes] = []
        for i, frame in enumerate(frames):
            kind = frame.type
            if kind in _DECIDED_KINDS and self._needs_decision(frame):
                self._defer(out, frames[i:])
                return
            if kind == _S and self._barriers:  # barrier statements of this batch: closed with it (answers hidden)
                for name in self._barriers:
                    self._responses.inject(Backend.CLOSE_COMPLETE)
                    out.append(_close_statement(name))
                self._barriers = []
            if kind in (_Q, _S, _F):
                self._owe()
                self.owned.failed = False
                if kind == _Q and self.deferred and rewrite.might_deallocate(frame.raw):
                    self._forget(rewrite.deallocated(pq.Query.decode(frame).sql))
            elif kind == _P and self.deferred and not rewrite.undecodable(frame.raw):
                parse = pq.Parse.decode(frame)
                self.deferred.pop(parse.name, None)  # the name now means another statement
                if rewrite.might_deallocate(frame.raw):
                    self._forget(rewrite.deallocated(parse.sql))
            elif kind == _C and self.deferred and (close := pq.try_decode(pq.Close, frame)) is not None:
                if close.target == pq.Target.STATEMENT:
                    self.deferred.pop(close.name, None)
            elif kind == _X:
                self._terminating = True
            elif kind == _p and (refused := self._auth.client(frame)) is not None:
                self._fatal(refused)
                return
            out.append(frame.raw)
            self._responses.sent(bytes((kind,)))
            self._last_sent = kind
        self.upstream.writelines(out)

    def _needs_decision(self, frame: Frame) -> bool:
        """A Query/Parse mentioning pgml, or a Bind of a statement whose pgml calls wait for its values."""
        if not self._authenticated:
            return False
        if frame.type == _Q and self.cursors.open and not rewrite.undecodable(frame.raw):
            return True  # FETCH / CLOSE / COMMIT may concern a proxy-owned cursor
        if frame.type in _OWNED_KINDS and self.owned.claims(frame, self.cursors.open):
            return True
        if frame.type in (_Q, _P):
            return rewrite.might_use_pgml(frame.raw) or (
                self.server.rewriter.sql_prepared(self) and rewrite.might_execute(frame.raw)
            )
        if frame.type != _B or not self.deferred:
            return False
        bind = pq.try_decode(pq.Bind, frame)
        return bind is not None and bind.statement in self.deferred

    def _forget(self, names: set[str] | None) -> None:
        """SQL DEALLOCATE / DISCARD ALL: those statements are gone, a Bind of them must fail as it would."""
        if names is rewrite.ALL:
            self.deferred.clear()
        else:
            for name in names:
                self.deferred.pop(name, None)

    def _defer(self, out: list[bytes], rest: list[Frame]) -> None:
        assert self.upstream is not None
        if out:
            self.upstream.writelines(out)
        if any(frame.type == _X for frame in rest):
            self._terminate_early()
            return
        self._busy = True
        self._hold(rest)
        self._task = asyncio.create_task(self._drain_pending())

    def _hold(self, frames: list[Frame]) -> None:
        """Queue client frames behind the pending decision; the client is still read (a disconnect, a
        Terminate must be seen now), up to HELD_LIMIT bytes."""
        self._pending.extend(frames)
        self._held += sum(len(frame.raw) for frame in frames)
        if self._held > HELD_LIMIT and not self._held_paused:
            self._held_paused = True
            self.client.pause_reading()

    def _terminate_early(self) -> None:
        """Terminate behind a statement still being decided: the client wants no answer; its engine work stops."""
        self._terminating = True
        self.close()

    async def _drain_pending(self) -> None:
        """Run decisions for queued frames in order; plain frames pass through."""
        try:
            while self._pending:
                frame = self._pending.popleft()
                self._held -= len(frame.raw)
                if self._needs_decision(frame):
                    await self._decide(frame)
                else:
                    self._relay_client([frame])
        except asyncio.CancelledError:
            self._pending.clear()
            raise
        except Exception as exc:  # a bug: this connection ends, the proxy goes on
            log.error("rewrite failed: %s", type(exc).__name__)
            log.debug("rewrite failed", exc_info=exc)  # the traceback may quote the statement
            self._fatal(exc if isinstance(exc, ProxyError) else InternalError(str(exc)))
        finally:
            self._busy = False
            self._held = 0
            if self._held_paused:
                self._held_paused = False
                self.client.resume_reading()

    async def _decide(self, frame: Frame) -> None:
        decision: rewrite.Decision
        try:
            decision = await self._decision(frame)
        except UpstreamError as exc:  # our own query on the client's session failed: that is the answer
            if exc.delivered and frame.type == _Q:  # a simple Query the proxy began itself: end it
                decision = rewrite.Rewritten(SYNC)
            elif exc.delivered:
                decision = rewrite.FORWARD  # the client has it; the server skips this message until Sync
            elif frame.type == _Q:
                decision = rewrite.Respond(
                    pq.ErrorResponse(exc.fields).encode() + pq.ReadyForQuery(exc.status).encode()
                )
            else:
                decision = rewrite.Fail(from_fields(exc.fields))  # the server's own error fields, unchanged
        except rewrite.BatchFailed:
            decision = rewrite.FORWARD  # the server skips this message anyway, until the client's Sync
        except (ProxyError, EngineError) as exc:
            decision = rewrite.Fail(exc)
        await self._apply(frame, decision)

    async def _decision(self, frame: Frame) -> rewrite.Decision:
        rewriter = self.server.rewriter
        if frame.type in _OWNED_KINDS and self.owned.claims(frame, self.cursors.open):
            return await self._own_message(frame)
        if frame.type == _B:
            bind = pq.Bind.decode(frame)
            sql, types = self.deferred[bind.statement]
            return await rewriter.decide_bind(bind, sql, types, self, next(self._private_ids))
        message = pq.Query.decode(frame) if frame.type == _Q else pq.Parse.decode(frame)
        if isinstance(message, pq.Query) and (own := cursors.classify(message.sql, self.cursors.open)) is not None:
            await self.settled()  # proxy answers go out only after everything owed before them
            if self.tx_status == "E":
                return rewrite.FORWARD  # an aborted transaction rejects the statement itself (25P02)
            return await self.cursors.answer(own, self.tx_status, self.client.write)
        decision = await rewriter.decide(message, self)
        if isinstance(message, pq.Parse):
            if isinstance(decision, rewrite.DeferToBind):
                self.deferred[message.name] = (message.sql, decision.param_types)
            else:
                self.deferred.pop(message.name, None)
        return decision

    async def _own_message(self, frame: Frame) -> rewrite.Decision:
        """A message of a proxy-owned prepared cursor statement: answered here, after earlier responses."""
        if self.owned.failed or not await self._barrier():
            self.owned.failed = True
            return rewrite.Respond(b"")  # skipped until Sync, as the server skips after an error
        # Close is accepted in an aborted transaction, as the server accepts it (no abort check in Close).
        if self.tx_status == "E" and self._last_sent in (_S, _Q) and frame.type != _C:
            self.owned.failed = True
            return rewrite.Fail(
                InFailedTransaction("current transaction is aborted, commands ignored until end of transaction block")
            )
        try:
            # Mid-batch the last ReadyForQuery is stale (a BEGIN may precede in this batch): the server
            # state is then taken to be "in a transaction" for DECLARE.
            status = self.tx_status if self._last_sent in (_S, _Q) else "T"
            return rewrite.Respond(await self.owned.answer(frame, self.cursors, status, self.client.write, self))
        except (ProxyError, EngineError) as exc:
            self.owned.failed = True
            return rewrite.Fail(exc)
        except (UpstreamError, rewrite.BatchFailed):  # preparing it on the server failed: the server's answer
            self.owned.failed = True
            raise

    async def _apply(self, frame: Frame, decision: rewrite.Decision) -> None:
        assert self.upstream is not None
        if self.notices:
            self.client.writelines([pq.NoticeResponse.warning(message).encode() for message in self.notices])
            self.notices = []
        match decision:
            case rewrite.Forward() | rewrite.DeferToBind():
                self._forward(frame.type, frame.raw)
            case rewrite.Rewritten(frames=raw, own=own):
                if own and frame.type == _Q:
                    self._responses.own_statements(own)
                self._forward(frame.type, raw)
            case rewrite.Respond(frames=raw):
                self.client.write(raw)  # only after the upstream owed nothing (internal query or schema)
            case rewrite.Rebound(parse=parse, bind=bind, close=close, name=name):
                # Private statements whose Close was skipped (their Bind failed) are closed now.
                leftovers = [_close_statement(n) for n in self._private_open]
                for _ in leftovers:
                    self._responses.inject(Backend.CLOSE_COMPLETE)
                self._responses.inject(Backend.PARSE_COMPLETE)
                self._responses.sent(bytes((_B,)))
                self._responses.inject(Backend.CLOSE_COMPLETE)
                self._private_open = [name]
                self._last_sent = _B
                self.upstream.writelines([*leftovers, parse, bind, close])
            case rewrite.Fail(error=error):
                # The server raises the error itself, so its transaction state matches the client's; the
                # client sees it as the proxy's error, without the DO block that raised it (no CONTEXT).
                if frame.type == _Q and self._opened:  # the first statements ran already: only the error
                    try:
                        await self.execute([Statement(rewrite.raise_statement(error))], finish=True)
                    except UpstreamError as exc:
                        self.client.write(pq.ErrorResponse(_as_raised(exc.fields, error)).encode())
                    self.client.write(pq.ReadyForQuery(self.tx_status).encode())
                elif frame.type == _Q:
                    sql = rewrite.raise_statement(error, pq.Query.decode(frame).sql)
                    self._responses.own_statements([_statements_before(sql)], _position(error))
                    self._forward(_Q, pq.Query(sql).encode())
                else:
                    await self._fail_extended(error)
        self.temp_tables, self._stale_tables = [], self._stale_tables + self.temp_tables
        self._opened = False

    # ------------------------------------------------------------------ #
    # Upstream -> client
    # ------------------------------------------------------------------ #

    def _on_upstream_data(self, data: bytes) -> None:
        try:
            chunk, kinds, last_z = self._upstream_reader.scan(data)
        except ProtocolViolation as exc:
            log.error("malformed message from upstream: %s", exc)
            self._fatal(ConnectionFailure("pgml-proxy received a malformed message from the upstream server"))
            return
        if not kinds:
            return
        if not self._authenticated:
            chunk = b"".join(f.raw for f in self._inspect_startup(split_frames(chunk)))
        if self._exchange is not None or self._responses.busy:
            self._route_frames(split_frames(chunk))
            return
        self._responses.received(kinds)
        if last_z >= 0:
            self._ready(last_z, kinds.count(_Z))
        if _E in kinds or _STATUS in kinds:
            for frame in split_frames(chunk):
                if frame.type == _E and pq.is_fatal(frame):
                    self._upstream_fatal = True
                elif frame.type == _STATUS:
                    self._parameter_status(frame)
        self.client.write(chunk)

    def _parameter_status(self, frame: Frame) -> None:
        status = pq.ParameterStatus.decode(frame)
        if status.name == "standard_conforming_strings":
            # Literals the rewriter deparses assume backslashes are ordinary characters.
            self.standard_strings = status.value == "on"
        elif status.name == "client_encoding":
            self.client_encoding = status.value

    def _ready(self, status: int, count: int = 1) -> None:
        """ReadyForQuery: the batch is over; nothing else is owed for it."""
        self.tx_status = chr(status)
        if status == _IDLE and (self.cursors.open or self.owned.portals):  # a transaction ended, however
            self.cursors.stop_all(keep_holdable=True)
            self.owned.clear_portals()
        self._owed = max(0, self._owed - count)
        if self._owed == 0:
            self._idle.set()

    def _route_frames(self, frames: list[Frame]) -> None:
        """Slow path: frames of an internal query, or responses to hide."""
        assert self.upstream is not None
        out: list[bytes] = []
        for frame in frames:
            kind = frame.type
            if kind == _STATUS:
                self._parameter_status(frame)
            exchange = self._exchange
            if exchange is not None and not exchange.done:
                self.upstream.writelines(exchange.feed(frame))
                if kind == _Z:
                    self._ready(ord(pq.ReadyForQuery.decode(frame).status))
                if exchange.done:
                    self._exchange_done.set()
                continue
            own = self._responses.own(kind) if kind in (_E, _N) else None
            keep = self._responses.keep(kind)
            if kind == _Z:
                self._ready(ord(pq.ReadyForQuery.decode(frame).status))
            if not keep:
                continue
            elif kind == _E and pq.is_fatal(frame):
                self._upstream_fatal = True
            out.append(frame.raw if own is None else pq.replace_fields(frame, MECHANISM, own))
        if out:
            self.client.writelines(out)

    def _inspect_startup(self, frames: list[Frame]) -> list[Frame]:
        """Authentication relay: the watch strips channel binding; note the cancel key and the end."""
        frames = self._auth.upstream(frames)
        for frame in frames:
            if frame.type == _STATUS:
                self._parameter_status(frame)
        if self._auth.backend_key is not None and self.backend_key is None:
            self.backend_key = self._auth.backend_key
            self.server.remember(self)
        self._authenticated = self._auth.done
        return frames

    def _on_upstream_lost(self, exc: Exception | None) -> None:
        self._exchange_done.set()  # an internal query waiting for its answer gives up
        if not self.client.is_closed and not self._terminating and not self._upstream_fatal:
            self.client.write(
                pq.ErrorResponse.of(ConnectionFailure("server closed the connection unexpectedly"), "FATAL").encode()
            )
        self.close()

    def _on_client_lost(self, exc: Exception | None) -> None:
        self.close()


def _close_statement(name: str) -> bytes:
    return pq.Close(pq.Target.STATEMENT, name).encode()


# ErrorResponse fields that describe the proxy's DO block, not the error: CONTEXT ("PL/pgSQL function
# inline_code_block line 1 at RAISE") and the server source location of RAISE (file, line, routine).
MECHANISM = "WFLR"


def _statements_before(sql: str) -> int:
    """How many statements precede the last one (the proxy's DO block) in a query string it built.

    :func:`proxy.rewrite.decide.raise_statement` puts the client's statements before the first pgml call in
    front of the DO block, as they were sent.
    """
    return len(pglast.split(sql)) - 1


def _position(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The error's position in the client's text (a DO block cannot raise one)."""
    return tuple(f for f in error_fields(error) if f[0] == "P")


def _as_raised(fields: tuple[tuple[str, str], ...], error: BaseException) -> tuple[tuple[str, str], ...]:
    """The server's ErrorResponse for the proxy's DO block, shown as the proxy's error."""
    return tuple(f for f in fields if f[0] not in MECHANISM) + _position(error)
