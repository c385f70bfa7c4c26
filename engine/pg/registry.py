"""The PostgresML registry through the client's own session: projects, snapshots, models, files, deployments.

Owns: every statement the engine runs on ``pgml.*`` tables, with values bound
as parameters (``$n``), never pasted into SQL; reading rows back into small
typed records; splitting artifacts into ``pgml.files`` parts and joining them,
signing each artifact on write and verifying it on read (``engine.ml.signing``), so
no unverified bytes leave this module.

Must not: train or load models, or decide deployments (``engine.ml.deploy`` does);
it only reads and writes rows, in the caller's transaction and privileges.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from engine.api import Database, PermissionDenied, Result, Statement, UnknownModel, UntrustedArtifact
from engine.ml import signing
from engine.ml.signing import Signer
from engine.pg.text import from_text, to_text
from engine.runtime.context import Context

# pgml.files parts: large artifacts are split so no single bytea value nears the 1 GB limit.
PART_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    task: str


@dataclass(frozen=True)
class Model:
    """A model row with what inference needs: its project, task and snapshot columns."""

    id: int
    project_id: int
    project: str
    task: str
    algorithm: str
    num_features: int
    metrics: dict[str, Any]
    created_at: str
    snapshot_id: int | None
    columns: list[dict[str, Any]] | None
    y_column_name: list[str] | None


def param(value: Any) -> str | bytes | None:
    """A Python value as a bound parameter: bytes binary, JSON for dicts/lists, text otherwise."""
    match value:
        case None | bytes():
            return value
        case bool():
            return "true" if value else "false"
        case dict() | list():
            return json.dumps(value, allow_nan=False)
        case _:
            return str(value)


def statement(sql: str, *values: Any) -> Statement:
    return Statement(sql, tuple(param(v) for v in values))


async def rows(db: Database, sql: str, *values: Any) -> Result:
    return (await db.execute([statement(sql, *values)]))[0]


# One round trip: the project as the caller sees it (row-level security), and whether the name is taken at all.
_PROJECT = """
SELECT p.id, p.name, p.task::text, pgml.project_exists($1)
FROM (SELECT 1) one LEFT JOIN pgml.projects p ON p.name = $1"""


async def project(db: Database, name: str) -> Project | None:
    """The project named ``name``; None when there is none; PermissionDenied when another role owns it."""
    id_, name_, task, taken = (await rows(db, _PROJECT, name)).rows[0]
    if id_ is None:
        if taken == "t":
            raise foreign_project(name)
        return None
    return Project(int(id_), str(name_), str(task))


def foreign_project(name: str) -> PermissionDenied:
    return PermissionDenied(
        f'permission denied for project "{name}"',
        detail="The project belongs to a role you are not a member of.",
        hint="Its owner can share it with GRANT <owner role> TO <you>, or use another project name.",
    )


async def check_foreign_project(db: Database, name: str) -> None:
    """After a lookup by project name found nothing: PermissionDenied when the name belongs to another role."""
    found = (await rows(db, "SELECT pgml.project_exists($1)", name)).rows
    if found and found[0][0] == "t":
        raise foreign_project(name)


async def check_foreign_model(db: Database, model_id: int) -> None:
    """After a lookup by model id found nothing: PermissionDenied when the model exists in another role's project."""
    found = (await rows(db, "SELECT pgml.model_exists($1)", model_id)).rows
    if found and found[0][0] == "t":
        raise PermissionDenied(
            f"permission denied for model {model_id}",
            detail="The model belongs to a project of a role you are not a member of.",
        )


async def next_ids(db: Database, *tables: str) -> list[int]:
    """Fresh ids from the tables' own sequences (sequences are not transactional: gaps are fine)."""
    selects = ", ".join(f"nextval(pg_get_serial_sequence('pgml.{t}', 'id'))" for t in tables)
    result = await rows(db, f"SELECT {selects}")
    return [int(v or 0) for v in result.rows[0]]


_DEPLOYED = """
SELECT d.model_id FROM pgml.deployments d JOIN pgml.projects p ON p.id = d.project_id
WHERE p.name = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT 1"""


async def deployed_model_id(db: Database, project_name: str) -> int:
    """The project's current model; raises the reference's error when nothing is deployed."""
    result = await rows(db, _DEPLOYED, project_name)
    if not result.rows:
        await check_foreign_project(db, project_name)
        raise UnknownModel(f"No deployed model exists for the project named: `{project_name}`")
    return int(result.rows[0][0] or 0)


