"""``pgml.files`` over a direct connection, for the administrator commands ``resign`` and ``import-postgresml``.

Owns: the connection such a command runs on (the configured upstream, or the embedded server started for
it), the one transaction that holds ``pgml.files`` against writers for the whole run, reading one artifact
(its parts joined, the signature part 0 carries), the artifacts stored before pgml-proxy's schema
(``pgml.unsigned_artifacts``), and running ``engine.pg.registry``'s statements (``$n`` parameters) there.

Must not: decide what is signed, converted or trusted (the commands do), or print or log a key or data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.api import Statement
from proxy.config import Config
from proxy.embedded import command_dsn

Cursor = psycopg.RawCursor[Any]  # binds $1, $2, … as the engine's statements do


@dataclass(frozen=True)
class Artifact:
    data: bytes  # the parts joined
    signature: bytes | None  # part 0's
    parts: int


@contextmanager
def connect(config: Config) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection to the upstream, or to the embedded server (started for the command if it is not running)."""
    u = config.upstream
    with (
        command_dsn(u.dsn, u.embedded_version, u.embedded_data_dir) as dsn,
        psycopg.connect(dsn, connect_timeout=max(1, int(u.connect_timeout))) as conn,
    ):
        yield conn


@contextmanager
def locked(conn: psycopg.Connection[Any]) -> Iterator[tuple[Cursor, str]]:
    """One transaction in which writers of pgml.files wait (readers go on): its cursor and the database's name."""
    with conn.transaction(), psycopg.RawCursor(conn) as cur:
        cur.execute("LOCK TABLE pgml.files IN SHARE ROW EXCLUSIVE MODE")
        cur.execute("SELECT current_database()")
        row = cur.fetchone()
        yield cur, str(row[0] if row else "")


def read(cur: Cursor, model_id: int, path: str) -> Artifact:
    cur.execute("SELECT part, data, signature FROM pgml.files WHERE model_id = $1 AND path = $2 ORDER BY part",
                (model_id, path))  # fmt: skip
    rows = cur.fetchall()
    signature = next((bytes(r[2]) for r in rows if r[0] == 0 and r[2] is not None), None)
    return Artifact(b"".join(bytes(r[1]) for r in rows), signature, len(rows))


def legacy(cur: Cursor) -> set[tuple[int, str]]:
    """(model id, path) of the artifacts the schema migration found unsigned: stored before pgml-proxy's schema."""
    cur.execute("SELECT model_id, path FROM pgml.unsigned_artifacts")
    return {(int(m), str(p)) for m, p in cur.fetchall()}


def run(cur: Cursor, statements: Iterable[Statement]) -> None:
    for statement in statements:
        cur.execute(statement.sql, statement.params)
