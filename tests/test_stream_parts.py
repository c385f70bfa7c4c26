"""A streamed part computed without a session: DataRow blocks read and written by array operations
(proxy.wire.rows), columns encoded at once (engine.pg.output.encode_column), a part's calls fed from a feature
matrix with its distinct rows found by hash and checked by bytes (proxy.rewrite.parts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.api import Columns, signatures
from engine.pg import types
from engine.pg.binary import send_real_array
from engine.pg.output import encode, encode_column
from proxy.errors import ProtocolViolation
from proxy.rewrite import parts
from proxy.rewrite.outputs import Output
from proxy.rewrite.parts import StreamCall, part
from proxy.rewrite.steps import Compute, Evaluate, Request, replay
from proxy.wire.messages import DataRow
from proxy.wire.rows import RowBlock, data_rows

PREDICT = next(s for s in signatures("predict") if s.params[1].type == "real[]")


def _block(rows: list[tuple[bytes | None, ...]], split: int = 1) -> RowBlock:
    """The rows' DataRows, added in runs of ``split`` messages as the exchange takes them."""
    block = RowBlock()
    frames = [DataRow(r).encode() for r in rows]
    for start in range(0, len(frames), split):
        run = frames[start : start + split]
        ends = list(np.cumsum([len(f) for f in run]))
        block.add(b"".join(run), ends)
    return block


ROWS = [(b"1", b"abc", None, b"xyz"), (b"22", None, b"q", b""), (b"333", b"", b"zz", None)]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_block_values_and_rows_as_they_came(split: int) -> None:
    block = _block(ROWS, split)
    assert len(block) == 3 and block.values(4) == ROWS
    fields = block.fields(4)
    assert data_rows(fields, [0, 1, 2, 3]) == b"".join(DataRow(r).encode() for r in ROWS)
    assert data_rows(fields, [3, 0]) == b"".join(DataRow((r[3], r[0])).encode() for r in ROWS)


@pytest.mark.parametrize("binary", [False, True])
def test_data_rows_with_replaced_columns(binary: bool) -> None:
    fields = _block(ROWS).fields(4)
    values = [1.5, None, -2.0]
    new = encode_column(values, "real", binary=binary)
    texts = encode(values, "real", binary=binary)
    got = data_rows(fields, [0, new, 1, new])
    assert got == b"".join(DataRow((r[0], t, r[1], t)).encode() for r, t in zip(ROWS, texts, strict=True))
    assert data_rows(fields, [new]) == b"".join(DataRow((t,)).encode() for t in texts)


def test_malformed_data_rows_are_a_protocol_violation() -> None:
    block = _block(ROWS)
    with pytest.raises(ProtocolViolation, match="a row has 4 fields, not 3"):
        block.fields(3)
    bad = RowBlock()
    frame = bytearray(DataRow((b"abc",)).encode())
    frame[7:11] = (9).to_bytes(4, "big")  # a field longer than its message
    bad.add(bytes(frame), (len(frame),))
    with pytest.raises(ProtocolViolation) as caught:
        bad.fields(1)
    assert caught.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("values", "sql_type"),
    [
        ([1.5, None, 3.25, float("nan"), float("inf"), 1e-7, 123456789.0], "real"),
        (np.array([0.1, 2.0, -0.0], np.float32), "real"),
        (np.array([0.5, None], object), "real"),
        (["a", None, "héllo", ""], "text"),
        ([{"b": 1, "a": [1, 2]}, None], "jsonb"),
        ([[1.0, 2.5], None, []], "real[]"),
        ([], "real"),
    ],
)
@pytest.mark.parametrize("binary", [False, True])
def test_encode_column_is_encode(values: Any, sql_type: str, binary: bool) -> None:
    column = encode_column(values, sql_type, binary=binary)
    got = [None if n < 0 else column.data[s : s + n] for s, n in zip(column.starts, column.lengths, strict=True)]
    assert got == encode(list(values), sql_type, binary=binary)


def test_columns_reads_as_tuples() -> None:
    matrix = np.arange(6, dtype=np.float32).reshape(3, 2)
    batch = Columns(3, ("p", matrix), (True, False))
    assert len(batch) == 3 and batch[1][0] == "p" and batch[-1][1].tolist() == [4.0, 5.0]
    assert [r[1].tolist() for r in batch[1:]] == [[2.0, 3.0], [4.0, 5.0]]
    with pytest.raises(IndexError):
        batch[3]


def _predict_call() -> StreamCall:
    """``pgml.predict('p', <hidden column 2>)`` in column 1 of rows (id, placeholder, features)."""
    output = Output(site=None, candidates=(PREDICT,), slots=("p", None), given=(1,), hidden=(2,), column=1)  # type: ignore[arg-type]
    return StreamCall(output, PREDICT, ["p", None], [types.FLOAT4_ARRAY], [True])


def _run(call: StreamCall, block: RowBlock, seen: list[Any]) -> bytes:
    def answer(request: Request) -> Any:
        if isinstance(request, Compute):
            return request.function()
        assert isinstance(request, Evaluate)
        seen.append(request.rows)
        return [float(sum(row[1])) for row in request.rows]  # the "model": the sum of the features

    return replay(part(block, [call], 3, 2, 1), answer)


def _feature_rows(features: list[list[float]]) -> list[tuple[bytes | None, ...]]:
    return [(str(i).encode(), None, send_real_array(f)) for i, f in enumerate(features)]


@pytest.mark.parametrize("collide", [False, True])
def test_matrix_part_computes_each_distinct_row_once(monkeypatch: pytest.MonkeyPatch, collide: bool) -> None:
    if collide:  # every row one hash: the rows are told apart by their bytes
        monkeypatch.setattr(parts, "_MIXERS", np.zeros_like(parts._MIXERS))
    features = [[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.5, 0.25], [3.0, 4.0]]
    call, seen = _predict_call(), []
    got = _run(call, _block(_feature_rows(features)), seen)
    sums = [b"3", b"7", b"3", b"0.75", b"7"]
    assert got == b"".join(DataRow((str(i).encode(), s)).encode() for i, s in enumerate(sums))
    (batch,) = seen
    assert isinstance(batch, Columns) and len(batch) == 3 and call.computed == 3
    assert sorted(map(tuple, batch.columns[1].tolist())) == [(0.5, 0.25), (1.0, 2.0), (3.0, 4.0)]
    # a later part: rows seen before come from the memo, only the new one is computed
    again = _run(call, _block(_feature_rows([[3.0, 4.0], [9.0, 1.0], [1.0, 2.0]])), seen)
    assert len(seen) == 2 and len(seen[1]) == 1 and call.computed == 4
    assert again == b"".join(DataRow((str(i).encode(), t)).encode() for i, t in enumerate([b"7", b"10", b"3"]))


def test_part_with_nulls_or_ragged_arrays_reads_value_by_value() -> None:
    rows = [*_feature_rows([[1.0, 2.0], [3.0]]), (b"2", None, None)]
    call, seen = _predict_call(), []
    got = _run(call, _block(rows), seen)
    assert got == b"".join(DataRow(v).encode() for v in [(b"0", b"3"), (b"1", b"3"), (b"2", None)])
    (batch,) = seen
    assert isinstance(batch, tuple) and len(batch) == 2  # NULL features: a NULL result, not computed
