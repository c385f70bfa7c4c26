"""``pgml.deploy``: choosing a project's model, through the client's own session.

Owns: the deployment strategies (``most_recent``, ``best_score`` compared
numerically, ``rollback``, deploy by model id as ``specific``, the automatic
``new_score`` rule used by training and tuning).

Must not: train or run models; every row it reads or writes goes through
:mod:`engine.pg.registry` or the ``Database`` it is given.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.api import Call, Database, InvalidArgument, UnknownModel
from engine.ml.metrics import key_metric
from engine.pg import registry
from engine.runtime.context import Context

STRATEGIES = frozenset({"best_score", "most_recent", "rollback"})
ALL_STRATEGIES = STRATEGIES | {"new_score", "specific"}

_CANDIDATES = """
SELECT m.id, m.algorithm, m.metrics::text FROM pgml.models m
WHERE m.project_id = $1 AND m.status = 'successful' AND ($2::text IS NULL OR m.algorithm = $2)
ORDER BY m.created_at DESC, m.id DESC"""

_HISTORY = """
SELECT d.model_id, m.algorithm FROM pgml.deployments d JOIN pgml.models m ON m.id = d.model_id
WHERE d.project_id = $1 AND ($2::text IS NULL OR m.algorithm = $2)
ORDER BY d.created_at DESC, d.id DESC"""


async def deploy(call: Call, ctx: Context) -> list[Any]:
    db = ctx.database()
    out: list[Any] = []
    for row in call.rows:
        by_id = call.signature.params[0].name == "model_id"
        result = await (_deploy_model(db, row[0]) if by_id else _deploy_project(db, *row))
        out.append([] if result is None else [result])  # a NULL argument: no row
    return out


async def _deploy_model(db: Database, model_id: int | None) -> tuple[str, str, str] | None:
    if model_id is None:
        return None
    found = await registry.model(db, int(model_id))
    await db.execute([registry.deployment_statement(found.project_id, found.id, "specific")])
    return (found.project, "specific", found.algorithm)


async def _deploy_project(
    db: Database, name: str | None, strategy: str | None, algorithm: str | None
) -> tuple[str, str, str] | None:
    if name is None or strategy is None:
        return None
    if strategy not in ALL_STRATEGIES:
        raise InvalidArgument(f'invalid input value for enum pgml.strategy: "{strategy}"')
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"invalid strategy: {strategy}", hint="Use best_score, most_recent or rollback.")
    project = await registry.project(db, name)
    if project is None:
        raise UnknownModel(f"Project named `{name}` does not exist.")
    chosen = await _choose(db, project, strategy, algorithm)
    if chosen is None:
        raise UnknownModel("No qualified models exist for this deployment.")
    model_id, chosen_algorithm = chosen
    await db.execute([registry.deployment_statement(project.id, model_id, strategy)])
    return (project.name, strategy, chosen_algorithm)


async def _choose(
    db: Database, project: registry.Project, strategy: str, algorithm: str | None
) -> tuple[int, str] | None:
    if strategy == "rollback":
        history = (await registry.rows(db, _HISTORY, project.id, algorithm)).rows
        if not history:
            return None
        current = history[0][0]
        previous = next((r for r in history[1:] if r[0] != current), None)
        return None if previous is None else (int(previous[0] or 0), str(previous[1]))
    candidates = (await registry.rows(db, _CANDIDATES, project.id, algorithm)).rows
    if not candidates:
        return None
    if strategy == "most_recent":
        return int(candidates[0][0] or 0), str(candidates[0][1])
    best = max(candidates, key=lambda r: _score(project.task, json.loads(r[2]) if r[2] else {}))
    return int(best[0] or 0), str(best[1])


def _score(task: str, metrics: dict[str, Any]) -> float:
    """The key metric as a number, oriented so that larger is better; missing ranks last.

    PostgresML sorts the JSON text (so 0.9 < 0.10 < 1e-3 goes wrong); this compares numbers.
    """
    name, higher = key_metric(task)
    value = metrics.get(name)
    if not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value) if higher else -float(value)


def better_or_equal(task: str, new: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """The automatic-deploy rule: deploy unless the current model is strictly better."""
    return current is None or not _score(task, current) > _score(task, new)
