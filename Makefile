# session-worker — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
BIN := target/debug/session-worker
SIM_LISTEN ?= 127.0.0.1:8089
CONFIG ?= config/local.toml
PODS ?= 1
# The build `make bench` compares the end-to-end rate against: b81ea71, the code before the
# restructure and the fleet ledger (the reference of the "lighter request path" goals).
BENCH_BEFORE_REV ?= b81ea71

.PHONY: all build broker browser run sim test fmt lint bench chaos deploy-check clean

all: build

build:
	cargo build

## broker: make sure RabbitMQ answers on 127.0.0.1:5672 (starts it if installed)
broker:
	@scripts/ensure-broker.sh

## browser: Debian's chromium and playwright-core for the console's browser test (installs them
## as root on Debian)
browser:
	@scripts/ensure-browser.sh

## run: broker + simulator + worker on config/local.toml, with sample traffic; Ctrl-C stops all
## (PODS=3: a local fleet of three worker pods on the same queues)
run: broker build
	@scripts/run-local.sh "$(BIN)" "$(CONFIG)" "$(SIM_LISTEN)" "$(PODS)"

## sim: only the Genesys Cloud simulator
sim: build
	$(BIN) sim --listen $(SIM_LISTEN)

## test: unit and integration tests (needs the broker and, for the console's browser test,
## chromium and playwright-core; `make broker` and `make browser` set them up)
test: broker browser
	cargo test --lib --bins --tests -- --test-threads=4

## bench: throughput against a bare-consumer baseline and the pre-ledger build, measured in the
## same run; ledger restore rate; fleet rate sharing; web_messaging vs conversations; the console
## with 100,000 dead letters (release build)
bench: broker browser
	scripts/build-before.sh $(BENCH_BEFORE_REV) target/bench/session-worker-before
	BENCH_BEFORE_BIN=$(CURDIR)/target/bench/session-worker-before cargo bench --bench pipeline
	cargo bench --bench fleet
	cargo bench --bench backends
	cargo bench --bench console

## chaos: fault drills (SIGKILL, broker restart, faulty API, malformed input, webhook outage)
chaos: broker
	cargo bench --bench chaos

## deploy-check: manifests and compose parse and reference existing config keys and ports
deploy-check:
	cargo test --test deploy

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --no-default-features --lib --bins -- -D warnings  # the production build: no simulator

clean:
	cargo clean
	rm -rf data/
