-- The SQL command reference of the PostgreSQL 15 manual (Debian's postgresql-doc-15) as a RAG
-- source: pages read and stripped of HTML in SQL, cut into chunks of 128 tokens, embedded, indexed.
-- Needs a superuser (pg_ls_dir, pg_read_file). Used by examples/demo.sql and benches/rag_bench.py.
DROP TABLE IF EXISTS manual_pages, manual;
CREATE TABLE manual_pages AS
SELECT f AS page, substring(h FROM '<title>([^<]*)</title>') AS title,
       btrim(regexp_replace(replace(replace(replace(replace(
           regexp_replace(regexp_replace(regexp_replace(regexp_replace(h,
               '<head>.*</head>', ' '), '<div class="navheader">.*?</div>', ' '), '<div class="navfooter">.*?</div>', ' '),
               '<[^>]+>', ' ', 'g'),
           '&lt;', '<'), '&gt;', '>'), '&nbsp;', ' '), '&amp;', '&'), '\s+', ' ', 'g')) AS body
FROM pg_ls_dir('/usr/share/doc/postgresql-doc-15/html') AS f,
     pg_read_file('/usr/share/doc/postgresql-doc-15/html/' || f) AS h
WHERE f LIKE 'sql-%.html';
CREATE TABLE manual (id bigserial PRIMARY KEY, page text, content text, embedding vector(384));
INSERT INTO manual (page, content)
SELECT p.page, p.title || ': ' || c.chunk FROM manual_pages p, chunk(p.body, 128, 16) c;
UPDATE manual SET embedding = embed(content);
CREATE INDEX ON manual USING hnsw (embedding vector_cosine_ops);
