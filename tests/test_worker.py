"""The shared model worker as several processes see it: one model process serves every
connection and batches their requests; a SIGKILL of it costs one ERROR and no cluster restart;
cancel and statement_timeout stop a long request and the work behind it; a worker that is
(re)starting makes callers wait, not fail; and without shared_preload_libraries everything
still works in-backend after one NOTICE."""
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIG = "SELECT count(*) FROM (SELECT unnest(embed(array_agg(repeat('word ' || i || ' ', 40)))) FROM generate_series(1, 4000) i) s"


def status(conn):
    names = ["mode", "device", "models", "memory", "queue", "served", "pid", "batches", "batched_texts",
             "decode_steps", "decoded_streams"]
    return dict(zip(names, conn.execute("SELECT * FROM lorag.worker_status()").fetchone()))


def supervisor(model_pid):
    """The model process's parent: the lorag model worker."""
    return int(Path(f"/proc/{model_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(pred, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_one_model_process_serves_every_connection(dsn):
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        a.execute("SELECT embed('from a')")
        b.execute("SELECT embed('from b')")
        sa, sb = status(a), status(b)
        assert sa["mode"].startswith("worker") and sa["pid"] == sb["pid"]
        backends = {a.execute("SELECT pg_backend_pid()").fetchone()[0], b.execute("SELECT pg_backend_pid()").fetchone()[0]}
        assert sa["pid"] not in backends
        # the backends hold no model: their memory stays far below the model process's
        for pid in backends:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
            assert rss < sa["memory"], (rss, sa["memory"])


def test_concurrent_requests_are_batched_together(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT embed('warm up')")
        before = status(c)

    def client(k):
        with psycopg.connect(dsn, autocommit=True) as c:
            for i in range(12):
                c.execute("SELECT embed(%s)", (f"client {k} asks question number {i} about wings",))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(dsn, autocommit=True) as c:
        after = status(c)
    texts = after["batched_texts"] - before["batched_texts"]
    passes = after["batches"] - before["batches"]
    assert texts == 96
    assert texts / passes > 1.5, f"{texts} texts in {passes} passes: requests were not batched"


def test_sigkill_of_the_model_process_costs_one_error_not_the_cluster(dsn):
    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(dsn, autocommit=True) as victim:
        started = other.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        other.execute("SELECT embed('load the model')")
        pid = status(other)["pid"]
        result = {}

        def run():
            t0 = time.monotonic()
            try:
                victim.execute(BIG)
                result["ok"] = True
            except psycopg.Error as e:
                result["error"] = e
            result["t"] = time.monotonic() - t0

        t = threading.Thread(target=run)
        t.start()
        assert wait_for(lambda: status(other)["queue"] > 0)
        killed_at = time.monotonic()
        os.kill(pid, 9)
        t.join(10)
        assert not t.is_alive(), "the backend hung after its model process died"
        e = result.get("error")
        assert e is not None and e.sqlstate == "58000" and "model process ended" in str(e), result
        assert e.diag.message_hint and "run the statement again" in e.diag.message_hint
        assert time.monotonic() - killed_at < 2.0
        # nothing else noticed: same postmaster, both sessions alive, the next call works
        assert other.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started
        assert victim.execute("SELECT 1").fetchone()[0] == 1
        assert victim.execute("SELECT vector_dims(embed('after the crash'))").fetchone()[0] == 384
        assert status(other)["pid"] != pid


@pytest.mark.parametrize("how", ["statement_timeout", "cancel"])
def test_a_cancelled_request_stops_promptly_and_is_not_computed_for_nobody(dsn, how):
    with psycopg.connect(dsn, autocommit=True) as c, psycopg.connect(dsn, autocommit=True) as watcher:
        c.execute("SELECT embed('load the model')")
        before = status(watcher)["batched_texts"]
        if how == "statement_timeout":
            c.execute("SET statement_timeout = '1s'")
        else:
            threading.Timer(1.0, c.cancel).start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute(BIG)
        at_cancel = status(watcher)["batched_texts"]
        assert time.monotonic() - t0 < 2.0
        c.execute("RESET statement_timeout")
        assert wait_for(lambda: status(watcher)["queue"] == 0, 2.0), "the cancelled request stayed queued"
        # the pass running at the cancel finishes (its result is discarded), and at most the one
        # that started before the model process saw the hang-up; nothing after them runs
        time.sleep(2.5)
        done = status(watcher)["batched_texts"]
        time.sleep(1.0)
        assert status(watcher)["batched_texts"] == done, "the model process kept computing for a cancelled query"
        assert done - at_cancel <= 2 * 32, f"{done - at_cancel} texts computed after the cancel"
        assert done - before < 4000 // 4, f"{done - before} of 4000 texts computed for a cancelled query"
        assert c.execute("SELECT vector_dims(embed('still works'))").fetchone()[0] == 384


def test_a_restarting_worker_makes_callers_wait_not_fail(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT embed('load the model')")
        sup = supervisor(status(c)["pid"])
        started = c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        os.kill(sup, signal.SIGTERM)  # what pg_terminate_backend() sends
        assert wait_for(lambda: not Path(f"/proc/{sup}").exists(), 5)
        # the postmaster starts the worker again after bgw_restart_time (5 s); meanwhile embed() waits
        t0 = time.monotonic()
        assert c.execute("SELECT vector_dims(embed('while restarting'))").fetchone()[0] == 384
        assert time.monotonic() - t0 < 10
        assert c.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started
        assert supervisor(status(c)["pid"]) != sup


def test_use_worker_off_gives_the_same_embeddings_in_backend(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        shared = c.execute("SELECT embed('the same sentence')::text").fetchone()[0]
        c.execute("SET lorag.use_worker = off")
        assert status(c)["mode"].startswith("in-backend")
        local = c.execute("SELECT embed('the same sentence')::text").fetchone()[0]
        a = [float(x) for x in shared.strip("[]").split(",")]
        b = [float(x) for x in local.strip("[]").split(",")]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        c.execute("RESET lorag.use_worker")
    with psycopg.connect(dsn, autocommit=True) as plain:
        plain.execute("CREATE ROLE lorag_plain_user LOGIN") if not plain.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = 'lorag_plain_user'").fetchone() else None
        plain.execute("SET ROLE lorag_plain_user")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            plain.execute("SET lorag.use_worker = off")


def _as_postgres(args, **kw):
    if os.geteuid() == 0:
        args = ["sudo", "-u", "postgres"] + args
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def test_without_preload_everything_works_after_one_notice(tmp_path_factory):
    """A second, throwaway server without shared_preload_libraries."""
    bindir = Path(subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    data = Path("/tmp/lorag-test-nopreload")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = 28816
    models = os.environ.get("LORAG_MODEL_DIR", str(ROOT / "models"))
    _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "start",
                  "-o", f"-p {port} -k /tmp -c listen_addresses='' -c lorag.model_dir='{models}'"])
    try:
        with psycopg.connect(f"host=/tmp port={port} user=postgres dbname=postgres", autocommit=True) as c:
            notices = []
            c.add_notice_handler(lambda d: notices.append((d.message_primary or "", d.message_hint or "")))
            c.execute("CREATE EXTENSION lorag")
            assert c.execute("SELECT vector_dims(embed('first'))").fetchone()[0] == 384
            assert c.execute("SELECT vector_dims(embed('second'))").fetchone()[0] == 384
            assert c.execute("SELECT count(*) FROM chunk('One. Two.', 4, 0)").fetchone()[0] >= 1
            mine = [n for n in notices if "model worker" in n[0]]
            assert len(mine) == 1, notices
            assert "shared_preload_libraries" in mine[0][1]
            s = status(c)
            assert s["mode"].startswith("in-backend") and s["pid"] == c.execute("SELECT pg_backend_pid()").fetchone()[0]
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(data, ignore_errors=True)