_MODEL = """
SELECT m.id, m.project_id, p.name, p.task::text, m.algorithm, m.num_features, m.metrics::text,
       m.created_at::text, m.snapshot_id, s.columns::text, s.y_column_name::text
FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
LEFT JOIN pgml.snapshots s ON s.id = m.snapshot_id
WHERE m.id = {}"""


async def model(db: Database, model_id: int) -> Model:
    result = await rows(db, _MODEL.format("$1"), model_id)
    if not result.rows:
        await check_foreign_model(db, model_id)
        raise UnknownModel(f"No model with id = {model_id}")
    return _model(result.rows[0])


async def deployed_model(db: Database, project_name: str) -> Model:
    """The project's current model, in one round trip (the deployment lookup and the model row)."""
    result = await rows(db, _MODEL.format(f"({_DEPLOYED})"), project_name)
    if not result.rows:
        await check_foreign_project(db, project_name)
        raise UnknownModel(f"No deployed model exists for the project named: `{project_name}`")
    return _model(result.rows[0])


def _model(r: tuple[str | None, ...]) -> Model:
    return Model(
        id=int(r[0] or 0),
        project_id=int(r[1] or 0),
        project=str(r[2]),
        task=str(r[3]),
        algorithm=str(r[4]),
        num_features=int(r[5] or 0),
        metrics=json.loads(r[6]) if r[6] else {},
        created_at=str(r[7]),
        snapshot_id=int(r[8]) if r[8] is not None else None,
        columns=json.loads(r[9]) if r[9] else None,
        y_column_name=text_list(r[10]),
    )


def text_list(text: str | None) -> list[str] | None:
    """A text[] of plain identifiers (``y_column_name``) as the server prints it; NULL elements left out."""
    if text is None:
        return None
    values: list[str | None] = from_text(text, "text[]")
    return [v for v in values if v is not None]


async def files(db: Database, row: Model, signer: Signer) -> dict[str, bytes]:
    """The model's artifacts, path -> the joined parts, each verified against its signature.

    Raises UntrustedArtifact (naming the model and project, never the content) when any
    artifact is unsigned or its signature does not match: no caller ever sees unverified bytes.
    """
    # Hex chosen here, whatever the session's bytea_output is.
    result = await rows(
        db,
        "SELECT path, part, encode(data, 'hex'), encode(signature, 'hex') FROM pgml.files WHERE model_id = $1"
        " ORDER BY path, part",
        row.id,
    )
    size = sum(len(r[2] or "") for r in result.rows) // 2
    if size > INLINE_VERIFY_BYTES:  # decoding and hashing hundreds of MB must not hold up the event loop
        return await asyncio.to_thread(_verified, result.rows, row, signer)
    return _verified(result.rows, row, signer)


# Artifacts up to this size are decoded and verified on the event loop (well under a millisecond).
INLINE_VERIFY_BYTES = 1 << 20


def _verified(result_rows: list[tuple[str | None, ...]], row: Model, signer: Signer) -> dict[str, bytes]:
    parts: dict[str, list[bytes]] = {}
    signatures: dict[str, bytes | None] = {}
    for path, part, text, tag in result_rows:
        assert path is not None and text is not None
        parts.setdefault(path, []).append(bytes.fromhex(text))
        if part == "0":
            signatures[path] = bytes.fromhex(tag) if tag is not None else None
    out = {path: b"".join(chunks) for path, chunks in parts.items()}
    for path, data in out.items():
        signature = signatures.get(path)
        if signature is None:
            raise UntrustedArtifact(
                f"model {row.id} of project `{row.project}` has an unsigned artifact and is not loaded",
                detail="Artifacts stored before pgml-proxy signed them, or written around it, are refused.",
                hint="an administrator converts PostgresML's models with `pgml-proxy import-postgresml`"
                if path == "estimator.rmp"
                else "an administrator who has checked them can sign them with `pgml-proxy resign --trust-unsigned`",
            )
        if not signer.verify(row.project_id, row.id, path, data, signature):
            raise UntrustedArtifact(
                f"model {row.id} of project `{row.project}` has an artifact whose signature does not match;"
                " it is not loaded",
                detail="It was changed or copied from another model after the proxy stored it, or it was"
                " signed with another key.",
                hint="Retrain the model; after a key rotation, re-sign the registry with `pgml-proxy resign`.",
            )
    return out


