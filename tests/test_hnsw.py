"""The hnsw index through SQL: recall against the exact answer, filtered queries with iterative
scans, VACUUM and repair, concurrency, every bad input, and the verification function."""
import threading
import time

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conftest import assert_clean_error

DIM = 384


def mixture(n, nq, seed, dim=DIM):
    """Gaussian mixture as in benches/hnsw_bench.py: 10 points per centre, queries near centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10 + 1, dim), dtype=np.float32)
    x = np.repeat(centres, 10, axis=0)[:n] + rng.standard_normal((n, dim), dtype=np.float32)
    q = centres[rng.integers(0, max(n // 10, 1), nq)] + rng.standard_normal((nq, dim), dtype=np.float32)
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    return norm(x), norm(q)


def load(conn, table, data, extra=None):
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, category int, embedding vector({data.shape[1]}))")
    with conn.cursor().copy(f"COPY {table} (id, category, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "int4", "vector"])
        for i, v in enumerate(data):
            copy.write_row((i, i % 10 if extra is None else extra(i), v))


def check(conn, index):
    return [r[0] for r in conn.execute("SELECT * FROM lorag.hnsw_check(%s)", (index,))]


def uses_index(conn, sql, params=()):
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
    return "Index Scan" in plan


@pytest.fixture
def vconn(conn):
    register_vector(conn)
    return conn


def test_recall_on_20000_vectors_against_the_exact_scan(vconn):
    data, queries = mixture(20_000, 100, 7)
    load(vconn, "rc", data)
    vconn.execute("SET maintenance_work_mem = '512MB'")
    vconn.execute("CREATE INDEX rc_idx ON rc USING hnsw (embedding vector_cosine_ops)")
    assert check(vconn, "rc_idx") == []
    sql = "SELECT id FROM rc ORDER BY embedding <=> %s LIMIT 10"
    assert uses_index(vconn, sql, (queries[0],))
    hits = 0
    for q in queries:
        got = [r[0] for r in vconn.execute(sql, (q,))]
        s = data @ q
        want = set(np.argsort(-s)[:10].tolist())
        hits += len(set(got) & want)
    recall = hits / (10 * len(queries))
    assert recall >= 0.95, recall


@pytest.mark.parametrize("opclass,op,exact", [
    ("vector_l2_ops", "<->", lambda d, q: np.linalg.norm(d - q, axis=1)),
    ("vector_ip_ops", "<#>", lambda d, q: -(d @ q)),
    ("vector_cosine_ops", "<=>", lambda d, q: 1 - (d @ q) / np.linalg.norm(d, axis=1) / np.linalg.norm(q)),
])
def test_every_opclass_orders_like_its_operator(vconn, opclass, op, exact):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2000, 16)).astype(np.float32)
    load(vconn, "oc", data)
    vconn.execute(f"CREATE INDEX oc_idx ON oc USING hnsw (embedding {opclass}) WITH (m = 8, ef_construction = 40)")
    vconn.execute("SET hnsw.ef_search = 100")
    vconn.execute("SET enable_seqscan = off")  # a 2000-row table is cheaper to scan: force the index
    hits = 0
    for q in rng.standard_normal((30, 16)).astype(np.float32):
        sql = f"SELECT id FROM oc ORDER BY embedding {op} %s LIMIT 10"
        assert uses_index(vconn, sql, (q,))
        got = [r[0] for r in vconn.execute(sql, (q,))]
        want = set(np.argsort(exact(data, q))[:10].tolist())
        hits += len(set(got) & want)
    assert hits / 300 >= 0.95
    assert check(vconn, "oc_idx") == []


def test_filtered_query_returns_its_limit_with_iterative_scan(vconn):
    data, queries = mixture(10_000, 20, 11, dim=32)
    load(vconn, "fl", data)  # category = id % 10: each value matches 10 % of rows
    vconn.execute("CREATE INDEX fl_idx ON fl USING hnsw (embedding vector_cosine_ops)")
    vconn.execute("SET hnsw.ef_search = 40")
    vconn.execute("SET enable_seqscan = off")
    sql = "SELECT id FROM fl WHERE category = 3 ORDER BY embedding <=> %s LIMIT 40"
    assert uses_index(vconn, sql, (queries[0],))
    short = [len(vconn.execute(sql, (q,)).fetchall()) for q in queries]
    assert min(short) < 40, "without iterative scan the filter should starve the scan"
    for mode in ("relaxed_order", "strict_order"):
        vconn.execute(f"SET hnsw.iterative_scan = {mode}")
        for q in queries:
            rows = [r[0] for r in vconn.execute(sql, (q,))]
            assert len(rows) == 40, (mode, len(rows))
            assert all(r % 10 == 3 for r in rows)
            assert len(set(rows)) == 40
    # the scan stops at hnsw.max_scan_tuples
    vconn.execute("SET hnsw.max_scan_tuples = 50")
    assert len(vconn.execute(sql, (queries[0],)).fetchall()) < 40


def test_inserts_deletes_vacuum_and_reuse(vconn):
    data, queries = mixture(6000, 30, 13, dim=64)
    load(vconn, "vac", data[:3000])
    vconn.execute("CREATE INDEX vac_idx ON vac USING hnsw (embedding vector_cosine_ops)")
    with vconn.cursor() as cur:
        cur.executemany("INSERT INTO vac (id, category, embedding) VALUES (%s, 0, %s)",
                        [(i, data[i]) for i in range(3000, 4500)])
    assert check(vconn, "vac_idx") == []
    vconn.execute("DELETE FROM vac WHERE id % 3 = 0")
    vconn.execute("VACUUM vac")
    assert check(vconn, "vac_idx") == []
    size_before = vconn.execute("SELECT pg_relation_size('vac_idx')").fetchone()[0]
    with vconn.cursor() as cur:  # fewer than were freed: these must reuse the freed slots
        cur.executemany("INSERT INTO vac (id, category, embedding) VALUES (%s, 0, %s)",
                        [(i, data[i]) for i in range(4500, 5500)])
    assert vconn.execute("SELECT pg_relation_size('vac_idx')").fetchone()[0] <= size_before * 1.02
    assert check(vconn, "vac_idx") == []
    live = np.array([i for i in range(5500) if i >= 4500 or i % 3 != 0])
    vconn.execute("SET hnsw.ef_search = 80")
    hits = 0
    for q in queries:
        got = [r[0] for r in vconn.execute("SELECT id FROM vac ORDER BY embedding <=> %s LIMIT 10", (q,))]
        s = data[live] @ q
        want = set(live[np.argsort(-s)[:10]].tolist())
        hits += len(set(got) & want)
    assert hits / (10 * len(queries)) >= 0.9
    # every live row is still reachable through the index
    vconn.execute("SET enable_seqscan = off")
    for i in live[::97]:
        got = vconn.execute("SELECT id FROM vac ORDER BY embedding <=> %s LIMIT 1", (data[i],)).fetchone()[0]
        assert got == i


def test_nulls_and_zero_vectors_are_not_indexed(vconn):
    vconn.execute("DROP TABLE IF EXISTS nz; CREATE TABLE nz (id int, embedding vector(3))")
    vconn.execute("INSERT INTO nz VALUES (1, '[1,2,3]'), (2, NULL), (3, '[0,0,0]'), (4, '[3,2,1]')")
    vconn.execute("CREATE INDEX nz_cos ON nz USING hnsw (embedding vector_cosine_ops)")
    vconn.execute("CREATE INDEX nz_l2 ON nz USING hnsw (embedding vector_l2_ops)")
    vconn.execute("INSERT INTO nz VALUES (5, NULL), (6, '[0,0,0]')")
    vconn.execute("SET enable_seqscan = off")
    cos = [r[0] for r in vconn.execute("SELECT id FROM nz ORDER BY embedding <=> '[1,1,1]' LIMIT 10")]
    l2 = [r[0] for r in vconn.execute("SELECT id FROM nz ORDER BY embedding <-> '[1,1,1]' LIMIT 10")]
    assert sorted(cos) == [1, 4]
    assert sorted(l2) == [1, 3, 4, 6]
    assert check(vconn, "nz_cos") == [] and check(vconn, "nz_l2") == []


def test_unlogged_and_empty_tables(vconn):
    vconn.execute("DROP TABLE IF EXISTS ul; CREATE UNLOGGED TABLE ul (id int, embedding vector(3))")
    vconn.execute("CREATE INDEX ul_idx ON ul USING hnsw (embedding vector_l2_ops)")
    vconn.execute("SET enable_seqscan = off")
    assert vconn.execute("SELECT count(*) FROM (SELECT id FROM ul ORDER BY embedding <-> '[1,1,1]' LIMIT 5) s").fetchone()[0] == 0
    vconn.execute("INSERT INTO ul SELECT i, ARRAY[i, i, i] FROM generate_series(1, 100) i")
    assert vconn.execute("SELECT id FROM ul ORDER BY embedding <-> '[7,7,7]' LIMIT 1").fetchone()[0] == 7
    assert check(vconn, "ul_idx") == []


def test_untyped_column_takes_its_dimensions_from_the_first_vector(vconn):
    vconn.execute("DROP TABLE IF EXISTS ut; CREATE TABLE ut (id int, embedding vector)")
    vconn.execute("CREATE INDEX ut_idx ON ut USING hnsw (embedding vector_l2_ops)")
    vconn.execute("INSERT INTO ut VALUES (1, '[1,2,3]')")
    with pytest.raises(psycopg.Error) as err:
        vconn.execute("INSERT INTO ut VALUES (2, '[1,2,3,4]')")
    assert err.value.sqlstate == "22000" and "expected 3 dimensions, not 4" in str(err.value)
    assert err.value.diag.message_hint and "vector(3)" in err.value.diag.message_hint


BAD = [
    ("CREATE INDEX ON bad_h USING hnsw (embedding vector_l2_ops) WITH (m = 1)", "22023", "out of bounds"),
    ("CREATE INDEX ON bad_h USING hnsw (embedding vector_l2_ops) WITH (m = 101)", "22023", "out of bounds"),
    ("CREATE INDEX ON bad_h USING hnsw (embedding vector_l2_ops) WITH (ef_construction = 3)", "22023", "out of bounds"),
    ("CREATE INDEX ON bad_h USING hnsw (embedding vector_l2_ops) WITH (ef_construction = 1001)", "22023", "out of bounds"),
    ("CREATE INDEX ON bad_h USING hnsw (embedding vector_l2_ops) WITH (foo = 1)", "22023", "unrecognized parameter"),
    ("CREATE INDEX ON bad_mixed USING hnsw (embedding vector_l2_ops)", "22000", "expected 2 dimensions, not 3"),
    ("CREATE INDEX ON bad_wide USING hnsw (embedding vector_l2_ops)", "54000", "more than 2000 dimensions"),
    ("INSERT INTO bad_h VALUES (2, '[1,2]')", "22000", "expected 3 dimensions, not 2"),
    ("SET hnsw.ef_search = 0", "22023", "outside the valid range"),
    ("SET hnsw.iterative_scan = sideways", "22023", "invalid value"),
    ("SELECT * FROM lorag.hnsw_check('bad_h')", "42809", "is not an index"),
    ("SELECT * FROM lorag.hnsw_check('bad_h_btree')", "42809", "needs an hnsw index"),
]


@pytest.mark.parametrize("sql,sqlstate,message", BAD, ids=[b[0][:70] for b in BAD])
def test_bad_input_is_a_clean_error(vconn, sql, sqlstate, message):
    vconn.execute("DROP TABLE IF EXISTS bad_h, bad_mixed, bad_wide")
    vconn.execute("CREATE TABLE bad_h (id int, embedding vector(3))")
    vconn.execute("CREATE INDEX bad_h_idx ON bad_h USING hnsw (embedding vector_l2_ops)")
    vconn.execute("CREATE INDEX bad_h_btree ON bad_h (id)")
    vconn.execute("CREATE TABLE bad_mixed (id int, embedding vector)")
    vconn.execute("INSERT INTO bad_mixed VALUES (1, '[1,2]'), (2, '[1,2,3]')")
    vconn.execute("CREATE TABLE bad_wide (id int, embedding vector(2001))")
    vconn.execute("INSERT INTO bad_wide SELECT 1, array_fill(1, ARRAY[2001])::vector")
    assert_clean_error(vconn, sql, sqlstate, message)


def test_concurrent_inserts_deletes_searches_and_vacuum(dsn):
    data, queries = mixture(8000, 40, 17, dim=64)
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        load(c, "cc", data[:2000])
        c.execute("CREATE INDEX cc_idx ON cc USING hnsw (embedding vector_cosine_ops)")
    errors, stop = [], time.time() + 12
    searches, short = [0], [0]
    next_id = iter(range(2000, 8000))
    lock = threading.Lock()

    def worker(kind):
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                register_vector(c)
                while time.time() < stop:
                    if kind == "insert":
                        with lock:
                            batch = [next(next_id, None) for _ in range(20)]
                        batch = [i for i in batch if i is not None]
                        if not batch:
                            return
                        with c.cursor() as cur:
                            cur.executemany("INSERT INTO cc (id, category, embedding) VALUES (%s, 0, %s)", [(i, data[i]) for i in batch])
                    elif kind == "delete":
                        c.execute("DELETE FROM cc WHERE id IN (SELECT id FROM cc WHERE id % 7 = 0 LIMIT 30)")
                    elif kind == "search":
                        q = queries[np.random.randint(len(queries))]
                        n = len(c.execute("SELECT id FROM cc ORDER BY embedding <=> %s LIMIT 10", (q,)).fetchall())
                        with lock:
                            searches[0] += 1
                            short[0] += n < 10
                    else:
                        c.execute("VACUUM cc")
                        time.sleep(0.5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{kind}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in ["insert", "insert", "insert", "delete", "search", "search", "vacuum"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Every search has 10 visible rows to find. (An insert used to link a new element layer by
    # layer, so a concurrent search could descend into it before its lower lists were written
    # and come back empty: a few in every 40,000 searches here.)
    assert searches[0] > 100 and short[0] == 0, (short[0], searches[0])
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        c.execute("VACUUM cc")
        assert check(c, "cc_idx") == []
        ids = np.array(sorted(r[0] for r in c.execute("SELECT id FROM cc")))
        c.execute("SET hnsw.ef_search = 100")
        hits = 0
        for q in queries:
            got = [r[0] for r in c.execute("SELECT id FROM cc ORDER BY embedding <=> %s LIMIT 10", (q,))]
            s = data[ids] @ q
            hits += len(set(got) & set(ids[np.argsort(-s)[:10]].tolist()))
        assert hits / (10 * len(queries)) >= 0.9


def test_build_beyond_maintenance_work_mem_continues_on_disk(vconn):
    data, queries = mixture(3000, 30, 23, dim=16)
    load(vconn, "mw", data)
    vconn.execute("SET maintenance_work_mem = '1MB'")
    notices = []
    # a Diagnostic is only valid inside the handler: copy what we need
    vconn.add_notice_handler(lambda d: notices.append((d.message_primary or "", d.message_hint or "")))
    vconn.execute("CREATE INDEX mw_idx ON mw USING hnsw (embedding vector_cosine_ops)")
    assert any("no longer fits into maintenance_work_mem" in m for m, _ in notices), notices
    assert any("maintenance_work_mem" in h for _, h in notices), notices
    assert check(vconn, "mw_idx") == []
    vconn.execute("SET enable_seqscan = off")
    vconn.execute("SET hnsw.ef_search = 64")
    hits = 0
    for q in queries:
        got = [r[0] for r in vconn.execute("SELECT id FROM mw ORDER BY embedding <=> %s LIMIT 10", (q,))]
        hits += len(set(got) & set(np.argsort(-(data @ q))[:10].tolist()))
    assert hits / (10 * len(queries)) >= 0.9
