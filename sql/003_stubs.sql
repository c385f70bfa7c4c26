-- pgml-proxy schema, migration 003: the signatures of every function pgml-proxy evaluates.
-- pgml-proxy rewrites calls to these before PostgreSQL runs a statement, so the bodies only run
-- when a client bypasses the proxy: they raise a clear 0A000 error. Their declared argument and
-- result types also let PostgreSQL describe statements that call them (ParameterDescription,
-- RowDescription for prepared statements).
CREATE OR REPLACE FUNCTION pgml._proxy_only(name text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgml.%() is evaluated by pgml-proxy', name
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Connect through pgml-proxy (not directly to the database) to use the pgml.* ML functions.';
END $$;

DO $outer$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT * FROM (VALUES
        ('version', '', 'text', NULL),
        ('embed', 'transformer text, "text" text, kwargs jsonb DEFAULT ''{}''', 'real[]', NULL),
        ('embed', 'transformer text, inputs text[], kwargs jsonb DEFAULT ''{}''', 'TABLE(embed real[])', 'pgml._proxy_only(%L)::real[]'),
        ('chunk', 'splitter text, "text" text, kwargs jsonb DEFAULT ''{}''', 'TABLE(chunk_index bigint, chunk text)', 'pgml._proxy_only(%L)::bigint, NULL::text'),
        ('transform', 'task jsonb, args jsonb DEFAULT ''{}'', inputs text[] DEFAULT ARRAY[]::text[], cache boolean DEFAULT false', 'jsonb', NULL),
        ('transform', 'task text, args jsonb DEFAULT ''{}'', inputs text[] DEFAULT ARRAY[]::text[], cache boolean DEFAULT false', 'jsonb', NULL),
        ('transform', 'task jsonb, args jsonb DEFAULT ''{}'', inputs jsonb[] DEFAULT ARRAY[]::jsonb[], cache boolean DEFAULT false', 'jsonb', NULL),
        ('transform', 'task text, args jsonb DEFAULT ''{}'', inputs jsonb[] DEFAULT ARRAY[]::jsonb[], cache boolean DEFAULT false', 'jsonb', NULL),
        ('transform_stream', 'task jsonb, args jsonb DEFAULT ''{}'', input text DEFAULT '''', cache boolean DEFAULT false', 'SETOF jsonb', NULL),
        ('transform_stream', 'task text, args jsonb DEFAULT ''{}'', input text DEFAULT '''', cache boolean DEFAULT false', 'SETOF jsonb', NULL),
        ('transform_stream', 'task jsonb, args jsonb DEFAULT ''{}'', inputs jsonb[] DEFAULT ARRAY[]::jsonb[], cache boolean DEFAULT false', 'SETOF jsonb', NULL),
        ('transform_stream', 'task text, args jsonb DEFAULT ''{}'', inputs jsonb[] DEFAULT ARRAY[]::jsonb[], cache boolean DEFAULT false', 'SETOF jsonb', NULL),
        ('rank', 'transformer text, query text, documents text[], kwargs jsonb DEFAULT ''{}''', 'TABLE(corpus_id bigint, score double precision, "text" text)', 'pgml._proxy_only(%L)::bigint, NULL::float8, NULL::text'),
        ('train', 'project_name text, task text DEFAULT NULL, relation_name text DEFAULT NULL, y_column_name text DEFAULT NULL, algorithm pgml.algorithm DEFAULT ''linear'', hyperparams jsonb DEFAULT ''{}'', search pgml.search DEFAULT NULL, search_params jsonb DEFAULT ''{}'', search_args jsonb DEFAULT ''{}'', test_size real DEFAULT 0.25, test_sampling pgml.sampling DEFAULT ''stratified'', runtime pgml.runtime DEFAULT NULL, automatic_deploy boolean DEFAULT true, materialize_snapshot boolean DEFAULT false, preprocess jsonb DEFAULT ''{}''', 'TABLE(project text, task text, algorithm text, deployed boolean)', 'pgml._proxy_only(%L), NULL::text, NULL::text, NULL::boolean'),
        ('train_joint', 'project_name text, task text DEFAULT NULL, relation_name text DEFAULT NULL, y_column_name text[] DEFAULT NULL, algorithm pgml.algorithm DEFAULT ''linear'', hyperparams jsonb DEFAULT ''{}'', search pgml.search DEFAULT NULL, search_params jsonb DEFAULT ''{}'', search_args jsonb DEFAULT ''{}'', test_size real DEFAULT 0.25, test_sampling pgml.sampling DEFAULT ''stratified'', runtime pgml.runtime DEFAULT NULL, automatic_deploy boolean DEFAULT true, materialize_snapshot boolean DEFAULT false, preprocess jsonb DEFAULT ''{}''', 'TABLE(project text, task text, algorithm text, deployed boolean)', 'pgml._proxy_only(%L), NULL::text, NULL::text, NULL::boolean'),
        ('snapshot', 'relation_name text, y_column_name text, test_size real DEFAULT 0.25, test_sampling pgml.sampling DEFAULT ''stratified'', preprocess jsonb DEFAULT ''{}''', 'TABLE(relation text, y_column_name text)', 'pgml._proxy_only(%L), NULL::text'),
        ('tune', 'project_name text, task text DEFAULT NULL, relation_name text DEFAULT NULL, y_column_name text DEFAULT NULL, model_name text DEFAULT NULL, hyperparams jsonb DEFAULT ''{}'', test_size real DEFAULT 0.25, test_sampling pgml.sampling DEFAULT ''stratified'', automatic_deploy boolean DEFAULT true, materialize_snapshot boolean DEFAULT false', 'TABLE(status text, task text, algorithm text, deployed boolean)', 'pgml._proxy_only(%L), NULL::text, NULL::text, NULL::boolean'),
        ('predict', 'project_name text, features real[]', 'real', NULL),
        ('predict', 'project_name text, features double precision[]', 'real', NULL),
        ('predict', 'project_name text, features smallint[]', 'real', NULL),
        ('predict', 'project_name text, features integer[]', 'real', NULL),
        ('predict', 'project_name text, features bigint[]', 'real', NULL),
        ('predict', 'project_name text, features boolean[]', 'real', NULL),
        ('predict', 'project_name text, "row" anyelement', 'real', NULL),
        ('predict', 'model_id bigint, features real[]', 'real', NULL),
        ('predict', 'model_id bigint, "row" anyelement', 'real', NULL),
        ('predict_proba', 'project_name text, features real[]', 'real[]', NULL),
        ('predict_proba', 'model_id bigint, features real[]', 'real[]', NULL),
        ('predict_joint', 'project_name text, features real[]', 'real[]', NULL),
        ('predict_joint', 'model_id bigint, features real[]', 'real[]', NULL),
        ('predict_batch', 'project_name text, features real[]', 'SETOF real', NULL),
        ('predict_batch', 'model_id bigint, features real[]', 'SETOF real', NULL),
        ('decompose', 'project_name text, vector real[]', 'real[]', NULL),
        ('generate', 'project_name text, inputs text, config jsonb DEFAULT ''{}''', 'text', NULL),
        ('generate', 'project_name text, inputs text[], config jsonb DEFAULT ''{}''', 'text[]', NULL),
        ('deploy', 'model_id bigint', 'TABLE(project text, strategy text, algorithm text)', 'pgml._proxy_only(%L), NULL::text, NULL::text'),
        ('deploy', 'project_name text, strategy pgml.strategy, algorithm pgml.algorithm DEFAULT NULL', 'TABLE(project text, strategy text, algorithm text)', 'pgml._proxy_only(%L), NULL::text, NULL::text'),
        ('load_dataset', 'source text, subset text DEFAULT NULL, "limit" bigint DEFAULT NULL, kwargs jsonb DEFAULT ''{}''', 'TABLE(table_name text, "rows" bigint)', 'pgml._proxy_only(%L), NULL::bigint')
    ) AS v(name, args, returns, select_list) LOOP
        -- SQL-language bodies: PL/pgSQL would reject an argument and a result column of the same name.
        EXECUTE format('CREATE OR REPLACE FUNCTION pgml.%I(%s) RETURNS %s LANGUAGE sql AS %L',
                       f.name, f.args, f.returns,
                       'SELECT ' || format(coalesce(f.select_list,
                           'pgml._proxy_only(%L)::' || regexp_replace(f.returns, '^SETOF ', '')), f.name));
    END LOOP;
END
$outer$;
