"""The public endpoints (/classify, /classify_batch, /models) as a small Starlette app the BentoML service mounts.

It knows the model cards (labels, preprocessing recipe) but holds no onnxruntime session: inference is the
`infer(model_name, uint8 NHWC batch) -> logits` coroutine it is given, which the service wires to BentoML's
adaptive batching. Every failure goes through `serving.errors.error_body`, so a client always gets
`{"error", "detail"}` JSON with the right 4xx (503 when shedding load), never a stack trace.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.batcher import BatchTiming, Decoding
from serving.config import ServiceConfig
from serving.cores import Requests
from serving.demo import MODEL_INPUT_OPENAPI, demo_routes
from serving.errors import (
    BadParameter,
    ClientError,
    ModelRepositoryError,
    ServerBusy,
    UnknownModel,
    error_body,
    routing_error_body,
    shown,
)
from serving.http import Part, Upload, check_image_type, int_param, read_upload
from serving.limits import OncePerMinute, RequestLimits, count_error
from serving.preprocess import (
    ALLOWED_FORMATS,
    DECODE_BUDGET,
    THUMBNAIL_BYTES,
    Recipe,
    decoder_surprise,
    is_large_picture,
    is_thumbnail,
    open_image,
    preprocess_opened,
    preprocess_unless_large,
)
from serving.registry import ModelCard, discover, read_card, read_labels
from serving.runtime import top_k
from serving.statistics import ExecutionTable, read_executions, statistics
from serving.threads import DECODE_THREADS, LARGE_DECODE_THREAD, name_os_thread
from serving.v2 import V2_OPENAPI_PATHS, V2Protocol

log = logging.getLogger("convnet_serving")
# A decoder's bug on hostile bytes is logged with its traceback, but once a minute at most: a client sending the same
# file again and again must not write a traceback a request.
DECODER_SURPRISE = "unexpected error decoding an upload for %s"
log.addFilter(OncePerMinute((DECODER_SURPRISE,), counted_by="convnet_decode_failures_total"))

Infer = Callable[[str, np.ndarray], Awaitable[np.ndarray]]
Describe = Callable[[], Awaitable[list[dict[str, Any]]]]
PARAMS = ("model", "top_k")
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by BentoML in each worker: the registry's files and our tables
DECODE_ERRORS = ("not_an_image", "unsupported_format", "corrupt_image", "unsupported_mode", "image_too_large",
                 "extreme_aspect_ratio")


@dataclass(frozen=True)
class ModelInfo:
    """What the front end needs of a model: its card, labels and recipe (the session lives in the model service)."""

    card: ModelCard
    labels: list[str]
    recipe: Recipe

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def header(self) -> dict[str, Any]:
        """What every answer about this model starts with."""
        return {"model": self.name, "version": self.card.version, "weights": self.card.weights}

    @functools.cached_property
    def answer_pieces(self) -> tuple[str, list[str]]:
        """/classify's answer cut where the predictions go: the header's JSON up to the predictions, and each
        class's `{"index":…,"label":…,"score":` (made once; `classify_answer` joins them)."""
        head = _dumps({**self.header, "predictions": []})[:-2]
        return head, [f'{{"index":{i},"label":{_dumps(label)},"score":' for i, label in enumerate(self.labels)]


