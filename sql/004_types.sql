-- pgml-proxy schema, migration 004: row types of set-returning functions called in a SELECT list.
-- `SELECT pgml.chunk(...)` yields one composite value per chunk; the proxy produces them as these
-- types so that field access such as (chunk).chunk_index works.
DO $$ BEGIN
    CREATE TYPE pgml.chunk_result AS (chunk_index bigint, chunk text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE pgml.rank_result AS (corpus_id bigint, score double precision, "text" text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
