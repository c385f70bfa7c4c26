"""Connections to the real PostgreSQL: TCP or unix socket, TLS per ``sslmode``, cancel requests.

Owns: opening a socket to the upstream, the SSLRequest exchange, sending CancelRequest packets, and the
health probe (:func:`probe`). Must not: relay client traffic or look at queries (that is the session's
job); authentication is relayed by the session, not done here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from proxy.dsn import DSN
from proxy.errors import ProtocolViolation, UnableToConnect
from proxy.link import Link
from proxy.wire.frames import SSL_ACCEPT, SSL_REFUSE, CancelRequest, SSLRequest, encode_startup

log = logging.getLogger(__name__)


def tls_context(sslmode: str, sslrootcert: str) -> ssl.SSLContext | None:
    """The client-side TLS context for ``sslmode`` (None for disable/allow)."""
    if sslmode in ("disable", "allow"):
        return None
    if sslmode in ("prefer", "require"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # libpq semantics: encrypted, not authenticated
        return ctx
    ctx = ssl.create_default_context(cafile=sslrootcert or None)
    ctx.check_hostname = sslmode == "verify-full"
    return ctx


async def open_link(dsn: DSN, sslmode: str, sslrootcert: str, timeout: float) -> Link:
    """Connect and, unless disabled, negotiate TLS. Raises UnableToConnect (08001)."""
    try:
        return await asyncio.wait_for(_open(dsn, sslmode, sslrootcert), timeout)
    except TimeoutError as exc:
        raise UnableToConnect(f"timeout connecting to upstream server {dsn.redacted()} after {timeout:g} s") from exc
    except ssl.SSLError as exc:
        raise UnableToConnect(f"TLS handshake with upstream server failed: {exc.reason or exc}") from exc
    except OSError as exc:
        raise UnableToConnect(f"could not connect to upstream server {dsn.redacted()}: {exc.strerror or exc}") from exc


async def _open(dsn: DSN, sslmode: str, sslrootcert: str) -> Link:
    loop = asyncio.get_running_loop()
    link: Link
    if dsn.is_unix:
        _, link = await loop.create_unix_connection(Link, dsn.unix_path)
        return link  # libpq never uses TLS over a unix socket either
    _, link = await loop.create_connection(Link, dsn.host, dsn.port)
    ctx = tls_context(sslmode, sslrootcert)
    if ctx is None:
        return link
    link.write(encode_startup(SSLRequest()))
    answer = await link.recv()
    if answer == SSL_ACCEPT:
        await link.start_tls(ctx, server_side=False, server_hostname=dsn.host)
        return link
    if answer == SSL_REFUSE:
        if sslmode == "prefer":
            return link
        link.close()
        raise UnableToConnect(f"upstream server does not support SSL, but sslmode={sslmode} requires it")
    link.close()
    if not answer:
        raise UnableToConnect("upstream server closed the connection during SSL negotiation")
    # Extra bytes after 'S'/'N' would be unencrypted data injected before the handshake.
    raise ProtocolViolation("unexpected response from upstream server to SSLRequest")


async def send_cancel(dsn: DSN, sslmode: str, sslrootcert: str, timeout: float, pid: int, key: bytes) -> None:
    """Forward a CancelRequest for backend ``pid``; errors are logged, never raised."""
    try:
        link = await open_link(dsn, "disable" if sslmode == "prefer" else sslmode, sslrootcert, timeout)
    except Exception as exc:  # a failed cancel must not hurt anything else
        log.warning("could not forward cancel request: %s", exc)
        return
    link.write(encode_startup(CancelRequest(pid, key)))
    try:
        await asyncio.wait_for(link.closed, timeout)
    except TimeoutError:
        link.abort()


async def probe(dsn: DSN, sslmode: str, sslrootcert: str, timeout: float) -> None:
    """Whether the server takes connections, without a session: an SSLRequest (and TLS, if it says yes), then close.

    A server process answers the SSLRequest; closing before the startup packet is what monitoring tools do,
    and the server logs nothing for it (no authentication, no session). Raises UnableToConnect (08001).
    """
    mode = sslmode if sslmode in ("require", "verify-ca", "verify-full") else "prefer"  # always ask the server
    link = await open_link(dsn, mode, sslrootcert, timeout)
    link.close()
