"""Streams the proxy owns: ``pgml.transform_stream`` as a plain SELECT and behind ``DECLARE … CURSOR``.

Owns: recognising the statements that start, read and end such a stream
(``SELECT pgml.transform_stream(…)``, ``DECLARE c CURSOR FOR SELECT
pgml.transform_stream(…)``, ``FETCH``/``MOVE``, ``CLOSE``, transaction end), the
per-session table of proxy-owned cursors with the fragments generated so far and
each cursor's position (moved by PostgreSQL's own portal rules: every FETCH/MOVE
direction, SCROLL / NO SCROLL and the default scrollability of a function scan),
and the response frames the client gets for them (RowDescription, DataRow,
CommandComplete) — exactly what PostgreSQL would send for a cursor over a
``SETOF jsonb`` function.

Must not: touch sockets or run models. The session writes the frames; the engine
produces the fragments (``Engine.stream``) in a worker, never on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pglast
from pglast import ast, enums

from engine.api import Call, Engine, EngineError
from engine.pg import types
from engine.pg.binary import send_jsonb
from proxy.errors import (
    DuplicateCursor,
    FeatureNotSupported,
    InvalidCursorName,
    NoActiveTransaction,
    NotInPrerequisiteState,
    ProxyError,
)
from proxy.rewrite import decide as rewrite
from proxy.rewrite.calls import bind, find_calls
from proxy.rewrite.constant import fold_call
from proxy.wire.messages import Column, CommandComplete, DataRow, ReadyForQuery, RowDescription

FUNCTION = "transform_stream"
_stream_keys = itertools.count(1)
_STREAM = re.compile(FUNCTION, re.IGNORECASE)
FETCH_ALL = 9223372036854775807  # FETCH ALL: LONG_MAX in the grammar
_T = TypeVar("_T")


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

    async def take(self, count: int) -> list[list[str]]:
        """Up to ``count`` fragments: as soon as that many exist (or the buffer is full), or all that remain once
        generation ended."""
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
            self._task.cancel()  # thrown into the engine's iterator, whose cleanup stops the worker


# --------------------------------------------------------------------------- #
# Recognising the statements
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class StreamSelect:
    """``SELECT pgml.transform_stream(…) [AS c]`` or ``SELECT * FROM pgml.transform_stream(…) [AS c]``."""

    call: ast.FuncCall
    column: str


@dataclass(frozen=True)
class Declare:
    name: str
    call: ast.FuncCall
    column: str
    hold: bool
    scroll: bool  # SCROLL, or neither SCROLL nor NO SCROLL over a function scan (FROM), as PostgreSQL decides
    binary: bool  # DECLARE … BINARY CURSOR: a simple-protocol FETCH answers in binary format


@dataclass(frozen=True)
class Fetch:
    """``FETCH``/``MOVE`` ``[direction] [count] FROM name`` (count as PostgreSQL's grammar leaves it)."""

    name: str
    count: int
    move: bool
    direction: int = enums.FetchDirection.FETCH_FORWARD


@dataclass(frozen=True)
class Close:
    name: str | None  # None: CLOSE ALL


@dataclass(frozen=True)
class Refuse:
    """A statement about a proxy cursor that PostgreSQL would reject: the error to answer with."""

    error: ProxyError


Own = StreamSelect | Declare | Fetch | Close | Refuse


def parse_one(sql: str) -> ast.Node | None:
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    return statements[0].stmt if len(statements) == 1 else None


def classify(sql: str, cursors: dict[str, Cursor]) -> Own | None:
    """What the proxy does itself with this statement (None: not a stream statement)."""
    if not cursors and _STREAM.search(sql) is None:  # the usual case: no parse (pgml statements are parsed once)
        return None
    match parse_one(sql):
        case ast.SelectStmt() as select if (found := _stream_call(select)) is not None:
            return StreamSelect(found[0], found[1])
        case ast.DeclareCursorStmt(portalname=str(name), query=ast.SelectStmt() as select, options=options) if (
            found := _stream_call(select)
        ) is not None:
            flags = int(options or 0)
            scroll = bool(flags & _CURSOR_OPT_SCROLL) or (not flags & _CURSOR_OPT_NO_SCROLL and found[2])
            return Declare(name, found[0], found[1], bool(flags & _CURSOR_OPT_HOLD), scroll, bool(flags & 1))
        case ast.DeclareCursorStmt(portalname=str(name)) if name in cursors:
            return Refuse(DuplicateCursor(f'cursor "{name}" already exists'))
        case ast.FetchStmt(portalname=str(name), howMany=count, ismove=move, direction=direction) if name in cursors:
            return Fetch(name, int(count or 0), bool(move), int(direction or 0))
        case ast.ClosePortalStmt(portalname=name) if name is None or name in cursors:
            return Close(name)
    return None


_CURSOR_OPT_BINARY, _CURSOR_OPT_SCROLL, _CURSOR_OPT_NO_SCROLL, _CURSOR_OPT_HOLD = 0x0001, 0x0002, 0x0004, 0x0020


def _stream_call(select: ast.SelectStmt) -> tuple[ast.FuncCall, str, bool] | None:
    """The transform_stream call when it is the whole statement (else it is evaluated like any SRF).

    Also whether it is in FROM: a function scan, which PostgreSQL can scan backward (a cursor over it
    is scrollable unless declared NO SCROLL), where the call in the SELECT list is not.
    """
    if select.whereClause or select.groupClause or select.sortClause or select.limitCount or select.withClause:
        return None
    targets, sources = select.targetList or (), select.fromClause or ()
    if len(targets) != 1:
        return None
    target = targets[0]
    if not sources and isinstance(target.val, ast.FuncCall) and _is_stream(target.val):
        return target.val, target.name or FUNCTION, False
    if len(sources) == 1 and isinstance(sources[0], ast.RangeFunction) and _star(target):
        rf = sources[0]
        functions = rf.functions or ()
        if len(functions) == 1 and not rf.ordinality and _is_stream(functions[0][0]):
            alias = str(rf.alias.aliasname) if rf.alias is not None else FUNCTION
            names = rf.alias.colnames if rf.alias is not None and rf.alias.colnames else None
            return functions[0][0], str(names[0].sval) if names else alias, True
    return None


def _is_stream(node: Any) -> bool:
    names = [n.sval for n in getattr(node, "funcname", None) or () if isinstance(n, ast.String)]
    return names == ["pgml", FUNCTION]


def _star(target: ast.ResTarget) -> bool:
    return isinstance(target.val, ast.ColumnRef) and isinstance((target.val.fields or (None,))[-1], ast.A_Star)


# --------------------------------------------------------------------------- #
# Starting a stream and answering for it
# --------------------------------------------------------------------------- #


def start(call_node: ast.FuncCall, engine: Engine) -> Stream:
    """Evaluate the call's constant arguments and start generating."""
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
    stream = Stream(engine.stream(Call(signature, [values], session=key)), key=key)
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

    async def answer(self, own: Own, tx_status: str, write: Any) -> rewrite.Decision:
        """Answer ``own`` (a simple Query), writing frames with ``write``; returns the decision left to apply."""
        ready = ReadyForQuery(tx_status).encode()
        try:
            match own:
                case StreamSelect(call=call, column=column):
                    return await self._select(call, column, ready, write)
                case Declare():
                    return rewrite.Respond(self.declare(own, tx_status) + ready)
                case Fetch(name=name, move=move):
                    binary = name in self.open and self.open[name].binary  # a BINARY cursor, read by a simple FETCH
                    rows, tag = await self.fetch(own, binary)
                    described = b"" if move else row_description(self.open[name].column, binary)
                    return rewrite.Respond(described + rows + tag + ready)
                case Close(name=str(name)):
                    return rewrite.Respond(self.close(name) + ready)
                case Close():
                    self.stop_all()  # CLOSE ALL: the server closes its own
                case Refuse(error=error):
                    return rewrite.Fail(error)
        except (ProxyError, EngineError) as exc:
            return rewrite.Fail(exc)
        return rewrite.FORWARD

    def declare(self, own: Declare, tx_status: str) -> bytes:
        """Start the cursor's generation; its CommandComplete."""
        if own.name in self.open:
            raise DuplicateCursor(f'cursor "{own.name}" already exists')
        if tx_status != "T" and not own.hold:
            raise NoActiveTransaction("DECLARE CURSOR can only be used in transaction blocks")
        stream = start(own.call, self._require_engine())
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
        return start(call, self._require_engine())

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

    async def _select(self, call: ast.FuncCall, column: str, ready: bytes, write: Any) -> rewrite.Decision:
        write(row_description(column))
        try:
            return rewrite.Respond(await self.select_rows(call, write) + ready)
        except (ProxyError, EngineError) as exc:  # rows already sent stay; the server raises the error
            return rewrite.Fail(exc)

    async def select_rows(self, call: ast.FuncCall, write: Any, binary: bool = False) -> bytes:
        """Generate, writing one DataRow per fragment as it arrives; the CommandComplete."""
        stream = self.reading = start(call, self._require_engine())
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
