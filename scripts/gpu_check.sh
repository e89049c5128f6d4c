#!/usr/bin/env bash
# Verify the CUDA (and TensorRT, if installed) path and record GPU throughput, in one call, on a GPU machine:
#
#   scripts/gpu_check.sh                  # in-process checks + throughput -> results/gpu_check.json
#   scripts/gpu_check.sh --service        # + bentoml serve with CONVNET_DEVICE=cuda and an HTTP run
#
# Needs the model repository (make models) and onnxruntime-gpu with CUDA 12/13 libraries (system, or pip's
# nvidia-* wheels). PYTHON picks the interpreter (default .venv/bin/python, else python3); a wheel installed with
# --target (see ../shared/gpu/README.md) is found through PYTHONPATH. Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; then
  echo "gpu_check: no NVIDIA GPU/driver visible here (nvidia-smi failed)" >&2
  exit 2
fi
"$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
exec "$PYTHON" scripts/gpu_check.py "$@"
