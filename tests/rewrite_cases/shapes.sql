-- Golden rewrites of the statement shapes real clients send (issue 10), constant arguments only
-- (FakeEngine of test_rewrite.py: embed -> {len(text), 0.5}; chunk -> one chunk per word; version -> 'v').

-- case: a call inside another call's arguments is evaluated first
SELECT pgml.embed('m', pgml.version());
-- expect:
SELECT CAST('{1,0.5}' AS real[]) AS embed

-- case: every row of a multi-row VALUES is rewritten
INSERT INTO docs (id, emb) VALUES (1, pgml.embed('m', 'a')), (2, pgml.embed('m', 'bb')), (3, pgml.embed('m', 'ccc'));
-- expect:
INSERT INTO docs (id, emb) VALUES (1, CAST('{1,0.5}' AS real[])), (2, CAST('{2,0.5}' AS real[])), (3, CAST('{3,0.5}' AS real[]))

-- case: a subscript keeps the function's column name
SELECT (pgml.embed('m', 'abc'))[1:1];
-- expect:
SELECT (CAST('{3,0.5}' AS real[]))[1:1] AS embed

-- case: a scalar call in FROM is a one-row relation named after the function
SELECT embed FROM pgml.embed('m', 'ab');
-- expect:
SELECT embed FROM (SELECT CAST('{2,0.5}' AS real[]) AS embed) AS embed

-- case: a scalar call in FROM with a table alias: the column takes the alias
SELECT e FROM pgml.embed('m', 'ab') AS e;
-- expect:
SELECT e FROM (SELECT CAST('{2,0.5}' AS real[]) AS e) AS e

-- case: a scalar call in FROM with a column alias
SELECT t.v FROM pgml.embed('m', 'ab') AS t (v);
-- expect:
SELECT t.v FROM (SELECT CAST('{2,0.5}' AS real[]) AS v) AS t

-- case: a row-returning call in FROM with column aliases and ordinality
SELECT * FROM pgml.chunk('character', 'x y') WITH ORDINALITY AS c (i, body, n);
-- expect:
SELECT * FROM (SELECT CAST(u.c0 AS bigint) AS i, CAST(u.c1 AS text) AS body, u.ord AS n FROM ROWS FROM (pg_catalog.unnest(CAST('{"1","2"}' AS text[])), pg_catalog.unnest(CAST('{"x","y"}' AS text[]))) WITH ORDINALITY AS u (c0, c1, ord) ORDER BY u.ord) AS c

-- case: field selection on a chunk keeps its row type
SELECT (pgml.chunk('character', 'x y')).chunk;
-- expect:
SELECT ((pg_catalog.unnest(CAST('{"(\"1\",\"x\")","(\"2\",\"y\")"}' AS pgml.chunk_result[])))).chunk AS chunk

-- case: inside a subquery the row type stays (no record cast)
SELECT (c).chunk_index FROM (SELECT pgml.chunk('character', 'x y') AS c) AS s;
-- expect:
SELECT ((c)).chunk_index FROM (SELECT pg_catalog.unnest(CAST('{"(\"1\",\"x\")","(\"2\",\"y\")"}' AS pgml.chunk_result[])) AS c) AS s

-- case: a cast chain through varchar folds (SQLAlchemy's cast(literal(s), JSONB))
SELECT pgml.embed('m', CAST('ab'::varchar AS text), CAST('{}'::varchar AS jsonb));
-- expect:
SELECT CAST('{2,0.5}' AS real[]) AS embed
