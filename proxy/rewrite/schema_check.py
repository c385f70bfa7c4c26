"""When the rewriter checks that schema ``pgml`` is installed, and what it remembers to check less often.

Owns: :class:`SessionState` (what the rewriter remembers about one session between its statements),
:class:`SchemaMemo` (databases whose schema was seen complete lately) and :class:`SchemaCheck`: the
schema is checked (and installed or upgraded through the client's own session,
:func:`proxy.schema.install`) at a session's first pgml statement, then whenever no session has
seen it complete for SCHEMA_RECHECK_SECONDS; forgotten at once when a statement drops or changes
it, or when an internal query finds something of it missing. What a transaction installed is not
remembered for other sessions until it has ended (a ROLLBACK takes it away).

Must not: run anything itself (it yields :mod:`proxy.rewrite.steps` requests) or decide about statements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxy import schema
from proxy.rewrite.steps import LOOK, Steps
from proxy.rewrite.unqualified import Resolution
from proxy.session.exchange import UpstreamError

# The pgml schema, once seen complete in a database, is taken to be there for this long; then it is
# checked again (two catalogue reads). A statement through this proxy that drops or changes it, and an
# internal query that finds it missing, forget it at once; this bounds how long a schema dropped by
# another client or proxy goes unnoticed.
SCHEMA_RECHECK_SECONDS = 1.0
# SQLSTATEs of an internal query that found a pgml object missing (schema, table, function, type).
_MISSING_OBJECT = frozenset({"3F000", "42P01", "42883", "42704"})


@dataclass
class SessionState:
    """What the rewriter remembers about one session (held weakly: it goes when the session does)."""

    # This session installed or changed schema pgml in the transaction it is in: what it sees of the
    # schema is not committed, so it is not remembered for other sessions.
    changed_schema: bool = False
    # A PREPARE of a statement calling pgml.* went through: its EXECUTEs must be decided here.
    prepares: bool = False
    # The schema was checked on this session once (schema dropped by another client before it began).
    checked: bool = False
    # Which bare function names are pgml's on this session's search_path (proxy.rewrite.unqualified).
    unqualified: Resolution = field(default_factory=Resolution)


class SchemaMemo:
    """Databases whose ``pgml`` schema was last seen complete less than ``seconds`` ago."""

    def __init__(self, seconds: float = SCHEMA_RECHECK_SECONDS) -> None:
        self.seconds = seconds
        self._seen: dict[str, float] = {}

    def __contains__(self, database: object) -> bool:
        seen = self._seen.get(database) if isinstance(database, str) else None
        return seen is not None and time.monotonic() - seen < self.seconds

    def add(self, database: str) -> None:
        self._seen[database] = time.monotonic()

    def discard(self, database: str) -> None:
        self._seen.pop(database, None)


class SchemaCheck:
    """Installs or upgrades schema pgml where needed; one per rewriter, shared by its sessions."""

    def __init__(self) -> None:
        self.ready = SchemaMemo()

    def ensure(self, state: SessionState) -> Steps[None]:
        """Install or upgrade schema pgml unless this session already checked it and some session saw it
        complete lately (SCHEMA_RECHECK_SECONDS): a session's first pgml statement always checks."""
        facts = yield LOOK
        if state.checked and facts.database in self.ready:
            return
        installed = yield from schema.install()
        state.checked = True
        facts = yield LOOK
        if not facts.in_transaction:
            self.ready.add(facts.database)  # committed (or found complete) outside any transaction
        elif installed or state.changed_schema:
            state.changed_schema = True  # a ROLLBACK takes it away again: nothing to tell other sessions
        else:
            self.ready.add(facts.database)  # found complete, and not through this transaction

    def forget_if_missing(self, error: UpstreamError, database: str) -> bool:
        """An internal query found something of schema pgml missing: check it again at the next statement."""
        fields = dict(error.fields)
        missing = fields.get("C") in _MISSING_OBJECT and "pgml" in fields.get("M", "")
        if missing:
            self.ready.discard(database)
        return missing
