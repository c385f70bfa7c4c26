"""One socket as an asyncio Protocol, with a swappable byte handler.

Owns: the transport, flow control (a full write buffer on one link pauses
reading on its peer), an awaitable ``recv`` for the startup phase, and TLS
upgrade of the transport in place.

Must not: frame, decode or decide anything; bytes go to ``handler`` untouched. When tracing is on
(:meth:`Link.trace`, ``log.trace_protocol`` or ``log.level = debug``), the bytes read and written also go
to :class:`proxy.wire.trace.Tracer` objects, which describe each message for the log; off, the hot path
pays nothing (the traced methods replace the plain ones on that instance only).

The hot path calls the transport itself: while the transport is open, :attr:`Link.write` and
:attr:`Link.writelines` are its own bound methods (no Python frame in between); from the moment
it starts closing (:meth:`Link.close`, :meth:`Link.abort`, end of file, connection lost) they drop
what they are given, as writes to a closing link always did.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from proxy.wire.trace import Tracer

Handler = Callable[[bytes], None]
Write = Callable[[bytes], None]
WriteLines = Callable[[list[bytes]], None]


class Link(asyncio.Protocol):
    """A connected socket. Until ``handler`` is set, received bytes queue for :meth:`recv`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.handler: Handler | None = None
        self.peer: Link | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self._inbox: list[bytes] = []
        self._arrived: asyncio.Event = asyncio.Event()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._received: Tracer | None = None
        self._sent: Tracer | None = None
        # Where writes go: the transport's own methods while it is open (:meth:`_open_writes`).
        self.write: Write = _dropped
        self.writelines: WriteLines = _dropped

    # -- asyncio.Protocol ------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._open_writes()

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler(data)
        else:
            self._inbox.append(data)
            self._arrived.set()

    def eof_received(self) -> bool:
        self._shut_writes()
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut_writes()
        self._arrived.set()
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    # -- used by sessions ------------------------------------------------ #

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def recv(self) -> bytes:
        """Next received bytes (startup phase only); b"" once the peer closed."""
        while not self._inbox:
            if self.closed.done():
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        data = b"".join(self._inbox)
        self._inbox.clear()
        return data

    def take_inbox(self) -> bytes:
        """Bytes received but not yet consumed by :meth:`recv`."""
        data = b"".join(self._inbox)
        self._inbox.clear()
        return data

    def set_handler(self, handler: Handler) -> None:
        """Route all further bytes to ``handler``, first any already queued.

        The handler also replaces ``data_received`` on this instance, and the
        transport is told again about its protocol: uvloop caches the bound
        ``data_received``, and skipping one Python frame per read matters on the
        relay's hot path.
        """
        self.handler = handler
        self.data_received = handler if self._received is None else _traced(self._received, handler)  # type: ignore[method-assign,assignment]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.set_protocol(self)
        pending = self.take_inbox()
        if pending:
            self.data_received(pending)  # traced too, when tracing is on

    def trace(self, received: Tracer, sent: Tracer) -> None:
        """Describe every message read and written from now on (call before :meth:`set_handler`)."""
        self._received, self._sent = received, sent
        if self.transport is not None and not self.transport.is_closing():
            self._open_writes()

    def _open_writes(self) -> None:
        """Writes go to the transport as they are (through the tracer first, when tracing is on)."""
        assert self.transport is not None
        write, writelines, sent = self.transport.write, self.transport.writelines, self._sent
        if sent is None:
            self.write, self.writelines = write, writelines
            return

        def traced_write(data: bytes) -> None:
            sent.feed(data)
            write(data)

        def traced_writelines(chunks: list[bytes]) -> None:
            for chunk in chunks:
                sent.feed(chunk)
            writelines(chunks)

        self.write, self.writelines = traced_write, traced_writelines

    def _shut_writes(self) -> None:
        """The transport is closing: nothing more is written to it."""
        self.write = self.writelines = _dropped

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Upgrade the transport to TLS in place (queued bytes must be empty)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._shut_writes()  # the plain transport is not written to again
        new = await loop.start_tls(
            self.transport, self, context, server_side=server_side, server_hostname=server_hostname
        )
        self.transport = cast(asyncio.Transport, new)
        self._open_writes()

    def close(self) -> None:
        self._shut_writes()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._shut_writes()
        if self.transport is not None:
            self.transport.abort()


def _traced(tracer: Tracer, handler: Handler) -> Handler:
    """``handler``, with every chunk shown to ``tracer`` first."""

    def traced(data: bytes) -> None:
        tracer.feed(data)
        handler(data)

    return traced


def _dropped(data: object) -> None:
    """Where writes to a closing link go."""
