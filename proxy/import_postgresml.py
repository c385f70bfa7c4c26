"""``pgml-proxy import-postgresml``: the models PostgresML trained, converted in place over a direct connection.

Owns: finding PostgresML's artifacts (the ``estimator.rmp`` rows of ``pgml.files``), deciding
which may be converted, converting each one (``engine.ml.postgresml_import`` rebuilds the
estimator, ``engine.ml.artifacts`` stores it), checking that the stored form predicts exactly
what the rebuilt estimator predicts, replacing the rows in place (``estimator.<format>``,
signed with the configured key), translating the converted model's snapshot ``columns`` where
PostgresML wrote an older layout (``postgresml_import.snapshot_columns``) and the per-model report.
Access to ``pgml.files`` (connection, locked transaction, reading an artifact) is ``proxy.admin_files``,
shared with ``resign``.

Which are converted: the artifacts the schema migration found unsigned (``pgml.unsigned_artifacts``:
stored before pgml-proxy's schema, i.e. by PostgresML), those signed with the key (an
administrator's ``resign --trust-unsigned``), and with ``--trust-unsigned`` the unsigned rows written
since. Pickles (PostgresML's Python runtime) only with ``--trust-pickle``.

Must not: change model, project or deployment rows (ids and deployments stay as they are), or a
snapshot's other than its ``columns`` where they need translating; unpickle without ``--trust-pickle``,
or print or log a key.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from engine.api import EngineError, NotSupported
from engine.ml import artifacts, postgresml_import, signing
from engine.ml.postgresml_import import PATH
from engine.pg import registry
from proxy import admin_files
from proxy.admin_files import Cursor
from proxy.config import Config
from proxy.embedded import ClusterError

_MODELS = """
SELECT m.id, m.project_id, p.name, p.task::text, m.algorithm::text, m.runtime::text, m.num_features, m.snapshot_id
FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
WHERE m.id IN (SELECT model_id FROM pgml.files WHERE path = $1) ORDER BY m.id"""
PROBE_ROWS = 64  # random feature rows both forms of a converted model must predict identically


@dataclass(frozen=True)
class Options:
    trust_pickle: bool = False
    trust_unsigned: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Model:
    id: int
    project_id: int
    project: str
    task: str
    algorithm: str
    runtime: str
    num_features: int
    snapshot_id: int | None


@dataclass(frozen=True)
class Outcome:
    model: Model
    status: str  # converted | skipped | failed
    why: str

    def line(self) -> str:
        m = self.model
        return f"model {m.id} (project {m.project}, {m.runtime} {m.algorithm}): {self.status}: {self.why}"


def run(config: Config, options: Options) -> int:
    """The command: report a line per model and a summary; 0 when every PostgresML model was converted."""
    try:
        key = signing.load_key(config.engine.artifact_key_file)
        with admin_files.connect(config) as conn:
            outcomes, database = import_all(conn, key, options)
    except (EngineError, psycopg.Error, ClusterError) as exc:
        print(f"pgml-proxy import-postgresml: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    for outcome in outcomes:
        print(outcome.line())
    counts = Counter(o.status for o in outcomes)
    verb = "would be converted" if options.dry_run else "converted"
    print(
        f"database {database}: {len(outcomes)} PostgresML model(s): {counts['converted']} {verb}, "
        f"{counts['skipped']} skipped, {counts['failed']} failed"
    )
    return 0 if counts["converted"] == len(outcomes) else 1


def import_all(conn: Any, key: bytes, options: Options) -> tuple[list[Outcome], str]:
    """Every PostgresML model in one transaction (writers of pgml.files wait), each model in a savepoint."""
    outcomes = []
    with admin_files.locked(conn) as (cur, database):
        signer = signing.Signer(key, database)
        legacy = {model_id for model_id, path in admin_files.legacy(cur) if path == PATH}
        cur.execute(_MODELS, (PATH,))
        for row in cur.fetchall():
            model_id, project_id, project, task, algorithm, runtime, width, snapshot_id = row
            model = Model(int(model_id), int(project_id), project, task, algorithm, runtime, int(width or 0),
                          None if snapshot_id is None else int(snapshot_id))  # fmt: skip
            with conn.transaction():
                outcomes.append(_one(cur, model, signer, model.id in legacy, options))
    return outcomes, database


def _one(cur: Cursor, model: Model, signer: signing.Signer, legacy: bool, options: Options) -> Outcome:
    artifact = admin_files.read(cur, model.id, PATH)
    data, signature = artifact.data, artifact.signature
    if signature is not None and not signer.verify(model.project_id, model.id, PATH, data, signature):
        return Outcome(model, "skipped", "its signature does not verify with the configured key")
    if signature is None and not legacy and not options.trust_unsigned:
        why = "unsigned and written after pgml-proxy's schema was installed: check it, then rerun with --trust-unsigned"
        return Outcome(model, "skipped", why)
    if postgresml_import.detect(data, model.algorithm, model.runtime) == "pickle" and not options.trust_pickle:
        return Outcome(model, "skipped", "a pickled scikit-learn estimator: rerun with --trust-pickle to convert it")
    try:
        imported = postgresml_import.rebuild(data, model.task, model.algorithm, model.runtime, trust_pickle=True)
        tag, stored = artifacts.dump(imported.estimator)
        _check(imported.estimator, artifacts.load(tag, stored), model)
        columns = _snapshot_columns(cur, model)
    except NotSupported as exc:
        return Outcome(model, "skipped", exc.message)
    except EngineError as exc:
        return Outcome(model, "failed", exc.message)
    if not options.dry_run:
        _replace(cur, model, signer, f"estimator.{tag}", stored)
        if columns is not None:
            sql = "UPDATE pgml.snapshots SET columns = $1::jsonb WHERE id = $2"
            admin_files.run(cur, [registry.statement(sql, columns, model.snapshot_id)])
    translated = "" if columns is None else f"; snapshot {model.snapshot_id}'s columns translated"
    return Outcome(model, "converted", f"{imported.kind} -> estimator.{tag}{translated}")


def _snapshot_columns(cur: Cursor, model: Model) -> list[dict[str, Any]] | None:
    """The model's snapshot columns translated to what ``predict(project, ROW(…))`` reads, None if they need not be."""
    if model.snapshot_id is None:
        return None
    cur.execute("SELECT columns::text FROM pgml.snapshots WHERE id = $1", (model.snapshot_id,))
    row = cur.fetchone()
    return postgresml_import.snapshot_columns(None if row is None or row[0] is None else json.loads(row[0]))


def _check(estimator: Any, loaded: artifacts.LoadedModel, model: Model) -> None:
    """The stored form predicts what the rebuilt estimator predicts, on random rows of the model's width."""
    width = model.num_features or int(getattr(estimator, "n_features_in_", 0))
    probe = np.random.default_rng(model.id).normal(size=(PROBE_ROWS, width)).astype(np.float32)
    expected = artifacts.wrap(estimator).predict(probe)
    if not np.array_equal(np.asarray(expected), np.asarray(loaded.predict(probe)), equal_nan=True):
        raise EngineError("the converted model predicts differently from the PostgresML one; left as it is")


def _replace(cur: Cursor, model: Model, signer: signing.Signer, path: str, data: bytes) -> None:
    cur.execute("DELETE FROM pgml.files WHERE model_id = $1 AND path = $2", (model.id, PATH))
    cur.execute("DELETE FROM pgml.unsigned_artifacts WHERE model_id = $1 AND path = $2", (model.id, PATH))
    admin_files.run(cur, registry.file_statements(signer, model.project_id, model.id, path, data))
