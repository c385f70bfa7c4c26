-- Golden rewrites of calls with constant arguments (FakeEngine: embed -> {len(text), 0.5};
-- chunk -> one chunk per word; version -> 'v'). Blocks: "-- case: name", the input, "-- expect:", the output.

-- case: scalar embed keeps the column name
SELECT pgml.embed('m', 'abc');
-- expect:
SELECT CAST('{3,0.5}' AS real[]) AS embed

-- case: named kwargs and an explicit cast to vector
SELECT pgml.embed(transformer => 'm', text => 'hello', kwargs => '{"normalize_embeddings": true}')::vector AS v;
-- expect:
SELECT CAST(CAST('{5,0.5}' AS real[]) AS vector) AS v

-- case: in ORDER BY next to a column
SELECT id FROM docs ORDER BY emb <=> pgml.embed('m', 'query')::vector LIMIT 5;
-- expect:
SELECT id FROM docs ORDER BY emb <=> CAST(CAST('{5,0.5}' AS real[]) AS vector) LIMIT 5

-- case: in WHERE inside a CTE
WITH q AS (SELECT pgml.embed('m', 'ab') AS e) SELECT * FROM q WHERE pgml.embed('m', 'xyz') IS NOT NULL;
-- expect:
WITH q AS (SELECT CAST('{2,0.5}' AS real[]) AS e) SELECT * FROM q WHERE CAST('{3,0.5}' AS real[]) IS NOT NULL

-- case: INSERT ... VALUES and RETURNING
INSERT INTO docs (body, emb) VALUES ('a', pgml.embed('m', 'a')) RETURNING id;
-- expect:
INSERT INTO docs (body, emb) VALUES ('a', CAST('{1,0.5}' AS real[])) RETURNING id

-- case: UPDATE with a constant argument
UPDATE docs SET emb = pgml.embed('m', 'four') WHERE id = 1;
-- expect:
UPDATE docs SET emb = CAST('{4,0.5}' AS real[]) WHERE id = 1

-- case: set-returning embed in FROM keeps the column name embed
SELECT embed FROM pgml.embed('m', ARRAY['a', 'bb']);
-- expect:
SELECT embed FROM (SELECT CAST(u.c0 AS real[]) AS embed FROM ROWS FROM (pg_catalog.unnest(CAST('{"{1,0.5}","{2,0.5}"}' AS text[]))) WITH ORDINALITY AS u (c0, ord) ORDER BY u.ord) AS embed

-- case: chunk in FROM with an alias
SELECT c.chunk FROM pgml.chunk('character', 'x y') AS c;
-- expect:
SELECT c.chunk FROM (SELECT CAST(u.c0 AS bigint) AS chunk_index, CAST(u.c1 AS text) AS chunk FROM ROWS FROM (pg_catalog.unnest(CAST('{"1","2"}' AS text[])), pg_catalog.unnest(CAST('{"x","y"}' AS text[]))) WITH ORDINALITY AS u (c0, c1, ord) ORDER BY u.ord) AS c

-- case: chunk in the SELECT list becomes rows of type record, as the server types TABLE(…) functions
SELECT pgml.chunk('character', 'x y');
-- expect:
SELECT ROW(((pg_catalog.unnest(CAST('{"(\"1\",\"x\")","(\"2\",\"y\")"}' AS pgml.chunk_result[])))).chunk_index, ((pg_catalog.unnest(CAST('{"(\"1\",\"x\")","(\"2\",\"y\")"}' AS pgml.chunk_result[])))).chunk) AS chunk

-- case: version, and several statements in one string
SELECT pgml.version(); SELECT 1;
-- expect:
SELECT CAST('v' AS text) AS version; SELECT 1

-- case: a NULL argument gives NULL (STRICT)
SELECT pgml.embed('m', NULL);
-- expect:
SELECT CAST(NULL AS real[]) AS embed

-- case: quoting inside results
SELECT * FROM pgml.chunk('character', 'it''s "quoted" \ text');
-- expect:
SELECT * FROM (SELECT CAST(u.c0 AS bigint) AS chunk_index, CAST(u.c1 AS text) AS chunk FROM ROWS FROM (pg_catalog.unnest(CAST('{"1","2","3","4"}' AS text[])), pg_catalog.unnest(CAST('{"it''s","\"quoted\"","\\","text"}' AS text[]))) WITH ORDINALITY AS u (c0, c1, ord) ORDER BY u.ord) AS chunk
