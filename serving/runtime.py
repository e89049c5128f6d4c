"""onnxruntime sessions: execution-provider choice with a clean CPU fallback, and scores from logits.

Provider order for `auto`: TensorRT (engine cache beside the model) → CUDA → CPU. An explicit device that can't be
had is an error at start, not a silent slowdown; `auto` falls back quietly and says what it picked.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path

import numpy as np

# serving/__init__.py has already turned telemetry off: it runs before any serving.* module.
import onnxruntime as ort

log = logging.getLogger("convnet_serving")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
_PROVIDER_OF = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_DEVICE_OF = {v: k for k, v in _PROVIDER_OF.items()}


class DeviceUnavailable(RuntimeError):
    pass


def _gpu_driver_present() -> bool:
    # onnxruntime-gpu lists CUDA as "available" even on machines without a GPU; asking it would print a page of
    # loader errors. The driver library is the cheap, quiet test.
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _tensorrt_present() -> bool:
    # onnxruntime-gpu lists TensorRT as available whether or not TensorRT itself is installed; a session asked for it
    # then prints an error page and starts again without it (seen on an H200 without TensorRT: docs/gpu.md).
    try:
        ctypes.CDLL("libnvinfer.so.10")
        return True
    except OSError:
        return False


def _preload_cuda_libraries() -> None:
    # CUDA/cuDNN may come from pip wheels (nvidia-*; the GPU image does this) rather than the system: onnxruntime
    # finds those only once preloaded. Where they are missing the CUDA provider fails to start and we fall back.
    try:
        ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - any failure here just means "no pip CUDA"
        log.debug("onnxruntime.preload_dlls: %s", e)


def candidate_providers(device: str = "auto") -> list[str]:
    """Execution providers to try, best first, for a requested device."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        if not _gpu_driver_present():
            return ["CPUExecutionProvider"]
        _preload_cuda_libraries()
        wanted = (["TensorrtExecutionProvider"] if _tensorrt_present() else []) + ["CUDAExecutionProvider"]
        return [p for p in wanted if p in available] + ["CPUExecutionProvider"]
    provider = _PROVIDER_OF[device]
    _preload_cuda_libraries()
    if provider not in available or not _gpu_driver_present():
        raise DeviceUnavailable(
            f"device {device!r} requested but {provider} is not usable here "
            f"(available: {sorted(available)}, GPU driver present: {_gpu_driver_present()})"
        )
    if device == "tensorrt" and not _tensorrt_present():
        raise DeviceUnavailable("device 'tensorrt' requested but TensorRT (libnvinfer.so.10) is not installed; "
                                "use cuda, or install TensorRT 10")
    return [provider] + (["CUDAExecutionProvider"] if device == "tensorrt" else []) + ["CPUExecutionProvider"]


# How a thread waits for the GPU to finish a call. CUDA's default (cudaDeviceScheduleAuto) spins a CPU core for the
# whole wait in a process with fewer CUDA contexts than CPUs: every one of ours. A serving process waits in every
# call while its decoding threads, the other workers and the batch CLI's decoders want those cores, and on a GPU that
# several processes time-slice each wait also lasts their calls. "block" makes the waiting thread sleep until the GPU
# signals it; "spin" keeps CUDA's default. (docs/gpu.md, third session: no worse in three pairs of
# runs on an H200, +12% in one, the rest within noise.) configure_gpu sets it.
CUDA_WAITS = ("block", "spin")
CU_CTX_SCHED_BLOCKING_SYNC = 0x04  # cuda.h: CUctx_flags
_cuda_wait_set = False

# How the CUDA provider picks each convolution's cuDNN algorithm, per input shape (onnxruntime's
# cudnn_conv_algo_search). Its own default, EXHAUSTIVE, times every algorithm on the GPU the first time a shape comes,
# and the service's batches come in every size from 1 to 32: on an H200, 16 front workers spent 12.5 of 16 CPUs in
# those searches and served 705-792 img/s. HEURISTIC served 3,282 and DEFAULT 3,694-4,214 (the model service: 1,870,
# 2,552, 2,885), one run each, same machine (docs/gpu.md, third session). onnxruntime logs DEFAULT, its cuDNN
# frontend's "fallback" plans, as a warning per convolution and shape ("running in Fallback mode. May be extremely
# slow"), which is why its default logger is kept to errors when DEFAULT is used. configure_gpu sets it.
CUDNN_ALGO_SEARCHES = ("DEFAULT", "HEURISTIC", "EXHAUSTIVE")


_gpu = {"cuda_wait": "block", "cudnn_algo_search": "DEFAULT"}  # configure_gpu


def configure_gpu(cuda_wait: str = "block", cudnn_algo_search: str = "DEFAULT") -> None:
    """How the CUDA sessions this process makes from now on wait for the GPU (CUDA_WAITS) and pick their convolution
    algorithms (CUDNN_ALGO_SEARCHES): the service's CONVNET_CUDA_WAIT and CONVNET_CUDNN_ALGO_SEARCH, which the
    service and the batch CLI both pass here."""
    if cuda_wait not in CUDA_WAITS:
        raise ValueError(f"cuda_wait must be one of {', '.join(CUDA_WAITS)}, not {cuda_wait!r}")
    if cudnn_algo_search not in CUDNN_ALGO_SEARCHES:
        raise ValueError(f"cudnn_algo_search must be one of {', '.join(CUDNN_ALGO_SEARCHES)}, "
                         f"not {cudnn_algo_search!r}")
    _gpu.update(cuda_wait=cuda_wait, cudnn_algo_search=cudnn_algo_search)


