-- Generation and retrieval-augmented generation.
--
-- The retrieval half runs here, in the caller's backend and with the caller's privileges: the
-- source (a table or a view: views are how users filter) is read with ordinary SQL, so row
-- security and GRANTs apply. Only the model work (embedding the question, generating) goes to
-- the model worker.

CREATE FUNCTION lorag._generate(prompt text, max_tokens integer, temperature real, adapter text, model text,
                                system text, context text[], top_p real, seed bigint) RETURNS text[]
    AS 'MODULE_PATHNAME', 'lorag_generate' LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- generate(prompt) → the model's answer, with the chat template of the model's folder.
-- temperature 0 is greedy; otherwise top-p sampling, repeatable with seed.
CREATE FUNCTION generate(prompt text, max_tokens integer DEFAULT 256, temperature real DEFAULT 0,
                         adapter text DEFAULT NULL, model text DEFAULT NULL, system text DEFAULT NULL,
                         top_p real DEFAULT 0.9, seed bigint DEFAULT 0)
RETURNS text LANGUAGE sql VOLATILE PARALLEL RESTRICTED AS $$
    SELECT (lorag._generate(prompt, max_tokens, temperature, adapter, model, system, NULL, top_p, seed))[1]
$$;

-- The source's column for a role ('text' or 'vector'): the one named, else the only one.
CREATE FUNCTION lorag._rag_pick(source regclass, role text, present name[], named name, missing_hint text)
RETURNS name LANGUAGE plpgsql STABLE AS $$
DECLARE
    purpose text := CASE role WHEN 'text' THEN 'holding the passages' ELSE 'to search' END;
BEGIN
    IF named IS NOT NULL THEN
        IF NOT named = ANY (coalesce(present, '{}')) THEN
            RAISE EXCEPTION '% has no % column "%"', source, role, named
                USING ERRCODE = '42703', HINT = format('Its %s columns: %s.', role, coalesce(array_to_string(present, ', '), 'none'));
        END IF;
        RETURN named;
    ELSIF coalesce(cardinality(present), 0) = 0 THEN
        RAISE EXCEPTION '% has no % column %', source, role, CASE role WHEN 'text' THEN 'to answer from' ELSE 'to search' END
            USING ERRCODE = '42703', HINT = missing_hint;
    ELSIF cardinality(present) > 1 THEN
        RAISE EXCEPTION '% has several % columns (%)', source, role, array_to_string(present, ', ')
            USING ERRCODE = '42702', HINT = format('Name the one %s, e.g. %s_column => %L.', purpose, role, present[1]);
    END IF;
    RETURN present[1];
END $$;

