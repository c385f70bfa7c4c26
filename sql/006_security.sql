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

-- Whether a project name or a model id is taken at all, whoever asks: lets the proxy answer 42501
-- ("permission denied for project …") instead of "does not exist" when a project is out of the caller's
-- reach. They reveal a yes/no only (a second project of a taken name could not be created anyway), never
-- a name or an owner.
CREATE OR REPLACE FUNCTION pgml.project_exists(project_name text) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT EXISTS (SELECT 1 FROM pgml.projects WHERE name = project_name) $$;
CREATE OR REPLACE FUNCTION pgml.model_exists(model_id bigint) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT EXISTS (SELECT 1 FROM pgml.models WHERE id = model_id) $$;

-- Ids come from the tables' own sequences. Without this check a role could insert (or move its own rows
-- to) ids the sequences will hand out later, and every other role's training would fail on the primary
-- key. The registry owner (restores, migrations) and superusers are exempt.
CREATE OR REPLACE FUNCTION pgml.check_drawn_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id > coalesce(pg_sequence_last_value(
            pg_get_serial_sequence(format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), 'id')::regclass), 0)
       AND NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER') THEN
        RAISE EXCEPTION 'id % of pgml.% was not drawn from its sequence', NEW.id, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege', HINT = 'Leave id to its default.';
    END IF;
    RETURN NEW;
END $$;
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['projects', 'snapshots', 'models', 'files', 'deployments', 'logs'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I_drawn_id ON pgml.%I', t, t);
        EXECUTE format('CREATE TRIGGER %I_drawn_id BEFORE INSERT OR UPDATE OF id ON pgml.%I '
                       'FOR EACH ROW EXECUTE FUNCTION pgml.check_drawn_id()', t, t);
    END LOOP;
END $$;

-- Artifacts stored before signing existed: the only unsigned ones `pgml-proxy resign --trust-unsigned`
-- may sign (after an administrator checked them). Rows any role writes later are never on this list.
-- No grants: only the registry owner reads or changes it.
CREATE TABLE IF NOT EXISTS pgml.unsigned_artifacts (
    model_id bigint NOT NULL,
    path text NOT NULL,
    PRIMARY KEY (model_id, path)
);
INSERT INTO pgml.unsigned_artifacts (model_id, path)
SELECT DISTINCT model_id, path FROM pgml.files WHERE signature IS NULL ON CONFLICT DO NOTHING;
REVOKE ALL ON pgml.unsigned_artifacts FROM PUBLIC;

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
