#!/usr/bin/env bash
# Installs Debian's Chromium for the demo page's browser test (tests/test_demo.py drives it with Playwright for Python,
# whose own browser download is unreachable offline). Quick no-op when it is present.
# Run as root (CI does): scripts/ci-browser.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "browser present: $(chromium --version 2>/dev/null || echo chromium)"
    exit 0
fi

echo "installing chromium (Debian package) for the demo page test"
sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# No recommends: the test runs it headless, it needs no fonts beyond what chromium depends on, no extensions.
$sudo apt-get install -y -q --no-install-recommends chromium
