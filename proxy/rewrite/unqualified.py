"""Unqualified pgml calls: the bare function names a session's ``search_path`` resolves to schema ``pgml``.

Owns: which bare names are ``pgml``'s on a session — an engine-evaluated function name whose first
schema on the effective path that defines a function of that name is ``pgml`` (``pg_catalog`` is
searched first unless the path lists it, ``$user`` is the login user, ``pg_temp`` is never searched
for functions: so ``rank()`` and ``version()`` stay pg_catalog's unless the path lists pg_catalog
after pgml, and a ``public.embed`` earlier on the path wins) — read from the server in the
caller's session (``current_schemas(true)`` and ``pg_proc``), kept per path for
NAMES_RECHECK_SECONDS (forgotten after a statement of this session that may create or drop
functions or schemas); :func:`qualify`, which writes ``pgml.`` in front of such a call whose
arguments fit a pgml overload (outside stored definitions), right after the parse, so that
every path a qualified call takes (constant, per-row, streaming, deferred, EXECUTE) takes it; and
:func:`might_call`, the router's cheap test.

It costs nothing where the session's known path does not mention ``pgml`` (the default
``"$user", public``): no lookup, no parse. Where the path is unknown (on a server before
PostgreSQL 18, which does not report it: from the session's start unless its startup packet set it,
a role's default may apply, and after a statement that may change it) a text naming a candidate
function settles the session and asks the server once; what it learns holds until the path may change again
(:class:`proxy.session.search_path.SearchPath`). A string that sets it itself (``SET search_path …; SELECT
embed(…)`` in one simple Query: :func:`changes`) gives each statement the names of the path it runs on — ``SET``
and ``SET LOCAL`` with their values, ``RESET`` / ``SET … TO DEFAULT`` / ``RESET ALL`` with the session's
``reset_val``, a ``COMMIT`` the last plain SET's; those names are read for that path before the string runs.
The string's transactions are followed as the server runs them: its statements share an implicit transaction
until a ``COMMIT`` (which ends a ``SET LOCAL``) or ``ROLLBACK`` (which undoes every SET since the last COMMIT, or
since the block began), ``SAVEPOINT`` / ``ROLLBACK TO`` / ``RELEASE`` restore what they saved; ``SET SCHEMA 'x'``
is a SET, and a number in the list a schema name. Where the path after a statement cannot be known — after
``set_config()`` or a ``DO`` block or ``CALL`` naming search_path, a value that is not a list of names, or a
transaction end in a string that began inside a block in which the path may have changed — the statements after it
get no qualification (the server resolves their bare names, and without a schema that defines them fails as it
would). Not followed: SET ROLE for ``$user``, and a function that sets the path without the text naming it.

Must not: run anything itself (it yields :mod:`proxy.rewrite.steps` requests) or evaluate calls.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pglast import ast
from pglast.enums.parsenodes import TransactionStmtKind, VariableSetKind

from engine.api import evaluated_functions
from engine.pg.text import to_text
from proxy.rewrite import analyze, literals
from proxy.rewrite.analyze import Bare
from proxy.rewrite.calls import match_arguments
from proxy.rewrite.definitions import stored
from proxy.rewrite.steps import LOOK, SETTLE, Facts, Steps, off_loop, run
from proxy.rewrite.tree import deparse
from proxy.session.search_path import SearchPath, touches

EMPTY: frozenset[str] = frozenset()
# A function created or dropped by another session takes this long at most to be noticed here.
NAMES_RECHECK_SECONDS = 1.0
_KEPT_PATHS = 16  # paths whose names a session keeps
_KEPT_TEXTS = 256  # statement texts of a session with bare pgml calls (a deferred statement's Binds read them)
_NAMES = sorted(evaluated_functions())
_CANDIDATE = re.compile(rb"(?i)\b(?:" + b"|".join(n.encode() for n in _NAMES) + rb")\b")
_DDL = re.compile(r"(?i)\b(?:create|drop|alter)\b")
_SET_CONFIG = re.compile(r"(?i)\bset_config\b")
_ENDS_BLOCK = re.compile(rb"(?i)\b(?:commit|rollback|end|abort|prepare)\b")  # (a false "may" costs a parse)
_PGML = "pgml"


def _lookup(schemas: str) -> str:
    """The search_path and, as one comma list, the candidate names whose first schema among ``schemas`` (an SQL
    text[] expression, in search order) that defines a function of that name is pgml."""
    return (
        "SELECT pg_catalog.current_setting('search_path'), pg_catalog.array_to_string(ARRAY("
        f"SELECT f.name FROM pg_catalog.unnest('{{{','.join(_NAMES)}}}'::pg_catalog.text[]) AS f(name)"
        " WHERE (SELECT s.nspname"
        f" FROM pg_catalog.unnest({schemas}) WITH ORDINALITY AS s(nspname, pos)"
        " WHERE NOT pg_catalog.starts_with(s.nspname, 'pg_temp_') AND EXISTS (SELECT FROM pg_catalog.pg_proc p"
        " JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace"
        " WHERE n.nspname OPERATOR(pg_catalog.=) s.nspname AND p.proname OPERATOR(pg_catalog.=) f.name"
        " AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'))"
        " ORDER BY s.pos LIMIT 1) OPERATOR(pg_catalog.=) 'pgml'), ',')"
    )


LOOKUP = _lookup("pg_catalog.current_schemas(true)")  # the session's path now
# The value RESET gives it (the startup packet's, the role's or database's default, else the server's).
RESET_VALUE = "SELECT reset_val FROM pg_catalog.pg_settings WHERE name OPERATOR(pg_catalog.=) 'search_path'"
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
_SET_VALUE, _DEFAULT, _RESET, _RESET_ALL = (
    VariableSetKind.VAR_SET_VALUE, VariableSetKind.VAR_SET_DEFAULT, VariableSetKind.VAR_RESET,
    VariableSetKind.VAR_RESET_ALL,
)  # fmt: skip
_ENDS_KEEPING = frozenset({TransactionStmtKind.TRANS_STMT_COMMIT, TransactionStmtKind.TRANS_STMT_PREPARE})
_ROLLBACK, _SAVEPOINT, _RELEASE, _ROLLBACK_TO = (
    TransactionStmtKind.TRANS_STMT_ROLLBACK, TransactionStmtKind.TRANS_STMT_SAVEPOINT,
    TransactionStmtKind.TRANS_STMT_RELEASE, TransactionStmtKind.TRANS_STMT_ROLLBACK_TO,
)  # fmt: skip


@dataclass
class Resolution:
    """What the rewriter learned of one session's search_path (part of its SessionState)."""

    learned: tuple[int, str] | None = None  # the value read while the session's was unknown, and for which epoch
    names: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)  # per path: bare pgml names, when
    texts: dict[str, frozenset[str]] = field(default_factory=dict)  # statement text -> its bare pgml names

    def path(self, facts: Facts) -> str | None:
        """The session's search_path now (None: unknown)."""
        if facts.search_path is not None:
            return facts.search_path
        learned = self.learned
        return learned[1] if learned is not None and learned[0] == facts.path_epoch else None


