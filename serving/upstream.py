"""Fixes for BentoML behaviour the service depends on, each small, each written up for upstream in docs/service.md.

`install()` runs when serving.service is imported, which in every worker is before BentoML builds that worker's
Starlette app, so the app is built with the fixed classes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from serving.errors import RequestTimeout, error_body


class CancellingTimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's per-request timeout, with the timer cancelled when the request ends.

    Upstream schedules `loop.call_later(timeout, ...)` per request and never cancels it, so every request's
    context, span and closures stay alive for the whole timeout (60 s by default). Under load that is hundreds of
    thousands of tracked objects, and full garbage collections that stall the worker 180-230 ms. Same semantics here:
    the deadline covers the request until its response starts, then 504 if it is missed.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_stop_clock(message: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # the answer is on its way: no timeout from here on
            await send(message)

        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self.app(scope, receive, send_and_stop_clock)
        except TimeoutError:
            if started:
                raise
            status, body = error_body(RequestTimeout(f"the request was not answered within {self.timeout:g} s"))
            await JSONResponse(body, status_code=status)(scope, receive, send)


def _cached_mime_type(mime_type: Any) -> classmethod:
    """BentoML's `IOMixin.mime_type`, computed once per IO class.

    Upstream derives an endpoint's response media type from its pydantic JSON schema, rebuilt (a TypeAdapter and a
    schema generator) for every response: 13% of a GPU model worker's time under load (py-spy, docs/gpu.md). The
    answer depends on the class alone.
    """
    known: dict[type, str] = {}

    def cached(cls: type) -> str:
        if cls not in known:
            known[cls] = mime_type(cls)
        return known[cls]

    return classmethod(cached)


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from _bentoml_sdk.io_models import IOMixin

    # BentoML's app factory imports TimeoutMiddleware from this module each time it builds an app.
    traffic.TimeoutMiddleware = CancellingTimeoutMiddleware
    IOMixin.mime_type = _cached_mime_type(IOMixin.mime_type.__func__)
