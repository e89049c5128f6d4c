"""The demo page (GET /demo) and what it needs beyond the public API: the model's input as a PNG, and timing.

The page is plain files in serving/static/, served from this process with a strict Content-Security-Policy (its own
scripts, styles and API only: no inline code, no other origin). It calls the public /models and /classify like any
client, plus POST /model_input, which returns the exact uint8 tensor `serving.preprocess` made of an upload (the
224×224 crop AlexNet saw, the 32×32 MNIST-style digit LeNet-5 saw) as a PNG: the page never reimplements a recipe.
Every answer of the public app carries a standard `Server-Timing` header (stamped by serving/limits.py's
`RequestLimits`), so the page can show the server-side latency without changing any JSON body.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from serving.errors import BadParameter
from serving.http import read_upload

if TYPE_CHECKING:
    from serving.api import ClassifierAPI

# The OpenAPI description, which BentoML's Swagger UI at / renders first: the way from / to the page. It replaces
# BentoML's default (a generic README whose badges make the browser fetch images from img.shields.io).
INDEX_DESCRIPTION = ("Image classification with LeNet-5 and AlexNet (ONNX). **Try them in a browser: [the demo page, "
                     "/demo](/demo)**: drop a photo or draw a digit. From code: `POST /classify` below.")
STATIC_DIR = Path(__file__).parent / "static"
PAGE = "demo.html"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Same origin only, nothing inline. Pictures are drawn on canvases from fetched bytes, so img-src needs no blob:.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # nothing from the page is kept, not even by the browser cache
}


MODEL_INPUT_OPENAPI = {"post": {
    "tags": ["Service APIs"], "operationId": "model_input",
    "summary": "The exact uint8 input the model gets for an image (what /classify feeds it), as a PNG",
    "description": "224×224 RGB for AlexNet (resize + centre crop), 32×32 grayscale for LeNet-5 (MNIST-style "
                   "normalisation). Same upload forms and errors as /classify; used by the demo page.",
    "parameters": [{"name": "model", "in": "query", "schema": {"type": "string"},
                    "description": "served model name (GET /models); may also be a multipart field"}],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "model": {"type": "string"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}},
    "responses": {"200": {"description": "the model input, lossless",
                          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                  "4XX": {"description": "the same JSON errors as /classify", "content": {"application/json": {
                      "schema": {"type": "object", "properties": {"error": {"type": "string"},
                                                                  "detail": {"type": "string"}}}}}}}}}


def static_files(directory: Path = STATIC_DIR) -> dict[str, Path]:
    """The files the page may load, by name: a fixed table, so no request path ever reaches the filesystem."""
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


def tensor_png(x: np.ndarray) -> bytes:
    """A preprocessed uint8 HWC array (1 or 3 channels) as a lossless PNG, pixel for pixel."""
    image = Image.fromarray(x[:, :, 0], "L") if x.shape[2] == 1 else Image.fromarray(x, "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def demo_routes(api: ClassifierAPI) -> list[Route]:
    """GET /demo (the page), GET /demo/<file> (its scripts and styles), POST /model_input?model=<name>."""
    files = static_files()
    if PAGE not in files:
        raise FileNotFoundError(f"{STATIC_DIR / PAGE} is missing: the demo page ships with the package")

    def serve(name: str) -> Response:
        path = files[name]
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    async def page(request: Request) -> Response:
        return serve(PAGE)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files or name == PAGE:
            raise HTTPException(404, "no such file; the page is at /demo")
        return serve(name)

    async def to_page(request: Request) -> Response:
        return RedirectResponse("/demo", status_code=308)  # the page's relative links resolve from /demo

    async def model_input(request: Request) -> Response:
        model_name = "-"
        try:
            upload = await read_upload(request, api.cfg.max_body_bytes, known_params=("model",))
            api._model(upload.query)  # a bad query value is refused even when a form field overrides it
            model = api._model(upload.params)
            model_name = model.name
            if len(upload.images) > 1:
                raise BadParameter(f"/model_input takes one image, got {len(upload.images)}")
            x = await api._preprocess(model, upload.images[0])
        except Exception as exc:  # noqa: BLE001 (every failure becomes a JSON answer)
            return api._error("model_input", model_name, exc)
        api._count("model_input", model.name, "ok")
        h, w, c = x.shape
        return Response(tensor_png(x), media_type="image/png",
                        headers={"X-Model-Input": f"{w}x{h}x{c} uint8 ({model.name})", "Cache-Control": "no-store"})

    return [
        Route("/demo", page, methods=["GET"]),
        Route("/demo/", to_page, methods=["GET"]),
        Route("/demo/{name}", asset, methods=["GET"]),
        Route("/model_input", model_input, methods=["POST"]),
    ]
