"""serving/onewrite.py: each response leaves in one write, head and body together, and nothing else changes.

What reaches the client is read from the kernel: TCP_INFO's `tcpi_data_segs_in` counts the segments with data a
socket received. On loopback one write of under 64 KiB is one segment; uvicorn's own cycle made two per answer.
First the real service, then uvicorn serving our protocol (`GuardedHttpProtocol`) to a small ASGI app with the shapes
the service does not answer with: a stream, a failure after the start, a body over JOIN_LIMIT, HTTP/1.0.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import uvicorn_port, uvicorn_thread

from serving.limits import GuardedHttpProtocol
from serving.onewrite import JOIN_LIMIT

DIGIT = (Path(__file__).resolve().parent.parent / "examples" / "digit-7.png").read_bytes()
TCPI_DATA_SEGS_IN = 152  # offset in Linux's struct tcp_info (4.6+)


class Connection:
    """One keep-alive HTTP/1.1 connection over a plain socket, counting the data segments each answer came in."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buffer = b""

    def segments(self) -> int:
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        assert len(info) >= TCPI_DATA_SEGS_IN + 4, "this kernel's tcp_info has no tcpi_data_segs_in"
        return struct.unpack_from("I", info, TCPI_DATA_SEGS_IN)[0]

    def _read_until(self, done) -> None:
        while not done():
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed the connection; had {self.buffer[:200]!r}"
            self.buffer += chunk

    def exchange(self, method: str, target: str, body: bytes = b"",
                 content_type: str = "") -> tuple[int, dict, bytes, int]:
        """(status, headers, body, data segments it came in) of one request."""
        head = f"{method} {target} HTTP/1.1\r\nHost: t\r\n"
        if body or method == "POST":
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        before = self.segments()
        self.sock.sendall(head.encode() + b"\r\n" + body)
        self._read_until(lambda: b"\r\n\r\n" in self.buffer)
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = 0 if method == "HEAD" else int(headers["content-length"])
        self._read_until(lambda: len(self.buffer) >= length)
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, data, self.segments() - before

    def close(self) -> None:
        self.sock.close()


def test_every_kind_of_answer_of_the_service_arrives_in_one_segment(server):
    conn = Connection(server)
    try:
        exchanges = [
            ("POST", "/classify?model=lenet5", DIGIT, "image/png", 200),
            ("POST", "/classify?model=lenet5", b"not an image", "image/png", 400),
            ("POST", "/classify?model=nope", DIGIT, "image/png", 422),
            ("GET", "/readyz", b"", "", 200),
            ("HEAD", "/readyz", b"", "", 200),
            ("GET", "/v2/models/lenet5", b"", "", 200),
            ("GET", "/metrics", b"", "", 200),
            ("GET", "/docs.json", b"", "", 200),
        ]
        for method, target, body, content_type, expected in exchanges:
            for _ in range(3):
                status, headers, data, segments = conn.exchange(method, target, body, content_type)
                assert status == expected, (target, data[:200])
                assert segments == 1, f"{method} {target}: its answer came in {segments} segments"
                if method == "HEAD":
                    assert data == b"" and int(headers["content-length"]) > 0
                elif headers["content-type"].startswith("application/json"):
                    json.loads(data)
        status, _, data, _ = conn.exchange("POST", "/classify?model=lenet5", DIGIT, "image/png")
        assert status == 200 and json.loads(data)["predictions"][0]["label"] == "7"  # still a working connection
    finally:
        conn.close()


# ---- our protocol under uvicorn, for the shapes of answer the service does not make -----------------------------

async def shapes(scope, receive, send) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    while (await receive()).get("more_body"):
        pass
    if path == "/stream":  # chunked: the first part leaves with the head, the second when it is ready
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first,", "more_body": True})
        await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"second", "more_body": False})
    elif path == "/slow-body":  # started, then a while before the body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"done"})
    elif path == "/slow":  # a while before anything is sent (as an AlexNet answer is computed)
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": b"slow answer"})
    elif path == "/fail":  # started, then failed before any body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        raise RuntimeError("the application failed after starting its answer")
    else:
        body = b"x" * (JOIN_LIMIT + 1000) if path == "/big" else b"small answer"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def shapes_server() -> Iterator[str]:
    with uvicorn_thread(shapes, http=GuardedHttpProtocol) as server:
        yield f"http://127.0.0.1:{uvicorn_port(server)}"


def test_a_small_answer_and_a_head_request_on_one_connection(shapes_server):
    conn = Connection(shapes_server)
    try:
        status, headers, data, segments = conn.exchange("GET", "/small")
        assert (status, data, segments) == (200, b"small answer", 1)
        status, headers, data, segments = conn.exchange("HEAD", "/small")  # the head alone, flushed at the end
        assert (status, headers["content-length"], data, segments) == (200, "12", b"", 1)
        assert conn.exchange("POST", "/small", b"a body", "text/plain")[2:] == (b"small answer", 1)
    finally:
        conn.close()


