# Herald. `make run` starts the broker on the embedded store; `make test` runs every test.
CARGO ?= cargo

.PHONY: run test chaos bench fuzz lint fmt build release

## Run the broker on 127.0.0.1:50051 with the embedded store in ./herald-data.
run:
	$(CARGO) run --release -- serve

## Every test, on both stores: installs (once, cached) and starts a local DynamoDB-compatible
## server, then runs unit, conformance and end-to-end tests (real herald processes and receivers).
test:
	scripts/test.sh

## The chaos test, long form: three instances on one table, faults every 20 s, judged by
## scripts/chaos_check.py; HERALD_CHAOS_SECONDS sets the length (default 120).
chaos:
	HERALD_CHAOS_SECONDS=$${HERALD_CHAOS_SECONDS:-120} scripts/test.sh --test it chaos -- --nocapture

## The load benchmark; e.g. make bench ARGS='--store dynamodb --events-per-topic 10'.
bench:
	scripts/bench.sh $(ARGS)

## The property tests of every parser and matcher (tests/properties.rs) with many more cases
## than `make test` runs: PROPTEST_CASES (default 100000, about 20 s) per property.
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} $(CARGO) test --release --test properties

## Formatting, clippy, and the API's `buf lint` and `buf breaking` (against the previous
## commit; `buf` installs once from the npm registry), as CI runs them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --features fault-injection -- -D warnings
	$(CARGO) clippy -- -D warnings
	scripts/buf.sh

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release
