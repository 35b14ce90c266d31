-- LoRA adapters: trained on table rows, stored as rows, used per call.
--
-- lora_train() and perplexity() read the source here, in the caller's backend and with the
-- caller's privileges, in batches (so a table larger than memory streams through); the model
-- worker only sees rows of text. An adapter is saved inside the caller's transaction: a rollback
-- leaves none.

CREATE TABLE lorag.adapters (
    name            text PRIMARY KEY,
    base_model      text NOT NULL REFERENCES lorag.models (name) ON UPDATE CASCADE,
    config          jsonb NOT NULL,     -- PEFT's adapter_config.json
    weights         bytea NOT NULL,     -- PEFT's adapter_model.safetensors
    weights_sha256  text GENERATED ALWAYS AS (encode(sha256(weights), 'hex')) STORED,  -- the cache key of the model worker
    source          text,               -- the table it was trained on, or the folder it was imported from
    metrics         jsonb,              -- steps, loss, tokens, parameters, time
    created_by      name NOT NULL DEFAULT current_user,
    created_at      timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('lorag.adapters', '');

-- Adapters are shared: every role may use them, add its own, and replace or drop its own;
-- members of lorag_admin may replace or drop any. (Superusers and the owner bypass the policies.)
GRANT SELECT, INSERT, DELETE ON lorag.adapters TO PUBLIC;
ALTER TABLE lorag.adapters ENABLE ROW LEVEL SECURITY;
CREATE POLICY adapters_read ON lorag.adapters FOR SELECT USING (true);
CREATE POLICY adapters_add ON lorag.adapters FOR INSERT WITH CHECK (created_by = current_user);
CREATE POLICY adapters_remove ON lorag.adapters FOR DELETE
    USING (created_by = current_user OR pg_catalog.pg_has_role(current_user, 'lorag_admin', 'MEMBER'));

CREATE FUNCTION lorag._job_open(spec jsonb) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'lorag_job_open' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
CREATE FUNCTION lorag._job_count(rows text[]) RETURNS bigint
    AS 'MODULE_PATHNAME', 'lorag_job_count' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._job_feed(rows text[]) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'lorag_job_feed' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._job_finish() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'lorag_job_finish' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._job_close() RETURNS void
    AS 'MODULE_PATHNAME', 'lorag_job_close' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._job_weights() RETURNS bytea
    AS 'MODULE_PATHNAME', 'lorag_job_weights' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._training_progress() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'lorag_training_progress' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._adapter_write(dir text, config jsonb, weights bytea) RETURNS text
    AS 'MODULE_PATHNAME', 'lorag_adapter_write' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION lorag._adapter_read(dir text, model text) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'lorag_adapter_read' LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION lorag._adapter_write(text, jsonb, bytea), lorag._adapter_read(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION lorag._adapter_write(text, jsonb, bytea), lorag._adapter_read(text, text) TO lorag_admin;

-- Training jobs running now, in any session (with the model worker).
CREATE VIEW lorag.training_progress AS
    SELECT t.adapter, t.model, t.pid, t.usename, t.step, t.total_steps, t.loss, t.mean_loss,
           t.learning_rate, t.tokens, t.tokens_per_second,
           make_interval(secs => t.elapsed_s) AS elapsed, make_interval(secs => t.eta_s) AS time_left
      FROM jsonb_to_recordset(lorag._training_progress())
           AS t(adapter text, model text, pid integer, usename text, step integer, total_steps integer,
                loss float8, mean_loss float8, learning_rate float8, tokens bigint, tokens_per_second float8,
                elapsed_s float8, eta_s float8);
GRANT SELECT ON lorag.training_progress TO PUBLIC;

-- An adapter name may be (re)used: new, or replace => true by its creator or an admin.
CREATE FUNCTION lorag._adapter_check_name(name text, replace boolean) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    owner name;
BEGIN
    SELECT a.created_by INTO owner FROM lorag.adapters a WHERE a.name = _adapter_check_name.name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT replace THEN
        RAISE EXCEPTION 'adapter "%" already exists', name
            USING ERRCODE = '42710', HINT = 'Pass replace => true to replace it, lora_drop() it, or choose another name.';
    END IF;
    IF owner <> current_user AND NOT lorag._is_admin() THEN
        RAISE EXCEPTION 'adapter "%" belongs to %: only its creator, a superuser or a member of lorag_admin may replace it', name, owner
            USING ERRCODE = '42501';
    END IF;
END $$;

-- Saves an adapter row as the current role (replacing one it may replace).
CREATE FUNCTION lorag._adapter_save(name text, base_model text, config jsonb, weights bytea,
                                    source text, metrics jsonb, replace boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM lorag._adapter_check_name(name, replace);
    DELETE FROM lorag.adapters a WHERE a.name = _adapter_save.name;
    INSERT INTO lorag.adapters (name, base_model, config, weights, source, metrics, created_by)
    VALUES (name, base_model, config, weights, source, metrics, current_user);
END $$;

-- Streams source's text column into the open job, batch by batch (op 'count' or 'feed'); returns
-- the rows sent and the last feed's progress. Stops early once training is done.
CREATE FUNCTION lorag._job_stream(source regclass, col name, op text, OUT rows bigint, OUT progress jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    batch text[] := '{}';
    bytes bigint := 0;
    r record;
BEGIN
    rows := 0;
    FOR r IN EXECUTE format('SELECT %I::text AS t FROM %s WHERE %I IS NOT NULL', col, source, col) LOOP
        batch := batch || r.t;
        bytes := bytes + octet_length(r.t);
        rows := rows + 1;
        IF cardinality(batch) >= 256 OR bytes >= 1048576 THEN
            IF op = 'count' THEN
                PERFORM lorag._job_count(batch);
            ELSE
                progress := lorag._job_feed(batch);
                EXIT WHEN (progress->>'done')::boolean;
            END IF;
            batch := '{}';
            bytes := 0;
        END IF;
    END LOOP;
    IF cardinality(batch) > 0 AND NOT coalesce((progress->>'done')::boolean, false) THEN
        IF op = 'count' THEN
            PERFORM lorag._job_count(batch);
        ELSE
            progress := lorag._job_feed(batch);
        END IF;
    END IF;
END $$;

-- The text column to learn from: the one named, else the only one.
CREATE FUNCTION lorag._text_column(source regclass, named name) RETURNS name
LANGUAGE sql STABLE AS $$
    SELECT lorag._rag_pick(source, 'text', lorag._typed_columns(source, '{text,varchar,bpchar}'), named,
                           'Use a table or view with a text column, or name one with text_column =>.')
$$;

-- lora_train(source): learns a LoRA adapter from source's text (rows packed end to end into
-- seq_len blocks), on the frozen base model, and saves it as lorag.adapters row `adapter`
-- (default: the table's name).
CREATE FUNCTION lora_train(source regclass, text_column name DEFAULT NULL, adapter text DEFAULT NULL,
                           base_model text DEFAULT NULL, rank integer DEFAULT 8, alpha float8 DEFAULT 16,
                           target_modules text[] DEFAULT '{q_proj,v_proj}', epochs integer DEFAULT 1,
                           max_steps integer DEFAULT NULL, learning_rate float8 DEFAULT 1e-3,
                           seq_len integer DEFAULT 256, batch_size integer DEFAULT 4, seed bigint DEFAULT 0,
                           replace boolean DEFAULT false)
RETURNS TABLE (name text, steps integer, final_loss real, mean_loss real, tokens bigint,
               trainable_parameters bigint, total_parameters bigint, trainable_fraction float8, seconds float8)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    aname text := coalesce(lora_train.adapter, (SELECT c.relname FROM pg_class c WHERE c.oid = source));
    col text;
    opened jsonb;
    streamed record;
    fin jsonb;
    w bytea;
    t0 timestamptz := clock_timestamp();
BEGIN
    IF aname IS NULL OR btrim(aname) = '' THEN
        RAISE EXCEPTION 'the adapter name is empty' USING ERRCODE = '22023', HINT = 'Name it: lora_train(''docs'', adapter => ''docs_v1'').';
    END IF;
    IF epochs IS NULL OR seq_len IS NULL OR batch_size IS NULL OR rank IS NULL OR alpha IS NULL OR learning_rate IS NULL
       OR target_modules IS NULL OR cardinality(target_modules) = 0 OR array_position(target_modules, NULL) IS NOT NULL
       OR replace IS NULL OR seed IS NULL THEN
        RAISE EXCEPTION 'rank, alpha, target_modules, epochs, learning_rate, seq_len, batch_size, seed and replace must not be NULL (nor empty)'
            USING ERRCODE = '22004', HINT = 'Leave an argument out to get its default.';
    END IF;
    col := lorag._text_column(source, text_column);
    IF NOT pg_try_advisory_xact_lock(hashtext('lorag.adapters'), hashtext(aname)) THEN
        RAISE EXCEPTION 'adapter "%" is being trained by another session', aname
            USING ERRCODE = '55P03', HINT = 'Wait for it (SELECT * FROM lorag.training_progress), or train under another name.';
    END IF;
    PERFORM lorag._adapter_check_name(aname, replace);
    opened := lorag._job_open(jsonb_build_object(
        'kind', 'train', 'adapter', aname, 'model', base_model, 'rank', rank, 'alpha', alpha,
        'target_modules', to_jsonb(target_modules), 'epochs', epochs, 'max_steps', max_steps,
        'learning_rate', learning_rate, 'seq_len', seq_len, 'batch_size', batch_size, 'seed', seed));
    streamed := lorag._job_stream(source, col, 'count');
    IF streamed.rows = 0 THEN
        RAISE EXCEPTION '% has no rows with text in column "%"', source, col
            USING ERRCODE = '22023', HINT = 'Train on a table (or view) with text rows; NULL rows are skipped.';
    END IF;
    FOR e IN 1..epochs LOOP
        streamed := lorag._job_stream(source, col, 'feed');
        EXIT WHEN (streamed.progress->>'done')::boolean;
    END LOOP;
    fin := lorag._job_finish();
    w := lorag._job_weights();
    PERFORM lorag._adapter_save(aname, opened->>'model',
            lorag._peft_config(rank, alpha, target_modules, opened->>'model'),
            w, source::text,
            jsonb_build_object('steps', fin->'progress'->'step', 'final_loss', fin->'progress'->'loss',
                               'mean_loss', fin->'progress'->'mean_loss', 'tokens', fin->'progress'->'tokens',
                               'trainable_parameters', fin->'trainable_parameters',
                               'total_parameters', fin->'total_parameters',
                               'seconds', extract(epoch FROM clock_timestamp() - t0),
                               'epochs', epochs, 'seq_len', seq_len, 'batch_size', batch_size,
                               'learning_rate', learning_rate, 'seed', seed),
            replace);
    RETURN QUERY SELECT aname, (fin->'progress'->>'step')::integer, (fin->'progress'->>'loss')::real,
                        (fin->'progress'->>'mean_loss')::real, (fin->'progress'->>'tokens')::bigint,
                        (fin->>'trainable_parameters')::bigint, (fin->>'total_parameters')::bigint,
                        (fin->>'trainable_parameters')::float8 / (fin->>'total_parameters')::float8,
                        extract(epoch FROM clock_timestamp() - t0)::float8;
EXCEPTION WHEN OTHERS THEN
    -- a failed job must not outlive the statement, even when the caller catches the error
    PERFORM lorag._job_close();
    RAISE;
END $$;

-- PEFT's adapter_config.json for an adapter of base model `model`; the default model carries its
-- Hugging Face Hub name, so PEFT in Python finds the base.
CREATE FUNCTION lorag._peft_config(rank integer, alpha float8, target_modules text[], model text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'peft_type', 'LORA', 'task_type', 'CAUSAL_LM',
        'base_model_name_or_path', CASE model WHEN 'SmolLM2-135M-Instruct' THEN 'HuggingFaceTB/SmolLM2-135M-Instruct' ELSE model END,
        'r', rank, 'lora_alpha', alpha,
        'target_modules', (SELECT jsonb_agg(m ORDER BY array_position('{q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}'::text[], m))
                             FROM (SELECT DISTINCT unnest(target_modules) AS m) d),
        'lora_dropout', 0.0, 'bias', 'none', 'fan_in_fan_out', false, 'inference_mode', true,
        'use_rslora', false, 'use_dora', false, 'modules_to_save', NULL, 'init_lora_weights', true, 'revision', NULL)
$$;

-- perplexity(source): exp of the mean next-token loss of source's text under the model (with
-- the adapter, if named), each row scored on its own in windows of seq_len tokens.
CREATE FUNCTION perplexity(source regclass, text_column name DEFAULT NULL, adapter text DEFAULT NULL,
                           model text DEFAULT NULL, seq_len integer DEFAULT 256)
RETURNS float8 LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    col name := lorag._text_column(source, text_column);
    fin jsonb;
BEGIN
    PERFORM lorag._job_open(jsonb_build_object('kind', 'perplexity', 'adapter', adapter, 'model', model,
                                               'seq_len', seq_len));
    PERFORM lorag._job_stream(source, col, 'feed');
    fin := lorag._job_finish();
    IF (fin->>'tokens')::bigint = 0 THEN
        RAISE EXCEPTION '% has no text to score in column "%"', source, col
            USING ERRCODE = '22023', HINT = 'NULL rows are skipped; score a table with text rows.';
    END IF;
    RETURN exp((fin->>'nll')::float8 / (fin->>'tokens')::float8);
EXCEPTION WHEN OTHERS THEN
    -- a failed job must not outlive the statement, even when the caller catches the error
    PERFORM lorag._job_close();
    RAISE;
END $$;

-- Removes an adapter; its creator or a superuser / lorag_admin may.
CREATE FUNCTION lora_drop(adapter text, if_exists boolean DEFAULT false) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    owner name;
BEGIN
    SELECT a.created_by INTO owner FROM lorag.adapters a WHERE a.name = adapter;
    IF NOT FOUND THEN
        IF if_exists THEN
            RETURN false;
        END IF;
        RAISE EXCEPTION 'adapter "%" does not exist', adapter
            USING ERRCODE = '42704', HINT = 'SELECT name FROM lorag.adapters lists them; if_exists => true ignores a missing one.';
    END IF;
    IF owner <> current_user AND NOT lorag._is_admin() THEN
        RAISE EXCEPTION 'only the creator of adapter "%" (%), a superuser or a member of lorag_admin may drop it', adapter, owner
            USING ERRCODE = '42501';
    END IF;
    DELETE FROM lorag.adapters a WHERE a.name = adapter;
    RETURN true;
END $$;

CREATE FUNCTION lorag._require_admin(what text) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT lorag._is_admin() THEN
        RAISE EXCEPTION '% touches the server''s file system: only superusers and members of lorag_admin may call it', what
            USING ERRCODE = '42501', HINT = 'A superuser can GRANT lorag_admin TO the role that needs it.';
    END IF;
END $$;

-- Writes adapter_config.json and adapter_model.safetensors (Hugging Face PEFT) to dir, a folder
-- inside lorag.adapter_dir; returns the folder's full path.
CREATE FUNCTION lora_export(adapter text, dir text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    a record;
BEGIN
    PERFORM lorag._require_admin('lora_export()');
    SELECT * INTO a FROM lorag.adapters x WHERE x.name = adapter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'adapter "%" does not exist', adapter USING ERRCODE = '42704';
    END IF;
    RETURN lorag._adapter_write(dir, a.config, a.weights);
END $$;

-- Reads a PEFT adapter folder (inside lorag.adapter_dir) into lorag.adapters, checked against the
-- base model: base_model, else the model registered under the config's base_model_name_or_path
-- (its last path part).
CREATE FUNCTION lora_import(adapter text, dir text, base_model text DEFAULT NULL, replace boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    model text := base_model;
    got jsonb;
    w bytea;
BEGIN
    PERFORM lorag._require_admin('lora_import()');
    IF adapter IS NULL OR btrim(adapter) = '' THEN
        RAISE EXCEPTION 'the adapter name is empty' USING ERRCODE = '22023';
    END IF;
    got := lorag._adapter_read(dir, model);
    w := decode(got->>'weights', 'hex');
    PERFORM lorag._adapter_save(adapter, got->>'base_model',
            lorag._peft_config((got->'config'->>'r')::integer, (got->'config'->>'lora_alpha')::float8,
                               ARRAY(SELECT jsonb_array_elements_text(got->'config'->'target_modules')), got->>'base_model'),
            w, dir, NULL, replace);
END $$;