def test_a_stream_sends_its_head_with_the_first_part_and_the_rest_later(shapes_server):
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in first
        assert first.endswith(b"6\r\nfirst,\r\n")  # head and first chunk in one piece, before the second exists
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
        assert rest == b"6\r\nsecond\r\n0\r\n\r\n"
    assert httpx.get(f"{shapes_server}/stream", timeout=30).text == "first,second"


def test_a_body_over_the_join_limit_is_whole(shapes_server):
    r = httpx.get(f"{shapes_server}/big", timeout=30)
    assert r.status_code == 200 and r.content == b"x" * (JOIN_LIMIT + 1000)


def test_an_application_failing_after_its_start_gets_a_500_not_a_cut_200(shapes_server):
    r = httpx.get(f"{shapes_server}/fail", timeout=30)
    assert r.status_code == 500 and r.text == "Internal Server Error"


def test_http_1_0_gets_its_answer_then_the_connection_closes(shapes_server):
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nsmall answer")


def test_expect_100_continue_still_gets_its_interim_answer_first(shapes_server):
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /small HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        got = b""
        while not got.endswith(b"small answer"):
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")


def test_a_refused_pipelined_request_waits_for_the_started_answer_ahead_of_it(shapes_server):
    """A request refused at the protocol level (here: two Host headers) behind one whose answer has started must not
    cut in: that answer is written whole, then the connection closes, as when its head had already left."""
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /slow-body HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # its start is sent (and held), its body not yet
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    first, refusal = got.split(b"\r\n\r\ndone")
    assert first.startswith(b"HTTP/1.1 200 ") and refusal.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got
    assert json.loads(refusal.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request", got


def _exchange(shapes_server: str, data: bytes, half_close: bool = True) -> bytes:
    """Send `data` on a new connection (then close our sending side, as `nc -N` does), read until the server
    closes."""
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


SLOW = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
REFUSED_BEHIND = {  # refused by the protocol while the request ahead of them is still being computed
    "not HTTP": b"BAD\x00 / HTTP/1.1\r\n\r\n",  # the parser's error
    "two Host headers": b"GET /small HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # refused at its headers
    "gzip, chunked": (b"POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n"),  # queued behind it, then refused in its body
}


@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
@pytest.mark.parametrize("refused", REFUSED_BEHIND, ids=list(REFUSED_BEHIND))
def test_a_refusal_waits_for_the_answer_still_being_computed_ahead_of_it(shapes_server, refused, half_close):
    """The refusal was written at once, ahead of the answer to the request before it, which was then lost: the
    client read our 400 as the answer to its first request. Answers leave in the order of their requests."""
    got = _exchange(shapes_server, SLOW + REFUSED_BEHIND[refused], half_close)
    first, refusal = got.split(b"\r\n\r\nslow answer")
    assert first.startswith(b"HTTP/1.1 200 ") and refusal.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got
    assert refusal.count(b"HTTP/1.1 ") == 1, got  # the refused request was not served


def test_a_client_that_closes_its_sending_side_still_gets_its_answers(shapes_server):
    """`shutdown(SHUT_WR)` says the client has sent all it will, not that it stopped listening (uvicorn closed the
    connection at once: only an answer ready in the same loop turn left). Every request that came whole is
    answered, in order, then the connection closes; a request cut short gets nothing, as before."""
    got = _exchange(shapes_server, SLOW + SLOW + b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
    assert got.count(b"HTTP/1.1 200 OK") == 3 and got.endswith(b"small answer"), got
    assert got.index(b"slow answer") < got.rindex(b"slow answer") < got.index(b"small answer"), got
    assert b"connection: close" in got.split(b"slow answer")[-1], got  # the last answer says the connection ends
    cut_short = b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf"
    assert _exchange(shapes_server, cut_short) == b""
    got = _exchange(shapes_server, SLOW + cut_short)  # the whole one is answered, then the connection closes
    assert got.count(b"HTTP/1.1 ") == 1 and got.endswith(b"\r\n\r\nslow answer"), got


def test_the_access_line_is_formatted_only_when_it_is_written(shapes_server, monkeypatch):
    """uvicorn formats an access line for every answer when any handler is up the logger tree, even for a logger
    whose level drops it (BentoML's root handler, at WARNING); our protocol skips that work, and still logs the line
    when "uvicorn.access" is at INFO. Each request below opens its own connection (the setting is per connection)."""
    import logging

    from uvicorn.protocols.http import httptools_impl

    formatted = []
    real = httptools_impl.get_client_addr
    monkeypatch.setattr(httptools_impl, "get_client_addr", lambda scope: formatted.append(1) or real(scope))
    access, lines = logging.getLogger("uvicorn.access"), []
    handler = logging.Handler()
    handler.emit = lines.append
    level = access.level
    access.addHandler(handler)
    try:
        access.setLevel(logging.WARNING)
        assert httpx.get(shapes_server + "/small").status_code == 200
        assert (formatted, lines) == ([], [])
        access.setLevel(logging.INFO)
        assert httpx.get(shapes_server + "/small?x=1").status_code == 200
        assert len(formatted) == 1
        assert [r.getMessage().split(" - ")[1] for r in lines] == ['"GET /small?x=1 HTTP/1.1" 200']
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
