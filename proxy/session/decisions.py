"""The decision for one routed client message, and carrying it out.

Owns: :class:`Decider` — asking for the decision of a frame the router routed to DECIDE or ANSWER (in a
callback session :mod:`proxy.rewrite.callback_guard` first; the rewriter for pgml statements and deferred
Binds, :mod:`proxy.streams.cursors` for commands on the proxy's cursors, :mod:`proxy.streams.owned` for
messages naming its own prepared statements and portals, streamed Bind portals among them), turning the
failures of that into decisions, counting them (:class:`proxy.metrics.Counts`), and applying a decision
through :class:`proxy.session.traffic.Traffic`. It also keeps what the decisions leave behind on the
connection: deferred statements (their pgml calls wait for Bind values), the proxy's cursors and its own
prepared statements and portals.

The proxy's own statements never show as such: the ErrorResponse that answers the ``DO`` block
raising a proxy error (known by its position in the query string, counted by
:mod:`proxy.session.ledger`) reaches the client without the block's CONTEXT and the RAISE's source
location.

Must not: read sockets or route messages (the core does), or parse SQL beyond counting the
statements of a query string the proxy built itself.
"""

from __future__ import annotations

import functools

import pglast

from engine.api import EngineError
from proxy.errors import InFailedTransaction, ProxyError, error_fields, from_fields
from proxy.metrics import Counts
from proxy.rewrite import callback_guard, decide, pgml_settings, steps
from proxy.rewrite.decide import Decision, Rewriter
from proxy.session.exchange import SYNC, BatchFailed, Statement, UpstreamError
from proxy.session.state import Phase
from proxy.session.traffic import Traffic
from proxy.streams import classify, cursors
from proxy.streams.owned import BIND_COMPLETE, Owned, StreamedPortal
from proxy.wire import messages as pq
from proxy.wire.frames import Frame

_Q, _P, _B, _C, _F = b"QPBCF"
# ErrorResponse fields that describe the proxy's DO block, not the error: CONTEXT ("PL/pgSQL function
# inline_code_block line 1 at RAISE") and the server source location of RAISE (file, line, routine).
MECHANISM = "WFLR"


