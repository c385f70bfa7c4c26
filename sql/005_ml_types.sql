-- pgml-proxy schema, migration 005: row types of the classical-ML functions called in a SELECT list,
-- and fewer predict stubs.
-- `SELECT pgml.train(...)` shows one composite value such as ("Breast Cancer",classification,xgboost,t).
DO $$ BEGIN
    CREATE TYPE pgml.train_result AS (project text, task text, algorithm text, deployed boolean);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.train_joint_result AS (project text, task text, algorithm text, deployed boolean);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.deploy_result AS (project text, strategy text, algorithm text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.load_dataset_result AS (table_name text, "rows" bigint);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.tune_result AS (status text, task text, algorithm text, deployed boolean);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.snapshot_result AS (relation text, y_column_name text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
-- The stubs only describe prepared statements to PostgreSQL (the proxy evaluates every overload).
-- With one array overload per key type, PostgreSQL resolves pgml.predict($1, $2) and
-- pgml.predict($1, ARRAY[1.5, 2]) unambiguously (as real[]); several array overloads next to
-- "row anyelement" made such statements fail with "function … is not unique". The proxy still
-- evaluates boolean[], integer[] … feature arrays and ROW(...) itself.
DROP FUNCTION IF EXISTS pgml.predict(text, double precision[]), pgml.predict(text, smallint[]),
    pgml.predict(text, integer[]), pgml.predict(text, bigint[]), pgml.predict(text, boolean[]),
    pgml.predict(text, anyelement), pgml.predict(bigint, anyelement);
