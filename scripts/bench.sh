#!/usr/bin/env bash
# `make bench [ARGS='...']`: the load benchmark (benches/load). With `--store dynamodb` it
# installs (once, cached) and starts the local DynamoDB-compatible server first.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ " ${args[*]-} " == *" dynamodb "* || " ${args[*]-} " == *"--store=dynamodb"* ]]; then
  state=$(mktemp -d)
  trap 'scripts/dynamodb-local.sh stop "$state/endpoint"; rm -rf "$state"' EXIT
  scripts/dynamodb-local.sh start "$state/endpoint"
  HERALD_BENCH_DYNAMODB_ENDPOINT=$(cat "$state/endpoint")
  export HERALD_BENCH_DYNAMODB_ENDPOINT
fi
cargo bench --bench load -- "${args[@]}"