class Decider:
    """Decisions for one connection, and the proxy-owned things they leave on it."""

    def __init__(self, rewriter: Rewriter, traffic: Traffic, counts: Counts | None = None) -> None:
        self.rewriter = rewriter
        self.traffic = traffic
        self.counts = counts or Counts()  # what the decisions did (proxy.metrics)
        # Statements whose pgml calls depend on $n: name -> (SQL, parameter types), rewritten at each Bind.
        self.deferred: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.cursors = cursors.Cursors(rewriter.engine)  # pgml.transform_stream cursors
        self.owned = Owned()  # prepared DECLARE / FETCH statements of those cursors (extended protocol)
        self.callback = False  # a callback session's: only a stub's calls are decided, all else refused

    async def run(self, frame: Frame, owned: bool) -> None:
        """Decide ``frame`` (``owned``: the proxy answers it itself) and apply the decision."""
        decision: Decision
        try:
            decision = await (self._own_message(frame) if owned else self._decision(frame))
        except UpstreamError as exc:  # our own query on the client's session failed: that is the answer
            if exc.delivered and frame.type == _Q:  # a simple Query the proxy began itself: end it
                decision = decide.Rewritten(SYNC)
            elif exc.delivered:
                decision = decide.FORWARD  # the client has it; the server skips this message until Sync
            elif frame.type == _Q:
                decision = decide.Respond(pq.ErrorResponse(exc.fields).encode() + pq.ReadyForQuery(exc.status).encode())
            else:
                decision = decide.Fail(from_fields(exc.fields))  # the server's own error fields, unchanged
        except BatchFailed:
            decision = decide.FORWARD  # the server skips this message anyway, until the client's Sync
        except (ProxyError, EngineError) as exc:
            decision = decide.Fail(exc)
        self.counts.decided(frame.type, decision)
        await self._apply(frame, decision)

    async def _decision(self, frame: Frame) -> Decision:
        traffic = self.traffic
        if self.callback and (refused := callback_guard.refusal(frame)) is not None:
            return refused
        if frame.type == _B:
            bind = pq.Bind.decode(frame)
            sql, types = self.deferred[bind.statement]
            traffic.binding = True  # the statements run for it hold the bound values: not logged
            try:
                return await self.rewriter.decide_bind(bind, sql, types, traffic, traffic.private_id())
            finally:
                traffic.binding = False
        message = pq.Query.decode(frame) if frame.type == _Q else pq.Parse.decode(frame)
        if isinstance(message, pq.Query) and (own := classify.classify(message.sql, self.cursors.open)) is not None:
            await traffic.settled()  # proxy answers go out only after everything owed before them
            if traffic.tx_status == "E":
                return decide.FORWARD  # an aborted transaction rejects the statement itself (25P02)
            if isinstance(own, classify.StreamSelect | classify.Declare):  # a generation starts: its settings
                self.cursors.settings = await steps.drive(pgml_settings.read(), traffic, None)
            return await self.cursors.answer(own, traffic.tx_status, traffic.client.write)
        decision = await self.rewriter.decide(message, traffic)
        if isinstance(message, pq.Parse):
            if isinstance(decision, decide.DeferToBind):
                self.deferred[message.name] = (message.sql, decision.param_types)
            else:
                self.deferred.pop(message.name, None)
        return decision

    async def _own_message(self, frame: Frame) -> Decision:
        """A message of a proxy-owned prepared statement or portal: answered here, after earlier responses."""
        traffic = self.traffic
        if not await traffic.barrier():
            return decide.FORWARD  # the batch failed: the server discards it with the rest (SKIP_TO_SYNC's row)
        if not self.owned.claims(frame, self.cursors.open):
            return decide.FORWARD  # what it named went while earlier answers came (a transaction end): the server's
        state = traffic.state
        # Close is accepted in an aborted transaction, as the server accepts it (no abort check in Close).
        if state.tx_status == "E" and state.phase is Phase.READY and frame.type != _C:
            return decide.Fail(
                InFailedTransaction("current transaction is aborted, commands ignored until end of transaction block")
            )
        try:
            # Mid-batch the last ReadyForQuery is stale (a BEGIN may precede in this batch): the server
            # state is then taken to be "in a transaction" for DECLARE.
            status = state.tx_status if state.phase is Phase.READY else "T"
            if self.owned.starts_stream(frame):  # a generation starts: the session's pgml.* settings for it
                self.cursors.settings = await steps.drive(pgml_settings.read(), traffic, None)
            return decide.Respond(await self.owned.answer(frame, self.cursors, status, traffic.client.write, traffic))
        except (ProxyError, EngineError) as exc:
            return decide.Fail(exc)

    async def _apply(self, frame: Frame, decision: Decision) -> None:
        traffic = self.traffic
        if traffic.notices:
            traffic.client.writelines([pq.NoticeResponse.warning(message).encode() for message in traffic.notices])
            traffic.notices = []
        match decision:
            case decide.Forward() | decide.DeferToBind():
                traffic.forward(frame.type, frame.raw)
            case decide.Rewritten(frames=raw, own=own):
                if own and frame.type in (_Q, _F):
                    traffic.ledger.own_statements(own)
                traffic.forward(frame.type, raw)
            case decide.Respond(frames=raw) if raw:
                traffic.client.write(raw)  # only after the upstream owed nothing (internal query or schema)
            case decide.Rebound(parse=parse, bind=bind, close=close, name=name):
                traffic.rebind(parse, bind, close, name)
            case decide.OwnPortal(portal=name, rows=rows):
                drive = pgml_settings.Portal(functools.partial(steps.drive, port=traffic, engine=self.rewriter.engine))
                self.owned.adopt(name, StreamedPortal(rows, drive, traffic.discard))
                traffic.client.write(BIND_COMPLETE)  # the server saw no Bind: its statement is the proxy's
            case decide.Fail(error=error):
                await self._fail(frame, error)
        traffic.decided()

    async def _fail(self, frame: Frame, error: BaseException) -> None:
        """The statement fails with ``error``. The server raises the error itself, so its transaction state matches
        the client's; the client sees it as the proxy's error, without the DO block that raised it (no CONTEXT)."""
        traffic = self.traffic
        if frame.type == _Q and traffic.state.phase is Phase.OWN_BATCH:  # the first statements ran: only the error
            try:
                await traffic.execute([Statement(decide.raise_statement(error))], finish=True)
            except UpstreamError as exc:
                traffic.client.write(pq.ErrorResponse(_as_raised(exc.fields, error)).encode())
            traffic.client.write(pq.ReadyForQuery(traffic.tx_status).encode())
        elif frame.type == _Q:
            sql = decide.raise_statement(error, pq.Query.decode(frame).sql)
            traffic.ledger.own_statements([_statements_before(sql)], _position(error))
            traffic.forward(_Q, pq.Query(sql).encode())
        else:
            await traffic.fail_extended(error)

    def forget(self, frame: Frame) -> None:
        """A relayed message drops or redefines deferred statements (a Bind of them must then fail as it would)."""
        if frame.type == _Q:
            self._forget(decide.deallocated(pq.Query.decode(frame).sql))
        elif frame.type == _P:
            parse = pq.Parse.decode(frame)
            self.deferred.pop(parse.name, None)  # the name now means another statement
            if decide.might_deallocate(frame.raw):
                self._forget(decide.deallocated(parse.sql))
        elif (close := pq.try_decode(pq.Close, frame)) is not None:  # Close of a statement
            self.deferred.pop(close.name, None)

    def _forget(self, names: set[str] | None) -> None:
        """SQL DEALLOCATE / DISCARD ALL: those statements are gone."""
        if names is decide.ALL:
            self.deferred.clear()
        else:
            for name in names:
                self.deferred.pop(name, None)

    def transaction_ended(self) -> None:
        """ReadyForQuery 'I': the proxy's cursors (all but WITH HOLD ones) and portals are gone."""
        self.cursors.stop_all(keep_holdable=True)
        self.owned.clear_portals()

    def stop(self) -> None:
        """The connection ends: every generation stops."""
        self.cursors.stop_all()
        self.owned.clear_portals()


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
