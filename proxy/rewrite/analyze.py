"""A statement string's analysis: its parse, its pgml call sites, and how it touches schema ``pgml``.

Owns: parsing (a long string off the event loop; one with more list elements than the proxy
reads refused with 54000 before it is parsed), :class:`Analysis` — the parsed statements and
the engine-evaluated calls of each (:func:`proxy.rewrite.calls.find_calls`: their arguments
bound to the overloads once) — and its :meth:`Analysis.copy` (a fresh tree whose call sites follow
it, so that one analysis serves every Bind of a prepared statement without parsing it again),
:func:`schema_use`: whether the statements name schema pgml, may drop it, or are extension commands,
and :func:`before_first_rewritten`: the statements of a string before the first one the proxy rewrites.

Must not: evaluate, rewrite or run anything. An analysis kept for later use is never changed:
rewriting works on a copy.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast, enums

from engine.pg.scalars import MAX_ARRAY_ELEMENTS
from proxy import schema
from proxy.errors import ProgramLimitExceeded, StatementTooComplex
from proxy.rewrite import sql_prepare
from proxy.rewrite.calls import Site, bind, find_calls
from proxy.rewrite.extension import extension_command
from proxy.rewrite.steps import Steps, off_loop
from proxy.rewrite.tree import clone

# Case-insensitive and allocation-free on the raw frame. A false positive costs a
# parse; a false negative would be a bug, so the check is on the whole text.
_PGML = re.compile(rb"pgml", re.IGNORECASE)
_EXECUTE = re.compile(r"(?i)\bexecute\b")
# Statements longer than this are parsed in a worker thread: pglast builds Python objects for every node
# (a literal ARRAY of a million numbers takes seconds), and the event loop serves every other session.
THREAD_PARSE_CHARS = 64 * 1024


def mentions_pgml(raw: bytes) -> bool:
    """The text mentions ``pgml`` anywhere (case-insensitive): it may call a pgml function."""
    return _PGML.search(raw) is not None


def parse(sql: str) -> Steps[tuple[ast.RawStmt, ...] | None]:
    """The statements of ``sql`` (None when pglast cannot parse it: the server reports the syntax error itself).

    Long statements are parsed off the event loop. One with more commas than MAX_ARRAY_ELEMENTS
    (a cheap upper bound of its list elements) is refused with 54000 before it is parsed: its tree
    would take gigabytes.
    """
    long = len(sql) > THREAD_PARSE_CHARS
    if long and sql.count(",") > MAX_ARRAY_ELEMENTS:
        raise ProgramLimitExceeded(
            f"statement too large for pgml-proxy to rewrite: more than {MAX_ARRAY_ELEMENTS} list elements",
            hint="Pass large arrays as bound parameters.",
        )
    try:
        stmts = yield from off_loop(long, functools.partial(pglast.parse_sql, sql))
    except pglast.parser.ParseError:
        return None
    return tuple(stmts)


# The bare pgml names of a statement string (proxy.rewrite.unqualified): one set for all its statements, or, for a
# string that sets the search_path itself, one per statement (in order).
Bare = frozenset[str] | tuple[frozenset[str], ...]


@dataclass
class Analysis:
    """Parsed statements and the pgml calls found in each (one list per statement, outermost first).

    ``bare``: the names whose unqualified calls were taken as pgml's (:mod:`proxy.rewrite.unqualified`:
    qualified in ``stmts`` already); the same text on another search_path is another analysis.
    """

    stmts: tuple[ast.RawStmt, ...]
    sites: list[list[Site]]
    bare: Bare = frozenset()

    @property
    def calls(self) -> bool:
        """Some statement calls an engine-evaluated function."""
        return any(self.sites)

    def cacheable(self) -> bool:
        """True when every call's result depends on its arguments alone (no deployments, no effects)."""
        return all(all(s.cacheable for s in bind(site)[0]) for sites in self.sites for site in sites)

    def copy(self) -> Analysis:
        """The same analysis of a fresh tree (rewriting changes the tree in place; this one stays as it is)."""
        nodes: dict[int, Any] = {}
        stmts = clone(self.stmts, nodes)
        moved: dict[int, Site] = {}
        return Analysis(stmts, [[_moved(site, nodes, moved) for site in sites] for sites in self.sites], self.bare)


def _moved(site: Site, nodes: dict[int, Any], moved: dict[int, Site]) -> Site:
    """``site`` in the copied tree (``nodes``: old node id -> copy); its binding is shared (it holds no nodes)."""
    new = copy.copy(site)
    new.call = nodes[id(site.call)]
    new.stmt = None if site.stmt is None else nodes[id(site.stmt)]
    new.range_function = None if site.range_function is None else nodes[id(site.range_function)]
    new.from_item = None if site.from_item is None else nodes[id(site.from_item)]
    new.ctes = [nodes[id(cte)] for cte in site.ctes]
    new.nested_in = None if site.nested_in is None else moved[id(site.nested_in)]
    moved[id(site)] = new
    return new