@functools.lru_cache(maxsize=256)
def names_pgml(path: str, user: str) -> bool:
    """The search_path ``path`` lists schema pgml (``$user`` standing for ``user``)."""
    return _PGML in schemas(path, user)


def schemas(path: str, user: str) -> list[str]:
    """The schema names a search_path value lists, in order (quoted ones as written, others lower-cased)."""
    out = []
    for item in re.findall(r'(?:"(?:[^"]|"")*"|[^,"])+', path):
        name = item.strip()
        quoted = name.startswith('"') and name.endswith('"')
        name = name[1:-1].replace('""', '"') if quoted else name.lower()
        out.append(user if name == "$user" else name)
    return out


def might_call(search_path: SearchPath, raw: bytes) -> bool:
    """A frame's text may call a pgml function by a bare name on this session's path (never a false "no"; an
    unknown path says "may": :func:`names` then knows what it learned of it, without asking again; so does a text
    that may set the path itself)."""
    path = search_path.value
    if path is not None and not names_pgml(path, search_path.user) and not touches(raw) and not ends_changed_block(
        search_path, raw
    ):
        return False
    return _CANDIDATE.search(raw) is not None


def ends_changed_block(search_path: SearchPath, raw: bytes) -> bool:
    """A text that may end (COMMIT, ROLLBACK, ...) a transaction block in which the session's path may have changed."""
    return search_path.changed_in_block and _ENDS_BLOCK.search(raw) is not None


