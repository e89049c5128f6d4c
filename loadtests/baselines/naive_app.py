"""The naive way to serve a model, as a baseline for the benchmarks: what most tutorials show.

A minimal Starlette app: every request is one decode (the service's own `serving.preprocess.preprocess_bytes`, so the
work per image is identical) and one onnxruntime call at batch 1, in Starlette's thread pool, under one uvicorn worker.
No batching, no limits beyond the essentials, no metrics.

    NAIVE_MODELS=alexnet,lenet5 NAIVE_THREADS=1 python -m uvicorn loadtests.baselines.naive_app:app \\
        --host 127.0.0.1 --port 3100 --workers 1
    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:3100/classify?model=alexnet'
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.errors import BadParameter, ClientError, error_body
from serving.preprocess import preprocess_bytes, stack_batch
from serving.registry import DEFAULT_MODELS_DIR, get_model, load_repository

MODELS = load_repository(
    DEFAULT_MODELS_DIR,
    names=[n for n in os.environ.get("NAIVE_MODELS", "").split(",") if n] or None,
    device=os.environ.get("NAIVE_DEVICE", "cpu"),
    threads=int(os.environ.get("NAIVE_THREADS", "0")),
)
for _model in MODELS.values():
    _model.warm_up()


def _classify(data: bytes, model_name: str, k: int) -> dict:
    model = get_model(MODELS, model_name)
    batch = stack_batch([preprocess_bytes(data, model.recipe)])
    card = model.card
    return {"model": card.name, "version": card.version, "weights": card.weights,
            "predictions": model.classify(batch, k)[0]}


async def classify(request: Request) -> JSONResponse:
    try:
        model_name = request.query_params.get("model", next(iter(MODELS)))
        try:
            k = int(request.query_params.get("top_k", "5"))
        except ValueError:
            raise BadParameter("top_k must be an integer") from None
        return JSONResponse(await run_in_threadpool(_classify, await request.body(), model_name, k))
    except ClientError as exc:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/healthz", healthz)])
