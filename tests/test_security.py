"""Projects belong to roles: row-level security on the registry, enforced by the server, seen through the proxy.

Non-superuser roles on the throwaway cluster (alice, bob, carol — a member of alice —, and a group role
``analysts`` with member dave) use the proxy as an application would. Every cross-project operation
answers 42501 naming the project or model, nothing of another role's project is readable or writable,
and sharing works through role membership.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors

from proxy import schema
from tests.conftest import Postgres, ProxyProcess, scratch_database

pytestmark = pytest.mark.pg_matrix


@dataclass(frozen=True)
class Roles:
    alice: str
    bob: str
    carol: str  # member of alice
    analysts: str  # a group role (NOLOGIN)
    dave: str  # member of analysts
    table: str  # readable by everyone


@pytest.fixture(scope="module")
def roles(pg: Postgres, proxy: ProxyProcess) -> Roles:
    tag = secrets.token_hex(3)
    r = Roles(*(f"sec_{name}_{tag}" for name in ("alice", "bob", "carol", "analysts", "dave")), f"sec_data_{tag}")
    with psycopg.connect(proxy.dsn(), autocommit=True) as admin:  # installs the schema (as the superuser) if needed
        admin.execute("SELECT pgml.version()")
        for role in (r.alice, r.bob, r.carol, r.dave):
            admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE ROLE {r.analysts} NOLOGIN")
        admin.execute(f"GRANT {r.alice} TO {r.carol}")
        admin.execute(f"GRANT {r.analysts} TO {r.dave}")
        admin.execute(f"CREATE TABLE {r.table} (f1 real, f2 real, label integer)")
        admin.execute(
            f"INSERT INTO {r.table} SELECT i, i % 7, (i % 2) FROM generate_series(1, 60) i"
        )
        admin.execute(f"GRANT SELECT ON {r.table} TO PUBLIC")
    return r


def connect(proxy: ProxyProcess, user: str) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user), autocommit=True)


def train(conn: psycopg.Connection, project: str, table: str) -> tuple[object, ...]:
    row = conn.execute(
        "SELECT * FROM pgml.train(%s, 'classification', %s, 'label', 'linear')", [project, table]
    ).fetchone()
    assert row is not None
    return tuple(row)


def value(conn: psycopg.Connection, sql: str, params: list[object] | None = None) -> object:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture(scope="module")
def alice_project(roles: Roles, proxy: ProxyProcess) -> tuple[str, int]:
    name = f"Alice {roles.alice}"
    with connect(proxy, roles.alice) as c:
        assert train(c, name, roles.table)[3] is True
        model_id = value(c, "SELECT m.id FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
                            " WHERE p.name = %s", [name])  # fmt: skip
        assert value(c, "SELECT owner::text FROM pgml.projects WHERE name = %s", [name]) == roles.alice
    assert isinstance(model_id, int)
    return name, model_id


def denied(conn: psycopg.Connection, sql: str, params: list[object] | None, needle: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute(sql, params)
    assert needle in str(info.value)
    assert value(conn, "SELECT 1") == 1  # the session goes on


def test_owner_predicts_and_others_get_42501(roles: Roles, proxy: ProxyProcess, alice_project: tuple[str, int]) -> None:
    name, model_id = alice_project
    with connect(proxy, roles.alice) as c:
        assert value(c, "SELECT pgml.predict(%s, ARRAY[3, 3])", [name]) in (0.0, 1.0)
    with connect(proxy, roles.bob) as c:
        denied(c, "SELECT pgml.predict(%s, ARRAY[3, 3])", [name], f'project "{name}"')
        denied(c, "SELECT pgml.predict(%s::bigint, ARRAY[3, 3])", [model_id], f"model {model_id}")
        denied(c, f"SELECT f1, pgml.predict(%s, ARRAY[f1, f2]) FROM {roles.table}", [name], f'project "{name}"')
        denied(c, "SELECT pgml.predict_proba(%s, ARRAY[3, 3])", [name], f'project "{name}"')
        denied(c, "SELECT * FROM pgml.deploy(%s, 'most_recent')", [name], f'project "{name}"')
        denied(c, "SELECT * FROM pgml.deploy(%s::bigint)", [model_id], f"model {model_id}")
        # A tuned-project name in pgml.transform follows the same rule (not a Hugging Face lookup).
        denied(c, "SELECT pgml.transform(jsonb_build_object('task', 'text-classification', 'model', %s::text),"
                  " inputs => ARRAY['x'])", [name], f'project "{name}"')  # fmt: skip


def test_other_role_cannot_train_into_the_project(
    roles: Roles, proxy: ProxyProcess, pg: Postgres, alice_project: tuple[str, int]
) -> None:
    name, _ = alice_project
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        before = value(admin, "SELECT count(*) FROM pgml.models")
    with connect(proxy, roles.bob) as c:
        denied(c, "SELECT * FROM pgml.train(%s, 'classification', %s, 'label')", [name, roles.table],
               f'project "{name}"')  # fmt: skip
        denied(c, "SELECT * FROM pgml.train(%s)", [name], f'project "{name}"')  # reuse of its snapshot
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        assert value(admin, "SELECT count(*) FROM pgml.models") == before


def test_registry_rows_are_invisible_and_unwritable(
    roles: Roles, proxy: ProxyProcess, pg: Postgres, alice_project: tuple[str, int]
) -> None:
    name, model_id = alice_project
    with connect(proxy, roles.bob) as c:
        for table in ("projects", "snapshots", "models", "files", "deployments", "logs"):
            assert value(c, f"SELECT count(*) FROM pgml.{table}") == 0, table
        for view in ("overview", "trained_models", "deployed_models"):
            assert value(c, f"SELECT count(*) FROM pgml.{view}") == 0, view
    # Planting rows in alice's project (bob cannot see its id; take it from the admin): the policies refuse them.
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        project_id = value(admin, "SELECT id FROM pgml.projects WHERE name = %s", [name])
        before = value(admin, "SELECT md5(string_agg(data::text, '' ORDER BY part)) FROM pgml.files"
                              " WHERE model_id = %s", [model_id])  # fmt: skip
    with connect(proxy, roles.bob) as c:
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(
                "INSERT INTO pgml.models (project_id, num_features, algorithm, hyperparams, status, search_params,"
                " search_args) VALUES (%s, 2, 'linear', '{}', 'successful', '{}', '{}')", [project_id]
            )
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("INSERT INTO pgml.files (model_id, path, part, data) VALUES (%s, 'estimator.skops', 1, 'x')",
                      [model_id])  # fmt: skip
        assert c.execute("UPDATE pgml.files SET data = 'x' WHERE model_id = %s", [model_id]).rowcount == 0
        assert c.execute("DELETE FROM pgml.deployments WHERE project_id = %s", [project_id]).rowcount == 0
        with pytest.raises(errors.InsufficientPrivilege):  # a project of someone else's name as owner
            c.execute("INSERT INTO pgml.projects (name, task, owner) VALUES ('planted', 'regression', %s::regrole)",
                      [roles.alice])  # fmt: skip
        # bob's own model, deployed into alice's project: refused
        assert train(c, f"Bob {roles.bob}", roles.table)[3] is True
        bob_model = value(c, "SELECT max(id) FROM pgml.models")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("INSERT INTO pgml.deployments (project_id, model_id, strategy) VALUES (%s, %s, 'specific')",
                      [project_id, bob_model])  # fmt: skip
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        after = value(admin, "SELECT md5(string_agg(data::text, '' ORDER BY part)) FROM pgml.files"
                             " WHERE model_id = %s", [model_id])  # fmt: skip
        assert after == before
        assert value(admin, "SELECT d.model_id FROM pgml.deployments d WHERE d.project_id = %s"
                            " ORDER BY d.id DESC LIMIT 1", [project_id]) == model_id  # fmt: skip


def test_sharing_through_role_membership(roles: Roles, proxy: ProxyProcess, alice_project: tuple[str, int]) -> None:
    name, model_id = alice_project
    with connect(proxy, roles.carol) as c:  # GRANT alice TO carol
        assert value(c, "SELECT pgml.predict(%s, ARRAY[3, 3])", [name]) in (0.0, 1.0)
        assert value(c, "SELECT count(*) FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
                        " WHERE p.name = %s", [name]) >= 1  # type: ignore[operator]  # fmt: skip
        row = c.execute("SELECT * FROM pgml.deploy(%s::bigint)", [model_id]).fetchone()
        assert row is not None and row[0] == name and row[1] == "specific"
        assert train(c, name, roles.table)[0] == name  # training into the shared project


def test_group_project(roles: Roles, proxy: ProxyProcess, pg: Postgres) -> None:
    name = f"Group {roles.analysts}"
    with connect(proxy, roles.dave) as c:
        c.execute(f"SET ROLE {roles.analysts}")
        assert train(c, name, roles.table)[3] is True
        assert value(c, "SELECT owner::text FROM pgml.projects WHERE name = %s", [name]) == roles.analysts
        c.execute("RESET ROLE")
        assert value(c, "SELECT pgml.predict(%s, ARRAY[1, 2])", [name]) in (0.0, 1.0)  # dave is a member
        train(c, name, roles.table)  # retrained as dave himself: the new snapshot still belongs to the group
        owners = c.execute("SELECT DISTINCT s.owner::text FROM pgml.snapshots s JOIN pgml.models m"
                           " ON m.snapshot_id = s.id JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = %s",
                           [name]).fetchall()  # fmt: skip
        assert owners == [(roles.analysts,)]
    with connect(proxy, roles.bob) as c:
        denied(c, "SELECT pgml.predict(%s, ARRAY[1, 2])", [name], f'project "{name}"')
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"GRANT {roles.analysts} TO {roles.bob}")
    try:
        with connect(proxy, roles.bob) as c:
            assert value(c, "SELECT pgml.predict(%s, ARRAY[1, 2])", [name]) in (0.0, 1.0)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"REVOKE {roles.analysts} FROM {roles.bob}")


def test_unknown_project_is_still_42704(roles: Roles, proxy: ProxyProcess) -> None:
    with connect(proxy, roles.bob) as c, pytest.raises(errors.UndefinedObject):
        c.execute("SELECT pgml.predict('no such project at all', ARRAY[1, 2])")


def test_snapshot_rows_of_others_are_not_reused(
    roles: Roles, proxy: ProxyProcess, alice_project: tuple[str, int]
) -> None:
    with connect(proxy, roles.bob) as c:
        assert value(c, "SELECT count(*) FROM pgml.snapshots WHERE owner::text <> %s", [roles.bob]) == 0
        # bob's own snapshot is his
        name = f"Bob snap {roles.bob}"
        train(c, name, roles.table)
        assert value(c, "SELECT count(*) FROM pgml.snapshots WHERE owner::text = %s", [roles.bob]) >= 1  # type: ignore[operator]
    with connect(proxy, roles.alice) as c:
        assert value(c, "SELECT count(*) FROM pgml.snapshots WHERE owner::text = %s", [roles.bob]) == 0


@pytest.fixture
def fresh_db(pg: Postgres) -> Iterator[str]:
    with scratch_database(pg, "sec_migrate") as name:
        yield pg.dsn(dbname=name)


def test_existing_projects_get_the_schema_owner(fresh_db: str) -> None:
    security = max(m.version for m in schema.migrations() if m.name == "security")
    before = schema.script({m.version for m in schema.migrations() if m.version >= security}, in_transaction=False)
    assert before is not None
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(before.encode())  # the schema as it was before this migration
        conn.execute("INSERT INTO pgml.projects (name, task) VALUES ('old project', 'regression')")
        conn.execute("INSERT INTO pgml.snapshots (relation_name, test_size, test_sampling, status)"
                     " VALUES ('t', 0.25, 'random', 'successful')")  # fmt: skip
    assert schema.init(fresh_db) >= 1
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        owner = value(conn, "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'pgml'")
        assert value(conn, "SELECT owner::text FROM pgml.projects WHERE name = 'old project'") == owner
        assert value(conn, "SELECT owner::text FROM pgml.snapshots") == owner
        assert value(conn, "SELECT relrowsecurity FROM pg_class WHERE oid = 'pgml.models'::regclass") is True



def test_ids_must_come_from_the_sequences(roles: Roles, proxy: ProxyProcess, pg: Postgres) -> None:
    """Pre-claiming future ids would make every other role's training fail on the primary key."""
    with connect(proxy, roles.bob) as c:
        train(c, f"Bob ids {roles.bob}", roles.table)
        mine = value(c, "SELECT max(id) FROM pgml.projects")
        with pytest.raises(errors.InsufficientPrivilege, match="not drawn from its sequence"):
            c.execute("INSERT INTO pgml.projects (id, name, task) VALUES (%s, 'claim', 'regression')",
                      [int(mine) + 1000])  # type: ignore[call-overload]  # fmt: skip
        with pytest.raises(errors.InsufficientPrivilege, match="not drawn from its sequence"):
            c.execute("UPDATE pgml.projects SET id = id + 1000 WHERE id = %s", [mine])
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("INSERT INTO pgml.logs (id, project_id, logs) VALUES (%s, %s, '{}')",
                      [10**9, mine])  # fmt: skip
        assert value(c, "SELECT pgml.project_exists('claim')") is False  # a yes/no, never a name or owner
    with connect(proxy, roles.alice) as c:  # the next ids are free for everyone
        assert train(c, f"Alice after {roles.alice}", roles.table)[3] is True