def of(stmts: tuple[ast.RawStmt, ...], bare: Bare = frozenset()) -> Analysis:
    """The calls of parsed statements (:attr:`Analysis.calls` False when no statement has one); ``bare``: the
    names whose unqualified calls were qualified in them.

    The body of a PREPARE is not evaluated (it runs at each EXECUTE, where the proxy substitutes it):
    the PREPARE goes to the server as written. Nor are the calls inside a definition the server stores
    (a view, a function body, a column's DEFAULT or GENERATED expression: :mod:`proxy.rewrite.definitions`).
    """
    sites = [[] if raw.stmt is None or isinstance(raw.stmt, ast.PrepareStmt) else find_calls(raw.stmt) for raw in stmts]
    return Analysis(stmts, sites, bare)


@dataclass
class SchemaUse:
    """How a statement string touches schema ``pgml`` (by parsed names only: strings and comments never count)."""

    references: bool = False  # names a relation, function or type in schema pgml: it must be installed
    drops: bool = False  # may drop or rename schema pgml, or drop something in it
    commands: bool = False  # CREATE / ALTER / DROP EXTENSION pgml
    installs: bool = False  # CREATE / ALTER EXTENSION pgml: the string installs it itself


def schema_use(stmts: tuple[ast.RawStmt, ...]) -> SchemaUse:
    use = SchemaUse()
    for raw in stmts:
        command = extension_command(raw.stmt)
        if command is not None:
            use.commands = True
            use.installs = use.installs or command.tag != "DROP EXTENSION"
            continue
        pending: list[Any] = [raw.stmt]  # every node, walked with a list (no recursion, however deep the tree)
        while pending:
            node = pending.pop()
            if isinstance(node, tuple | list):
                pending.extend(node)
            elif isinstance(node, ast.Node):
                _note(use, node)
                pending.extend(getattr(node, member) for member in node)
    return use


def _note(use: SchemaUse, node: ast.Node) -> None:
    """What one node tells of the schema use: a pgml name, a drop or rename of the schema or in it."""
    match node:
        case ast.RangeVar(schemaname=name):
            use.references = use.references or name == schema.SCHEMA
        case ast.FuncCall(funcname=names) | ast.TypeName(names=names):
            use.references = use.references or _qualified(names)
        case ast.DropStmt(removeType=enums.ObjectType.OBJECT_SCHEMA, objects=objects):
            use.drops = use.drops or any(_is_pgml(o) for o in objects or ())
        case ast.DropStmt(removeType=kind, objects=objects) if kind != enums.ObjectType.OBJECT_EXTENSION:
            use.drops = use.drops or any(_qualified(_object_names(o)) for o in objects or ())
        case ast.DropOwnedStmt():
            use.drops = True  # it drops the schema if that role owns it
        case ast.RenameStmt(renameType=enums.ObjectType.OBJECT_SCHEMA, subname="pgml"):
            use.drops = True


def _is_pgml(node: Any) -> bool:
    return isinstance(node, ast.String) and node.sval == schema.SCHEMA


def _qualified(names: Any) -> bool:
    """``pgml.x`` (or ``catalog.pgml.x``) as a name list."""
    return isinstance(names, tuple) and len(names) >= 2 and _is_pgml(names[-2])


def _object_names(node: Any) -> Any:
    """The name list of one object of a DROP (a list of names, a function with arguments, a type)."""
    match node:
        case ast.ObjectWithArgs(objname=names):
            return names
        case ast.TypeName(names=names):
            return names
    return node


def _rewritten_here(stmt: ast.Node) -> bool:
    """A statement the proxy rewrites, so one its errors can come from: a pgml call, an EXECUTE (of a pgml
    PREPARE), a CREATE / ALTER / DROP EXTENSION pgml."""
    if sql_prepare.execute_of(stmt) is not None:
        return True
    return bool(find_calls(stmt)) or extension_command(stmt) is not None


def before_first_rewritten(sql: str) -> list[str]:
    """The statements of ``sql`` before the first one the proxy rewrites (:func:`_rewritten_here`; or one too
    complex to walk), as sent.

    Split by the parser without building trees; only statements that mention pgml are parsed, one by
    one (a long one is taken to be the call: it is not parsed again on the event loop). Empty when no
    statement calls one (the error is then raised alone).
    """
    try:
        texts = list(pglast.split(sql))
    except pglast.parser.ParseError:
        return []
    for index, text in enumerate(texts):
        if not mentions_pgml(text.encode()) and _EXECUTE.search(text) is None:
            continue
        if len(text) <= THREAD_PARSE_CHARS:
            try:
                if not any(_rewritten_here(raw.stmt) for raw in pglast.parse_sql(text) if raw.stmt is not None):
                    continue
            except pglast.parser.ParseError:
                continue
            except StatementTooComplex:  # this statement is where the rewrite stopped
                pass
        return texts[:index]
    return []