-- The source's columns whose type is one of typnames, in column order (NULL when none).
CREATE FUNCTION lorag._typed_columns(source regclass, typnames text[]) RETURNS name[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(a.attname ORDER BY a.attnum)
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped AND t.typname = ANY (typnames)
$$;

-- The text, vector and key columns of a RAG source: named, or found when there is one of each.
CREATE FUNCTION lorag._rag_columns(source regclass, text_column name, vector_column name,
                                   OUT tcol name, OUT vcol name, OUT key_expr text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    texts name[];
    vectors name[];
    pk name[];
BEGIN
    texts := lorag._typed_columns(source, '{text,varchar,bpchar}');
    vectors := lorag._typed_columns(source, '{vector}');
    tcol := lorag._rag_pick(source, 'text', texts, text_column,
                            'Use a table or view with a text column holding the passages.');
    vcol := lorag._rag_pick(source, 'vector', vectors, vector_column,
                            format('Add one: ALTER TABLE %s ADD COLUMN embedding vector(384); UPDATE %s SET embedding = embed(%I);',
                                   source, source, tcol));
    -- the key: a one-column primary key, else a column named id, else none
    SELECT array_agg(a.attname) INTO pk
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = source AND i.indisprimary;
    IF cardinality(pk) = 1 THEN
        key_expr := format('%I::text', pk[1]);
    ELSIF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = source AND attname = 'id' AND attnum > 0 AND NOT attisdropped) THEN
        key_expr := 'id::text';
    ELSE
        key_expr := 'NULL::text';
    END IF;
END $$;

CREATE FUNCTION lorag._rag_check(question text, k integer, candidates integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF question IS NULL OR btrim(question) = '' THEN
        RAISE EXCEPTION 'the question is empty'
            USING ERRCODE = '22023', HINT = 'Ask something, e.g. rag_answer(''How do I create a partial index?'', ''docs'').';
    END IF;
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'k must be at least 1, got %', coalesce(k::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'k is how many passages go into the prompt; 3 is the default.';
    END IF;
    IF candidates IS NULL OR candidates < k THEN
        RAISE EXCEPTION 'candidates (%) must be at least k (%)', coalesce(candidates::text, 'NULL'), k
            USING ERRCODE = '22023', HINT = 'candidates is how many rows the vector search returns before the best k are kept.';
    END IF;
END $$;

-- The nearest rows of source to the vector q (the hnsw index serves the ORDER BY ... LIMIT).
CREATE FUNCTION lorag._rag_search(q vector, source regclass, k integer, candidates integer,
                                  text_column name, vector_column name)
RETURNS TABLE (rank integer, key text, content text, distance real, rerank_score real)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    c record;
BEGIN
    c := lorag._rag_columns(source, text_column, vector_column);
    RETURN QUERY EXECUTE format(
        'SELECT (row_number() OVER (ORDER BY d))::integer, key, content, d::real, NULL::real
           FROM (SELECT %s AS key, %I::text AS content, %I <=> $1 AS d
                   FROM %s WHERE %I IS NOT NULL AND %I IS NOT NULL
                  ORDER BY %I <=> $1 LIMIT $2) s
          ORDER BY d LIMIT $3',
        c.key_expr, c.tcol, c.vcol, source, c.vcol, c.tcol, c.vcol)
    USING q, candidates, k;
END $$;

-- Which reranker a RAG call uses: the one named, else lorag.reranker_model; none when rerank is
-- false or the setting is empty.
CREATE FUNCTION lorag._rag_reranker(rerank boolean, reranker text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN rerank IS DISTINCT FROM false
                THEN coalesce(reranker, nullif(current_setting('lorag.reranker_model', true), '')) END
$$;

-- candidates (the search's rows, nearest first) rescored by the cross-encoder reranker against
-- the question; the best k. Both scores count: candidates are ranked by
--   w · z(rerank score) + (1 − w) · z(cosine similarity),   w = lorag.rerank_weight (0.5),
-- each score standardised over the candidates (a cross-encoder trained on little data knows less
-- than the embedder about what it was not trained on; on Cranfield's held-out queries the fused
-- order beats either alone). w = 1 ranks by the cross-encoder alone.
CREATE FUNCTION lorag._rag_rerank(question text, keys text[], contents text[], distances real[],
                                  k integer, reranker text)
RETURNS TABLE (rank integer, key text, content text, distance real, rerank_score real)
LANGUAGE sql STABLE AS $$
    WITH scored AS (
        SELECT r.idx, r.score, 1 - distances[r.idx] AS similarity,
               coalesce(nullif(current_setting('lorag.rerank_weight', true), ''), '0.5')::float8 AS w
          FROM rerank(question, contents, reranker) r
    ), fused AS (
        SELECT idx, score,
               w * coalesce((score - avg(score) OVER ()) / nullif(stddev_pop(score) OVER (), 0), 0)
               + (1 - w) * coalesce((similarity - avg(similarity) OVER ()) / nullif(stddev_pop(similarity) OVER (), 0), 0) AS f
          FROM scored
    )
    SELECT (row_number() OVER (ORDER BY f DESC, idx))::integer, keys[idx], contents[idx], distances[idx], score
      FROM fused
     ORDER BY f DESC, idx
     LIMIT k
$$;

-- The rows an answer would use: key, text, cosine distance and rerank score. The vector search
-- returns `candidates` rows, the cross-encoder reranker (lorag.reranker_model, or `reranker`)
-- rescores them and the best k by both scores are kept (lorag.rerank_weight, _rag_rerank); with rerank => false (or no reranker set) the k nearest rows are kept and
-- rerank_score is NULL.
CREATE FUNCTION rag_retrieve(question text, source regclass, k integer DEFAULT 3, candidates integer DEFAULT 50,
                             text_column name DEFAULT NULL, vector_column name DEFAULT NULL,
                             embedding_model text DEFAULT NULL, rerank boolean DEFAULT true,
                             reranker text DEFAULT NULL)
RETURNS TABLE (rank integer, key text, content text, distance real, rerank_score real)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    model text := lorag._rag_reranker(rerank, reranker);
    keys text[];
    contents text[];
    distances real[];
BEGIN
    PERFORM lorag._rag_check(question, k, candidates);
    IF model IS NULL THEN
        RETURN QUERY SELECT * FROM lorag._rag_search(embed(question, embedding_model), source, k, candidates,
                                                     text_column, vector_column);
        RETURN;
    END IF;
    SELECT array_agg(s.key ORDER BY s.rank), array_agg(s.content ORDER BY s.rank), array_agg(s.distance ORDER BY s.rank)
      INTO keys, contents, distances
      FROM lorag._rag_search(embed(question, embedding_model), source, candidates, candidates,
                             text_column, vector_column) s;
    RETURN QUERY SELECT * FROM lorag._rag_rerank(question, keys, contents, distances, k, model);
END $$;

-- The answer, the sources it was given (rank, key, distance, text) and what each stage took.
CREATE FUNCTION rag_answer_with_sources(question text, source regclass, k integer DEFAULT 3,
                                        adapter text DEFAULT NULL, candidates integer DEFAULT 50,
                                        max_tokens integer DEFAULT 256, temperature real DEFAULT 0,
                                        text_column name DEFAULT NULL, vector_column name DEFAULT NULL,
                                        model text DEFAULT NULL, embedding_model text DEFAULT NULL,
                                        system text DEFAULT NULL, rerank boolean DEFAULT true,
                                        reranker text DEFAULT NULL)
RETURNS TABLE (answer text, sources jsonb, timings jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    t0 timestamptz;
    t1 timestamptz;
    t2 timestamptz;
    t3 timestamptz;
    q vector;
    found jsonb;
    passages text[];
    g text[];
    keys text[];
    contents text[];
    distances real[];
    scores real[];
    rr text := lorag._rag_reranker(rerank, reranker);
BEGIN
    PERFORM lorag._rag_check(question, k, candidates);
    t0 := clock_timestamp();
    q := embed(question, embedding_model);
    t1 := clock_timestamp();
    -- the search keeps `candidates` rows for the reranker, else the k nearest
    SELECT array_agg(s.key ORDER BY s.rank), array_agg(s.content ORDER BY s.rank), array_agg(s.distance ORDER BY s.rank)
      INTO keys, contents, distances
      FROM lorag._rag_search(q, source, CASE WHEN rr IS NULL THEN k ELSE candidates END, candidates,
                             text_column, vector_column) s;
    t2 := clock_timestamp();
    IF rr IS NOT NULL THEN
        SELECT array_agg(r.key ORDER BY r.rank), array_agg(r.content ORDER BY r.rank),
               array_agg(r.distance ORDER BY r.rank), array_agg(r.rerank_score ORDER BY r.rank)
          INTO keys, contents, distances, scores
          FROM lorag._rag_rerank(question, keys, contents, distances, k, rr) r;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('rank', i, 'key', keys[i], 'distance', distances[i],
                                                 'rerank_score', scores[i], 'content', contents[i]) ORDER BY i), '[]'),
           coalesce(array_agg(contents[i] ORDER BY i), '{}')
      INTO found, passages
      FROM generate_subscripts(keys, 1) i;
    t3 := clock_timestamp();
    IF cardinality(passages) = 0 THEN
        RAISE NOTICE '% has no rows with both text and a vector: there is nothing to answer from', source;
        answer := format('I cannot answer: %s has no rows to answer from.', source);
        sources := found;
        timings := jsonb_build_object('embed_ms', round(extract(epoch FROM t1 - t0) * 1000, 1),
                                      'search_ms', round(extract(epoch FROM t2 - t1) * 1000, 1),
                                      'rerank_ms', round(extract(epoch FROM t3 - t2) * 1000, 1));
        RETURN NEXT;
        RETURN;
    END IF;
    g := lorag._generate(question, max_tokens, temperature, adapter, model, system, passages, NULL, 0);
    IF g[4]::integer > 0 THEN
        RAISE NOTICE 'the retrieved passages were cut by % tokens to fit the model''s context window', g[4]
            USING HINT = 'Lower k or max_tokens, or store shorter chunks (chunk(text, 256, 32)).';
    END IF;
    answer := g[1];
    sources := found;
    timings := jsonb_build_object(
        'embed_ms', round(extract(epoch FROM t1 - t0) * 1000, 1),
        'search_ms', round(extract(epoch FROM t2 - t1) * 1000, 1),
        'rerank_ms', CASE WHEN rr IS NOT NULL THEN round(extract(epoch FROM t3 - t2) * 1000, 1) END,
        'reranker', rr,
        'generate_ms', round(extract(epoch FROM clock_timestamp() - t3) * 1000, 1),
        'time_to_first_token_ms', g[6]::numeric,
        'prompt_tokens', g[2]::integer, 'generated_tokens', g[3]::integer, 'finish_reason', g[5]);
    RETURN NEXT;
END $$;

-- rag_answer(question, source): embed the question, search source's vector column for
-- `candidates` rows, rerank them with the cross-encoder, put the best k in the prompt, generate.
CREATE FUNCTION rag_answer(question text, source regclass, k integer DEFAULT 3, adapter text DEFAULT NULL,
                           candidates integer DEFAULT 50, max_tokens integer DEFAULT 256,
                           temperature real DEFAULT 0, text_column name DEFAULT NULL,
                           vector_column name DEFAULT NULL, model text DEFAULT NULL,
                           embedding_model text DEFAULT NULL, system text DEFAULT NULL,
                           rerank boolean DEFAULT true, reranker text DEFAULT NULL)
RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT answer FROM rag_answer_with_sources(question, source, k, adapter, candidates, max_tokens, temperature,
                                               text_column, vector_column, model, embedding_model, system,
                                               rerank, reranker)
$$;
