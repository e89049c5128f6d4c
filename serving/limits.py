"""Limits on slow and abusive connections, per serving worker (docs/hardening.md).

BentoML starts uvicorn (httptools) itself and passes none of uvicorn's protocol settings through, and uvicorn has
no header-read timeout at all (its keep-alive timer only runs between requests). Two small pieces close the gap:

- `GuardedHttpProtocol`, uvicorn's own HTTP protocol with a header-read deadline (408 and close), a cap on the
  header bytes (431 and close), a cap on open connections (503 + Retry-After and close) and our keep-alive idle
  timeout. Headers never reach ASGI until they are complete, so this has to live at the protocol level; `install`
  makes it uvicorn's "auto" protocol in the worker process (BentoML builds uvicorn's Config after importing the
  service).
- `RequestLimits`, an ASGI middleware on our endpoints: a cap on requests in progress (503 + Retry-After) and a
  deadline for reading the body (408 and close). Health probes and /metrics stay uncapped. It also stamps every
  answer's `Server-Timing` header: one layer for all three, because every layer costs time on each request.

`wrap_app` lets the service put its front door (serving/service.py) before uvicorn's app in the protocol, ahead of
BentoML's middleware stack. `count_errors_with` lets /metrics count the errors answered here, outside any route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn.config
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.config import ServiceConfig
from serving.cores import Requests
from serving.deadlines import Deadlines, cancelled_by
from serving.errors import ClientError, ClientTooSlow, HeadersTooLarge, ServerBusy, error_body, shown
from serving.onewrite import OneWriteCycle

Message = dict
PARSER_REASON_CHARS = 200  # how much of the parser's reason a 400 quotes (llhttp's are short fixed texts)
# What a chunk may spend on its size line and CRLFs ("ffffffff\r\n" ... "\r\n" is 12), beyond the header cap that a
# chunked body's framing gets for extensions and trailers (see _check_body_phase).
CHUNK_LINE_ALLOWANCE = 16
# The protocol's body deadline comes this long after RequestLimits' (our routes answer their own 408 first).
BODY_DEADLINE_GRACE_S = 1.0


def _raw_response(status: int, reason: str, exc: Exception, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 answer with our JSON error body, for the protocol level where there is no ASGI app."""
    _, body = error_body(exc)
    payload = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(payload)}",
            "connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


_count_error: Callable[[str], None] | None = None


def count_errors_with(callback: Callable[[str], None] | None) -> None:
    """From now on call `callback(error code)` for every error answered outside the routes: the protocol's 400, 408,
    431 and 503, the request cap's 503, the service deadline's 504 (serving/upstream.py), and the routers' 404 and
    405 (serving/api.py, serving/service.py). None: no counting."""
    global _count_error
    _count_error = callback


def count_error(code: str) -> None:
    if _count_error is not None:
        _count_error(code)


def counted(exc: ClientError) -> ClientError:
    count_error(exc.code)
    return exc


class OncePerMinute(logging.Filter):
    """Lets one record with a given message through per minute, and says in it how many were held back since.

    uvicorn logs "Invalid HTTP request received." for every request its parser rejects, just before it calls
    `send_400_response`: any client could write a log line per request (and BentoML printed each one twice). The
    same holds for a decoder's bug on a hostile file (serving/api.py). `counted_by` names the series in /metrics
    that still counts every one."""

    def __init__(self, messages: tuple[str, ...], period_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, counted_by: str = "convnet_http_errors_total") -> None:
        super().__init__()
        self.messages, self.period_s, self.clock, self.counted_by = messages, period_s, clock, counted_by
        self.held: dict[str, int] = {}
        self.next_at: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if message not in self.messages:
            return True
        now = self.clock()
        if now < self.next_at.get(message, 0.0):
            self.held[message] = self.held.get(message, 0) + 1
            return False
        self.next_at[message] = now + self.period_s
        held = self.held.pop(message, 0)
        if held:
            record.msg = (f"{message} ({held} more since the last such line, not logged; /metrics counts each: "
                          f"{self.counted_by})")
        return True


def declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers (lower-case names, as uvicorn and ASGI give them) announce a body."""
    return any(n == b"transfer-encoding" or (n == b"content-length" and v.strip() != b"0") for n, v in headers)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header-read deadline, a header-size cap, a connection cap and no protocol
    upgrades, answering each request in one write (serving/onewrite.py). Settings: `install`."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65_536
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1000
    retry_after_s: int = 1
    body_timeout_s: float = 30.0
    # How long a connection between requests stays open once the server begins to shut down (`shutdown`).
    shutdown_grace_s: float = 0.5

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if _app_wrapper is not None:
            self.app = _app_wrapper(self.app)
        self.timeout_keep_alive = self.keepalive_timeout_s
        # uvicorn logs each answer on "uvicorn.access" when any handler is up the logger tree (BentoML's root one is):
        # it formatted the client's address and the quoted path for every answer, ~1% of a LeNet-5 request, for a
        # logger at BentoML's WARNING that dropped the line. Only when the line would be written.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._header_timer: asyncio.TimerHandle | None = None
        # Header bytes (see data_received): those of the request being read, the size of the read being parsed,
        # whether a request began in it, and whether the connection was between requests when it came.
        self._header_bytes = self._read_size = 0
        self._began_in_read = False
        self._between_requests = True
        self._refused = False  # a request was refused mid-parse: the rest of what arrives is not served
        # Its answer while it waits for those of the requests ahead of it (b"": only the close waits, see eof_received).
        self._refusal: bytes | None = None
        # The body phase (from complete headers to the message's end, see data_received): whether a request is in
        # it, when it must be over, its bytes that were not body (chunk lines, extensions, trailers) and what those
        # may add up to, and the body bytes of the read being parsed.
        self._in_body = False
        self._bodies = 0  # body phases begun on this connection: a read that holds one's end and the next's start
        self._body_deadline = 0.0
        self._framing = self._framing_allowance = self._read_body = 0
        self._shutting_down = False  # the server is shutting down: the next answer is this connection's last
        self._quiet_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            busy = counted(ServerBusy(f"this worker has {self.max_connections} connections open; retry shortly"))
            transport.write(_raw_response(503, "Service Unavailable", busy,
                                          (("retry-after", str(self.retry_after_s)),)))
            transport.close()
            return
        self._arm_header_timer()  # a connection that never sends a byte is timed out too

    def data_received(self, data: bytes) -> None:
        # llhttp sets no limit on headers, and httptools joins a header's pieces with `+=` as they arrive: one
        # connection sent 100 MB of one header in 10 s, the event loop copying it over and over. So the bytes of a
        # request's line and headers are counted, read by read, and a request over the cap is refused (431, closed)
        # as soon as it is. A read that starts mid-request (a pipelined one behind another's body) counts from the
        # next read: the count is never more than the real size, and is short by at most one read (256 KiB).
        self._read_size, self._began_in_read, self._read_body = len(data), False, 0
        between_requests, body_at_start = self._between_requests, self._bodies if self._in_body else -1
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._in_body and self._bodies == body_at_start:  # the whole read was one request's body phase
            self._check_body_phase(len(data))
            return
        if self._header_timer is None:
            return  # no request's headers are incomplete
        if not self._began_in_read:
            self._header_bytes += len(data)
        else:
            self._header_bytes = len(data) if between_requests else 0
        if self._header_bytes > self.max_header_bytes:
            self._refuse_headers_too_large()

    def _check_body_phase(self, read_size: int) -> None:
        """After a read that fell wholly within a request's body phase. uvicorn sets no limit on what a chunked body
        carries besides its data: each trailer field was added to the request's headers, ~20 bytes of memory per
        byte sent (80 MB of trailers took a worker from 0.9 to 2.4 GB), and a client trickling chunks held the
        connection open forever on any path but ours (each byte cancels uvicorn's keep-alive timer; our routes have
        RequestLimits' deadline, which this one backs up a second later). A read that crosses the phase's start or
        end is not counted: the framing count is short by at most two reads, never over."""
        self._framing += read_size - self._read_body
        if self._framing > self._framing_allowance:
            self._refuse_in_body(HeadersTooLarge(
                f"the chunked body's framing (chunk extensions and trailer fields) is over {self.max_header_bytes} "
                "bytes (CONVNET_MAX_HEADER_BYTES)"), 431, "Request Header Fields Too Large")
        elif self.loop.time() > self._body_deadline:
            self._refuse_in_body(ClientTooSlow(f"the request body did not arrive within {self.body_timeout_s:g} s"),
                                 408, "Request Timeout")

    def _refuse_in_body(self, exc: ClientError, status: int, reason: str) -> None:
        if self.cycle is not None and self.cycle.response_complete:  # answered already (/livez, a 404): just close
            counted(exc)
            self._refused = True
            self.transport.close()
            return
        self._refuse(exc, status, reason)

    def on_chunk_header(self) -> None:
        if self._framing_allowance == self.max_header_bytes and not self._refused:  # the body's first chunk
            # llhttp reads "Transfer-Encoding: gzip, chunked" as chunked and hands the still-compressed data on as
            # the body; we decode no transfer coding but chunked (RFC 9112 §6.1).
            codings = b",".join(v for n, v in self.scope["headers"] if n == b"transfer-encoding")
            if codings.lower().replace(b" ", b"").replace(b"\t", b"") != b"chunked":
                self._refuse_in_body(ClientError(f"Transfer-Encoding {shown(codings.decode('latin-1'))} is not "
                                                 "supported; send the body with 'chunked' alone, or a Content-Length"),
                                     400, "Bad Request")
                return
        self._framing_allowance += CHUNK_LINE_ALLOWANCE

    def on_message_begin(self) -> None:
        if self._refused:
            return  # a pipelined request behind a refused one: not served (the connection is closing)
        super().on_message_begin()
        self._began_in_read, self._between_requests = True, False
        if self._header_timer is None:  # the next request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._cancel_header_timer()
        # Headers that came whole within the reads counted so far: measured only when those reads could hold more
        # than the cap (an upload's first read, say), from what the parser gave (whitespace around values aside).
        if self._read_size + (0 if self._began_in_read else self._header_bytes) > self.max_header_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16
            if size > self.max_header_bytes:
                self._refuse_headers_too_large()
                return
        hosts = [name for name, _ in self.headers].count(b"host")
        if hosts != 1 and (hosts > 1 or self.parser.get_http_version() != "1.0"):
            # RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header or with several
            # (uvicorn served both; a proxy and this server could then each take a different one for the target).
            self._refuse(ClientError(f"a request carries one Host header (HTTP/1.0 may omit it); this one has {hosts}"))
            return
        self._in_body, self._framing, self._framing_allowance = True, 0, self.max_header_bytes
        self._bodies += 1
        self._body_deadline = self.loop.time() + self.body_timeout_s + BODY_DEADLINE_GRACE_S
        if not self.parser.should_upgrade():  # Upgrade and Connection: upgrade both there (a C call: cheap)
            super().on_headers_complete()
            self.cycle.__class__ = OneWriteCycle  # uvicorn names its class inline; ours sends each answer in one write
            if self._shutting_down:
                self.cycle.keep_alive = False  # answered, then closed (`shutdown`)
            # uvicorn appends trailer fields to the list the request's scope holds as its headers; RFC 9110 §6.5.1
            # forbids that merge. From here they go to a list nobody reads (and _check_body_phase caps it).
            self.headers = []
            return
        # An upgrade request (websocket, h2c): no route of ours switches protocols. The parser hands whatever follows
        # its headers to the new protocol, so a body it announces is never read as one: refuse that request. A
        # bodiless one is answered as plain HTTP, then the connection closes (bytes behind it would be lost).
        if declares_body(self.headers):
            # None for CONNECT, or when the "upgrade" token and the Upgrade header are split over several
            # Connection headers (uvicorn reads the last one): the parser still calls it an upgrade.
            upgrade = self._get_upgrade()
            asked = f"Upgrade: {shown(upgrade.decode('latin-1'))}" if upgrade is not None else "CONNECT or Upgrade"
            self._refuse(ClientError(f"this server does not switch protocols ({asked}), and a request asking to "
                                     "cannot carry a body; send it without the Upgrade header"))
            return
        super().on_headers_complete()
        self.cycle.__class__ = OneWriteCycle
        self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._read_body += len(body)
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if not self._refused:
            self._between_requests = True
            super().on_message_complete()

    def _should_upgrade_to_ws(self) -> bool:
        return False  # never hand a connection to a websocket protocol: upgrades end in on_headers_complete

    def _unsupported_upgrade_warning(self) -> None:
        pass  # every upgrade request was answered or refused in on_headers_complete; nothing to warn about

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser rejects (bad framing, a NUL in a header, an unknown method), as our
        JSON error instead of plain text. uvicorn calls it from its `except httptools.HttpParserError` with a fixed
        message; the parser's own reason is the exception being handled."""
        detail = ("the request is not valid HTTP/1.1: its request line, a header or the body's framing could not be "
                  "parsed")
        error = sys.exception()
        # llhttp's reasons are fixed texts ("Duplicate Content-Length"); a callback error's is only "`on_url` callback
        # error" (the exception behind it is ours or uvicorn's, and may quote the request): not worth quoting.
        if isinstance(error, httptools.HttpParserError) and not isinstance(error, httptools.HttpParserCallbackError):
            detail += f" ({str(error)[:PARSER_REASON_CHARS]})"
        self._refuse(ClientError(detail))

    def _refuse_headers_too_large(self) -> None:
        self._cancel_header_timer()
        self._refuse(HeadersTooLarge(f"the request line and headers are over {self.max_header_bytes} bytes "
                                     "(CONVNET_MAX_HEADER_BYTES)"), 431, "Request Header Fields Too Large")

    def _refuse(self, exc: ClientError, status: int = 400, reason: str = "Bad Request") -> None:
        """Answer `exc` (our JSON error, `Connection: close`) and close the connection. Answers leave in the order of
        their requests (RFC 9112 §9.3.2): behind an earlier request still being answered (pipelining), the refusal
        waits for the last such answer (`on_response_complete`), and a refused request that was queued never runs.
        Written at once, it cut in ahead of the earlier answer, which was then lost: the client read our 400 as the
        answer to the request it had sent first."""
        counted(exc)
        self._refused = True
        answer, cycle = _raw_response(status, reason, exc), self.cycle
        # Queued requests (uvicorn's pipeline) wait behind one being served; else the newest request is being served,
        # and it is an earlier one when all of its body has come (the refusal is then about bytes after it).
        earlier = bool(self.pipeline) or (cycle is not None and not cycle.response_complete and not cycle.more_body)
        self._unqueue_unfinished()  # the refused request itself, if it was queued
        if earlier:
            self._refusal = answer
            self.flow.pause_reading()
            return
        if not self.transport.is_closing():
            self.transport.write(answer)
        self.transport.close()

    def on_response_complete(self) -> None:
        """uvicorn's, after each request's application returns: it starts the next queued request. Then a refusal
        waiting behind the requests ahead of it is written, once none is left."""
        next_queued = bool(self.pipeline)
        super().on_response_complete()
        if self._refusal is None:
            return
        if self.transport.is_closing():
            self._refusal = None
        elif next_queued:
            self.flow.pause_reading()  # uvicorn resumed reading; the refused bytes and what follows stay unread
        else:
            answer, self._refusal = self._refusal, None
            if answer:
                self.transport.write(answer)
            self.transport.close()

    def eof_received(self) -> bool | None:
        """The client closed its sending side (`shutdown(SHUT_WR)`, `nc -N`): it has sent all it will, and may still
        read (httpwg/http-core#22, uvicorn#1264: uvicorn took it for a disconnect, and only an answer ready within
        the same loop turn left; an AlexNet request's never did). The requests that came whole are answered in
        order, then the connection closes; one cut short by the EOF is not served. With nothing whole to answer, it
        closes now, as before."""
        if self._refusal is not None:
            return True  # the answers ahead of a refusal, then the refusal, then the close (on_response_complete)
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None
        if not cycle.more_body:
            cycle.keep_alive = False  # the last request the client sent: uvicorn closes after its answer
            return True
        if self._unqueue_unfinished():  # cut short, queued behind whole ones: answer those
            self._refused, self._refusal = True, b""  # then close, with nothing to add
            return True
        return None  # the request being served was cut short: its application sees the disconnect

    def _unqueue_unfinished(self) -> bool:
        """Take the newest request out of uvicorn's queue if it never came whole (refused, or cut short by the
        client): it is not served. Whether it was there."""
        cycle = self.cycle
        if self.pipeline and self.pipeline[0][0] is cycle and cycle.more_body:
            self.pipeline.popleft()
            return True
        return False

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown (SIGTERM) closed at once every connection that was not in the middle of an
        answer. A request whose bytes had arrived but were not read yet (the event loop was busy when the shutdown
        came) was cut: closing a socket with unread data resets it, and the client read a reset, not an answer (a
        fresh-clone CI run under load: 2 of 6 AlexNet requests sent before the SIGTERM). Now a request being answered
        or still arriving is answered, then the connection closes; a connection between requests closes once it has
        stayed quiet for `shutdown_grace_s`, and a request that comes meanwhile is answered with `Connection: close`.
        The worker's exit waits for its connections, so it waits at most that much longer."""
        if self._shutting_down:
            return
        self._shutting_down = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # uvicorn's own: closed after this answer
        elif self._between_requests and not self.transport.is_closing():
            self._quiet_timer = self.loop.call_later(self.shutdown_grace_s, self._close_if_quiet)
        # else a request is arriving: on_headers_complete makes its answer the last

    def _close_if_quiet(self) -> None:
        self._quiet_timer = None
        cycle = self.cycle
        if self._between_requests and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self._refuse(ClientTooSlow(f"the request headers did not arrive within {self.header_timeout_s:g} s"), 408,
                     "Request Timeout")


_app_wrapper: Callable[[Any], Any] | None = None


def wrap_app(wrapper: Callable[[Any], Any]) -> None:
    """From now on each connection's protocol serves `wrapper(uvicorn's app)` (call it once per process; the wrapper
    should return the same object for the same app)."""
    global _app_wrapper
    _app_wrapper = wrapper


def install(cfg: ServiceConfig) -> None:
    """Make `GuardedHttpProtocol`, with `cfg`'s limits, the protocol uvicorn picks for http="auto" in this process."""
    GuardedHttpProtocol.header_timeout_s = float(cfg.header_timeout_s)
    GuardedHttpProtocol.max_header_bytes = cfg.max_header_bytes
    GuardedHttpProtocol.keepalive_timeout_s = float(cfg.keepalive_timeout_s)
    GuardedHttpProtocol.max_connections = cfg.max_connections
    GuardedHttpProtocol.retry_after_s = cfg.retry_after_s
    GuardedHttpProtocol.body_timeout_s = float(cfg.body_timeout_s)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedHttpProtocol"
    uvicorn_log = logging.getLogger("uvicorn.error")
    # BentoML gives this logger its handler and lets it propagate to the root logger, which has the same handler:
    # each of uvicorn's warnings and tracebacks was printed twice.
    uvicorn_log.propagate = False
    uvicorn_log.addFilter(OncePerMinute(("Invalid HTTP request received.",)))


# Probes and scrapes must answer when the worker is saturated: that is when they matter.
UNCAPPED = ("/metrics", "/v2/health", "/livez", "/readyz", "/healthz")


class RequestLimits:
    """ASGI middleware: at most `max_requests` requests in progress (then 503 + Retry-After), the whole body read
    within `body_timeout_s` of the request's start (else the endpoint answers 408 and the connection closes), and
    `Server-Timing: app;dur=<ms>` on every answer: the time from the request reaching the app to its response headers
    (body read, decode, preprocessing, inference), which the demo page shows and `curl -i` reads."""

    def __init__(self, app, max_requests: int, body_timeout_s: float, retry_after_s: int,
                 worker_requests: Requests | None = None) -> None:
        self.app, self.max_requests, self.body_timeout_s = app, max_requests, body_timeout_s
        self.retry_after = str(retry_after_s)
        self.active = 0
        # The whole worker's count, shared with its other RequestLimits: what serving/cores.py's board publishes.
        self.worker_requests = worker_requests or Requests()
        self.body_deadlines = Deadlines(body_timeout_s)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        timed_out = body_done = False

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000.0
                headers = [*message.get("headers", []), (b"server-timing", f"app;dur={ms:.1f}".encode())]
                # Answered before its body was read (too slow, a 413 from Content-Length, 503): the rest of it would
                # have to be read and thrown away before another request, so the connection closes instead.
                if not body_done and (timed_out or declares_body(scope["headers"])):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        if scope["path"].startswith(UNCAPPED):
            await self.app(scope, receive, send_timed)
            return
        if self.active >= self.max_requests:
            status, body = error_body(counted(ServerBusy(f"this worker already has {self.max_requests} requests "
                                                         "in progress; retry shortly")))
            await JSONResponse(body, status, headers={"Retry-After": self.retry_after})(scope, receive, send_timed)
            return
        task = asyncio.current_task()
        body_deadline = self.body_deadlines.start(task.cancel, armed=False)  # armed only while waiting for the body

        async def receive_by_deadline() -> Message:
            nonlocal body_done, timed_out
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            if body_deadline.expired:  # it passed while the request was doing something else
                timed_out = True
                raise self._too_slow()
            body_deadline.armed = True
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not cancelled_by(body_deadline, task):
                    raise
                timed_out = True
                raise self._too_slow() from None
            finally:
                body_deadline.armed = False
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if body_done:
                self.body_deadlines.stop(body_deadline)
            return message

        self.active += 1
        self.worker_requests.started()
        try:
            await self.app(scope, receive_by_deadline, send_timed)
        finally:
            self.active -= 1
            self.worker_requests.ended()
            self.body_deadlines.stop(body_deadline)

    def _too_slow(self) -> ClientTooSlow:
        return ClientTooSlow(f"the request body did not arrive within {self.body_timeout_s:g} s")
