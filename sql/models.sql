-- Models: the registry, embeddings, chunking, and the worker's status.

CREATE TABLE lorag.models (
    name        text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('embedding', 'reranker', 'generator')),
    path        text NOT NULL,          -- relative to lorag.model_dir, or absolute
    dimensions  integer CHECK (dimensions > 0),
    checksum    text CHECK (checksum ~ '^[0-9a-f]{64}$'),  -- sha256 of the weights file
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- every role may see (and use) the registered models; registering is for superusers
GRANT SELECT ON lorag.models TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('lorag.models', 'WHERE name NOT IN (''all-MiniLM-L6-v2'', ''SmolLM2-135M-Instruct'', ''SmolLM2-135M-Instruct-GGUF'', ''minilm-reranker'')');

INSERT INTO lorag.models (name, kind, path, dimensions, checksum) VALUES
    ('all-MiniLM-L6-v2', 'embedding', 'all-MiniLM-L6-v2', 384,
     '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db'),
    -- built by make models from the GGUF (or fetched from the Hub), so no fixed checksum
    ('SmolLM2-135M-Instruct', 'generator', 'SmolLM2-135M-Instruct', NULL, NULL),
    -- the same model as the GGUF of the registry package (Q4_1), decoded from 8-bit blocks
    ('SmolLM2-135M-Instruct-GGUF', 'generator', 'SmolLM2-135M-Instruct.Q4_1.gguf', NULL,
     'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'),
    -- trained by make models (lorag-train-reranker: MiniLM fine-tuned as a cross-encoder on
    -- Cranfield queries 1-150), so no fixed checksum either
    ('minilm-reranker', 'reranker', 'minilm-reranker', NULL, NULL);

-- lorag_admin: the role for what touches the server's file system (model paths, adapter
-- export/import) without being a superuser.
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'lorag_admin') THEN
        CREATE ROLE lorag_admin NOLOGIN;
    END IF;
END $$;

-- Whether the current role is a superuser or a member of lorag_admin. (lorag_admin is a role of
-- the whole cluster: granting it gives its rights in every database with lorag.)
CREATE FUNCTION lorag._is_admin() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
        OR pg_catalog.pg_has_role(current_user, 'lorag_admin', 'MEMBER')
$$;

-- Registers (or replaces) a model folder. It names files, so only superusers and lorag_admin
-- may call it (or whom they grant it); relative paths must stay inside lorag.model_dir, absolute
-- ones are for superusers and lorag_admin.
CREATE FUNCTION lorag.register_model(name text, kind text, path text,
                                     dimensions integer DEFAULT NULL, checksum text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF path ~ '(^|/)\.\.(/|$)' THEN
        RAISE EXCEPTION 'model path "%" leaves lorag.model_dir', path
            USING ERRCODE = '42501', HINT = 'Use a path inside lorag.model_dir, or an absolute path as a superuser or lorag_admin.';
    END IF;
    IF path ~ '^/' AND NOT lorag._is_admin() THEN
        RAISE EXCEPTION 'only superusers and members of lorag_admin may register absolute model paths'
            USING ERRCODE = '42501', HINT = 'Put the model under lorag.model_dir and register a relative path.';
    END IF;
    INSERT INTO lorag.models AS m (name, kind, path, dimensions, checksum)
    VALUES (register_model.name, register_model.kind, register_model.path,
            register_model.dimensions, register_model.checksum)
    ON CONFLICT ON CONSTRAINT models_pkey DO UPDATE
        SET kind = EXCLUDED.kind, path = EXCLUDED.path, dimensions = EXCLUDED.dimensions,
            checksum = EXCLUDED.checksum, created_at = now();
END $$;
REVOKE ALL ON FUNCTION lorag.register_model(text, text, text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION lorag.register_model(text, text, text, integer, text) TO lorag_admin;
GRANT INSERT, UPDATE ON lorag.models TO lorag_admin;

CREATE FUNCTION embed(input text, model text DEFAULT NULL) RETURNS vector
    AS 'MODULE_PATHNAME', 'lorag_embed' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION embed(inputs text[], model text DEFAULT NULL) RETURNS vector[]
    AS 'MODULE_PATHNAME', 'lorag_embed_array' LANGUAGE C STABLE PARALLEL RESTRICTED;

CREATE FUNCTION lorag._chunk(input text, max_tokens integer, overlap integer, model text) RETURNS text[]
    AS 'MODULE_PATHNAME', 'lorag_chunk' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION chunk(input text, max_tokens integer DEFAULT 256, overlap integer DEFAULT 32, model text DEFAULT NULL)
RETURNS TABLE (idx integer, chunk text) LANGUAGE sql STABLE PARALLEL RESTRICTED AS $$
    SELECT (c.i - 1)::integer, c.t FROM unnest(lorag._chunk(input, max_tokens, overlap, model)) WITH ORDINALITY AS c(t, i)
$$;

CREATE FUNCTION lorag._worker_status() RETURNS text[]
    AS 'MODULE_PATHNAME', 'lorag_worker_status' LANGUAGE C VOLATILE;
-- mode: the shared worker or in-backend; pid: the process that runs the models; batches and
-- batched_texts: embedding passes run and the texts in them (their ratio is the mean batch);
-- decode_steps and decoded_streams: the same for generation steps; rerankers: the loaded
-- cross-encoders with the ONNX Runtime execution provider each really runs on; embedders: the
-- loaded embedders with the runtime that computes each (candle and its device, or onnxruntime
-- and its execution provider).
CREATE FUNCTION lorag.worker_status(OUT mode text, OUT device text, OUT loaded_models text[],
                                    OUT memory_bytes bigint, OUT queue_depth integer, OUT requests_served bigint,
                                    OUT pid integer, OUT batches bigint, OUT batched_texts bigint,
                                    OUT decode_steps bigint, OUT decoded_streams bigint, OUT rerankers text[],
                                    OUT embedders text[])
LANGUAGE sql VOLATILE AS $$
    SELECT s[1], s[2], string_to_array(nullif(s[3], ''), ','), s[4]::bigint, s[5]::integer, s[6]::bigint,
           s[7]::integer, s[8]::bigint, s[9]::bigint, s[10]::bigint, s[11]::bigint,
           string_to_array(nullif(s[12], ''), ','), string_to_array(nullif(s[13], ''), ',')
    FROM lorag._worker_status() AS s
$$;

-- Cross-encoder reranking: one row per non-NULL document, best first; idx is the document's
-- subscript in the array (1-based), so documents[idx] is the document.
CREATE FUNCTION lorag._rerank(query text, documents text[], model text) RETURNS real[]
    AS 'MODULE_PATHNAME', 'lorag_rerank' LANGUAGE C STABLE PARALLEL RESTRICTED;
CREATE FUNCTION rerank(query text, documents text[], model text DEFAULT NULL)
RETURNS TABLE (idx integer, score real) LANGUAGE sql STABLE PARALLEL RESTRICTED AS $$
    SELECT (s.i + coalesce(array_lower(documents, 1), 1) - 1)::integer, s.score
    FROM unnest(lorag._rerank(query, documents, model)) WITH ORDINALITY AS s(score, i)
    WHERE s.score IS NOT NULL
    ORDER BY s.score DESC, s.i
$$;
