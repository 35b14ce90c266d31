-- Training a cross-encoder reranker in the database.

CREATE FUNCTION lorag._train_reranker(name text, base_model text, queries text[], passages text[], labels real[],
                                      epochs integer, learning_rate float8, batch_size integer,
                                      max_tokens integer, seed bigint) RETURNS text[]
    AS 'MODULE_PATHNAME', 'lorag_train_reranker' LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION lorag._train_reranker(text, text, text[], text[], real[], integer, float8, integer, integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION lorag._train_reranker(text, text, text[], text[], real[], integer, float8, integer, integer, bigint) TO lorag_admin;

-- lorag.train_reranker(pairs, name): fine-tunes the encoder of base_model (a BERT sentence
-- embedder) with a classification head on pairs' (query, passage, label) rows — label 1 for
-- relevant, 0 for not (graded labels scaled to [0, 1]) — exports it to ONNX and registers it
-- as a reranker. It writes files under the data directory ($PGDATA/lorag_models/<name>), so
-- it is for superusers and lorag_admin. Training runs in this session; NOTICEs report progress
-- and cancel stops it after the current step.
CREATE FUNCTION lorag.train_reranker(pairs regclass, name text, query_column name DEFAULT 'query',
                                     passage_column name DEFAULT 'passage', label_column name DEFAULT 'label',
                                     base_model text DEFAULT 'all-MiniLM-L6-v2', epochs integer DEFAULT 1,
                                     learning_rate float8 DEFAULT 5e-5, batch_size integer DEFAULT 16,
                                     max_tokens integer DEFAULT 160, seed bigint DEFAULT 0,
                                     replace boolean DEFAULT false)
RETURNS TABLE (model text, path text, pairs_used bigint, steps integer, mean_loss real, seconds float8)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    existing text;
    q text[];
    p text[];
    l real[];
    r text[];
BEGIN
    PERFORM lorag._require_admin('train_reranker()');
    SELECT m.kind INTO existing FROM lorag.models m WHERE m.name = train_reranker.name;
    IF existing IS NOT NULL AND (NOT replace OR existing <> 'reranker') THEN
        RAISE EXCEPTION 'model "%" is already registered (kind %)', name, existing
            USING ERRCODE = '42710',
                  HINT = CASE WHEN existing = 'reranker' THEN 'Pass replace => true to train it again.'
                              ELSE 'Choose another name.' END;
    END IF;
    FOR r IN SELECT ARRAY[c.col::text] FROM unnest(ARRAY[query_column, passage_column, label_column]) AS c(col)
              WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = pairs AND a.attname = c.col
                                   AND a.attnum > 0 AND NOT a.attisdropped) LOOP
        RAISE EXCEPTION '% has no column "%"', pairs, r[1]
            USING ERRCODE = '42703', HINT = 'Name the columns: query_column =>, passage_column =>, label_column =>.';
    END LOOP;
    -- a boolean label counts as 1 / 0
    EXECUTE format('SELECT array_agg(%I::text), array_agg(%I::text), array_agg(%I%s::real) FROM %s',
                   query_column, passage_column, label_column,
                   CASE WHEN (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = pairs AND a.attname = label_column)
                             = 'boolean'::regtype THEN '::integer' ELSE '' END,
                   pairs)
        INTO q, p, l;
    r := lorag._train_reranker(name, base_model, coalesce(q, '{}'), coalesce(p, '{}'), coalesce(l, '{}'),
                               epochs, learning_rate, batch_size, max_tokens, seed);
    INSERT INTO lorag.models AS m (name, kind, path, dimensions, checksum)
    VALUES (train_reranker.name, 'reranker', r[1], NULL, r[6])
    ON CONFLICT ON CONSTRAINT models_pkey DO UPDATE SET path = EXCLUDED.path, checksum = EXCLUDED.checksum, created_at = now();
    model := name;
    path := r[1];
    pairs_used := r[2]::bigint;
    steps := r[3]::integer;
    mean_loss := r[4]::real;
    seconds := r[5]::float8;
    RETURN NEXT;
END $$;
