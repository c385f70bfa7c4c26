"""The session's proxy-owned cursors over ``pgml.transform_stream``, and answering its stream statements.

Owns: the per-session table of proxy-owned cursors (statements recognised by :mod:`proxy.streams.classify`,
generations run by :mod:`proxy.streams.stream`) with the fragments generated so far and
each cursor's position (moved by PostgreSQL's own portal rules: every FETCH/MOVE
direction, SCROLL / NO SCROLL and the default scrollability of a function scan),
and the response frames the client gets for them (RowDescription, DataRow,
CommandComplete) — exactly what PostgreSQL would send for a cursor over a
``SETOF jsonb`` function.

Must not: touch sockets or run models. The session writes the frames; the engine
produces the fragments (``Engine.stream``) in a worker, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pglast import ast, enums

from engine.api import Engine, EngineError, SessionSettings
from proxy.errors import (
    DuplicateCursor,
    FeatureNotSupported,
    InvalidCursorName,
    NoActiveTransaction,
    NotInPrerequisiteState,
    ProxyError,
)
from proxy.rewrite import decide
from proxy.streams.classify import FUNCTION, Close, Declare, Fetch, Own, Refuse, StreamSelect
from proxy.streams.stream import Stream, command_complete, data_row, failure, row_description, start
from proxy.wire.messages import ReadyForQuery

FETCH_ALL = 9223372036854775807  # FETCH ALL: LONG_MAX in the grammar
_T = TypeVar("_T")


# --------------------------------------------------------------------------- #
# A proxy-owned cursor: PostgreSQL's portal position over a stream
# --------------------------------------------------------------------------- #


_FORWARD, _BACKWARD, _ABSOLUTE, _RELATIVE = (int(d) for d in enums.FetchDirection)


@dataclass
class Cursor:
    """One proxy-owned cursor: its generation and its position, kept as PostgreSQL keeps a portal's.

    ``pos`` is the number of the current row (0: before the first), ``at_start`` / ``at_end``
    PostgreSQL's flags (``at_end``: past the last row, ``pos`` then being the last row's number).
    A scrollable cursor keeps every fragment read so far, so that it can go back; a NO SCROLL one
    keeps none.
    """

    stream: Stream
    column: str = FUNCTION  # the output column's name (an alias in the cursor's query)
    hold: bool = False  # WITH HOLD: survives COMMIT
    scroll: bool = False
    binary: bool = False
    kept: list[list[str]] = field(default_factory=list)  # rows 1 … len(kept) (scrollable cursors only)
    pos: int = 0
    at_start: bool = True
    at_end: bool = False

    async def fetch(self, direction: int, count: int, move: bool) -> tuple[list[list[str]], int]:
        """FETCH (rows, count) or MOVE (no rows, count) as PostgreSQL's DoPortalRunFetch moves a portal."""
        if direction == _ABSOLUTE:
            return await self._absolute(count, move)
        if direction == _RELATIVE and count != 0:
            if count > 0:
                await self._select(True, count - 1)
                return self._result(await self._select(True, 1), move)
            await self._select(False, -count - 1)
            return self._result(await self._select(False, 1), move)
        forward = direction != _BACKWARD
        if count < 0:
            forward, count = not forward, -count
        if count == 0:
            on_row = not self.at_start and not self.at_end
            if move:
                return [], int(on_row)
            if on_row:  # FETCH 0: the current row again (back one, then forward one)
                await self._select(False, 1)
                forward, count = True, 1
        if not forward and count == FETCH_ALL and move:  # MOVE BACKWARD ALL: a rewind
            moved = self.pos - 1 if self.pos > 0 and not self.at_end else self.pos
            self._rewind()
            return [], moved
        return self._result(await self._select(forward, count), move)

    async def forward(self, count: int) -> list[list[str]]:
        """The next ``count`` rows (FETCH_ALL: all), as an Execute of the cursor's portal reads them."""
        return await self._select(True, count)

    @staticmethod
    def _result(rows: list[list[str]], move: bool) -> tuple[list[list[str]], int]:
        return ([] if move else rows), len(rows)

    async def _absolute(self, count: int, move: bool) -> tuple[list[list[str]], int]:
        if count > 0:
            if count - 1 <= self.pos // 2:  # PostgreSQL rewinds when the target is nearer the start
                self._rewind()
                await self._select(True, count - 1)
            else:
                pos = self.pos + 1 if self.at_end else self.pos
                if count <= pos:
                    await self._select(False, pos - count + 1)
                elif count > pos + 1:
                    await self._select(True, count - pos - 1)
            return self._result(await self._select(True, 1), move)
        if count < 0:
            await self._select(True, FETCH_ALL)
            await self._select(False, -count - 1)
            return self._result(await self._select(False, 1), move)
        self._rewind()
        return [], 0

    def _rewind(self) -> None:
        if self.at_start and not self.at_end:
            return  # nothing read yet: no scrolling needed
        self._require_scroll()
        self.pos, self.at_start, self.at_end = 0, True, False

    def _require_scroll(self) -> None:
        if not self.scroll:
            raise NotInPrerequisiteState(
                "cursor can only scan forward", hint="Declare it with SCROLL option to enable backward scan."
            )

    async def _select(self, forward: bool, count: int) -> list[list[str]]:
        """PortalRunSelect: up to ``count`` rows (FETCH_ALL: all) in one direction, the position moved."""
        if not forward:
            self._require_scroll()
        if count <= 0 or (self.at_end if forward else self.at_start):
            return []
        if forward:
            rows = await self._read(count)
            if rows:
                self.at_start = False
            if count == FETCH_ALL or len(rows) < count:
                self.at_end = True
            self.pos += len(rows)
            return rows
        current = self.pos + 1 if self.at_end else self.pos
        taken = min(count, current - 1)
        rows = self.kept[current - 1 - taken : current - 1][::-1]
        if taken and self.at_end:
            self.at_end, self.pos = False, self.pos + 1
        if count == FETCH_ALL or taken < count:
            self.at_start, self.pos = True, 0
        else:
            self.pos -= taken
        return rows

    async def _read(self, count: int) -> list[list[str]]:
        """The rows after the current one: kept ones first (after scrolling back), then new fragments."""
        replay = self.kept[self.pos : self.pos + count] if self.scroll else []
        more = await self.stream.take(count - len(replay)) if len(replay) < count else []
        if self.scroll:
            self.kept.extend(more)
        return replay + more


