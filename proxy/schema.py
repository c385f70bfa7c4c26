"""The ``pgml`` schema the proxy installs: versioned, idempotent migrations from ``sql/``.

Owns: finding the migration files, building the script that applies the missing
ones under an advisory lock, applying it either through a client's session
(first use: :func:`install` yields the statements to run there, :mod:`proxy.rewrite.steps`) or
through a direct connection (``pgml-proxy init``, embedded start). The schema counts as the
installed extension when ``pgml.schema_migrations`` exists (what ``CREATE EXTENSION pgml`` and
its kin mean for it: :mod:`proxy.rewrite.extension`).

Must not: decide when to run (the rewriter and the CLI do), or keep global state.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pglast
import psycopg

from proxy.rewrite.steps import LOOK, Steps, drive, run
from proxy.session.exchange import Port

# pg_advisory_xact_lock key: concurrent first connections serialize on it.
LOCK_KEY = 0x70676D6C  # "pgml"
SCHEMA = "pgml"
TABLE = "pgml.schema_migrations"
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (version integer PRIMARY KEY, name text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def sql_dir() -> Path:
    """``$PGML_PROXY_SQL_DIR``, else ``sql/`` next to the source tree, else in the working directory."""
    candidates = [Path(os.environ["PGML_PROXY_SQL_DIR"])] if os.environ.get("PGML_PROXY_SQL_DIR") else []
    candidates += [Path(__file__).resolve().parent.parent / "sql", Path.cwd() / "sql"]
    for path in candidates:
        if (path / "001_schema.sql").is_file():
            return path
    raise FileNotFoundError("the pgml-proxy sql/ directory was not found (set PGML_PROXY_SQL_DIR)")


@lru_cache(maxsize=1)
def migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted(sql_dir().glob("[0-9][0-9][0-9]_*.sql")):
        match = re.match(r"(\d+)_(.+)\.sql$", path.name)
        assert match is not None
        # Version and name come from our own file names (digits and [a-z_]), never from clients.
        assert re.fullmatch(r"[a-z0-9_]+", match.group(2))
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    return tuple(found)


def latest() -> int:
    return migrations()[-1].version


def script(applied: set[int], in_transaction: bool) -> str | None:
    """SQL applying every migration not in ``applied`` (None when up to date), each only if it is still missing
    once the advisory lock is held (:func:`_guarded`).

    Inside a client's transaction it adds no BEGIN/COMMIT (the client's COMMIT
    keeps the schema, a ROLLBACK removes it and a later statement re-applies it).
    """
    missing = [m for m in migrations() if m.version not in applied]
    if not missing:
        return None
    parts = [] if in_transaction else ["BEGIN;"]
    parts += [
        f"SELECT pg_catalog.pg_advisory_xact_lock({LOCK_KEY}::pg_catalog.int8);",
        "CREATE SCHEMA IF NOT EXISTS pgml;",
        CREATE_TABLE + ";",
    ]
    parts += [_guarded(m) for m in missing]
    if not in_transaction:
        parts.append("COMMIT;")
    return "\n".join(parts)


def _guarded(m: Migration) -> str:
    """``m`` applied only if still missing once the lock is held: ``applied`` was read before it, and a session
    that waited on the lock must not run again what the holder applied (a later migration may have changed
    what an earlier one creates, e.g. renamed a parameter, so running it again would fail)."""
    tag = f"$pgml_migration_{m.version}$"
    assert tag not in m.sql
    return (
        f"DO $pgml_apply$ BEGIN IF NOT EXISTS (SELECT FROM {TABLE} WHERE version = {m.version}) THEN\n"
        f"EXECUTE {tag}{m.sql}{tag};\n"
        f"INSERT INTO {TABLE} (version, name) VALUES ({m.version}, '{m.name}');\n"
        "END IF; END $pgml_apply$;"
    )


APPLIED_QUERY = f"SELECT CASE WHEN pg_catalog.to_regclass('{TABLE}') IS NULL THEN NULL ELSE 'present' END"


def install() -> Steps[bool]:
    """Apply missing migrations through the client's own session (its privileges, its transaction).

    Returns True when something was applied, False when the schema was found complete.
    """
    (present,) = yield run(APPLIED_QUERY)
    applied: set[int] = set()
    if present.rows and present.rows[0][0] is not None:
        (versions,) = yield run(f"SELECT version FROM {TABLE}")
        applied = {int(v) for (v,) in versions.rows if v is not None}
    facts = yield LOOK
    sql = script(applied, facts.in_transaction)
    if sql is None:
        return False
    # One statement per message: the extended protocol takes no multi-statement strings.
    yield run(*pglast.split(sql))
    return True


async def ensure(port: Port) -> bool:
    """:func:`install` on ``port`` (for callers that hold a Port rather than yield steps)."""
    return await drive(install(), port, None)


def init(dsn: str) -> int:
    """Apply missing migrations over a direct connection; returns how many were applied."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        exists = conn.execute(APPLIED_QUERY).fetchone()
        applied: set[int] = set()
        if exists and exists[0] is not None:
            applied = {int(v) for (v,) in conn.execute(f"SELECT version FROM {TABLE}").fetchall()}
        sql = script(applied, in_transaction=False)
        if sql is not None:
            conn.execute(sql.encode())
        return len([m for m in migrations() if m.version not in applied])
