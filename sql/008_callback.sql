-- pgml-proxy schema, migration 008: callback mode, and PostgresML's volatility and strictness.
--
-- The stubs (003, 007) answer 0A000 when a statement reaches them without the proxy: a view, a trigger,
-- a generated column, a SQL function, a DO block, a pg_cron job, a direct connection. In callback mode
-- (pgml.callback_enable, run by `pgml-proxy init --callback …`) each stub calls pgml-proxy instead, through
-- dblink, with its arguments as constants, and returns the proxy's answer with its declared types.
--
-- Which functions are stubs is read from the catalogue (their bodies call pgml._proxy_only or
-- pgml._callback_connection); pgml._callback_refresh writes every stub's body for the current mode from
-- its own declaration (arguments, result columns, volatility). A later migration that replaces a stub
-- ends with `SELECT pgml._callback_refresh();`.
--
-- The callback runs on a connection of its own (one per backend and role, opened on first use and kept),
-- so in a transaction of its own: what it writes (train's registry rows) commits even when the caller's
-- transaction rolls back, and it sees only what is committed. Statements of a callback session carry
-- pgml_proxy.callback = on (the foreign server's libpq options reach the upstream backend through the
-- proxy): a stub run inside one raises instead of calling back again.

CREATE OR REPLACE FUNCTION pgml._proxy_only(name text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgml.%() is evaluated by pgml-proxy', name
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Connect through pgml-proxy (not directly to the database) to use the pgml.* ML functions, '
                     'or let the database call pgml-proxy itself from views, functions, triggers and generated '
                     'columns: pgml-proxy init --callback ''host=… port=… dbname=…'' (README: Callback mode).';
END $$;

-- PostgresML's declarations: inference IMMUTABLE STRICT PARALLEL SAFE (so a generated column or an index
-- expression may call it), training, deployment and datasets volatile; snapshot strict.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS proc, v.attributes
        FROM pg_catalog.pg_proc p
        JOIN (VALUES
            ('embed', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('transform', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('transform_stream', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('chunk', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('rank', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('predict', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('predict_proba', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('predict_joint', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('predict_batch', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('decompose', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('generate', 'IMMUTABLE STRICT PARALLEL SAFE'),
            ('snapshot', 'VOLATILE STRICT PARALLEL UNSAFE'),
            ('train', 'VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE'),
            ('train_joint', 'VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE'),
            ('tune', 'VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE'),
            ('deploy', 'VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE'),
            ('load_dataset', 'VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE'),
            ('version', 'VOLATILE CALLED ON NULL INPUT PARALLEL SAFE')
        ) AS v(name, attributes) ON v.name = p.proname
        WHERE p.pronamespace = 'pgml'::regnamespace AND p.prosrc LIKE '%pgml.\_proxy\_only(%'
    LOOP
        EXECUTE format('ALTER FUNCTION %s %s', f.proc, f.attributes);
    END LOOP;
END
$$;

-- A type as the proxy reads it in a cast: qualified unless in pg_catalog (a polymorphic argument's
-- actual type, pg_typeof, at call time).
CREATE OR REPLACE FUNCTION pgml._callback_type(t regtype) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog
    AS $$ SELECT pg_catalog.format_type(t, NULL) $$;

-- The body of one stub: 0A000 without callbacks, else the dblink call of the proxy.
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
                  CASE WHEN p.proretset THEN '*' ELSE 't.r' END, dblink_schema, p.proname, call,
                  CASE WHEN p.pronargs > 0 THEN ', ' || array_to_string(refs, ', ') ELSE '' END,
                  (SELECT string_agg(format('%I %s', c, types[n]), ', ' ORDER BY n)
                     FROM unnest(names) WITH ORDINALITY AS u(c, n)));
END $$;

-- Every stub's body for the current mode: callbacks when dblink is installed and the foreign server
-- pgml_callback exists (pgml.callback_enable), else 0A000. Volatility, strictness and parallel safety are
-- kept from each function's declaration.
CREATE OR REPLACE FUNCTION pgml._callback_refresh() RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    dblink_schema text;
    f record;
BEGIN
    SELECT n.nspname INTO dblink_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink'
       AND EXISTS (SELECT FROM pg_foreign_server WHERE srvname = 'pgml_callback');
    IF dblink_schema IS NOT NULL THEN
        EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgml._callback_connection(fn text) RETURNS text LANGUAGE plpgsql AS $body$
DECLARE
    conn text := 'pgml_callback_' || (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user);
BEGIN
    IF pg_catalog.current_setting('pgml_proxy.callback', true) = 'on' THEN
        RAISE EXCEPTION 'pgml.%%() cannot call pgml-proxy back from inside a callback', fn
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'This statement runs for a pgml-proxy callback: a pgml function it reaches (in a view, '
                           'a function, a trigger) would call the proxy again, without end.',
                  HINT = 'Compute such values through pgml-proxy first (into a table), or read the relation '
                         'through pgml-proxy, which evaluates the pgml calls it sees.';
    END IF;
    IF conn = ANY (%1$I.dblink_get_connections()) THEN
        -- The last call on it failed (its proxy may have restarted): open it again.
        IF %1$I.dblink_error_message(conn) = 'OK' THEN
            RETURN conn;
        END IF;
        PERFORM %1$I.dblink_disconnect(conn);
    END IF;
    PERFORM %1$I.dblink_connect(conn, 'pgml_callback');
    RETURN conn;
END $body$;
$f$, dblink_schema);
    END IF;
    FOR f IN
        SELECT p.oid, p.proname, pg_get_function_arguments(p.oid) AS args, pg_get_function_result(p.oid) AS result,
               CASE p.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END
               || CASE WHEN p.proisstrict THEN ' STRICT' ELSE '' END
               || CASE p.proparallel WHEN 's' THEN ' PARALLEL SAFE' WHEN 'r' THEN ' PARALLEL RESTRICTED'
                                     ELSE ' PARALLEL UNSAFE' END AS attributes
        FROM pg_proc p
        WHERE p.pronamespace = 'pgml'::regnamespace AND p.proname !~ '^_'
          AND (p.prosrc LIKE '%pgml.\_proxy\_only(%' OR p.prosrc LIKE '%pgml.\_callback\_connection(%')
    LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION pgml.%I(%s) RETURNS %s LANGUAGE sql %s AS %L',
                       f.proname, f.args, f.result, f.attributes, pgml._callback_body(f.oid, dblink_schema));
    END LOOP;
END $$;

-- Callback mode on: dblink (created when missing and allowed), the foreign server pgml_callback for the
-- proxy at `target` (libpq keywords -> values, no user or password), its user mapping FOR PUBLIC as
-- `username` (replaced when given; roles may add their own: CREATE USER MAPPING FOR alice SERVER
-- pgml_callback OPTIONS (user 'alice', password '…')), then every stub's body. Run again to change them.
CREATE OR REPLACE FUNCTION pgml.callback_enable(target jsonb, username text DEFAULT NULL, password text DEFAULT NULL)
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    options jsonb;
    present text[];
    changes text;
BEGIN
    IF target ?| ARRAY['user', 'password'] THEN
        RAISE EXCEPTION 'the callback target names no user or password'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The role and its password go in the user mapping.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'dblink') THEN
        BEGIN
            CREATE EXTENSION dblink;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'callback mode needs the dblink extension, which role % may not create', current_user
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'A superuser (on a managed service: its administrator role, e.g. rds_superuser) '
                                 'runs CREATE EXTENSION dblink in this database once; then set up callbacks again.';
            WHEN undefined_file OR feature_not_supported THEN
                RAISE EXCEPTION 'callback mode needs the dblink extension, which this PostgreSQL server lacks'
                    USING ERRCODE = 'feature_not_supported',
                          HINT = 'Install PostgreSQL''s contrib modules on the server (Debian: postgresql-<version>, '
                                 'RPM: postgresql<version>-contrib); managed services ship dblink.';
        END;
    END IF;
    options := target || jsonb_build_object(
        'dbname', coalesce(target->>'dbname', pg_catalog.current_database()),
        'application_name', coalesce(target->>'application_name', 'pgml-proxy callback'),
        'options', pg_catalog.btrim(concat(target->>'options', ' -c pgml_proxy.callback=on')));
    SELECT array_agg(pg_catalog.split_part(o, '=', 1)) INTO present
      FROM pg_catalog.pg_foreign_server s, unnest(s.srvoptions) AS o WHERE s.srvname = 'pgml_callback';
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_foreign_server WHERE srvname = 'pgml_callback') THEN
        EXECUTE format('CREATE SERVER pgml_callback FOREIGN DATA WRAPPER dblink_fdw OPTIONS (%s)',
                       (SELECT string_agg(format('%I %L', key, value), ', ') FROM jsonb_each_text(options)));
    ELSE
        SELECT string_agg(change, ', ') INTO changes FROM (
            SELECT format(CASE WHEN key = ANY (coalesce(present, '{}')) THEN 'SET %I %L' ELSE 'ADD %I %L' END,
                          key, value) AS change
              FROM jsonb_each_text(options)
            UNION ALL
            SELECT format('DROP %I', old) FROM unnest(present) AS old WHERE NOT options ? old) AS c;
        EXECUTE format('ALTER SERVER pgml_callback OPTIONS (%s)', changes);
    END IF;
    GRANT USAGE ON FOREIGN SERVER pgml_callback TO PUBLIC;
    IF username IS NOT NULL THEN
        IF EXISTS (SELECT FROM pg_catalog.pg_user_mappings WHERE srvname = 'pgml_callback' AND umuser = 0) THEN
            DROP USER MAPPING FOR PUBLIC SERVER pgml_callback;
        END IF;
        EXECUTE format('CREATE USER MAPPING FOR PUBLIC SERVER pgml_callback OPTIONS (%s)',
                       concat(format('user %L', username),
                              CASE WHEN password IS NOT NULL THEN format(', password %L', password) END));
    END IF;
    PERFORM pgml._callback_refresh();
END $$;

-- Callback mode off: the foreign server and its user mappings dropped, every stub back to 0A000.
CREATE OR REPLACE FUNCTION pgml.callback_disable() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DROP SERVER IF EXISTS pgml_callback CASCADE;
    PERFORM pgml._callback_refresh();
END $$;

REVOKE EXECUTE ON FUNCTION pgml.callback_enable(jsonb, text, text), pgml.callback_disable(),
    pgml._callback_refresh(), pgml._callback_body(oid, text) FROM PUBLIC;

SELECT pgml._callback_refresh();
