#!/usr/bin/env bash
# Installs the OCI tools the container test needs (buildah builds, podman runs, runc is the runtime that works in this
# sandbox, debootstrap builds the base image when no registry is reachable). Quick no-op when they are present.
# Run as root (CI does): scripts/ci-container-tools.sh
set -euo pipefail

tools=(buildah podman runc debootstrap)
missing=()
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "container tools present: ${tools[*]}"
    exit 0
fi

echo "installing container tools: ${missing[*]}"
sudo=""
[[ "$(id -u)" -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# The packages are named like the tools; no recommends (they would pull in a Docker-compatible engine and fuse).
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
