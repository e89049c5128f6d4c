#!/usr/bin/env bash
# podman against the project's image store, with the settings that work on this Docker-less machine
# (runc, cgroupfs, file events, explicit ulimits, host networking: see containers.conf). Usage: like podman.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec podman "$@"
