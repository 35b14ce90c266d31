"""rag_answer() on the PostgreSQL manual, stage by stage, and decoding speed of the default
generator against the memory-bandwidth bound measured in the same run; then 4 concurrent
generation streams against 1.

    make bench-rag     (or: .venv/bin/python benches/rag_bench.py; loads examples/manual.sql if needed)
"""
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models"))
DSN = f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} user=postgres dbname={os.environ.get('PGDATABASE', 'lorag')}"
QUESTIONS = [
    "How do I create an index that covers only some rows of a table?",
    "How do I remove dead rows and reclaim the space they use?",
    "How do I add a column to an existing table?",
    "How do I copy the rows of a table into a CSV file?",
    "How do I give a user permission to read a table?",
]


def copy_bandwidth():
    """Bytes per second of a large memory copy (read + write), best of 5."""
    a = np.ones(256 * 1024 * 1024 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


QUANTISED = "SmolLM2-135M-Instruct-GGUF"
ROUNDS = 5  # of 1 stream then 4 concurrent streams, for the throughput ratio


def weight_bytes(bytes_per_weight=4.0):
    """Bytes of weights one decoding step reads: every linear map and the (tied) output head at
    `bytes_per_weight` (F32: 4; 8-bit blocks: 32 values and one f32 scale per 32 weights), the norms in F32."""
    c = json.loads((MODEL_DIR / "SmolLM2-135M-Instruct" / "config.json").read_text())
    h, L, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return bytes_per_weight * (L * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab) + 4 * (L * 2 * h + h)


def decode(c, prompt, n=96, model=None):
    g = c.execute("SELECT lorag._generate(%s, %s, 0, NULL, %s, NULL, NULL, 0.9, 0)", (prompt, n, model)).fetchone()[0]
    tokens, ttft, total = int(g[2]), float(g[5]), float(g[6])
    return tokens, ttft, total


def main():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS lorag")
        if not c.execute("SELECT to_regclass('manual') IS NOT NULL").fetchone()[0]:
            print("loading the manual (examples/manual.sql) ...", flush=True)
            env = dict(os.environ)
            subprocess.run(["scripts/pg.sh", "psql", "-q", "-f", "examples/manual.sql"], cwd=ROOT, check=True, env=env)
        chunks = c.execute("SELECT count(*) FROM manual").fetchone()[0]
        c.execute("SELECT rag_answer('warm up', 'manual', max_tokens => 2, text_column => 'content')")
        stages = {k: [] for k in ("embed_ms", "search_ms", "rerank_ms", "time_to_first_token_ms", "generate_ms")}
        wall = []
        for q in QUESTIONS:
            t = time.perf_counter()
            _, _, timings = c.execute("SELECT * FROM rag_answer_with_sources(%s, 'manual', k => 3, max_tokens => 64, text_column => 'content')", (q,)).fetchone()
            wall.append((time.perf_counter() - t) * 1000)
            for k in stages:
                stages[k].append(float(timings.get(k) or 0))
        print(f"rag_answer on the manual ({chunks} chunks of 128 tokens), 50 candidates reranked by {timings.get('reranker')}, "
              f"k = 3, max_tokens = 64, median of {len(QUESTIONS)} questions:")
        for k, v in stages.items():
            print(f"  {k:24s} {statistics.median(v):8.1f} ms")
        print(f"  {'whole call':24s} {statistics.median(wall):8.1f} ms")

        bw = copy_bandwidth()
        prompt = "Write a long story about a dragon who learns to use a database."
        for model, label, wb in ((None, "F32", weight_bytes()), (QUANTISED, "GGUF, 8-bit blocks", weight_bytes(36 / 32))):
            bound = bw / wb
            decode(c, prompt, 4, model)
            runs = [decode(c, prompt, model=model) for _ in range(3)]
            rate = statistics.median((n - 1) / ((total - ttft) / 1000) for n, ttft, total in runs if n > 1)
            print(f"decode, one stream, SmolLM2-135M {label}: {rate:6.1f} tokens/s; bandwidth bound {bound:6.1f} tokens/s "
                  f"({wb / 1e6:.0f} MB of weights per token, copy bandwidth {bw / 1e9:.1f} GB/s): {rate / bound:.2f} of the bound")

    for model, label in ((None, "F32"), (QUANTISED, "GGUF, 8-bit blocks")):
        def stream(i):
            with psycopg.connect(DSN, autocommit=True) as c:
                n, _, _ = decode(c, f"Write a long story about dragon number {i} who learns SQL.", model=model)
                return n

        # alternating rounds, medians: one round takes a few seconds, and this machine's speed
        # drifts by ±15% over such spans
        rounds = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            one = stream(0) / (time.perf_counter() - t)
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(4) as ex:
                total = sum(ex.map(stream, range(1, 5)))
            rounds.append((one, total / (time.perf_counter() - t)))
        one, four = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        each = ", ".join(f"{f / o:.2f}x" for o, f in rounds)
        print(f"generation throughput, {label}: 1 stream {one:6.1f} tokens/s, 4 concurrent streams {four:6.1f} tokens/s total: "
              f"{four / one:.2f}x (medians of {ROUNDS} alternating rounds: {each})")
    question_set()


def question_set():
    """The manual question set, with the reranker and without: is the answering page in the top
    3, is the expected fact in the top-3 passages, and is it in the generated answer."""
    rows = [l.split("\t") for l in (ROOT / "benches" / "data" / "manual_questions.tsv").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    n = len(rows)
    with psycopg.connect(DSN, autocommit=True) as c:
        for rerank in (False, True):
            page_hits = fact_hits = answer_hits = 0
            for question, page, fact in rows:
                answer, sources, _ = c.execute(
                    "SELECT * FROM rag_answer_with_sources(%s, 'manual', k => 3, max_tokens => 64, text_column => 'content', "
                    "rerank => %s)", (question, rerank)).fetchone()
                keys = [int(s["key"]) for s in sources]
                pages = [r[0] for r in c.execute("SELECT page FROM manual WHERE id = ANY(%s)", (keys,))]
                page_hits += page in pages
                fact_hits += any(fact.lower() in s["content"].lower() for s in sources)
                answer_hits += fact.lower() in answer.lower()
            label = "with the reranker (50 candidates)" if rerank else "without reranker"
            print(f"manual question set ({n} questions), {label}: answering page in top 3 {page_hits}/{n} = {page_hits / n:.2f}; "
                  f"fact in top-3 passages {fact_hits}/{n} = {fact_hits / n:.2f}; fact in the answer {answer_hits}/{n} = {answer_hits / n:.2f}")


if __name__ == "__main__":
    main()
