"""One running ``pgml.transform_stream`` generation, bounded, and the messages that carry its rows.

Owns: :class:`Stream` — the fragments generated and not yet read, at most ``STREAM_BUFFER`` of them
(generation pauses while the buffer is full: the engine's iterator is not pulled, and its worker waits) —,
starting one from a call's constant arguments (:func:`start`), and the RowDescription / DataRow /
CommandComplete frames of a ``SETOF jsonb`` result (text or binary).

Must not: run models (the engine produces the fragments in a worker, never on the event loop), or know
cursors and their positions (:mod:`proxy.streams.cursors`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pglast import ast

from engine.api import Call, Engine, EngineError, SessionSettings
from engine.pg import types
from engine.pg.binary import send_jsonb
from proxy.errors import FeatureNotSupported, ProxyError
from proxy.rewrite.calls import bind, find_calls
from proxy.rewrite.constant import fold_call
from proxy.wire.messages import Column, CommandComplete, DataRow, RowDescription

_stream_keys = itertools.count(1)


# Fragments a stream holds before generation pauses until a reader takes some: from DECLARE on, a cursor nobody
# FETCHes from must not grow without bound (each fragment is a few words per sequence; 256 of them is a
# couple of FETCH 100s ahead, enough that a reader never waits on a generation that had time to run).
STREAM_BUFFER = 256


@dataclass
class Stream:
    """One running generation: fragments arrive in ``ready`` (at most ``capacity``: generation pauses while it
    is full — backpressure up to the engine's worker); ``done`` once it ended (or failed)."""

    source: AsyncIterator[list[str]]
    ready: deque[list[str]] = field(default_factory=deque)
    done: bool = False
    error: BaseException | None = None
    key: int = 0  # the engine's cancel key of this generation (not the session's: idle cursors survive a cancel)
    capacity: int = STREAM_BUFFER
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _space: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._space.set()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for fragment in self.source:
                self.ready.append(fragment)
                self._arrived.set()
                while len(self.ready) >= self.capacity:  # the engine's iterator is not pulled: its worker waits
                    self._space.clear()
                    await self._space.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported to whoever reads next
            self.error = exc
        finally:
            self.done = True
            self._arrived.set()
            # Stopped while full, the engine's generator waits at a ``yield``, not in an await the cancel reaches:
            # closing it runs its cleanup now (its worker stops), not whenever the garbage collector gets to it.
            close = getattr(self.source, "aclose", None)
            if close is not None:
                await close()

    async def take(self, count: int) -> list[list[str]]:
        """Up to ``count`` fragments, in order: once that many were taken (reading on while the buffer refills,
        for a ``count`` beyond its capacity), or all that remain once generation ended."""
        taken: list[list[str]] = []
        while len(taken) < count:
            while self.ready and len(taken) < count:
                taken.append(self.ready.popleft())
            self._space.set()
            if len(taken) == count or (self.done and not self.ready):
                break
            self._arrived.clear()
            await self._arrived.wait()
        if self.error is not None and len(taken) < count:
            self.ready.extendleft(reversed(taken))
            raise self.error  # PostgreSQL fails the whole FETCH
        return taken

    def stop(self) -> None:
        """Stop generating and free the worker (CLOSE, transaction end, disconnect)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the pump closes the engine's iterator, whose cleanup stops the worker


def start(call_node: ast.FuncCall, engine: Engine, settings: SessionSettings | None = None) -> Stream:
    """Evaluate the call's constant arguments and start generating (under the session's pgml.* ``settings``)."""
    (site,) = [s for s in find_calls(ast.SelectStmt(targetList=(ast.ResTarget(val=call_node),)))]
    candidates, slots = bind(site)
    folded = fold_call(candidates, slots)
    if folded is None:
        raise FeatureNotSupported(
            "pgml.transform_stream() arguments must be constants or parameters when it streams",
            hint="Compute the arguments in a previous statement.",
        )
    signature, values = folded
    key = -next(_stream_keys)
    stream = Stream(engine.stream(Call(signature, [values], session=key, settings=settings)), key=key)
    stream.start()
    return stream


def row_description(column: str, binary: bool = False) -> bytes:
    return RowDescription((Column(column, types.JSONB, format=int(binary)),)).encode()


def data_row(fragment: list[str], binary: bool = False) -> bytes:
    """One fragment as a jsonb value, in text or binary format."""
    text = json.dumps(fragment, ensure_ascii=False)
    return DataRow((send_jsonb(text) if binary else text.encode(),)).encode()


def command_complete(tag: str) -> bytes:
    return CommandComplete(tag).encode()


def failure(error: BaseException) -> ProxyError | EngineError:
    if isinstance(error, ProxyError | EngineError):
        return error
    return EngineError(f"{type(error).__name__}: {error}")