def _dumps(value: Any) -> str:
    """JSON as Starlette's JSONResponse writes it (UTF-8 kept, no spaces, NaN refused)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _score(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"Out of range float values are not JSON compliant: {x!r}")
    return float.__repr__(x)  # what json.dumps writes for a float


def classify_answer(model: ModelInfo, predictions: list[dict[str, Any]]) -> Response:
    """`JSONResponse({**model.header, "predictions": predictions})`, the same bytes (tests/test_top_k.py), from
    pieces made once per model. json.dumps built an encoder per call and walked every dict: 25 → 13 µs an answer in a
    hot loop, ~3% of a LeNet-5 request in the worker (#10; docs/service.md, "Thirteenth pass")."""
    head, items = model.answer_pieces
    body = head + ",".join([items[p["index"]] + _score(p["score"]) + "}" for p in predictions]) + "]}"
    return Response(body.encode(), media_type="application/json")


def read_models(models_dir: Path, names: tuple[str, ...] | list[str] = ()) -> dict[str, ModelInfo]:
    """The cards of the models to serve: the named ones, or every model with a card (reads no ONNX)."""
    infos = {}
    for d in discover(models_dir):
        if names and d.name not in names:
            continue
        card = read_card(d)
        infos[card.name] = ModelInfo(card, read_labels(d, card), card.recipe)
    missing = sorted(set(names) - set(infos))
    if missing or not infos:
        raise ModelRepositoryError(f"no card for {missing or 'any model'} under {models_dir}: run `make models`")
    return infos


class Metrics:
    """Our Prometheus series, served at /metrics with BentoML's own (the model service's batching, for one) from the
    same multiprocess registry. Created inside the worker, after BentoML has set PROMETHEUS_MULTIPROC_DIR, so every
    worker's counts are aggregated."""

    def __init__(self, run_here: Iterable[str] = (), max_rows: int = 256) -> None:
        """`run_here`: the models whose onnxruntime calls this process makes; `max_rows`: the most rows one call can
        have (the statistics' calls by rows go up to it)."""
        import prometheus_client as prom

        self.requests = prom.Counter("convnet_requests", "Classification requests by endpoint, model and outcome "
                                     "(ok or the error code)", ["endpoint", "model", "outcome"])
        # Errors answered before a request reaches a route, or instead of its answer: invisible in the one above.
        self.http_errors = prom.Counter(
            "convnet_http_errors", "Errors answered outside the routes, by error code: unparsable requests "
            "(bad_request), headers too large (headers_too_large) or too slow (request_timeout), over the connection "
            "or request cap (server_busy), past CONVNET_TIMEOUT_S (timeout), no such path (not_found) or method "
            "(method_not_allowed)", ["error"])
        self.images = prom.Counter("convnet_images", "Images classified, by model", ["model"])
        self.decode_failures = prom.Counter("convnet_decode_failures", "Uploads that could not be decoded, by "
                                            "error code", ["model", "error"])
        self.preprocess_seconds = prom.Histogram(
            "convnet_preprocess_seconds", "Decode + resize + crop time per image", ["model"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
        self.batch_size = prom.Histogram("convnet_batch_size", "Rows per onnxruntime call of the front workers' "
                                         "micro-batching, by model", ["model"],
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        # The latency a client sees, less the network: BentoML's own request histogram is off (its middleware cost
        # more than LeNet-5's inference, #10), so our routes time themselves, at one observation a request.
        self.request_seconds = prom.Histogram(
            "convnet_request_seconds", "Time from a classification request's headers to its answer (reading the body, "
            "decoding, waiting for a batch, inference), requests answered 200, by endpoint and model",
            ["endpoint", "model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                            10.0, 30.0, 60.0))
        self.inference_seconds = prom.Histogram(
            "convnet_inference_seconds", "Time of one onnxruntime call of the front workers' micro-batching (the rest "
            "of a request's time is its upload, decoding and wait), by model", ["model"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.wide_batches = prom.Counter(
            "convnet_wide_batches", "onnxruntime calls a front worker ran on every worker's threads because no other "
            "worker had a request in progress (CONVNET_BORROW_IDLE_CPUS=1), by model", ["model"])
        self.failed_request_seconds = prom.Summary(
            "convnet_failed_request_seconds", "Time from a classification request's headers to its error answer, by "
            "endpoint and model (requests for an unknown model are not here)", ["endpoint", "model"])
        # The statistics extension's onnxruntime calls (/v2/models/stats): not series but a small array per model
        # and process (serving.statistics.ExecutionTable says why), in the model service's workers too.
        # Made here, at start-up, not on a model's first call: their files exist before the worker serves.
        self._tables = {model: ExecutionTable(model, max_rows, os.environ.get(MULTIPROC_DIR)) for model in run_here}
        self.last_inference = prom.Gauge(
            "convnet_last_inference_timestamp_seconds", "When the last onnxruntime call for the model answered "
            "(Unix time)", ["model"], multiprocess_mode="max")
        # A worker stalled by a long collection stalls every request it holds: make the pauses visible.
        self.gc_pause_seconds = prom.Histogram(
            "convnet_gc_pause_seconds", "Garbage-collector pauses in the front workers, by generation", ["generation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5))
        # The same pauses in the collecting thread's CPU time: what the collector itself did. On a core it shares
        # with onnxruntime's compute threads, a pause's wall time above also counts the slices the model ran in.
        self.gc_pause_cpu_seconds = prom.Histogram(
            "convnet_gc_pause_cpu_seconds", "CPU time of the collecting thread in each garbage-collector pause, by "
            "generation", ["generation"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5))
        # What the collector would have to scan: with none of the per-request objects left over, flat under load.
        self.gc_tracked_objects = prom.Gauge(
            "convnet_gc_tracked_objects", "Objects the garbage collector tracks, not counting those frozen at "
            "start-up, per worker (sampled at most once a second): flat under steady load", multiprocess_mode="all")
        self._gc_started = (0.0, 0.0)  # (wall, thread CPU) when the running collection began
        # (generation, wall seconds, CPU seconds) of each collection not yet reported
        self._gc_pauses: deque[tuple[str, float, float]] = deque(maxlen=100_000)
        self._next_tracked_count = 0.0  # time.monotonic() from which flush_gc counts the tracked objects again
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._collect, self._render = self._registry(prom)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client checks the labels and takes a lock on every
        `labels()` call, and each request counted itself several times (#10). Label values are a small set (endpoints,
        models, error codes), as for prometheus_client's own table of children."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_batch(self, model: str, timing: BatchTiming) -> None:
        """One onnxruntime call of the front workers' micro-batching that answered."""
        self.child(self.batch_size, model).observe(timing.rows)
        self.child(self.inference_seconds, model).observe(timing.infer_s)
        self.observe_execution(model, timing.rows, timing.requests, timing.queued_s, compute_input=timing.input_s,
                               compute_infer=timing.infer_s, compute_output=timing.output_s)

    def observe_execution(self, model: str, rows: int, requests: int = 0, queued_s: float = 0.0,
                          **phase_seconds: float) -> None:
        """One onnxruntime call that answered (`ExecutionTable.add`), for the statistics extension."""
        self._tables[model].add(rows, requests, queued_s, **phase_seconds)
        self.child(self.last_inference, model).set(time.time())

    def statistics(self, models: list[tuple[str, str]]) -> dict[str, Any]:
        """The statistics extension's answer for (name, version) of these models, from every worker's series and
        execution tables (reads their files: call it off the event loop)."""
        totals = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                  for family in self._collect() for sample in family.samples}
        directory = os.environ.get(MULTIPROC_DIR)
        executions = {name: read_executions(name, directory, self._tables.get(name)) for name, _ in models}
        return statistics(totals, executions, models)

    def count_http_error(self, code: str) -> None:
        self.child(self.http_errors, code).inc()

    def watch_gc(self) -> None:
        """Time every collection from now on (call it after start-up, so the pauses shown are serving-time ones)."""
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Runs inside the collector, which can interrupt any allocation: also prometheus_client's own, while it holds
        its non-reentrant lock (observing here then deadlocked the worker; seen in the container). So it only
        records, and `flush_gc` reports."""
        if phase == "start":
            self._gc_started = (time.perf_counter(), time.thread_time())
            return
        wall, cpu = self._gc_started
        self._gc_pauses.append((str(info["generation"]), time.perf_counter() - wall, time.thread_time() - cpu))

    def flush_gc(self) -> None:
        """Report the collections recorded since the last call (after each request, and before /metrics renders)."""
        while self._gc_pauses:
            generation, wall, cpu = self._gc_pauses.popleft()
            self.child(self.gc_pause_seconds, generation).observe(wall)
            self.child(self.gc_pause_cpu_seconds, generation).observe(cpu)
        if time.monotonic() >= self._next_tracked_count:
            self.count_tracked()

    def count_tracked(self) -> None:
        """Set the tracked-objects gauge now (~20 µs for 5,000 objects, measured; so at most once a second
        from `flush_gc`)."""
        self._next_tracked_count = time.monotonic() + 1.0
        self.gc_tracked_objects.set(len(gc.get_objects()))  # all three generations; frozen objects are not listed

    @staticmethod
    def _registry(prom) -> tuple[Callable[[], Iterable[Any]], Callable[[], bytes]]:
        """(collect, render) over every worker's series: the multiprocess registry's files, read anew each call."""
        from prometheus_client import multiprocess

        if not os.environ.get(MULTIPROC_DIR):
            return prom.REGISTRY.collect, lambda: prom.generate_latest(prom.REGISTRY)

        def registry():
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return registry

        return lambda: registry().collect(), lambda: prom.generate_latest(registry())

    def render(self) -> bytes:
        """The text exposition of every worker's series (reads the registry's files: call it off the event loop)."""
        return self._render()


class DirectRoutes:
    """ASGI: the busiest endpoints called straight, everything else through `router`. Starlette's router and its
    error and exception middlewares cost about a fifth of a LeNet-5 request's server time (measured: docs/service.md),
    and these endpoints need none of it: they answer every failure themselves, as JSON."""

    def __init__(self, router: Starlette, endpoints: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]):
        self.router, self.endpoints = router, endpoints

    async def __call__(self, scope, receive, send) -> None:
        endpoint = self.endpoints.get((scope.get("method"), scope["path"])) if scope["type"] == "http" else None
        if endpoint is None:
            await self.router(scope, receive, send)
            return
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


class ClassifierAPI:
    def __init__(self, cfg: ServiceConfig, models: dict[str, ModelInfo]):
        self.cfg, self.models = cfg, models
        self.infer: Infer | None = None
        self.describe: Describe | None = None
        self.metrics: Metrics | None = None
        self.default_model = cfg.default_model if cfg.default_model in models else sorted(models)[0]
        # Pillow releases the GIL while decoding and resizing, so threads decode in parallel off the event loop.
        self.pool = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix=DECODE_THREADS,
                                       initializer=name_os_thread)
        # Pictures over LARGE_PICTURE_PIXELS decode one at a time in a thread of their own, within the pixel budget;
        # the smaller ones bound their memory by their size and number, so they never wait for the budget.
        self.large = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LARGE_DECODE_THREAD,
                                        initializer=name_os_thread)
        self.decoding = {name: Decoding() for name in models}  # uploads in the pools now, per model
        self.in_progress = Requests()  # this worker's requests, for borrowing idle cores (serving/cores.py)
        DECODE_BUDGET.resize(cfg.decode_budget_pixels)

    def attach(self, infer: Infer, describe: Describe, metrics: Metrics | None = None) -> None:
        """Wire in inference once the serving worker exists (the app itself is built at import time)."""
        self.infer, self.describe, self.metrics = infer, describe, metrics

    def openapi_paths(self) -> dict[str, Any]:
        return openapi_paths(list(self.models), self.default_model, self.cfg.max_top_k, self.cfg.max_batch_images)

    def routes(self) -> list[Route]:
        return [
            Route("/classify", self.classify, methods=["POST"]),
            Route("/classify_batch", self.classify_batch, methods=["POST"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
            *V2Protocol(self).routes(),  # the Open Inference Protocol (KServe v2 / Triton REST): serving/v2.py
            *demo_routes(self),  # GET /demo (the page), POST /model_input (what the model saw, as a PNG)
        ]

    def app(self) -> Starlette:
        """Our routes behind the per-request limits (serving/limits.py), as the Starlette app BentoML mounts."""
        return Starlette(routes=self.routes(), exception_handlers={HTTPException: self._http_exception},
                         middleware=[Middleware(RequestLimits, **self._limits())])

    def direct_app(self) -> RequestLimits:
        """The same, with the two classification endpoints called directly: the front door's short way."""
        router = Starlette(routes=self.routes(), exception_handlers={HTTPException: self._http_exception})
        return RequestLimits(DirectRoutes(router, {("POST", "/classify"): self.classify,
                                                   ("POST", "/classify_batch"): self.classify_batch}),
                             **self._limits())

    def _limits(self) -> dict[str, Any]:
        return {"max_requests": self.cfg.max_concurrent_requests, "body_timeout_s": self.cfg.body_timeout_s,
                "retry_after_s": self.cfg.retry_after_s, "worker_requests": self.in_progress}

    # ---- endpoints -------------------------------------------------------------------------------------------

    async def classify(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        model_name = "-"
        try:
            upload = await read_upload(request, self.cfg.max_body_bytes, known_params=PARAMS)
            model, k = self._options(upload)
            model_name = model.name
            if len(upload.images) > 1:
                raise BadParameter(f"/classify takes one image, got {len(upload.images)}: use /classify_batch")
            x = await self._preprocess(model, upload.images[0])
            logits = await self.infer(model.name, x[None])
            predictions = top_k(logits, k, model.labels)[0]
        except Exception as exc:  # noqa: BLE001 (every failure becomes a JSON answer)
            return self._error("classify", model_name, exc, started)
        self._count("classify", model.name, "ok", images=1, started=started)
        return classify_answer(model, predictions)

    async def classify_batch(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        model_name = "-"
        try:
            upload = await read_upload(request, self.cfg.max_body_bytes, known_params=PARAMS, allow_raw=False)
            model, k = self._options(upload)
            model_name = model.name
            if len(upload.images) > self.cfg.max_batch_images:
                raise BadParameter(f"{len(upload.images)} images in one request; the limit is "
                                   f"{self.cfg.max_batch_images}")
            arrays = await self.preprocess_each(model, upload.images)
            good = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
            predictions: dict[int, list[dict]] = {}
            if good:
                logits = await self.infer(model.name, np.stack([arrays[i] for i in good]))
                predictions = dict(zip(good, top_k(logits, k, model.labels), strict=True))
        except Exception as exc:  # noqa: BLE001
            return self._error("classify_batch", model_name, exc, started)
        results = []
        for i, (part, a) in enumerate(zip(upload.images, arrays, strict=True)):
            item: dict[str, Any] = {"index": i, "filename": part.filename}
            if i in predictions:
                item["predictions"] = predictions[i]
            else:
                status, body = error_body(a)  # type: ignore[arg-type]
                item.update(body, status=status)
            results.append(item)
        self._count("classify_batch", model.name, "ok", images=len(good), started=started)
        return JSONResponse({**model.header, "results": results})

    async def list_models(self, request: Request) -> JSONResponse:
        try:
            described = await self.describe()
        except Exception as exc:  # noqa: BLE001
            return self._error("models", "-", exc)
        return JSONResponse({"default_model": self.default_model, "models": described})

    async def metrics_page(self, request: Request) -> Response:
        if self.metrics is None:
            return self._error("metrics", "-", ServerBusy("the worker is still starting; retry shortly"))
        self.metrics.count_tracked()  # first, so flush_gc finds it fresh and does not count again
        self.metrics.flush_gc()
        body = await asyncio.get_running_loop().run_in_executor(self.pool, self.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _options(self, upload: Upload) -> tuple[ModelInfo, int]:
        """(model, top_k) of a request; a bad query value is refused even when a form field overrides it."""
        self._model(upload.query), self._top_k(upload.query)
        return self._model(upload.params), self._top_k(upload.params)

    def _model(self, params: dict[str, str]) -> ModelInfo:
        name = params.get("model", self.default_model)  # given but empty is a mistake, not "the default"
        if name not in self.models:
            raise UnknownModel(f"unknown model {shown(name)}; served models: {', '.join(sorted(self.models))}")
        return self.models[name]

    def _top_k(self, params: dict[str, str]) -> int:
        return int_param(params, "top_k", self.cfg.default_top_k, 1, self.cfg.max_top_k)

    async def preprocess_each(self, model: ModelInfo, parts: list[Part]) -> list[np.ndarray | BaseException]:
        """`_preprocess` of every image of one request, each one's array or its error, in order. At most
        `decode_threads` + 1 at a time: a request of 60 slow pictures queues a few in the decoding threads, not all
        of them ahead of every other request's (60 GIFs of 300 KB that Pillow opens slowly held photos 3.1 s)."""
        slots = asyncio.Semaphore(self.cfg.decode_threads + 1)

        async def one(part: Part) -> np.ndarray:
            async with slots:
                return await self._preprocess(model, part)

        return await asyncio.gather(*(one(part) for part in parts), return_exceptions=True)

    async def _preprocess(self, model: ModelInfo, part: Part) -> np.ndarray:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            check_image_type(part.content_type, f"multipart field {part.name!r}" if part.name else "the request body")
            if len(part.data) <= THUMBNAIL_BYTES:  # only small uploads are even opened on the event loop (*)
                opened = open_image(part.data, self.cfg.max_pixels)  # the header only: format, size, pixel cap
                if is_thumbnail(opened, len(part.data)):  # LeNet-5's digits: cheaper here than a hop and back
                    return preprocess_opened(opened, model.recipe, budgeted=False)
            with self.decoding[model.name].upload():  # the model's batcher waits for it (serving/batcher.py)
                if len(part.data) > THUMBNAIL_BYTES:  # opened, and unless large also decoded, in one hop
                    opened = await loop.run_in_executor(self.pool, preprocess_unless_large, part.data, model.recipe,
                                                        self.cfg.max_pixels)
                    if isinstance(opened, np.ndarray):
                        return opened
                large = is_large_picture(opened, model.recipe)
                return await loop.run_in_executor(self.large if large else self.pool, preprocess_opened, opened,
                                                  model.recipe, large)
            # (*) Pillow parses some headers block by block in Python: a 10 MB GIF of 1-byte comment blocks held the
            # event loop, and every request on the worker, for 1.3 s. 64 KiB of anything parses in milliseconds.
        except ClientError as exc:
            if self.metrics is not None and exc.code in DECODE_ERRORS:
                self.metrics.child(self.metrics.decode_failures, model.name, exc.code).inc()
            raise
        except Exception as exc:  # a decoder bug on hostile bytes is still the bytes' fault, but log it
            log.warning(DECODER_SURPRISE, model.name, exc_info=True)
            if self.metrics is not None:
                self.metrics.child(self.metrics.decode_failures, model.name, "corrupt_image").inc()
            raise decoder_surprise(exc) from exc
        finally:
            if self.metrics is not None:
                self.metrics.child(self.metrics.preprocess_seconds, model.name).observe(time.perf_counter() - t0)

    def _count(self, endpoint: str, model: str, outcome: str, images: int = 0, started: float | None = None) -> None:
        """Count a request by its outcome; `started` (time.perf_counter() when its handler began) times its answer,
        or its error when the model is known."""
        if self.metrics is not None:
            self.metrics.flush_gc()
            self.metrics.child(self.metrics.requests, endpoint, model, outcome).inc()
            if images:
                self.metrics.child(self.metrics.images, model).inc(images)
            if started is not None:
                seconds = time.perf_counter() - started
                if outcome == "ok":
                    self.metrics.child(self.metrics.request_seconds, endpoint, model).observe(seconds)
                elif model in self.models:
                    self.metrics.child(self.metrics.failed_request_seconds, endpoint, model).observe(seconds)

    def _error(self, endpoint: str, model: str, exc: BaseException, started: float | None = None) -> JSONResponse:
        status, body = error_body(exc)
        if not isinstance(exc, ClientError):
            log.error("%s failed", endpoint, exc_info=exc)
        self._count(endpoint, model, body["error"], started=started)
        return JSONResponse(body, status_code=status, headers=self.error_headers(exc, status))

    def error_headers(self, exc: BaseException, status: int) -> dict[str, str]:
        """What an error's status calls for besides its body: the exception's own headers (a 415's Accept-Encoding)
        and, on a 503, Retry-After. /classify's and /v2's errors both answer with these."""
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 503:
            headers["Retry-After"] = str(self.cfg.retry_after_s)
        return headers

    async def _http_exception(self, request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        body = routing_error_body(status, request.method, request.url.path, getattr(exc, "detail", ""))
        count_error(body["error"])
        # Starlette's 405 carries the Allow header RFC 9110 §15.5.6 requires: keep it.
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


# ---- OpenAPI (BentoML's /docs.json lists only @bentoml.api methods; the service merges these in) ---------------

_ERROR = {"type": "object", "required": ["error", "detail"],
          "properties": {"error": {"type": "string", "example": "not_an_image"}, "detail": {"type": "string"}}}
_PREDICTION = {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"},
                                                "score": {"type": "number", "description": "softmax probability"}}}
_HEADER = {"model": {"type": "string"}, "version": {"type": "string"},
           "weights": {"type": "string", "description": "trained, imagenet1k-official or untrained-demo"}}
def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    meaning = {400: "not an image / corrupt / truncated / unsupported format or mode",
               413: "body over the size limit, or image over the pixel cap", 415: "content type cannot be an image",
               422: "bad parameter: unknown model, top_k out of range, wrong or missing field",
               401: "no API key or an unknown one (only when API keys are on: docs/keys.md)",
               408: "the request's headers or body arrived too slowly (the connection is closed)",
               503: "overloaded or model worker restarting: retry after the Retry-After header's seconds",
               504: "not answered within CONVNET_TIMEOUT_S"}
    return {str(c): {"description": meaning[c], **_json(_ERROR)} for c in codes}


def openapi_paths(models: list[str], default_model: str, max_top_k: int, max_batch_images: int) -> dict[str, Any]:
    """Our paths for /docs.json, exact enough that every request valid under them is answered 200 (schemathesis
    checks it in tests/test_fuzz.py): the served models as an enum, top_k's real bounds, at least one image."""
    model = {"type": "string", "enum": sorted(models), "default": default_model}
    top_k = {"type": "integer", "minimum": 1, "maximum": max_top_k, "default": 5}
    query = [{"name": "model", "in": "query", "schema": model,
              "description": "served model name (GET /models); may also be a multipart field"},
             {"name": "top_k", "in": "query", "schema": top_k,
              "description": "number of classes to return; may also be a multipart field"}]
    image = {"type": "string", "format": "binary", "description": f"an image ({', '.join(ALLOWED_FORMATS)})"}
    errors = _errors(400, 401, 408, 413, 415, 422, 503, 504)
    model_input = copy.deepcopy(MODEL_INPUT_OPENAPI)  # the demo's endpoint takes the same model names
    model_input["post"]["parameters"][0]["schema"] = model
    model_input["post"]["requestBody"]["content"]["multipart/form-data"]["schema"].update(
        additionalProperties=False, properties={"image": image, "model": model})
    return {
        "/model_input": model_input,
        "/classify": {"post": {
            "tags": ["Service APIs"], "operationId": "classify",
            "summary": "Classify one image (multipart field `image`, or the raw image as the body)",
            "parameters": query,
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["image"], "additionalProperties": False,
                    "properties": {"image": image, "model": model, "top_k": top_k}}},
                "image/*": {"schema": image},
                "application/octet-stream": {"schema": image}}},
            "responses": {"200": {"description": "top-k classes, best first", **_json(
                {"type": "object", "properties": {**_HEADER, "predictions": {"type": "array", "items": _PREDICTION}}})},
                **errors}}},
        "/classify_batch": {"post": {
            "tags": ["Service APIs"], "operationId": "classify_batch",
            "summary": "Classify several images (repeat the multipart field `image`); one result or error per image",
            "parameters": query,
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"], "additionalProperties": False, "properties": {
                    "image": {"type": "array", "items": image, "minItems": 1, "maxItems": max_batch_images},
                    "model": model, "top_k": top_k}}}}},
            "responses": {"200": {"description": "results in upload order", **_json({"type": "object", "properties": {
                **_HEADER, "results": {"type": "array", "items": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "filename": {"type": "string", "nullable": True},
                    "predictions": {"type": "array", "items": _PREDICTION},
                    "error": {"type": "string"}, "detail": {"type": "string"}, "status": {"type": "integer"}}}}}})},
                **errors}}},
        "/models": {"get": {
            "tags": ["Service APIs"], "operationId": "models",
            "summary": "Cards of the served models, with runtime info",
            "responses": {"200": {"description": "model cards", **_json({"type": "object", "properties": {
                "default_model": {"type": "string"}, "models": {"type": "array", "items": {"type": "object"}}}})},
                **_errors(401, 503, 504)}}},
        **V2_OPENAPI_PATHS,
    }
