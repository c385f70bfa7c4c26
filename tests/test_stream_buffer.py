"""The proxy-owned stream buffer is bounded: generation pauses while nobody reads (issue 11).

Sans-IO: a :class:`proxy.streams.stream.Stream` over an async source that counts how far it was pulled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from engine.nlp.stream import FRAGMENTS_AHEAD, BatchStreamer
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
