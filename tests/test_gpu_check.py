"""scripts/gpu_check.py rehearsed on this CPU-only machine: the GPU session has minutes, so its script must not be
the first to run its own code (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stage(name: str, out: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", name, "--out", str(out), "--device", "cpu",
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / f"{name}.json").read_text()) if name != "summary" else {"stdout": proc.stdout}


def test_env_and_inproc_stages_run_and_report_on_cpu(tmp_path):
    env = stage("env", tmp_path)
    assert env["auto_picks"] == ["CPUExecutionProvider"] and env["auto_session"]["device"] == "cpu"
    assert set(env["tensorrt_libraries"]) == {"libnvinfer.so.10", "libnvinfer.so.8"}
    assert env["auto_session"]["cuda_wait"] == "no CUDA driver"  # on a GPU: "blocking sync (context active)"
    inproc = stage("inproc", tmp_path, "--seconds", "0.05", "--batch-sizes", "1,8")
    for key in ("alexnet/fp32", "lenet5/fp32"):
        parity = inproc["parity"][key]
        assert parity["providers"] == ["CPUExecutionProvider"] and parity["top1_agreement"] == 1.0, parity
        assert all(rate > 0 for rate in inproc["model_only"][key].values())
        assert all(rate > 0 for rate in inproc["service_call"][key].values())
    assert set(inproc["model_only"]["alexnet/fp32"]) == {"1", "8"}
    summary = stage("summary", tmp_path)["stdout"]
    assert "parity alexnet/fp32" in summary and "model-only lenet5/fp32" in summary


def test_the_nvdecode_stage_says_when_nvimagecodec_is_missing(tmp_path):
    # nvImageCodec is no dependency of the project: it travels to a GPU machine as wheels (scripts/gpu_prepare.sh)
    result = stage("nvdecode", tmp_path, env={"NVIMG_SITE": str(tmp_path / "absent")})
    assert result["error"] == f"nvImageCodec is not installed in {tmp_path / 'absent'}"
