#!/usr/bin/env bash
# Builds the base image BentoML's generated Dockerfile starts FROM (python:3.11-slim for the CPU variant) out of
# Debian packages, for machines that can reach a Debian mirror and PyPI but no image registry.
#
# Debian bookworm ships Python 3.11, the version the bento pins, so uv inside the build finds it and never tries to
# download an interpreter. The image mimics the official python:*-slim layout where BentoML relies on it:
# `python`/`pip` on PATH, pip usable without --break-system-packages, bash, groupadd/useradd.
#
#   scripts/oci/build-base-image.sh [IMAGE_NAME]      (default docker.io/library/python:3.11-slim)
# Idempotent: an existing image with that name is kept unless REBUILD_BASE=1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

image="${1:-docker.io/library/python:3.11-slim}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs="$OCI_HOME/rootfs-$suite"
# The host's CA bundle: package installs inside image builds go through the same TLS-inspecting egress as the host.
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

# One builder at a time (a test run and `make container` may both get here); the second finds the image built.
exec 9>"$OCI_HOME/base-image.lock"
flock 9

old_id="$(buildah images --quiet "$image" 2>/dev/null || true)"
if [[ "${REBUILD_BASE:-0}" != 1 && -n "$old_id" ]]; then
    echo "base image $image already built (REBUILD_BASE=1 to rebuild)"
    exit 0
fi

if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates,bash,passwd \
        "$suite" "$rootfs" "$mirror"
fi

# What python:*-slim gives that Debian's python3 does not: unversioned names and a pip that may install system-wide
# (BentoML's Dockerfile pip-installs uv before creating its venv).
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
mnt="$(buildah mount "$container")"
cp -a "$rootfs"/. "$mnt"/
buildah umount "$container" >/dev/null
buildah config \
    --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
    --env UV_NATIVE_TLS=1 \
    --cmd python3 \
    --label org.opencontainers.image.description="Debian $suite + python3 built locally with debootstrap" \
    "$container"
buildah commit --quiet "$container" "$image"
# A rebuild leaves the previous image untagged; drop it so the vfs store (full copies per layer) doesn't grow.
if [[ -n "$old_id" && "$old_id" != "$(buildah images --quiet "$image")" ]]; then
    buildah rmi "$old_id" >/dev/null 2>&1 || true
fi
echo "built base image $image from Debian $suite"
