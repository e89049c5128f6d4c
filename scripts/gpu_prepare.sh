#!/usr/bin/env bash
# Prepare, on a machine with a package registry, what scripts/gpu_check.sh needs on a GPU machine without one
# (Python 3.12, CUDA 13, torch; docs/gpu.md). Writes three git-ignored folders:
#   .ortgpu/  onnxruntime-gpu (the version deploy/requirements.gpu.txt locks) in PARTS parts + its installer
#   .whl/     every other locked package of deploy/requirements.gpu.txt as cp312 manylinux wheels (CUDA libraries
#             excepted: the GPU machine's torch brings them)
#   .gpu/     wrk and its LuaJIT (the GPU image has OpenSSL), for the HTTP load, and py-spy
#   .nvimg/   nvImageCodec and nvJPEG wheels (~29 MiB, a call of their own), for gpu_check's exploratory nvdecode stage
# Each GPU call can carry at most 64 MiB with the working tree: 4 parts of ~61 MiB fit beside a ~2 MiB tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-4}
SHARED=${SHARED:-../shared/gpu}
mkdir -p .git/info
for d in .ortgpu .whl .gpu .nvimg; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done

ort_version=$(sed -n 's/^onnxruntime-gpu==\([^ ]*\).*/\1/p' deploy/requirements.gpu.txt)
bash "$SHARED/split-ort-gpu.sh" "$ort_version" >/dev/null
wheel=.ortgpu/$(cat .ortgpu/WHEEL_NAME)
rm -f .ortgpu/part-*
split -n "$PARTS" -d "$wheel" .ortgpu/part-

rm -rf .whl && mkdir .whl
grep -E '^[a-z0-9]' deploy/requirements.gpu.txt | grep -v "implementation_name == 'pypy'" \
  | grep -v -e '^nvidia-' -e '^onnxruntime-gpu' | sed 's/ .*//' > .whl/requirements.txt
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl -r .whl/requirements.txt

# Not dependencies of the project: measured by the nvdecode stage only (docs/gpu.md, third session).
rm -rf .nvimg && mkdir .nvimg
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .nvimg nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43

mkdir -p .gpu/bin .gpu/lib
cp "$(command -v wrk)" .gpu/bin/wrk.bin
for lib in $(ldd "$(command -v wrk)" | awk '/luajit/ {print $3}'); do cp -L "$lib" .gpu/lib/; done
# py-spy for gpu_check.py service --profile: the binary inside its wheel
python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/gpu-prepare-pyspy py-spy==0.4.3
unzip -o -q -j /tmp/gpu-prepare-pyspy/py_spy-0.4.3-*.whl '*/scripts/py-spy' -d .gpu/bin
cat > .gpu/bin/wrk <<'EOF'
#!/bin/sh
# wrk with its own libraries beside it (the GPU machine has no package registry)
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib" exec "$here/wrk.bin" "$@"
EOF
chmod +x .gpu/bin/wrk
du -sh .ortgpu/part-* .whl .gpu .nvimg
echo "gpu_prepare: $PARTS parts of onnxruntime-gpu $ort_version, $(ls .whl/*.whl | wc -l) wheels, wrk: ready to carry"
