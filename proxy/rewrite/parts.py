"""One part of a streamed statement's rows computed: its calls' results put in, as the client's DataRows.

Owns: :class:`StreamCall` (an output call bound to its overload, with the results of the inputs seen so far in
the statement: up to ``MEMO_LIMIT`` of them) and :func:`part`: a part's fields found at once
(:class:`proxy.wire.rows.RowBlock`); each call's hidden columns read — a numeric array column of one shape as one
matrix cut straight from the rows, its distinct rows found by numpy (a hash of each row's bytes, checked
byte for byte) and handed to the engine whole (:class:`engine.api.Columns`), any other column value by value —
only the inputs not computed before sent to the engine; the results encoded as a column
(:func:`engine.pg.output.encode_column`) and the DataRows written by array operations
(:func:`proxy.wire.rows.data_rows`). Large parts are read and written in a worker thread.

Must not: run statements, know portals or protocols (:mod:`proxy.rewrite.streaming` reads the parts), or change
which rows or columns the client gets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.api import Columns, Signature
from engine.pg import output, types
from engine.pg.binary import binary_array, binary_value, numeric_matrix, numeric_rows
from engine.pg.fields import Fields, gather
from engine.pg.scalars import decode_utf8
from engine.pg.text import from_text
from proxy.rewrite.outputs import Output
from proxy.rewrite.steps import Evaluate, Steps, off_loop
from proxy.wire.rows import RowBlock, data_rows

MEMO_LIMIT = 4096  # distinct inputs whose results a statement remembers (then it starts over)
OFF_LOOP_ROWS = 1024  # parts this large are read and written in a worker thread
_MIXERS = np.random.default_rng(0x70676D6C).integers(1, 2**63, size=1 << 12, dtype=np.uint64) | np.uint64(1)
Key = tuple[bytes | None, ...]


@dataclass
class _Seen:
    """Distinct matrix rows computed so far: their bytes as sent, their hashes (sorted) and results."""

    hashes: NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    rows: NDArray[np.uint64] = field(default_factory=lambda: np.zeros((0, 0), np.uint64))
    results: NDArray[Any] = field(default_factory=lambda: np.zeros(0, object))
    most: int = 0  # the most rows here that share one hash

    def find(self, hashes: NDArray[np.uint64], rows: NDArray[np.uint64]) -> NDArray[np.int64]:
        """For each row, the index of its result here (-1: not computed yet)."""
        found = np.full(len(hashes), -1, np.int64)
        if not len(self.hashes) or self.rows.shape[1] != rows.shape[1]:
            return found
        start = np.searchsorted(self.hashes, hashes)
        for step in range(self.most):  # the rows of one hash, one after another
            at = np.minimum(start + step, len(self.hashes) - 1)
            same = (found < 0) & (self.hashes[at] == hashes) & np.all(self.rows[at] == rows, axis=1)
            found[same] = at[same]
        return found

    def add(self, hashes: NDArray[np.uint64], rows: NDArray[np.uint64], results: NDArray[Any]) -> None:
        """Remember these (the first MEMO_LIMIT of them, in place of those seen before once there are more)."""
        hashes, rows, results = hashes[:MEMO_LIMIT], rows[:MEMO_LIMIT], results[:MEMO_LIMIT]
        if len(self.hashes) + len(hashes) > MEMO_LIMIT or self.rows.shape[1] != rows.shape[1]:
            self.hashes, self.rows, self.results = hashes[:0], rows[:0], results[:0]
        order = np.argsort(np.concatenate((self.hashes, hashes)), kind="stable")
        self.hashes = np.concatenate((self.hashes, hashes))[order]
        self.rows = np.concatenate((self.rows, rows))[order]
        self.results = np.concatenate((self.results, results))[order]
        self.most = int(np.unique(self.hashes, return_counts=True)[1].max())


@dataclass
class StreamCall:
    """One output call bound to its overload, with the results of the inputs seen so far in the statement."""

    output: Output
    signature: Signature
    fixed: list[Any]
    oids: list[int]
    binary: list[bool]
    memo: dict[Key, Any] = field(default_factory=dict)
    seen: _Seen = field(default_factory=_Seen)
    computed: int = 0  # inputs the engine computed for the statement
    format: int = 0  # the client's format code for the call's column


def part(rows: RowBlock, calls: list[StreamCall], width: int, visible: int, digits: int) -> Steps[bytes]:
    """The client's DataRows of one part's rows (``width`` columns sent, the first ``visible`` the client's)."""
    long = len(rows) > OFF_LOOP_ROWS
    fields = yield from off_loop(long, functools.partial(rows.fields, width))
    columns: dict[int, output.Encoded] = {}
    for call in calls:
        matrix = yield from off_loop(long, functools.partial(_matrix, call, fields))
        values: Any = (yield from _matrix_values(call, *matrix)) if matrix is not None else None
        if matrix is None:
            values = yield from _values(call, fields, long)
        columns[call.output.column] = yield from off_loop(long, functools.partial(_encoded, call, values, digits))
    layout = [columns.get(k, k) for k in range(visible)]
    return (yield from off_loop(long, functools.partial(data_rows, fields, layout)))


def _matrix(call: StreamCall, fields: Fields) -> tuple[NDArray[Any], NDArray[np.uint64]] | None:
    """A call whose one column argument is a binary numeric array of one shape in every row, without NULLs: the
    rows' arrays as one matrix, and each row's bytes as sent, in 64-bit words (None: another input)."""
    if len(call.output.given) != 1 or not call.binary[0]:
        return None
    (column,) = call.output.hidden
    at, lengths = fields.at[column], fields.lengths[column]
    size = int(lengths[0]) if len(lengths) else 0
    if size < 20 or not bool(np.all(lengths == size)):
        return None
    joined = gather(fields.buf, at, lengths)
    matrix = numeric_rows(joined, size, call.oids[0])
    if matrix is None:
        return None
    padded = np.zeros((fields.num_rows, -(-size // 8) * 8), np.uint8)
    padded[:, :size] = joined.reshape(fields.num_rows, size)
    return matrix, padded.view(np.uint64)


def _matrix_values(call: StreamCall, matrix: NDArray[Any], words: NDArray[np.uint64]) -> Steps[NDArray[Any]]:
    """Each row's result: the distinct rows not computed before sent to the engine as one matrix."""
    hashes = words @ _MIXERS[: words.shape[1]] if words.shape[1] <= len(_MIXERS) else words.sum(axis=1)
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    if not np.array_equal(words[first[inverse]], words):  # two inputs of one hash: found by bytes
        _, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
        unique = hashes[first]
    inverse = inverse.reshape(-1)
    known = call.seen.find(unique, words[first])
    results = np.empty(len(unique), object)
    results[known >= 0] = call.seen.results[known[known >= 0]]
    new = np.flatnonzero(known < 0)
    if len(new):
        args = list(call.fixed)
        (param,) = call.output.given
        args[param] = matrix[first[new]]
        shared = tuple(i != param for i in range(len(args)))
        got = yield Evaluate(call.signature, Columns(len(new), tuple(args), shared))
        fresh = np.fromiter(got, object, len(new))
        call.computed += len(new)
        results[new] = fresh
        call.seen.add(unique[new], words[first[new]], fresh)
    return results[inverse]


def _values(call: StreamCall, fields: Fields, long: bool) -> Steps[list[Any]]:
    """Each row's result, its inputs read value by value: the inputs not computed before sent to the engine."""
    keys: list[Key] = list(zip(*(fields.raw(h) for h in call.output.hidden), strict=True))
    new = list(dict.fromkeys(k for k in keys if None not in k and k not in call.memo))
    if new:
        inputs = yield from off_loop(long, functools.partial(_inputs, call, new))
        results = yield Evaluate(call.signature, tuple(inputs))
        call.computed += len(new)
        if len(call.memo) + len(new) > MEMO_LIMIT:
            call.memo.clear()
        call.memo.update(zip(new, results, strict=True))
    return [None if None in k else call.memo[k] for k in keys]


def _inputs(call: StreamCall, keys: list[Key]) -> list[tuple[Any, ...]]:
    """The argument tuples of ``keys`` (the hidden columns' bytes): constants filled in, columns decoded."""
    rows = [list(call.fixed) for _ in keys]
    for j, (param, oid, binary) in enumerate(zip(call.output.given, call.oids, call.binary, strict=True)):
        for row, value in zip(rows, _read([k[j] for k in keys], oid, binary), strict=True):
            row[param] = value
    return [tuple(row) for row in rows]


def _read(values: list[Any], oid: int, binary: bool) -> list[Any]:
    """One hidden column's values: numeric arrays as rows of one matrix, the rest one by one."""
    if not binary:
        kind = types.READ_AS.get(oid, "text")
        return [from_text(decode_utf8(v), kind) for v in values]
    matrix = numeric_matrix(values, oid)
    if matrix is not None:
        return list(matrix)
    if oid in types.ELEMENTS:  # NULL elements, or more dimensions: the elements in order, one by one
        return [binary_array(v, types.ELEMENTS[oid], flatten=True) for v in values]
    return [binary_value(v, oid) for v in values]


def _encoded(call: StreamCall, values: Any, digits: int) -> output.Encoded:
    out = call.output
    return output.encode_column(
        values,
        call.signature.returns,
        cast=out.cast,
        binary=call.format == 1,
        extra_float_digits=digits,
        dimensions=out.dimensions,
    )
