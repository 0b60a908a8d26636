#!/usr/bin/env bash
# Installs (once, cached) and starts a DynamoDB-compatible server for the tests: Dynoxide,
# a DynamoDB emulator over SQLite, from crates.io.
#
#   scripts/dynamodb-local.sh install        build the pinned version into the cache
#   scripts/dynamodb-local.sh start FILE     start it on a free loopback port; writes the
#                                            endpoint URL to FILE and the pid to FILE.pid
#   scripts/dynamodb-local.sh stop FILE      stop the server started with FILE
#   scripts/dynamodb-local.sh path           print the binary's path (installing it first)
#
# The cache is $HERALD_TOOLS_DIR (default ~/.cache/herald-tools), outside the checkout, so a
# fresh clone on the same machine does not rebuild it (a cold build takes ~5 minutes).
set -euo pipefail

VERSION=3.2.0
TOOLS_DIR=${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}
ROOT="$TOOLS_DIR/dynoxide-$VERSION"
BIN="$ROOT/bin/dynoxide"

install() {
  if [ -x "$BIN" ]; then
    return 0
  fi
  echo "installing dynoxide-rs $VERSION into $ROOT (first time only)" >&2
  mkdir -p "$TOOLS_DIR"
  cargo install dynoxide-rs --version "$VERSION" --locked --no-default-features \
    --features native-sqlite,http-server,cli --root "$ROOT.partial" >&2
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local file=$1
  install
  local attempt port
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    "$BIN" serve --host 127.0.0.1 --port "$port" >"$file.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do
      if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "http://127.0.0.1:$port" >"$file"
        echo "$pid" >"$file.pid"
        echo "dynoxide $VERSION listening on http://127.0.0.1:$port (pid $pid)" >&2
        return 0
      fi
      if ! kill -0 "$pid" 2>/dev/null; then
        break
      fi
      sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    echo "dynoxide did not start on port $port (attempt $attempt):" >&2
    cat "$file.log" >&2 || true
  done
  echo "error: could not start dynoxide" >&2
  return 1
}

stop() {
  local file=$1
  if [ -f "$file.pid" ]; then
    kill "$(cat "$file.pid")" 2>/dev/null || true
    rm -f "$file.pid"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?usage: start FILE}" ;;
  stop) stop "${2:?usage: stop FILE}" ;;
  path) install && echo "$BIN" ;;
  *) echo "usage: $0 install|start FILE|stop FILE|path" >&2; exit 2 ;;
esac
