"""Recognising statements about proxy-owned streams: SELECT or DECLARE over ``pgml.transform_stream``, FETCH, CLOSE.

Owns: turning one simple-protocol statement into what the proxy does with it itself (:data:`Own`), given the
names of the session's proxy cursors — PostgreSQL's cursor options (SCROLL, NO SCROLL and the default of a
function scan, WITH HOLD, BINARY) and the errors it gives for a cursor name in use.

Must not: keep state, or run anything: the session's cursor table (:mod:`proxy.streams.cursors`) acts.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast, enums

from proxy.errors import DuplicateCursor, ProxyError

FUNCTION = "transform_stream"
_STREAM = re.compile(FUNCTION, re.IGNORECASE)


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


def classify(sql: str, cursors: Container[str]) -> Own | None:
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
