#!/usr/bin/env bash
# Installs the Debian packages of the named tools that are missing; a quick no-op when all are present.
#   scripts/apt-tools.sh TOOL=PACKAGE ...      e.g. scripts/apt-tools.sh avifenc=libavif-bin wrk=wrk
# The Makefile names what each target needs (make test: the container tools, Chromium, avifenc, wrk). Run as root (CI
# does) or with sudo. No recommends: they would pull in a Docker-compatible engine, fuse, fonts and extensions.
set -euo pipefail

missing=()
for pair in "$@"; do
    tool=${pair%%=*}
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 \
        || missing+=("${pair#*=}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "installing Debian packages: ${missing[*]}"
sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
