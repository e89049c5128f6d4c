#!/usr/bin/env bash
# Builds the OCI image of a bento.
#   scripts/oci/containerize.sh BENTO_TAG IMAGE_TAG [auto|docker|buildah]
# docker: the ordinary `bentoml containerize` (a Docker engine pulls the python:3.11-slim base).
# buildah: the offline fallback for machines with no Docker engine and no reachable image registry: the base image is
#          built locally from Debian packages (build-base-image.sh) and never pulled. Needs buildah, podman, runc and
#          debootstrap (scripts/ci-container-tools.sh installs them).
# auto (default): docker when an engine answers, else buildah.
set -euo pipefail

bento="${1:?bento tag}"
image="${2:?image tag}"
backend="${3:-auto}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bentoml="${BENTOML:-bentoml}"

if [[ "$backend" == auto ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then backend=docker; else backend=buildah; fi
fi
case "$backend" in
    docker)
        exec "$bentoml" containerize --backend docker "$bento" -t "$image" ;;
    buildah)
        for tool in buildah podman runc debootstrap; do
            PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null \
                || { echo "$tool is missing: run scripts/ci-container-tools.sh (as root)" >&2; exit 1; }
        done
        export PATH="$PATH:/usr/sbin:/sbin"
        # shellcheck source=env.sh
        source "$here/env.sh"
        "$here/build-base-image.sh"
        exec "$bentoml" containerize --backend buildah "$bento" -t "$image" ;;
    *)
        echo "unknown backend $backend (auto|docker|buildah)" >&2; exit 2 ;;
esac
