#!/usr/bin/env bash
# `make test`: every test, on the models of `make models`. Training the default reranker (in
# `make models`) takes 20-25 minutes and leaves part of the two cores idle, so it runs
# in the background while the tests that do not need it (the pure crates', the #[pg_test]s) build
# and run at a lower priority on what it leaves; the SQL-level tests, which rerank, follow.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH" PYTHON=.venv/bin/python
LOG=target/models.log
mkdir -p target

LORAG_TRAIN_RERANKER=no scripts/fetch-models.sh     # what the unit tests load
echo "==> the default reranker: training in the background if it is not there (log: $LOG)"
# its own process group (job control), so that a failing test stops it with everything it
# started; the same session, so that the scheduler weighs the two sides by their nice values
# (setsid would put it in an autogroup of its own, and the two would split the cores evenly)
set -m
scripts/fetch-models.sh >"$LOG" 2>&1 &
models=$!
trap 'kill -- -$models 2>/dev/null || true' EXIT

nice -n 10 make unit pgtest install-debug
echo "==> waiting for the default reranker (log: $LOG)"
if ! wait "$models"; then
    cat "$LOG"
    exit 1
fi
trap - EXIT
grep -E "nDCG|minilm-reranker" "$LOG" || true
make start sqltest