def file_statements(signer: Signer, project_id: int, model_id: int, path: str, data: bytes) -> list[Statement]:
    """INSERTs of one artifact, in parts; part 0 carries the signature of the whole artifact."""
    parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
    signature = signer.sign(project_id, model_id, path, data)
    sql = "INSERT INTO pgml.files (model_id, path, part, data, signature) VALUES ($1, $2, $3, $4, $5)"
    return [statement(sql, model_id, path, n, part, signature if n == 0 else None) for n, part in enumerate(parts)]


def signer(ctx: Context) -> Signer:
    """The artifact signer of the session's database, with the configured key (read once per process)."""
    return signing.signer(ctx.config.artifact_key_file, ctx.database_name)


def project_statement(project_id: int, name: str, task: str) -> Statement:
    sql = "INSERT INTO pgml.projects (id, name, task) VALUES ($1, $2, $3::pgml.task)"
    return statement(sql, project_id, name, task)


def snapshot_statements(
    snapshot_id: int, relation_name: str, relation: str, y_columns: list[str], test_size: float, sampling: str,
    columns: list[dict[str, Any]] | None, analysis: dict[str, Any], materialize: bool, project_id: int | None = None,
) -> list[Statement]:  # fmt: skip
    """The snapshot row, and with ``materialize`` its table ``pgml.snapshot_<id>`` copied from ``relation``.

    ``relation`` is the server's own spelling of the relation (a regclass text), safe as SQL. The
    snapshot of a project is owned by the project's owner (a member retraining a group project without
    SET ROLE still shares it with the group); a snapshot of no project by the current role.
    """
    out = [
        statement(
            "INSERT INTO pgml.snapshots (id, relation_name, y_column_name, test_size, test_sampling, status, columns,"
            " analysis, materialized, owner) VALUES ($1, $2, $3::text[], $4, $5::pgml.sampling, 'successful', $6, $7,"
            " $8, coalesce((SELECT owner FROM pgml.projects WHERE id = $9::bigint),"
            " to_regrole(quote_ident(current_user))))",
            snapshot_id, relation_name, to_text(y_columns, "text[]") if y_columns else None, test_size, sampling,
            columns, analysis, materialize, project_id,
        )
    ]  # fmt: skip
    if materialize:
        out.append(Statement(f"CREATE TABLE pgml.snapshot_{snapshot_id} AS SELECT * FROM {relation}"))
    return out


def deployment_statement(project_id: int, model_id: int, strategy: str) -> Statement:
    return statement(
        "INSERT INTO pgml.deployments (project_id, model_id, strategy) VALUES ($1, $2, $3::pgml.strategy)",
        project_id,
        model_id,
        strategy,
    )


def logs_statement(model_id: int | None, project_id: int, events: list[dict[str, Any]]) -> Statement:
    """One pgml.logs row per progress event (one statement for all of them)."""
    return statement(
        "INSERT INTO pgml.logs (model_id, project_id, logs) SELECT $1, $2, e FROM jsonb_array_elements($3::jsonb) e",
        model_id,
        project_id,
        events,
    )


async def has_registry(db: Database) -> bool:
    """Whether the session's database has the pgml registry (``pgml.projects``)."""
    found = (await rows(db, "SELECT to_regclass('pgml.projects') IS NOT NULL")).rows
    return bool(found) and found[0][0] == "t"


# Per name: the deployed model of the project of that name as the caller sees it (row-level security),
# and whether the name is another role's project.
_DEPLOYED_BY_NAME = """
SELECT n.name, d.model_id, p.id IS NULL AND pgml.project_exists(n.name)
FROM unnest($1::text[]) AS n(name)
LEFT JOIN pgml.projects p ON p.name = n.name
LEFT JOIN LATERAL (SELECT model_id FROM pgml.deployments WHERE project_id = p.id
                   ORDER BY created_at DESC, id DESC LIMIT 1) d ON true"""


async def deployments_by_name(db: Database, names: list[str]) -> list[tuple[str, int | None, bool]]:
    """Per name: (name, the deployed model id of the project so named or None, whether it is another role's)."""
    found = (await rows(db, _DEPLOYED_BY_NAME, to_text(names, "text[]"))).rows
    return [
        (str(name), None if model_id is None else int(model_id), foreign == "t") for name, model_id, foreign in found
    ]


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()
