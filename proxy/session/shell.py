"""The I/O shell of one client connection: sockets and tasks around the sans-IO core.

Owns: the client's and the upstream's :class:`proxy.link.Link`, the start of the connection
(negotiation under STARTUP_TIMEOUT, admission, the upstream connection), handing every received
byte to :class:`proxy.session.core.Connection` and carrying out what it asks (a FATAL error, close),
the cancel key the server routes CancelRequests by, and teardown.

Must not: frame, decode or route messages (the core does), decide anything, or open listening
sockets (the server does).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.errors import AdminShutdown, ConnectionFailure, FeatureNotSupported, ProxyError
from proxy.link import Link
from proxy.session.core import Connection
from proxy.session.startup import negotiate
from proxy.upstream import open_link
from proxy.wire import messages as pq
from proxy.wire.frames import StartupMessage
from proxy.wire.trace import LOGGER, Tracer, describe_startup

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger(__name__)
trace_log = logging.getLogger(LOGGER)

# Seconds a client gets to complete SSL negotiation and send its startup packet
# (PostgreSQL's authentication_timeout defaults to 60 s as well).
STARTUP_TIMEOUT = 60.0


class Session:
    """A client link, its upstream link, and the core relaying between them."""

    def __init__(self, server: Server, client: Link) -> None:
        self.server = server
        self.client = client
        self.upstream: Link | None = None
        self.core: Connection | None = None  # from the upstream connection on
        self.backend_key: tuple[int, bytes] | None = None
        self.client_tls = False
        self.admitted = False
        self.session_id = server.next_session_id()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        """Serve the connection until either side closes."""
        try:
            negotiated = await asyncio.wait_for(
                negotiate(self.client, self.server.client_tls, self.server.cancel), STARTUP_TIMEOUT
            )
            if negotiated.startup is None:
                return
            self.client_tls = negotiated.tls
            await self._connect_upstream(negotiated.startup, negotiated.early)
            await self._done
        except TimeoutError:
            log.info("client did not complete startup within %g s", STARTUP_TIMEOUT)
        except ProxyError as exc:
            self.fatal(exc)
        except Exception as exc:  # a bug must cost one connection, never the proxy
            log.error("session failed: %s", type(exc).__name__)
            log.debug("session failed", exc_info=exc)  # the traceback may quote client data
            self.fatal(exc)
        finally:
            self.close()

    async def _connect_upstream(self, startup: StartupMessage, early: bytes) -> None:
        replication = (startup.get("replication") or "false").lower()
        if replication not in ("false", "off", "no", "0"):
            raise FeatureNotSupported("pgml-proxy does not relay replication connections")
        if self.server.shutting_down:
            raise AdminShutdown("the pgml-proxy is shutting down")
        self.server.admit(self)
        up = self.server.upstream
        self.upstream = upstream = await open_link(up.dsn, up.sslmode, up.sslrootcert, up.connect_timeout)
        self.core = core = Connection(
            self.server.rewriter,
            self,
            self.client,
            upstream,
            session_id=self.session_id,
            database=startup.get("database") or startup.get("user") or "",
            max_message_bytes=self.server.config.proxy.max_message_bytes,
            counts=self.server.counts,
        )
        upstream.peer, self.client.peer = self.client, upstream
        upstream.on_lost = self._on_upstream_lost
        self.client.on_lost = self._on_client_lost
        core.start(startup)
        if trace_log.isEnabledFor(logging.DEBUG):  # log.trace_protocol, or log.level = debug
            self._trace(startup, upstream, early)
        upstream.set_handler(core.upstream_data)
        if early:
            core.client_data(early)
        self.client.set_handler(core.client_data)
        if self.client.is_closed:
            self._finish()

    # -- what the core asks for (proxy.session.core.Shell) ---------------- #

    def fatal(self, exc: BaseException) -> None:
        """Send a FATAL ErrorResponse to the client, then close everything."""
        if not self.client.is_closed:
            self.client.write(pq.ErrorResponse.of(exc, "FATAL").encode())
        self.close()

    def _trace(self, startup: StartupMessage, upstream: Link, early: bytes) -> None:
        """Describe every message of this connection in the log from now on (names and counts, never data)."""
        emit, tag = trace_log.debug, f"session {self.session_id}"
        emit("%s client>proxy %s", tag, describe_startup(startup))
        received = Tracer(emit, f"{tag} client>proxy", frontend=True)
        received.feed(early)  # bytes that came with the startup packet (they skip the link's handler)
        self.client.trace(received, Tracer(emit, f"{tag} proxy>client", frontend=False))
        sent = Tracer(emit, f"{tag} proxy>server", frontend=True)
        upstream.trace(Tracer(emit, f"{tag} server>proxy", frontend=False), sent)

    def close(self) -> None:
        """Close both sides (idempotent)."""
        goodbye = self.core.close() if self.core is not None else False
        if self.upstream is not None and not self.upstream.is_closed:
            if goodbye:
                self.upstream.write(pq.Terminate().encode())
            self.upstream.close()
        self.client.close()
        self.server.forget(self)
        self._finish()

    def remember_key(self, key: tuple[int, bytes]) -> None:
        if self.backend_key is None:
            self.backend_key = key
            self.server.remember(self)

    # -- what the server asks for ----------------------------------------- #

    def shutdown(self) -> None:
        """Called by the server when the shutdown grace period is over."""
        self.fatal(AdminShutdown("terminating connection due to administrator command (pgml-proxy shutdown)"))

    async def cancel(self) -> None:
        """A CancelRequest for this session arrived: stop engine work, forward upstream."""
        if self.core is not None:
            self.core.cancel()
        if self.backend_key is not None:
            await self.server.forward_cancel(*self.backend_key)

    # -- the links -------------------------------------------------------- #

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _on_upstream_lost(self, exc: Exception | None) -> None:
        assert self.core is not None
        if self.core.upstream_lost() and not self.client.is_closed:
            self.client.write(
                pq.ErrorResponse.of(ConnectionFailure("server closed the connection unexpectedly"), "FATAL").encode()
            )
        self.close()

    def _on_client_lost(self, exc: Exception | None) -> None:
        self.close()
