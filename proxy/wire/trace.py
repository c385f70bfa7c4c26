"""Protocol messages described for the log: what a developer needs to follow a client, and no data.

Owns: one line per typed message — its direction, name, length, and the names and counts it carries
(statement and portal names of Parse / Bind / Describe / Execute / Close, Bind's parameter count and
formats, Execute's row limit, the column count of RowDescription and DataRow, CommandComplete's tag,
ErrorResponse's severity and SQLSTATE, ParameterStatus's name, ReadyForQuery's status, the parameter
*names* of a StartupMessage) — and :class:`Tracer`, which cuts a byte stream into frames for it, so a
message split across reads is described once, when complete.

Must not: write parameter values, SQL text, row data, message texts or password messages (any of them
may quote data), or raise: a frame it cannot decode is described as such and the trace goes on. It does
no I/O; the caller logs the lines (:mod:`proxy.link` does, at debug, when tracing is on).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from proxy.errors import ProtocolViolation
from proxy.wire.frames import Backend, Frame, FrameReader, Frontend, StartupMessage
from proxy.wire.messages import (
    Bind,
    Close,
    CommandComplete,
    Describe,
    ErrorResponse,
    Execute,
    NoticeResponse,
    ParameterStatus,
    Parse,
    ReadyForQuery,
    RowDescription,
)

# The session bounds what it accepts; the tracer only sees what passed (the server's own limit: 1 GiB).
_TRACE_MAX = (1 << 30) + 5
# The logger the session writes these lines to (at debug; ``log.trace_protocol`` turns it on alone).
LOGGER = "pgml-proxy.protocol"
_COUNT = struct.Struct("!h")


def _names(kind: type[Frontend] | type[Backend]) -> dict[int, str]:
    """Type byte -> message name as the PostgreSQL docs spell it (``PARSE_COMPLETE`` -> ``ParseComplete``)."""
    special = {"PASSWORD": "PasswordMessage"}
    return {int(m): special.get(m.name, "".join(p.title() for p in m.name.split("_"))) for m in kind}


FRONTEND_NAMES = _names(Frontend)
BACKEND_NAMES = _names(Backend)


def _frontend_details(frame: Frame) -> str:
    kind = frame.type
    if kind == Frontend.QUERY:
        return ""  # the SQL is logged by the rewriter at debug, never here
    if kind == Frontend.PARSE:
        parse = Parse.decode(frame)
        return f" statement={parse.name!r} param_types={len(parse.param_types)}"
    if kind == Frontend.BIND:
        bind = Bind.decode(frame)
        formats = "".join("b" if f else "t" for f in bind.formats) or "t"
        return (
            f" portal={bind.portal!r} statement={bind.statement!r} params={len(bind.params)} formats={formats}"
            f" result_formats={len(bind.result_formats)}"
        )
    if kind in (Frontend.DESCRIBE, Frontend.CLOSE):
        target = (Describe if kind == Frontend.DESCRIBE else Close).decode(frame)
        return f" {target.target.name.lower()}={target.name!r}"
    if kind == Frontend.EXECUTE:
        execute = Execute.decode(frame)
        return f" portal={execute.portal!r} max_rows={execute.max_rows}"
    return ""


def _backend_details(frame: Frame) -> str:
    kind = frame.type
    if kind in (Backend.ERROR_RESPONSE, Backend.NOTICE_RESPONSE):
        fields = (ErrorResponse if kind == Backend.ERROR_RESPONSE else NoticeResponse).decode(frame)
        return f" severity={fields.get('V') or fields.get('S')} sqlstate={fields.get('C')}"
    if kind == Backend.READY_FOR_QUERY:
        return f" status={ReadyForQuery.decode(frame).status}"
    if kind == Backend.COMMAND_COMPLETE:
        return f" tag={CommandComplete.decode(frame).tag.split(' ', 1)[0]}"
    if kind == Backend.ROW_DESCRIPTION:
        return f" columns={len(RowDescription.decode(frame).columns)}"
    if kind == Backend.DATA_ROW:
        return f" columns={_COUNT.unpack_from(frame.raw, 5)[0]}" if len(frame.raw) >= 7 else ""
    if kind == Backend.PARAMETER_STATUS:
        return f" name={ParameterStatus.decode(frame).name}"
    return ""


def describe(frame: Frame, *, frontend: bool) -> str:
    """``Name len=N key=value…`` for one typed frame (``frontend``: sent by a client)."""
    names = FRONTEND_NAMES if frontend else BACKEND_NAMES
    name = names.get(frame.type, f"unknown type {frame.type!r}")
    try:
        details = _frontend_details(frame) if frontend else _backend_details(frame)
    except ProtocolViolation:
        details = " (malformed)"
    return f"{name} len={len(frame.raw) - 1}{details}"


def describe_startup(startup: StartupMessage) -> str:
    """The StartupMessage: protocol version and parameter names (their values may be secrets or data)."""
    return f"StartupMessage version={startup.major}.{startup.minor} params={','.join(k for k, _ in startup.params)}"


class Tracer:
    """Describes the typed frames of one direction of one connection, as bytes pass (partial frames wait)."""

    def __init__(self, emit: Callable[[str], None], prefix: str, *, frontend: bool) -> None:
        self._emit = emit
        self._prefix = prefix
        self._frontend = frontend
        self._reader: FrameReader | None = FrameReader(_TRACE_MAX)

    def feed(self, data: bytes) -> None:
        if self._reader is None:
            return
        try:
            frames = self._reader.feed(data)
        except ProtocolViolation:  # the session closes the connection for this; the trace says so and stops
            self._emit(f"{self._prefix} malformed frame: tracing stops")
            self._reader = None
            return
        for frame in frames:
            self._emit(f"{self._prefix} {describe(frame, frontend=self._frontend)}")
