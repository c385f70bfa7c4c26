"""The proxy's own traffic on a client's upstream session, between the client's messages.

Owns: what the session sends upstream of its own accord and how it stays invisible to the
client — forwarding with response accounting, barriers (an injected Parse whose completion proves
every earlier response reached the client), internal exchanges (:meth:`OwnTraffic.execute`:
extended messages ending with Flush mid-batch or Sync between batches), and failing a batch on
purpose so the server's state matches the client's (:meth:`OwnTraffic._fail_extended`).

Must not: decide anything (the rewriter does) or read the client's socket; it is a part of
:class:`proxy.session.shell.Session`, which owns the state these methods use.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from proxy.errors import ConnectionFailure
from proxy.link import Link
from proxy.rewrite import decide as rewrite
from proxy.session.exchange import Exchange, Result, Statement, UpstreamError
from proxy.session.ledger import Responses
from proxy.wire import messages as pq
from proxy.wire.frames import Backend, Frontend

_Q, _P, _S = Frontend.QUERY, Frontend.PARSE, Frontend.SYNC


class OwnTraffic:
    """The session's own messages upstream (mixed into :class:`proxy.session.shell.Session`)."""

    upstream: Link | None
    client: Link
    tx_status: str
    _owed: int
    _idle: asyncio.Event
    _responses: Responses
    _last_sent: int
    _exchange: Exchange | None
    _exchange_done: asyncio.Event
    _barriers: list[str]
    _stale_tables: list[str]
    _private_ids: itertools.count[int]
    _opened: bool

    def _owe(self) -> None:
        self._owed += 1
        self._idle.clear()

    def _forward(self, kind: int, raw: bytes) -> None:
        assert self.upstream is not None
        if kind in (_Q, _S):
            self._owe()
        self._responses.sent(bytes((kind,)))
        self._last_sent = kind
        self.upstream.write(raw)

    async def _fail_extended(self, error: BaseException) -> None:
        """In place of a failed Parse or Bind: the client gets ``error``, and the server fails too.

        A barrier first lets every earlier response of the batch reach the client. Then
        the ErrorResponse goes to the client, and a Parse that cannot succeed (its own
        error hidden) puts the server into the same state as the client: transaction
        aborted inside BEGIN, messages skipped until Sync.
        """
        assert self.upstream is not None
        if not await self._barrier():
            return  # the batch already failed: the server skips this message anyway
        self.client.write(pq.ErrorResponse.of(error).encode())
        self._responses.inject_error()
        self._last_sent = _P
        self.upstream.writelines([pq.Parse("pgml_proxy_abort", "pgml-proxy: abort", ()).encode(), pq.Flush().encode()])

    async def _barrier(self) -> bool:
        """Wait until every response owed before this point has reached the client (False: the batch failed)."""
        assert self.upstream is not None
        await self._idle.wait()
        if self._last_sent in (_S, _Q):
            return True
        name = f"pgml_proxy_barrier_{next(self._private_ids)}"
        waiter = self._responses.barrier()
        if waiter.done():  # the batch already failed: the server answers nothing more before Sync
            return False
        self.upstream.writelines([pq.Parse(name, "SELECT 1", ()).encode(), pq.Flush().encode()])
        if await waiter:
            self._barriers.append(name)
            return True
        return False

    async def settled(self) -> None:
        """Until every ReadyForQuery owed has arrived (the transaction status is then current)."""
        await self._idle.wait()

    @property
    def in_transaction(self) -> bool:
        """Inside BEGIN, or in the middle of an extended-protocol batch (its implicit transaction)."""
        return self.tx_status != "I" or self._last_sent not in (_S, _Q)

    async def execute(
        self, statements: Sequence[Statement], keep_open: bool = False, finish: bool = False
    ) -> list[Result]:
        """Run internal statements on this session once the upstream owes the client nothing.

        Between client batches they end with a Sync of their own. Inside an extended
        batch, a barrier first makes sure every earlier response has reached the client
        (BatchFailed if the batch already failed), and they end with a Flush: the
        batch's implicit transaction goes on. An error there is the batch's answer:
        it goes to the client, and the server skips the rest until the client's Sync.
        """
        assert self.upstream is not None
        mid_batch = self._last_sent not in (_S, _Q)
        if not await self._barrier():
            raise rewrite.BatchFailed()
        flush = (mid_batch or keep_open) and not finish  # finish: end what keep_open began, with a Sync
        prefix: list[Statement] = []
        if not mid_batch and self._stale_tables and self.tx_status == "I":  # per-row tables of earlier statements
            prefix.append(Statement(f"DROP TABLE IF EXISTS {', '.join('pg_temp.' + t for t in self._stale_tables)}"))
            self._stale_tables.clear()
        exchange = Exchange([*prefix, *statements], sync=not flush, close_first=self._barriers)
        self._barriers = []
        self._exchange = exchange
        self._exchange_done.clear()
        if not flush:
            self._owe()
        self._last_sent = _P if flush else _S
        self._opened = self._opened or (keep_open and not mid_batch)
        self.upstream.writelines(exchange.start())
        try:
            await self._exchange_done.wait()
        finally:
            self._exchange = None
        if self.upstream.is_closed and not exchange.done:
            raise ConnectionFailure("the upstream connection closed during an internal query")
        if exchange.forward:
            self.client.writelines(exchange.forward)
        if exchange.error is not None:
            fields = tuple((k, v) for k, v in exchange.error if k not in "Pq")  # positions in our own SQL
            # A visible statement's error: the client has it.
            shown = any(f[0] == Backend.ERROR_RESPONSE for f in exchange.forward)
            if flush:  # the server now skips to the next Sync: this error answers the client's message
                self._responses.keep(Backend.ERROR_RESPONSE)
                if not shown:
                    self.client.write(pq.ErrorResponse(fields).encode())
            raise UpstreamError(fields, exchange.status or self.tx_status, delivered=flush or shown)
        return exchange.results[len(prefix) :]
