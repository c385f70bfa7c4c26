-- pgml-proxy schema, migration 010: PostgresML's settings travel with each callback.
--
-- A callback runs on dblink's own connection (the user mapping's role), where the caller's SET, SET LOCAL,
-- set_config() and ALTER ROLE … SET are not seen. Each stub now reads pgml.huggingface_whitelist,
-- pgml.huggingface_trust_remote_code, pgml.huggingface_trust_remote_code_whitelist and pgml.omp_num_threads
-- in the caller's session (current_setting(name, true), unset: '') and sends them ahead of its call in the
-- same query string:
--   SET pgml.huggingface_whitelist TO '…'; … (all four); SELECT pgml.f(…)
-- All four, on every call, so nothing of an earlier caller's survives on the shared connection; quoted with
-- %L (they are the caller's text). SET, not SELECT set_config(): dblink checks every result set of a query
-- string against the stub's columns, and a SET has none. The proxy's callback guard accepts exactly these
-- leading statements (proxy/rewrite/callback_guard.py).

-- As 009 declares it, with the settings' statements ahead of the call (CREATE OR REPLACE keeps its
-- privileges: no one but the owner runs it).
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
    setting text;
    sets text[] := '{}';
    reads text[] := '{}';
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
    FOREACH setting IN ARRAY ARRAY['pgml.huggingface_whitelist', 'pgml.huggingface_trust_remote_code',
                                   'pgml.huggingface_trust_remote_code_whitelist', 'pgml.omp_num_threads'] LOOP
        sets := sets || format('SET %s TO %%L; ', setting);
        reads := reads || format('COALESCE(pg_catalog.current_setting(%L, true), %L)', setting, '');
    END LOOP;
    FOR i IN 1 .. p.pronargs LOOP
        IF (SELECT typtype = 'p' FROM pg_type WHERE oid = p.proargtypes[i - 1]) THEN
            casts := casts || '%L::%s'::text;
            refs := refs || format('$%s, pgml._callback_type(pg_catalog.pg_typeof($%s))', i, i);
        ELSE
            casts := casts || format('%%L::%s', format_type(p.proargtypes[i - 1], NULL));
            refs := refs || format('$%s', i);
        END IF;
    END LOOP;
    call := array_to_string(sets, '')
            || format(CASE WHEN p.proretset THEN 'SELECT * FROM pgml.%I(%s)' ELSE 'SELECT pgml.%I(%s)' END,
                      p.proname, array_to_string(casts, ', '));
    refs := reads || refs;
    RETURN format('SELECT %s FROM %I.dblink(pgml._callback_connection(%L), pg_catalog.format(%L%s)) AS t(%s)',
                  CASE WHEN p.proretset THEN '*' WHEN p.prorettype = 'void'::regtype THEN 't.r::void' ELSE 't.r' END,
                  dblink_schema, p.proname, call,
                  ', ' || array_to_string(refs, ', '),
                  (SELECT string_agg(format('%I %s', c, CASE WHEN types[n] = 'void' THEN 'text' ELSE types[n] END),
                                     ', ' ORDER BY n)
                     FROM unnest(names) WITH ORDINALITY AS u(c, n)));
END $$;

SELECT pgml._callback_refresh();
