-- pgml-proxy schema, migration 009: the rest of PostgresML 2.10's SQL surface.
--
-- Stubs of the functions pgml-proxy evaluates (engine.api CATALOGUE): the engine's environment
-- (python_version, python_package_version, python_pip_freeze, validate_python_dependencies,
-- validate_shared_library, xgboost_version, clear_gpu_cache), the sklearn_* metric functions, and the
-- registry's dump_all / load_all (CSV files in a directory under [engine] data_dirs of the proxy host).
-- Plain SQL that needs no proxy: activate_venv (the engine's environment is fixed), auto_updated_at and
-- set_updated_at as PostgresML declares them, the pgml.status enum, and the vector helpers' parameter
-- names as PostgresML's (addend, subtahend — sic —, multiplicand, dividend), so named arguments work.

DO $$ BEGIN
    CREATE TYPE pgml.status AS ENUM ('in_progress', 'successful', 'failed');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

-- updated_at moves only when the row changed and the statement did not set updated_at itself.
CREATE OR REPLACE FUNCTION pgml.set_updated_at() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END $$;

-- The trigger <table>_auto_updated_at (BEFORE UPDATE, pgml.set_updated_at) on tbl, replaced when present.
CREATE OR REPLACE FUNCTION pgml.auto_updated_at(tbl regclass) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    trigger_name text := (SELECT relname FROM pg_catalog.pg_class WHERE oid = tbl) || '_auto_updated_at';
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', trigger_name, tbl);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION pgml.set_updated_at()',
                   trigger_name, tbl);
END $$;

CREATE OR REPLACE FUNCTION pgml.activate_venv(venv text) RETURNS boolean LANGUAGE plpgsql STRICT AS $$
BEGIN
    RAISE NOTICE 'pgml.activate_venv() has no effect: the environment of pgml-proxy''s engine is fixed'
        USING HINT = 'Install Python packages into the environment pgml-proxy runs in, and restart it; '
                     'pgml.python_pip_freeze() lists what it has.';
    RETURN false;
END $$;

-- Stubs, declared as 003 declares them (SQL bodies that raise 0A000 without the proxy; callback bodies
-- come from pgml._callback_refresh below).
DO $outer$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT * FROM (VALUES
        ('python_version', '', 'text', 'VOLATILE'),
        ('python_package_version', 'name text', 'text', 'VOLATILE STRICT'),
        ('python_pip_freeze', '', 'TABLE(package text)', 'VOLATILE'),
        ('validate_python_dependencies', '', 'boolean', 'IMMUTABLE PARALLEL SAFE'),
        ('validate_shared_library', '', 'void', 'VOLATILE'),
        ('xgboost_version', '', 'text', 'VOLATILE'),
        ('clear_gpu_cache', 'memory_usage real DEFAULT NULL', 'boolean', 'VOLATILE'),
        ('sklearn_f1_score', 'ground_truth real[], y_hat real[]', 'real', 'VOLATILE STRICT'),
        ('sklearn_r2_score', 'ground_truth real[], y_hat real[]', 'real', 'VOLATILE STRICT'),
        ('sklearn_regression_metrics', 'ground_truth real[], y_hat real[]', 'jsonb', 'VOLATILE STRICT'),
        ('sklearn_classification_metrics', 'ground_truth real[], y_hat real[], num_classes bigint', 'jsonb',
         'VOLATILE STRICT'),
        ('dump_all', 'path text', 'void', 'VOLATILE STRICT'),
        ('load_all', 'path text', 'void', 'VOLATILE STRICT')
    ) AS v(name, args, returns, attributes) LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION pgml.%I(%s) RETURNS %s LANGUAGE sql %s AS %L',
                       f.name, f.args, f.returns, f.attributes,
                       format('SELECT pgml._proxy_only(%L)::%s', f.name,
                              CASE WHEN f.returns LIKE 'TABLE(%' THEN 'text' ELSE f.returns END));
    END LOOP;
END
$outer$;

-- The vector helpers' second parameter as PostgresML names it. CREATE OR REPLACE cannot rename a
-- parameter: each function is dropped and created again, with the ones that call it (normalize_*,
-- distance_*). Where a user's object (a view, a function) depends on one of them, that element type's
-- helpers keep their old names, with a WARNING, and nothing of the user's is dropped.
DO $outer$
DECLARE
    t text;
    op record;
