"""Crash safety of the hnsw index: a client inserts rows while the whole server is killed with
SIGKILL; after crash recovery every committed row is found through the index and the
verification function finds no problem. Runs last (it restarts the shared test server)."""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ROOT = Path(__file__).resolve().parents[1]


def server_processes(conn):
    data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    postmaster = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    return postmaster, [int(c) for c in children]


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigkill_during_inserts_loses_no_committed_row(dsn):
    rng = np.random.default_rng(99)
    data = rng.standard_normal((100_000, 32)).astype(np.float32)
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        c.execute("DROP TABLE IF EXISTS crash_t")
        c.execute("CREATE TABLE crash_t (id int PRIMARY KEY, embedding vector(32))")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO crash_t VALUES (%s, %s)", [(i, data[i]) for i in range(500)])
        c.execute("CREATE INDEX crash_idx ON crash_t USING hnsw (embedding vector_l2_ops)")
        postmaster, children = server_processes(c)

    committed, stop = [], threading.Event()

    def inserter():
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                register_vector(c)
                for i in range(500, len(data)):
                    if stop.is_set():
                        return
                    c.execute("INSERT INTO crash_t VALUES (%s, %s)", (i, data[i]))
                    committed.append(i)  # the commit returned: this row must survive
        except psycopg.Error:
            pass  # the server went away under us: expected

    t = threading.Thread(target=inserter)
    t.start()
    time.sleep(3)
    for pid in [postmaster, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop.set()
    t.join(timeout=30)
    deadline = time.time() + 30
    while any(alive(p) for p in [postmaster, *children]) and time.time() < deadline:
        time.sleep(0.2)
    assert len(committed) > 50, "the inserter should have committed rows before the kill"

    subprocess.run([str(ROOT / "scripts" / "pg.sh"), "start"], check=True)
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        assert c.execute("SELECT * FROM lorag.hnsw_check('crash_idx')").fetchall() == []
        # Durable: after recovery the index holds exactly one live element per row (VACUUM's
        # cleanup counts them into pg_class.reltuples).
        rows = c.execute("SELECT count(*) FROM crash_t").fetchone()[0]
        assert rows >= 500 + len(committed)
        assert set(committed) <= {r[0] for r in c.execute("SELECT id FROM crash_t")}
        c.execute("VACUUM crash_t")
        assert c.execute("SELECT reltuples::bigint FROM pg_class WHERE relname = 'crash_idx'").fetchone()[0] == rows
        # Reachable: an iterative scan that runs until the graph is exhausted returns every row.
        c.execute("SET enable_seqscan = off")
        c.execute("SET hnsw.iterative_scan = relaxed_order")
        c.execute("SET hnsw.max_scan_tuples = 1000000")
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN SELECT id FROM crash_t ORDER BY embedding <-> %s LIMIT 1000000", (data[0],)))
        assert "crash_idx" in plan, plan
        walked = [r[0] for r in c.execute("SELECT id FROM crash_t ORDER BY embedding <-> %s LIMIT 1000000", (data[0],))]
        assert len(walked) == len(set(walked)) == rows
        c.execute("RESET hnsw.iterative_scan")
        c.execute("RESET hnsw.max_scan_tuples")
        # Searchable: each row is found by a search for its own vector. Every element is
        # reachable (above), but a best-first search with ef 100 can still pass by one with few
        # in-edges, so allow 0.5% (0 of ~4,200 in six runs here; a lost write would miss more).
        c.execute("SET enable_seqscan = off")
        c.execute("SET hnsw.ef_search = 100")
        missing = []
        for i in list(range(500)) + committed:
            got = c.execute("SELECT id FROM crash_t ORDER BY embedding <-> %s LIMIT 1", (data[i],)).fetchone()
            if got is None or got[0] != i:
                missing.append(i)
        assert len(missing) <= 0.005 * (500 + len(committed)), f"{len(missing)} committed rows not found: {missing[:20]}"
        # and the index keeps working after recovery
        c.execute("INSERT INTO crash_t VALUES (%s, %s)", (len(data) - 1, data[-1]))
        assert c.execute("SELECT id FROM crash_t ORDER BY embedding <-> %s LIMIT 1", (data[-1],)).fetchone()[0] == len(data) - 1
