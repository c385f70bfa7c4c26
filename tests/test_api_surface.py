"""Every function of PostgresML 2.10's SQL surface, called through the proxy, answers with its documented
result shape (column names and types; the reference: shared postgresml-api.md, PostgresML's ``api.rs``).

One table: each row is a statement and the columns it must describe, plus a check of its values. The
registry calls run in order in a scratch database (a project trained before it is predicted, deployed…).
``SURFACE`` names every function of the surface once: a function PostgresML has and this table lacks fails
:func:`test_the_table_covers_the_whole_surface`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.api import CATALOGUE
from tests.conftest import MINILM, Postgres, ProxyProcess, scratch_database
from tests.tiny_models import tiny_cross_encoder, tiny_gpt2

pytestmark = pytest.mark.pg_matrix

# PostgresML 2.10's functions (pgml-extension/src: api.rs, vectors.rs, bindings/xgboost.rs; sql/schema.sql),
# and its aggregates. Ours beyond these: callback_enable/disable, project_exists, model_exists, helpers "_…".
_NAMES = (
    "activate_venv add auto_updated_at chunk clear_gpu_cache cosine_similarity decompose deploy distance_l1"
    " distance_l2 divide dot_product dump_all embed generate load_all load_dataset max max_abs min min_abs multiply"
    " norm_l0 norm_l1 norm_l2 norm_max normalize_l1 normalize_l2 normalize_max predict predict_batch predict_joint"
    " predict_proba python_package_version python_pip_freeze python_version rank set_updated_at sklearn_f1_score"
    " sklearn_classification_metrics sklearn_r2_score sklearn_regression_metrics snapshot subtract sum train"
    " train_joint transform transform_stream tune validate_python_dependencies validate_shared_library version"
    " xgboost_version"
)
SURFACE = frozenset(_NAMES.split())
# Functions whose call needs a fine-tuned model (tests/test_tune.py runs them): their shape is checked by
# describing the statement with parameters (the proxy evaluates constant calls at Parse already; the server
# resolves the stub, as it would the real call).
# load_all needs an empty registry: test_dump_all_and_load_all_move_the_registry runs it.
DESCRIBED_ONLY = {"tune", "generate", "load_all"}

GPT2 = '{"task": "text-generation", "model": "tiny-gpt2"}'
Check = Callable[[list[tuple[Any, ...]]], bool]


def one(check: Callable[[Any], bool]) -> Check:
    return lambda rows: len(rows) == 1 and check(rows[0][0])


def floats(n: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(isinstance(x, float) for x in v) and (n is None or len(v) == n)


def keys(*names: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and sorted(v) == sorted(names)


ANY: Check = lambda rows: True  # noqa: E731
# (function, statement, [(column, type)], check of the rows). Types are pg_type names.
CASES: list[tuple[str, str, list[tuple[str, str]], Check]] = [
    ("version", "SELECT pgml.version()", [("version", "text")], one(lambda v: v.startswith("2.10"))),
    ("python_version", "SELECT pgml.python_version()", [("python_version", "text")], one(lambda v: v == sys.version)),
    ("python_package_version", "SELECT pgml.python_package_version('sklearn')", [("python_package_version", "text")],
     one(lambda v: v[0].isdigit())),
    ("python_pip_freeze", "SELECT * FROM pgml.python_pip_freeze()", [("package", "text")],
     lambda rows: any(r[0].lower().startswith("scikit-learn==") for r in rows)),
    ("validate_python_dependencies", "SELECT pgml.validate_python_dependencies()",
     [("validate_python_dependencies", "bool")], one(lambda v: v is True)),
    ("validate_shared_library", "SELECT pgml.validate_shared_library()", [("validate_shared_library", "void")], ANY),
    ("xgboost_version", "SELECT pgml.xgboost_version()", [("xgboost_version", "text")], one(lambda v: v[0].isdigit())),
    ("activate_venv", "SELECT pgml.activate_venv('/opt/venv')", [("activate_venv", "bool")], one(lambda v: v is False)),
    ("clear_gpu_cache", "SELECT pgml.clear_gpu_cache()", [("clear_gpu_cache", "bool")], one(lambda v: v is True)),
    ("sklearn_f1_score", "SELECT pgml.sklearn_f1_score('{1,0,1,1}', '{1,0,0,1}')", [("sklearn_f1_score", "float4")],
     one(lambda v: abs(v - 0.8) < 1e-6)),
    ("sklearn_r2_score", "SELECT pgml.sklearn_r2_score('{1,2,3}', '{1,2,3}')", [("sklearn_r2_score", "float4")],
     one(lambda v: v == 1.0)),
    ("sklearn_regression_metrics", "SELECT pgml.sklearn_regression_metrics('{1,2,3}', '{1,2,4}')",
     [("sklearn_regression_metrics", "jsonb")], one(keys("r2", "mse", "mae"))),
    ("sklearn_classification_metrics", "SELECT pgml.sklearn_classification_metrics('{1,0,1}', '{1,0,0}', 2)",
     [("sklearn_classification_metrics", "jsonb")],
     one(keys("f1", "f1_micro", "precision", "recall", "accuracy", "mcc", "roc_auc"))),
    ("embed", f"SELECT pgml.embed('{MINILM}', 'hi mom')", [("embed", "_float4")], one(floats(384))),
    ("embed", f"SELECT * FROM pgml.embed('{MINILM}', ARRAY['a', 'b'])", [("embed", "_float4")],
     lambda rows: len(rows) == 2 and all(floats(384)(r[0]) for r in rows)),
    ("chunk", "SELECT * FROM pgml.chunk('character', 'one two',"
     " '{\"chunk_size\": 3, \"chunk_overlap\": 0, \"separator\": \" \"}')",
     [("chunk_index", "int8"), ("chunk", "text")], lambda rows: [r[0] for r in rows] == [1, 2]),
    ("transform", f"SELECT pgml.transform('{GPT2}'::jsonb, '{{\"max_new_tokens\": 2}}', ARRAY['the cat'])",
     [("transform", "jsonb")], one(lambda v: isinstance(v, list) and len(v) == 1)),
    ("transform_stream", f"SELECT * FROM pgml.transform_stream('{GPT2}'::jsonb, '{{\"max_new_tokens\": 2}}', 'the')",
     [("transform_stream", "jsonb")], lambda rows: len(rows) >= 1),
    ("rank", "SELECT * FROM pgml.rank('tiny-cross-encoder', 'cat', ARRAY['a cat', 'a dog'])",
     [("corpus_id", "int8"), ("score", "float8"), ("text", "text")], lambda rows: len(rows) == 2),
    ("load_dataset", "SELECT * FROM pgml.load_dataset('iris')", [("table_name", "text"), ("rows", "int8")],
     lambda rows: len(rows) == 1 and rows[0][1] == 150),
    ("snapshot", "SELECT * FROM pgml.snapshot('api_reg_v', 'y')", [("relation", "text"), ("y_column_name", "text")],
     lambda rows: len(rows) == 1),
    ("train", "SELECT * FROM pgml.train('api_reg', 'regression', 'api_reg_v', 'y')",
     [("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")],
     lambda rows: rows == [("api_reg", "regression", "linear", True)]),
    ("train", "SELECT * FROM pgml.train('api_cls', 'classification', 'api_cls_v', 'label')",
     [("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")],
     lambda rows: rows[0][:2] == ("api_cls", "classification")),
    ("train", "SELECT * FROM pgml.train('api_pca', 'decomposition', 'api_x', algorithm => 'pca',"
     " hyperparams => '{\"n_components\": 1}')",
     [("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")], ANY),
    ("train_joint", "SELECT * FROM pgml.train_joint('api_joint', 'regression', 'api_joint_v', ARRAY['y', 'y2'])",
     [("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")], ANY),
    ("predict", "SELECT pgml.predict('api_reg', ARRAY[1, 2]::real[])", [("predict", "float4")],
     one(lambda v: isinstance(v, float))),
    ("predict", "SELECT pgml.predict((SELECT id FROM pgml.models ORDER BY id LIMIT 1), ARRAY[1, 2]::real[])",
     [("predict", "float4")], one(lambda v: isinstance(v, float))),
    ("predict_proba", "SELECT pgml.predict_proba('api_cls', ARRAY[1, 2]::real[])", [("predict_proba", "_float4")],
     one(floats(2))),
    ("predict_joint", "SELECT pgml.predict_joint('api_joint', ARRAY[1, 2]::real[])", [("predict_joint", "_float4")],
     one(floats(2))),
    ("predict_batch", "SELECT * FROM pgml.predict_batch('api_reg', ARRAY[1, 2, 3, 4]::real[])",
     [("predict_batch", "float4")], lambda rows: len(rows) == 2),
    ("decompose", "SELECT pgml.decompose('api_pca', ARRAY[1, 2]::real[])", [("decompose", "_float4")], one(floats(1))),
    ("deploy", "SELECT * FROM pgml.deploy('api_reg', 'most_recent')",
     [("project", "text"), ("strategy", "text"), ("algorithm", "text")], lambda rows: rows[0][0] == "api_reg"),
    ("tune", "SELECT * FROM pgml.tune($1, $2, $3, $4, $5)",
     [("status", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")], ANY),
    ("generate", "SELECT pgml.generate($1, $2::text)", [("generate", "text")], ANY),
    ("auto_updated_at", "SELECT pgml.auto_updated_at('api_xy')", [("auto_updated_at", "void")], ANY),
    ("set_updated_at", "SELECT tgname FROM pg_trigger WHERE tgfoid = 'pgml.set_updated_at'::regproc"
     " AND tgrelid = 'api_xy'::regclass", [("tgname", "name")], lambda rows: rows == [("api_xy_auto_updated_at",)]),
    ("dump_all", "SELECT pgml.dump_all('surface_dump')", [("dump_all", "void")], ANY),
    ("load_all", "SELECT pgml.load_all($1)", [("load_all", "void")], ANY),
    *[
        (name, f"SELECT pgml.{name}(ARRAY[1, 2]::real[], 2)", [(name, "_float4")], one(floats(2)))
        for name in ("add", "subtract", "multiply", "divide")
    ],
    *[
        (name, f"SELECT pgml.{name}(ARRAY[3, 4]::real[])", [(name, "float4")], one(lambda v: isinstance(v, float)))
        for name in ("norm_l0", "norm_l1", "norm_l2", "norm_max")
    ],
    *[
        (name, f"SELECT pgml.{name}(ARRAY[3, 4]::real[])", [(name, "_float4")], one(floats(2)))
        for name in ("normalize_l1", "normalize_l2", "normalize_max")
    ],
    *[
        (name, f"SELECT pgml.{name}(ARRAY[3, 4]::real[], ARRAY[1, 2]::real[])", [(name, "float4")],
         one(lambda v: isinstance(v, float)))
        for name in ("distance_l1", "distance_l2", "dot_product", "cosine_similarity")
    ],
    *[
        (name, f"SELECT pgml.{name}(v) FROM (VALUES (ARRAY[1, -2]::real[]), (ARRAY[-3, 4]::real[])) AS t(v)",
         [(name, "_float4")], one(floats(2)))
        for name in ("sum", "min", "max", "min_abs", "max_abs")
    ],
]  # fmt: skip


def test_the_table_covers_the_whole_surface() -> None:
    assert {name for name, *_ in CASES} == SURFACE
    assert {s.function for s in CATALOGUE} <= SURFACE  # nothing evaluated that PostgresML lacks


@pytest.fixture(scope="module")
def surface_conn(pg: Postgres, proxy: ProxyProcess, model_dir: Path, data_dir: Path) -> Iterator[psycopg.Connection]:
    for name, build in (("tiny-gpt2", tiny_gpt2), ("tiny-cross-encoder", tiny_cross_encoder)):
        if not (model_dir / name).exists():
            build(model_dir / name)
    with (
        scratch_database(pg, "surface") as database,
        psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn,
    ):
        conn.execute(
            "CREATE TABLE api_xy AS SELECT i::real AS x1, (i % 7)::real AS x2, (2 * i + 1)::real AS y,"
            " (3 * i)::real AS y2, (i % 2)::real AS label, now()::timestamp AS updated_at"
            " FROM generate_series(1, 40) AS i"
        )
        for view, columns in (("api_x", "x1, x2"), ("api_reg_v", "x1, x2, y"), ("api_cls_v", "x1, x2, label"),
                              ("api_joint_v", "x1, x2, y, y2")):  # fmt: skip
            conn.execute(f"CREATE VIEW {view} AS SELECT {columns} FROM api_xy")
        yield conn


@pytest.fixture(scope="module")
def type_names(pg: Postgres) -> dict[int, str]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return {oid: name for oid, name in conn.execute("SELECT oid::int, typname FROM pg_type").fetchall()}


@pytest.mark.parametrize(
    ("function", "sql", "columns", "check"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_function_answers_with_its_shape(
    surface_conn: psycopg.Connection, type_names: dict[int, str], function: str, sql: str,
    columns: list[tuple[str, str]], check: Check,
) -> None:  # fmt: skip
    with surface_conn.cursor() as cur:
        if function in DESCRIBED_ONLY:
            described = surface_conn.pgconn.describe_prepared(_prepare(surface_conn, sql))
            got = [(described.fname(i).decode(), type_names[described.ftype(i)]) for i in range(described.nfields)]
            assert got == columns
            return
        cur.execute(sql)
        assert cur.description is not None
        assert [(d.name, type_names[d.type_code]) for d in cur.description] == columns
        rows = cur.fetchall()
        assert check(rows), rows


def _prepare(conn: psycopg.Connection, sql: str) -> bytes:
    name = f"surface_{abs(hash(sql))}".encode()
    result = conn.pgconn.prepare(name, sql.encode())
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
    return name


def test_metrics_json_is_of_f32_values(surface_conn: psycopg.Connection) -> None:
    (value,) = surface_conn.execute("SELECT pgml.sklearn_regression_metrics('{1,2,3}', '{1,2,4}')").fetchone() or ()
    assert json.loads(json.dumps(value)) == value and all(isinstance(v, float) for v in value.values())