# --------------------------------------------------------------------------- #
# The session's proxy-owned cursors
# --------------------------------------------------------------------------- #


class Cursors:
    """The proxy-owned cursors of one session, and the answers to the statements that use them."""

    def __init__(self, engine: Engine | None) -> None:
        self.open: dict[str, Cursor] = {}
        self.reading: Stream | None = None  # the stream a FETCH or SELECT is waiting on (what a cancel stops)
        self.settings: SessionSettings | None = None  # the session's pgml.* settings, read for the next generation
        self._engine = engine

    def cancel_reading(self) -> None:
        """CancelRequest: stop the generation a statement is waiting on (other cursors stay)."""
        if self.reading is not None and self._engine is not None:
            self._engine.cancel(self.reading.key)

    def stop_all(self, keep_holdable: bool = False) -> None:
        for name, cursor in list(self.open.items()):
            if not (keep_holdable and cursor.hold):
                cursor.stream.stop()
                del self.open[name]

    async def answer(self, own: Own, tx_status: str, write: Any) -> decide.Decision:
        """Answer ``own`` (a simple Query), writing frames with ``write``; returns the decision left to apply."""
        ready = ReadyForQuery(tx_status).encode()
        try:
            match own:
                case StreamSelect(call=call, column=column):
                    return await self._select(call, column, ready, write)
                case Declare():
                    return decide.Respond(self.declare(own, tx_status) + ready)
                case Fetch(name=name, move=move):
                    binary = name in self.open and self.open[name].binary  # a BINARY cursor, read by a simple FETCH
                    rows, tag = await self.fetch(own, binary)
                    described = b"" if move else row_description(self.open[name].column, binary)
                    return decide.Respond(described + rows + tag + ready)
                case Close(name=str(name)):
                    return decide.Respond(self.close(name) + ready)
                case Close():
                    self.stop_all()  # CLOSE ALL: the server closes its own
                case Refuse(error=error):
                    return decide.Fail(error)
        except (ProxyError, EngineError) as exc:
            return decide.Fail(exc)
        return decide.FORWARD

    def declare(self, own: Declare, tx_status: str) -> bytes:
        """Start the cursor's generation; its CommandComplete."""
        if own.name in self.open:
            raise DuplicateCursor(f'cursor "{own.name}" already exists')
        if tx_status != "T" and not own.hold:
            raise NoActiveTransaction("DECLARE CURSOR can only be used in transaction blocks")
        stream = start(own.call, self._require_engine(), self.settings)
        self.open[own.name] = Cursor(stream, own.column, own.hold, own.scroll, own.binary)
        return command_complete("DECLARE CURSOR")

    async def fetch(self, own: Fetch, binary: bool = False) -> tuple[bytes, bytes]:
        """DataRows (none for MOVE) and the CommandComplete of FETCH/MOVE."""
        rows, count = await self.fetch_fragments(own)
        if own.move:
            return b"", command_complete(f"MOVE {count}")
        return b"".join(data_row(f, binary) for f in rows), command_complete(f"FETCH {count}")

    def open_stream(self, call: ast.FuncCall) -> Stream:
        """A generation for a prepared streaming SELECT (its portal owns it)."""
        return start(call, self._require_engine(), self.settings)

    async def fetch_fragments(self, own: Fetch) -> tuple[list[list[str]], int]:
        """The fragments a FETCH takes from its cursor (none for MOVE), and the count of its command tag."""
        cursor = self._cursor(own.name)
        return await self._reading(cursor, cursor.fetch(own.direction, own.count, own.move))

    async def execute(self, name: str, limit: int) -> list[list[str]]:
        """An Execute of the cursor's own portal: the next ``limit`` rows (0: all)."""
        cursor = self._cursor(name)
        return await self._reading(cursor, cursor.forward(limit if limit > 0 else FETCH_ALL))

    def _cursor(self, name: str) -> Cursor:
        if name not in self.open:
            raise InvalidCursorName(f'cursor "{name}" does not exist')
        return self.open[name]

    async def _reading(self, cursor: Cursor, work: Awaitable[_T]) -> _T:
        self.reading = cursor.stream
        try:
            return await work
        except (ProxyError, EngineError):
            raise
        except Exception as exc:
            raise failure(exc) from exc
        finally:
            self.reading = None

    def close(self, name: str) -> bytes:
        self.open.pop(name).stream.stop()
        return command_complete("CLOSE CURSOR")

    async def _select(self, call: ast.FuncCall, column: str, ready: bytes, write: Any) -> decide.Decision:
        write(row_description(column))
        try:
            return decide.Respond(await self.select_rows(call, write) + ready)
        except (ProxyError, EngineError) as exc:  # rows already sent stay; the server raises the error
            return decide.Fail(exc)

    async def select_rows(self, call: ast.FuncCall, write: Any, binary: bool = False) -> bytes:
        """Generate, writing one DataRow per fragment as it arrives; the CommandComplete."""
        stream = self.reading = start(call, self._require_engine(), self.settings)
        count = 0
        try:
            while fragments := await stream.take(1):
                write(data_row(fragments[0], binary))
                count += 1
        except Exception as exc:
            raise failure(exc) from exc
        finally:
            stream.stop()
            self.reading = None
        return command_complete(f"SELECT {count}")

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise FeatureNotSupported("this pgml-proxy runs without a model engine")
        return self._engine
