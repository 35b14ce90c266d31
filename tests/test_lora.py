"""lora_train(), adapters in generate(), perplexity(), lora_drop/export/import through SQL with
the real SmolLM2 (tiny runs: a few steps of short blocks), and the bad inputs of the LoRA issue."""
import json
import os
import struct
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import assert_clean_error

FACTS = [f"Record {i}: the zebra code of the lorag depot is {i * 7 % 13}." for i in range(40)]
SMALL = "seq_len => 32, batch_size => 2, max_steps => 3"


@pytest.fixture(scope="module")
def tables(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS lt_facts, lt_other, lt_nulls, lt_empty, lt_ints, lt_two, lt_rag CASCADE")
        c.execute("CREATE TABLE lt_facts (id serial PRIMARY KEY, body text)")
        for f in FACTS:
            c.execute("INSERT INTO lt_facts (body) VALUES (%s)", (f,))
        c.execute("INSERT INTO lt_facts (body) VALUES (NULL)")
        c.execute("CREATE TABLE lt_other (id int, body text)")
        c.execute("INSERT INTO lt_other SELECT i, 'The wind tunnel measured the lift of wing ' || i || ' at Mach ' || (i % 3 + 1) || '.' FROM generate_series(1, 30) i")
        c.execute("CREATE TABLE lt_nulls (id int, body text)")
        c.execute("INSERT INTO lt_nulls SELECT i, NULL FROM generate_series(1, 5) i")
        c.execute("CREATE TABLE lt_empty (id int, body text)")
        c.execute("CREATE TABLE lt_ints (id int, n int)")
        c.execute("CREATE TABLE lt_two (id int, title text, body text)")
        c.execute("INSERT INTO lt_two SELECT id, 't', body FROM lt_facts")
        c.execute("SELECT lora_drop(name) FROM lorag.adapters")
    return "lt_facts"


def ppl(conn, table, adapter=None):
    return conn.execute("SELECT perplexity(%s::regclass, adapter => %s, seq_len => 64)", (table, adapter)).fetchone()[0]


def test_train_use_and_measure_an_adapter(mconn, tables):
    mode = "w" if mconn.execute("SHOW lorag.use_worker").fetchone()[0] == "on" else "b"
    name = f"facts_{mode}"
    mconn.execute("SELECT lora_drop(%s, if_exists => true)", (name,))
    base_other = ppl(mconn, "lt_other")
    base_facts = ppl(mconn, "lt_facts")
    row = mconn.execute(
        f"SELECT * FROM lora_train('lt_facts', adapter => %s, learning_rate => 5e-3, {SMALL})", (name,)
    ).fetchone()
    assert row[0] == name and row[1] == 3
    assert row[5] == 460800 and row[6] == 134515008  # rank 8 on q and v of 30 layers; SmolLM2-135M
    assert abs(row[7] - 460800 / 134515008) < 1e-12
    stored = mconn.execute("SELECT base_model, config, length(weights), source, metrics FROM lorag.adapters WHERE name = %s", (name,)).fetchone()
    assert stored[0] == "SmolLM2-135M-Instruct" and stored[1]["r"] == 8 and stored[1]["target_modules"] == ["q_proj", "v_proj"]
    assert stored[3] == "lt_facts" and stored[4]["steps"] == 3
    # the adapter changes what the model predicts; the base model is exactly as before
    tuned = ppl(mconn, "lt_facts", name)
    assert tuned < base_facts
    assert ppl(mconn, "lt_facts") == base_facts
    assert ppl(mconn, "lt_other") == base_other
    # a second adapter leaves the first one's perplexity exactly as it was
    mconn.execute(f"SELECT * FROM lora_train('lt_other', adapter => %s, {SMALL})", (name + "_2",))
    assert ppl(mconn, "lt_facts", name) == tuned
    # generation with the adapter, and with the adapter's base model implied
    text = mconn.execute("SELECT generate('What is the zebra code of record 3?', max_tokens => 12, adapter => %s)", (name,)).fetchone()[0]
    assert text
    # RAG and the adapter in one call: retrieved facts in the prompt, the adapter on the model
    mconn.execute("CREATE TABLE IF NOT EXISTS lt_rag AS SELECT id, body AS content, embed(body) AS embedding FROM lt_facts WHERE id <= 5")
    answer, sources, timings = mconn.execute(
        "SELECT * FROM rag_answer_with_sources('What is the zebra code of record 3?', 'lt_rag', k => 2, adapter => %s, max_tokens => 12)",
        (name,)).fetchone()
    assert answer and len(sources) == 2 and timings["generated_tokens"] >= 1
    assert_clean_error(mconn, "SELECT rag_answer('What is the zebra code?', 'lt_rag', adapter => 'no_such')", "42704", 'adapter "no_such" does not exist')
    # a retrained adapter (same name) is used at once, never a stale copy
    mconn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => %s, replace => true, learning_rate => 5e-2, {SMALL})", (name,))
    assert ppl(mconn, "lt_facts", name) != tuned


