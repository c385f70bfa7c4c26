"""The proxy-owned stream buffer is bounded: generation pauses while nobody reads (issue 11).

Sans-IO: a :class:`proxy.streams.stream.Stream` over an async source that counts how far it was pulled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from engine.api import Call, EngineConfig, signatures
from engine.nlp.stream import FRAGMENTS_AHEAD, BatchStreamer
from engine.runtime import executor
from engine.runtime.executor import STREAM_AHEAD, LocalEngine
from proxy.streams.stream import Stream


class Source:
    """An endless generation: each pull is one fragment, numbered."""

    def __init__(self, end: int | None = None, fail_at: int | None = None) -> None:
        self.pulled = 0
        self.end = end
        self.fail_at = fail_at

    async def fragments(self) -> AsyncIterator[list[str]]:
        while self.end is None or self.pulled < self.end:
            if self.pulled == self.fail_at:
                raise RuntimeError("generation failed")
            self.pulled += 1
            yield [str(self.pulled)]
            await asyncio.sleep(0)


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_unread_stream_stops_pulling_at_capacity() -> None:
    source = Source()
    stream = Stream(source.fragments(), capacity=8)
    stream.start()
    await settle()
    assert source.pulled == 8 and len(stream.ready) == 8
    await settle()
    assert source.pulled == 8  # still paused: nobody read
    assert await stream.take(3) == [["1"], ["2"], ["3"]]
    await settle()
    assert source.pulled == 11 and len(stream.ready) == 8
    stream.stop()


async def test_take_more_than_capacity_gets_everything_in_order() -> None:
    source = Source(end=50)
    stream = Stream(source.fragments(), capacity=4)
    stream.start()
    taken = await stream.take(1000)  # FETCH ALL: reads on while the buffer refills
    assert taken == [[str(i)] for i in range(1, 51)]
    assert stream.done and not stream.ready


async def test_error_fails_the_fetch_and_keeps_what_was_generated() -> None:
    source = Source(fail_at=5)
    stream = Stream(source.fragments(), capacity=3)
    stream.start()
    with pytest.raises(RuntimeError):
        await stream.take(10)
    assert [f[0] for f in stream.ready] == ["1", "2", "3", "4", "5"]  # as before: a failed FETCH consumes nothing
    assert await stream.take(5) == [[str(i)] for i in range(1, 6)]


def test_generation_waits_for_its_reader_and_stops_when_the_reader_closes() -> None:
    """The engine side: ``generate``'s streamer hands fragments through a bounded queue (no reader: it waits)."""
    streamer = BatchStreamer(tokenizer=None, skip_prompt=True)
    handed: list[int] = []

    def generate() -> None:  # what transformers' generate does with a streamer: hand on each step's text
        for step in range(10 * FRAGMENTS_AHEAD):
            streamer.hand([f"w{step} "])
            if streamer.closed.is_set():
                return
            handed.append(step)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and streamer.queue.qsize() == FRAGMENTS_AHEAD  # waiting: the queue is full
    assert [streamer.queue.get()[0] for _ in range(3)] == ["w0 ", "w1 ", "w2 "]
    thread.join(timeout=0.3)
    assert thread.is_alive() and streamer.queue.qsize() == FRAGMENTS_AHEAD  # three more handed, waiting again
    streamer.closed.set()  # the reader is gone
    thread.join(timeout=2)
    assert not thread.is_alive() and len(handed) <= FRAGMENTS_AHEAD + 4


async def test_stopping_a_full_stream_closes_the_generation_at_once() -> None:
    """CLOSE of a cursor whose buffer is full: the engine's generator is closed (its worker stops) right away."""
    closed: list[bool] = []

    async def generation() -> AsyncIterator[list[str]]:
        try:
            for i in range(100):
                yield [str(i)]
        finally:
            closed.append(True)

    stream = Stream(generation(), capacity=2)
    stream.start()
    await settle()
    assert len(stream.ready) == 2 and not closed  # full: generation waits
    stream.stop()
    await settle()
    assert closed == [True]


async def test_an_unread_engine_stream_gives_its_worker_and_queue_place_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation nobody reads: its worker stops after STREAM_AHEAD fragments, holding no thread and no place in
    max_queue; reading on starts the next run; closing the reader closes the generation (its thread stops)."""
    made: list[int] = []
    closed = threading.Event()

    def generation(task: Any, args: Any, inputs: Any, ctx: Any) -> Iterator[list[str]]:
        try:
            for i in range(100_000):
                made.append(i)
                yield [f"w{i} "]
        finally:
            closed.set()

    monkeypatch.setattr(executor.stream, "stream", generation)  # the model's part; the scheduling is real
    engine = LocalEngine(EngineConfig(max_queue=1))
    signature = signatures("transform_stream")[0]
    fragments = engine.stream(Call(signature, [("task", {}, "prompt", False)], session=-424242))
    assert await anext(fragments) == ["w0 "]
    for _ in range(200):  # the run ends by itself once it made STREAM_AHEAD fragments nobody read
        if engine._pending == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert engine._pending == 0 and len(made) == STREAM_AHEAD  # paused: no worker, no place in max_queue
    other = engine.stream(Call(signature, [("task", {}, "other", False)], session=-424243))
    assert await anext(other)  # max_queue=1, and the paused stream holds no place in it: no 53000
    await other.aclose()
    more = [await anext(fragments) for _ in range(2 * STREAM_AHEAD)]  # the next runs start as the reader asks
    assert more == [[f"w{i} "] for i in range(1, 2 * STREAM_AHEAD + 1)]
    await fragments.aclose()
    assert await asyncio.to_thread(closed.wait, 5)  # the generation was closed in a worker
    await engine.close()
