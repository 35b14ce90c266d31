"""Fixtures for the SQL-level tests: they run against the installed extension on the local
server that scripts/pg.sh starts (PGHOST/PGPORT from the environment, see the Makefile)."""
import os

import psycopg
import pytest

TEST_DB = "lorag_test"


def _dsn(dbname):
    return (
        f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} "
        f"user={os.environ.get('PGUSER', 'postgres')} dbname={dbname}"
    )


@pytest.fixture(scope="session")
def dsn():
    with psycopg.connect(_dsn("postgres"), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {TEST_DB}")
    with psycopg.connect(_dsn(TEST_DB), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION lorag")
    return _dsn(TEST_DB)


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(params=["worker", "in-backend"])
def mconn(conn, request):
    """A test of model work runs twice: through the shared model worker (the test server preloads
    lorag), and inside the backend with the worker switched off for the session."""
    if request.param == "in-backend":
        conn.execute("SET lorag.use_worker = off")
    return conn


def assert_clean_error(conn, sql, sqlstate, message):
    """`sql` fails with `sqlstate` and `message`, without a Rust backtrace, and the session lives on."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(sql)
    assert err.value.sqlstate == sqlstate, err.value
    assert message in str(err.value)
    assert "pgrx" not in str(err.value), "no Rust backtrace in what users see"
    assert conn.execute("SELECT 1").fetchone()[0] == 1


@pytest.fixture(scope="session")
def postmaster_started(dsn):
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
