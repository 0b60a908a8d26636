#!/usr/bin/env bash
# Installs (once) Debian's `prometheus` package, for its `promtool` (the metrics tests lint the
# exposition with `promtool check metrics`). Uses sudo when not root.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo "installing Debian's prometheus package for promtool (first time only)" >&2
run() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
run apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq --no-install-recommends prometheus >&2
command -v promtool >/dev/null