def any_name(bare: Bare) -> bool:
    """Some statement has a bare pgml call."""
    return any(bare) if isinstance(bare, tuple) else bool(bare)


def of_statement(bare: Bare, index: int) -> frozenset[str]:
    """The bare pgml names of the string's statement ``index``."""
    return bare[index] if isinstance(bare, tuple) else bare


@dataclass(frozen=True)
class SetTo:
    """A search_path a statement of the string sets (its value as the server writes it)."""

    path: str


START, RESET, UNKNOWN = "start", "reset", "unknown"  # the string's first path; the session's reset_val; not known
OnPath = SetTo | str  # which path one statement of a string runs on


@dataclass
class _Transaction:
    """Where the search_path of a string's statements stands: ``now`` (what the next statement runs on), ``kept``
    (what a COMMIT leaves: ``now`` less any SET LOCAL), ``committed`` (what a ROLLBACK goes back to) and the
    savepoints (what a ROLLBACK TO goes back to)."""

    now: OnPath
    kept: OnPath
    committed: OnPath
    savepoints: list[tuple[str, OnPath, OnPath]] = field(default_factory=list)
    earlier: OnPath = START  # the path at an earlier string's savepoint (START: none changed it in the block)

    def set(self, value: OnPath, local: bool) -> None:
        self.now = value
        if not local:
            self.kept = value

    def end(self, stmt: ast.TransactionStmt) -> None:
        kind = stmt.kind
        if kind in _ENDS_KEEPING:
            self.now = self.committed = self.kept
            self.savepoints.clear()
        elif kind == _ROLLBACK:
            self.now = self.kept = self.committed
            self.savepoints.clear()
        elif kind == _SAVEPOINT:
            self.savepoints.append((stmt.savepoint_name or "", self.now, self.kept))
        elif kind in (_RELEASE, _ROLLBACK_TO):
            at = [i for i, (name, _, _) in enumerate(self.savepoints) if name == stmt.savepoint_name]
            if not at:  # one of an earlier string's (or none: the server fails the string here)
                if kind == _ROLLBACK_TO:
                    self.now = self.kept = self.earlier
                    self.savepoints.clear()
                return
            if kind == _ROLLBACK_TO:
                _, self.now, self.kept = self.savepoints[at[-1]]
                del self.savepoints[at[-1] + 1 :]
            else:
                del self.savepoints[at[-1] :]


def changes(stmts: tuple[ast.RawStmt, ...], sql: str = "", block: OnPath | None = None) -> tuple[OnPath, ...] | None:
    """Which path each statement runs on, for a string that sets search_path before a later statement, or ends a
    transaction block in which it changed (None: it changes none that way). The statements of a string run in one
    implicit transaction until a COMMIT or ROLLBACK in it (a BEGIN makes it explicit), so a ROLLBACK undoes a SET
    earlier in the string even without a BEGIN, as on the server. ``block``: the string begins inside a
    transaction block in which the path may have changed, and this is the path it had before the block (what a
    ROLLBACK goes back to; what a COMMIT leaves is not known: an earlier string's SET may have been LOCAL)."""
    at = _Transaction(START, START, START) if block is None else _Transaction(START, UNKNOWN, block, earlier=UNKNOWN)
    changed = False
    out: list[OnPath] = []
    for raw in stmts:
        out.append(at.now)
        stmt = raw.stmt
        if isinstance(stmt, ast.VariableSetStmt):
            if (stmt.name or "").lower() == "search_path" or stmt.kind == _RESET_ALL:
                value = _set_to(stmt)
                if value is not None:
                    at.set(value, bool(stmt.is_local))
                    changed = True
        elif isinstance(stmt, ast.TransactionStmt):
            before = at.now
            at.end(stmt)
            changed = changed or at.now != before
        elif _may_set(stmt, _text(sql, raw)):
            at.set(UNKNOWN, False)  # set_config(), or a DO block that names it: not followed
            at.committed = UNKNOWN  # (it may be set_config(…, true), or commit inside a procedure)
            changed = True
    return tuple(out) if changed and any(path != START for path in out) else None


