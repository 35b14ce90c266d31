"""hnsw through SQL, like a user, against an exact scan and hnswlib in-process on the same data.

    make bench-hnsw            (N=100000; or: .venv/bin/python benches/hnsw_bench.py --n 20000)

Data: a seeded Gaussian mixture of 384-dimension vectors (centres N(0,1) per dimension,
10 points per centre, noise N(0,1) added, L2-normalised); queries drawn the same way (a random
centre of the data plus fresh noise, so each query has a real cluster of neighbours).
Index: m = 16, ef_construction = 64, cosine. Prints load and build time, index size, and for
each hnsw.ef_search the recall@10 against the exact answer and single-client queries/second;
then the same for hnswlib (PyPI) in this process, and the ratios.
"""
import argparse
import os
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

DIM = 384
KNN = "SELECT id FROM bench_items ORDER BY embedding <=> %s LIMIT 10"


def mixture(n, nq, seed):
    """n points around n/10 centres, and nq queries drawn the same way around those centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10 + 1, DIM), dtype=np.float32)
    x = np.repeat(centres, 10, axis=0)[:n] + rng.standard_normal((n, DIM), dtype=np.float32)
    q = centres[rng.integers(0, n // 10, nq)] + rng.standard_normal((nq, DIM), dtype=np.float32)
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    return norm(x), norm(q)


def exact_top10(data, queries):
    out = []
    for q in queries:
        s = data @ q
        idx = np.argpartition(-s, 10)[:10]
        out.append(set(idx[np.argsort(-s[idx])].tolist()))
    return out


def recall(results, truth):
    return sum(len(set(r) & t) for r, t in zip(results, truth)) / (10 * len(truth))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", default="10,20,40,80,120,200,240,280,320")
    args = ap.parse_args()
    efs = [int(x) for x in args.ef.split(",")]
    dsn = f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} user=postgres dbname={os.environ.get('PGDATABASE', 'lorag')}"

    data, queries = mixture(args.n, args.queries, 1)
    truth = exact_top10(data, queries)
    print(f"N = {args.n}, dim = {DIM}, queries = {args.queries}, m = 16, ef_construction = 64")

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS lorag")
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS bench_items")
        conn.execute(f"CREATE TABLE bench_items (id int PRIMARY KEY, embedding vector({DIM}))")
        t = time.perf_counter()
        with conn.cursor().copy("COPY bench_items (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "vector"])
            for i, v in enumerate(data):
                copy.write_row((i, v))
        load = time.perf_counter() - t
        conn.execute("VACUUM ANALYZE bench_items")
        conn.execute("SET maintenance_work_mem = '2GB'")
        t = time.perf_counter()
        conn.execute("CREATE INDEX bench_idx ON bench_items USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
        build = time.perf_counter() - t
        size = conn.execute("SELECT pg_relation_size('bench_idx')").fetchone()[0]
        print(f"lorag: load {load:.1f} s, build {build:.1f} s, index {size / 1e6:.0f} MB")

        # exact scan through SQL, on a few queries (it is slow)
        conn.execute("SET enable_indexscan = off")
        nq_exact = min(10, len(queries))
        t = time.perf_counter()
        for q in queries[:nq_exact]:
            conn.execute("SELECT id FROM bench_items ORDER BY embedding <=> %s LIMIT 10", (q,)).fetchall()
        exact_qps = nq_exact / (time.perf_counter() - t)
        conn.execute("RESET enable_indexscan")
        print(f"exact scan through SQL: {exact_qps:.1f} queries/s")

        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT id FROM bench_items ORDER BY embedding <=> %s LIMIT 10", (queries[0],)))
        assert "bench_idx" in plan, plan
        lorag_rows = []
        with conn.cursor() as cur:
            for ef in efs:
                cur.execute(f"SET hnsw.ef_search = {ef}")
                for q in queries[:20]:  # warm the buffer cache and the plan
                    cur.execute(KNN, (q,), prepare=True).fetchall()
                results = []
                t = time.perf_counter()
                for q in queries:
                    results.append([r[0] for r in cur.execute(KNN, (q,), prepare=True).fetchall()])
                qps = len(queries) / (time.perf_counter() - t)
                lorag_rows.append((ef, recall(results, truth), qps))

    import hnswlib

    t = time.perf_counter()
    p = hnswlib.Index(space="cosine", dim=DIM)
    p.init_index(max_elements=args.n, M=16, ef_construction=64, random_seed=1)
    p.add_items(data, np.arange(args.n), num_threads=os.cpu_count())
    hbuild = time.perf_counter() - t
    p.set_num_threads(1)
    hnsw_rows = []
    for ef in efs:
        p.set_ef(max(ef, 10))
        for q in queries[:20]:
            p.knn_query(q, k=10)
        t = time.perf_counter()
        results = [p.knn_query(q, k=10)[0][0].tolist() for q in queries]
        qps = len(queries) / (time.perf_counter() - t)
        hnsw_rows.append((ef, recall(results, truth), qps))
    print(f"hnswlib: build {hbuild:.1f} s ({os.cpu_count()} threads)")

    print(f"\n{'ef_search':>9} | {'lorag recall':>12} {'lorag q/s':>10} | {'hnswlib recall':>14} {'hnswlib q/s':>11} | {'q/s ratio':>9} {'vs exact':>9}")
    for (ef, r, q), (_, hr, hq) in zip(lorag_rows, hnsw_rows):
        print(f"{ef:>9} | {r:>12.3f} {q:>10.0f} | {hr:>14.3f} {hq:>11.0f} | {q / hq:>9.2f} {q / exact_qps:>8.0f}x")
    best = [row for row in lorag_rows if row[1] >= 0.95]
    if best:
        ef, r, q = max(best, key=lambda row: row[2])
        print(f"\nlorag at recall >= 0.95: ef_search {ef}, recall {r:.3f}, {q:.0f} queries/s; build {build:.1f} s; index {size / 1e6:.0f} MB; build ratio vs hnswlib {build / hbuild:.2f}")


if __name__ == "__main__":
    main()
