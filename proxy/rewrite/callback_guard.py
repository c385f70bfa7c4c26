"""What a pgml-proxy callback session may run: the pgml calls of the server-side stubs, and nothing else.

Owns: knowing a callback session by its startup packet (:func:`is_callback`: ``pgml_proxy.callback`` set, to
anything but a false value, by an ``options`` switch in any spelling the server accepts or by a parameter —
every connection through the foreign server ``pgml_callback`` carries ``-c pgml_proxy.callback=on``, which its
callers cannot remove, sql/008_callback.sql), and the decision that refuses, with 42501, each client message of
such a session that is not what a stub sends (:func:`refusal`). A stub sends one simple Query: one statement,
``SELECT pgml.f(…)`` or ``SELECT * FROM pgml.f(…)``, of one engine-evaluated function whose arguments are all
constants (literals, NULL, casts of constants to built-in or pgml types, ARRAY of constants, named arguments),
and not one of the registry owner's functions (``dump_all``, ``load_all``, ``clear_gpu_cache``), after its
caller's PostgresML settings (sql/010_callback_settings.sql): ``SET <name> TO '<value>'`` statements
(session-wide, one string constant each), each of a distinct name of :data:`SETTINGS` (compared lower-cased, as
the server compares setting names), and nothing else ahead of the call. The one other statement accepted is
libpq's own ``set client_encoding to '…'``, which dblink sends after connecting when the encodings differ.
Without this, any role could run any SQL as the callback role through ``dblink('pgml_callback', …)`` (PUBLIC
may use the server, and its user mapping FOR PUBLIC holds the role's password). Extended-protocol messages and
FunctionCall are refused: no stub sends them.

A refused Query or FunctionCall is answered by the server raising the error (the proxy's ``DO`` block, in
place of the whole string: nothing of it runs), so the transaction state stays the server's and its
ReadyForQuery follows; a refused extended message fails its batch as the server fails one (skip to Sync).

Must not: evaluate or rewrite the accepted statements (the rewriter does, as for any session), or look at
anything but the client's own messages (the proxy's statements in the session, a train's COPY among them,
are its own).
"""

from __future__ import annotations

import re
from typing import Any

import pglast
from pglast import ast, enums

from engine.api import evaluated_functions
from proxy.errors import InsufficientPrivilege, ProtocolViolation
from proxy.rewrite import decide
from proxy.rewrite.pgml_settings import THREADS, TRUST, TRUST_WHITELIST, WHITELIST
from proxy.session.startup import settings
from proxy.wire import messages as pq
from proxy.wire.frames import Frame, Frontend, StartupMessage

SETTING = "pgml_proxy.callback"  # set in the foreign server's libpq options (sql/008_callback.sql)
REFUSED = InsufficientPrivilege(
    "a pgml-proxy callback session runs only the pgml calls of the server-side pgml functions",
    detail="This session connected with pgml_proxy.callback set (the foreign server pgml_callback sets it): it may "
    "run only SELECT pgml.f(...) or SELECT * FROM pgml.f(...) of one pgml function with constant arguments, "
    "one statement per simple Query (after the caller's pgml settings: SET pgml.name TO '...').",
    hint="Call the pgml functions themselves (they call pgml-proxy back), or connect to pgml-proxy or the "
    "database without pgml_proxy.callback to run other statements.",
)
_FALSE = re.compile(r"(?i)\s*(f(a(l(se?)?)?)?|no?|off?|0)\s*")  # PostgreSQL's spellings of false
_Q, _F = int(Frontend.QUERY), int(Frontend.FUNCTION_CALL)
_EXTENDED = frozenset(b"PBDEC")
# Fields that say where a node was written, not what it is.
_POSITIONS = frozenset({"location", "stmt_location", "stmt_len", "list_start", "list_end", "typemod"})
_SERVER_RAISES = decide.Rewritten(pq.Query(decide.raise_statement(REFUSED)).encode(), own=(0,))


OWNER_ONLY = frozenset({"dump_all", "load_all", "clear_gpu_cache"})  # never through the callback server
TYPE_SCHEMAS = frozenset({"pg_catalog", "pgml"})  # casts the stubs write: built-in types and pgml's enums
BARE_TYPES = frozenset({"text", "jsonb", "json", "bytea"})  # built-in names the parser leaves unqualified
SETTINGS = frozenset({WHITELIST, TRUST, TRUST_WHITELIST, THREADS})  # what a stub's leading SETs may set


def is_callback(startup: StartupMessage) -> bool:
    """The session is a callback's: its startup packet sets pgml_proxy.callback, to anything but false."""
    value = settings(startup).get(SETTING)
    return value is not None and _FALSE.fullmatch(value) is None


