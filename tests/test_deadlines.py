"""serving/deadlines.py: the 504 and body deadlines share one timer per event loop instead of one per request.
Real asyncio tasks and the real middlewares (RequestLimits, CancellingTimeoutMiddleware) on a real event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.deadlines import TICK_S, Deadlines, cancelled_by
from serving.errors import ClientTooSlow
from serving.limits import RequestLimits
from serving.upstream import CancellingTimeoutMiddleware


def test_deadlines_end_in_order_within_a_tick_and_stopped_ones_never():
    async def run():
        deadlines = Deadlines(0.2)
        ended: list[tuple[int, float]] = []
        t0 = time.monotonic()
        started = []
        for i in range(50):
            started.append(deadlines.start(lambda i=i: ended.append((i, time.monotonic() - t0))))
            await asyncio.sleep(0.002)
        for d in started[::2]:
            deadlines.stop(d)
        unarmed = deadlines.start(lambda: ended.append((-1, 0.0)), armed=False)
        await asyncio.sleep(0.2 + 0.1 + 3 * TICK_S)
        return ended, started, unarmed, deadlines

    ended, started, unarmed, deadlines = asyncio.run(run())
    assert [i for i, _ in ended] == list(range(1, 50, 2))  # in order, and only those not stopped or unarmed
    assert all(0.2 <= t <= 0.2 + 0.1 + 2 * TICK_S for _, t in ended), ended
    assert all(d.expired for d in started[1::2]) and not any(d.expired for d in started[::2])
    assert unarmed.expired and not deadlines._pending and deadlines._timer is None  # noqa: SLF001 (nothing left)


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline():
    async def run():
        deadlines = Deadlines(0.05)
        task = asyncio.current_task()
        deadline = deadlines.start(task.cancel)
        asyncio.get_running_loop().call_later(0.01, task.cancel)  # say, the worker shutting down
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return cancelled_by(deadline, task)
        finally:
            deadlines.stop(deadline)

    assert asyncio.run(run()) is False


async def _call(app, path: str, receive) -> list[dict]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"10")]}
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_a_body_that_stops_arriving_is_refused_after_the_body_deadline():
    async def reads_the_body(scope, receive, send):
        try:
            while (await receive()).get("more_body"):
                pass
            status = 200
        except ClientTooSlow:
            status = 408
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def run():
        app = RequestLimits(reads_the_body, max_requests=10, body_timeout_s=0.3, retry_after_s=1)
        t0 = time.monotonic()
        sent = await _call(app, "/classify", trickle)
        return sent, time.monotonic() - t0, app.body_deadlines

    sent, took, deadlines = asyncio.run(run())
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert 0.3 <= took <= 0.3 + 0.05 + 2 * TICK_S + 0.2, took
    assert not deadlines._pending  # noqa: SLF001


def test_a_request_answered_in_time_leaves_no_deadline_behind():
    async def quick(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def body():
        return {"type": "http.request", "body": b"0123456789", "more_body": False}

    async def run():
        limits = RequestLimits(quick, max_requests=10, body_timeout_s=30, retry_after_s=1)
        app = CancellingTimeoutMiddleware(limits, timeout=60)
        statuses = [(await _call(app, "/classify", body))[0]["status"] for _ in range(100)]
        return statuses, app.deadlines._pending, limits.body_deadlines._pending  # noqa: SLF001

    statuses, request_left, body_left = asyncio.run(run())
    assert statuses == [200] * 100 and not request_left and not body_left


@pytest.mark.parametrize("late_by", [0.0, 0.15])
def test_the_504_comes_within_a_tick_of_the_deadline(late_by):
    async def slow(scope, receive, send):
        await asyncio.sleep(0.2 + late_by + 5)

    async def run():
        app = CancellingTimeoutMiddleware(slow, timeout=0.2 + late_by)
        t0 = time.monotonic()
        sent = await _call(app, "/classify", None)
        return sent, time.monotonic() - t0

    sent, took = asyncio.run(run())
    assert sent[0]["status"] == 504
    assert 0.2 + late_by <= took <= 0.2 + late_by + 2 * TICK_S + 0.2, took