def block_on_gpu_waits() -> bool:
    """Make this process's CUDA calls sleep while they wait for the GPU, on every device, before onnxruntime creates
    its context (the primary context's flags; the scheduling bits may change even once it is active). Through the
    driver (libcuda.so.1), so it holds whichever CUDA runtime onnxruntime loads. Whether it was set."""
    global _cuda_wait_set
    if _cuda_wait_set:
        return True
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count, device = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    set_flags = getattr(cuda, "cuDevicePrimaryCtxSetFlags_v2", None) or cuda.cuDevicePrimaryCtxSetFlags
    for ordinal in range(count.value):
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0 or set_flags(device, CU_CTX_SCHED_BLOCKING_SYNC) != 0:
            return False
    _cuda_wait_set = True
    return True


# NHWC convolutions suit the tensor cores: AlexNet on an H200, batch 256, model only, went from 54.5k to 79.2k img/s
# (fp32) and from 63.4k to 97.2k (fp16) with it (docs/gpu.md).
CUDA_OPTIONS = {"prefer_nhwc": "1"}


def _provider_options(provider: str, cache_dir: Path | None) -> dict[str, str]:
    if provider == "TensorrtExecutionProvider" and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
                "trt_fp16_enable": "True"}
    if provider == "CUDAExecutionProvider":
        return {**CUDA_OPTIONS, "cudnn_conv_algo_search": _gpu["cudnn_algo_search"]}
    return {}


class OnnxModel:
    """One onnxruntime session over one ONNX file, taking a uint8 NHWC batch and returning float32 logits."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0,
                 trt_cache_dir: Path | None = None, session_config: dict[str, str] | None = None):
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads  # 0 = onnxruntime's choice (one per physical core)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            opts.add_session_config_entry(key, value)
        candidates = candidate_providers(device)
        if candidates[0] != "CPUExecutionProvider":
            if _gpu["cuda_wait"] == "block" and not block_on_gpu_waits():
                log.warning("could not make CUDA block while it waits for the GPU; its waits spin a CPU core")
            if _gpu["cudnn_algo_search"] == "DEFAULT":
                ort.set_default_logger_severity(3)  # a "Fallback mode" warning per convolution and batch size
        providers = [(p, _provider_options(p, trt_cache_dir)) for p in candidates]
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self.device = _DEVICE_OF.get(self.providers[0], self.providers[0])
        if device != "auto" and self.providers[0] != candidates[0]:
            raise DeviceUnavailable(f"device {device!r} requested but onnxruntime started {self.providers[0]}")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = inp.shape
        self._on_gpu = self.device in ("cuda", "tensorrt")

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.uint8:
            raise TypeError(f"model input must be uint8 NHWC, got {batch.dtype}")
        if not self._on_gpu:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        # On a GPU, bind explicitly so the input is copied once and nothing else crosses the bus.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


# Rows of at most this many classes (LeNet-5's 10) are scored in plain Python. The numpy way took eight calls on a
# 10-element row, each costing more than its arithmetic, and `np.argsort` releases the GIL, which in a worker whose
# decode threads wait for it can hand the core to another thread and back (#10; docs/service.md, "Sixth pass":
# LeNet-5 served 5-10% faster).
SHORT_ROW = 64


def softmax_row(logits: list[float]) -> list[float]:
    """The softmax of one short row, in float64: exp of each logit less the largest, over their correctly rounded
    sum (math.fsum, so the same on every Python version)."""
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    total = math.fsum(e)
    return [v / total for v in e]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64. The one definition: `top_k`'s scores are these values exactly."""
    n = logits.shape[-1]
    if n <= SHORT_ROW:
        rows = [softmax_row(row) for row in logits.reshape(-1, n).tolist()]
        return np.array(rows, dtype=np.float64).reshape(logits.shape)
    z = logits.astype(np.float64)  # a copy: the in-place steps below never touch the caller's logits
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[list[dict]]:
    """Per row of logits: the k best classes as {index, label, score}, score = softmax probability, best first.

    Both paths break ties in class order (stable sorts). A short row is sorted whole as a Python list; a long one
    (AlexNet's 1000) is partitioned to find the k-th best probability, and only the classes at least that probable
    are sorted."""
    logits = np.atleast_2d(logits)
    k = min(k, logits.shape[1])
    results = []
    if logits.shape[1] <= SHORT_ROW:
        for row in logits.tolist():
            scores = softmax_row(row)
            best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:k]
            results.append([{"index": i, "label": labels[i], "score": scores[i]} for i in best])
        return results
    for row in softmax(logits):
        kth = row[np.argpartition(-row, k - 1)[k - 1]]
        idx = np.flatnonzero(row >= kth)
        idx = idx[np.argsort(-row[idx], kind="stable")[:k]]
        results.append([{"index": i, "label": labels[i], "score": score}
                        for i, score in zip(idx.tolist(), row[idx].tolist(), strict=True)])
    return results
