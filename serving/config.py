"""The service's tunables: defaults, overridden by a TOML file (CONVNET_CONFIG), overridden by CONVNET_* variables.

Read once per process at import time (BentoML's decorators need batch size, workers and resources then); every
worker process reads the same environment, so they all agree.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from serving.cgroups import usable_cpus
from serving.registry import DEFAULT_MODELS_DIR, PRECISIONS
from serving.runtime import CUDA_WAITS, CUDNN_ALGO_SEARCHES, DEVICES

ENV_PREFIX = "CONVNET_"
CONFIG_FILE_ENV = "CONVNET_CONFIG"
MIB = 1 << 20
PLACEMENTS = ("auto", "front", "model_service")
# With placement "auto" on a GPU, models smaller than this stay in front, on CPU: one batch-1 call of LeNet-5 costs
# far less than the hop to the model service (0.06 ms vs ~2 ms; measured).
SMALL_MODEL_PARAMS = 1_000_000


@dataclass(frozen=True)
class ServiceConfig:
    models_dir: Path = DEFAULT_MODELS_DIR
    models: tuple[str, ...] = ()  # empty: every model with a card under models_dir
    default_model: str = "alexnet"  # used when a request names none (falls back to the first served model)
    device: str = "auto"  # auto | cpu | cuda | tensorrt
    # auto: a model's float16 file (card field onnx_fp16, training.fp16) where it runs on a GPU provider, float32
    # elsewhere; fp32: always float32; fp16: float16 for every model served, or fail at start (needs a GPU and each
    # model's float16 file, e.g. CONVNET_MODELS=alexnet).
    precision: str = "auto"  # auto | fp32 | fp16
    # Where inference runs. "front": in the request-facing workers themselves, micro-batched per worker (decode and
    # onnxruntime in one process: no hop, no tensor copies). "model_service": in a separate BentoML service with
    # adaptive batching, fed by the front workers (one GPU process fed by many decoding CPUs). "auto": front on CPU;
    # on a GPU, the model service for every model but the small ones (LeNet-5), which run in front on CPU.
    placement: str = "auto"
    max_batch_size: int = 32
    max_latency_ms: int = 10_000  # a request queued longer than this for inference is shed with 503 server_busy
    # The CPUs that workers and threads are sized for; 0 = those this process may run on, capped by its cgroup's CPU
    # quota (a container's --cpus, a pod's CPU limit: serving/cgroups.py). Set it where the share is a request, not a
    # limit (the Kubernetes manifests pass the pod's CPU request).
    cpus: int = 0
    model_workers: int = 0  # model-service processes; 0 = auto: a quarter of the CPUs on a GPU, else 1 per CPU up to 4
    ort_threads: int = 0  # onnxruntime intra-op threads per worker; 0 = auto: CPUs / workers
    ort_spinning: int = 0  # 1: idle onnxruntime threads spin-wait (steals the CPU that decoding needs; measured)
    # On a GPU (serving/runtime.py, configure_gpu; docs/gpu.md, third session): "block" lets a thread waiting for the
    # GPU sleep, "spin" keeps CUDA's busy-wait; and how cuDNN picks each convolution's algorithm per batch size.
    # EXHAUSTIVE times every algorithm at each new size: 16 front workers then served 705-792 img/s, DEFAULT 3.7-4.2k.
    cuda_wait: str = "block"
    cudnn_algo_search: str = "DEFAULT"
    # 1: on CPU, a front worker that is the only one with requests in progress runs its large models on every
    # worker's threads, through a second session per model (serving/cores.py): faster answers under light load.
    borrow_idle_cpus: int = 0
    # The request-facing service.
    api_workers: int = 0  # 0 = auto: one per CPU up to 4 when inference runs in front, else one per CPU up to 16
    decode_threads: int = 2  # Pillow decodes in this many threads per worker (it releases the GIL), +1 for > 4 MP
    # 1: each front worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads connections evenly;
    # 0: BentoML's one shared socket, where one worker can take every connection of a burst (docs/service.md).
    socket_per_worker: int = 1
    max_body_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000
    max_batch_images: int = 64  # images in one /classify_batch request
    max_top_k: int = 100
    default_top_k: int = 5
    timeout_s: int = 60  # a request not answered by then gets 504 timeout
    # Per-request machinery that costs more than LeNet-5's inference (measured in docs/service.md): off by default.
    access_log: int = 0  # 1: BentoML's access log line per request (our /metrics counts every request anyway)
    tracing: int = 0  # 1: OpenTelemetry spans for the inference routes too (BentoML's tracing config applies)
    # API keys (docs/keys.md): a file of hashed keys; empty = off. /metrics stays open unless metrics_auth = "key".
    api_keys_file: str = ""
    metrics_auth: str = "open"  # open | key
    # Slow and abusive clients, per front worker (serving/limits.py, docs/hardening.md).
    header_timeout_s: int = 10  # the request line and headers must arrive within this (else 408, closed)
    max_header_bytes: int = 65_536  # the request line and headers together (else 431, closed); Node's is 16 KiB
    body_timeout_s: int = 30  # the whole body must arrive within this of the request's start (else 408, closed)
    keepalive_timeout_s: int = 5  # an idle kept-alive connection is closed after this
    max_connections: int = 1000  # open connections; more are answered 503 + Retry-After and closed
    max_concurrent_requests: int = 64  # /classify* requests in progress; more are answered 503 + Retry-After
    retry_after_s: int = 1  # the Retry-After of every 503
    # Pixels of large pictures (over LARGE_PICTURE_PIXELS once decoded) being decoded at once per worker
    # (serving.preprocess.PixelBudget): with the smaller ones' threads, bounds the decoding part of a worker's memory
    # at ~4 bytes a pixel plus conversions.
    decode_budget_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"CONVNET_DEVICE must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"CONVNET_PRECISION must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"CONVNET_PLACEMENT must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}")
        if self.cuda_wait not in CUDA_WAITS:
            raise ValueError(f"CONVNET_CUDA_WAIT must be one of {', '.join(CUDA_WAITS)}, not {self.cuda_wait!r}")
        if self.cudnn_algo_search not in CUDNN_ALGO_SEARCHES:
            raise ValueError(f"CONVNET_CUDNN_ALGO_SEARCH must be one of {', '.join(CUDNN_ALGO_SEARCHES)}, "
                             f"not {self.cudnn_algo_search!r}")
        if self.metrics_auth not in ("open", "key"):
            raise ValueError(f"CONVNET_METRICS_AUTH must be open or key, not {self.metrics_auth!r}")
        zero_ok = ("cpus", "model_workers", "ort_threads", "ort_spinning", "borrow_idle_cpus", "api_workers",
                   "access_log", "tracing", "socket_per_worker")
        for f in fields(self):
            if f.type == "int" and getattr(self, f.name) < (0 if f.name in zero_ok else 1):
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be a positive integer, "
                                 f"not {getattr(self, f.name)!r}")


def _coerce(name: str, kind: str, raw: Any) -> Any:
    if kind == "Path":
        return Path(raw)
    if kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{ENV_PREFIX}{name.upper()} must be an integer, not {raw!r}") from None
    if kind.startswith("tuple"):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(s.strip() for s in items if str(s).strip())
    return str(raw)


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    """Defaults ← the TOML file named by CONVNET_CONFIG (top-level keys = field names) ← CONVNET_<FIELD> variables."""
    env = os.environ if environ is None else environ
    kinds = {f.name: str(f.type) for f in fields(ServiceConfig)}
    values: dict[str, Any] = {}
    if path := env.get(CONFIG_FILE_ENV):
        with open(path, "rb") as fh:
            from_file = tomllib.load(fh)
        unknown = sorted(set(from_file) - set(kinds))
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(kinds)}")
        values.update({k: _coerce(k, kinds[k], v) for k, v in from_file.items()})
    for name, kind in kinds.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, kind, raw)
    return ServiceConfig(**values)


def placement(cfg: ServiceConfig, parameters: dict[str, int], uses_gpu: bool) -> tuple[list[str], list[str]]:
    """(models run in the front workers, models run in the model service), from the models' parameter counts."""
    if cfg.placement == "front" or (cfg.placement == "auto" and not uses_gpu):
        return sorted(parameters), []
    if cfg.placement == "model_service":
        return [], sorted(parameters)
    small = sorted(n for n, p in parameters.items() if p < SMALL_MODEL_PARAMS)
    return small, sorted(n for n in parameters if n not in small)


