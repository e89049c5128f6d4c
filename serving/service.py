"""The BentoML service: `bentoml serve serving.service:Convnet` (what `make serve` runs).

The request path, top to bottom. `FrontDoor` (below) meets every request in a front worker and
sends ours (/classify, /classify_batch, /models, /metrics, /v2, /demo) straight to serving/api.py, past BentoML's
middleware stack. There a request is read and checked, its image decoded in a thread pool (serving/preprocess.py),
and the uint8 batch handed to `Convnet._infer`, which runs it where its model lives:
- **in this worker** (every model, on CPU): a per-model MicroBatcher (serving/batcher.py) merges concurrent
  requests into one onnxruntime call. Decoding and inference share the process: no hop, no tensor copies.
- **in the `Models` service** (on a GPU): BentoML's adaptive batching merges every front worker's requests into one
  GPU batch. The front workers only decode and relay, so they scale with the CPUs that decoding needs.
A bad upload is refused before it reaches a batch, so it costs nobody else their answer.
Tunables: serving/config.py (CONVNET_* variables or a TOML file named by CONVNET_CONFIG). Why this shape, with the
measurements behind it: docs/service.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.validators import DType
from starlette.responses import HTMLResponse, JSONResponse, Response

from serving import upstream
from serving.api import ClassifierAPI, Metrics, read_models
from serving.batcher import MicroBatcher
from serving.cgroups import cgroup_memory_limit
from serving.config import SMALL_MODEL_PARAMS, describe, load_config, placement, size_workers
from serving.cores import WorkBoard, borrowing
from serving.demo import INDEX_DESCRIPTION
from serving.errors import ServerBusy, routing_error_body
from serving.http import relative_redirects
from serving.keys import install as install_api_keys
from serving.limits import count_error, count_errors_with
from serving.limits import install as install_connection_limits
from serving.limits import wrap_app as wrap_uvicorn_app
from serving.preprocess import warm_decoding
from serving.registry import ServedModel, load_repository
from serving.runtime import OnnxModel, candidate_providers, configure_gpu

log = logging.getLogger("convnet_serving")
log.setLevel(logging.INFO)  # BentoML's root handler prints it, tagged with the worker that logged it
upstream.install()

CFG = load_config()
configure_gpu(CFG.cuda_wait, CFG.cudnn_algo_search)  # for every CUDA session this process makes
if CFG.socket_per_worker:
    upstream.balance_connections()  # takes effect in the arbiter, which builds the sockets after importing this
install_connection_limits(CFG)  # header timeout, connection cap, keep-alive: uvicorn's protocol, in every worker
MODEL_INFOS = read_models(CFG.models_dir, CFG.models)  # cards only: the endpoints below are made per model
USES_GPU = candidate_providers(CFG.device)[0] != "CPUExecutionProvider"
# The most rows of one onnxruntime call: a batch fills up to max_batch_size, but one request is never split.
MAX_ROWS = max(CFG.max_batch_size, CFG.max_batch_images)
PARAMETERS = {n: i.card.parameters for n, i in MODEL_INFOS.items()}
IN_FRONT, IN_MODEL_SERVICE = placement(CFG, PARAMETERS, USES_GPU)
# As many workers as the CPUs call for and the memory holds, a container's CPU quota and memory limit counted.
WORKERS, MEMORY_NOTE = size_workers(CFG, USES_GPU, IN_FRONT, IN_MODEL_SERVICE, PARAMETERS, cgroup_memory_limit())
if MEMORY_NOTE and bentoml.server_context.worker_index is None:  # said once, by the arbiter
    log.warning(MEMORY_NOTE)
# With a model service (a GPU), the small models that stay in front run on the front workers' CPUs.
FRONT_DEVICE = "cpu" if IN_MODEL_SERVICE else CFG.device
FRONT_ON_GPU = USES_GPU and not IN_MODEL_SERVICE  # placement "front" on a GPU: every front worker shares it
NO_SPIN = {"session.intra_op.allow_spinning": str(CFG.ort_spinning)}
# Borrowing idle cores (serving/cores.py): on CPU, a front worker alone in having requests runs its large models on
# the threads of every worker (the CPUs the server is set to use, so a container's CONVNET_ORT_THREADS still holds).
WIDE_THREADS = min(WORKERS["cpus"], WORKERS["api_workers"] * WORKERS["front_ort_threads"])
if not CFG.borrow_idle_cpus or USES_GPU or WIDE_THREADS <= WORKERS["front_ort_threads"]:
    WIDE_THREADS = 0

# The internal client otherwise recycles its session every 100 requests and drops calls in flight under load.
RUNNER_CONNECTION = {"max_requests": 10**9, "max_age": 1e9}
# Tracing and BentoML's per-request metrics cost more than LeNet-5's inference. Our routes are counted by
# serving/api.py's own metrics, and /metrics is served from the same multiprocess registry.
HOT_ROUTES = [r"/classify", r"/models", r"/metrics"]


def server_file(name: str) -> Path:
    """`<tmp>/convnet-<arbiter pid>-<name>`: a file of this server's, shared by its workers (their parent is the
    arbiter), apart from any other server's on the machine."""
    return Path(tempfile.gettempdir()) / f"convnet-{os.getppid()}-{name}"


