"""generate(), rag_retrieve() and rag_answer() through SQL with the real SmolLM2 and MiniLM, and
every bad input of the RAG issue."""
import os
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from conftest import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docs(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS rag_docs, rag_two_texts, rag_no_vec, rag_empty CASCADE")
        c.execute("CREATE TABLE rag_docs (id bigserial PRIMARY KEY, content text, embedding vector(384))")
        c.execute("""INSERT INTO rag_docs (content) VALUES
            ('A partial index is created with CREATE INDEX ... WHERE predicate: only rows that satisfy the predicate are indexed.'),
            ('VACUUM reclaims storage occupied by dead tuples.'),
            ('The capital of Australia is Canberra.'),
            ('pg_dump extracts a PostgreSQL database into a script file or an archive.')""")
        c.execute("UPDATE rag_docs SET embedding = embed(content)")
        c.execute("CREATE INDEX ON rag_docs USING hnsw (embedding vector_cosine_ops)")
        c.execute("CREATE VIEW rag_docs_view AS SELECT id, content, embedding FROM rag_docs WHERE id <> 3")
        c.execute("CREATE TABLE rag_two_texts (id int PRIMARY KEY, title text, body text, embedding vector(384))")
        c.execute("INSERT INTO rag_two_texts SELECT id, 'title', content, embedding FROM rag_docs")
        c.execute("CREATE TABLE rag_no_vec (id int, content text)")
        c.execute("CREATE TABLE rag_empty (id int, content text, embedding vector(384))")
    return "rag_docs"


def test_generate_answers_greedily_and_repeats_with_a_seed(mconn):
    assert mconn.execute("SELECT generate('What is the capital of France?')").fetchone()[0] == "The capital of France is Paris."
    a = mconn.execute("SELECT generate('Name a colour.', max_tokens => 12, temperature => 0.9, seed => 5)").fetchone()[0]
    b = mconn.execute("SELECT generate('Name a colour.', max_tokens => 12, temperature => 0.9, seed => 5)").fetchone()[0]
    assert a == b and a
    assert mconn.execute("SELECT generate(NULL)").fetchone()[0] is None


def test_generate_from_a_gguf_file(mconn, tmp_path_factory):
    """The registry's GGUF row decodes from 8-bit blocks; a truncated GGUF is a clean ERROR."""
    answer = mconn.execute("SELECT generate('What is the capital of France?', model => 'SmolLM2-135M-Instruct-GGUF')").fetchone()[0]
    assert "Paris" in answer
    loaded = mconn.execute("SELECT loaded_models FROM lorag.worker_status()").fetchone()[0]
    assert "SmolLM2-135M-Instruct-GGUF" in loaded
    src = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    broken = Path("/tmp/lorag-test-broken.gguf")
    broken.write_bytes(src.read_bytes()[: 40 * 1024 * 1024])
    os.chmod(broken, 0o644)
    try:
        mconn.execute("SELECT lorag.register_model('broken-gguf', 'generator', %s) WHERE NOT EXISTS "
                      "(SELECT FROM lorag.models WHERE name = 'broken-gguf')", (str(broken),))
        assert_clean_error(mconn, "SELECT generate('hi', model => 'broken-gguf')", "XX001", "corrupted")
        mconn.execute("SELECT lorag.register_model('broken-gguf-sum', 'generator', %s, NULL, %s) WHERE NOT EXISTS "
                      "(SELECT FROM lorag.models WHERE name = 'broken-gguf-sum')", (str(broken), "0" * 64))
        assert_clean_error(mconn, "SELECT generate('hi', model => 'broken-gguf-sum')", "XX001", "sha256")
    finally:
        mconn.execute("DELETE FROM lorag.models WHERE name IN ('broken-gguf', 'broken-gguf-sum')")
        broken.unlink()


def test_rag_retrieve_finds_the_passage_and_views_filter(conn, docs):
    rows = conn.execute("SELECT rank, key, content, distance, rerank_score FROM rag_retrieve("
                        "'How do I create a partial index?', 'rag_docs', 2, rerank => false)").fetchall()
    assert [r[0] for r in rows] == [1, 2] and rows[0][1] == "1" and "partial index" in rows[0][2]
    assert rows[0][3] <= rows[1][3] and rows[0][4] is None
    keys = [r[0] for r in conn.execute("SELECT key FROM rag_retrieve('capital of Australia', 'rag_docs_view', 3)")]
    assert "3" not in keys, "the view filters row 3 out"
    two = conn.execute("SELECT key FROM rag_retrieve('capital', 'rag_two_texts', 1, text_column => 'body', rerank => false)").fetchone()
    assert two[0] == "3"


def test_rag_retrieve_reranks_its_candidates(conn, docs):
    """By default the `candidates` nearest rows are rescored by the reranker and the best k kept,
    ranked by both scores standardised (lorag.rerank_weight 0.5); with weight 1 by the reranker's
    score alone, with 0 in the search's order. Scores are the ones rerank() gives."""
    question = "How do I create a partial index?"
    contents, sims = zip(*conn.execute(
        "SELECT content, 1 - (embedding <=> (SELECT embed(%s))) FROM rag_docs ORDER BY embedding <=> (SELECT embed(%s))",
        (question, question)).fetchall())
    scores = dict(conn.execute("SELECT idx, score FROM rerank(%s, %s)", (question, list(contents))).fetchall())
    r = np.array([scores[i + 1] for i in range(len(contents))])
    s = np.array(sims)
    for weight in (0.5, 1.0, 0.0, 0.8):
        conn.execute(f"SET lorag.rerank_weight = {weight}")
        rows = conn.execute("SELECT rank, key, content, distance, rerank_score FROM rag_retrieve(%s, 'rag_docs', 3, candidates => 4)",
                            (question,)).fetchall()
        fused = weight * (r - r.mean()) / r.std() + (1 - weight) * (s - s.mean()) / s.std()
        order = sorted(range(len(contents)), key=lambda i: (-fused[i], i))[:3]
        assert [row[0] for row in rows] == [1, 2, 3]
        assert [row[2] for row in rows] == [contents[i] for i in order], weight
        assert [row[4] for row in rows] == pytest.approx([scores[i + 1] for i in order])
    conn.execute("RESET lorag.rerank_weight")
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SET lorag.rerank_weight = 2")
    assert e.value.sqlstate == "22023"
    assert_clean_error(conn, "SELECT * FROM rag_retrieve('q', 'rag_docs', reranker => 'nope')", "42704", 'model "nope" is not registered')
    conn.execute("SET lorag.reranker_model = ''")
    assert conn.execute("SELECT rerank_score FROM rag_retrieve('q', 'rag_docs', 1)").fetchone()[0] is None, "no reranker set: none used"
    conn.execute("RESET lorag.reranker_model")
    _, _, timings = conn.execute("SELECT * FROM rag_answer_with_sources(%s, 'rag_docs', 1, max_tokens => 4)", (question,)).fetchone()
    assert timings["reranker"] == "minilm-reranker" and timings["rerank_ms"] > 0


def test_rag_answer_uses_the_retrieved_facts(conn, docs):
    answer, sources, timings = conn.execute(
        "SELECT * FROM rag_answer_with_sources('What is the capital of Australia?', 'rag_docs', 1, rerank => false)").fetchone()
    assert sources[0]["key"] == "3" and "Canberra" in sources[0]["content"]
    assert timings["generated_tokens"] >= 1 and timings["embed_ms"] >= 0 and timings["search_ms"] >= 0
    assert "Canberra" in answer, answer
    assert conn.execute("SELECT rag_answer('What is the capital of Australia?', 'rag_docs', k => 1, rerank => false)").fetchone()[0] == answer


def test_rag_bad_inputs(conn, docs):
    q = "'How do I vacuum?'"
    assert_clean_error(conn, "SELECT rag_answer('', 'rag_docs')", "22023", "question is empty")
    assert_clean_error(conn, "SELECT rag_answer(NULL, 'rag_docs')", "22023", "question is empty")
    assert_clean_error(conn, f"SELECT rag_answer({q}, 'rag_docs', k => 0)", "22023", "k must be at least 1")
    assert_clean_error(conn, f"SELECT rag_answer({q}, 'rag_docs', k => 5, candidates => 4)", "22023", "candidates (4) must be at least k (5)")
    assert_clean_error(conn, f"SELECT * FROM rag_retrieve({q}, 'rag_no_vec')", "42703", "no vector column")
    assert_clean_error(conn, f"SELECT * FROM rag_retrieve({q}, 'rag_two_texts')", "42702", "several text columns")
    assert_clean_error(conn, f"SELECT * FROM rag_retrieve({q}, 'rag_two_texts', text_column => 'nope')", "42703", "no text column \"nope\"")
    assert_clean_error(conn, f"SELECT * FROM rag_retrieve({q}, 'no_such_table')", "42P01", "does not exist")
    assert_clean_error(conn, f"SELECT rag_answer({q}, 'rag_docs', max_tokens => 100000)", "22023", "above the limit lorag.max_tokens")
    assert_clean_error(conn, "SELECT generate('hi', max_tokens => 0)", "22023", "at least 1")
    # a prompt longer than the context: what to change, not only what is wrong
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT generate(repeat('why ', 9000), max_tokens => 16)")
    assert err.value.sqlstate == "22023" and "does not fit the model's context" in str(err.value), err.value
    assert "Shorten the prompt" in (err.value.diag.message_hint or ""), err.value.diag.message_hint
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert_clean_error(conn, "SELECT generate('   ')", "22023", "prompt is empty")
    assert_clean_error(conn, "SELECT generate('hi', temperature => -1)", "22023", "temperature")
    assert_clean_error(conn, "SELECT generate('hi', top_p => 0)", "22023", "top_p")
    assert_clean_error(conn, "SELECT generate('hi', adapter => 'no_such_adapter')", "42704", 'adapter "no_such_adapter" does not exist')
    assert_clean_error(conn, "SELECT generate('hi', model => 'all-MiniLM-L6-v2')", "42809", "needs a generator model")
    assert_clean_error(conn, "SELECT generate('hi', model => 'nope')", "42704", "not registered")
    # a source with no rows: said, not invented
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    answer = conn.execute(f"SELECT rag_answer({q}, 'rag_empty')").fetchone()[0]
    assert "no rows" in answer and any("nothing to answer from" in n for n in notices)


def test_context_longer_than_the_window_is_cut_with_a_notice(conn, dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS rag_long")
        c.execute("CREATE TABLE rag_long (id int PRIMARY KEY, content text, embedding vector(384))")
        c.execute("INSERT INTO rag_long VALUES (1, 'Canberra is the capital of Australia.', embed('Canberra is the capital of Australia.'))")
        c.execute("INSERT INTO rag_long VALUES (2, repeat('filler words about nothing at all. ', 2000), embed('capital of Australia'))")
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        answer, sources, timings = c.execute(
            "SELECT * FROM rag_answer_with_sources('What is the capital of Australia?', 'rag_long', 2, max_tokens => 16)").fetchone()
        assert any("cut by" in n for n in notices), notices
        assert timings["prompt_tokens"] <= 8192 - 16
        assert answer


def test_concurrent_generations_are_decoded_together(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT generate('warm up', max_tokens => 2)")
        before = c.execute("SELECT decode_steps, decoded_streams FROM lorag.worker_status()").fetchone()

    def client(i):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT generate(%s, max_tokens => 24)", (f"Write a short poem about the number {i}.",))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(dsn, autocommit=True) as c:
        after = c.execute("SELECT decode_steps, decoded_streams FROM lorag.worker_status()").fetchone()
    steps, streams = after[0] - before[0], after[1] - before[1]
    assert streams / steps > 2.0, f"{streams} stream-steps in {steps} steps: not decoded together"


@pytest.mark.parametrize("mode", ["worker", "in-backend"])
def test_statement_timeout_stops_generation_within_a_second(dsn, mode):
    with psycopg.connect(dsn, autocommit=True) as c:
        if mode == "in-backend":
            c.execute("SET lorag.use_worker = off")
        c.execute("SELECT generate('warm up', max_tokens => 2)")
        c.execute("SET statement_timeout = '1500ms'")
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT generate('Write a very long story about a dragon and a database.', max_tokens => 1000)")
        assert time.monotonic() - t0 < 2.5
        c.execute("RESET statement_timeout")
        assert c.execute("SELECT generate('What is the capital of France?', max_tokens => 12)").fetchone()[0]