def _text(sql: str, raw: ast.RawStmt) -> str:
    """One statement's text of a string (pglast's locations count characters)."""
    begin = raw.stmt_location or 0
    return sql[begin : begin + raw.stmt_len] if raw.stmt_len else sql[begin:]


def _may_set(stmt: ast.Node | None, text: str) -> bool:
    """A statement other than SET that may change the search_path: one that names it and calls set_config(), a DO
    block or a procedure (a function that sets it without naming it in the text is not seen, as by the session's
    tracker)."""
    if not touches(text.encode()):
        return False
    return isinstance(stmt, (ast.DoStmt, ast.CallStmt)) or _SET_CONFIG.search(text) is not None


def _set_to(stmt: ast.VariableSetStmt) -> OnPath | None:
    if stmt.kind in (_RESET, _DEFAULT, _RESET_ALL):
        return RESET
    if stmt.kind != _SET_VALUE:
        return None  # SET … FROM CURRENT: the value it has
    items = []
    for arg in stmt.args or ():
        value = getattr(arg, "val", None)
        if isinstance(value, ast.String) and value.sval is not None:
            name = value.sval
            items.append(name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"')
        elif isinstance(value, ast.Integer):
            items.append(str(value.ival))  # a number is a schema name too, written unquoted (as the server does)
        elif isinstance(value, ast.Float) and value.fval is not None:
            items.append(value.fval)
        else:
            return UNKNOWN
    return SetTo(", ".join(items))


def names(sql: str, resolution: Resolution) -> Steps[Bare]:
    """The bare names in ``sql`` that are pgml's functions on the session's path now (EMPTY: none, or no such path);
    for a string that sets the path before a later statement, each statement's on the path it runs on."""
    raw = sql.encode()
    if _CANDIDATE.search(raw) is not None:
        facts = yield LOOK
        ends = facts.path_set_in_block and _ENDS_BLOCK.search(raw) is not None
        if ends:  # the block's state once what was sent before has been answered (a BEGIN may be on its way)
            facts = yield SETTLE
        in_block = facts.in_transaction and facts.path_set_in_block
        if touches(raw) or (in_block and ends):
            stmts = yield from analyze.parse(sql)
            before = facts.path_before_block
            block = (UNKNOWN if before is None else SetTo(before)) if in_block else None
            paths = changes(stmts, sql, block) if stmts is not None else None
            if paths is not None:
                return (yield from _per_statement(sql, paths, resolution))
    found: frozenset[str] = yield from _names_now(sql, resolution)
    return found


def _per_statement(sql: str, paths: tuple[OnPath, ...], resolution: Resolution) -> Steps[Bare]:
    facts = yield LOOK
    ddl = _DDL.search(sql) is not None
    found: dict[OnPath, frozenset[str]] = {}
    for on in paths:
        if on in found:
            continue
        if on == START:
            found[on] = yield from _names_now(sql, resolution)
            continue
        if on == UNKNOWN:
            found[on] = EMPTY  # qualify nothing: the server resolves the bare name (see the module docstring)
            continue
        if isinstance(on, SetTo):
            path = on.path
        else:
            (result,) = yield run(RESET_VALUE)
            path = result.rows[0][0] or ""
        found[on] = yield from _names_on(path, facts.user, resolution, ddl)
    each = tuple(found[on] for on in paths)
    return each[0] if len(set(each)) == 1 else each


def _names_on(path: str, user: str, resolution: Resolution, ddl: bool) -> Steps[frozenset[str]]:
    """The candidate names that are pgml's on ``path`` (a value the session does not have yet)."""
    if not names_pgml(path, user):
        return EMPTY
    kept = resolution.names.get(path) if not ddl else None
    if kept is not None and time.monotonic() - kept[1] < NAMES_RECHECK_SECONDS:
        return kept[0]
    listed = [name for name in schemas(path, user) if name != "pg_temp"]
    searched = listed if "pg_catalog" in listed else ["pg_catalog", *listed]  # as current_schemas(true) gives it
    array = deparse(literals.text_const(to_text(searched, "text[]") or "{}")) + "::pg_catalog.text[]"
    (result,) = yield run(_lookup(array))
    found = frozenset((result.rows[0][1] or "").split(",")) - {""}
    if not ddl:
        _bounded(resolution.names, _KEPT_PATHS)[path] = (found, time.monotonic())
    return found


def _names_now(sql: str, resolution: Resolution) -> Steps[frozenset[str]]:
    """The bare names in ``sql`` that are pgml's on the session's path as it is before ``sql`` runs."""
    facts = yield LOOK
    path = resolution.path(facts)
    if path is not None and not names_pgml(path, facts.user):
        return EMPTY
    raw = sql.encode()
    if _CANDIDATE.search(raw) is None:
        return EMPTY
    if path is None:
        facts = yield SETTLE  # a ParameterStatus owed may tell it
        path = resolution.path(facts)
        if path is not None and not names_pgml(path, facts.user):
            return EMPTY
    ddl = _DDL.search(sql) is not None
    kept = resolution.names.get(path) if path is not None and not ddl else None
    if kept is not None and time.monotonic() - kept[1] < NAMES_RECHECK_SECONDS:
        found = kept[0]
    else:
        (result,) = yield run(LOOKUP)
        current, listed = result.rows[0]
        found = frozenset((listed or "").split(",")) - {""}
        if not touches(raw):  # the string may change it: what was read is the value before it
            if path is None:
                resolution.learned = (facts.path_epoch, current or "")
            _bounded(resolution.names, _KEPT_PATHS)[path or current or ""] = (found, time.monotonic())
    if ddl:  # it may create or drop a function of such a name: read again next time
        resolution.names.clear()
    if found:
        _bounded(resolution.texts, _KEPT_TEXTS)[sql] = found
    return found


def _bounded(memory: dict[str, Any], size: int) -> dict[str, Any]:
    if len(memory) >= size:
        memory.clear()
    return memory


def qualify(stmts: tuple[ast.RawStmt, ...], bare: Bare) -> tuple[ast.RawStmt, ...]:
    """``stmts`` with ``pgml.`` written in front of each call of a name in ``bare`` (its statement's) whose
    arguments fit a pgml overload (in place; none inside a stored definition: the server resolves those itself)."""
    for index, raw in enumerate(stmts):
        names = of_statement(bare, index)
        pending: list[Any] = [raw.stmt] if names else []
        while pending:  # a list, not recursion: however deep the tree
            node = pending.pop()
            if isinstance(node, tuple):
                pending.extend(node)
            elif isinstance(node, ast.Node) and not stored(node):
                if isinstance(node, ast.FuncCall):
                    _qualify(node, names)
                pending.extend(getattr(node, member) for member in node)
    return stmts


def _qualify(call: ast.FuncCall, bare: frozenset[str]) -> None:
    match call.funcname:
        case (ast.String(sval=str(name)) as only,) if name in bare:
            binding = match_arguments(call, name)
            if binding.fitting and not binding.aggregate:
                call.funcname = (ast.String(sval=_PGML), only)


Parser = Callable[[str], Steps[tuple[ast.RawStmt, ...] | None]]


def parser(bare: Bare) -> Parser:
    """:func:`proxy.rewrite.analyze.parse`, then :func:`qualify` with ``bare`` (the parse alone when it is empty)."""
    return functools.partial(_qualified, bare) if any_name(bare) else analyze.parse


def resolving(resolution: Resolution) -> Parser:
    """A parser that qualifies the bare pgml calls of each text on the session's path now (for the statement an
    EXECUTE names: its text is not the one decided)."""
    return functools.partial(_resolved, resolution)


def _resolved(resolution: Resolution, sql: str) -> Steps[tuple[ast.RawStmt, ...] | None]:
    bare: Bare = yield from names(sql, resolution)
    stmts: tuple[ast.RawStmt, ...] | None = yield from parser(bare)(sql)
    return stmts


def _qualified(bare: Bare, sql: str) -> Steps[tuple[ast.RawStmt, ...] | None]:
    stmts = yield from analyze.parse(sql)
    if stmts is None:
        return None
    long = len(sql) > analyze.THREAD_PARSE_CHARS
    qualified: tuple[ast.RawStmt, ...] = yield from off_loop(long, functools.partial(qualify, stmts, bare))
    return qualified
