"""The ``pgml`` schema the proxy installs: versioned, idempotent migrations from ``sql/``.

Owns: finding the migration files, building the script that applies the missing
ones under an advisory lock, and applying it either through a client's session
(first use) or through a direct connection (``pgml-proxy init``, embedded start).

Must not: decide when to run (the rewriter and the CLI do), or keep global state.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pglast

from proxy.internal import Port, Statement, query

# pg_advisory_xact_lock key: concurrent first connections serialize on it.
LOCK_KEY = 0x70676D6C  # "pgml"
TABLE = "pgml.schema_migrations"


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
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    return tuple(found)


def latest() -> int:
    return migrations()[-1].version


def script(applied: set[int], in_transaction: bool) -> str | None:
    """SQL applying every migration not in ``applied`` (None when up to date).

    Inside a client's transaction it adds no BEGIN/COMMIT (the client's COMMIT
    keeps the schema, a ROLLBACK removes it and a later statement re-applies it).
    """
    missing = [m for m in migrations() if m.version not in applied]
    if not missing:
        return None
    parts = [] if in_transaction else ["BEGIN;"]
    parts += [
        f"SELECT pg_advisory_xact_lock({LOCK_KEY});",
        "CREATE SCHEMA IF NOT EXISTS pgml;",
        f"CREATE TABLE IF NOT EXISTS {TABLE} (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now());",
    ]
    for m in missing:
        parts.append(m.sql)
        # Version and name come from our own file names (digits and [a-z_]), never from clients.
        assert re.fullmatch(r"[a-z0-9_]+", m.name)
        parts.append(f"INSERT INTO {TABLE} (version, name) VALUES ({m.version}, '{m.name}') ON CONFLICT DO NOTHING;")
    if not in_transaction:
        parts.append("COMMIT;")
    return "\n".join(parts)


APPLIED_QUERY = f"SELECT CASE WHEN to_regclass('{TABLE}') IS NULL THEN NULL ELSE 'present' END"


async def ensure(port: Port) -> None:
    """Apply missing migrations through ``port`` (the client's own session and privileges)."""
    present = await query(port, APPLIED_QUERY)
    applied: set[int] = set()
    if present.rows and present.rows[0][0] is not None:
        versions = await query(port, f"SELECT version FROM {TABLE}")
        applied = {int(v) for (v,) in versions.rows if v is not None}
    sql = script(applied, port.in_transaction)
    if sql is not None:
        # One statement per message: the extended protocol takes no multi-statement strings.
        await port.execute([Statement(s) for s in pglast.split(sql)])


def init(dsn: str) -> int:
    """Apply missing migrations over a direct connection; returns how many were applied."""
    import psycopg

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
