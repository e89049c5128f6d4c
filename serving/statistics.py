"""The Open Inference Protocol's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`).

Triton's per-model counts and cumulative nanoseconds, which `tritonclient`'s `get_inference_statistics` reads (and
Triton's perf_analyzer samples around each measurement window). Every worker's counts are in it, whichever worker
answers: the requests come from the Prometheus series /metrics serves (serving/api.py `Metrics`), the onnxruntime
calls from each process's `ExecutionTable`:

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

The calls are not Prometheus series: by rows, up to 64 sizes × 4 series × each model would be hundreds of
mostly-zero lines in /metrics, each series first seen ~11 more objects for the garbage collector to track in every
worker (a bench run saw the tracked objects climb by 1,100 as batch sizes appeared), and each update ~1 µs. An
`ExecutionTable` per model and process holds them instead: a small array in a file next to the Prometheus ones
(BentoML's multiprocess directory, emptied when the server starts), one update ~2 µs a call, summed over every
process by `read_executions`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("convnet_serving")

Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value

INFERENCE_ENDPOINTS = ("classify", "classify_batch", "v2_infer")
PHASES = ("compute_input", "compute_infer", "compute_output")
NO_CACHE = {"count": 0, "ns": 0}
# An ExecutionTable's columns: calls, the requests they answered and those requests' wait for them (summed), then for
# each phase (count, seconds) of the calls and the seconds summed over their requests (a call of 3 requests adds its
# time 3 times: Triton's per-request view). A phase a process does not time (the model service's input and output),
# or requests it does not see (the model service's), keep their counts at zero.
CALLS, REQUESTS, QUEUED = 0, 1, 2
PHASE_COLUMN = {phase: 3 + 3 * i for i, phase in enumerate(PHASES)}  # count; then seconds, per-request seconds
COLUMNS = 3 + 3 * len(PHASES)
TABLE_PREFIX = "convnet_executions."


class ExecutionTable:
    """One model's onnxruntime calls in this process, by rows: row r of the array counts the calls of r rows (the
    last row, every call of that many rows or more). Updated by one thread (the event loop, or the model worker's
    only thread)."""

    def __init__(self, model: str, max_rows: int, directory: str | None = None) -> None:
        shape = (max_rows + 1, COLUMNS)
        self.last = max_rows
        if not directory:  # no multiprocess directory (one process: a test, a script): memory is enough
            self.array = np.zeros(shape)
            return
        # Written under a temporary name, then renamed: a reader never finds a file without its header.
        final = Path(directory) / f"{TABLE_PREFIX}{model}.{os.getpid()}.npy"
        temporary = final.with_suffix(".tmp")
        mapped = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float64, shape=shape)
        os.replace(temporary, final)
        self.array = mapped.view(np.ndarray)  # the same memory; indexing a plain array is ~10x cheaper than a memmap

    def add(self, rows: int, requests: int = 0, queued_s: float = 0.0, **phase_seconds: float) -> None:
        """One call of `rows` rows that answered `requests` requests (0: not known), which had waited `queued_s` in
        all for it, and the seconds of its phases that were timed."""
        a, r = self.array, min(rows, self.last)
        a[r, CALLS] += 1
        a[r, REQUESTS] += requests
        a[r, QUEUED] += queued_s
        for phase, seconds in phase_seconds.items():
            column = PHASE_COLUMN[phase]
            a[r, column] += 1
            a[r, column + 1] += seconds
            a[r, column + 2] += seconds * requests


def read_executions(model: str, directory: str | None, here: ExecutionTable | None = None) -> np.ndarray | None:
    """Every process's ExecutionTable of `model` added up (rows × COLUMNS), or None if none has one. Without a
    directory, only `here`, this process's."""
    if not directory:
        return None if here is None else here.array.copy()
    total = None
    for path in Path(directory).glob(f"{TABLE_PREFIX}*.npy"):
        if path.name[len(TABLE_PREFIX):].rsplit(".", 2)[0] != model:
            continue
        try:
            table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # gone, or not ours: skip it rather than fail the whole answer
            log.warning("skipping execution table %s: %r", path.name, exc)
            continue
        if total is None:
            total = np.array(table)
        elif table.shape == total.shape:
            total += table
    return total


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


def _batch_stats(executions: np.ndarray | None) -> list[dict[str, Any]]:
    if executions is None:
        return []
    return [{"batch_size": size, **{phase: _duration(executions[size, column], executions[size, column + 1])
                                    for phase, column in PHASE_COLUMN.items()}}
            for size in np.flatnonzero(executions[:, CALLS]).tolist()]


def model_stat(totals: Totals, executions: np.ndarray | None, model: str, version: str) -> dict[str, Any]:
    """One model's $model_stat object of the extension, from the Prometheus samples and its calls by rows."""
    endpoints = INFERENCE_ENDPOINTS
    calls = np.zeros(COLUMNS) if executions is None else executions.sum(axis=0)
    requests = calls[REQUESTS]
    phases = {"queue": _duration(requests, calls[QUEUED]),
              **{phase: _duration(requests, calls[column + 2]) for phase, column in PHASE_COLUMN.items()}}
    return {
        "name": model, "version": version,
        "last_inference": int(_sum(totals, "convnet_last_inference_timestamp_seconds", model=model) * 1000),
        "inference_count": int(_sum(totals, "convnet_images_total", model=model)),
        "execution_count": int(calls[CALLS]),
        "inference_stats": {
            "success": _duration(_sum(totals, "convnet_request_seconds_count", model=model, endpoint=endpoints),
                                 _sum(totals, "convnet_request_seconds_sum", model=model, endpoint=endpoints)),
            "fail": _duration(_sum(totals, "convnet_failed_request_seconds_count", model=model, endpoint=endpoints),
                              _sum(totals, "convnet_failed_request_seconds_sum", model=model, endpoint=endpoints)),
            **phases, "cache_hit": NO_CACHE, "cache_miss": NO_CACHE,
        },
        "batch_stats": _batch_stats(executions),
    }


def statistics(totals: Totals, executions: dict[str, np.ndarray | None],
               models: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The $stats_model_response for (name, version) of each model asked about."""
    return {"model_stats": [model_stat(totals, executions.get(name), name, version) for name, version in models]}
