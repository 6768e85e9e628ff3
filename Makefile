# The two commands that matter: `make demo` and `make test`. Both set up a fresh machine first
# (scripts/dev-env: Postgres, Redis, the local BigQuery, .env).
SHELL := /bin/bash
ENV := set -a && . ./.env && set +a
BIN := ./target/debug/tenantsync

.PHONY: demo test dev-env build lint fmt stop bench

dev-env:
	scripts/dev-env

build:
	cargo build -p tenantsync

## demo: sync three demo organizations into their own datasets (DEMO_SECONDS=N to stop after N s)
demo: dev-env build
	$(ENV) && $(BIN) migrate && $(BIN) demo

## test: unit and end-to-end tests against the real Postgres, Redis and a fresh local BigQuery,
## then the deployment checks (Helm chart, dashboards, alert rules)
test: build
	scripts/dev-env test
	scripts/test-cleanup
	scripts/run-tests
	scripts/check-deploy

## bench: the benchmarks of docs/benchmarks.md (release build, fresh databases each):
## idle scale (coordinator tick at 10,000 tenants × 10 tables), throughput (one worker vs a
## psycopg + google-cloud-bigquery reference, against a zero-cost insertAll sink), freshness
## (lag at 1,000 tenants × 4 tables, 1,000 rows/s), and write methods (insertAll vs the Storage
## Write API, back to back against zero-cost HTTP and gRPC sinks), and read cost (rows a
## `<t>_latest` read reads after 1, 10 and 100 rounds of updates, on the local BigQuery).
## The reference's venv: scripts/bench-env.
bench:
	scripts/dev-env test
	scripts/bench-env
	cargo build --release -p tenantsync -p tenantsync-tests
	set -a && . ./.env.test && set +a && ./target/release/bench_idle
	set -a && . ./.env.test && set +a && ./target/release/bench_throughput
	set -a && . ./.env.test && set +a && ./target/release/bench_freshness
	set -a && . ./.env.test && set +a && ./target/release/bench_write_api
	set -a && . ./.env.test && set +a && ./target/release/bench_read_cost

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

## stop: stop the local BigQuery started by dev-env (Postgres and Redis are left running)
stop:
	scripts/dev-env stop
