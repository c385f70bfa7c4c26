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
(:class:`proxy.session.search_path.SearchPath`). Not followed: a SET inside the same statement
string (it takes effect for the proxy from the next string on), and SET ROLE for ``$user``.

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

from engine.api import evaluated_functions
from proxy.rewrite import analyze
from proxy.rewrite.calls import match_arguments
from proxy.rewrite.definitions import stored
from proxy.rewrite.steps import LOOK, SETTLE, Facts, Steps, off_loop, run
from proxy.session.search_path import SearchPath, touches

EMPTY: frozenset[str] = frozenset()
# A function created or dropped by another session takes this long at most to be noticed here.
NAMES_RECHECK_SECONDS = 1.0
_KEPT_PATHS = 16  # paths whose names a session keeps
_KEPT_TEXTS = 256  # statement texts of a session with bare pgml calls (a deferred statement's Binds read them)
_NAMES = sorted(evaluated_functions())
_CANDIDATE = re.compile(rb"(?i)\b(?:" + b"|".join(n.encode() for n in _NAMES) + rb")\b")
_DDL = re.compile(r"(?i)\b(?:create|drop|alter)\b")
_PGML = "pgml"
LOOKUP = (
    "SELECT pg_catalog.current_setting('search_path'), pg_catalog.array_to_string(ARRAY("
    f"SELECT f.name FROM pg_catalog.unnest('{{{','.join(_NAMES)}}}'::pg_catalog.text[]) AS f(name)"
    " WHERE (SELECT s.nspname"
    " FROM pg_catalog.unnest(pg_catalog.current_schemas(true)) WITH ORDINALITY AS s(nspname, pos)"
    " WHERE NOT pg_catalog.starts_with(s.nspname, 'pg_temp_') AND EXISTS (SELECT FROM pg_catalog.pg_proc p"
    " JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace"
    " WHERE n.nspname OPERATOR(pg_catalog.=) s.nspname AND p.proname OPERATOR(pg_catalog.=) f.name)"
    " ORDER BY s.pos LIMIT 1) OPERATOR(pg_catalog.=) 'pgml'), ',')"
)


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
    unknown path says "may": :func:`names` then knows what it learned of it, without asking again)."""
    path = search_path.value
    if path is not None and not names_pgml(path, search_path.user):
        return False
    return _CANDIDATE.search(raw) is not None


def names(sql: str, resolution: Resolution) -> Steps[frozenset[str]]:
    """The bare names in ``sql`` that are pgml's functions on the session's path now (EMPTY: none, or no such path)."""
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


def qualify(stmts: tuple[ast.RawStmt, ...], bare: frozenset[str]) -> tuple[ast.RawStmt, ...]:
    """``stmts`` with ``pgml.`` written in front of each call of a name in ``bare`` whose arguments fit a pgml
    overload (in place; none inside a stored definition: the server resolves those itself)."""
    pending: list[Any] = [raw.stmt for raw in stmts]
    while pending:  # a list, not recursion: however deep the tree
        node = pending.pop()
        if isinstance(node, tuple):
            pending.extend(node)
        elif isinstance(node, ast.Node) and not stored(node):
            if isinstance(node, ast.FuncCall):
                _qualify(node, bare)
            pending.extend(getattr(node, member) for member in node)
    return stmts


def _qualify(call: ast.FuncCall, bare: frozenset[str]) -> None:
    match call.funcname:
        case (ast.String(sval=str(name)) as only,) if name in bare:
            binding = match_arguments(call, name)
            if binding.fitting and not binding.aggregate:
                call.funcname = (ast.String(sval=_PGML), only)


Parser = Callable[[str], Steps[tuple[ast.RawStmt, ...] | None]]


def parser(bare: frozenset[str]) -> Parser:
    """:func:`proxy.rewrite.analyze.parse`, then :func:`qualify` with ``bare`` (the parse alone when it is empty)."""
    return functools.partial(_qualified, bare) if bare else analyze.parse


def resolving(resolution: Resolution) -> Parser:
    """A parser that qualifies the bare pgml calls of each text on the session's path now (for the statement an
    EXECUTE names: its text is not the one decided)."""
    return functools.partial(_resolved, resolution)


def _resolved(resolution: Resolution, sql: str) -> Steps[tuple[ast.RawStmt, ...] | None]:
    bare = yield from names(sql, resolution)
    stmts: tuple[ast.RawStmt, ...] | None = yield from parser(bare)(sql)
    return stmts


def _qualified(bare: frozenset[str], sql: str) -> Steps[tuple[ast.RawStmt, ...] | None]:
    stmts = yield from analyze.parse(sql)
    if stmts is None:
        return None
    long = len(sql) > analyze.THREAD_PARSE_CHARS
    qualified: tuple[ast.RawStmt, ...] = yield from off_loop(long, functools.partial(qualify, stmts, bare))
    return qualified
