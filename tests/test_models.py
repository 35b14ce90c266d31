"""embed(), chunk(), the model registry and worker_status() through SQL, with the real
all-MiniLM-L6-v2 (fetched by `make models`), and every bad input."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conftest import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]
CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield" / "beir"


def as_np(v):
    return v.to_numpy() if hasattr(v, "to_numpy") else np.asarray(v)


@pytest.fixture
def vconn(mconn):
    """Each model test runs twice (conftest's mconn), with pgvector-python's types registered."""
    register_vector(mconn)
    return mconn


def emb(conn, text, model=None):
    return as_np(conn.execute("SELECT embed(%s, %s)", (text, model)).fetchone()[0])


@pytest.mark.parametrize("runtime", ["auto", "candle"])
def test_embeddings_match_the_reference_values(vconn, runtime):
    vconn.execute(f"SET lorag.embedding_runtime = {runtime}")
    a = emb(vconn, "A man is eating food.")
    b = emb(vconn, "A man is eating a piece of bread.")
    c = emb(vconn, "The new movie is awesome.")
    assert a.shape == (384,)
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    assert np.allclose(a[:5], [0.03324, 0.00441, -0.00628, 0.04838, -0.13870], atol=2e-5)
    assert abs(a @ b - 0.7553) < 1e-3
    assert abs(a @ c - (-0.0461)) < 1e-3


def test_array_form_equals_single_calls_and_keeps_nulls(vconn):
    texts = ["first sentence", None, "a second, longer sentence about aircraft wings", ""]
    out = vconn.execute("SELECT embed(%s::text[])", (texts,)).fetchone()[0]
    assert len(out) == 4 and out[1] is None
    for t, v in zip(texts, out):
        if t is not None:
            assert np.allclose(as_np(v), emb(vconn, t), atol=1e-5)


def test_null_empty_and_very_long_inputs(vconn):
    assert vconn.execute("SELECT embed(NULL::text)").fetchone()[0] is None
    assert vconn.execute("SELECT embed(NULL::text[])").fetchone()[0] is None
    e = emb(vconn, "")
    assert e.shape == (384,) and abs(np.linalg.norm(e) - 1) < 1e-5
    long = " ".join(f"word{i}" for i in range(20000))
    v = emb(vconn, long)
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
    # truncated at 256 tokens: what lies beyond does not change the embedding
    assert np.allclose(v, emb(vconn, long + " completely different ending"), atol=1e-6)


def test_embed_feeds_the_index(vconn):
    vconn.execute("DROP TABLE IF EXISTS edocs")
    vconn.execute("CREATE TABLE edocs (id int, content text, embedding vector(384))")
    vconn.execute("INSERT INTO edocs (id, content) VALUES (1, 'The wing stalls at high angle of attack.'), "
                  "(2, 'PostgreSQL stores tables in 8 kB pages.'), (3, 'Boundary layer transition on a flat plate.')")
    vconn.execute("UPDATE edocs SET embedding = embed(content)")
    vconn.execute("CREATE INDEX ON edocs USING hnsw (embedding vector_cosine_ops)")
    vconn.execute("SET enable_seqscan = off")
    got = vconn.execute("SELECT id FROM edocs ORDER BY embedding <=> (SELECT embed('database storage')) LIMIT 1").fetchone()[0]
    assert got == 2


def test_chunk_splits_on_tokens_and_sentences(vconn):
    text = " ".join(f"Sentence number {i} talks about the boundary layer of a wing." for i in range(200))
    rows = vconn.execute("SELECT idx, chunk FROM chunk(%s, 64, 8)", (text,)).fetchall()
    assert [r[0] for r in rows] == list(range(len(rows))) and len(rows) > 10
    assert all(r[1].endswith(".") for r in rows[:-1]), "cuts at sentence ends"
    assert rows[0][1].startswith("Sentence number 0 ")
    assert rows[-1][1].endswith("Sentence number 199 talks about the boundary layer of a wing.")
    assert vconn.execute("SELECT count(*) FROM chunk('')").fetchone()[0] == 0
    assert vconn.execute("SELECT count(*) FROM chunk(NULL)").fetchone()[0] == 0
    assert vconn.execute("SELECT chunk FROM chunk('Short text.')").fetchone()[0] == "Short text."


def test_worker_status_reports_the_device(vconn):
    emb(vconn, "warm up")
    mode, device, models, memory, queue, served, pid, *_ = vconn.execute("SELECT * FROM lorag.worker_status()").fetchone()
    assert device == "cpu" and "all-MiniLM-L6-v2" in models and memory > 50_000_000 and served >= 1
    backend = vconn.execute("SELECT pg_backend_pid()").fetchone()[0]
    in_backend = vconn.execute("SHOW lorag.use_worker").fetchone()[0] == "off"
    assert mode.startswith("in-backend" if in_backend else "worker") and (pid == backend) == in_backend


@pytest.fixture
def broken_model(tmp_path_factory):
    """A copy of MiniLM whose weights (model.safetensors and its ONNX export) are cut in half,
    readable by the server's OS user."""
    src = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models")) / "all-MiniLM-L6-v2"
    dest = Path("/tmp/lorag-test-broken-model")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    for w in (dest / "model.safetensors", dest / "model.onnx"):
        if w.exists():
            data = w.read_bytes()
            w.write_bytes(data[: len(data) // 2])
    os.chmod(dest, 0o755)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def test_bad_models_are_clean_errors(vconn, broken_model):
    def err(sql, params=()):
        with pytest.raises(psycopg.Error) as e:
            vconn.execute(sql, params)
        assert vconn.execute("SELECT 1").fetchone()[0] == 1
        return e.value

    e = err("SELECT embed('x', 'no-such-model')")
    assert e.sqlstate == "42704" and "all-MiniLM-L6-v2" in e.diag.message_hint
    vconn.execute("SELECT lorag.register_model('broken', 'embedding', %s, 384)", (str(broken_model),))
    for runtime in ("auto", "candle"):  # ONNX Runtime on model.onnx (when set up), candle on model.safetensors
        vconn.execute(f"SET lorag.embedding_runtime = {runtime}")
        e = err("SELECT embed('x', 'broken')")
        assert e.sqlstate == "XX001" and "corrupted" in str(e)
        vconn.execute("SELECT lorag.register_model('broken-sum', 'embedding', %s, 384, %s) WHERE NOT EXISTS "
                      "(SELECT FROM lorag.models WHERE name = 'broken-sum')", (str(broken_model), "0" * 64))
        e = err("SELECT embed('x', 'broken-sum')")
        assert e.sqlstate == "XX001" and "sha256" in str(e)
    vconn.execute("RESET lorag.embedding_runtime")
    e = err("SELECT lorag.register_model('escape', 'embedding', '../../etc', 384)")
    assert e.sqlstate == "42501"
    vconn.execute("SET lorag.model_dir = '/nonexistent/models'")
    e = err("SELECT embed('x')")
    assert e.sqlstate == "58P01" and "fetch-models" in e.diag.message_hint
    vconn.execute("RESET lorag.model_dir")
    e = err("SELECT * FROM chunk('text', 10, 10)")
    assert e.sqlstate == "22023"
    vconn.execute("SET lorag.device = 'tpu'")
    vconn.execute("SELECT lorag.register_model('fresh', 'embedding', 'all-MiniLM-L6-v2', 384)")
    e = err("SELECT embed('x', 'fresh')")
    assert e.sqlstate == "22023" and "auto, cpu or cuda" in str(e)
    vconn.execute("RESET lorag.device")
    vconn.execute("DELETE FROM lorag.models WHERE name IN ('broken', 'broken-sum', 'fresh')")


@pytest.fixture
def onnx_only_model(tmp_path_factory):
    """MiniLM's ONNX export and tokenizer alone (no safetensors, no config.json), as a user's
    Hugging Face feature-extraction export would be."""
    src = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models")) / "all-MiniLM-L6-v2"
    if not (src / "model.onnx").exists():
        pytest.skip("no ONNX export of MiniLM (make models makes it)")
    dest = Path("/tmp/lorag-test-onnx-only")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for f in ("model.onnx", "tokenizer.json"):
        shutil.copy(src / f, dest / f)
    os.chmod(dest, 0o755)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def test_runtimes_agree_and_the_status_says_which_runs(vconn, onnx_only_model):
    if not vconn.execute("SHOW lorag.onnxruntime_library").fetchone()[0]:
        pytest.skip("lorag.onnxruntime_library is not set")
    texts = ["hnsw", "", "What is the lift of a swept wing?", "boundary layer transition " * 120]
    out = {}
    for runtime, expected in (("candle", "candle cpu"), ("onnxruntime", "onnxruntime CPUExecutionProvider")):
        vconn.execute(f"SET lorag.embedding_runtime = {runtime}")
        out[runtime] = [as_np(v) for v in vconn.execute("SELECT embed(%s::text[])", (texts,)).fetchone()[0]]
        embedders = vconn.execute("SELECT embedders FROM lorag.worker_status()").fetchone()[0]
        assert f"all-MiniLM-L6-v2: {expected}" in embedders
    for a, b in zip(out["candle"], out["onnxruntime"]):
        assert a @ b > 0.9999
    # a folder with only an ONNX export and a tokenizer is an embedder too (auto picks ONNX Runtime)
    vconn.execute("RESET lorag.embedding_runtime")
    vconn.execute("SELECT lorag.register_model('onnx-only', 'embedding', %s, 384)", (str(onnx_only_model),))
    v = emb(vconn, "What is the lift of a swept wing?", "onnx-only")
    assert v @ out["candle"][2] > 0.9999
    vconn.execute("SET lorag.embedding_runtime = candle")
    assert_clean_error(vconn, "SELECT embed('x', 'onnx-only')", "58P01", "does not exist")
    vconn.execute("RESET lorag.embedding_runtime")
    # a cross-encoder is not an embedder
    reranker = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models")) / "minilm-reranker"
    if (reranker / "model.onnx").exists():
        vconn.execute("SELECT lorag.register_model('not-an-embedder', 'embedding', %s, 384)", (str(reranker),))
        assert_clean_error(vconn, "SELECT embed('x', 'not-an-embedder')", "42809", "not an embedder")
    vconn.execute("DELETE FROM lorag.models WHERE name IN ('onnx-only', 'not-an-embedder')")


def ndcg_at_10(ranked, relevant):
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


@pytest.mark.skipif(not CRANFIELD.exists(), reason="Cranfield data not at ../shared/data")
def test_cranfield_ndcg_reproduces_the_reference(conn):
    vconn = conn  # through the shared worker only: the in-backend path computes the same numbers
    register_vector(vconn)
    docs = [json.loads(l) for l in (CRANFIELD / "corpus.jsonl").read_text().splitlines() if l.strip()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (CRANFIELD / "queries.jsonl").read_text().splitlines()) if q}
    qrels = {}
    for line in (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(qid, {})[did] = int(score)
    vconn.execute("DROP TABLE IF EXISTS cran")
    vconn.execute("CREATE TABLE cran (id text PRIMARY KEY, content text, embedding vector(384))")
    with vconn.cursor() as cur:
        cur.executemany("INSERT INTO cran (id, content) VALUES (%s, %s)",
                        [(d["_id"], (d.get("title", "") + " " + d["text"]).strip()) for d in docs])
    # one call for the whole corpus: embed(text[]) batches the forward passes
    vconn.execute("UPDATE cran SET embedding = e.v FROM (SELECT unnest(array_agg(id ORDER BY id)) AS id, "
                  "unnest(embed(array_agg(content ORDER BY id))) AS v FROM cran) e WHERE cran.id = e.id")
    scores = []
    for qid, rel in qrels.items():
        ranked = [r[0] for r in vconn.execute(
            "SELECT id FROM cran ORDER BY embedding <=> (SELECT embed(%s)) LIMIT 10", (queries[qid],))]
        scores.append(ndcg_at_10(ranked, rel))
    ndcg = sum(scores) / len(scores)
    print(f"Cranfield nDCG@10 = {ndcg:.4f} over {len(scores)} queries")
    assert abs(ndcg - 0.508) <= 0.01, ndcg