def refusal(frame: Frame) -> decide.Decision | None:
    """The decision refusing a client message of a callback session (None: a stub's call, decided as usual)."""
    if frame.type in _EXTENDED:
        return decide.Fail(REFUSED)
    if frame.type == _F:
        return _SERVER_RAISES
    if frame.type != _Q:
        return None
    try:
        sql = pq.Query.decode(frame).sql
    except ProtocolViolation:
        return _SERVER_RAISES
    return None if accepted(sql) else _SERVER_RAISES


def accepted(sql: str) -> bool:
    """The query string is what a stub sends (its call, after its caller's settings), or libpq's client_encoding."""
    try:
        stmts = [raw.stmt for raw in pglast.parse_sql(sql)]
    except (pglast.parser.ParseError, RecursionError):
        return False
    *sets, last = stmts or [None]
    if not sets:
        return _stub_call(last) or _client_encoding(last)
    names = [_setting(stmt) for stmt in sets]
    return None not in names and len(set(names)) == len(names) and _stub_call(last)


def _setting(stmt: Any) -> str | None:
    """The setting (lower-cased) of ``SET <name> TO '<value>'`` when ``stmt`` is one of a name of :data:`SETTINGS`
    (not LOCAL, not DEFAULT, one string constant)."""
    match stmt:
        case ast.VariableSetStmt(
            kind=enums.VariableSetKind.VAR_SET_VALUE, name=str(name), args=(ast.A_Const(val=ast.String()),)
        ) if _only(stmt, {"kind", "name", "args"}) and name.lower() in SETTINGS:
            return name.lower()
    return None


def _stub_call(stmt: Any) -> bool:
    """``SELECT pgml.f(constants)`` or ``SELECT * FROM pgml.f(constants)``, nothing more."""
    match stmt:
        case ast.SelectStmt(targetList=(ast.ResTarget(val=ast.FuncCall() as call) as target,), fromClause=None):
            pass
        case ast.SelectStmt(
            targetList=(ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))) as target,),
            fromClause=(ast.RangeFunction(functions=((ast.FuncCall() as call, None),)) as item,),
        ) if _only(item, {"functions", "alias"}):
            pass
        case _:
            return False
    return _only(stmt, {"targetList", "fromClause"}) and _only(target, {"val", "name"}) and _pgml_call(call)


def _pgml_call(call: ast.FuncCall) -> bool:
    """A plain call of an engine-evaluated ``pgml.f`` (no aggregate, window or VARIADIC form) on constants, other
    than the registry owner's functions (``dump_all``, ``load_all``, ``clear_gpu_cache``), which no stub calls
    back for: through the callback server every role would act as the callback role."""
    name = tuple(part.sval for part in call.funcname or ())
    if len(name) != 2 or name[0] != "pgml" or name[1] not in evaluated_functions() or name[1] in OWNER_ONLY:
        return False
    args = call.args or ()
    return _only(call, {"funcname", "args"}) and all(
        _constant(arg.arg if isinstance(arg, ast.NamedArgExpr) else arg) for arg in args
    )


def _constant(node: Any) -> bool:
    """A literal, NULL, a cast of a constant or an ARRAY of constants."""
    match node:
        case ast.A_Const():
            return True
        case ast.TypeCast(arg=arg, typeName=ast.TypeName() as name):
            return _plain_type(name) and _constant(arg)
        case ast.A_ArrayExpr(elements=elements):
            return _only(node, {"elements"}) and all(_constant(e) for e in elements or ())
        case _:
            return False


def _plain_type(name: ast.TypeName) -> bool:
    """A built-in type (``pg_catalog``'s, or ``text``/``jsonb``/``json``/``bytea`` unqualified: pg_catalog is
    searched first) or one of schema pgml's, whose modifiers are constants (no SETOF, no %TYPE). Never a type a
    role can create elsewhere: a domain's CHECK, or a type's input function, would run as the callback role."""
    names = tuple(getattr(part, "sval", None) for part in name.names or ())
    trusted = (len(names) == 2 and names[0] in TYPE_SCHEMAS) or (len(names) == 1 and names[0] in BARE_TYPES)
    return trusted and _only(name, {"names", "typmods", "arrayBounds"}) and all(
        isinstance(m, ast.A_Const) for m in name.typmods or ()
    )


def _client_encoding(stmt: Any) -> bool:
    """libpq's ``PQsetClientEncoding``: ``set client_encoding to 'name'``."""
    match stmt:
        case ast.VariableSetStmt(
            kind=enums.VariableSetKind.VAR_SET_VALUE, name="client_encoding", args=(ast.A_Const(val=ast.String()),)
        ):
            return _only(stmt, {"kind", "name", "args"})
    return False


def _only(node: Any, fields: set[str]) -> bool:
    """Every field of ``node`` but ``fields`` (and positions) is empty: nothing else was written."""
    return all(not getattr(node, f, None) for f in node.__slots__ if f not in fields and f not in _POSITIONS)
