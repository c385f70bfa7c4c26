"""Internal exchanges (proxy.session.exchange.Exchange): the frames sent, the answers read back.

Sans-IO cases feed recorded server replies and check the exact frames; the protocol facts the pipelined
COPY relies on (data sent ahead of CopyInResponse is read in copy-in mode, and ignored once a statement
before it failed) are checked against a real PostgreSQL by driving an Exchange over a plain socket.
"""

from __future__ import annotations

import socket

import pytest

from engine.api import Statement
from proxy.errors import ProtocolViolation
from proxy.session.exchange import CLOSE_BOTH, FLUSH, SYNC, Exchange, Rows, copy_frames, statement_frames
from proxy.wire import messages as pq
from proxy.wire.frames import Backend, Frame, StartupMessage, encode_startup, pack, split_frames
from tests.conftest import Postgres

CREATE = Statement("CREATE TEMP TABLE x (k text, v real)")
COPY_IN = Statement("COPY x FROM STDIN", copy_data=b"a\t1\nb\t2\n")
READ = Statement("SELECT k, v FROM x ORDER BY k")


def _frames(*messages: bytes) -> list[Frame]:
    return split_frames(b"".join(messages))


def _answer(exchange: Exchange, *messages: bytes) -> list[bytes]:
    sent: list[bytes] = []
    for frame in _frames(*messages):
        sent += exchange.feed(frame)
    return sent


def _executed(tag: str) -> list[bytes]:
    """Parse, Bind, Describe (no data), Execute, Close, Close: the answers to one statement without rows."""
    return [
        pq.ParseComplete().encode(), pq.BindComplete().encode(), pq.NoData().encode(),
        pq.CommandComplete(tag).encode(), pq.CloseComplete().encode(), pq.CloseComplete().encode(),
    ]  # fmt: skip


COPY_IN_RESPONSE = pack(Backend.COPY_IN_RESPONSE, b"\0\0\0")


def test_copy_data_goes_out_with_the_statements_in_one_write() -> None:
    exchange = Exchange([CREATE, COPY_IN, READ], sync=True)
    assert exchange.start() == [
        *CLOSE_BOTH,
        *statement_frames(CREATE), *CLOSE_BOTH,
        *statement_frames(COPY_IN), *copy_frames(b"a\t1\nb\t2\n"), *CLOSE_BOTH,
        *statement_frames(READ), *CLOSE_BOTH,
        SYNC,
    ]  # fmt: skip
    copy_answers = _executed("COPY 2")
    copy_answers.insert(3, COPY_IN_RESPONSE)  # after the Describe's NoData, before the CommandComplete
    read = [
        pq.ParseComplete().encode(), pq.BindComplete().encode(),
        pq.RowDescription((pq.Column("k", 25), pq.Column("v", 700))).encode(),
        pq.DataRow((b"a", b"1")).encode(), pq.DataRow((b"b", b"2")).encode(), pq.CommandComplete("SELECT 2").encode(),
        pq.CloseComplete().encode(), pq.CloseComplete().encode(),
    ]  # fmt: skip
    answers = [pq.CloseComplete().encode()] * 2 + _executed("CREATE TABLE") + copy_answers + read
    assert _answer(exchange, *answers, pq.ReadyForQuery("I").encode()) == []  # nothing more to send
    assert exchange.done and exchange.error is None and exchange.status == "I"
    assert [r.command for r in exchange.results] == ["CREATE TABLE", "COPY 2", "SELECT 2"]
    read_result = exchange.results[2]
    assert read_result.rows == [("a", "1"), ("b", "2")] and read_result.columns == [("k", 25), ("v", 700)]


def test_an_error_before_the_copy_ends_the_exchange_at_ready_for_query() -> None:
    exchange = Exchange([CREATE, COPY_IN], sync=True)
    exchange.start()
    error = pq.ErrorResponse((("S", "ERROR"), ("C", "42P07"), ("M", 'relation "x" already exists'))).encode()
    parsed = [pq.ParseComplete().encode(), pq.BindComplete().encode(), pq.NoData().encode()]
    sent = _answer(exchange, *[pq.CloseComplete().encode()] * 2, *parsed, error, pq.ReadyForQuery("I").encode())
    assert sent == [] and exchange.done and dict(exchange.error or ())["C"] == "42P07"


def test_mid_batch_it_ends_with_flush_and_at_the_last_close() -> None:
    exchange = Exchange([COPY_IN], sync=False)
    assert exchange.start()[-1] == FLUSH and SYNC not in exchange.start()
    copy_answers = _executed("COPY 2")
    copy_answers.insert(3, COPY_IN_RESPONSE)
    assert _answer(exchange, *[pq.CloseComplete().encode()] * 2, *copy_answers) == []
    assert exchange.done and exchange.results[0].command == "COPY 2"


def test_a_copy_without_data_is_a_protocol_violation() -> None:
    exchange = Exchange([Statement("COPY x FROM STDIN")], sync=True)
    exchange.start()
    parsed = [pq.ParseComplete().encode(), pq.BindComplete().encode(), pq.NoData().encode()]
    with pytest.raises(ProtocolViolation, match="without COPY data"):
        _answer(exchange, *[pq.CloseComplete().encode()] * 2, *parsed, COPY_IN_RESPONSE)


def test_copy_out_rows_stay_one_message_each() -> None:
    exchange = Exchange([Statement("COPY x TO STDOUT")], sync=True)
    exchange.start()
    out = pack(Backend.COPY_OUT_RESPONSE, b"\0\0\0")
    rows = [pq.CopyData(b"a\t1\n").encode(), pq.CopyData(b"b\t2\n").encode(), pq.CopyDone().encode()]
    parsed = [pq.ParseComplete().encode(), pq.BindComplete().encode(), pq.NoData().encode(), out]
    done = [pq.CommandComplete("COPY 2").encode(), *[pq.CloseComplete().encode()] * 2, pq.ReadyForQuery("I").encode()]
    _answer(exchange, *[pq.CloseComplete().encode()] * 2, *parsed, *rows, *done)
    assert exchange.results[0].copy == b"a\t1\nb\t2\n" and exchange.results[0].copy_rows == [4, 4]


