"""The proxy's own traffic on a client's upstream session, between the client's messages.

Owns: :class:`Traffic`, the component that sends upstream of the proxy's own accord and keeps
that invisible to the client — forwarding decided frames with response accounting (the
:class:`proxy.session.ledger.Responses` it holds), barriers (an injected Parse whose completion
proves every earlier response reached the client), private statements of rewritten Binds,
internal exchanges (:meth:`Traffic.execute`: extended messages ending with Flush mid-batch or Sync
between batches, one at a time — a stream's next part and an engine query in between wait their turn),
answer frames the proxy computed for the client's own statement (:meth:`Traffic.emit`), the engine's messages
while a call runs (:meth:`Traffic.notify`), and failing a
batch on purpose so the server's state matches the client's (:meth:`Traffic.fail_extended`). It is the
rewriter's :class:`proxy.session.exchange.Port`.

Must not: decide anything (the rewriter does), read sockets, or route client messages (the core
does); it writes only through the two sinks it is given.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Protocol

from proxy.errors import ConnectionFailure
from proxy.session.exchange import FLUSH, BatchFailed, Exchange, Result, Rows, Statement, UpstreamError, close_rows
from proxy.session.ledger import ONE, THREE, Responses
from proxy.session.search_path import SearchPath
from proxy.session.startup import settings
from proxy.session.state import Event, Phase, State
from proxy.wire import messages as pq
from proxy.wire.frames import Backend, Frame, StartupMessage

_E = int(Backend.ERROR_RESPONSE)
ABORT = pq.Parse("pgml_proxy_abort", "pgml-proxy: abort", ()).encode()  # a Parse that cannot succeed


class Sink(Protocol):
    """Where bytes for one side go (a :class:`proxy.link.Link`, or a recorder in tests)."""

    @property
    def is_closed(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def writelines(self, chunks: list[bytes]) -> None: ...


def close_statement(name: str) -> bytes:
    return pq.Close(pq.Target.STATEMENT, name).encode()


class Traffic:
    """The session's own messages upstream, and what the rewriter may do there (its Port)."""

    def __init__(self, state: State, upstream: Sink, client: Sink, session_id: int, database: str) -> None:
        self.state = state
        self.ledger = Responses()
        self.upstream = upstream
        self.client = client
        self.session_id = session_id
        self.database = database
        self.standard_strings = True  # standard_conforming_strings, from the server's ParameterStatus
        self.client_encoding = "UTF8"  # client_encoding, from the server's ParameterStatus
        self.search_path = SearchPath()  # for unqualified pgml calls: the startup packet, ParameterStatus, statements
        self.temp_tables: list[str] = []  # per-row result tables made for the statement being decided
        self.notices: list[str] = []  # engine WARNINGs, sent to the client ahead of the statement's answer
        self.silenced: frozenset[str] = frozenset()  # engine severities the startup's client_min_messages silences
        self.canceled = False  # a CancelRequest came while the decision running now ran
        self.binding = False  # a Bind's decision runs: its own statements' SQL holds bound values (never logged)
        # Closes to send at the batch's Sync or the next exchange (their answers hidden): of barrier statements, and of
        # the row portals the client no longer reads, with their statements.
        self.barriers: list[bytes] = []
        self.exchange: Exchange | None = None
        self._exchange_done = asyncio.Event()
        self._one_at_a_time = asyncio.Lock()  # a stream's next part may be on its way while the engine queries
        self._ids = itertools.count(1)
        self._private_open: list[str] = []  # private statements of rewritten Binds whose Close may have been skipped
        self._stale_tables: list[str] = []  # per-row tables of earlier statements, to drop when idle
        # State.sends when a barrier, or an exchange ended by Flush, was answered: everything sent before was answered.
        self._answered_at = -1

    def startup(self, startup: StartupMessage) -> None:
        """The client's startup packet: the session's first search_path and client_min_messages."""
        self.search_path.startup(startup)
        self.silenced = pq.NoticeResponse.silenced(settings(startup).get("client_min_messages", "notice"))

    # -- what the rewriter sees (Port) -------------------------------------- #

    @property
    def tx_status(self) -> str:
        return self.state.tx_status

    @property
    def in_transaction(self) -> bool:
        """Inside BEGIN, or in the middle of an extended-protocol batch (its implicit transaction)."""
        return self.state.in_transaction

    async def settled(self) -> None:
        """Until every ReadyForQuery owed has arrived (the transaction status is then current)."""
        await self.state.idle.wait()

    def private_id(self) -> int:
        """A number for a private statement or barrier name, unique on this session."""
        return next(self._ids)

    # -- sending ----------------------------------------------------------- #

    def forward(self, kind: int, raw: bytes) -> None:
        """A decided client message (``kind``) goes upstream as ``raw`` (itself or its rewritten frames)."""
        one = bytes((kind,))
        self.ledger.sent(one, self.state.sent(one))
        self.upstream.write(raw)

    def rebind(self, parse: bytes, bind: bytes, close: bytes, name: str) -> None:
        """In place of a Bind: Parse of a private statement, the Bind, its Close (their completions hidden but
        the BindComplete). Private statements whose Close was skipped (their Bind failed) are closed first."""
        leftovers = [close_statement(n) for n in self._private_open]
        for _ in leftovers:
            self.ledger.inject(THREE)
        self.ledger.inject(ONE)
        self.ledger.sent(b"B", 0)
        self.ledger.inject(THREE)
        self._private_open = [name]
        self.state.sends += 1
        self.state.fire(Event.EXTENDED)
        self.upstream.writelines([*leftovers, parse, bind, close])

    def discard(self, portal: str) -> None:
        """A row portal of the proxy's and its statement to close when the proxy next can (gone already: a no-op)."""
        self.barriers += close_rows(portal)

    def close_barriers(self) -> list[bytes]:
        """Closes of the batch's barrier statements, to go just before its Sync (their answers hidden); none while
        the server skips to that Sync (it would skip them too): the next exchange closes them."""
        if self.state.phase is Phase.SKIP_TO_SYNC:
            return []
        closes = self.barriers
        for _ in closes:
            self.ledger.inject(THREE)
        self.barriers = []
        return closes

    async def fail_extended(self, error: BaseException) -> None:
        """In place of a failed Parse or Bind: the client gets ``error``, and the server fails too.

        A barrier first lets every earlier response of the batch reach the client. Then
        the ErrorResponse goes to the client, and a Parse that cannot succeed (its own
        error hidden) puts the server into the same state as the client: transaction
        aborted inside BEGIN, messages skipped until Sync.
        """
        if not await self.barrier():
            return  # the batch already failed: the server skips this message anyway
        self.client.write(pq.ErrorResponse.of(error).encode())
        self.ledger.inject_error()
        self.state.fire(Event.FAILED)
        self.upstream.writelines([ABORT, FLUSH])

    async def barrier(self) -> bool:
        """Wait until every response owed before this point has reached the client (False: the batch failed)."""
        state = self.state
        await state.idle.wait()
        if state.phase is Phase.READY or state.phase is Phase.OWN_BATCH:
            return True  # nothing in flight: the proxy's own exchanges (run one at a time) opened the batch
        if state.phase is Phase.SKIP_TO_SYNC:
            return False  # the server answers nothing more before the batch's end
        if state.sends == self._answered_at:
            return True  # nothing went upstream since an exchange of the proxy's own was answered in full
        name = f"pgml_proxy_barrier_{self.private_id()}"
        waiter = self.ledger.barrier()
        self.upstream.writelines([pq.Parse(name, "SELECT 1", ()).encode(), FLUSH])
        if await waiter:
            self.barriers.append(close_statement(name))
            self._answered_at = state.sends
            return True
        return False

    async def execute(
        self, statements: Sequence[Statement], keep_open: bool = False, finish: bool = False, quiet: bool = False
    ) -> list[Result]:
        """Run internal statements on this session once the upstream owes the client nothing.

        Between client batches they end with a Sync of their own. Inside an extended
        batch, a barrier first makes sure every earlier response has reached the client
        (BatchFailed if the batch already failed), and they end with a Flush: the
        batch's implicit transaction goes on. An error there is the batch's answer:
        it goes to the client, and the server skips the rest until the client's Sync.
        """
        async with self._one_at_a_time:
            return await self._execute(statements, keep_open, finish, quiet)

    def emit(self, frames: bytes) -> None:
        self.client.write(frames)

    def notify(self, severity: str, message: str) -> None:
        """An engine message while its call runs (the caller, :class:`proxy.rewrite.steps.Live`, left out what the
        session's ``client_min_messages`` silences). Written in one piece, on the loop, so it lands between whole
        frames (a NoticeResponse may come at any point of the protocol)."""
        if self.client.is_closed:
            return
        fields = (("S", severity), ("V", severity), ("C", "00000"), ("M", message))
        self.client.write(pq.NoticeResponse(fields).encode())

    async def _execute(
        self, statements: Sequence[Statement], keep_open: bool, finish: bool, quiet: bool
    ) -> list[Result]:
        state = self.state
        mid_batch = state.in_batch
        if not await self.barrier():
            raise BatchFailed()
        flush = (mid_batch or keep_open) and not finish  # finish: end what keep_open began, with a Sync
        prefix: list[Statement] = []
        if not mid_batch and self._stale_tables and state.tx_status == "I":  # per-row tables of earlier statements
            prefix.append(Statement(f"DROP TABLE IF EXISTS {', '.join('pg_temp.' + t for t in self._stale_tables)}"))
            self._stale_tables.clear()
        exchange = Exchange([*prefix, *statements], sync=not flush, close_first=self.barriers, show=not self.binding)
        self.barriers = []
        self.exchange = exchange
        self._exchange_done.clear()
        if flush:
            state.fire(Event.OWN_FLUSH)
        else:
            state.owe()
            state.fire(Event.BATCH_END)
        self.upstream.writelines(exchange.start())
        try:
            await self._exchange_done.wait()
        finally:
            self.exchange = None
        if self.upstream.is_closed and not exchange.done:
            raise ConnectionFailure("the upstream connection closed during an internal query")
        if exchange.forward:
            self.client.writelines(exchange.forward)
        if exchange.error is not None:
            self._discard_rows(statements)
            fields = tuple((k, v) for k, v in exchange.error if k not in "Pq")  # positions in our own SQL
            shown = any(f[0] == _E for f in exchange.forward)  # a visible statement's error: the client has it
            if flush:  # the server now skips to the next Sync: this error answers the client's message
                self.ledger.keep(_E)
                state.fire(Event.ERROR)
                if not shown and not quiet:
                    self.client.write(pq.ErrorResponse(fields).encode())
            raise UpstreamError(fields, exchange.status or state.tx_status, delivered=flush or shown)
        if flush:
            self._answered_at = state.sends
        return exchange.results[len(prefix) :]

    def _discard_rows(self, statements: Sequence[Statement]) -> None:
        """An exchange failed: the row portals it opened are closed later (their statements hold the statement's
        SQL, with any bound values in it; a failed Bind leaves the statement behind)."""
        for statement in statements:
            if isinstance(statement, Rows) and statement.opens:
                self.discard(statement.name)

    def decided(self) -> None:
        """A decision was applied: its per-row tables become stale (dropped at the next exchange when idle)."""
        self.temp_tables, self._stale_tables = [], self._stale_tables + self.temp_tables
        self.state.fire(Event.DECIDED)

    # -- receiving ----------------------------------------------------------- #

    def feed(self, frame: Frame) -> bool:
        """An upstream frame during an internal exchange: True when it was the exchange's (answered here)."""
        exchange = self.exchange
        if exchange is None or exchange.done:
            return False
        reply = exchange.feed(frame)
        if reply:
            self.upstream.writelines(reply)
        if exchange.done:
            self._exchange_done.set()
        return True

    def parameter_status(self, frame: Frame) -> None:
        status = pq.ParameterStatus.decode(frame)
        if status.name == "standard_conforming_strings":
            # Literals the rewriter deparses assume backslashes are ordinary characters.
            self.standard_strings = status.value == "on"
        elif status.name == "client_encoding":
            self.client_encoding = status.value
        elif status.name == "search_path":
            self.search_path.report(status.value)

    def upstream_lost(self) -> None:
        self._exchange_done.set()  # an internal query waiting for its answer gives up