def test_sessions_use_different_adapters_at_once(conn, dsn, tables):
    for n, lr in (("conc_a", "5e-2"), ("conc_b", "1e-1")):
        conn.execute("SELECT lora_drop(%s, if_exists => true)", (n,))
        conn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => %s, learning_rate => {lr}, seed => 7, {SMALL})", (n,))
    q = "SELECT generate('Tell me about record 5.', max_tokens => 16, adapter => %s)"
    alone = {n: conn.execute(q, (n,)).fetchone()[0] for n in ("conc_a", "conc_b", None)}
    got = {}

    def run(n):
        with psycopg.connect(dsn) as c:
            got[n] = c.execute(q, (n,)).fetchone()[0]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("conc_a", "conc_b", None)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == alone


def test_rollback_leaves_no_adapter(conn, tables):
    with pytest.raises(psycopg.errors.RaiseException):
        with conn.transaction():
            conn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => 'rolled', {SMALL})")
            assert conn.execute("SELECT count(*) FROM lorag.adapters WHERE name = 'rolled'").fetchone()[0] == 1
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'roll back'; END $$")
    assert conn.execute("SELECT count(*) FROM lorag.adapters WHERE name = 'rolled'").fetchone()[0] == 0


def test_bad_training_input(conn, tables):
    conn.execute("SELECT lora_drop('lt_facts', if_exists => true)")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_ints')", "42703", "has no text column")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_two')", "42702", "several text columns")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_two', text_column => 'nope')", "42703", 'no text column "nope"')
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_empty')", "22023", "has no rows with text")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_nulls')", "22023", "has no rows with text")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', seq_len => 10000)", "22023", "seq_len must be between 2 and 8192")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', seq_len => 1)", "22023", "seq_len must be between")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', rank => 0)", "22023", "rank must be between 1 and 256")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', rank => 1000)", "22023", "rank must be between")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', alpha => -1)", "22023", "alpha must be positive")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', target_modules => '{wq}')", "22023", 'unknown target module "wq"')
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', learning_rate => 0)", "22023", "learning_rate must be in")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', batch_size => 0)", "22023", "batch_size must be between")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', epochs => 0)", "22023", "epochs must be between")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', base_model => 'nope')", "42704", 'model "nope" is not registered')
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', base_model => 'all-MiniLM-L6-v2')", "42809", "registered as a model of kind embedding")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', seq_len => 1024, batch_size => 1, max_steps => 1)", "22023", "fewer than one block")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', seq_len => 1024, batch_size => 64)", "22023", "needs more memory per step")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', target_modules => NULL)", "22004", "must not be NULL")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', alpha => 'NaN')", "22023", "alpha must be")
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', learning_rate => 'Infinity')", "22023", "learning_rate must be")
    # NULL rows are skipped: 40 rows of text, one NULL
    row = conn.execute(f"SELECT tokens FROM lora_train('lt_facts', adapter => 'nulls_ok', max_steps => 1, seq_len => 32, batch_size => 1)").fetchone()
    assert row[0] == 32
    assert_clean_error(conn, "SELECT * FROM lora_train('lt_facts', adapter => 'nulls_ok')", "42710", 'adapter "nulls_ok" already exists')


