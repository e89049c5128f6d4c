"""Each HTTP response in one write: uvicorn's request cycle, with the status line and headers sent with the body.

uvicorn writes a response's head the moment the application sends `http.response.start`, and the body at the next
message: two `send()` calls and two TCP segments per answer, and a client woken twice. The ASGI spec asks for the
other order ("The protocol server must not start sending the response to the client until it has received at least
one Response Body event"), so here the head waits for the first body message and leaves in the same write. A LeNet-5
request costs the server ~4% less CPU (docs/service.md, "Tenth pass"). `GuardedHttpProtocol`
(serving/limits.py) makes every request's cycle a `OneWriteCycle`.

What changes besides the write count: an application that starts a response and then fails before any body gets
uvicorn's 500 instead of a 200 head cut off by a closed connection, since nothing had been sent yet.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

# A larger first body is written after its head rather than copied onto it: past this a second write costs less
# than the copy, and a big answer (a model-input PNG, /docs.json) need not exist twice in memory.
JOIN_LIMIT = 65_536


class _HeadWithBody:
    """The transport as one response's start and first body message see it: the first write (the head) is held and
    joined to the second (the body's first bytes). A HEAD request's answer has no body write: `flush` sends the head.
    """

    __slots__ = ("transport", "head")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None  # None: the head has not come yet; b"": it has left

    def write(self, data: bytes) -> None:
        head = self.head
        if head is None:
            self.head = data
            return
        self.head = b""
        if head and len(data) <= JOIN_LIMIT:
            self.transport.write(head + data)
            return
        if head:
            self.transport.write(head)
        self.transport.write(data)

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
        self.head = b""

    def close(self) -> None:  # uvicorn closes a connection that is not kept alive right after the body
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's cycle, holding `http.response.start` until the first `http.response.body` and then sending both
    through uvicorn's own `send` (its checks, framing and keep-alive handling unchanged) into one transport write."""

    held_start: dict[str, Any] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if not self.disconnected and self.transport.is_closing():
            # The connection is closing under this answer: the client went, or a refusal closed it. uvicorn marks
            # only the newest request of a connection disconnected, and uvloop raises on a write to a closed
            # transport: a client pipelining two requests and closing got a 30-line traceback into the log.
            self.disconnected = True
        if message["type"] == "http.response.start" and not self.response_started:
            # Nothing is sent yet. A second start replaces the first: uvicorn's own 500, after an application that
            # started a response failed before its body.
            self.held_start = message
            return
        start, self.held_start = self.held_start, None
        if start is None:
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # now, so that neither send below waits while the transport is swapped
        transport, joined = self.transport, _HeadWithBody(self.transport)
        self.transport = joined  # type: ignore[assignment]
        try:
            await super().send(start)
            await super().send(message)
        finally:
            self.transport = transport
            joined.flush()
