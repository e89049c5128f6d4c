"""serving/upstream.py: BentoML's per-request timeout leaks a timer per request; ours cancels it. Both classes run
here on the same real Starlette app and event loop (httpx's ASGI transport), so this is also the minimal
reproduction of the upstream bug (docs/service.md)."""

from __future__ import annotations

import asyncio

import httpx
from bentoml._internal.server.http.traffic import TimeoutMiddleware as UpstreamTimeoutMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from serving.deadlines import TICK_S
from serving.limits import count_errors_with
from serving.upstream import CancellingTimeoutMiddleware


async def fast(request):
    return PlainTextResponse("ok")


async def slow(request):
    await asyncio.sleep(5)
    return PlainTextResponse("late")


async def slow_stream(request):
    async def body():
        yield b"started "
        await asyncio.sleep(0.3)  # longer than the timeout, but the answer has started
        yield b"finished"

    return StreamingResponse(body())


def app_with(middleware, timeout: float):
    app = Starlette(routes=[Route("/fast", fast), Route("/slow", slow), Route("/stream", slow_stream)])
    return middleware(app, timeout=timeout)


async def timers_left_after(middleware, requests: int) -> int:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # noqa: SLF001 (the loop's pending call_later handles: what leaks)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app_with(middleware, 60)), base_url="http://t") as c:
        for _ in range(requests):
            assert (await c.get("/fast")).text == "ok"
    await asyncio.sleep(3 * TICK_S)  # ours: the one timer checking every deadline stops once none is pending
    return len([h for h in loop._scheduled if not h.cancelled()]) - before  # noqa: SLF001


def test_upstream_leaks_a_timer_per_request_and_ours_does_not():
    leaked = asyncio.run(timers_left_after(UpstreamTimeoutMiddleware, 200))
    assert leaked >= 200  # each lives 60 s, holding its request's context: the GC stalls of issue 10
    assert asyncio.run(timers_left_after(CancellingTimeoutMiddleware, 200)) == 0


def test_a_late_answer_is_a_504_in_our_error_shape_and_a_started_one_is_not_cut():
    async def run():
        transport = httpx.ASGITransport(app_with(CancellingTimeoutMiddleware, 0.1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            late = await c.get("/slow")
            streamed = await c.get("/stream")
        return late, streamed

    counted: list[str] = []
    count_errors_with(counted.append)  # what the service's /metrics counts (convnet_http_errors_total)
    try:
        late, streamed = asyncio.run(run())
    finally:
        count_errors_with(None)
    assert counted == ["timeout"]  # the 504, once; not the answer that had started
    assert late.status_code == 504
    assert late.json()["error"] == "timeout" and "0.1 s" in late.json()["detail"]
    assert streamed.status_code == 200 and streamed.text == "started finished"


def test_response_media_type_is_derived_once_per_io_class():
    """BentoML rebuilds an endpoint's JSON schema for every response just to name its media type (13% of a GPU model
    worker, docs/gpu.md); after install() each IO class pays for it once, with the same answer."""
    from typing import Annotated

    import numpy as np
    import pydantic
    from _bentoml_sdk.io_models import IORootModel, ensure_io_descriptor
    from bentoml.validators import DType

    from serving import upstream

    upstream.install()
    io_class = ensure_io_descriptor(Annotated[np.ndarray, DType("float32")])
    assert issubclass(io_class, IORootModel)
    builds = []
    original = pydantic.TypeAdapter.json_schema

    def counting(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    pydantic.TypeAdapter.json_schema = counting
    try:
        answers = {io_class.mime_type() for _ in range(5)}
    finally:
        pydantic.TypeAdapter.json_schema = original
    assert answers == {"application/json"}  # a numpy array answers as JSON (or pickle to another service)
    assert len(builds) <= 1
