# quota-ledger: every target installs what it needs into .venv first (pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/quota_ledger/v1/*.proto)

.PHONY: install run test test-postgres console protos protos-check docs lint bench soak crash browse clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## run: install everything and serve on 127.0.0.1:50051 with SQLite under ./data/
run: $(STAMP)
	$(BIN)/quota-ledger serve

## run-postgres: a local PostgreSQL cluster under ./data/pg (port 55432) and two ledger nodes
## on it, 127.0.0.1:50051 and 127.0.0.1:50052 (Ctrl-C stops both nodes; the cluster keeps
## running: python -m tests.pg_cluster stop --dir data/pg)
.PHONY: run-postgres
run-postgres: $(STAMP)
	@url=$$($(BIN)/python -m tests.pg_cluster start --dir data/pg --port $(or $(PGPORT),55432) --database ledger) || exit 1; \
	echo "two ledger nodes on $$url"; \
	$(BIN)/quota-ledger serve --listen 127.0.0.1:50052 --db "$$url" & node2=$$!; \
	trap "kill $$node2 2>/dev/null" EXIT INT TERM; \
	$(BIN)/quota-ledger serve --listen 127.0.0.1:50051 --db "$$url"

## test: install everything, check generated code, run the whole default suite
## (the console's browser tests need Debian's chromium at /usr/bin/chromium; .ci/run installs it)
test: $(STAMP) protos-check
	@test -x /usr/bin/chromium || echo "!!! BROWSER TESTS SKIPPED: no /usr/bin/chromium (apt-get install chromium) !!!"
	@command -v promtool >/dev/null || echo "!!! ALERTING RULE TESTS SKIPPED: no promtool (apt-get install prometheus) !!!"
	@$(BIN)/python -c 'import sys, tests.pg_cluster as p; sys.exit(p.find_bindir() is None)' || echo "!!! POSTGRESQL SUITE SKIPPED: no PostgreSQL server binaries (apt-get install postgresql) !!!"
	$(BIN)/python -m pytest -q -m "not slow"
	QUOTA_LEDGER_CLIENT_BATCHING=0 $(BIN)/python -m pytest -q -m "not slow" $(CLIENT_TESTS)

## The client suites run a second time with coalescing off, the clients' other setting
## (issue 18: every client test passes with either)
CLIENT_TESTS = tests/test_failopen.py tests/test_spool.py tests/test_client_package.py \
	tests/test_auth.py tests/test_concurrency.py tests/test_ledgerctl.py

## test-postgres: the PostgreSQL tests alone, in a throwaway cluster; fails (not skips)
## when no PostgreSQL server binaries are found (tests/pg_cluster.py)
test-postgres: $(STAMP)
	QUOTA_LEDGER_REQUIRE_PG=1 $(BIN)/python -m pytest -q -m "not slow" -k postgres

## console: the read-only web console on 127.0.0.1:8080 for the ledger on 127.0.0.1:50051
## (make run in another terminal; LEDGER_TOKEN is sent when the ledger has --tokens)
console: $(STAMP)
	$(BIN)/quota-ledger console --listen 127.0.0.1:$(or $(PORT),8080) --target $(or $(TARGET),127.0.0.1:50051)

## protos: regenerate the Python modules from protos/*.proto (never edit them by hand)
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
	  --mypy_out=protos --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy $(PROTO_FILES)

## protos-check: fail when the committed generated code drifts from the .proto files
protos-check: $(STAMP)
	rm -rf .protos-check && mkdir -p .protos-check
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.protos-check --grpc_python_out=.protos-check \
	  --mypy_out=.protos-check --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy $(PROTO_FILES)
	for f in $$(cd .protos-check && find . -type f); do \
	  cmp -s .protos-check/$$f protos/$$f || { echo "generated code drifted: protos/$$f (run make protos)"; exit 1; }; \
	done
	rm -rf .protos-check