def test_bad_adapter_use(conn, tables):
    conn.execute("SELECT lora_drop('use_me', if_exists => true)")
    conn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => 'use_me', {SMALL})")
    conn.execute("SELECT lorag.register_model('smol-copy', 'generator', 'SmolLM2-135M-Instruct')")
    assert_clean_error(conn, "SELECT generate('hi', adapter => 'nope')", "42704", 'adapter "nope" does not exist')
    assert_clean_error(conn, "SELECT generate('hi', adapter => 'use_me', model => 'smol-copy')", "22023",
                       'was trained for base model "SmolLM2-135M-Instruct", not "smol-copy"')
    assert_clean_error(conn, "SELECT perplexity('lt_facts', adapter => 'nope')", "42704", 'adapter "nope" does not exist')
    assert_clean_error(conn, "SELECT perplexity('lt_empty')", "22023", "has no text to score")
    assert_clean_error(conn, "SELECT lora_drop('nope')", "42704", 'adapter "nope" does not exist')
    assert conn.execute("SELECT lora_drop('nope', if_exists => true)").fetchone()[0] is False
    assert conn.execute("SELECT lora_drop('use_me')").fetchone()[0] is True
    conn.execute("DELETE FROM lorag.models WHERE name = 'smol-copy'")


def test_permissions(conn, dsn, tables):
    conn.execute("DROP ROLE IF EXISTS lt_user")
    conn.execute("CREATE ROLE lt_user LOGIN")
    conn.execute("SELECT lora_drop('owned', if_exists => true)")
    conn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => 'owned', {SMALL})")
    conn.execute("CREATE TABLE IF NOT EXISTS lt_mine (body text)")
    conn.execute("GRANT SELECT ON lt_mine TO lt_user")
    conn.execute("TRUNCATE lt_mine")
    conn.execute("INSERT INTO lt_mine SELECT body FROM lt_facts")
    with psycopg.connect(dsn.replace("user=postgres", "user=lt_user"), autocommit=True) as u:
        assert_clean_error(u, "SELECT * FROM lora_train('lt_facts', adapter => 'stolen')", "42501", "permission denied for table lt_facts")
        assert_clean_error(u, "SELECT perplexity('lt_facts')", "42501", "permission denied for table lt_facts")
        assert_clean_error(u, "SELECT lora_drop('owned')", "42501", "only the creator")
        assert_clean_error(u, "SELECT lora_export('owned', 'x')", "42501", "only superusers and members of lorag_admin")
        assert_clean_error(u, "SELECT lora_import('x', 'x')", "42501", "only superusers and members of lorag_admin")
        assert_clean_error(u, "SELECT lorag._adapter_write('x', '{}', '')", "42501", "permission denied for function")
        assert_clean_error(u, "SELECT lorag._hnsw_check('lt_facts_pkey')", "42501", "permission denied for function")
        # row security: another role's adapters cannot be deleted or forged
        u.execute("DELETE FROM lorag.adapters")
        assert conn.execute("SELECT count(*) FROM lorag.adapters WHERE name = 'owned'").fetchone()[0] == 1
        assert_clean_error(u, "INSERT INTO lorag.adapters (name, base_model, config, weights, created_by) "
                              "SELECT 'forged', base_model, config, weights, 'postgres' FROM lorag.adapters WHERE name = 'owned'",
                           "42501", "row-level security")
        assert_clean_error(u, "INSERT INTO lorag.adapters (name, base_model, config, weights, weights_sha256) "
                              "SELECT 'forged', base_model, config, '\\x00', weights_sha256 FROM lorag.adapters WHERE name = 'owned'",
                           "428C9", "weights_sha256")
        assert_clean_error(u, f"SELECT * FROM lora_train('lt_mine', adapter => 'owned', replace => true, {SMALL})", "42501", "belongs to postgres")
        # a table the user may read: trains, saves as the user, and the user may drop it
        u.execute("SELECT lora_drop('mine', if_exists => true)")
        u.execute(f"SELECT * FROM lora_train('lt_mine', adapter => 'mine', {SMALL})")
        assert u.execute("SELECT created_by FROM lorag.adapters WHERE name = 'mine'").fetchone()[0] == "lt_user"
        assert u.execute("SELECT generate('hi', max_tokens => 4, adapter => 'owned')").fetchone()[0] is not None
        assert u.execute("SELECT lora_drop('mine')").fetchone()[0] is True
        assert_clean_error(u, "SELECT lorag.register_model('x', 'generator', '/tmp/x')", "42501", "permission denied for function")
        # lorag_admin may touch the file system, still only inside the configured folders
        conn.execute("GRANT lorag_admin TO lt_user")
        assert u.execute("SELECT lora_export('owned', 'by_admin')").fetchone()[0].endswith("lorag_adapters/by_admin")
        u.execute("SELECT lora_import('owned_copy', 'by_admin', replace => true)")
        assert_clean_error(u, "SELECT lora_export('owned', '../../escape')", "42501", "is not a folder inside lorag.adapter_dir")
        u.execute("SELECT lorag.register_model('admin-abs', 'generator', '/nonexistent/model')")
        conn.execute("DELETE FROM lorag.models WHERE name = 'admin-abs'")
        conn.execute("SELECT lora_drop('owned_copy')")
        conn.execute("REVOKE lorag_admin FROM lt_user")
    conn.execute("DROP TABLE lt_mine")
    conn.execute("DROP OWNED BY lt_user")
    conn.execute("DROP ROLE lt_user")


