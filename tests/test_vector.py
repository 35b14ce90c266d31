"""The vector type as a user sees it: through psql-equivalent SQL and through pgvector's own
Python client, unchanged. Every bad input must give an ERROR with the right SQLSTATE and leave
the server up."""
import struct

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conftest import assert_clean_error

RNG = np.random.default_rng(42)


def as_np(v):
    """pgvector-python returns numpy arrays or, in newer releases, `Vector` objects."""
    return v.to_numpy() if hasattr(v, "to_numpy") else np.asarray(v)


def scalar(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


# --- pgvector's Python client, unchanged -------------------------------------------------------

def test_pgvector_python_client_round_trip_and_search(conn, postmaster_started):
    register_vector(conn)
    conn.execute("DROP TABLE IF EXISTS items")
    conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, embedding vector(8))")
    data = RNG.standard_normal((200, 8)).astype(np.float32)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO items (embedding) VALUES (%s)", [(v,) for v in data])

    # text format
    rows = conn.execute("SELECT embedding FROM items ORDER BY id").fetchall()
    assert np.array_equal(np.stack([as_np(r[0]) for r in rows]), data)
    # binary format
    with conn.cursor(binary=True) as cur:
        rows = cur.execute("SELECT embedding FROM items ORDER BY id").fetchall()
    assert np.array_equal(np.stack([as_np(r[0]) for r in rows]), data)
    # binary parameters too
    with conn.cursor(binary=True) as cur:
        cur.execute("INSERT INTO items (embedding) VALUES (%b) RETURNING embedding", (data[0],))
        assert np.array_equal(as_np(cur.fetchone()[0]), data[0])
    conn.execute("DELETE FROM items WHERE id > 200")

    q = RNG.standard_normal(8).astype(np.float32)
    got = [r[0] for r in conn.execute(
        "SELECT id FROM items ORDER BY embedding <=> %s LIMIT 5", (q,)).fetchall()]
    cos = data @ q / (np.linalg.norm(data, axis=1) * np.linalg.norm(q))
    want = list(np.argsort(-cos)[:5] + 1)
    assert got == want

    got = [r[0] for r in conn.execute(
        "SELECT id FROM items ORDER BY embedding <-> %s LIMIT 5", (q,)).fetchall()]
    assert got == list(np.argsort(np.linalg.norm(data - q, axis=1))[:5] + 1)
    got = [r[0] for r in conn.execute(
        "SELECT id FROM items ORDER BY embedding <#> %s LIMIT 5", (q,)).fetchall()]
    assert got == list(np.argsort(-(data @ q))[:5] + 1)


def test_binary_wire_format_is_pgvectors(conn):
    raw = scalar(conn, "SELECT vector_send('[1.5,-2,3]')")
    assert bytes(raw) == struct.pack(">hh3f", 3, 0, 1.5, -2.0, 3.0)


def test_copy_binary_round_trip(conn):
    conn.execute("DROP TABLE IF EXISTS cp; CREATE TABLE cp (v vector(3))")
    conn.execute("INSERT INTO cp VALUES ('[1,2,3]'), ('[-0.5,1e-30,3e38]')")
    with conn.cursor() as cur:
        buf = bytearray()
        with cur.copy("COPY cp TO STDOUT (FORMAT binary)") as copy:
            for chunk in copy:
                buf += chunk
        cur.execute("CREATE TEMP TABLE cp2 (v vector(3))")
        with cur.copy("COPY cp2 FROM STDIN (FORMAT binary)") as copy:
            copy.write(bytes(buf))
    assert scalar(conn, "SELECT count(*) FROM cp2 JOIN cp USING (v)") == 2


def test_text_output_round_trips_bit_exactly(conn):
    register_vector(conn)
    v = (RNG.standard_normal(384) * 10.0 ** RNG.integers(-30, 30, 384)).astype(np.float32)
    text = scalar(conn, "SELECT %s::vector::text", (v,))
    back = scalar(conn, "SELECT %s::vector", (text,))
    assert np.array_equal(as_np(back).view(np.uint32), v.view(np.uint32))


# --- results equal the definitions (and pgvector's) -------------------------------------------

