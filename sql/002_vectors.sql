-- pgml-proxy schema, migration 002: PostgresML's vector helpers and aggregates as plain SQL.
-- They run inside PostgreSQL (no proxy round trip) and also work for clients that bypass the proxy.
-- Each exists for real[] and double precision[]; the result element type follows the input.
-- Like PostgresML: IMMUTABLE STRICT; element-wise operations on two vectors stop at the shorter one.
DO $outer$
DECLARE
    t text;
    op record;
BEGIN
    FOREACH t IN ARRAY ARRAY['real', 'double precision'] LOOP
        FOR op IN SELECT * FROM (VALUES ('add', '+'), ('subtract', '-'), ('multiply', '*'), ('divide', '/')) AS o(name, sym) LOOP
            EXECUTE format($f$
                CREATE OR REPLACE FUNCTION pgml.%1$s(vector %2$s[], scalar %2$s) RETURNS %2$s[]
                LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                RETURN ARRAY(SELECT v %3$s scalar FROM unnest(vector) WITH ORDINALITY AS u(v, i) ORDER BY i)
            $f$, op.name, t, op.sym);
            EXECUTE format($f$
                CREATE OR REPLACE FUNCTION pgml.%1$s(vector %2$s[], other %2$s[]) RETURNS %2$s[]
                LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                RETURN ARRAY(SELECT a %3$s b FROM unnest(vector, other) WITH ORDINALITY AS u(a, b, i)
                             WHERE i <= least(cardinality(vector), cardinality(other)) ORDER BY i)
            $f$, op.name, t, op.sym);
        END LOOP;

        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.norm_l0(vector %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (SELECT count(*) FILTER (WHERE v <> 0) FROM unnest(vector) AS u(v))::%1$s
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.norm_l1(vector %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (SELECT coalesce(sum(abs(v)), 0) FROM unnest(vector) AS u(v))::%1$s
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.norm_l2(vector %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (SELECT sqrt(coalesce(sum(v::float8 * v), 0)) FROM unnest(vector) AS u(v))::%1$s
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.norm_max(vector %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (SELECT coalesce(max(abs(v)), 0) FROM unnest(vector) AS u(v))::%1$s
        $f$, t);
        FOREACH op.name IN ARRAY ARRAY['l1', 'l2', 'max'] LOOP
            EXECUTE format($f$
                CREATE OR REPLACE FUNCTION pgml.normalize_%1$s(vector %2$s[]) RETURNS %2$s[]
                LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                RETURN pgml.divide(vector, pgml.norm_%1$s(vector))
            $f$, op.name, t);
        END LOOP;
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.distance_l1(vector %1$s[], other %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN pgml.norm_l1(pgml.subtract(vector, other))
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.distance_l2(vector %1$s[], other %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN pgml.norm_l2(pgml.subtract(vector, other))
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.dot_product(vector %1$s[], other %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (SELECT coalesce(sum(a::float8 * b), 0) FROM unnest(vector, other) WITH ORDINALITY AS u(a, b, i)
                    WHERE i <= least(cardinality(vector), cardinality(other)))::%1$s
        $f$, t);
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION pgml.cosine_similarity(vector %1$s[], other %1$s[]) RETURNS %1$s
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
            RETURN (pgml.dot_product(vector, other)::float8
                    / (pgml.norm_l2(vector)::float8 * pgml.norm_l2(other)::float8))::%1$s
        $f$, t);

        -- Element-wise aggregates: NULL rows skipped (strict transition), no rows -> empty array.
        FOR op IN SELECT * FROM (VALUES ('sum', 'a + b', 'v'), ('min', 'least(a, b)', 'v'),
                                        ('max', 'greatest(a, b)', 'v'), ('min_abs', 'least(abs(a), abs(b))', 'abs(v)'),
                                        ('max_abs', 'greatest(abs(a), abs(b))', 'abs(v)')) AS o(name, expr, first) LOOP
            EXECUTE format($f$
                CREATE OR REPLACE FUNCTION pgml._agg_%1$s(state %2$s[], value %2$s[]) RETURNS %2$s[]
                LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                RETURN CASE WHEN cardinality(state) = 0
                    THEN ARRAY(SELECT %4$s FROM unnest(value) WITH ORDINALITY AS u(v, i) ORDER BY i)
                    ELSE ARRAY(SELECT %3$s FROM unnest(state, value) WITH ORDINALITY AS u(a, b, i)
                               WHERE i <= least(cardinality(state), cardinality(value)) ORDER BY i) END
            $f$, op.name, t, op.expr, op.first);
            EXECUTE format('DROP AGGREGATE IF EXISTS pgml.%1$s(%2$s[])', op.name, t);
            EXECUTE format('CREATE AGGREGATE pgml.%1$s(%2$s[]) (SFUNC = pgml._agg_%1$s, STYPE = %2$s[], '
                           'INITCOND = ''{}'', PARALLEL = SAFE)', op.name, t);
        END LOOP;
    END LOOP;
END
$outer$;
