"""Connection start: the client's first packets and the watch over the relayed authentication.

Owns: reading SSLRequest (TLS when configured, else 'N'), GSSENCRequest ('N'),
CancelRequest and the StartupMessage, refusing bytes smuggled in after an
SSLRequest; and, while the upstream authenticates the client, stripping SCRAM
channel binding (the client's TLS ends at the proxy), noting BackendKeyData
and spotting the ReadyForQuery that ends authentication. Also what the packet sets
(:func:`settings`: its ``options`` switches and parameters, read as the server reads them).

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
# The server's switches that take a value (postgres.c's getopt string): ``c`` and ``-`` set a setting.
_WITH_VALUE = frozenset("BcCDdfhkNprStvW-")
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})
_SPACE = frozenset(" \t\n\v\f\r")  # C's isspace
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


def settings(startup: StartupMessage) -> dict[str, str]:
    """The settings a startup packet makes, by lower-case name, as the server applies them: first the ``options``
    switches (split at unescaped white space, a backslash escaping the next character; ``-c name=value``,
    ``-cname=value``, ``--name=value``, after grouped flags too: ``-Ec name=value``; dashes in a name are
    underscores), then the other parameters; the last value of a name wins."""
    found: dict[str, str] = {}
    args = _split_options(startup.get("options") or "")
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg == "--":
            break
        for j in range(1, len(arg) if arg.startswith("-") else 0):
            if arg[j] not in _WITH_VALUE:
                continue  # a flag without a value: the next character is another switch
            value = arg[j + 1 :]
            if not value and i < len(args):
                value, i = args[i], i + 1
            name, equals, setting = value.partition("=")
            if arg[j] in "c-" and equals:
                found[name.replace("-", "_").lower()] = setting
            break
    for name, value in startup.params:
        if name not in _NOT_SETTINGS and not name.startswith("_pq_."):
            found[name.lower()] = value
    return found


def _split_options(options: str) -> list[str]:
    """The server's ``pg_split_opts``: words at unescaped white space, each backslash taking the next character."""
    words: list[str] = []
    word: list[str] | None = None
    escaped = False
    for char in options:
        if char in _SPACE and not escaped:
            if word is not None:
                words.append("".join(word))
            word = None
            continue
        word = [] if word is None else word
        if char == "\\" and not escaped:
            escaped = True
        else:
            escaped = False
            word.append(char)
    if word is not None:
        words.append("".join(word))
    return words
