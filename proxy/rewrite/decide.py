"""The rewrite seam: for every Query/Parse that mentions ``pgml``, and every Bind of a deferred one, one decision.

Owns: the cheap ``pgml`` pre-checks on frames (a frame the proxy cannot decode is the server's to answer), the
:class:`Decision` values a session acts on (forward as is / forward rewritten frames / answer the client / fail /
defer to Bind / rebind / own the Bind's portal), and the decision for one statement string: an aborted transaction
forwards it; bare pgml names on the session's search_path are qualified (:mod:`proxy.rewrite.unqualified`); SQL
EXECUTE of a pgml statement is replaced by that statement (:mod:`proxy.rewrite.sql_prepare`); CREATE / ALTER / DROP
EXTENSION pgml is carried out (:mod:`proxy.rewrite.extension`); schema pgml is checked first
(:mod:`proxy.rewrite.schema_check`; a statement whose own query finds it gone starts over once, outside the client's
transactions); calls with constant arguments are rewritten to literals (the result kept per database, text and bare
names when the functions are IMMUTABLE), a Parse whose calls read ``$n`` is deferred to its Binds
(:mod:`proxy.rewrite.deferred`), a Query's per-row calls are evaluated (:mod:`proxy.rewrite.evaluate`); nesting too
deep for Python is refused with 54001. Also the statement that makes the server raise a proxy error (so both sides
agree on the transaction).

Must not: write to sockets or call the session. :class:`Rewriter` decides by generators that yield
:mod:`proxy.rewrite.steps` requests (:meth:`Rewriter.deciding`, :meth:`Rewriter.binding`, testable
from recorded answers); :meth:`Rewriter.decide` and :meth:`Rewriter.decide_bind` drive them against
the session's :class:`proxy.session.exchange.Port` and the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import weakref
from dataclasses import dataclass

import pglast
from pglast import ast, enums

from engine.api import Engine, EngineError
from proxy.callback import Setup
from proxy.errors import (
    ProtocolViolation,
    ProxyError,
    StatementTooComplex,
    error_fields,
)
from proxy.rewrite import analyze, constant, evaluate, extension, pgml_settings, sql_prepare, streaming, unqualified
from proxy.rewrite.analyze import THREAD_PARSE_CHARS, Analysis, Bare
from proxy.rewrite.deferred import Deferred, Kept
from proxy.rewrite.memo import Memo
from proxy.rewrite.schema_check import SchemaCheck, SessionState
from proxy.rewrite.settings import require_rewritable
from proxy.rewrite.steps import LOOK, SETTLE, Steps, drive, off_loop
from proxy.rewrite.tree import deparse, deparse_all
from proxy.session.exchange import Port, UpstreamError
from proxy.wire import messages
from proxy.wire.frames import Frame, Frontend
from proxy.wire.messages import Bind, Parse, Query

log = logging.getLogger(__name__)
_QUERY, _PARSE = int(Frontend.QUERY), int(Frontend.PARSE)


def might_use_pgml(raw: bytes) -> bool:
    """True when the frame's text mentions ``pgml`` anywhere (case-insensitive).

    False for one whole Query or Parse frame that does not decode (text that is not
    UTF-8, a missing terminator): it is not the proxy's to rewrite, and the server
    answers it with its own error (22021, 08P01) and keeps the session.
    """
    return analyze.mentions_pgml(raw) and not undecodable(raw)


def undecodable(raw: bytes) -> bool:
    """One complete Query/Parse frame that :mod:`proxy.wire.messages` cannot decode (a chunk of several: False)."""
    if len(raw) < 5 or raw[0] not in (_QUERY, _PARSE) or int.from_bytes(raw[1:5], "big") + 1 != len(raw):
        return False
    frame = Frame(raw[0], raw)
    try:
        Query.decode(frame) if raw[0] == _QUERY else Parse.decode(frame)
    except ProtocolViolation:
        return True
    return False


def might_execute(raw: bytes) -> bool:
    """True when the text may hold an EXECUTE (of a SQL-prepared statement: :meth:`Rewriter.sql_prepared`).

    False for one Query/Parse frame that does not decode (the server answers it itself).
    """
    return sql_prepare.might_execute(raw) and not undecodable(raw)


_DEALLOCATE = re.compile(rb"(?i)dealloc|discard")
ALL = None


def might_deallocate(raw: bytes) -> bool:
    """True when the text may hold DEALLOCATE or DISCARD (SQL that drops prepared statements).

    False for one Query/Parse frame that does not decode: the server rejects it, so it drops nothing.
    """
    return _DEALLOCATE.search(raw) is not None and not undecodable(raw)


def deallocated(sql: str) -> set[str] | None:
    """Prepared statements the SQL drops: their names, or ``ALL`` (None) for DEALLOCATE ALL / DISCARD ALL."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return set()
    names: set[str] = set()
    for raw in statements:
        match raw.stmt:
            case ast.DeallocateStmt(isall=True) | ast.DiscardStmt(target=enums.DiscardMode.DISCARD_ALL):
                return ALL
            case ast.DeallocateStmt(name=str(name)):
                names.add(name)
    return names


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the original frame upstream unchanged."""


@dataclass(frozen=True, slots=True)
class Rewritten:
    """Send these frames upstream in place of the original.

    ``own``: 0-based positions of statements in the Query's string that are the proxy's own (``DO``
    blocks in place of extension commands): their errors and notices reach the client without the
    block's CONTEXT.
    """

    frames: bytes
    own: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client directly with these frames; nothing goes upstream."""

    frames: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The statement fails with this error (the upstream transaction must fail too)."""

    error: ProxyError | EngineError


@dataclass(frozen=True, slots=True)
class DeferToBind:
    """Forward the Parse as is (stubs describe it); rewrite at each Bind, when ``$n`` values are known."""

    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rebound:
    """In place of a Bind: Parse a private rewritten statement, Bind the portal to it, Close it."""

    parse: bytes
    bind: bytes
    close: bytes
    name: str


@dataclass(frozen=True, slots=True)
class OwnPortal:
    """In place of a Bind: the client's ``portal`` is the proxy's, reading ``rows`` (answer BindComplete)."""

    portal: str
    rows: streaming.Streamed


Decision = Forward | Rewritten | Respond | Fail | DeferToBind | Rebound | OwnPortal
FORWARD = Forward()


class Rewriter:
    """Decides what happens to a statement that mentions ``pgml``; one per server, shared by sessions."""

    def __init__(
        self,
        engine: Engine | None = None,
        cache_bytes: int = 64 * 1024 * 1024,
        stream: bool = True,
        callback: Setup | None = None,
    ) -> None:
        self.engine = engine
        self.callback = callback  # set up by CREATE / ALTER EXTENSION pgml (proxy.rewrite.extension)
        self.stream = stream  # per-row output calls computed on their statement's result stream (Query and Bind)
        self.schema = SchemaCheck()
        self._sessions: weakref.WeakKeyDictionary[Port, SessionState] = weakref.WeakKeyDictionary()
        # Statements whose calls all have constant arguments rewrite to the same SQL every time
        # (the functions are IMMUTABLE): apps repeat statements, and parse + evaluate + deparse is
        # milliseconds. Keyed by database and exact text, bounded by bytes, least recently used first out.
        self._rewritten: Memo[tuple[str, str, Bare], str] = Memo(
            size_limit=cache_bytes, size=lambda key, sql: len(sql) + len(key[1])
        )
        self.deferred = Deferred(self.schema)

    def sql_prepared(self, port: Port) -> bool:
        """Whether this session PREPAREd a statement calling ``pgml.*``: its EXECUTEs must come here.

        The session asks this for Query/Parse frames that do not mention ``pgml`` but may hold an
        EXECUTE (:func:`proxy.rewrite.sql_prepare.might_execute`).
        """
        state = self._sessions.get(port)
        return state is not None and state.prepares

    def state(self, port: Port) -> SessionState:
        """What this rewriter remembers about the session of ``port``."""
        state = self._sessions.get(port)
        if state is None:
            state = self._sessions[port] = SessionState()
        return state

    async def decide(self, message: Query | Parse, port: Port) -> Decision:
        """:meth:`deciding`, run on ``port`` and the engine."""
        return await drive(pgml_settings.reading(self.deciding(message, self.state(port))), port, self.engine)

    async def decide_bind(self, bind: Bind, sql: str, types: tuple[int, ...], port: Port, private_id: int) -> Decision:
        """:meth:`binding`, run on ``port`` and the engine."""
        steps = self.binding(bind, sql, types, private_id, self.state(port))
        return await drive(pgml_settings.reading(steps), port, self.engine)

    def deciding(self, message: Query | Parse, state: SessionState) -> Steps[Decision]:
        """The decision for a Query or Parse of the session whose memory is ``state``."""
        try:
            try:
                return (yield from self._decision(message, state))
            except UpstreamError as exc:
                facts = yield LOOK
                if not self.schema.forget_if_missing(exc, facts.database) or exc.delivered or facts.in_transaction:
                    raise
                # Our own query found schema pgml gone (dropped by another client since it was checked), in
                # no transaction of the client's and with nothing sent to it yet: once more, checking it first.
                return (yield from self._decision(message, state))
        except RecursionError:  # a parse tree nested deeper than Python walks: the server's stack limit, here
            raise StatementTooComplex.nesting() from None
        except UpstreamError as exc:
            facts = yield LOOK
            self.schema.forget_if_missing(exc, facts.database)
            raise

    def binding(
        self, bind: Bind, sql: str, types: tuple[int, ...], private_id: int, state: SessionState
    ) -> Steps[Decision]:
        """The decision for a Bind of the deferred statement ``sql``: a private statement with its values, or a
        portal of the proxy's own when its per-row calls stream."""
        assert self.engine is not None
        facts = yield LOOK
        opener = (
            streaming.Opener(f"pgml_proxy_rows_{facts.session_id}_{private_id}", bind.result_formats)
            if self.stream
            else None
        )
        try:
            rewritten = yield from self.deferred.rewrite(bind, sql, types, state, opener)
        except RecursionError:
            raise StatementTooComplex.nesting() from None
        except UpstreamError as exc:
            facts = yield LOOK
            self.schema.forget_if_missing(exc, facts.database)
            raise
        if rewritten is None:
            return FORWARD
        if isinstance(rewritten, streaming.Streamed):
            return OwnPortal(bind.portal, rewritten)
        new_sql, oids = rewritten
        private = f"pgml_proxy_stmt_{facts.session_id}_{private_id}"
        if log.isEnabledFor(logging.DEBUG):  # its SQL holds the bound values: never logged
            log.debug("rewrite of a Bind of %r as %r (%d parameters)", bind.statement, private, len(bind.params))
        return Rebound(
            parse=Parse(private, new_sql, oids).encode(),
            bind=dataclasses.replace(bind, statement=private).encode(),
            close=messages.Close(messages.Target.STATEMENT, private).encode(),
            name=private,
        )

    def _decision(self, message: Query | Parse, state: SessionState) -> Steps[Decision]:
        if self.engine is None:
            return FORWARD
        facts = yield LOOK
        if facts.tx_status == "E":
            facts = yield SETTLE  # a ROLLBACK may still be on its way
            if facts.tx_status == "E":
                return FORWARD  # an aborted transaction rejects the statement itself (25P02)
        names = yield from unqualified.names(message.sql, state.unqualified)  # bare pgml calls on its search_path
        mentions = might_use_pgml(message.sql.encode()) or unqualified.any_name(names)
        if not mentions and not state.prepares:
            return FORWARD  # no pgml here, and no statement of this session's that an EXECUTE could run
        if mentions:
            require_rewritable(facts)
        if not facts.in_transaction:
            state.changed_schema = False  # the transaction that changed it has ended
        key = (facts.database, message.sql, names)
        sql = self._rewritten.get(key)
        if sql is not None:
            yield from self.schema.ensure(state)
            return _rewritten_message(message, sql)
        if isinstance(message, Parse) and (kept := self.deferred.kept(message.sql, names)) is not None:
            # The same text was deferred before: its analysis is kept.
            if kept.use.references:
                yield from self.schema.ensure(state)
            return DeferToBind((yield from self.deferred.param_types(message, kept)))
        stmts = yield from unqualified.parser(names)(message.sql)
        if stmts is None:
            return FORWARD
        return (yield from self._statements(message, stmts, state, names))

    def _statements(
        self, message: Query | Parse, stmts: tuple[ast.RawStmt, ...], state: SessionState, names: Bare
    ) -> Steps[Decision]:
        """The decision for parsed statements: EXECUTEs expanded, extension commands, then their calls."""
        changed = False
        own: tuple[int, ...] = ()
        state.prepares = state.prepares or sql_prepare.prepares_pgml(stmts)
        if state.prepares and sql_prepare.executes(stmts):
            expanded = yield from sql_prepare.expand(stmts, unqualified.resolving(state.unqualified))
            if expanded is not None:
                require_rewritable((yield LOOK))
                if isinstance(message, Parse):  # substituted again at each Bind: what the name means then
                    return DeferToBind(message.param_types)
                stmts, changed = expanded, True
        long = len(message.sql) > THREAD_PARSE_CHARS  # its tree is walked off the event loop too
        use = yield from off_loop(long, functools.partial(analyze.schema_use, stmts))
        if use.drops or use.commands:
            facts = yield LOOK
            self.schema.ready.discard(facts.database)
            if facts.in_transaction:
                state.changed_schema = True
        if use.commands:
            alone = extension.extension_command(stmts[0].stmt) if len(stmts) == 1 else None
            if isinstance(message, Query) and alone is not None and alone.alone:
                frames = yield from extension.carry_out(alone, self.callback)
                facts = yield LOOK
                return Respond(frames + messages.ReadyForQuery(facts.tx_status).encode())
            stmts, own = extension.in_place(stmts, self.callback)
            changed = True
        if use.references and not use.installs:  # CREATE EXTENSION in the string: the client installs it
            yield from self.schema.ensure(state)
        analysis = yield from off_loop(long, functools.partial(analyze.of, stmts, names))
        if changed:
            sql = deparse_all(stmts)
            if not analysis.calls:
                return _rewritten_message(message, sql, own)
        elif not analysis.calls:
            return FORWARD
        return (yield from self._calls(message, analysis, changed, own, use))

    def _calls(
        self, message: Query | Parse, analysis: Analysis, changed: bool, own: tuple[int, ...], use: analyze.SchemaUse
    ) -> Steps[Decision]:
        """The decision for statements that call pgml: deferred to Bind, rewritten, or run here."""
        if not constant.all_constant(analysis.sites):
            if isinstance(message, Parse):
                kept = Kept.of(analysis, use)
                types = yield from self.deferred.param_types(message, kept)
                if not changed and Kept.keepable(analysis.stmts, use):
                    self.deferred.keep(message.sql, kept)
                return DeferToBind(types)
            runner = streaming.run if self.stream else None
            rewritten = yield from evaluate.rewrite(analysis, dependent_ok=True, stream=runner)
            if rewritten is None:  # run on the session already: only ReadyForQuery is left to send
                return (yield from _ready())
            _log_rewrite(message, rewritten)
            return Rewritten(Query(rewritten).encode(), own)
        rewritten = yield from evaluate.rewrite(analysis, dependent_ok=False)
        if rewritten is None:  # a call reading the database after the string's first statement: all ran here
            return (yield from _ready())
        # Not a string with an EXECUTE: what it means depends on the session's prepared statements.
        if (
            not changed
            and analysis.cacheable()
            and not sql_prepare.executes(analysis.stmts)
        ):
            facts = yield LOOK
            self._rewritten.put((facts.database, message.sql, analysis.bare), rewritten)
        return _rewritten_message(message, rewritten, own)

    def cancel(self, session: int) -> None:
        if self.engine is not None:
            self.engine.cancel(session)


