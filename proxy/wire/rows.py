"""Runs of DataRow messages held as one buffer, read and written by numpy array operations.

Owns: :class:`RowBlock` — DataRow messages as they arrive (one, or a run of them cut from a chunk) with where
each ends; the fields of all its rows found at once (a DataRow's body is a binary tuple:
:func:`engine.pg.fields.tuple_fields`); and :func:`data_rows`, the DataRow messages of chosen columns of a
block's rows, some of them replaced by new values (:class:`engine.pg.output.Encoded`), written by gathering
byte spans: no Python code per row.

Must not: know the types or formats of the values (bytes as sent), statements or sessions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from engine.api import EngineError
from engine.pg.fields import Fields, tuple_fields
from engine.pg.output import Encoded
from proxy.errors import ProtocolViolation
from proxy.wire.frames import Backend

_HEADER = np.dtype([("type", "u1"), ("length", ">i4"), ("count", ">i2")])  # a DataRow's first 7 bytes


class RowBlock:
    """DataRow messages one after another, and where each ends."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ends: list[NDArray[np.int64]] = []
        self._size = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, messages: bytes, ends: Sequence[int]) -> None:
        """Whole DataRow messages, ``ends`` where each ends in ``messages``."""
        self._parts.append(messages)
        self._ends.append(np.asarray(ends, np.int64) + self._size)
        self._size += len(messages)
        self._count += len(ends)

    def fields(self, width: int) -> Fields:
        """Where each row's ``width`` fields are (08P01 for a row of another shape)."""
        data = b"".join(self._parts)
        ends = np.concatenate(self._ends) if self._ends else np.zeros(0, np.int64)
        starts = np.concatenate((np.zeros(min(len(ends), 1), np.int64), ends[:-1])) + 5  # the body: type, length
        try:
            return tuple_fields(data, starts, ends, width, "DataRow message")
        except EngineError as exc:
            raise ProtocolViolation(str(exc)) from None

    def values(self, width: int) -> list[tuple[bytes | None, ...]]:
        """Each row's values, one tuple per row."""
        fields = self.fields(width)
        return list(zip(*(fields.raw(j) for j in range(width)), strict=True)) if width else [()] * len(self)


def data_rows(fields: Fields, columns: Sequence[int | Encoded]) -> bytes:
    """DataRow messages of every row of ``fields``: column ``k`` is the row's field ``columns[k]`` as it came
    (an int), or the row's value of an :class:`Encoded` column."""
    count = fields.num_rows
    if not count:
        return b""
    sources = _Sources(fields.buf)
    spans: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []  # each piece of a row: where, how long
    run: list[int] = []  # consecutive fields as they came: one piece

    def flush() -> None:
        if run:
            start = fields.at[run[0]] - 4
            spans.append((start, fields.at[run[-1]] + np.maximum(fields.lengths[run[-1]], 0) - start))
            run.clear()

    body = np.full(count, 2, np.int64)  # the field count, then the fields
    for column in columns:
        if isinstance(column, int):
            if run and column != run[-1] + 1:
                flush()
            run.append(column)
            body += 4 + np.maximum(fields.lengths[column], 0)
            continue
        flush()
        spans.append(sources.each(column.lengths.astype(">i4").tobytes(), 4, count))  # the length words
        present = np.maximum(column.lengths, 0)
        spans.append((sources.add(column.data) + column.starts, present))
        body += 4 + present
    flush()
    header = np.empty(count, _HEADER)
    header["type"], header["length"], header["count"] = Backend.DATA_ROW, body + 4, len(columns)
    spans.insert(0, sources.each(header.tobytes(), _HEADER.itemsize, count))
    starts = np.stack([s for s, _ in spans], axis=1).ravel()
    lengths = np.stack([n for _, n in spans], axis=1).ravel()
    return _gather(sources.joined(), starts, lengths).tobytes()


class _Sources:
    """The buffers a block's DataRows are gathered from, as one array; where each added one starts in it."""

    def __init__(self, first: NDArray[np.uint8]) -> None:
        self._arrays = [first]
        self._size = len(first)

    def add(self, data: bytes) -> int:
        start = self._size
        self._arrays.append(np.frombuffer(data, np.uint8))
        self._size += len(data)
        return start

    def each(self, data: bytes, width: int, count: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``count`` values of ``width`` bytes one after another: the span of each."""
        start = self.add(data)
        return start + np.arange(count, dtype=np.int64) * width, np.full(count, width, np.int64)

    def joined(self) -> NDArray[np.uint8]:
        return np.concatenate(self._arrays)


def _gather(source: NDArray[np.uint8], starts: NDArray[np.int64], lengths: NDArray[np.int64]) -> NDArray[np.uint8]:
    """The spans ``source[s : s + n]`` one after another: one index per byte taken."""
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)
    taken: NDArray[np.uint8] = source[index]
    return taken
