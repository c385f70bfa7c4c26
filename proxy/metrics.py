"""Prometheus metrics: what one proxy shows a scraper (README: Metrics and health).

Owns: :class:`Counts` (plain counters the sessions bump on the event loop — cheap enough for the relay's
hot path — read at each scrape), :class:`Metrics` (a private ``CollectorRegistry``: the engine-call counters
and histograms, the :class:`engine.api.Observer` the engine reports turn waits and model loads to, and a
collector that reads the counts, the open sessions and the engine's :class:`~engine.api.EngineStats` at each
scrape) and :class:`MeasuredEngine` (the :class:`~engine.api.Engine` the sessions use: each call counted by
function and outcome, timed and sized on its way to the real engine).

Must not: put client data in a label — label values are function names of the catalogue, SQLSTATE classes
and fixed words; never query text, parameters, model names or inputs; use prometheus_client's global
registry; or serve anything (:mod:`proxy.health` does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.api import Call, Engine, EngineError, EngineStats
from proxy.errors import ProxyError
from proxy.rewrite import decide
from proxy.session.exchange import UpstreamError

PREFIX = "pgml_proxy_"
# What happened to a statement the proxy did not relay as it came (pgml_proxy_statements_rewritten_total).
DECISIONS: dict[type, str] = {
    decide.Rewritten: "rewritten",  # other frames went upstream in its place
    decide.Respond: "answered",  # the proxy answered it (calls run on the session, extension commands, cursors)
    decide.Rebound: "rebound",  # a Bind of a deferred statement, bound to a private rewritten one
    decide.OwnPortal: "streamed",  # a Bind whose per-row calls stream through a portal of the proxy's
    decide.Fail: "failed",  # it failed with the proxy's or the engine's error
}
_Q, _P = b"QP"
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WAIT_SECONDS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
LOAD_SECONDS = (0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROWS = tuple(float(4**i) for i in range(10))  # 1 .. 262 144 rows per engine call


@dataclass(slots=True)
class Counts:
    """Counters the sessions bump on the event loop (plain ints: the hot path counts a chunk's statements)."""

    sessions: int = 0  # sessions admitted since start
    relayed: int = 0  # Query and Parse messages forwarded as they came
    rewritten: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECISIONS.values(), 0))

    def decided(self, frame_type: int, decision: decide.Decision) -> None:
        """One decision applied (:meth:`proxy.session.decisions.Decider.run`): counted by what it does.

        A Parse deferred to its Binds counts at each Bind; a Bind forwarded unchanged is no statement.
        """
        kind = DECISIONS.get(type(decision))
        if kind is not None:
            self.rewritten[kind] += 1
        elif isinstance(decision, decide.Forward) and frame_type in (_Q, _P):
            self.relayed += 1


def outcome(exc: BaseException | None) -> str:
    """``ok``, or the failure's SQLSTATE class (``57``: canceled, ``XX``: not an error with a SQLSTATE)."""
    if exc is None:
        return "ok"
    if isinstance(exc, EngineError | ProxyError):
        return exc.sqlstate[:2]
    if isinstance(exc, UpstreamError):  # the server rejected a statement the engine ran on the session
        return dict(exc.fields).get("C", "XX")[:2]
    if isinstance(exc, asyncio.CancelledError):
        return "57"  # the session canceled it or went away
    return "XX"


