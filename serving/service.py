"""The BentoML service: `bentoml serve serving.service:Convnet` (what `make serve` runs).

Two services, as BentoML pairs them: `Convnet` faces clients (a Starlette app for /classify, /classify_batch and
/models, decoding uploads in a thread pool) and calls `Models`, a separate process whose per-model `logits_<name>`
endpoints are batchable, so BentoML's adaptive batching merges concurrent requests into one onnxruntime run. A bad
upload is refused by `Convnet` before it reaches a batch, so it costs nobody else their answer.
Tunables: serving/config.py (CONVNET_* variables or a TOML file named by CONVNET_CONFIG).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.validators import DType
from starlette.responses import JSONResponse

from serving.api import OPENAPI_PATHS, ClassifierAPI, Metrics, read_models
from serving.config import describe, load_config, model_parallelism
from serving.demo import INDEX_DESCRIPTION
from serving.errors import ServerBusy
from serving.registry import ServedModel, load_repository
from serving.runtime import candidate_providers

log = logging.getLogger("convnet_serving")
log.setLevel(logging.INFO)  # BentoML's root handler prints it, tagged with the worker that logged it

CFG = load_config()
MODEL_INFOS = read_models(CFG.models_dir, CFG.models)  # cards only: the endpoints below are made per model
USES_GPU = candidate_providers(CFG.device)[0] != "CPUExecutionProvider"
MODEL_WORKERS, ORT_THREADS = model_parallelism(CFG, USES_GPU)
INLINE = [n for n, info in MODEL_INFOS.items() if info.card.parameters < CFG.inline_max_params]
BATCHED = [n for n in MODEL_INFOS if n not in INLINE]
NO_SPIN = {"session.intra_op.allow_spinning": str(CFG.ort_spinning)}
# The internal client otherwise recycles its session every 100 requests and drops calls in flight under load.
RUNNER_CONNECTION = {"max_requests": 10**9, "max_age": 1e9}


class WorkerLifeRecord:
    """Leaves `<tmp>/convnet-<arbiter pid>-<service>-<worker>.pid` while a worker lives. BentoML's arbiter restarts
    a dead worker without a word; finding the file of a predecessor that never shut down cleanly means it crashed,
    and the new worker says so in the log."""

    def __init__(self, service: str) -> None:
        index = bentoml.server_context.worker_index or 0
        self.path = Path(tempfile.gettempdir()) / f"convnet-{os.getppid()}-{service}-{index}.pid"
        if self.path.exists():
            log.error("%s worker %s (pid %s) died without shutting down (crash or kill); restarted as pid %d",
                      service, index, self.path.read_text().strip() or "?", os.getpid())
        self.path.write_text(str(os.getpid()))

    def clean_exit(self) -> None:
        self.path.unlink(missing_ok=True)


def load_warm(names: list[str], device: str, threads: int) -> dict[str, ServedModel]:
    """Load the named models and run one real inference on each (readiness means they answer)."""
    models = load_repository(CFG.models_dir, names, device, threads, session_config=NO_SPIN) if names else {}
    for model in models.values():
        model.warm_up()
        log.info("model %s ready on %s (providers %s)", model.name, model.session.device, model.session.providers)
    return models


def with_placement(card: dict, placement: str) -> dict:
    card["runtime"]["placement"] = placement
    return card


def endpoint_name(model: str) -> str:
    return "logits_" + re.sub(r"\W", "_", model)


def _logits_endpoint(model: str) -> bentoml.api:
    def logits(self, batch: Annotated[np.ndarray, DType("uint8")]) -> np.ndarray:
        return self.models[model].logits(batch)

    logits.__name__ = endpoint_name(model)
    return bentoml.api(batchable=True, max_batch_size=CFG.max_batch_size, max_latency_ms=CFG.max_latency_ms)(logits)


class _ModelWorker:
    """Every batched model's onnxruntime session, loaded and warmed up by a real inference before the worker serves."""

    served = BATCHED

    def __init__(self) -> None:
        self.life = WorkerLifeRecord("convnet_models")
        log.info("model worker settings: %s (%d workers x %d onnxruntime threads)", json.dumps(describe(CFG)),
                 MODEL_WORKERS, ORT_THREADS)
        self.models = load_warm(self.served, CFG.device, ORT_THREADS)

    def __is_ready__(self) -> bool:
        return True  # only reachable once __init__ has loaded and warmed up every model

    @bentoml.on_shutdown
    def _clean_exit(self) -> None:
        self.life.clean_exit()

    @bentoml.api
    def describe(self) -> list[dict]:
        return [with_placement(m.describe(), "model service, adaptive batching") for m in self.models.values()]


Models = bentoml.service(
    name="convnet_models", workers=MODEL_WORKERS, threads=1, traffic={"timeout": CFG.timeout_s},
    resources={"gpu": 1} if USES_GPU else {}, runner_connection=RUNNER_CONNECTION,
    logging={"access": {"enabled": False}},  # the front service logs every request already
)(type("Models", (_ModelWorker,), {endpoint_name(n): _logits_endpoint(n) for n in BATCHED}))

API = ClassifierAPI(CFG, MODEL_INFOS)


class OpenAPIPaths:
    """Adds the mounted endpoints to BentoML's /docs.json, which lists only @bentoml.api methods (and FastAPI)."""

    def __init__(self, app, service: bentoml.Service, paths: dict) -> None:
        self.app, self.service, self.paths = app, service, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/docs.json" and scope["method"] == "GET":
            spec = self.service.openapi_spec.asdict()
            spec["paths"] = {**self.paths, **spec.get("paths", {})}
            spec["info"]["description"] = INDEX_DESCRIPTION  # Swagger UI at / shows it first: links the demo page
            await JSONResponse(spec)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@bentoml.asgi_app(API.app(), path="/")
@bentoml.service(name="convnet", workers=CFG.api_workers, traffic={"timeout": CFG.timeout_s})
class Convnet:
    """Image classification with LeNet-5 and AlexNet: POST an image to /classify (see /docs.json)."""

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        self.life = WorkerLifeRecord("convnet")
        self.inline = load_warm(INLINE, "cpu", 1)
        API.attach(self._infer, self._describe, Metrics())
        log.info("serving %s (default %s); batched in the model service on %s: %s; inline: %s",
                 ", ".join(MODEL_INFOS), API.default_model, "GPU" if USES_GPU else "CPU", BATCHED or "none",
                 INLINE or "none")
        log.info("demo page: /demo on the address BentoML listens on (make serve prints the full URL)")

    async def _infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        if model in self.inline:
            return await asyncio.get_running_loop().run_in_executor(API.pool, self.inline[model].logits, batch)
        try:
            return await getattr(self.models.to_async, endpoint_name(model))(batch)
        except bentoml.exceptions.BentoMLException as exc:
            if exc.error_code.value in (429, 503):  # the dispatcher shed the request: it waited past max_latency_ms
                raise ServerBusy("the server is overloaded; retry shortly") from exc
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # the model worker is restarting
            log.warning("model service unreachable: %r", exc)
            raise ServerBusy("the model worker is unavailable (restarting?); retry shortly") from exc

    async def _describe(self) -> list[dict]:
        batched = await self.models.to_async.describe() if BATCHED else []
        inline = [with_placement(m.describe(), "front service, inline") for m in self.inline.values()]
        return sorted(batched + inline, key=lambda card: card["name"])

    @bentoml.on_shutdown
    def _clean_exit(self) -> None:
        self.life.clean_exit()


Convnet.add_asgi_middleware(OpenAPIPaths, service=Convnet, paths=OPENAPI_PATHS)
