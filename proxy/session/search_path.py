"""The session's ``search_path``, as far as the proxy knows it: for recognising unqualified ``pgml`` calls.

Owns: :class:`SearchPath` — the value (None: unknown), where it comes from and when it is no
longer known. The startup packet gives it (``-c search_path=…`` / ``--search_path=…`` in ``options``, or a
``search_path`` parameter, which wins over them, as :func:`proxy.session.startup.settings` reads them; either
wins over a role's or database's default); a server that
reports it (``ParameterStatus``, PostgreSQL 18) gives every value it takes — after SET, SET LOCAL,
RESET, SET … TO DEFAULT, set_config(), the end of a transaction that undoes them — before its
ReadyForQuery. A client statement that may change it (:func:`touches`: it names ``search_path``,
or is RESET ALL / DISCARD ALL) makes it unknown until every answer owed has come (a reporting
server has reported the change by then; no report: unchanged). A server that does not report it
leaves it unknown from such a statement on, and from the end of a transaction in which one ran (a
SET LOCAL ends there, a ROLLBACK undoes a SET; ``BEGIN; SET search_path …`` in one string counts): the rewriter then
asks the server
(:mod:`proxy.rewrite.unqualified`), and so when the startup packet gave none (a role's default may apply).

For a string that ends such a block itself, it keeps whether one may have changed it in the block open now
(:attr:`SearchPath.changed_in_block`) and the value when the session was last idle (``at_idle``, what a ROLLBACK
gives back). ``epoch`` changes whenever the value does or is forgotten: what the rewriter learned of an unknown
value holds for one epoch. ``$user`` stands for the login user (SET ROLE is not followed).

Must not: do I/O, parse SQL, or decide anything: the core feeds it frames' facts.
"""

from __future__ import annotations

import re

from proxy.session.startup import settings
from proxy.wire.frames import StartupMessage

# Literal-prefix patterns, searched one by one: an alternation is several times slower, on every statement.
_SEARCH_PATH = re.compile(rb"(?i)search_path")
_RESET_ALL, _DISCARD_ALL = re.compile(rb"(?i)reset\s+all"), re.compile(rb"(?i)discard\s+all")
_SET_SCHEMA = re.compile(rb"(?i)\bset\s+(?:session\s+|local\s+)?schema\b")  # SET SCHEMA 'x': search_path = x


def touches(raw: bytes, reported: bool = False) -> bool:
    """A client frame's text may change the search_path (cheap: a false positive costs little). A server that
    reports it reports RESET ALL and DISCARD ALL too: then only a text naming it may (pipelined, it is on its way)."""
    if _SEARCH_PATH.search(raw) is not None or _SET_SCHEMA.search(raw) is not None:
        return True
    return not reported and (_RESET_ALL.search(raw) is not None or _DISCARD_ALL.search(raw) is not None)


def from_startup(startup: StartupMessage) -> str | None:
    """The search_path a startup packet sets (None: it sets none)."""
    return settings(startup).get("search_path")


class SearchPath:
    """One session's search_path (see the module docstring)."""

    __slots__ = (
        "_before", "_forget_at_end", "_outside_block", "_pending", "_since_idle",
        "at_idle", "epoch", "reported", "user", "value",
    )  # fmt: skip

    def __init__(self) -> None:
        self.value: str | None = None
        self.user = ""
        self.reported = False  # the server sends ParameterStatus for it
        self.epoch = 0
        self._before: str | None = None  # the value when a statement touched it (unchanged unless reported)
        self._pending = False
        self._forget_at_end = False
        self._since_idle = False  # a statement that may change it went upstream since the session was last idle
        self.at_idle: str | None = None  # the value when the session was last idle: what a ROLLBACK of its block gives
        self._outside_block = False  # one was sent while no block was open: it may have committed before a BEGIN

    def startup(self, startup: StartupMessage) -> None:
        self.user = startup.get("user") or ""
        self._set(from_startup(startup))

    def report(self, value: str) -> None:
        """The server's ParameterStatus."""
        self.reported = True
        self._pending = False
        self._set(value)

    def touched(self, in_transaction: bool) -> None:
        """A client statement that may change it went upstream."""
        if not self._pending:
            self._before, self._pending = self.value, True
        self._set(None)
        self._since_idle = True
        if not in_transaction:
            self._outside_block = True
        if in_transaction and not self.reported:
            self._forget_at_end = True

    @property
    def changed_in_block(self) -> bool:
        """A statement that may change it ran in the transaction block open now (or in the one a batch owed may open):
        a ROLLBACK may give it the value it had before that, a COMMIT end a SET LOCAL."""
        return self._since_idle

    def ready(self, status: int, idle: bool) -> None:
        """A ReadyForQuery with this status byte; ``idle``: nothing more is owed."""
        if self._pending and idle:
            self._pending = False
            if self.reported:  # it would have reported a change before this ReadyForQuery
                self._set(self._before)
        if status != ord("I"):
            if self._since_idle and not self.reported:  # "BEGIN; SET search_path …" began the block it ran in
                self._forget_at_end = True
            if self._outside_block:  # "SET …; COMMIT; BEGIN" or "BEGIN; SET …": before the block, or in it?
                self.at_idle = None
            return
        if self._forget_at_end:
            self._forget_at_end = False
            self._set(None)
        self.at_idle = self.value  # (None while a change is owed: not known)
        if idle:
            self._since_idle = self._outside_block = False

    def _set(self, value: str | None) -> None:
        if value is None or value != self.value:
            self.epoch += 1
        self.value = value