class WorkerLifeRecord:
    """Leaves `<tmp>/convnet-<arbiter pid>-<service>-<worker>.pid` while a worker lives. BentoML's arbiter restarts
    a dead worker without a word; finding the file of a predecessor that never shut down cleanly means it crashed,
    and the new worker says so in the log."""

    def __init__(self, service: str) -> None:
        index = bentoml.server_context.worker_index or 0
        self.path = server_file(f"{service}-{index}.pid")
        if self.path.exists():
            log.error("%s worker %s (pid %s) died without shutting down (crash or kill); restarted as pid %d",
                      service, index, self.path.read_text().strip() or "?", os.getpid())
        self.path.write_text(str(os.getpid()))

    def clean_exit(self) -> None:
        self.path.unlink(missing_ok=True)


def load_warm(names: list[str], device: str, threads: int) -> dict[str, ServedModel]:
    """Load the named models and run one real inference on each (readiness means they answer)."""
    models = load_repository(CFG.models_dir, names, device, threads, session_config=NO_SPIN,
                             precision=CFG.precision) if names else {}
    for model in models.values():
        model.warm_up(CFG.max_batch_size)  # memory at its working size before the worker says it is ready
        log.info("model %s ready on %s (providers %s)", model.name, model.session.device, model.session.providers)
    return models


# A worker's requests leave no cyclic garbage: gc.DEBUG_SAVEALL found none under load nor on any error path, and with
# the model service only BentoML's client's occasional JSON-schema generator, ~80 objects every 2 s (docs/service.md,
# "Seventh pass"). Yet at Python's default of 700 the collector ran every ~32 LeNet-5 requests, for nothing: frees
# stop counting at zero, so the count of allocations less frees drifts up even when nothing is left over. At 10,000
# it does not run under steady load; cycles, where some path makes them, are still collected.
GC_THRESHOLDS = (10_000, 10, 10)


