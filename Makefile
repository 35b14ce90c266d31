# lorag: the two commands of the README, and their parts.
#   make demo   set up, build, install, start a local PostgreSQL with lorag and show it working
#   make test   set up and run every test (pure crates, #[pg_test], SQL-level tests)
SHELL := /bin/bash
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PATH := $(HOME)/.cargo/bin:$(PATH)
PG := scripts/pg.sh
PGENV = eval "$$($(PG) env)"
PGRX_TEST_DATA := $(CURDIR)/target/pgrx-test-pgdata

.PHONY: demo test setup models install install-debug start stop psql unit pgtest sqltest bench bench-hnsw bench-embed bench-rag bench-lora bench-rerank

demo: setup models install start
	$(PGENV) && $(PG) psql -f examples/demo.sql

# the models, then unit and #[pg_test]s beside the default reranker's training, then SQL-level
test: setup
	scripts/test.sh

setup:
	scripts/setup.sh

# the default models, under ./models, checksums verified
models:
	PYTHON=.venv/bin/python scripts/fetch-models.sh

install:
	cargo pgrx install --release --pg-config $(PG_CONFIG)

install-debug:
	cargo pgrx install --pg-config $(PG_CONFIG)

start:
	$(PG) start

stop:
	$(PG) stop

psql:
	$(PGENV) && $(PG) psql

# the pure crates, without PostgreSQL
unit:
	cargo test --workspace --exclude lorag

# #[pg_test]s in a temporary cluster that cargo-pgrx runs as the postgres user
pgtest:
	mkdir -p $(PGRX_TEST_DATA)
	if [ "$$(id -u)" = 0 ]; then chown postgres:postgres $(PGRX_TEST_DATA); chmod o+x $(CURDIR) $(CURDIR)/target; fi
	cargo pgrx test pg15 $(if $(filter 0,$(shell id -u)),--runas postgres) --pgdata $(PGRX_TEST_DATA)

# SQL-level tests against the installed extension on the local server
sqltest:
	$(PGENV) && .venv/bin/pytest -q tests

bench:
	cargo bench -p lorag-vector --bench distance

bench-hnsw: install start
	$(PGENV) && .venv/bin/pip install -q hnswlib && .venv/bin/python benches/hnsw_bench.py

bench-embed: models install start
	$(PGENV) && .venv/bin/pip install -q onnxruntime tokenizers && .venv/bin/python benches/embed_bench.py

bench-lora: models install start
	cargo bench -p lorag-models --bench lora_train
	$(PGENV) && .venv/bin/python benches/lora_evidence.py

bench-rerank: models install start
	$(PGENV) && .venv/bin/pip install -q onnxruntime==1.32.0 tokenizers && .venv/bin/python benches/rerank_bench.py

bench-rag: models install start
	$(PGENV) && .venv/bin/python benches/rag_bench.py
