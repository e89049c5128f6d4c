"""The Open Inference Protocol's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`), from /metrics.

Triton's per-model counts and cumulative nanoseconds, which `tritonclient`'s `get_inference_statistics` reads (and
Triton's perf_analyzer samples around each measurement window), taken from the same Prometheus series
/metrics serves (serving/api.py `Metrics`), so every worker's counts are in it, whichever worker answers:

    success, fail     inference requests (/classify, /classify_batch, /v2 infer) answered 200 / with an error
                      for a known model, and their time from headers to answer (decoding included)
    inference_count   images in the successful requests; execution_count: onnxruntime calls
    queue             each request's wait for its batch, once decoded
    compute_input     its batch's time joining the requests' rows into one array
    compute_infer     its batch's onnxruntime call
    compute_output    its batch's time splitting the logits into the requests' answers
    batch_stats       the same three per call, by the call's rows
    cache_hit/miss    zero: there is no response cache

Per request, as Triton counts: a request in a call of 20 ms adds one count and 20 ms to compute_infer. The models in
the model service (the GPU path) are batched by BentoML's dispatcher, which does not say which requests a call
answered: their calls are in execution_count and batch_stats (compute_infer only); queue and compute_* stay zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # Metrics.totals(): (sample, sorted labels) -> value

INFERENCE_ENDPOINTS = ("classify", "classify_batch", "v2_infer")
PHASES = ("compute_input", "compute_infer", "compute_output")
NO_CACHE = {"count": 0, "ns": 0}


def _sum(totals: Totals, sample: str, **labels: str | tuple[str, ...]) -> float:
    """The sum of a sample over the series whose labels match: a value, or any of a tuple of values."""
    found = 0.0
    for (name, series), value in totals.items():
        if name != sample:
            continue
        have = dict(series)
        if all(have.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in labels.items()):
            found += value
    return found


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(round(count)), "ns": int(round(seconds * 1e9))}


def _batch_stats(totals: Totals, model: str) -> list[dict[str, Any]]:
    sizes = sorted({int(dict(series)["batch_size"]) for name, series in totals
                    if name == "convnet_executions_total" and dict(series)["model"] == model})
    stats = []
    for size in sizes:
        calls = _sum(totals, "convnet_executions_total", model=model, batch_size=str(size))
        stat: dict[str, Any] = {"batch_size": size}
        for phase in PHASES:
            key = ("convnet_execution_seconds_total",
                   tuple(sorted({"model": model, "batch_size": str(size), "phase": phase}.items())))
            timed = key in totals  # the model service times compute_infer only
            stat[phase] = _duration(calls if timed else 0, totals.get(key, 0.0))
        stats.append(stat)
    return stats


def model_stat(totals: Totals, model: str, version: str) -> dict[str, Any]:
    """One model's $model_stat object of the extension."""
    endpoints = INFERENCE_ENDPOINTS
    batched = _sum(totals, "convnet_batched_requests_total", model=model)
    phases = {phase: _duration(batched, _sum(totals, "convnet_request_phase_seconds_total", model=model, phase=phase))
              for phase in ("queue", *PHASES)}
    return {
        "name": model, "version": version,
        "last_inference": int(_sum(totals, "convnet_last_inference_timestamp_seconds", model=model) * 1000),
        "inference_count": int(_sum(totals, "convnet_images_total", model=model)),
        "execution_count": int(_sum(totals, "convnet_executions_total", model=model)),
        "inference_stats": {
            "success": _duration(_sum(totals, "convnet_request_seconds_count", model=model, endpoint=endpoints),
                                 _sum(totals, "convnet_request_seconds_sum", model=model, endpoint=endpoints)),
            "fail": _duration(_sum(totals, "convnet_failed_request_seconds_count", model=model, endpoint=endpoints),
                              _sum(totals, "convnet_failed_request_seconds_sum", model=model, endpoint=endpoints)),
            **phases, "cache_hit": NO_CACHE, "cache_miss": NO_CACHE,
        },
        "batch_stats": _batch_stats(totals, model),
    }


def statistics(totals: Totals, models: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The $stats_model_response for (name, version) of each model asked about."""
    return {"model_stats": [model_stat(totals, name, version) for name, version in models]}
