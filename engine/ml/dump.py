"""``pgml.dump_all(path)`` / ``pgml.load_all(path)``: the registry as CSV files, one per table, as PostgresML
writes them (``projects.csv``, ``snapshots.csv``, ``models.csv``, ``files.csv``, ``deployments.csv``, each with
a header line).

Owns: where those files are (``path``: a directory inside ``[engine] data_dirs`` of the proxy host, relative
to the first one or absolute under one; PostgresML's ``COPY … TO '<file>'`` writes on the database server,
which a managed server does not allow), writing them from ``COPY … TO STDOUT`` on the client's own session and
reading them back with ``COPY … FROM STDIN`` — each file's header naming its columns, so PostgresML's own
dumps (without ``owner`` and ``signature``) load too — and, after a load, the tables' id sequences moved past
the loaded ids (new rows would collide otherwise).

Who may: members of the registry's owner role (the administrator who installed the schema; superusers), as
PostgresML's server-side COPY needs a superuser or ``pg_write_server_files``: the files land in a directory
other roles' ``pgml.load_dataset`` reads, so no other role writes its registry there, nor loads one from there.

Must not: read or write a path outside ``data_dirs`` (checked with every link resolved, before anything is
opened), or paste a client's text into SQL unquoted.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from engine.api import Call, InvalidArgument, PermissionDenied, Statement
from engine.pg.registry import rows
from engine.pg.text import quote_ident
from engine.runtime.context import Context
from engine.runtime.paths import Roots

TABLES = ("projects", "snapshots", "models", "files", "deployments")  # in the order their keys refer


def directory(path: str, data_dirs: tuple[str, ...]) -> str:
    """The directory ``path`` names, once it lies inside ``data_dirs`` (42501 otherwise, 22023 when empty)."""
    roots = Roots(data_dirs)
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise InvalidArgument("path must name a directory")
    if roots.base is None:
        raise _denied(path, roots)
    full = os.path.normpath(os.path.join(roots.base, path))  # an absolute path stays as it is
    if not roots.within(full) or not roots.really_within(full):
        raise _denied(path, roots)
    return os.path.realpath(full)


def _denied(path: str, roots: Roots) -> PermissionDenied:
    none = "" if roots.real else ", and none are configured"
    return PermissionDenied(
        f'permission denied for the directory "{path}"',
        detail=f"pgml-proxy writes and reads registry dumps only inside its [engine] data_dirs{none}.",
        hint="Name a directory relative to the first of [engine] data_dirs, e.g. pgml.dump_all('backup').",
    )


async def _check_owner(ctx: Context, function: str) -> None:
    (allowed,) = (
        await rows(
            ctx.database(),
            "SELECT pg_catalog.pg_has_role((SELECT relowner FROM pg_catalog.pg_class"
            " WHERE oid = 'pgml.projects'::regclass), 'MEMBER')",
        )
    ).rows[0]
    if allowed != "t":
        raise PermissionDenied(
            f"permission denied for pgml.{function}()",
            detail="Only the owner of the pgml registry (the role that installed it) dumps and loads it.",
            hint="Ask an administrator, or GRANT the registry's owner role to yours.",
        )


async def dump_all(call: Call, ctx: Context) -> list[Any]:
    db = ctx.database()
    await _check_owner(ctx, "dump_all")
    for (path,) in call.rows:
        target = directory(path, ctx.config.data_dirs)
        os.makedirs(target, exist_ok=True)
        results = await db.execute([Statement(f"COPY pgml.{table} TO STDOUT (FORMAT csv, HEADER)") for table in TABLES])
        for table, result in zip(TABLES, results, strict=True):
            with open(os.path.join(target, f"{table}.csv"), "wb") as out:
                out.write(result.copy)
    return [None for _ in call.rows]


async def load_all(call: Call, ctx: Context) -> list[Any]:
    db = ctx.database()
    await _check_owner(ctx, "load_all")
    for (path,) in call.rows:
        source = directory(path, ctx.config.data_dirs)
        statements = []
        for table in TABLES:
            try:
                with open(os.path.join(source, f"{table}.csv"), "rb") as file:
                    data = file.read()
            except OSError as exc:
                raise InvalidArgument(f'pgml.load_all: cannot read {table}.csv in "{path}"') from exc
            columns = await _columns(ctx, table, data)
            statements.append(
                Statement(f"COPY pgml.{table} ({columns}) FROM STDIN (FORMAT csv, HEADER)", copy_data=data)
            )
        statements += [
            Statement(
                f"SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('pgml.{table}', 'id'),"
                f" greatest((SELECT max(id) FROM pgml.{table}), 1))"
            )
            for table in TABLES
        ]
        await db.execute(statements)
    return [None for _ in call.rows]


async def _columns(ctx: Context, table: str, data: bytes) -> str:
    """The column list of a file's header, each a column of ``pgml.<table>`` (22023 otherwise), quoted."""
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace"))), [])
    known = {
        name
        for (name,) in (
            await rows(
                ctx.database(),
                "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
                " AND NOT attisdropped",
                f"pgml.{table}",
            )
        ).rows
    }
    unknown = [name for name in header if name not in known]
    if not header or unknown:
        raise InvalidArgument(
            f"pgml.load_all: the header of {table}.csv names no column of pgml.{table}"
            + (f": {', '.join(unknown[:5])}" if unknown else "")
        )
    return ", ".join(quote_ident(name) for name in header)