def settle_heap() -> None:
    """After start-up, move everything alive (modules, models, the app) out of the collector's sight: collections
    then scan only what requests allocate, and stay short. Then make them rare (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def with_placement(card: dict, where: str, workers: int, threads: int) -> dict:
    """A card as /models shows it: where the model runs, in how many processes of how many onnxruntime threads,
    sized for how many CPUs and what memory limit (serving/cgroups.py: a container's quota and limit count)."""
    card["runtime"].update(placement=where, workers=workers, threads=threads, cpus=WORKERS["cpus"],
                           memory_limit_mib=WORKERS["memory_limit"] >> 20 or None)
    return card


def model_service_deadline_s(rows: int) -> float:
    """The longest a front worker waits for the model service: a request's queueing budget plus its own compute,
    generously (AlexNet costs ~14 ms of CPU an image; a busy, shared core can take ten times that)."""
    return CFG.max_latency_ms / 1000 + 2.0 + 0.25 * rows


def endpoint_name(model: str) -> str:
    return "logits_" + re.sub(r"\W", "_", model)


def _logits_endpoint(model: str) -> bentoml.api:
    def logits(self, batch: Annotated[np.ndarray, DType("uint8")]) -> np.ndarray:
        t0 = time.monotonic()
        out = self.models[model].logits(batch)
        # BentoML's dispatcher merged the requests: this call's rows and time are known here, each request's wait not.
        self.metrics.observe_execution(model, len(batch), compute_infer=time.monotonic() - t0)
        return out

    logits.__name__ = endpoint_name(model)
    return bentoml.api(batchable=True, max_batch_size=CFG.max_batch_size, max_latency_ms=CFG.max_latency_ms)(logits)


class _ModelWorker:
    """The model service's onnxruntime sessions, loaded and warmed up by a real inference before the worker serves."""

    def __init__(self) -> None:
        self.life = WorkerLifeRecord("convnet_models")
        log.info("model worker settings: %s (%s)", json.dumps(describe(CFG)), WORKERS)
        self.models = load_warm(IN_MODEL_SERVICE, CFG.device, WORKERS["model_ort_threads"])
        self.metrics = Metrics(IN_MODEL_SERVICE, MAX_ROWS)  # the front's registry: /metrics and /v2/models/stats
        settle_heap()

    def __is_ready__(self) -> bool:
        return True  # only reachable once __init__ has loaded and warmed up every model

    @bentoml.on_shutdown
    def _clean_exit(self) -> None:
        self.life.clean_exit()

    @bentoml.api
    def describe(self) -> list[dict]:
        return [with_placement(m.describe(), "model service, adaptive batching", WORKERS["model_workers"],
                               WORKERS["model_ort_threads"]) for m in self.models.values()]


Models = bentoml.service(
    name="convnet_models", workers=WORKERS["model_workers"], threads=1, traffic={"timeout": CFG.timeout_s},
    resources={"gpu": 1} if USES_GPU else {}, runner_connection=RUNNER_CONNECTION,
    logging={"access": {"enabled": False}},  # the front service counts every request already
    tracing={} if CFG.tracing else {"excluded_urls": [r"/logits_"]},  # a fifth of a GPU model worker's CPU
)(type("Models", (_ModelWorker,), {endpoint_name(n): _logits_endpoint(n) for n in IN_MODEL_SERVICE}))

API = ClassifierAPI(CFG, MODEL_INFOS)
APP = API.app()


class FrontDoor:
    """The first thing a request meets in a front worker: serving/limits.py puts it before uvicorn's app.

    Our routes go straight to our app, with what BentoML's middleware stack would have added for them: the API-key
    check (when keys are on) and the 504 deadline. Everything else (probes, BentoML's pages) goes through BentoML's
    app, but /docs.json is served here with our paths merged in, and / is BentoML's Swagger page without the Google
    Tag Manager it embeds (serving/upstream.py). BentoML's stack (proxy headers, error page, tracing, request
    context, routing) cost a tenth of a LeNet-5 request's server time (measured: docs/service.md), and our routes
    use none of it. With CORS, the access log or tracing on, our routes take BentoML's way, through
    those middlewares.
    """

    def __init__(self, app, ours) -> None:
        from bentoml._internal.configuration.containers import BentoMLContainer

        self.app, self.paths, self.index = app, API.openapi_paths(), upstream.index_html()
        self.ours = PROTECT(upstream.CancellingTimeoutMiddleware(ours, timeout=CFG.timeout_s))
        long_way = BentoMLContainer.http.cors.enabled.get() or CFG.access_log or CFG.tracing
        self.exact, self.prefixes = (set(), ()) if long_way else our_paths(APP)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "*":  # the asterisk form: about the server as a whole, not a path (RFC 9112 §3.2.4)
                await asterisk_form(scope, send)
                return
            if path.endswith("/") and path != "/":  # Starlette redirects these to the same path without the slash
                send = relative_redirects(send)
            if path in self.exact or path.startswith(self.prefixes):
                await self.ours(scope, receive, send)
                return
            if path == "/docs.json" and scope["method"] in ("GET", "HEAD"):  # HEAD: the same headers as GET
                spec = Convnet.openapi_spec.asdict()
                spec["paths"] = {**self.paths, **spec.get("paths", {})}
                spec["info"]["description"] = INDEX_DESCRIPTION  # Swagger UI at / shows it first: links the demo page
                await JSONResponse(spec)(scope, receive, send)
                return
            if path == "/" and scope["method"] in ("GET", "HEAD"):
                await HTMLResponse(self.index)(scope, receive, send)
                return
            send = _json_router_errors(scope, send)
        await self.app(scope, receive, send)


# What this server answers at all (OPTIONS: `OPTIONS *`, and a path's CORS preflight when CORS is on).
SERVER_METHODS = "GET, HEAD, POST, OPTIONS"


async def asterisk_form(scope, send) -> None:
    """`OPTIONS *` asks what the server supports (RFC 9110 §9.3.7): 200 with `Allow`. Any other method with `*` as
    its target is malformed (RFC 9112 §3.2.4: the asterisk form is OPTIONS's alone). Both used to get a 404."""
    if scope["method"] == "OPTIONS":
        await Response(headers={"Allow": SERVER_METHODS})(scope, _no_body, send)
        return
    body = {"error": "bad_request", "detail": f"{scope['method']} *: the request target * is for OPTIONS alone "
            "(RFC 9112 §3.2.4); name a path"}
    count_error(body["error"])
    await JSONResponse(body, status_code=400)(scope, _no_body, send)


def _json_router_errors(scope, send):
    """`send` for BentoML's app, with its router's plain-text 404 and 405 ("Not Found" for /Classify or /docs) turned
    into our JSON error, as our own routes answer them (serving/api.py). Only those two, only when plain text."""
    swallowing = False

    async def send_json_errors(message) -> None:
        nonlocal swallowing
        if swallowing:  # the plain-text body that was replaced
            return
        status = message.get("status")
        if message["type"] == "http.response.start" and status in (404, 405):
            headers = dict(message.get("headers", []))
            if headers.get(b"content-type", b"").startswith(b"text/plain"):
                swallowing = True
                body = routing_error_body(status, scope["method"], scope["path"], HTTPStatus(status).phrase)
                count_error(body["error"])
                allow = {"Allow": headers[b"allow"].decode("latin-1")} if b"allow" in headers else None
                await JSONResponse(body, status_code=status, headers=allow)(scope, _no_body, send)
                return
        await send(message)

    return send_json_errors


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


@functools.cache
def front_door(app):
    """uvicorn's app → the same FrontDoor before it for every connection, in the front service's workers only (the
    model service's workers import this module too)."""
    return FrontDoor(app, API.direct_app()) if bentoml.server_context.service_name == Convnet.name else app


def our_paths(app) -> tuple[set[str], tuple[str, ...]]:
    """(exact paths, path prefixes) of an app's routes: a route with parameters, or a mount, by what precedes them."""
    exact, prefixes = set(), []
    for route in app.routes:
        path = getattr(route, "path", "")
        if "{" in path or not hasattr(route, "endpoint"):
            prefix = path.split("{", 1)[0]
            if len(prefix) > 1:  # never "/" or "": that would take BentoML's own routes (probes, docs) too
                prefixes.append(prefix)
        elif path:
            exact.add(path)
    return exact, tuple(prefixes)


@bentoml.asgi_app(APP, path="/")
@bentoml.service(
    name="convnet", workers=WORKERS["api_workers"], traffic={"timeout": CFG.timeout_s},
    resources={"gpu": 1} if FRONT_ON_GPU else {},
    metrics={"enabled": False},  # /metrics comes from serving/api.py, without a middleware on every request
    logging={"access": {"enabled": bool(CFG.access_log)}},
    tracing={} if CFG.tracing else {"excluded_urls": HOT_ROUTES},
)
class Convnet:
    """Image classification with LeNet-5 and AlexNet: POST an image to /classify (see /docs.json)."""

    if IN_MODEL_SERVICE:
        models = bentoml.depends(Models)

    def __init__(self) -> None:
        self.life = WorkerLifeRecord("convnet")
        self.front = load_warm(IN_FRONT, FRONT_DEVICE, WORKERS["front_ort_threads"])
        warm_decoding(info.recipe for info in MODEL_INFOS.values())  # this worker decodes for every model
        metrics = Metrics(IN_FRONT, MAX_ROWS)
        count_errors_with(metrics.count_http_error)
        self.board, self.borrowing = None, set()
        if WIDE_THREADS and any(m.card.parameters >= SMALL_MODEL_PARAMS for m in self.front.values()):
            self.board = API.in_progress.board = WorkBoard(server_file("convnet-work"), WORKERS["api_workers"],
                                                           bentoml.server_context.worker_index or 1)
        self.batchers = {name: MicroBatcher(self._logits(model, metrics), CFG.max_batch_size,
                                            CFG.max_latency_ms / 1000, name,
                                            on_loop=model.card.parameters < SMALL_MODEL_PARAMS,
                                            on_batch=functools.partial(metrics.observe_batch, name),
                                            decoding=API.decoding[name])
                         for name, model in self.front.items()}
        API.attach(self._infer, self._describe, metrics)
        settle_heap()
        metrics.watch_gc()
        log.info("serving %s (default %s): in this worker on %s: %s; in the model service on %s: %s (%s)",
                 ", ".join(MODEL_INFOS), API.default_model, FRONT_DEVICE, IN_FRONT or "none",
                 "GPU" if USES_GPU else "CPU", IN_MODEL_SERVICE or "none", WORKERS)
        log.info("demo page: /demo on the address BentoML listens on (make serve prints the full URL)")

    def _logits(self, model: ServedModel, metrics: Metrics):
        """The function a model's batcher runs: its session's, or with borrowing on, its session's or a second one's
        on every worker's threads while no other worker has a request in progress (serving/cores.py). Small models
        never borrow: they run on the event loop, in a fraction of a millisecond."""
        if self.board is None or model.card.parameters < SMALL_MODEL_PARAMS:
            return model.logits
        wide = dataclasses.replace(model, session=OnnxModel(model.session.path, device="cpu", threads=WIDE_THREADS,
                                                            session_config=NO_SPIN))
        wide.warm_up(CFG.max_batch_size)  # as load_warm: its memory at its working size before the worker is ready
        log.info("model %s: a second session on %d threads, for when only this worker has requests",
                 model.name, WIDE_THREADS)
        self.borrowing.add(model.name)
        return borrowing(model.logits, wide.logits, self.board, metrics.child(metrics.wide_batches, model.name).inc)

    async def _infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        if model in self.batchers:
            return await self.batchers[model](batch)
        try:
            # A dead model worker's socket still accepts (BentoML's arbiter holds it) and the call would wait for the
            # restart: give it the budget a request has for inference, then say so.
            async with asyncio.timeout(model_service_deadline_s(len(batch))):
                return await getattr(self.models.to_async, endpoint_name(model))(batch)
        except bentoml.exceptions.BentoMLException as exc:
            if exc.error_code.value in (429, 503):  # the dispatcher shed the request: it waited past max_latency_ms
                raise ServerBusy("the server is overloaded; retry shortly") from exc
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # the model worker is restarting
            log.warning("model service unreachable or silent: %r", exc)
            raise ServerBusy("the model worker did not answer in time (overloaded, or restarting); retry shortly") \
                from exc

    async def _describe(self) -> list[dict]:
        remote = await self.models.to_async.describe() if IN_MODEL_SERVICE else []
        here = [with_placement(m.describe(), "front worker, micro-batched", WORKERS["api_workers"],
                               WORKERS["front_ort_threads"]) for m in self.front.values()]
        for card in here:
            if card["name"] in self.borrowing:
                card["runtime"]["idle_cpu_threads"] = WIDE_THREADS  # its threads while no other worker has requests
        return sorted(remote + here, key=lambda card: card["name"])

    @bentoml.on_shutdown
    def _clean_exit(self) -> None:
        self.life.clean_exit()
        if self.board is not None:
            self.board.close()


# API keys: off unless CONVNET_API_KEYS_FILE is set; PROTECT gives the front door's short way the same check.
PROTECT = install_api_keys(Convnet, CFG.api_keys_file, CFG.metrics_auth)
wrap_uvicorn_app(front_door)
