#!/usr/bin/env bash
# Lints the API (`buf lint`, rules in buf.yaml) and checks it for breaking changes against the
# previous commit (`buf breaking`), with the `buf` CLI installed (once, cached) from the npm
# registry as @bufbuild/buf.
#
#   scripts/buf.sh            lint, then breaking against the previous commit: HEAD~1 on a
#                             clean tree (what CI checks), HEAD while proto/ has uncommitted
#                             changes (what a pre-commit check wants); BUF_AGAINST overrides
#   scripts/buf.sh path       print the binary's path (installing it first)
#
# An intentional breaking change (there are no external users before 1.0) is landed by
# setting BUF_AGAINST to a commit that already has it, with the reason in the commit message.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.75.0
TOOLS_DIR=${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}
ROOT="$TOOLS_DIR/buf-$VERSION"
BIN="$ROOT/node_modules/.bin/buf"

install() {
  if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    return 0
  fi
  echo "installing @bufbuild/buf $VERSION into $ROOT (first time only)" >&2
  rm -rf "$ROOT.partial"
  mkdir -p "$ROOT.partial"
  npm install --prefix "$ROOT.partial" --no-audit --no-fund --no-save --silent \
    "@bufbuild/buf@$VERSION" >&2
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
}

install
if [ "${1-}" = path ]; then
  echo "$BIN"
  exit 0
fi
"$BIN" lint
if git diff --quiet HEAD -- proto; then
  against=${BUF_AGAINST:-HEAD~1}
else
  against=${BUF_AGAINST:-HEAD}
fi
if git rev-parse --verify --quiet "$against^{commit}" >/dev/null; then
  "$BIN" breaking --against ".git#ref=$(git rev-parse "$against"),subdir=proto"
else
  echo "buf breaking: $against is not in this clone's history; nothing to compare" >&2
  exit 1
fi
