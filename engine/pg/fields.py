"""Where the fields of binary COPY rows are, and their bytes read for all rows at once by numpy.

Owns: :class:`Fields` (per column, every row's value position and length), found from the data of a
``COPY … TO STDOUT (FORMAT binary)`` and the length of each CopyData message it came in —
``engine.pg.copy`` gives where each row starts and ends (one message per row) — or from binary tuples
whose bounds the caller knows (a run of DataRow messages: :func:`tuple_fields`); a column's 32-bit
length words, read by numpy at every row's position, move every position on to the next column —
and the readers of many positions at once: fixed-width big-endian values, byte spans gathered into
one buffer, UTF-8 text (through pyarrow).

Must not: know the types of the columns (``engine.pg.table`` decodes typed columns from these).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from engine.api import CharacterNotInRepertoire, EngineError
from engine.pg.copy import binary_row_spans

Positions = NDArray[np.int64]


@functools.cache
def _arrow() -> Any:
    """pyarrow, imported on first use: half a second to import, and only text needs it."""
    return importlib.import_module("pyarrow")


@dataclass(frozen=True, eq=False)
class Fields:
    """Where the fields of binary COPY rows are: per column, each row's value position and length (-1: NULL)."""

    data: bytes
    buf: NDArray[np.uint8]
    at: list[Positions]
    lengths: list[Positions]
    num_rows: int

    def raw(self, index: int) -> list[bytes | None]:
        """Column ``index``'s fields as they came (binary form), None for NULL."""
        data, spans = self.data, zip(self.at[index].tolist(), self.lengths[index].tolist(), strict=True)
        return [None if n < 0 else data[a : a + n] for a, n in spans]


def read_fields(data: bytes, messages: Sequence[int], width: int) -> Fields:
    """The fields of ``COPY … TO STDOUT (FORMAT binary)`` data of ``width`` columns that came in CopyData
    messages of these lengths (:attr:`engine.api.Result.copy_rows`).

    Every row is checked to hold ``width`` fields that end where its message does (EngineError, 22P03 …).
    """
    starts, stops = binary_row_spans(data, messages)
    return tuple_fields(data, starts, stops, width, "COPY data")


def tuple_fields(data: bytes, starts: Positions, stops: Positions, width: int, what: str) -> Fields:
    """The fields of binary tuples (a field count, then each field's length word and bytes: a binary COPY row,
    or a DataRow's body) at ``data[start:stop]``, each checked to hold ``width`` fields that end at its stop
    (EngineError "malformed <what>" otherwise)."""
    buf = np.frombuffer(data, np.uint8)
    try:
        counts = words(buf, starts, ">i2")
        if np.any(counts != width):
            found = int(counts[np.argmax(counts != width)])
            raise EngineError(f"malformed {what}: a row has {found} fields, not {width}")
        pos = starts + 2
        at, lengths = [], []
        for _ in range(width):
            length = words(buf, pos, ">i4").astype(np.int64)
            after = pos + 4 + np.maximum(length, 0)
            if np.any(length < -1) or np.any(after > stops):
                raise EngineError(f"malformed {what}: a field beyond its row")
            at.append(pos + 4)
            lengths.append(length)
            pos = after
    except IndexError:
        raise EngineError(f"malformed {what}: a field beyond the data") from None
    if np.any(pos != stops):
        raise EngineError(f"malformed {what}: bytes after the last field of a row")
    return Fields(data, buf, at, lengths, len(starts))


# --------------------------------------------------------------------------- #
# Reading bytes at many positions at once
# --------------------------------------------------------------------------- #


def _stride(at: Positions, least: int) -> int | None:
    """The distance between consecutive positions when it is one and the same (and at least ``least``)."""
    step = int(at[1] - at[0]) if len(at) > 1 else least
    if step >= least and (len(at) < 3 or bool(np.all(np.diff(at) == step))):
        return step
    return None


def words(buf: NDArray[np.uint8], at: Positions, dtype: str) -> NDArray[Any]:
    """The fixed-width value of ``dtype`` at each position (big-endian, as every binary form is).

    Positions one stride apart (rows of one length, the fields before them of fixed width: the usual
    numeric table) are read through a strided view of the bytes; others are gathered byte by byte.
    """
    size = np.dtype(dtype).itemsize
    if len(at) == 0:
        return np.empty(0, dtype)
    step = _stride(at, size)
    if step is not None:
        return np.ndarray((len(at),), dtype, buffer=buf, offset=int(at[0]), strides=(step,))
    out = np.empty((len(at), size), np.uint8)
    for k in range(size):
        out[:, k] = buf[at + k]
    return out.view(dtype).reshape(len(at))


def gather(buf: NDArray[np.uint8], at: Positions, lengths: Positions) -> NDArray[np.uint8]:
    """The bytes ``buf[a : a + n]`` of every (a, n), concatenated; the spans are in order and do not overlap.

    Spans of one length one stride apart are read through a strided view; others through a mask of the
    bytes to keep: +1 where a span starts, -1 where one ends, summed up (starts are distinct, and so are
    ends, once empty spans are left out).
    """
    if len(at) and bool(np.all(lengths == lengths[0])):
        size = int(lengths[0])
        step = _stride(at, size)
        if step is not None:
            view = np.ndarray((len(at), size), np.uint8, buffer=buf, offset=int(at[0]), strides=(step, 1))
            return np.ascontiguousarray(view).reshape(-1)
    some = lengths > 0
    delta = np.zeros(len(buf) + 1, np.int8)
    delta[at[some]] += 1
    delta[at[some] + lengths[some]] -= 1
    return buf[np.cumsum(delta[:-1], dtype=np.int8).view(np.bool_)]


def strings(buf: NDArray[np.uint8], at: Positions, lengths: Positions) -> list[str | None]:
    """UTF-8 text at each (position, length), None where the length is -1."""
    pa = _arrow()
    nulls = lengths < 0
    sizes = np.where(nulls, 0, lengths)
    offsets = np.zeros(len(at) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    blob = gather(buf, at[~nulls], sizes[~nulls])
    valid = pa.py_buffer(np.packbits(~nulls, bitorder="little").tobytes())
    strings = pa.LargeStringArray.from_buffers(len(at), pa.py_buffer(offsets), pa.py_buffer(blob), valid)
    try:
        strings.validate(full=True)
    except pa.ArrowInvalid:
        raise CharacterNotInRepertoire('invalid byte sequence for encoding "UTF8" in COPY data') from None
    return cast(list[str | None], strings.to_pylist())
