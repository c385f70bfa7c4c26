"""The rewrite seam: for every Query/Parse that mentions ``pgml``, one decision.

Owns: the cheap ``pgml`` pre-check, the :class:`Decision` values a session acts on
(forward as is / forward rewritten frames / answer the client / fail), the
decision itself (schema check, then :mod:`proxy.plan`), and the statement that
makes the server raise a proxy error (so both sides agree on the transaction).

Must not: write to sockets. The session executes decisions; this module only
decides, talking to the upstream through :class:`proxy.internal.Port`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pglast import ast

from engine.api import Engine, EngineError
from proxy import plan, protocol, schema
from proxy.errors import FeatureNotSupported, ProxyError, error_fields
from proxy.internal import Port
from proxy.protocol import Parse, Query

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive)."""
    return _PGML.search(raw) is not None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the original frame upstream unchanged."""


@dataclass(frozen=True, slots=True)
class Rewritten:
    """Send these frames upstream in place of the original."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client directly with these frames; nothing goes upstream."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The statement fails with this error (the upstream transaction must fail too)."""

    error: ProxyError | EngineError


Decision = Forward | Rewritten | Respond | Fail
FORWARD = Forward()


class Rewriter:
    """Decides what happens to a statement that mentions ``pgml``; one per server, shared by sessions."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self._schema_ready: set[str] = set()

    async def decide(self, message: Query | Parse, port: Port) -> Decision:
        if self.engine is None or port.tx_status == "E":
            return FORWARD  # an aborted transaction rejects the statement itself (25P02)
        analysis = plan.analyze(message.sql)
        if analysis is None:
            return FORWARD
        if not port.standard_strings:
            raise FeatureNotSupported(
                "pgml-proxy rewrites statements only with standard_conforming_strings = on",
                hint="SET standard_conforming_strings = on (the default since PostgreSQL 9.1).",
            )
        await self._ensure_schema(port)
        sql = await plan.rewrite(analysis, self.engine, port, dependent_ok=not isinstance(message, Parse))
        if isinstance(message, Parse):
            return Rewritten(protocol.encode_parse(Parse(message.name, sql, message.param_types)))
        return Rewritten(protocol.encode_query(Query(sql)))

    async def _ensure_schema(self, port: Port) -> None:
        key = f"{port.database}"
        if key not in self._schema_ready:
            await schema.ensure(port)
            self._schema_ready.add(key)

    def cancel(self, session: int) -> None:
        if self.engine is not None:
            self.engine.cancel(session)


def raise_statement(error: BaseException) -> str:
    """``DO`` block that makes the server raise ``error`` with its SQLSTATE and texts.

    The texts travel hex-encoded (``convert_from('\\x…'::bytea, 'UTF8')``), so no
    quoting of client-influenced text is ever involved; pglast quotes the body.
    """
    fields = dict(error_fields(error))

    def text(value: str) -> str:
        return f"convert_from('\\x{value.encode().hex()}'::bytea, 'UTF8')"

    code = fields["C"] if re.fullmatch(r"[0-9A-Z]{5}", fields["C"]) else "XX000"
    options = [f"ERRCODE = '{code}'", f"MESSAGE = {text(fields['M'])}"]
    if "D" in fields:
        options.append(f"DETAIL = {text(fields['D'])}")
    if "H" in fields:
        options.append(f"HINT = {text(fields['H'])}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(options)}; END"
    return plan.deparse(ast.DoStmt(args=(ast.DefElem(defname="as", arg=ast.String(sval=body)),)))
