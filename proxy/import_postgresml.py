"""``pgml-proxy import-postgresml``: the models PostgresML trained, converted in place over a direct connection.

Owns: finding PostgresML's artifacts (the ``estimator.rmp`` rows of ``pgml.files``), deciding
which may be converted, converting each one (``engine.ml.postgresml_import`` rebuilds the
estimator, ``engine.ml.artifacts`` stores it), checking that the stored form predicts exactly
what the rebuilt estimator predicts, replacing the rows in place (``estimator.<format>``,
signed with the configured key) and the per-model report.

Which are converted: the artifacts the schema migration found unsigned (``pgml.unsigned_artifacts``:
stored before pgml-proxy's schema, i.e. by PostgresML), those signed with the key (an
administrator's ``resign --trust-unsigned``), and with ``--trust-unsigned`` the unsigned rows written
since. Pickles (PostgresML's Python runtime) only with ``--trust-pickle``.

Must not: change model, project, snapshot or deployment rows (ids and deployments stay as they
are), unpickle without ``--trust-pickle``, or print or log a key.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from engine.api import EngineError, NotSupported
from engine.ml import artifacts, postgresml_import, signing
from engine.ml.postgresml_import import PATH
from engine.pg.registry import PART_BYTES
from proxy.config import Config
from proxy.embedded import ClusterError, command_dsn

_MODELS = """
SELECT m.id, m.project_id, p.name, p.task::text, m.algorithm::text, m.runtime::text, m.num_features
FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
WHERE m.id IN (SELECT model_id FROM pgml.files WHERE path = %s) ORDER BY m.id"""
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
        with connect(config) as conn:
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


@contextmanager
def connect(config: Config) -> Iterator[Any]:
    """A direct connection to the upstream, or to the embedded server (started for the command if it is not running)."""
    u = config.upstream
    with (
        command_dsn(u.dsn, u.embedded_version, u.embedded_data_dir) as dsn,
        psycopg.connect(dsn, connect_timeout=max(1, int(u.connect_timeout))) as conn,
    ):
        yield conn


def import_all(conn: Any, key: bytes, options: Options) -> tuple[list[Outcome], str]:
    """Every PostgresML model in one transaction (writers of pgml.files wait), each model in a savepoint."""
    outcomes = []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("LOCK TABLE pgml.files IN SHARE ROW EXCLUSIVE MODE")
        cur.execute("SELECT current_database()")
        signer = signing.Signer(key, str(cur.fetchone()[0]))
        cur.execute("SELECT model_id FROM pgml.unsigned_artifacts WHERE path = %s", (PATH,))
        legacy = {int(r[0]) for r in cur.fetchall()}
        cur.execute(_MODELS, (PATH,))
        for row in cur.fetchall():
            model_id, project_id, project, task, algorithm, runtime, width = row
            model = Model(int(model_id), int(project_id), project, task, algorithm, runtime, int(width or 0))
            with conn.transaction():
                outcomes.append(_one(cur, model, signer, model.id in legacy, options))
    return outcomes, signer.database


def _one(cur: Any, model: Model, signer: signing.Signer, legacy: bool, options: Options) -> Outcome:
    cur.execute("SELECT part, data, signature FROM pgml.files WHERE model_id = %s AND path = %s ORDER BY part",
                (model.id, PATH))  # fmt: skip
    rows = cur.fetchall()
    data = b"".join(bytes(r[1]) for r in rows)
    signature = next((bytes(r[2]) for r in rows if r[0] == 0 and r[2] is not None), None)
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
    except NotSupported as exc:
        return Outcome(model, "skipped", exc.message)
    except EngineError as exc:
        return Outcome(model, "failed", exc.message)
    if not options.dry_run:
        _replace(cur, model, signer, f"estimator.{tag}", stored)
    return Outcome(model, "converted", f"{imported.kind} -> estimator.{tag}")


def _check(estimator: Any, loaded: artifacts.LoadedModel, model: Model) -> None:
    """The stored form predicts what the rebuilt estimator predicts, on random rows of the model's width."""
    width = model.num_features or int(getattr(estimator, "n_features_in_", 0))
    probe = np.random.default_rng(model.id).normal(size=(PROBE_ROWS, width)).astype(np.float32)
    expected = artifacts.wrap(estimator).predict(probe)
    if not np.array_equal(np.asarray(expected), np.asarray(loaded.predict(probe)), equal_nan=True):
        raise EngineError("the converted model predicts differently from the PostgresML one; left as it is")


def _replace(cur: Any, model: Model, signer: signing.Signer, path: str, data: bytes) -> None:
    cur.execute("DELETE FROM pgml.files WHERE model_id = %s AND path = %s", (model.id, PATH))
    cur.execute("DELETE FROM pgml.unsigned_artifacts WHERE model_id = %s AND path = %s", (model.id, PATH))
    signature = signer.sign(model.project_id, model.id, path, data)
    for n, start in enumerate(range(0, max(1, len(data)), PART_BYTES)):
        cur.execute(
            "INSERT INTO pgml.files (model_id, path, part, data, signature) VALUES (%s, %s, %s, %s, %s)",
            (model.id, path, n, data[start : start + PART_BYTES], signature if n == 0 else None),
        )