def parallelism(cfg: ServiceConfig, uses_gpu: bool, model_service: bool, cpus: int | None = None) -> dict[str, int]:
    """Worker processes and onnxruntime threads, with the automatic values filled in.

    On CPU, several single-threaded workers beat one worker with many threads: no intra-op synchronisation, each
    worker's batches run while the others' fill, and Python's per-request work is spread over the cores. With a
    model service (a GPU), the front workers only decode and relay, so they scale with the CPUs that decoding needs.
    A GPU model worker spends its core on BentoML's per-request machinery, not on the GPU, so several share the GPU:
    on an H200 with 16 CPUs, AlexNet served 484, 899, 1,335 and 873 img/s with 1, 2, 4 and 8 model workers (the rest
    of the CPUs decoding); a quarter of the CPUs it is (docs/gpu.md).

    With every model in front on a GPU (placement "front"), each front worker decodes and runs its own GPU session,
    so they are one per CPU, up to 16: on the H200, 12-16 of them served 2,742-3,368 img/s, twice the model service.
    """
    cpus = cpus or cfg.cpus or usable_cpus()
    if uses_gpu and model_service:
        model = cfg.model_workers or max(1, cpus // 4)
        api = cfg.api_workers or max(1, min(16, cpus - model))
    else:
        model = cfg.model_workers or min(cpus, 4)
        api = cfg.api_workers or (min(cpus, 16) if model_service or uses_gpu else min(cpus, 4))
    return {"cpus": cpus, "api_workers": api, "model_workers": model,
            "front_ort_threads": ort_threads(cfg, cpus, api), "model_ort_threads": ort_threads(cfg, cpus, model)}


def ort_threads(cfg: ServiceConfig, cpus: int, workers: int) -> int:
    """onnxruntime's intra-op threads per worker: CONVNET_ORT_THREADS, else the CPUs shared out over the workers."""
    return cfg.ort_threads or max(1, cpus // workers)


# What the service's processes hold (docs/deploy.md, "How much memory"): BentoML's arbiter ~131 MiB; a worker ~143 MiB
# before its models; a model ~5 bytes a parameter (float32 weights plus onnxruntime's arena at the largest batch:
# AlexNet's 61 M added 281 MiB); a front worker's decoding up to ~300 MiB more while large pictures decode (the peaks
# of tests/memload.py: docs/hardening.md). Rounded up: a worker killed for memory takes its requests with it.
ARBITER_BYTES = 140 * MIB
WORKER_BYTES = 160 * MIB
BYTES_PER_PARAMETER = 5
DECODING_BYTES = 300 * MIB


def fit_to_memory(cfg: ServiceConfig, workers: dict[str, int], limit: int | None, front_parameters: int,
                  service_parameters: int) -> dict[str, int]:
    """`workers` (parallelism's) with the automatic worker counts lowered, the larger first, until the server's
    processes at their peak fit in `limit` bytes (a container's memory limit: serving/cgroups.py), and the automatic
    onnxruntime threads spread over the workers left. `front_parameters`: the parameters of the models each front
    worker holds (twice a model it also borrows cores for); `service_parameters`: each model worker's, 0 without a
    model service. Counts set explicitly are kept, even where they won't fit; so is one worker of each kind.
    `peak_bytes`: what the workers left may hold at their peak, by these estimates."""
    fitted = dict(workers, memory_limit=limit or 0, peak_bytes=0)
    if not limit:
        return fitted
    front = WORKER_BYTES + DECODING_BYTES + BYTES_PER_PARAMETER * front_parameters
    model = WORKER_BYTES + BYTES_PER_PARAMETER * service_parameters

    def peak() -> int:
        return ARBITER_BYTES + fitted["api_workers"] * front + (fitted["model_workers"] * model
                                                                if service_parameters else 0)

    while peak() > limit:
        lower = [k for k, auto in (("api_workers", not cfg.api_workers),
                                   ("model_workers", service_parameters and not cfg.model_workers))
                 if auto and fitted[k] > 1]
        if not lower:
            break
        fitted[max(lower, key=lambda k: fitted[k])] -= 1
    fitted["front_ort_threads"] = ort_threads(cfg, fitted["cpus"], fitted["api_workers"])
    fitted["model_ort_threads"] = ort_threads(cfg, fitted["cpus"], fitted["model_workers"])
    fitted["peak_bytes"] = peak()
    return fitted


def size_workers(cfg: ServiceConfig, uses_gpu: bool, in_front: list[str], in_model_service: list[str],
                 parameters: dict[str, int], memory_limit: int | None) -> tuple[dict[str, int], str]:
    """The service's workers and threads (parallelism) fitted to `memory_limit` (fit_to_memory), and a line saying
    so when the memory lowered them ("" otherwise). A front worker that may borrow idle cores (serving/cores.py)
    holds its large models twice."""
    borrowed = [n for n in in_front if cfg.borrow_idle_cpus and not uses_gpu and parameters[n] >= SMALL_MODEL_PARAMS]
    for_cpus = parallelism(cfg, uses_gpu, model_service=bool(in_model_service))
    fitted = fit_to_memory(cfg, for_cpus, memory_limit, sum(parameters[n] for n in in_front + borrowed),
                           sum(parameters[n] for n in in_model_service))
    kinds = ["api_workers", "model_workers"] if in_model_service else ["api_workers"]
    if all(fitted[k] == for_cpus[k] for k in kinds):
        return fitted, ""
    holds, called_for = (" + ".join(str(w[k]) for k in kinds) for w in (fitted, for_cpus))
    return fitted, (f"the memory limit of {fitted['memory_limit'] >> 20} MiB holds {holds} worker(s) "
                    f"(~{fitted['peak_bytes'] >> 20} MiB at their peak), not the {called_for} that {fitted['cpus']} "
                    "CPU(s) call for (docs/deploy.md)")


def describe(cfg: ServiceConfig) -> dict[str, Any]:
    """The effective settings, JSON-ready (for the start-up log)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()}
