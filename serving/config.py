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

from serving.registry import DEFAULT_MODELS_DIR
from serving.runtime import DEVICES

ENV_PREFIX = "CONVNET_"
CONFIG_FILE_ENV = "CONVNET_CONFIG"
MIB = 1 << 20


@dataclass(frozen=True)
class ServiceConfig:
    models_dir: Path = DEFAULT_MODELS_DIR
    models: tuple[str, ...] = ()  # empty: every model with a card under models_dir
    default_model: str = "alexnet"  # used when a request names none (falls back to the first served model)
    device: str = "auto"  # auto | cpu | cuda | tensorrt
    # Adaptive batching of the model service (BentoML's CorkDispatcher, one per model).
    max_batch_size: int = 32
    max_latency_ms: int = 10_000  # a request queued longer than this is shed with 503 server_busy
    model_workers: int = 0  # processes each holding every model; 0 = auto: 1 on a GPU, else one per CPU up to 4
    ort_threads: int = 0  # onnxruntime intra-op threads per model worker; 0 = auto: CPUs / model workers
    ort_spinning: int = 0  # 1: idle onnxruntime threads spin-wait (steals the CPU that decoding needs; measured)
    # Models smaller than this run inside the front service, on CPU, without batching: for them one batch-1 call
    # costs far less than the hop to the model service (LeNet-5: 0.06 ms vs ~2 ms; measured). 0 = batch every model.
    inline_max_params: int = 1_000_000
    # The request-facing service.
    api_workers: int = 1
    decode_threads: int = 2  # Pillow decodes in this many threads (it releases the GIL)
    max_body_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000
    max_batch_images: int = 64  # images in one /classify_batch request
    max_top_k: int = 100
    default_top_k: int = 5
    timeout_s: int = 60  # BentoML's per-request timeout for both services
    # API keys (docs/keys.md): a file of hashed keys; empty = off. /metrics stays open unless metrics_auth = "key".
    api_keys_file: str = ""
    metrics_auth: str = "open"  # open | key

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"CONVNET_DEVICE must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.metrics_auth not in ("open", "key"):
            raise ValueError(f"CONVNET_METRICS_AUTH must be open or key, not {self.metrics_auth!r}")
        zero_ok = ("model_workers", "ort_threads", "ort_spinning", "inline_max_params")  # 0 means "automatic" or "off"
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


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def model_parallelism(cfg: ServiceConfig, uses_gpu: bool, cpus: int | None = None) -> tuple[int, int]:
    """(model workers, onnxruntime threads per worker) with the automatic values filled in.

    On CPU, several single-threaded workers beat one worker with many threads: no intra-op synchronisation, and
    each worker's batches run while the others' fill (measured in docs/service.md). A GPU wants one worker.
    """
    cpus = cpus or usable_cpus()
    workers = cfg.model_workers or (1 if uses_gpu else min(cpus, 4))
    threads = cfg.ort_threads or max(1, cpus // workers)
    return workers, threads


def describe(cfg: ServiceConfig) -> dict[str, Any]:
    """The effective settings, JSON-ready (for the start-up log)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()}