@pytest.mark.parametrize("dim", [1, 3, 7, 16, 31, 384, 1000])
def test_distances_match_numpy(conn, dim):
    register_vector(conn)
    a = RNG.standard_normal(dim).astype(np.float32)
    b = RNG.standard_normal(dim).astype(np.float32)
    l2, ip, cos, l1 = conn.execute(
        "SELECT %s::vector <-> %s, inner_product(%s::vector, %s), %s::vector <=> %s, l1_distance(%s::vector, %s)",
        (a, b, a, b, a, b, a, b)).fetchone()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert l2 == pytest.approx(np.linalg.norm(a64 - b64), rel=1e-5)
    assert ip == pytest.approx(a64 @ b64, rel=1e-4, abs=1e-4)
    assert cos == pytest.approx(1 - a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64), rel=1e-4, abs=1e-5)
    assert l1 == pytest.approx(np.abs(a64 - b64).sum(), rel=1e-5)
    assert scalar(conn, "SELECT %s::vector <#> %s", (a, b)) == -ip
    assert scalar(conn, "SELECT vector_norm(%s)", (a,)) == pytest.approx(np.linalg.norm(a64), rel=1e-6)


def test_cosine_of_zero_vector_is_nan(conn):
    assert np.isnan(scalar(conn, "SELECT '[0,0,0]'::vector <=> '[1,2,3]'"))
    assert scalar(conn, "SELECT l2_normalize('[0,0]')::text") == "[0,0]"


def test_functions_and_aggregates(conn):
    assert scalar(conn, "SELECT vector_dims('[1,2,3]'::vector)") == 3
    assert scalar(conn, "SELECT subvector('[1,2,3,4,5]'::vector, 2, 3)::text") == "[2,3,4]"
    assert scalar(conn, "SELECT subvector('[1,2,3,4,5]'::vector, 4, 10)::text") == "[4,5]"
    assert scalar(conn, "SELECT l2_normalize('[3,4]'::vector)::text") == "[0.6,0.8]"
    conn.execute("DROP TABLE IF EXISTS ag; CREATE TABLE ag (v vector(2))")
    conn.execute("INSERT INTO ag SELECT ARRAY[i, 2*i]::real[] FROM generate_series(1, 1000) i")
    assert scalar(conn, "SELECT avg(v)::text FROM ag") == "[500.5,1001]"
    assert scalar(conn, "SELECT sum(v)::text FROM ag") == "[500500,1.001e+06]"
    assert scalar(conn, "SELECT avg(v) FROM ag WHERE false") is None
    # parallel aggregation exercises the combine functions
    conn.execute("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0")
    assert scalar(conn, "SELECT avg(v)::text FROM ag") == "[500.5,1001]"
    assert scalar(conn, "SELECT sum(v)::text FROM ag") == "[500500,1.001e+06]"


def test_casts(conn):
    assert scalar(conn, "SELECT ARRAY[1,2,3]::integer[]::vector::text") == "[1,2,3]"
    assert scalar(conn, "SELECT ARRAY[1.5,2]::real[]::vector::text") == "[1.5,2]"
    assert scalar(conn, "SELECT ARRAY[1.5,2]::float8[]::vector::text") == "[1.5,2]"
    assert scalar(conn, "SELECT ARRAY[1.5,2]::numeric[]::vector::text") == "[1.5,2]"
    assert scalar(conn, "SELECT '[1.5,2]'::vector::real[]") == [1.5, 2.0]
    assert scalar(conn, "SELECT '[1.5,2]'::vector::float8[]") == [1.5, 2.0]
    assert [float(x) for x in scalar(conn, "SELECT '[1.5,2]'::vector::numeric[]")] == [1.5, 2.0]
    assert scalar(conn, "SELECT '[1.4,2.6]'::vector::integer[]") == [1, 3]
    # assignment casts into a typed column
    conn.execute("DROP TABLE IF EXISTS ca; CREATE TABLE ca (v vector(2))")
    conn.execute("INSERT INTO ca VALUES (ARRAY[1,2]), (ARRAY[1.5,2.5]::real[])")
    assert scalar(conn, "SELECT count(*) FROM ca") == 2


def test_comparison_and_btree(conn):
    assert scalar(conn, "SELECT '[1,2]'::vector < '[1,3]'")
    assert scalar(conn, "SELECT '[1,2]'::vector = '[1,2]'")
    assert scalar(conn, "SELECT '[1,2]'::vector < '[1,2,0]'")
    conn.execute("DROP TABLE IF EXISTS bt; CREATE TABLE bt (v vector(2))")
    conn.execute("INSERT INTO bt SELECT ARRAY[i % 10, i]::real[] FROM generate_series(1, 500) i")
    conn.execute("CREATE INDEX ON bt (v)")
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM bt WHERE v = '[3,13]'"))
    assert "Index" in plan
    assert scalar(conn, "SELECT count(*) FROM bt WHERE v = '[3,13]'") == 1
    ordered = [r[0] for r in conn.execute("SELECT v::text FROM bt ORDER BY bt.v LIMIT 3")]
    assert ordered == ["[0,10]", "[0,20]", "[0,30]"]


