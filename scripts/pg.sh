#!/usr/bin/env bash
# A local PostgreSQL for lorag: data directory inside the project, a port that does not clash
# with a system server on 5432, run as a non-root OS user (`postgres` when we are root).
#   scripts/pg.sh start | stop | psql [args] | env
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
BINDIR="$("$PG_CONFIG" --bindir)"
export PGPORT="${LORAG_PGPORT:-28815}"
export PGHOST="${LORAG_PGHOST:-/tmp}"
PGDATA="${LORAG_PGDATA:-$ROOT/.pgdata}"
export PGDATABASE="${LORAG_PGDATABASE:-lorag}"

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        sudo -u postgres -E env "PATH=$PATH" "$@"
    else
        "$@"
    fi
}

# The postgres user must be able to reach a data directory inside a root-owned checkout.
make_reachable() {
    local d="$1"
    while [ "$d" != / ]; do
        if [ "$(id -u)" = 0 ] && ! sudo -u postgres test -x "$d"; then chmod o+x "$d"; fi
        d="$(dirname "$d")"
    done
}

start() {
    if [ "$(id -u)" = 0 ]; then
        mkdir -p "$PGDATA"
        chown postgres:postgres "$PGDATA"
        chmod 700 "$PGDATA"
        make_reachable "$PGDATA"
    fi
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        as_owner "$BINDIR/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
        cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PGHOST'
shared_buffers = 512MB
maintenance_work_mem = 1GB
max_parallel_maintenance_workers = 1
lorag.model_dir = '$ROOT/models'
lorag.onnxruntime_library = '$ROOT/models/onnxruntime/libonnxruntime.so.1.32.0'
# one model worker for the whole server (lorag works without it, each connection loading its own models)
shared_preload_libraries = 'lorag'
CONF
    fi
    # (data directories made before rerankers existed lack this line)
    grep -q '^lorag.onnxruntime_library' "$PGDATA/postgresql.conf" ||
        echo "lorag.onnxruntime_library = '$ROOT/models/onnxruntime/libonnxruntime.so.1.32.0'" >>"$PGDATA/postgresql.conf"
    [ -d "$ROOT/models" ] && [ "$(id -u)" = 0 ] && make_reachable "$ROOT/models"
    if ! as_owner "$BINDIR/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        # Rust backtraces belong in a debugger, not in users' error DETAILs.
        RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 as_owner "$BINDIR/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w start >/dev/null
    fi
    "$BINDIR/psql" -U postgres -d postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = '$PGDATABASE'" | grep -q 1 ||
        "$BINDIR/createdb" -U postgres "$PGDATABASE"
    echo "PostgreSQL running: psql -h $PGHOST -p $PGPORT -U postgres $PGDATABASE"
}

stop() {
    [ -f "$PGDATA/PG_VERSION" ] && as_owner "$BINDIR/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    psql) shift; exec "$BINDIR/psql" -U postgres -v ON_ERROR_STOP=1 "$@" ;;
    env) echo "export PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=postgres PGDATABASE=$PGDATABASE" ;;
    *) echo "usage: $0 start|stop|psql|env" >&2; exit 2 ;;
esac