class Metrics:
    """One proxy's registry and the instruments the engine and the sessions feed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counts = Counts()
        self.calls = Counter(
            f"{PREFIX}pgml_calls", "Engine calls (batches of pgml.* evaluations) by function and outcome "
            "(ok, or the SQLSTATE class of the failure)", ("function", "outcome"), registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            f"{PREFIX}pgml_call_seconds", "Duration of engine calls (a stream: until it ended)", ("function",),
            buckets=SECONDS, registry=self.registry,
        )  # fmt: skip
        self.batch_rows = Histogram(
            f"{PREFIX}engine_batch_rows", "Argument rows per engine call", ("function",), buckets=ROWS,
            registry=self.registry,
        )  # fmt: skip
        self.wait = Histogram(
            f"{PREFIX}engine_wait_seconds", "Time an engine call waited for a compute turn",
            buckets=WAIT_SECONDS, registry=self.registry,
        )  # fmt: skip
        self.load = Histogram(
            f"{PREFIX}model_load_seconds", "Time a model took to load into the cache", buckets=LOAD_SECONDS,
            registry=self.registry,
        )  # fmt: skip
        self._sessions: Callable[[], int] = lambda: 0
        self._stats: Callable[[], EngineStats] | None = None
        self.registry.register(self)

    # engine.api.Observer: called from engine worker threads (prometheus_client's instruments are thread-safe)
    def waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def loaded(self, seconds: float) -> None:
        self.load.observe(seconds)

    def watch(self, sessions: Callable[[], int], stats: Callable[[], EngineStats]) -> None:
        """What a scrape reads: the number of open sessions, and the engine's stats."""
        self._sessions, self._stats = sessions, stats

    def called(self, function: str, result: str, seconds: float) -> None:
        self.calls.labels(function, result).inc()
        self.latency.labels(function).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        """The values a scrape reads as they are (a collector of the registry): the session counts, open
        sessions, the engine's stats."""
        counts = self.counts
        yield GaugeMetricFamily(f"{PREFIX}sessions_open", "Client sessions open now", value=self._sessions())
        yield CounterMetricFamily(f"{PREFIX}sessions", "Client sessions admitted since start", value=counts.sessions)
        yield CounterMetricFamily(
            f"{PREFIX}statements_relayed", "Query and Parse messages relayed as they came", value=counts.relayed
        )
        rewritten = CounterMetricFamily(
            f"{PREFIX}statements_rewritten", "Statements the proxy rewrote, answered or failed itself "
            "(a Bind of a deferred statement counts as one)", labels=("decision",),
        )  # fmt: skip
        for decision, count in counts.rewritten.items():
            rewritten.add_metric((decision,), count)
        yield rewritten
        if self._stats is not None:
            yield from _engine(self._stats())


def _engine(stats: EngineStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}engine_calls_admitted", "Engine calls admitted (running or waiting), of [engine] max_queue",
        value=stats.admitted,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{PREFIX}engine_queue_depth", "Engine calls waiting for a compute turn", value=stats.waiting
    )
    yield GaugeMetricFamily(f"{PREFIX}model_cache_bytes", "Bytes of the loaded models", value=stats.cache_bytes)
    yield GaugeMetricFamily(f"{PREFIX}model_cache_models", "Models loaded in the cache", value=stats.cached_models)
    if stats.ray_actors is not None:
        yield GaugeMetricFamily(f"{PREFIX}ray_actors", "Ray actors holding models", value=stats.ray_actors)


class MeasuredEngine:
    """The engine the sessions call: every call counted, timed and sized, then handed to ``inner``."""

    def __init__(self, inner: Engine, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def evaluate(self, call: Call) -> list[Any]:
        function = call.signature.function
        self._metrics.batch_rows.labels(function).observe(len(call.rows))
        start = time.monotonic()
        try:
            results = await self.inner.evaluate(call)
        except BaseException as exc:
            self._metrics.called(function, outcome(exc), time.monotonic() - start)
            raise
        self._metrics.called(function, "ok", time.monotonic() - start)
        return results

    async def stream(self, call: Call) -> AsyncIterator[list[str]]:
        function = call.signature.function
        self._metrics.batch_rows.labels(function).observe(len(call.rows))
        start, failure = time.monotonic(), None
        fragments = self.inner.stream(call)
        try:
            async for fragment in fragments:
                yield fragment
        except GeneratorExit:  # the reader closed it: the stream itself did not fail
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            close = getattr(fragments, "aclose", None)
            if close is not None:  # its cleanup (the worker stops) runs now, not at garbage collection
                await close()
            self._metrics.called(function, outcome(failure), time.monotonic() - start)

    def cancel(self, session: int) -> None:
        self.inner.cancel(session)

    async def close(self) -> None:
        await self.inner.close()

    def stats(self) -> EngineStats:
        return self.inner.stats()
