#!/usr/bin/env bash
# The GPU check in one call (docs/gpu.md): install what the GPU machine lacks, build the models there, then run
# every stage of scripts/gpu_check.py, each under its own time limit, writing OUT/<stage>.json and OUT/gpu_check.log.
#
#   scripts/gpu_check.sh --out DIR [--device cuda|cpu] [extra gpu_check.py options]
#
# On the lent GPU machine (Python 3.12, CUDA 13, torch; no package registry) it first installs, when present:
#   /tmp/ortgpu/part-*  onnxruntime-gpu, carried in parts (../shared/gpu/README.md), joined by .ortgpu/install.sh
#   .whl/*.whl          the locked cp312 wheels of everything else (deploy/requirements.gpu.txt) into /tmp/site
#   .gpu/bin/wrk        the load generator (with its libraries in .gpu/lib)
#   /tmp/nvimgwhl/*.whl nvImageCodec and nvJPEG, for the exploratory nvdecode stage only (into /tmp/nvimg)
# `--device cpu` rehearses the whole thing here, on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
OUT=results/gpu DEVICE=cuda
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ls /tmp/ortgpu/part-* >/dev/null 2>&1 && [ -f .ortgpu/install.sh ] && [ ! -d /tmp/site/onnxruntime ]; then
  say "installing onnxruntime-gpu from $(ls /tmp/ortgpu/part-* | wc -l) parts"
  bash .ortgpu/install.sh 2>&1 | tail -3 | tee -a "$LOG"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) locked wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING: Target directory" | tail -3 | tee -a "$LOG"
fi
if ls /tmp/nvimgwhl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/nvimg/nvidia/nvimgcodec ]; then
  say "installing nvImageCodec for the nvdecode stage into /tmp/nvimg (kept off PYTHONPATH)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/nvimg /tmp/nvimgwhl/*.whl \
    2>&1 | tail -3 | tee -a "$LOG"
  rm -f /tmp/nvimg/nvidia/__init__.py  # a namespace portion, so it cannot hide the CUDA packages' `nvidia`
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
[ -x .gpu/bin/wrk ] && export PATH=$PWD/.gpu/bin:$PATH
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The model repository: LeNet-5 is in git; AlexNet's ONNX (and its float16 twin) is built where it runs.
MODELS=${MODELS:-/tmp/convnet-models}
if [ ! -f "$MODELS/alexnet/1/model.fp16.onnx" ]; then
  say "building the model repository in $MODELS"
  mkdir -p "$MODELS/alexnet"
  cp -r models/lenet5 "$MODELS/"
  cp models/alexnet/labels.txt models/alexnet/wnids.txt "$MODELS/alexnet/"
  if [ -f models/alexnet/1/model.onnx ] && [ -f models/alexnet/1/model.fp16.onnx ]; then
    cp -r models/alexnet/. "$MODELS/alexnet/"
  else
    timeout 400 "$PYTHON" -m training.export --model alexnet --seed 0 --precision fp16 --models-dir "$MODELS" 2>&1 \
      | tail -3 | tee -a "$LOG"
  fi
fi

# More service configurations, one per line: LABEL [gpu_check.py options], e.g.
#   SERVICE_RUNS=$'-front15 --connections 256 --server-env CONVNET_PLACEMENT=front CONVNET_API_WORKERS=15'
# Each runs after the default one, as its own stage, writing OUT/service<LABEL>.json.
SERVICE_RUNS=${SERVICE_RUNS:-}
failed=()
STAGES=${STAGES:-env inproc decode nvdecode service batch}
run_stage() {  # STAGE LIMIT_S [options]
  local stage=$1 limit=$2
  shift 2
  say "stage $stage $* (limit $limit s)"
  timeout -k 10 "$limit" "$PYTHON" scripts/gpu_check.py "$stage" --out "$OUT" --models-dir "$MODELS" \
    --device "$DEVICE" "${args[@]}" "$@" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$stage $*")
}
for stage_limit in env:30 inproc:150 decode:60 nvdecode:60 service:180 batch:120; do
  stage=${stage_limit%%:*}
  [[ " $STAGES " == *" $stage "* ]] || continue
  run_stage "$stage" "${stage_limit##*:}"
  if [ "$stage" = service ] && [ -n "$SERVICE_RUNS" ]; then
    while read -r label options; do
      [ -n "$label" ] || continue
      # shellcheck disable=SC2086 # the options are words by design
      run_stage service 180 "--label=$label" $options
    done <<< "$SERVICE_RUNS"
  fi
done
"$PYTHON" scripts/gpu_check.py summary --out "$OUT" 2>&1 | tee -a "$LOG"
say "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