def test_a_caught_error_leaves_no_job(conn, tables):
    # the source fails half-way through (after the job opened in the model worker)
    conn.execute("CREATE OR REPLACE VIEW lt_bad AS SELECT CASE WHEN id = 30 THEN (1 / (id - 30))::text ELSE body END AS body FROM lt_facts")
    conn.execute("""DO $$ BEGIN
        PERFORM * FROM lora_train('lt_bad', adapter => 'caught', seq_len => 32, batch_size => 2, max_steps => 2);
    EXCEPTION WHEN division_by_zero THEN NULL; END $$""")
    assert conn.execute("SELECT count(*) FROM lorag.training_progress").fetchone()[0] == 0
    assert conn.execute("SELECT generate('hi', max_tokens => 2)").fetchone()[0] is not None


def test_two_sessions_cannot_train_one_name(conn, dsn, tables):
    with psycopg.connect(dsn) as other:
        other.execute("SELECT pg_advisory_xact_lock(hashtext('lorag.adapters'), hashtext('busy'))")
        assert_clean_error(conn, f"SELECT * FROM lora_train('lt_facts', adapter => 'busy', {SMALL})", "55P03", "is being trained by another session")
        other.rollback()


def test_progress_view_and_cancel(conn, dsn, tables):
    conn.execute("SELECT lora_drop('long', if_exists => true)")
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    seen = []

    def watch():
        with psycopg.connect(dsn, autocommit=True) as w:
            for _ in range(100):
                rows = w.execute("SELECT adapter, pid, step, total_steps FROM lorag.training_progress").fetchall()
                if rows and rows[0][2] >= 1:
                    seen.extend(rows)
                    w.execute("SELECT pg_cancel_backend(%s)", (pid,))
                    return
                time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    started = time.time()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT * FROM lora_train('lt_facts', adapter => 'long', seq_len => 32, batch_size => 1, epochs => 50)")
    t.join()
    assert seen and seen[0][0] == "long" and seen[0][1] == pid and seen[0][3] > 100
    assert time.time() - started < 60
    assert conn.execute("SELECT count(*) FROM lorag.adapters WHERE name = 'long'").fetchone()[0] == 0
    # the model process stops the job within one step of the cancel
    deadline = time.time() + 10
    while conn.execute("SELECT count(*) FROM lorag.training_progress").fetchone()[0] and time.time() < deadline:
        time.sleep(0.1)
    assert conn.execute("SELECT count(*) FROM lorag.training_progress").fetchone()[0] == 0
    # the session goes on, and so does the worker
    assert conn.execute("SELECT generate('hi', max_tokens => 2)").fetchone()[0] is not None


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype=np.float32).reshape(v["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for k, t in tensors.items():
        b = np.ascontiguousarray(t, dtype=np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_export_import_in_peft_format(conn, tables):
    conn.execute("SELECT lora_drop(name) FROM lorag.adapters WHERE name IN ('peft', 'peft_back', 'from_python')")
    conn.execute(f"SELECT * FROM lora_train('lt_facts', adapter => 'peft', learning_rate => 5e-2, {SMALL})")
    path = conn.execute("SELECT lora_export('peft', 'exported/peft')").fetchone()[0]
    assert path.endswith("lorag_adapters/exported/peft")
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tensors = read_safetensors(os.path.join(path, "adapter_model.safetensors"))
    assert len(tensors) == 30 * 2 * 2
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 576)
    assert tensors["base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"].shape == (192, 8)
    # back in, bit for bit
    conn.execute("SELECT lora_import('peft_back', 'exported/peft')")
    a, b = conn.execute("SELECT (SELECT weights_sha256 FROM lorag.adapters WHERE name = 'peft'), (SELECT weights_sha256 FROM lorag.adapters WHERE name = 'peft_back')").fetchone()
    assert a == b
    assert ppl(conn, "lt_facts", "peft_back") == ppl(conn, "lt_facts", "peft")
    # an adapter made in Python (PEFT's names and layout, numpy weights) imports and changes the output
    rng = np.random.default_rng(0)
    py = os.path.join(os.path.dirname(path), "from_python")
    os.makedirs(py, exist_ok=True)
    write_safetensors(os.path.join(py, "adapter_model.safetensors"), {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": rng.normal(0, 0.05, shape)
        for i in range(30) for ab, shape in (("A", (4, 576)), ("B", (576, 4)))
    })
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "bias": "none"},
              open(os.path.join(py, "adapter_config.json"), "w"))
    os.system(f"chown -R postgres {py} 2>/dev/null")
    conn.execute("SELECT lora_import('from_python', 'exported/from_python')")
    assert ppl(conn, "lt_facts", "from_python") != ppl(conn, "lt_facts")
    # bad folders and paths
    assert_clean_error(conn, "SELECT lora_import('x', '../escape')", "42501", "is not a folder inside lorag.adapter_dir")
    assert_clean_error(conn, "SELECT lora_export('peft', '/tmp/abs')", "42501", "is not a folder inside lorag.adapter_dir")
    assert_clean_error(conn, "SELECT lora_import('x', 'missing')", "58P01", "No such file")
    assert_clean_error(conn, "SELECT lora_import('peft', 'exported/peft')", "42710", 'adapter "peft" already exists')
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, open(os.path.join(py, "adapter_config.json"), "w"))
    assert_clean_error(conn, "SELECT lora_import('wrong_rank', 'exported/from_python')", "22023", "at rank 8")
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": "someone/unknown-model"}, open(os.path.join(py, "adapter_config.json"), "w"))
    assert_clean_error(conn, "SELECT lora_import('unknown_base', 'exported/from_python')", "42704", 'base model "someone/unknown-model" is not registered')
    with open(os.path.join(py, "adapter_model.safetensors"), "wb") as f:
        f.write(b"garbage")
    assert_clean_error(conn, "SELECT lora_import('garbage', 'exported/from_python', base_model => 'SmolLM2-135M-Instruct')", "22023", "not a safetensors file")
