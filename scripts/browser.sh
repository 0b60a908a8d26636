#!/usr/bin/env bash
# Installs (once) Debian's `chromium` and `chromium-driver` packages: the status-page test
# loads the page in a real headless browser, driven over WebDriver. Uses sudo when not root.
set -euo pipefail
if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "installing Debian's chromium and chromium-driver for the status-page test (first time only)" >&2
run() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
run apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
command -v chromedriver >/dev/null
