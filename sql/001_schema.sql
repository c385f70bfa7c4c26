-- pgml-proxy schema, migration 001: the PostgresML 2.10 registry (enums, tables, views).
-- Applied once per database by pgml-proxy (or `pgml-proxy init`); needs only CREATE on the database.
CREATE SCHEMA IF NOT EXISTS pgml;

DO $$ BEGIN
    CREATE TYPE pgml.task AS ENUM ('regression', 'classification', 'decomposition', 'clustering',
        'question_answering', 'summarization', 'translation', 'text_classification', 'text_generation',
        'text2text', 'embedding', 'text_pair_classification', 'conversation');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

DO $$ BEGIN
    CREATE TYPE pgml.algorithm AS ENUM ('linear', 'xgboost', 'xgboost_random_forest', 'svm', 'lasso',
        'elastic_net', 'ridge', 'kmeans', 'dbscan', 'knn', 'random_forest', 'least_angle', 'lasso_least_angle',
        'orthogonal_matching_pursuit', 'bayesian_ridge', 'automatic_relevance_determination',
        'stochastic_gradient_descent', 'perceptron', 'passive_aggressive', 'ransac', 'theil_sen', 'huber',
        'quantile', 'kernel_ridge', 'gaussian_process', 'nu_svm', 'ada_boost', 'bagging', 'extra_trees',
        'gradient_boosting_trees', 'hist_gradient_boosting', 'linear_svm', 'lightgbm', 'transformers',
        'affinity_propagation', 'birch', 'feature_agglomeration', 'mini_batch_kmeans', 'mean_shift', 'optics',
        'spectral', 'spectral_bi', 'spectral_co', 'catboost', 'pca');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

DO $$ BEGIN
    CREATE TYPE pgml.search AS ENUM ('grid', 'random');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.sampling AS ENUM ('random', 'last', 'stratified');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.strategy AS ENUM ('new_score', 'best_score', 'most_recent', 'rollback', 'specific');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.runtime AS ENUM ('python', 'rust', 'openai');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE OR REPLACE FUNCTION pgml.set_updated_at() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;

CREATE TABLE IF NOT EXISTS pgml.projects (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    task pgml.task NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX IF NOT EXISTS projects_name_idx ON pgml.projects (name);

CREATE TABLE IF NOT EXISTS pgml.snapshots (
    id bigserial PRIMARY KEY,
    relation_name text NOT NULL,
    y_column_name text[],
    test_size real NOT NULL,
    test_sampling pgml.sampling NOT NULL,
    status text NOT NULL,
    columns jsonb,
    analysis jsonb,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    materialized boolean DEFAULT false
);

CREATE TABLE IF NOT EXISTS pgml.models (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    snapshot_id bigint REFERENCES pgml.snapshots (id) ON DELETE SET NULL,
    num_features integer NOT NULL,
    algorithm text NOT NULL,
    runtime pgml.runtime DEFAULT 'python'::pgml.runtime,
    hyperparams jsonb NOT NULL,
    status text NOT NULL,
    metrics jsonb,
    search text,
    search_params jsonb NOT NULL,
    search_args jsonb NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS models_project_id_idx ON pgml.models (project_id);
CREATE INDEX IF NOT EXISTS models_snapshot_id_idx ON pgml.models (snapshot_id);

CREATE TABLE IF NOT EXISTS pgml.deployments (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    model_id bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    strategy pgml.strategy NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS deployments_project_id_created_at_idx ON pgml.deployments (project_id);
CREATE INDEX IF NOT EXISTS deployments_model_id_created_at_idx ON pgml.deployments (model_id);

CREATE TABLE IF NOT EXISTS pgml.files (
    id bigserial PRIMARY KEY,
    model_id bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    path text NOT NULL,
    part integer NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    data bytea NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS files_model_id_path_part_idx ON pgml.files (model_id, path, part);

CREATE TABLE IF NOT EXISTS pgml.logs (
    id serial PRIMARY KEY,
    model_id bigint,
    project_id bigint,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    logs jsonb
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['projects', 'snapshots', 'models', 'files'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I_auto_updated_at ON pgml.%I', t, t);
        EXECUTE format('CREATE TRIGGER %I_auto_updated_at BEFORE UPDATE ON pgml.%I '
                       'FOR EACH ROW EXECUTE FUNCTION pgml.set_updated_at()', t, t);
    END LOOP;
END $$;

CREATE OR REPLACE VIEW pgml.overview AS
SELECT p.name, d.created_at AS deployed_at, p.task, m.algorithm, m.runtime,
       s.relation_name, s.y_column_name, s.test_sampling, s.test_size
FROM pgml.projects p
JOIN pgml.models m ON p.id = m.project_id
JOIN pgml.deployments d ON d.project_id = p.id AND d.model_id = m.id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
ORDER BY d.created_at DESC;

CREATE OR REPLACE VIEW pgml.trained_models AS
SELECT m.id, p.name, p.task, m.algorithm, m.runtime, m.created_at, s.test_sampling, s.test_size,
       d.model_id IS NOT NULL AS deployed
FROM pgml.projects p
JOIN pgml.models m ON p.id = m.project_id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
LEFT JOIN (
    SELECT DISTINCT ON (project_id) project_id, model_id, created_at
    FROM pgml.deployments
    ORDER BY project_id, created_at DESC, id DESC
) d ON d.model_id = m.id
ORDER BY m.created_at DESC;

CREATE OR REPLACE VIEW pgml.deployed_models AS
SELECT m.id, p.name, p.task, m.algorithm, m.runtime, d.created_at AS deployed_at
FROM pgml.projects p
JOIN (
    SELECT DISTINCT ON (project_id) project_id, model_id, created_at
    FROM pgml.deployments
    ORDER BY project_id, created_at DESC, id DESC
) d ON d.project_id = p.id
JOIN pgml.models m ON m.id = d.model_id
ORDER BY p.name ASC;