def test_a_project_named_like_a_model_does_not_hide_the_model(
    roles: Roles, proxy: ProxyProcess, alice_project: tuple[str, int]
) -> None:
    model = "sentence-transformers/all-MiniLM-L6-v2"  # served from [engine] model_dirs
    with connect(proxy, roles.bob) as c:
        c.execute("INSERT INTO pgml.projects (name, task) VALUES (%s, 'embedding')", [model])
    try:
        with connect(proxy, roles.alice) as c:
            out = value(c, "SELECT pgml.transform(jsonb_build_object('task', 'feature-extraction', 'model', %s::text),"
                           " inputs => ARRAY['hello'])", [model])  # fmt: skip
            assert isinstance(out, list) and out
    finally:
        with connect(proxy, roles.bob) as c:
            c.execute("DELETE FROM pgml.projects WHERE name = %s", [model])


def test_any_bytea_output(roles: Roles, proxy: ProxyProcess) -> None:
    name = f"Escaped {roles.alice}"  # a new model: its files are read (and verified) by this session
    with connect(proxy, roles.alice) as c:
        c.execute("SET bytea_output = escape")
        train(c, name, roles.table)
        assert value(c, "SELECT pgml.predict(%s, ARRAY[3, 3])", [name]) in (0.0, 1.0)
