-- pgml-proxy schema, migration 007: PostgresML's predict overloads, so PostgreSQL resolves statements the
-- way it resolves them against PostgresML itself (the proxy evaluates every overload; these stubs only let
-- the server parse and describe statements with parameters or columns).
--
-- Migration 005 dropped the typed feature-array overloads: with only array candidates, an untyped
-- parameter (pgml.predict($1, $2)) was ambiguous. A text overload (pgml.predict(project, inputs text) for
-- fine-tuned text classifiers) now takes untyped parameters (PostgreSQL prefers the string category for an
-- unknown argument), so the typed overloads come back: psycopg binds a list of floats as float8[], a list
-- of bools as bool[], JDBC setArray as the element's type, and those must match one exactly.
-- numeric[] is not one of PostgresML's overloads: it keeps ARRAY[1.5, 2] (numeric[], which casts implicitly
-- to real[] and double precision[] alike) unambiguous next to a parameter or a column.
-- ROW(…) features have no stub: PostgresML's "row anyelement" would also accept arrays and make every
-- ARRAY[…] argument ambiguous, and SQL functions cannot take "record" (the proxy evaluates ROW(…) itself).
DO $outer$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT * FROM (VALUES
        ('predict', 'project_name text, features double precision[]', 'real'),
        ('predict', 'project_name text, features smallint[]', 'real'),
        ('predict', 'project_name text, features integer[]', 'real'),
        ('predict', 'project_name text, features bigint[]', 'real'),
        ('predict', 'project_name text, features boolean[]', 'real'),
        ('predict', 'project_name text, features numeric[]', 'real'),
        ('predict', 'model_id bigint, features double precision[]', 'real'),
        ('predict', 'model_id bigint, features smallint[]', 'real'),
        ('predict', 'model_id bigint, features integer[]', 'real'),
        ('predict', 'model_id bigint, features bigint[]', 'real'),
        ('predict', 'model_id bigint, features boolean[]', 'real'),
        ('predict', 'model_id bigint, features numeric[]', 'real'),
        ('predict', 'project_name text, inputs text', 'jsonb'),
        ('predict', 'project_name text, inputs text[]', 'jsonb'),
        ('predict_proba', 'project_name text, inputs text', 'jsonb'),
        ('predict_proba', 'project_name text, inputs text[]', 'jsonb')
    ) AS v(name, args, returns) LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION pgml.%I(%s) RETURNS %s LANGUAGE sql AS %L',
                       f.name, f.args, f.returns, format('SELECT pgml._proxy_only(%L)::%s', f.name, f.returns));
    END LOOP;
END
$outer$;

-- pgml.embed(transformer, inputs text[]) returns SETOF real[] as in PostgresML (003 declared TABLE(embed
-- real[]), whose one OUT column would name the column "embed" even under a table alias: FROM pgml.embed(…) AS e
-- names it "e" in PostgresML, and in the proxy's own rewrite).
DO $$
BEGIN
    DROP FUNCTION IF EXISTS pgml.embed(text, text[], jsonb);
    CREATE FUNCTION pgml.embed(transformer text, inputs text[], kwargs jsonb DEFAULT '{}') RETURNS SETOF real[]
        LANGUAGE sql AS $body$ SELECT pgml._proxy_only('embed')::real[] $body$;
EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;  -- a view of the user's depends on the old stub: it stays (only its describe differs)
END
$$;
