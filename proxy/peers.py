"""Cancel across replicas: a CancelRequest for a session this replica does not hold goes to its peers.

Owns: sending one CancelRequest, marked as forwarded (``PEER_CANCEL_REQUEST_CODE``), to every peer of
``[proxy] peers`` at once, each on a new connection and within ``peer_timeout`` seconds (connect, send,
and the peer's close, which comes once the peer has acted on it), and reporting how many took it.

Why a mark and not the source address: replicas often share a host or sit behind NAT, so an address
says nothing about who sent a packet. A peer honours a marked cancel for its own sessions and never
forwards it again, so a cancel travels at most one hop whatever the peer lists say (no loops, no
amplification beyond one connection per peer). The mark grants nothing: a client that sends it only
loses the forwarding, and the secret key is what authorises a cancel, as with the server itself.

Must not: look up or cancel sessions (the server does), or raise: a peer that is down, slow or not a
pgml-proxy costs at most ``peer_timeout`` and a log line.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.link import Link
from proxy.wire.frames import CancelRequest, encode_startup

log = logging.getLogger(__name__)


MOST_FORWARDING = 16  # cancels being forwarded at once; more are dropped (made-up keys cannot pile connections up)
_forwarding = 0


async def forward_cancel(peers: tuple[tuple[str, int], ...], request: CancelRequest, timeout: float) -> int:
    """Send ``request`` to every peer at once, marked as forwarded; the number of peers that took it (0, and nothing
    sent, while ``MOST_FORWARDING`` cancels are being forwarded already)."""
    global _forwarding
    if _forwarding >= MOST_FORWARDING:
        return 0
    _forwarding += 1
    try:
        packet = encode_startup(CancelRequest(request.pid, request.key, forwarded=True))
        taken = await asyncio.gather(*(_send(host, port, packet, timeout) for host, port in peers))
        return sum(taken)
    finally:
        _forwarding -= 1


async def _send(host: str, port: int, packet: bytes, timeout: float) -> bool:
    link: Link | None = None
    try:
        async with asyncio.timeout(timeout):
            _, link = await asyncio.get_running_loop().create_connection(Link, host, port)
            link.write(packet)
            await link.closed  # the peer closes once it has acted on the cancel
        return True
    except (OSError, TimeoutError) as exc:
        log.warning("could not forward a cancel request to peer %s:%d: %s", host, port, _reason(exc))
        return False
    finally:
        if link is not None and not link.closed.done():
            link.abort()


def _reason(exc: OSError) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