BEGIN
    FOREACH t IN ARRAY ARRAY['real', 'double precision'] LOOP
        BEGIN
            EXECUTE format('DROP FUNCTION IF EXISTS pgml.normalize_l1(%1$s[]), pgml.normalize_l2(%1$s[]),'
                           ' pgml.normalize_max(%1$s[]), pgml.distance_l1(%1$s[], %1$s[]),'
                           ' pgml.distance_l2(%1$s[], %1$s[])', t);
            FOR op IN SELECT * FROM (VALUES ('add', '+', 'addend'), ('subtract', '-', 'subtahend'),
                                            ('multiply', '*', 'multiplicand'), ('divide', '/', 'dividend'))
                                    AS o(name, sym, arg) LOOP
                EXECUTE format('DROP FUNCTION IF EXISTS pgml.%1$s(%2$s[], %2$s), pgml.%1$s(%2$s[], %2$s[])',
                               op.name, t);
                EXECUTE format($f$
                    CREATE FUNCTION pgml.%1$s(vector %2$s[], %4$s %2$s) RETURNS %2$s[]
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                    RETURN ARRAY(SELECT v %3$s %4$s FROM unnest(vector) WITH ORDINALITY AS u(v, i) ORDER BY i)
                $f$, op.name, t, op.sym, op.arg);
                EXECUTE format($f$
                    CREATE FUNCTION pgml.%1$s(vector %2$s[], %4$s %2$s[]) RETURNS %2$s[]
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                    RETURN ARRAY(SELECT a %3$s b FROM unnest(vector, %4$s) WITH ORDINALITY AS u(a, b, i)
                                 WHERE i <= least(cardinality(vector), cardinality(%4$s)) ORDER BY i)
                $f$, op.name, t, op.sym, op.arg);
            END LOOP;
            FOREACH op.name IN ARRAY ARRAY['l1', 'l2', 'max'] LOOP
                EXECUTE format($f$
                    CREATE FUNCTION pgml.normalize_%1$s(vector %2$s[]) RETURNS %2$s[]
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                    RETURN pgml.divide(vector, pgml.norm_%1$s(vector))
                $f$, op.name, t);
            END LOOP;
            FOREACH op.name IN ARRAY ARRAY['l1', 'l2'] LOOP
                EXECUTE format($f$
                    CREATE FUNCTION pgml.distance_%1$s(vector %2$s[], other %2$s[]) RETURNS %2$s
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                    RETURN pgml.norm_%1$s(pgml.subtract(vector, other))
                $f$, op.name, t);
            END LOOP;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE WARNING 'the %[] vector helpers of pgml keep their old parameter names: objects depend on them', t
                USING DETAIL = SQLERRM,
                      HINT = 'Drop those objects, run this migration again (pgml-proxy init), and create them again.';
        END;
    END LOOP;
END
$outer$;

-- A void result comes back from a callback as text (a column definition list takes no pseudo-type);
-- otherwise as 008 declares it (CREATE OR REPLACE keeps its privileges: no one but the owner runs it).
CREATE OR REPLACE FUNCTION pgml._callback_body(f oid, dblink_schema text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
DECLARE
    p pg_proc;
    casts text[] := '{}';
    refs text[] := '{}';
    names text[];
    types text[];
    call text;
    i int;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = f;
    -- Result columns: TABLE(…) columns, else one column "r" of the result type.
    SELECT array_agg(coalesce(p.proargnames[n], 'r') ORDER BY n), array_agg(format_type(p.proallargtypes[n], NULL) ORDER BY n)
      INTO names, types
      FROM generate_subscripts(p.proargmodes, 1) AS n WHERE p.proargmodes[n] = 't';
    IF names IS NULL THEN
        names := ARRAY['r'];
        types := ARRAY[format_type(p.prorettype, NULL)];
    END IF;
    IF dblink_schema IS NULL THEN
        RETURN format('SELECT pgml._proxy_only(%L)::%s', p.proname, types[1])
               || coalesce((SELECT string_agg(format(', NULL::%s', t), '' ORDER BY n)
                              FROM unnest(types[2:]) WITH ORDINALITY AS u(t, n)), '');
    END IF;
    FOR i IN 1 .. p.pronargs LOOP
        IF (SELECT typtype = 'p' FROM pg_type WHERE oid = p.proargtypes[i - 1]) THEN
            casts := casts || '%L::%s'::text;
            refs := refs || format('$%s, pgml._callback_type(pg_catalog.pg_typeof($%s))', i, i);
        ELSE
            casts := casts || format('%%L::%s', format_type(p.proargtypes[i - 1], NULL));
            refs := refs || format('$%s', i);
        END IF;
    END LOOP;
    call := format(CASE WHEN p.proretset THEN 'SELECT * FROM pgml.%I(%s)' ELSE 'SELECT pgml.%I(%s)' END,
                   p.proname, array_to_string(casts, ', '));
    RETURN format('SELECT %s FROM %I.dblink(pgml._callback_connection(%L), pg_catalog.format(%L%s)) AS t(%s)',
                  CASE WHEN p.proretset THEN '*' WHEN p.prorettype = 'void'::regtype THEN 't.r::void' ELSE 't.r' END,
                  dblink_schema, p.proname, call,
                  CASE WHEN p.pronargs > 0 THEN ', ' || array_to_string(refs, ', ') ELSE '' END,
                  (SELECT string_agg(format('%I %s', c, CASE WHEN types[n] = 'void' THEN 'text' ELSE types[n] END),
                                     ', ' ORDER BY n)
                     FROM unnest(names) WITH ORDINALITY AS u(c, n)));
END $$;

SELECT pgml._callback_refresh();
