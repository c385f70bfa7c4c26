"""The PostgresML registry through the client's own session: projects, snapshots, models, files, deployments.

Owns: every statement the engine runs on ``pgml.*`` tables, with values bound
as parameters (``$n``), never pasted into SQL; reading rows back into small
typed records; splitting artifacts into ``pgml.files`` parts and joining them.

Must not: train or load models, or decide deployments (``engine.deploy`` does);
it only reads and writes rows, in the caller's transaction and privileges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.api import Database, Result, Statement, UnknownModel

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


async def project(db: Database, name: str) -> Project | None:
    result = await rows(db, "SELECT id, name, task::text FROM pgml.projects WHERE name = $1", name)
    if not result.rows:
        return None
    id_, name_, task = result.rows[0]
    return Project(int(id_ or 0), str(name_), str(task))


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
        raise UnknownModel(f"No model with id = {model_id}")
    return _model(result.rows[0])


async def deployed_model(db: Database, project_name: str) -> Model:
    """The project's current model, in one round trip (the deployment lookup and the model row)."""
    result = await rows(db, _MODEL.format(f"({_DEPLOYED})"), project_name)
    if not result.rows:
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
        y_column_name=_text_array(r[10]),
    )


def _text_array(text: str | None) -> list[str] | None:
    """A text[] of plain identifiers as the server prints it."""
    if text is None:
        return None
    from engine.tabular import parse_array_literal

    values, _ = parse_array_literal(text)
    return [v for v in values if v is not None]


async def files(db: Database, model_id: int) -> dict[str, bytes]:
    """The model's artifacts: path -> the joined parts."""
    result = await rows(db, "SELECT path, data FROM pgml.files WHERE model_id = $1 ORDER BY path, part", model_id)
    out: dict[str, bytes] = {}
    for path, data in result.rows:
        assert path is not None and data is not None and data.startswith("\\x")
        out[path] = out.get(path, b"") + bytes.fromhex(data[2:])
    return out


def file_statements(model_id: int, path: str, data: bytes) -> list[Statement]:
    """INSERTs of one artifact, in parts."""
    parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
    sql = "INSERT INTO pgml.files (model_id, path, part, data) VALUES ($1, $2, $3, $4)"
    return [statement(sql, model_id, path, n, part) for n, part in enumerate(parts)]


def project_statement(project_id: int, name: str, task: str) -> Statement:
    sql = "INSERT INTO pgml.projects (id, name, task) VALUES ($1, $2, $3::pgml.task)"
    return statement(sql, project_id, name, task)


def snapshot_statements(
    snapshot_id: int, relation_name: str, relation: str, y_columns: list[str], test_size: float, sampling: str,
    columns: list[dict[str, Any]] | None, analysis: dict[str, Any], materialize: bool,
) -> list[Statement]:  # fmt: skip
    """The snapshot row, and with ``materialize`` its table ``pgml.snapshot_<id>`` copied from ``relation``.

    ``relation`` is the server's own spelling of the relation (a regclass text), safe as SQL.
    """
    out = [
        statement(
            "INSERT INTO pgml.snapshots (id, relation_name, y_column_name, test_size, test_sampling, status, columns,"
            " analysis, materialized) VALUES ($1, $2, $3::text[], $4, $5::pgml.sampling, 'successful', $6, $7, $8)",
            snapshot_id, relation_name, text_array(y_columns) if y_columns else None, test_size, sampling, columns,
            analysis, materialize,
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


def text_array(values: list[str]) -> str:
    """A text[] literal body for a bound parameter (every element quoted)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()