def test_typmod(conn):
    assert scalar(conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'ca'::regclass AND attname = 'v'") == "vector(2)"
    assert scalar(conn, "SELECT '[1,2,3]'::vector(3)::text") == "[1,2,3]"


# --- bad input: ERROR with SQLSTATE, never a crash --------------------------------------------

BAD = [
    ("INSERT INTO bad3 VALUES ('[1,2]')", "22000", "expected 3 dimensions, not 2"),
    ("INSERT INTO bad3 VALUES (ARRAY[1,2,3,4])", "22000", "expected 3 dimensions, not 4"),
    ("SELECT '[1,2]'::vector(3)", "22000", "expected 3 dimensions, not 2"),
    ("SELECT '[1,2]'::vector <-> '[1,2,3]'", "22000", "different vector dimensions 2 and 3"),
    ("SELECT '[1,2]'::vector <=> '[1,2,3]'", "22000", "different vector dimensions 2 and 3"),
    ("SELECT '[1,2]'::vector <#> '[1,2,3]'", "22000", "different vector dimensions"),
    ("SELECT l1_distance('[1,2]', '[1,2,3]')", "22000", "different vector dimensions"),
    ("SELECT '[1,2]'::vector + '[1,2,3]'", "22000", "different vector dimensions"),
    ("SELECT '[1,2]'::vector - '[1]'", "22000", "different vector dimensions"),
    ("SELECT '[1,2]'::vector * '[1]'", "22000", "different vector dimensions"),
    ("SELECT avg(v) FROM (VALUES ('[1,2]'::vector), ('[1]')) t(v)", "22000", "different vector dimensions"),
    ("SELECT sum(v) FROM (VALUES ('[1,2]'::vector), ('[1]')) t(v)", "22000", "different vector dimensions"),
    ("SELECT '[NaN,1]'::vector", "22000", "NaN not allowed in vector"),
    ("SELECT '[1,Infinity]'::vector", "22000", "infinite value not allowed in vector"),
    ("SELECT '[-inf]'::vector", "22000", "infinite value not allowed in vector"),
    ("SELECT ARRAY['NaN'::real]::vector", "22000", "NaN not allowed in vector"),
    ("SELECT ARRAY['Infinity'::float8]::vector", "22000", "infinite value not allowed"),
    ("SELECT ARRAY[1e300]::float8[]::vector", "22000", "infinite value not allowed"),
    ("SELECT '[1e39]'::vector", "22003", "out of range for type vector"),
    ("SELECT '[3e38]'::vector + '[3e38]'", "22003", "value out of range: overflow"),
    ("SELECT '[]'::vector", "22000", "vector must have at least 1 dimension"),
    ("SELECT '[ ]'::vector", "22000", "vector must have at least 1 dimension"),
    ("SELECT '{}'::real[]::vector", "22000", "vector must have at least 1 dimension"),
    ("SELECT subvector('[1,2,3]'::vector, 5, 1)", "22000", "vector must have at least 1 dimension"),
    ("SELECT subvector('[1,2,3]'::vector, 1, 0)", "22000", "vector must have at least 1 dimension"),
    ("SELECT array_fill(1, ARRAY[16001])::vector", "54000", "cannot have more than 16000 dimensions"),
    ("SELECT ('[' || repeat('1,', 16000) || '1]')::vector", "54000", "cannot have more than 16000 dimensions"),
    ("SELECT array_fill(1, ARRAY[8001])::vector || array_fill(1, ARRAY[8000])::vector", "54000", "cannot have more than 16000"),
    ("CREATE TABLE badt (v vector(16001))", "22023", "cannot exceed 16000"),
    ("CREATE TABLE badt (v vector(0))", "22023", "must be at least 1"),
    ("CREATE TABLE badt (v vector(3, 2))", "22023", "invalid type modifier"),
    ("SELECT '[1,,2]'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1,2'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT 'abc'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1,2]x'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1,2]]'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1 2]'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1,]'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT ''::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT '[1,a]'::vector", "22P02", "invalid input syntax for type vector"),
    ("SELECT ARRAY[1,NULL,3]::vector", "22004", "array must not contain nulls"),
    ("SELECT ARRAY[1.5,NULL]::numeric[]::vector", "22004", "array must not contain nulls"),
    ("SELECT ARRAY[NULL]::real[]::vector", "22004", "array must not contain nulls"),
    ("SELECT ARRAY[[1,2],[3,4]]::vector", "22000", "array must be 1-D"),
    ("SELECT ARRAY[1e40]::numeric[]::vector", "22003", "out of range"),
]


@pytest.mark.parametrize("sql,sqlstate,message", BAD, ids=[b[0][:60] for b in BAD])
def test_bad_input_is_a_clean_error(conn, sql, sqlstate, message):
    conn.execute("CREATE TABLE IF NOT EXISTS bad3 (v vector(3))")
    assert_clean_error(conn, sql, sqlstate, message)


def test_bad_binary_input_is_a_clean_error(conn):
    conn.execute("DROP TABLE IF EXISTS bb; CREATE TABLE bb (v vector)")
    cases = [
        (struct.pack(">hh2f", 2, 1, 1.0, 2.0), "22P03", "expected unused to be 0"),
        (struct.pack(">hh", 0, 0), "22000", "at least 1 dimension"),
        (struct.pack(">hh", -5, 0), "22000", "at least 1 dimension"),
        (struct.pack(">hh", 16001, 0), "54000", "more than 16000"),
        (struct.pack(">hhf", 1, 0, float("nan")), "22000", "NaN not allowed"),
        (struct.pack(">hhf", 2, 0, 1.0), "08P01", "insufficient data"),
    ]
    for payload, sqlstate, message in cases:
        with pytest.raises(psycopg.Error) as err:
            _send_binary(conn, payload)
        assert err.value.sqlstate == sqlstate, (payload, err.value)
        assert message in str(err.value)


def _send_binary(conn, payload):
    """Sends `payload` as a binary-format parameter of type vector, as a driver would."""
    oid = scalar(conn, "SELECT 'vector'::regtype::oid")
    with conn.cursor() as cur:
        cur.execute("SELECT %b::vector", (_Raw(payload, oid),))


class _Raw:
    def __init__(self, payload, oid):
        self.payload, self.oid = payload, oid


def _register_raw_dumper(conn_or_ctx):
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class RawDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj):
            return obj.payload

        def get_key(self, obj, format):
            return (type(obj), obj.oid)

        def upgrade(self, obj, format):
            d = RawDumper(type(obj))
            d.oid = obj.oid
            return d

    psycopg.adapters.register_dumper(_Raw, RawDumper)