## docs: regenerate docs/api.md from the .proto comments (a test fails when it drifts)
docs: $(STAMP)
	$(BIN)/python -m server.apidoc > docs/api.md

lint: $(STAMP)
	$(BIN)/ruff check ledger server clients tests

bench: $(STAMP)
	$(BIN)/python -m tests.bench
	$(BIN)/python -m tests.bench_client
	$(BIN)/python -m tests.bench_notices
	@if $(BIN)/python -c 'import sys, tests.pg_cluster as p; sys.exit(p.find_bindir() is None)'; then \
	  $(BIN)/python -m tests.bench_postgres; \
	else echo "!!! POSTGRESQL BENCH SKIPPED: no PostgreSQL server binaries (apt-get install postgresql) !!!"; fi

## bench-notices: Consume throughput with notices configured against without (issue 22)
.PHONY: bench-notices
bench-notices: $(STAMP)
	$(BIN)/python -m tests.bench_notices

## bench-postgres: the ledger on PostgreSQL, one node and two nodes, beside SQLite (issue 11)
.PHONY: bench-postgres
bench-postgres: $(STAMP)
	$(BIN)/python -m tests.bench_postgres

## bench-writer: the writer's own capacity, fed directly with no gRPC (issue 9), in µs per request for each phase (issue 19)
.PHONY: bench-writer
bench-writer: $(STAMP)
	$(BIN)/python -m tests.bench_writer

## bench-batches: ConsumeBatch x1,000, 4 in flight, COMPACT and FULL, hot and spread, with
## the commits over 100 ms read from the server's metrics (issue 19)
.PHONY: bench-batches
bench-batches: $(STAMP)
	$(BIN)/python -m tests.bench_batches

## bench-outage: a CAPTCHA-like load through a killed, restarted, hung and resumed ledger (issue 21)
.PHONY: bench-outage
bench-outage: $(STAMP)
	$(BIN)/python -m tests.bench_outage

## bench-client: 256 concurrent consume() calls from one AsyncLedgerClient, with and without batching
.PHONY: bench-client
bench-client: $(STAMP)
	$(BIN)/python -m tests.bench_client

soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests/test_soak.py

crash: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_crash.py

## histories: RUNS seeded runs (20) of SECONDS (60) each: two ledger nodes on a throwaway
## PostgreSQL cluster under faults, every operation recorded and the histories checked
## against a model of the rules (issue 23; docs/histories.md). SEED=K starts at seed K.
## QUOTA_LEDGER_PLANT=NAME plants a known bug in the nodes (make histories-bugs lists them).
.PHONY: histories histories-bugs
histories: $(STAMP)
	$(BIN)/python -m tests.histories --runs $(or $(RUNS),20) --seconds $(or $(SECONDS),60) \
	  $(if $(SEED),--seed $(SEED))

histories-bugs: $(STAMP)
	@$(BIN)/python -m tests.histories --list-bugs

## browse: the journal and derived tables in Datasette, read-only, with canned queries.
## Datasette gets a venv of its own: it needs pkg_resources, which the main venv's setuptools lacks.
BROWSE_VENV := .venv-browse
$(BROWSE_VENV)/.installed: constraints-browse.txt
	test -x $(BROWSE_VENV)/bin/python || $(PYTHON) -m venv $(BROWSE_VENV)
	$(BROWSE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r constraints-browse.txt
	touch $@

browse: $(BROWSE_VENV)/.installed
	$(BROWSE_VENV)/bin/datasette serve $(or $(DB),data/ledger.db) --metadata docs/datasette.json \
	  --host 127.0.0.1 --port $(or $(PORT),8001)

clean:
	rm -rf $(VENV) .protos-check .pytest_cache .hypothesis data

## bench-history: throughput and start time on a 10-million-row journal against an empty one
.PHONY: bench-history
bench-history: $(STAMP)
	$(BIN)/python -m tests.bench_history
