"""The HTTP ceiling: a bare Starlette endpoint that reads the request body and answers a tiny JSON document.

Nothing a real server could skip happens here, so its requests/s under the same load and CPU allocation bound what
any Python ASGI service (ours included) can reach on that machine.

    python -m uvicorn loadtests.baselines.hello_app:app --host 127.0.0.1 --port 3101 --workers 1
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"hello": "world", "bytes": len(body)})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/hello", hello, methods=["GET", "POST"]), Route("/healthz", healthz)])