_register_raw_dumper(None)


def test_server_never_restarted(conn, postmaster_started):
    """No test above may have crashed a backend: a crash makes the postmaster restart."""
    assert scalar(conn, "SELECT pg_postmaster_start_time()") == postmaster_started


def test_pg_dump_and_restore_move_vectors_unchanged(conn, dsn):
    """A dump of a table with vectors and an hnsw index restores bit-identically elsewhere."""
    import os
    import subprocess

    register_vector(conn)
    conn.execute("DROP TABLE IF EXISTS dumped")
    conn.execute("CREATE TABLE dumped (id int PRIMARY KEY, embedding vector(5))")
    data = (RNG.standard_normal((300, 5)) * 10.0 ** RNG.integers(-20, 20, (300, 5))).astype(np.float32)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO dumped VALUES (%s, %s)", list(enumerate(data)))
    conn.execute("CREATE INDEX dumped_idx ON dumped USING hnsw (embedding vector_l2_ops)")
    env = dict(os.environ, PGUSER="postgres")
    for fmt in ("plain", "custom"):
        target = f"lorag_restore_{fmt}"
        conn.execute(f"DROP DATABASE IF EXISTS {target} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {target}")
        dump = subprocess.run(["pg_dump", f"--format={fmt}", "-t", "dumped", "-d", conn.info.dbname],
                              env=env, capture_output=True, check=True).stdout
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-c", "CREATE EXTENSION lorag"], env=env, check=True)
        if fmt == "plain":
            subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", target], input=dump, env=env, check=True)
        else:
            subprocess.run(["pg_restore", "--exit-on-error", "-d", target], input=dump, env=env, check=True)
        with psycopg.connect(dsn.replace("dbname=lorag_test", f"dbname={target}"), autocommit=True) as other:
            register_vector(other)
            rows = other.execute("SELECT embedding FROM dumped ORDER BY id").fetchall()
            back = np.stack([as_np(r[0]) for r in rows])
            assert np.array_equal(back.view(np.uint32), data.view(np.uint32))
            assert other.execute("SELECT * FROM lorag.hnsw_check('dumped_idx')").fetchall() == []
        conn.execute(f"DROP DATABASE {target} WITH (FORCE)")