def _log_rewrite(message: Query | Parse, sql: str) -> None:
    """SQL in and out, at debug only (SQL may quote data: never at info)."""
    if log.isEnabledFor(logging.DEBUG):
        kind = f"Parse {message.name!r}" if isinstance(message, Parse) else "Query"
        log.debug("rewrite of a %s: %s\n  -> %s", kind, message.sql, sql)


def _ready() -> Steps[Decision]:
    """Only ReadyForQuery left to send: the statements ran on the session, their answers went to the client."""
    facts = yield LOOK
    return Respond(messages.ReadyForQuery(facts.tx_status).encode())


def _rewritten_message(message: Query | Parse, sql: str, own: tuple[int, ...] = ()) -> Rewritten:
    _log_rewrite(message, sql)
    if isinstance(message, Parse):
        return Rewritten(Parse(message.name, sql, message.param_types).encode())
    return Rewritten(Query(sql).encode(), own)


def raise_statement(error: BaseException, original: str | None = None) -> str:
    """``DO`` block that makes the server raise ``error`` with its SQLSTATE and texts.

    With the ``original`` query string, the statements before the first one that
    calls ``pgml.*`` are kept in front (a ``BEGIN`` must still begin the transaction).

    The texts travel hex-encoded (``convert_from('\\x…'::bytea, 'UTF8')``), so no
    quoting of client-influenced text is ever involved; pglast quotes the body.
    """
    fields = dict(error_fields(error))
    text = extension.text_expression
    code = fields["C"] if re.fullmatch(r"[0-9A-Z]{5}", fields["C"]) else "XX000"
    options = [f"ERRCODE = '{code}'", f"MESSAGE = {text(fields['M'])}"]
    if "D" in fields:
        options.append(f"DETAIL = {text(fields['D'])}")
    if "H" in fields:
        options.append(f"HINT = {text(fields['H'])}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(options)}; END"
    raising = deparse(ast.DoStmt(args=(ast.DefElem(defname="as", arg=ast.String(sval=body)),)))
    return "; ".join([*analyze.before_first_rewritten(original), raising]) if original else raising
