-- pgml-proxy schema, migration 006: projects belong to roles, enforced by the server (row-level security);
-- explicit grants; signatures of model artifacts.
--
-- A project is owned by the role that created it (current_user, so `SET ROLE analysts` creates a group
-- project). Its snapshots, models, files, deployments and logs are visible and writable only to members
-- of the owner role (pg_has_role(owner, 'MEMBER')): sharing a project = granting its owner role.
-- The owner of the registry tables (the role that installed the schema: run `pgml-proxy init` as an
-- administrator) is not subject to these policies, as PostgreSQL's table owners never are; superusers
-- and BYPASSRLS roles neither.

-- Owners. regrole keeps the role's oid (a renamed role stays the owner); pg_has_role(oid) gives NULL,
-- not an error, for a dropped role, so such rows become invisible instead of breaking every read.
ALTER TABLE pgml.projects ADD COLUMN IF NOT EXISTS owner regrole;
ALTER TABLE pgml.snapshots ADD COLUMN IF NOT EXISTS owner regrole;
-- Existing rows: the schema owner owns them.
UPDATE pgml.projects SET owner = (SELECT nspowner FROM pg_namespace WHERE nspname = 'pgml')::regrole
WHERE owner IS NULL;
UPDATE pgml.snapshots SET owner = (SELECT nspowner FROM pg_namespace WHERE nspname = 'pgml')::regrole
WHERE owner IS NULL;
ALTER TABLE pgml.projects ALTER COLUMN owner SET DEFAULT to_regrole(quote_ident(current_user)),
    ALTER COLUMN owner SET NOT NULL;
ALTER TABLE pgml.snapshots ALTER COLUMN owner SET DEFAULT to_regrole(quote_ident(current_user)),
    ALTER COLUMN owner SET NOT NULL;

-- HMAC-SHA256 of an artifact (all parts of one path joined) and the model's identity, with the
-- proxy's key; kept on part 0. Artifacts without a valid one are never deserialized.
ALTER TABLE pgml.files ADD COLUMN IF NOT EXISTS signature bytea;

-- Row-level security. Policies of the dependent tables look through pgml.projects, whose own
-- policy then applies to the caller: a row is visible when its project is.
ALTER TABLE pgml.projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.snapshots ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.models ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.files ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.deployments ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.logs ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS project_member ON pgml.projects;
CREATE POLICY project_member ON pgml.projects
    USING (pg_has_role(owner::oid, 'MEMBER'))
    WITH CHECK (pg_has_role(owner::oid, 'MEMBER'));

DROP POLICY IF EXISTS snapshot_member ON pgml.snapshots;
CREATE POLICY snapshot_member ON pgml.snapshots
    USING (pg_has_role(owner::oid, 'MEMBER'))
    WITH CHECK (pg_has_role(owner::oid, 'MEMBER'));

DROP POLICY IF EXISTS model_member ON pgml.models;
CREATE POLICY model_member ON pgml.models
    USING (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = models.project_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = models.project_id)
                AND (models.snapshot_id IS NULL
                     OR EXISTS (SELECT 1 FROM pgml.snapshots s WHERE s.id = models.snapshot_id)));

DROP POLICY IF EXISTS file_member ON pgml.files;
CREATE POLICY file_member ON pgml.files
    USING (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = files.model_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = files.model_id));

DROP POLICY IF EXISTS deployment_member ON pgml.deployments;
CREATE POLICY deployment_member ON pgml.deployments
    USING (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = deployments.project_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgml.models m
                        WHERE m.id = deployments.model_id AND m.project_id = deployments.project_id));

DROP POLICY IF EXISTS log_member ON pgml.logs;
CREATE POLICY log_member ON pgml.logs
    USING (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = logs.project_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = logs.project_id));

-- The views read as the caller (PostgreSQL 15+), so the policies apply to them too.
ALTER VIEW pgml.overview SET (security_invoker = true);
ALTER VIEW pgml.trained_models SET (security_invoker = true);
ALTER VIEW pgml.deployed_models SET (security_invoker = true);

-- Who owns a project or a model, whoever asks: lets the proxy answer 42501 ("permission denied for
-- project …") instead of "does not exist" when a project is out of the caller's reach. Reveals only
-- that a name or id is taken (a second project of that name could not be created anyway).
CREATE OR REPLACE FUNCTION pgml.project_owner(project_name text) RETURNS regrole
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT owner FROM pgml.projects WHERE name = project_name $$;
CREATE OR REPLACE FUNCTION pgml.model_project(model_id bigint) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT p.name FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE m.id = model_id $$;

-- Grants: what the API needs, and nothing more. The schema owner keeps DDL (no CREATE on the schema
-- for PUBLIC: load_dataset and materialize_snapshot create tables in pgml, so a role needs
-- `GRANT CREATE ON SCHEMA pgml TO role` from an administrator for those two).
GRANT USAGE ON SCHEMA pgml TO PUBLIC;
GRANT SELECT ON pgml.schema_migrations TO PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON pgml.projects, pgml.snapshots, pgml.models, pgml.files, pgml.deployments, pgml.logs TO PUBLIC;
GRANT SELECT ON pgml.overview, pgml.trained_models, pgml.deployed_models TO PUBLIC;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgml TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgml TO PUBLIC;
