"""Fixes for BentoML behaviour the service depends on, each small, each written up for upstream in docs/service.md.

`install()` runs when serving.service is imported, which in every worker is before BentoML builds that worker's
Starlette app, so the app is built with the fixed classes.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from serving.deadlines import Deadlines, cancelled_by
from serving.errors import RequestTimeout, error_body
from serving.limits import counted


class CancellingTimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's per-request timeout, with the timer cancelled when the request ends.

    Upstream schedules `loop.call_later(timeout, ...)` per request and never cancels it, so every request's
    context, span and closures stay alive for the whole timeout (60 s by default). Under load that is hundreds of
    thousands of tracked objects, and full garbage collections that stall the worker 180-230 ms. Same semantics here:
    the deadline covers the request until its response starts, then 504 if it is missed. The deadlines share one
    timer per worker (serving/deadlines.py), so they may fire up to 0.1 s late.
    """

    def __init__(self, app: Any, timeout: float) -> None:
        super().__init__(app, timeout=timeout)
        self.deadlines = Deadlines(timeout)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        deadline = self.deadlines.start(task.cancel)

        async def send_and_stop_clock(message: dict[str, Any]) -> None:
            self.deadlines.stop(deadline)  # the answer is on its way: no timeout from here on
            await send(message)

        try:
            await self.app(scope, receive, send_and_stop_clock)
        except asyncio.CancelledError:
            if not cancelled_by(deadline, task):
                raise
            late = counted(RequestTimeout(f"the request was not answered within {self.timeout:g} s"))
            status, body = error_body(late)
            await JSONResponse(body, status_code=status)(scope, receive, send)
        finally:
            self.deadlines.stop(deadline)


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


# BentoML's name for the public HTTP socket (_bentoml_impl.server.serving.API_SERVER_NAME).
API_SOCKET = "_bento_api_server"


def index_html() -> bytes:
    """BentoML's Swagger UI page for `/`, without the Google Tag Manager its template embeds.

    Upstream's page loads googletagmanager.com's script (and a `<noscript>` iframe) in every browser that opens `/`:
    a call home the service must not make. The rest of the page, Swagger UI from BentoML's own static files, stays.
    """
    from bentoml._internal.server.http_app import DEFAULT_INDEX_HTML

    return re.sub(r"[ \t]*<!-- Google Tag Manager.*?<!-- End Google Tag Manager[^>]*-->\n?", "", DEFAULT_INDEX_HTML,
                  flags=re.S).encode()


def _port_is_free(host: str, port: int, family: int) -> None:
    """Fail the start as before when something already listens on the port: sockets that each set SO_REUSEPORT
    would otherwise share it silently with another server of the same user."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror} (is another server running?)") from None
    finally:
        probe.close()


def _marked_per_worker(init: Any) -> Any:
    """circus's `CircusSocket.__init__`, marking BentoML's public HTTP socket `so_reuseport`: circus then never binds
    it in the arbiter, and `_bound_per_worker` binds one for each worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        mine = (kwargs.get("name") == API_SOCKET and "so_reuseport" not in kwargs and kwargs.get("path") is None
                and kwargs.get("port"))
        if not mine:  # every other socket, and the copies bound for each worker (they pass so_reuseport)
            init(self, *args, **kwargs)
            return
        _port_is_free(kwargs.get("host", "localhost"), int(kwargs["port"]), kwargs.get("family", socket.AF_INET))
        init(self, *args, so_reuseport=True, **kwargs)
        # What each worker's socket is made from (circus keeps this only for sockets read from its config file).
        self._cfg = {"name": self.name, "host": self.host, "port": self.port,
                     "family": socket.AddressFamily(self.family).name, "type": "SOCK_STREAM",
                     "backlog": self.backlog, "so_reuseport": True}

    return __init__


def _bound_per_worker(get_fds: Any) -> Any:
    """circus's `Process._get_sockets_fds` (run in the arbiter as it spawns a worker), handing the worker a socket of
    its own for BentoML's public HTTP socket. circus does this itself for `so_reuseport` sockets named in a
    watcher's `cmd`; BentoML names the socket in `args`."""

    def _get_sockets_fds(self) -> dict[str, int] | None:
        from circus.sockets import CircusSocket

        fds = get_fds(self)
        shared = (self.watcher.sockets or {}).get(API_SOCKET) if self.watcher is not None else None
        if fds and shared is not None and shared.so_reuseport and API_SOCKET in fds \
                and any(f"circus.sockets.{API_SOCKET}" in str(a) for a in self.watcher.args or ()):
            own = CircusSocket.load_from_config(shared._cfg)
            own.bind_and_listen()
            fds[API_SOCKET] = own.fileno()
            self._sockets.append(own)  # circus lets go of it once the worker is forked
        return fds

    return _get_sockets_fds


def balance_connections() -> None:
    """One listening socket per front worker (SO_REUSEPORT), so that the kernel spreads new connections evenly.

    Upstream, every worker accepts on one shared socket, and whichever wakes first takes every connection waiting:
    the first keep-alive pool of 32 connections after a start landed entirely on one of two workers, half of the pools
    measured split 25/7 or worse, and the other core idled (BentoML #5426; docs/service.md). Call in the arbiter,
    before it builds its sockets; the arbiter then checks the port is free, and binds a socket for each worker as it
    spawns it.
    """
    from circus.process import Process
    from circus.sockets import CircusSocket

    if hasattr(socket, "SO_REUSEPORT") and not getattr(CircusSocket.__init__, "_per_worker", False):
        CircusSocket.__init__ = _marked_per_worker(CircusSocket.__init__)
        CircusSocket.__init__._per_worker = True
        Process._get_sockets_fds = _bound_per_worker(Process._get_sockets_fds)


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