@pytest.mark.parametrize(
    "lengths",
    [[7] * 50, [7, 7, 3, 9, 0, 7], [7, 3, 11, 7], [5], [45, *[26] * 40, 2]],
    ids=["one length", "several", "same total", "one row", "binary COPY's header and trailer"],
)
@pytest.mark.parametrize("trailing", [False, True], ids=["copy data only", "more after"])
def test_copy_out_rows_taken_in_bulk_are_the_rows_message_by_message(lengths: list[int], trailing: bool) -> None:
    """feed_run (the session's bulk path for a chunk of CopyData) reads what feed reads one message at a time."""
    rows = [bytes([65 + i % 26]) * n for i, n in enumerate(lengths)]
    frames = [pq.CopyData(row).encode() for row in rows]
    after = pq.CopyDone().encode() if trailing else b""
    one, bulk = (Exchange([Statement("COPY x TO STDOUT")], sync=True) for _ in range(2))
    _answer(one, *frames)
    chunk = b"".join(frames) + after
    assert bulk.feed_run(chunk, Backend.COPY_DATA, len(frames)) == len(chunk) - len(after)
    done = [pq.CommandComplete(f"COPY {len(rows)}").encode()]
    _answer(one, *done)
    _answer(bulk, *done)
    assert bulk.results[0].copy == one.results[0].copy == b"".join(rows)
    assert bulk.results[0].copy_rows == one.results[0].copy_rows == lengths


def test_row_portal_rows_taken_in_bulk_are_the_rows_message_by_message() -> None:
    """A row portal's DataRows taken by feed_run are its rows as feed reads them; rows of another statement are
    not taken (0 bytes: each goes through feed)."""
    rows = [(b"1", None, b"abc"), (b"22", b"", None), (None, None, None)]
    frames = [pq.DataRow(row).encode() for row in rows]
    opened = [pq.CloseComplete().encode(), pq.ParseComplete().encode(), pq.BindComplete().encode(),
              pq.RowDescription((pq.Column("a", 25), pq.Column("b", 25), pq.Column("c", 25))).encode()]  # fmt: skip
    one, bulk = (Exchange([Rows("SELECT …", limit=5)], sync=False) for _ in range(2))
    for exchange in (one, bulk):
        exchange.start()
        _answer(exchange, *[pq.CloseComplete().encode()] * 2, *opened)
    _answer(one, *frames)
    assert bulk.feed_run(b"".join(frames), Backend.DATA_ROW, len(frames)) == len(b"".join(frames))
    for exchange in (one, bulk):
        _answer(exchange, pq.CommandComplete("SELECT 3").encode())
        assert exchange.done
    width = len(rows[0])
    assert bulk.results[0].block.values(width) == one.results[0].block.values(width) == rows  # type: ignore[attr-defined]
    other = Exchange([READ], sync=True)
    assert other.feed_run(b"".join(frames), Backend.DATA_ROW, len(frames)) == 0


# --------------------------------------------------------------------------- #
# Against a real server
# --------------------------------------------------------------------------- #


class _Session:
    """A bare protocol-3 session (trust auth) that runs one Exchange at a time."""

    def __init__(self, pg: Postgres) -> None:
        self.sock = socket.create_connection(("127.0.0.1", pg.port))
        startup = StartupMessage(3, 0, (("user", "postgres"), ("database", "postgres")))
        self.sock.sendall(encode_startup(startup))
        self.buffer = b""
        while not any(f.type == Backend.READY_FOR_QUERY for f in self._read()):
            pass

    def _read(self) -> list[Frame]:
        while True:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
            end = 0
            while len(self.buffer) - end >= 5:
                size = 1 + int.from_bytes(self.buffer[end + 1 : end + 5], "big")
                if len(self.buffer) - end < size:
                    break
                end += size
            if end:
                frames, self.buffer = split_frames(self.buffer[:end]), self.buffer[end:]
                return frames

    def run(self, exchange: Exchange) -> Exchange:
        self.sock.sendall(b"".join(exchange.start()))
        while not exchange.done:
            for frame in self._read():
                reply = exchange.feed(frame)
                if reply:
                    self.sock.sendall(b"".join(reply))
        return exchange

    def close(self) -> None:
        self.sock.sendall(pq.Terminate().encode())
        self.sock.close()


def test_pipelined_copy_against_a_real_server(pg: Postgres) -> None:
    session = _Session(pg)
    try:
        done = session.run(Exchange([CREATE, COPY_IN, READ], sync=True))
        assert done.error is None and done.results[2].rows == [("a", "1"), ("b", "2")]
        # The table exists now: CREATE fails, the COPY data sent behind it is ignored, the session is fine.
        failed = session.run(Exchange([CREATE, COPY_IN, READ], sync=True))
        assert dict(failed.error or ())["C"] == "42P07" and failed.status == "I"
        # A COPY whose data is bad fails alone; the frames after it are skipped up to the Sync.
        bad = session.run(Exchange([Statement("COPY x FROM STDIN", copy_data=b"c\tnot a number\n"), READ], sync=True))
        assert dict(bad.error or ())["C"] == "22P02" and bad.status == "I"
        again = session.run(Exchange([READ], sync=True))
        assert again.error is None and again.results[0].rows == [("a", "1"), ("b", "2")]
    finally:
        session.close()
