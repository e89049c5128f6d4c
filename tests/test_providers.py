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
    assert runtime._provider_options("CUDAExecutionProvider", None) == {"prefer_nhwc": "1",
                                                                         "cudnn_conv_algo_search": "DEFAULT"}
    assert runtime._provider_options("CPUExecutionProvider", None) == {}


@pytest.fixture
def gpu_settings():
    """runtime's GPU settings put back as they were after a test changes them."""
    saved = dict(runtime._gpu)
    yield
    runtime.configure_gpu(**saved)


def test_cudnn_searches_no_algorithms_per_batch_size_unless_asked(gpu_settings):
    # EXHAUSTIVE (onnxruntime's own default) timed every algorithm at each new batch size: 16 front workers on an
    # H200 served 705-792 img/s with it, 3,694-4,214 with DEFAULT (docs/gpu.md, third session)
    assert runtime._provider_options("CUDAExecutionProvider", None)["cudnn_conv_algo_search"] == "DEFAULT"
    runtime.configure_gpu("spin", "EXHAUSTIVE")
    assert runtime._provider_options("CUDAExecutionProvider", None) == {"prefer_nhwc": "1",
                                                                         "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert runtime._gpu["cuda_wait"] == "spin"
    with pytest.raises(ValueError, match="cudnn_algo_search must be one of DEFAULT, HEURISTIC, EXHAUSTIVE"):
        runtime.configure_gpu("block", "FASTEST")
    with pytest.raises(ValueError, match="cuda_wait must be one of block, spin"):
        runtime.configure_gpu("yield", "DEFAULT")


def test_the_gpu_settings_come_from_the_service_config_and_stop_a_bad_start():
    from serving.config import load_config

    cfg = load_config({"CONVNET_CUDA_WAIT": "spin", "CONVNET_CUDNN_ALGO_SEARCH": "HEURISTIC"})
    assert (cfg.cuda_wait, cfg.cudnn_algo_search) == ("spin", "HEURISTIC")
    assert (load_config({}).cuda_wait, load_config({}).cudnn_algo_search) == ("block", "DEFAULT")
    with pytest.raises(ValueError, match="CONVNET_CUDNN_ALGO_SEARCH must be one of DEFAULT, HEURISTIC, EXHAUSTIVE"):
        load_config({"CONVNET_CUDNN_ALGO_SEARCH": "exhaustive"})
    with pytest.raises(ValueError, match="CONVNET_CUDA_WAIT must be one of block, spin"):
        load_config({"CONVNET_CUDA_WAIT": "busy"})


def test_the_batch_cli_sets_the_services_gpu_settings(gpu_settings, monkeypatch):
    from serving import batch

    monkeypatch.setenv("CONVNET_CUDNN_ALGO_SEARCH", "HEURISTIC")
    monkeypatch.setenv("CONVNET_CUDA_WAIT", "spin")
    batch._service_settings()
    assert runtime._gpu == {"cuda_wait": "spin", "cudnn_algo_search": "HEURISTIC"}


def test_blocking_gpu_waits_need_a_driver():
    # On a GPU machine the flag is read back from the driver by scripts/gpu_check.py (env stage: "blocking sync").
    assert not runtime._gpu_driver_present()
    assert runtime.block_on_gpu_waits() is False
