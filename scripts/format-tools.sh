#!/usr/bin/env bash
# Installs avifenc (Debian libavif-bin), which tests/test_formats.py uses to write a 10-bit AVIF: Pillow's own AVIF
# encoder writes 8-bit only. Quick no-op when it is present. Run as root (CI does): scripts/format-tools.sh
set -euo pipefail

if command -v avifenc >/dev/null 2>&1; then
    exit 0
fi
echo "installing avifenc (libavif-bin)"
sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends libavif-bin
