"""The ``[metrics] listen`` HTTP endpoint: ``GET /metrics`` for Prometheus, ``GET /healthz`` for load balancers.

Owns: a small HTTP/1.1 server on the proxy's own event loop (one request per connection, bounded in size
and time), the Prometheus text of :class:`proxy.metrics.Metrics`' registry, and the health check: 200 when
the upstream takes connections (:func:`proxy.upstream.probe`: no session, no authentication) and the
engine answers a trivial job (``pgml.version()``, through its worker pool and a compute turn) within
HEALTH_TIMEOUT seconds; 503 with the reason otherwise.

Must not: block the event loop (a scrape only formats counters; the engine job runs in a worker), count its
own engine job as a client's pgml call (it calls the engine beneath the measured one), or say anything about
clients' statements or data in a response.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.api import Call, Engine, EngineError, signatures
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.server import UpstreamTarget
from proxy.upstream import probe

log = logging.getLogger(__name__)

# Seconds each half of the health check may take (a load balancer's probe usually times out after a few).
HEALTH_TIMEOUT = 5.0
# A request's head: at most this many bytes, within this many seconds.
HEAD_LIMIT = 8192
REQUEST_TIMEOUT = 10.0
_VERSION = signatures("version")[0]
_HEALTH_SESSION = 0  # the engine's cancel key for its job: no session has it (they count from 1)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Endpoint:
    """Serves ``/metrics`` and ``/healthz`` on ``host:port`` until closed."""

    def __init__(self, metrics: Metrics, upstream: UpstreamTarget, engine: Engine) -> None:
        self.metrics = metrics
        self.upstream = upstream
        self.engine = engine  # the engine itself, not the measured one the sessions use
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT, reuse_address=True)
        log.info("metrics and health on http://%s:%d/metrics, /healthz", host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def health(self) -> str | None:
        """None when healthy, else why not (for the 503's body)."""
        up = self.upstream
        try:
            await probe(up.dsn, up.sslmode, up.sslrootcert, min(up.connect_timeout, HEALTH_TIMEOUT))
        except ProxyError as exc:
            return f"upstream unreachable: {exc.message}"
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.engine.evaluate(Call(_VERSION, [()], session=_HEALTH_SESSION))
        except TimeoutError:  # the timeout's cancel stopped the job
            return f"engine unresponsive: a trivial job did not run within {HEALTH_TIMEOUT:g} s"
        except EngineError as exc:
            return f"engine unresponsive: {exc.message}"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, kind, body = await self._answer(head.split(b"\r\n", 1)[0])
                writer.write(_response(status, kind, body, head.startswith(b"HEAD ")))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends no request, a partial or oversized one, or goes away: just close
        finally:
            writer.close()

    async def _answer(self, request_line: bytes) -> tuple[int, str, bytes]:
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if path not in (b"/metrics", b"/healthz"):
            return 404, "text/plain", b"not found: /metrics or /healthz\n"
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"GET or HEAD\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        reason = await self.health()
        if reason is None:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", f"{reason}\n".encode()


def _response(status: int, kind: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)
