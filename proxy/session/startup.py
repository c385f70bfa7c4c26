"""Connection start: the client's first packets and the watch over the relayed authentication.

Owns: reading SSLRequest (TLS when configured, else 'N'), GSSENCRequest ('N'),
CancelRequest and the StartupMessage, refusing bytes smuggled in after an
SSLRequest; and, while the upstream authenticates the client, stripping SCRAM
channel binding (the client's TLS ends at the proxy), noting BackendKeyData
and spotting the ReadyForQuery that ends authentication.

Must not: relay traffic after authentication or open upstream connections
(the session does both).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.errors import InvalidAuthorization, ProtocolViolation, ProxyError
from proxy.link import Link
from proxy.wire.frames import (
    SSL_ACCEPT,
    SSL_REFUSE,
    Backend,
    CancelRequest,
    Frame,
    Frontend,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)
from proxy.wire.messages import AUTH_SASL, Authentication, BackendKeyData, sasl_initial_gs2_flag

_SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
# SCRAM's downgrade protection: a TLS client that saw no -PLUS offer says so ("y"),
# and a TLS server that does support binding then refuses. The binding data would
# have to be rewritten, which the client's proof covers, so this cannot be relayed.
CHANNEL_BINDING_ERROR = InvalidAuthorization(
    "SCRAM authentication over TLS on both legs cannot be relayed by pgml-proxy",
    detail="The client uses TLS to the proxy and the proxy uses TLS to the server, which supports channel binding.",
    hint="Connect with channel_binding=disable, or without TLS to the proxy, or set [upstream] sslmode=disable.",
)


@dataclass(frozen=True)
class Negotiated:
    """The StartupMessage (None: the client left or sent a CancelRequest), bytes after it, TLS or not."""

    startup: StartupMessage | None
    early: bytes = b""
    tls: bool = False


async def negotiate(
    client: Link, tls: ssl.SSLContext | None, cancel: Callable[[CancelRequest], Awaitable[None]]
) -> Negotiated:
    """SSLRequest / GSSENCRequest / CancelRequest handling until the StartupMessage."""
    reader = StartupReader()
    encrypted = False
    while True:
        packet = reader.next_packet()
        if packet is None:
            data = await client.recv()
            if not data:
                return Negotiated(None)
            reader.feed(data)
            continue
        match packet:
            case SSLRequest() | GSSENCRequest() if reader.pending:
                # Bytes sent before our answer would bypass encryption (CVE-2021-23214).
                raise ProtocolViolation("received unencrypted data after SSL request")
            case SSLRequest() if tls is not None and not encrypted:
                client.write(SSL_ACCEPT)
                await client.start_tls(tls, server_side=True)
                encrypted = True
            case SSLRequest() | GSSENCRequest():
                client.write(SSL_REFUSE)
            case CancelRequest():
                await cancel(packet)
                return Negotiated(None)
            case StartupMessage():
                return Negotiated(packet, reader.take_rest(), encrypted)  # the rest is relayed later


class AuthWatch:
    """What the proxy must see of the authentication exchange it relays."""

    def __init__(self) -> None:
        self.bound_upstream = False  # the upstream offered SCRAM channel binding
        self.backend_key: tuple[int, bytes] | None = None
        self.done = False

    def upstream(self, frames: list[Frame]) -> list[Frame]:
        """Upstream frames during authentication, with the -PLUS mechanism taken out of a SASL offer."""
        out = []
        for frame in frames:
            if frame.type == Backend.AUTHENTICATION:
                auth = Authentication.decode(frame)
                if auth.code == AUTH_SASL and _SCRAM_PLUS in auth.mechanisms():
                    # Channel binding ties SCRAM to one TLS connection; the client's
                    # TLS ends here, so the upstream's binding can never match.
                    mechanisms = [m for m in auth.mechanisms() if m != _SCRAM_PLUS]
                    self.bound_upstream = True
                    frame = Frame(Backend.AUTHENTICATION, Authentication.sasl(mechanisms).encode())
            elif frame.type == Backend.BACKEND_KEY_DATA:
                key = BackendKeyData.decode(frame)
                self.backend_key = (key.pid, key.key)
            elif frame.type == Backend.READY_FOR_QUERY:
                self.done = True
            out.append(frame)
        return out

    def client(self, frame: Frame) -> ProxyError | None:
        """The error to end the connection with, for a client frame that cannot be relayed."""
        if frame.type == Frontend.PASSWORD and self.bound_upstream and sasl_initial_gs2_flag(frame) == "y":
            return CHANNEL_BINDING_ERROR
        return None
