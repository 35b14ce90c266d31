-- lorag demo: what `make demo` runs against the local server.
\timing off
\pset footer off
DROP EXTENSION IF EXISTS lorag CASCADE;
DROP TABLE IF EXISTS items, docs, notes, manual_pages, manual;
CREATE EXTENSION lorag;

\echo '--- a pgvector-compatible vector column'
CREATE TABLE items (id bigserial PRIMARY KEY, name text, embedding vector(3));
INSERT INTO items (name, embedding) VALUES
    ('north', '[0,1,0]'), ('north-east', '[0.7,0.7,0]'), ('east', '[1,0,0]'),
    ('up', '[0,0,1]'), ('south-west', '[-0.7,-0.7,0]');

\echo '--- nearest neighbours of [0.9,0.4,0] by cosine distance (<=>), L2 (<->) and inner product (<#>)'
SELECT name, round((embedding <=> '[0.9,0.4,0]')::numeric, 4) AS cosine,
       round((embedding <-> '[0.9,0.4,0]')::numeric, 4) AS l2,
       round((embedding <#> '[0.9,0.4,0]')::numeric, 4) AS neg_inner
FROM items ORDER BY embedding <=> '[0.9,0.4,0]' LIMIT 3;

\echo '--- functions, arithmetic and aggregates'
SELECT vector_dims(embedding), vector_norm(embedding), l2_normalize(embedding + '[1,1,1]'),
       subvector(embedding, 1, 2)
FROM items WHERE name = 'north-east';
SELECT avg(embedding), sum(embedding) FROM items;

\echo '--- 20,000 random 384-dimension vectors, exact top-5 cosine search'
CREATE TABLE docs AS
SELECT i AS id, (SELECT array_agg(random() - 0.5) FROM generate_series(1, 384) WHERE i > 0)::vector(384) AS embedding
FROM generate_series(1, 20000) i;
\timing on
SELECT id, round((embedding <=> (SELECT embedding FROM docs WHERE id = 1))::numeric, 4) AS distance
FROM docs ORDER BY embedding <=> (SELECT embedding FROM docs WHERE id = 1) LIMIT 5;

\echo '--- the same search through an hnsw index'
SET maintenance_work_mem = '256MB';
CREATE INDEX docs_embedding_idx ON docs USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
SET hnsw.ef_search = 100;
SELECT id, round((embedding <=> (SELECT embedding FROM docs WHERE id = 1))::numeric, 4) AS distance
FROM docs ORDER BY embedding <=> (SELECT embedding FROM docs WHERE id = 1) LIMIT 5;
\timing off
EXPLAIN (COSTS OFF) SELECT id FROM docs ORDER BY embedding <=> (SELECT embedding FROM docs WHERE id = 1) LIMIT 5;
SELECT pg_size_pretty(pg_relation_size('docs_embedding_idx')) AS index_size,
       (SELECT count(*) FROM lorag.hnsw_check('docs_embedding_idx')) AS problems;

\echo '--- in-database embeddings (all-MiniLM-L6-v2 with candle) and semantic search'
CREATE TABLE notes (id serial PRIMARY KEY, content text, embedding vector(384));
INSERT INTO notes (content) VALUES
    ('A partial index covers only the rows that satisfy its WHERE predicate.'),
    ('VACUUM reclaims storage occupied by dead tuples.'),
    ('The wing stalls when the angle of attack exceeds its critical value.'),
    ('pg_dump extracts a PostgreSQL database into a script file.'),
    ('Boundary layer transition depends on the Reynolds number.');
\timing on
UPDATE notes SET embedding = embed(content);
\timing off
CREATE INDEX ON notes USING hnsw (embedding vector_cosine_ops);
SELECT id, content, round((embedding <=> q)::numeric, 3) AS distance
FROM notes, (SELECT embed('How do I back up my database?') AS q) query
ORDER BY embedding <=> q LIMIT 2;
SELECT idx, chunk FROM chunk('PostgreSQL is a relational database. It supports indexes, views and stored procedures. ' ||
                             'Extensions add new types and index methods. lorag is one of them.', 16, 4);

\echo '--- cross-encoder reranking (minilm-reranker, trained by make models, on ONNX Runtime)'
WITH d(docs) AS (SELECT ARRAY['VACUUM reclaims storage occupied by dead tuples.',
                              'pg_dump extracts a PostgreSQL database into a script file.',
                              'The wing stalls when the angle of attack exceeds its critical value.'])
SELECT r.idx, round(r.score::numeric, 3) AS score, d.docs[r.idx] AS document
FROM d, rerank('How do I back up my database?', d.docs) r;

\echo '--- text generation in the model worker (SmolLM2-135M-Instruct, candle)'
\timing on
SELECT generate('What is the capital of France?') AS answer;
\timing off

\echo '--- the PostgreSQL 15 manual (SQL command reference, postgresql-doc-15) as a RAG source'
\echo '    pages read and stripped of HTML in SQL, cut into chunks of 128 tokens, embedded, indexed'
\timing on
\ir manual.sql
\timing off

\echo '--- questions about PostgreSQL, answered from the manual: 50 candidates from the index, reranked,'
\echo '    the best 3 in the prompt: answer, source pages, time per stage'
\x on
SELECT q.question, r.answer,
       (SELECT string_agg(DISTINCT m.page, ', ') FROM jsonb_array_elements(r.sources) s JOIN manual m ON m.id = (s->>'key')::bigint) AS sources,
       r.timings
FROM (VALUES ('How do I create an index that covers only some rows of a table?'),
             ('How do I remove dead rows and reclaim the space they use?'),
             ('How do I add a column to an existing table?'),
             ('How do I copy the rows of a table into a CSV file?')) AS q(question),
     rag_answer_with_sources(q.question, 'manual', k => 3, max_tokens => 96, text_column => 'content') AS r;
\x off
SELECT mode, device, loaded_models, rerankers, pg_size_pretty(memory_bytes) AS memory, requests_served,
       round(batched_texts::numeric / nullif(batches, 0), 1) AS mean_embed_batch
FROM lorag.worker_status();

\echo '--- bad input is a clean ERROR with an SQLSTATE'
\set ON_ERROR_STOP 0
\set VERBOSITY verbose
SELECT '[1,2]'::vector <-> '[1,2,3]';
INSERT INTO items (name, embedding) VALUES ('bad', '[1,2]');
SELECT '[1,NaN]'::vector;
SELECT embed('hello', 'no-such-model');
SELECT rag_answer('', 'manual', text_column => 'content');
SELECT rag_answer('How?', 'manual', k => 0, text_column => 'content');
SELECT generate('hi', max_tokens => 100000);
DROP TABLE docs;
