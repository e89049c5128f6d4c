"""Execution-provider choice on a GPU machine, as far as a machine without one can check it (docs/gpu.md).

Seen on an H200 without TensorRT: onnxruntime-gpu lists TensorRT as available all the same, and a session asked for
it printed an error page and started again without it. `auto` now asks for TensorRT only where its library loads.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest

from serving import runtime


@pytest.fixture
def gpu_driver(monkeypatch):
    """This machine as a GPU machine would look to the provider choice: a driver present, no TensorRT installed."""
    monkeypatch.setattr(runtime, "_gpu_driver_present", lambda: True)
    assert not runtime._tensorrt_present()


def test_onnxruntime_gpu_lists_tensorrt_without_tensorrt_installed():
    assert "TensorrtExecutionProvider" in ort.get_available_providers()
    assert not runtime._tensorrt_present()


def test_auto_skips_tensorrt_where_its_library_is_missing(gpu_driver):
    assert runtime.candidate_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_an_explicit_tensorrt_without_tensorrt_stops_with_the_reason(gpu_driver):
    with pytest.raises(runtime.DeviceUnavailable, match="TensorRT .libnvinfer.so.10. is not installed"):
        runtime.candidate_providers("tensorrt")
    assert runtime.candidate_providers("cuda")[0] == "CUDAExecutionProvider"


def test_cuda_sessions_prefer_nhwc_convolutions():
    # +45% (fp32) and +53% (fp16) AlexNet img/s at batch 256 on an H200 (docs/gpu.md)
    assert runtime._provider_options("CUDAExecutionProvider", None) == {"prefer_nhwc": "1"}
    assert runtime._provider_options("CPUExecutionProvider", None) == {}
