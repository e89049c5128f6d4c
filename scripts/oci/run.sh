#!/usr/bin/env bash
# Runs the service image in the foreground on 127.0.0.1:PORT (Ctrl-C stops and removes it).
#   scripts/oci/run.sh IMAGE_TAG PORT [auto|docker|podman] [extra `bentoml serve` args...]
# docker publishes the container's port 3000 on 127.0.0.1 only. podman (the offline fallback) uses host networking,
# so the server itself binds 127.0.0.1:PORT. Set GPUS=1 to hand the NVIDIA GPUs to the container.
set -euo pipefail

image="${1:?image tag}"
port="${2:?port}"
engine="${3:-auto}"
shift $(( $# < 3 ? $# : 3 ))
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="convnet-serving-$port"

if [[ "$engine" == auto ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
case "$engine" in
    docker)
        exec docker run --rm --name "$name" ${GPUS:+--gpus all} -p "127.0.0.1:$port:3000" "$image" "$@" ;;
    podman)
        # CDI device names come from `nvidia-ctk cdi generate` on a GPU host.
        exec "$here/podman.sh" run --rm --name "$name" ${GPUS:+--device nvidia.com/gpu=all} --network host \
            "$image" --host 127.0.0.1 --port "$port" "$@" ;;
    *)
        echo "unknown engine $engine (auto|docker|podman)" >&2; exit 2 ;;
esac
