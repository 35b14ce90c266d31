"""rerank() through SQL against Python onnxruntime on the same ONNX file with the same tokenizer,
in the same run: pairs per second for batches of 50 pairs and the latency of one rerank() of 50
pairs; then the quality evidence on held-out data: Cranfield queries 151-225, nDCG@10 of the
embedder alone (exact scan) against its top 50 reranked by the default reranker (trained on
queries 1-150 by make models).

    make bench-rerank     (or: .venv/bin/python benches/rerank_bench.py)
"""
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ROOT = Path(__file__).resolve().parents[1]
CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield" / "beir"
MODEL_DIR = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models"))
RERANKER = MODEL_DIR / "minilm-reranker"
DSN = f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} user=postgres dbname={os.environ.get('PGDATABASE', 'lorag')}"


def cranfield():
    docs = {d["_id"]: (d.get("title", "") + " " + d["text"]).strip()
            for d in map(json.loads, (CRANFIELD / "corpus.jsonl").read_text().splitlines()) if d}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (CRANFIELD / "queries.jsonl").read_text().splitlines()) if q}
    qrels = {}
    for line in (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(qid, {})[did] = int(score)
    return docs, queries, qrels


def ndcg_at_10(ranked, relevant):
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def python_onnxruntime():
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(RERANKER / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(json.loads((RERANKER / "tokenizer_config.json").read_text())["model_max_length"], strategy="longest_first")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    sess = ort.InferenceSession(str(RERANKER / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def score(query, documents):
        enc = tok.encode_batch([(query, d) for d in documents])
        n = max(len(e.ids) for e in enc)
        pad = lambda xs: [x + [0] * (n - len(x)) for x in xs]
        feed = {"input_ids": np.array(pad([e.ids for e in enc]), dtype=np.int64),
                "attention_mask": np.array(pad([e.attention_mask for e in enc]), dtype=np.int64),
                "token_type_ids": np.array(pad([e.type_ids for e in enc]), dtype=np.int64)}
        return sess.run(["logits"], feed)[0][:, 0]

    return score


def main():
    docs, queries, qrels = cranfield()
    conn = psycopg.connect(DSN, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS lorag")
    register_vector(conn)
    mode = conn.execute("SELECT mode FROM lorag.worker_status()").fetchone()[0]
    print(f"mode: {mode}")

    # batches of 50 pairs: a query and 50 abstracts, the same batches for both
    ids = sorted(docs, key=int)
    batches = [(queries[q], [docs[ids[(int(q) * 50 + j) % len(ids)]] for j in range(50)]) for q in sorted(qrels, key=int)[:12]]
    py = python_onnxruntime()
    conn.execute("SELECT count(*) FROM rerank('warm up', ARRAY['the model loads'])")
    py(*batches[0])
    rounds = {"lorag rerank()": [], "python onnxruntime": []}
    for _ in range(2):
        t = time.perf_counter()
        for q, d in batches:
            conn.execute("SELECT count(*) FROM rerank(%s, %s)", (q, d)).fetchone()
        rounds["lorag rerank()"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for q, d in batches:
            py(q, d)
        rounds["python onnxruntime"].append(time.perf_counter() - t)
    pairs = 50 * len(batches)
    rate = {k: pairs / min(v) for k, v in rounds.items()}
    for k, v in rate.items():
        print(f"{k:22s}: {v:7.1f} pairs/s (batches of 50 pairs)")
    print(f"ratio lorag / python onnxruntime: {rate['lorag rerank()'] / rate['python onnxruntime']:.2f}x")
    lat = []
    for q, d in batches:
        t = time.perf_counter()
        conn.execute("SELECT count(*) FROM rerank(%s, %s)", (q, d)).fetchone()
        lat.append((time.perf_counter() - t) * 1000)
    print(f"latency of one rerank() of 50 pairs: median {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms")

    # agreement: the scores SQL returns are Python onnxruntime's on the same file
    q, d = batches[0]
    got = dict(conn.execute("SELECT idx, score FROM rerank(%s, %s)", (q, d)).fetchall())
    ref = py(q, d)
    print(f"largest |rerank() - python onnxruntime| over 50 pairs: {max(abs(got[i + 1] - ref[i]) for i in range(50)):.2e}")

    # quality on held-out queries
    conn.execute("DROP TABLE IF EXISTS bench_cran")
    conn.execute("CREATE TABLE bench_cran (id text PRIMARY KEY, content text, embedding vector(384))")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO bench_cran (id, content) VALUES (%s, %s)", list(docs.items()))
    t = time.perf_counter()
    conn.execute("UPDATE bench_cran SET embedding = e.v FROM (SELECT unnest(array_agg(id ORDER BY id)) AS id, "
                 "unnest(embed(array_agg(content ORDER BY id))) AS v FROM bench_cran) e WHERE bench_cran.id = e.id")
    print(f"embedded {len(docs)} abstracts in {time.perf_counter() - t:.0f} s")
    held_out = [q for q in sorted(qrels, key=int) if 151 <= int(q) <= 225]
    base, reranked = [], []
    t = time.perf_counter()
    for q in held_out:
        top = [r[0] for r in conn.execute(
            "SELECT id FROM bench_cran ORDER BY embedding <=> (SELECT embed(%s)) LIMIT 50", (queries[q],))]
        base.append(ndcg_at_10(top, qrels[q]))
        order = [top[i - 1] for i, _ in conn.execute("SELECT idx, score FROM rerank(%s, %s)",
                                                     (queries[q], [docs[i] for i in top]))]
        reranked.append(ndcg_at_10(order, qrels[q]))
    b, r = sum(base) / len(base), sum(reranked) / len(reranked)
    print(f"Cranfield held-out queries 151-225 ({len(held_out)}), nDCG@10: embedder {b:.4f}, "
          f"embedder top 50 + rerank() {r:.4f} ({r - b:+.4f}; aim +0.03) [{time.perf_counter() - t:.0f} s]")
    conn.execute("DROP TABLE bench_cran")


if __name__ == "__main__":
    main()
