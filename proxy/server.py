"""The listening socket: accepts clients, owns the session set, cancel keys and shutdown.

Owns: ``asyncio`` server setup (uvloop when available), the client-side TLS
context, the ``max_clients`` limit, the (backend pid, key) -> session map used to
route CancelRequests (a key not held here goes to ``[proxy] peers`` through
:mod:`proxy.peers`, unless a peer forwarded it), and graceful shutdown on SIGTERM/SIGINT.

Must not: look inside client traffic (sessions do), or hold global state: a
``Server`` gets its config and upstream target explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import ssl
from dataclasses import dataclass

from proxy import peers
from proxy.config import Config
from proxy.dsn import DSN
from proxy.errors import TooManyConnections
from proxy.link import Link
from proxy.metrics import Counts
from proxy.rewrite.decide import Rewriter
from proxy.session.shell import Session
from proxy.upstream import send_cancel
from proxy.wire.frames import CancelRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamTarget:
    """Where sessions connect: the parsed DSN plus the TLS and timeout settings."""

    dsn: DSN
    sslmode: str
    sslrootcert: str
    connect_timeout: float


def client_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Server:
    """Accepts client connections and runs one :class:`Session` per connection."""

    def __init__(
        self, config: Config, upstream: UpstreamTarget, rewriter: Rewriter | None = None, counts: Counts | None = None
    ) -> None:
        self.config = config
        self.counts = counts or Counts()  # the sessions' counters (proxy.metrics)
        self.upstream = upstream
        self.rewriter = rewriter or Rewriter()
        self.client_tls = (
            client_tls_context(config.proxy.tls_cert, config.proxy.tls_key) if config.proxy.tls_enabled else None
        )
        self.sessions: set[Session] = set()
        self._by_key: dict[tuple[int, bytes], Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None
        self.shutting_down = False
        self._stopped = asyncio.Event()
        self._ids = itertools.count(1)

    def next_session_id(self) -> int:
        return next(self._ids)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._accept, self.config.proxy.host, self.config.proxy.port, reuse_address=True
        )
        log.info("listening on %s, upstream %s", self.config.proxy.listen, self.upstream.dsn.redacted())

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen = "127.0.0.1:0"``)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    def _accept(self) -> Link:
        link = Link()
        task = asyncio.get_running_loop().create_task(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link

    async def _serve(self, link: Link) -> None:
        await asyncio.sleep(0)  # let connection_made run
        session = Session(self, link)
        self.sessions.add(session)
        await session.run()

    def admit(self, session: Session) -> None:
        """Called once a StartupMessage arrived; raises 53300 past ``max_clients``, as the server does."""
        if self.open_sessions() >= self.config.proxy.max_clients:
            raise TooManyConnections("sorry, too many clients already")
        session.admitted = True
        self.counts.sessions += 1

    def open_sessions(self) -> int:
        """Sessions admitted and not yet over."""
        return sum(1 for s in self.sessions if s.admitted)

    # -- cancel routing ---------------------------------------------------- #

    def remember(self, session: Session) -> None:
        assert session.backend_key is not None
        self._by_key[session.backend_key] = session

    def forget(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.backend_key is not None and self._by_key.get(session.backend_key) is session:
            del self._by_key[session.backend_key]

    async def cancel(self, request: CancelRequest) -> None:
        """A CancelRequest: a key of our own sessions is honoured (as the server does); another goes to the peers
        once (never one that a peer forwarded), and is dropped there unless one of them holds it."""
        session = self._by_key.get((request.pid, request.key))
        if session is not None:
            await session.cancel()
            return
        addresses = self.config.proxy.peer_addresses
        if request.forwarded or not addresses:
            log.info("ignoring %scancel request for unknown backend %d", "forwarded " * request.forwarded, request.pid)
            return
        taken = await peers.forward_cancel(addresses, request, self.config.proxy.peer_timeout)
        log.info(
            "cancel request for backend %d is not ours: forwarded to %d of %d peers", request.pid, taken, len(addresses)
        )

    async def forward_cancel(self, pid: int, key: bytes) -> None:
        up = self.upstream
        await send_cancel(up.dsn, up.sslmode, up.sslrootcert, up.connect_timeout, pid, key)

    # -- shutdown ------------------------------------------------------------ #

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))

    async def shutdown(self) -> None:
        """Stop accepting, give sessions ``shutdown_grace`` seconds, then end them with 57P01."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: %d open sessions, grace %g s", len(self.sessions), self.config.proxy.shutdown_grace)
        if self._listener is not None:
            self._listener.close()
        deadline = asyncio.get_running_loop().time() + self.config.proxy.shutdown_grace
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.shutdown()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
