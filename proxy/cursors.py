"""Streams the proxy owns: ``pgml.transform_stream`` as a plain SELECT and behind ``DECLARE … CURSOR``.

Owns: recognising the statements that start, read and end such a stream
(``SELECT pgml.transform_stream(…)``, ``DECLARE c CURSOR FOR SELECT
pgml.transform_stream(…)``, ``FETCH``/``MOVE``, ``CLOSE``, transaction end), the
per-session table of proxy-owned cursors with the fragments generated so far, and
the response frames the client gets for them (RowDescription, DataRow,
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
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast, enums

from engine.api import Call, Engine, EngineError
from proxy import protocol as pq
from proxy import rewrite
from proxy.calls import bind, find_calls
from proxy.errors import (
    DuplicateCursor,
    FeatureNotSupported,
    InvalidCursorName,
    NoActiveTransaction,
    NotInPrerequisiteState,
    ProxyError,
)
from proxy.plan import fold_call

FUNCTION = "transform_stream"
_stream_keys = itertools.count(1)
_STREAM = re.compile(FUNCTION, re.IGNORECASE)
JSONB_OID = 3802
FETCH_ALL = 9223372036854775807


@dataclass
class Stream:
    """One running generation: fragments arrive in ``ready``; ``done`` once it ended (or failed)."""

    source: AsyncIterator[list[str]]
    ready: list[list[str]] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    hold: bool = False  # WITH HOLD: survives COMMIT
    key: int = 0  # the engine's cancel key of this generation (not the session's: idle cursors survive a cancel)
    column: str = FUNCTION  # the output column's name (an alias in the cursor's query)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for fragment in self.source:
                self.ready.append(fragment)
                self._arrived.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported to whoever reads next
            self.error = exc
        finally:
            self.done = True
            self._arrived.set()

    async def take(self, count: int) -> list[list[str]]:
        """Up to ``count`` fragments: as soon as that many exist, or all that remain once generation ended."""
        while len(self.ready) < count and not self.done:
            self._arrived.clear()
            await self._arrived.wait()
        if self.error is not None and len(self.ready) < count:
            raise self.error  # PostgreSQL fails the whole FETCH
        taken, self.ready = self.ready[:count], self.ready[count:]
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


@dataclass(frozen=True)
class Fetch:
    name: str
    count: int
    move: bool
    forward: bool = True  # False: BACKWARD, ABSOLUTE, a count <= 0 … (a proxy cursor only scans forward)


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


def classify(sql: str, cursors: dict[str, Stream]) -> Own | None:
    """What the proxy does itself with this statement (None: not a stream statement)."""
    if not cursors and _STREAM.search(sql) is None:  # the usual case: no parse (pgml statements are parsed once)
        return None
    match parse_one(sql):
        case ast.SelectStmt() as select if (found := _stream_call(select)) is not None:
            return StreamSelect(*found)
        case ast.DeclareCursorStmt(portalname=str(name), query=ast.SelectStmt() as select, options=options) if (
            found := _stream_call(select)
        ) is not None:
            return Declare(name, found[0], found[1], bool((options or 0) & _CURSOR_OPT_HOLD))
        case ast.DeclareCursorStmt(portalname=str(name)) if name in cursors:
            return Refuse(DuplicateCursor(f'cursor "{name}" already exists'))
        case ast.FetchStmt(portalname=str(name), howMany=count, ismove=move, direction=direction) if name in cursors:
            forward = direction == enums.FetchDirection.FETCH_FORWARD and int(count or 0) > 0
            return Fetch(name, int(count or 0), bool(move), forward)
        case ast.ClosePortalStmt(portalname=name) if name is None or name in cursors:
            return Close(name)
    return None


_CURSOR_OPT_HOLD = 0x0020


def _stream_call(select: ast.SelectStmt) -> tuple[ast.FuncCall, str] | None:
    """The transform_stream call when it is the whole statement (else it is evaluated like any SRF)."""
    if select.whereClause or select.groupClause or select.sortClause or select.limitCount or select.withClause:
        return None
    targets, sources = select.targetList or (), select.fromClause or ()
    if len(targets) != 1:
        return None
    target = targets[0]
    if not sources and isinstance(target.val, ast.FuncCall) and _is_stream(target.val):
        return target.val, target.name or FUNCTION
    if len(sources) == 1 and isinstance(sources[0], ast.RangeFunction) and _star(target):
        rf = sources[0]
        functions = rf.functions or ()
        if len(functions) == 1 and not rf.ordinality and _is_stream(functions[0][0]):
            alias = str(rf.alias.aliasname) if rf.alias is not None else FUNCTION
            names = rf.alias.colnames if rf.alias is not None and rf.alias.colnames else None
            return functions[0][0], str(names[0].sval) if names else alias
    return None


def _is_stream(node: Any) -> bool:
    names = [n.sval for n in getattr(node, "funcname", None) or () if isinstance(n, ast.String)]
    return names == ["pgml", FUNCTION]


def _star(target: ast.ResTarget) -> bool:
    return isinstance(target.val, ast.ColumnRef) and isinstance((target.val.fields or (None,))[-1], ast.A_Star)


# --------------------------------------------------------------------------- #
# Starting a stream and answering for it
# --------------------------------------------------------------------------- #


def start(call_node: ast.FuncCall, engine: Engine, session: int, hold: bool = False, column: str = FUNCTION) -> Stream:
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
    stream = Stream(engine.stream(Call(signature, [values], session=key)), hold=hold, column=column, key=key)
    stream.start()
    return stream


def row_description(column: str, binary: bool = False) -> bytes:
    fields = struct.pack("!ihIhih", 0, 0, JSONB_OID, -1, -1, int(binary))
    return pq.encode(b"T", struct.pack("!h", 1) + column.encode() + b"\0" + fields)


def data_row(fragment: list[str], binary: bool = False) -> bytes:
    """One fragment as a jsonb value (binary format: version byte 1, then the text)."""
    value = (b"\x01" if binary else b"") + json.dumps(fragment, ensure_ascii=False).encode()
    return pq.encode(b"D", struct.pack("!hi", 1, len(value)) + value)


def command_complete(tag: str) -> bytes:
    return pq.encode(b"C", tag.encode() + b"\0")


def failure(error: BaseException) -> ProxyError | EngineError:
    if isinstance(error, ProxyError | EngineError):
        return error
    return EngineError(f"{type(error).__name__}: {error}")


# --------------------------------------------------------------------------- #
# The session's proxy-owned cursors
# --------------------------------------------------------------------------- #


class Cursors:
    """The proxy-owned cursors of one session, and the answers to the statements that use them."""

    def __init__(self, engine: Engine | None, session: int) -> None:
        self.open: dict[str, Stream] = {}
        self.reading: Stream | None = None  # the stream a FETCH or SELECT is waiting on (what a cancel stops)
        self._engine, self._session = engine, session

    def cancel_reading(self) -> None:
        """CancelRequest: stop the generation a statement is waiting on (other cursors stay)."""
        if self.reading is not None and self._engine is not None:
            self._engine.cancel(self.reading.key)

    def stop_all(self, keep_holdable: bool = False) -> None:
        for name, stream in list(self.open.items()):
            if not (keep_holdable and stream.hold):
                stream.stop()
                del self.open[name]

    async def answer(self, own: Own, tx_status: str, write: Any) -> rewrite.Decision:
        """Answer ``own`` (a simple Query), writing frames with ``write``; returns the decision left to apply."""
        ready = pq.encode_ready(pq.ReadyForQuery(tx_status))
        try:
            match own:
                case StreamSelect(call=call, column=column):
                    return await self._select(call, column, ready, write)
                case Declare():
                    return rewrite.Respond(self.declare(own, tx_status) + ready)
                case Fetch(name=name, move=move):
                    rows, tag = await self.fetch(own)
                    described = b"" if move else row_description(self.open[name].column)
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
        self.open[own.name] = start(own.call, self._require_engine(), self._session, own.hold, own.column)
        return command_complete("DECLARE CURSOR")

    async def fetch(self, own: Fetch, binary: bool = False) -> tuple[bytes, bytes]:
        """DataRows (none for MOVE) and the CommandComplete of FETCH/MOVE ``count``."""
        fragments = await self.fetch_fragments(own)
        if own.move:
            return b"", command_complete(f"MOVE {len(fragments)}")
        return b"".join(data_row(f, binary) for f in fragments), command_complete(f"FETCH {len(fragments)}")

    def open_stream(self, call: ast.FuncCall) -> Stream:
        """A generation for a prepared streaming SELECT (its portal owns it)."""
        return start(call, self._require_engine(), self._session)

    async def fetch_fragments(self, own: Fetch) -> list[list[str]]:
        """The fragments a FETCH/MOVE takes from its cursor."""
        if own.name not in self.open:
            raise InvalidCursorName(f'cursor "{own.name}" does not exist')
        if not own.forward:
            raise NotInPrerequisiteState(
                "cursor can only scan forward", hint="Declare it with SCROLL option to enable backward scan."
            )
        self.reading = self.open[own.name]
        try:
            return await self.open[own.name].take(own.count)
        except Exception as exc:
            raise failure(exc) from exc
        finally:
            self.reading = None

    def close(self, name: str) -> bytes:
        self.open.pop(name).stop()
        return command_complete("CLOSE CURSOR")

    async def _select(self, call: ast.FuncCall, column: str, ready: bytes, write: Any) -> rewrite.Decision:
        write(row_description(column))
        try:
            return rewrite.Respond(await self.select_rows(call, write) + ready)
        except (ProxyError, EngineError) as exc:  # rows already sent stay; the server raises the error
            return rewrite.Fail(exc)

    async def select_rows(self, call: ast.FuncCall, write: Any, binary: bool = False) -> bytes:
        """Generate, writing one DataRow per fragment as it arrives; the CommandComplete."""
        stream = self.reading = start(call, self._require_engine(), self._session)
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
