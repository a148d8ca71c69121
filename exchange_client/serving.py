"""Serving Connect applications over HTTP/1.1 and HTTP/2 with hypercorn.

One port carries Connect (JSON and binary), gRPC-Web and gRPC: hypercorn passes
HTTP/2 trailers to the ASGI app, which gRPC needs. Shared by the broker and the
reference Exchange.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

log = logging.getLogger(__name__)

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
# A plain JSON route: (method, parsed body or None) -> (status, JSON-able body).
JSONRoute = Callable[[str, Any], Awaitable[tuple[int, Any]]]


async def send_json(send: Any, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})


async def not_a_request(scope: Any, receive: Any, send: Any) -> bool:
    """True when `scope` is not an HTTP request: lifespan events are answered here (servers
    such as hypercorn log an error for an app that does not), anything else is ignored."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return True
    return bool(scope["type"] != "http")


async def read_body(receive: Any, limit: int = 1 << 20) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError("body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Router:
    """Dispatches to Connect apps by service path, and to a few plain JSON routes."""

    def __init__(
        self, services: Mapping[str, ASGIApp], routes: Mapping[str, JSONRoute] | None = None
    ) -> None:
        self._services = dict(services)
        self._routes = dict(routes or {})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if await not_a_request(scope, receive, send):
            return
        path: str = scope["path"]
        prefix, _, _ = path[1:].partition("/")
        app = self._services.get("/" + prefix)
        if app is not None:
            await app(scope, receive, send)
            return
        route = self._routes.get(path)
        if route is None:
            await send_json(send, 404, {"error": f"no route for {path}"})
            return
        body: Any = None
        if scope["method"] == "POST":
            try:
                raw = await read_body(receive)
                body = json.loads(raw) if raw else {}
            except (ValueError, UnicodeDecodeError) as exc:
                await send_json(send, 400, {"error": f"body is not JSON: {exc}"})
                return
        status, answer = await route(scope["method"], body)
        await send_json(send, status, answer)


def hypercorn_config(listen: str, grace_seconds: float) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [listen]
    config.graceful_timeout = grace_seconds
    # Past this many requests hypercorn sends GOAWAY on an HTTP/2 connection,
    # which grpcio clients report as UNAVAILABLE: keep connections for good.
    config.keep_alive_max_requests = 2**31
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_until_signalled(
    app: ASGIApp, listen: str, grace_seconds: float, stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then let in-flight requests finish."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await hypercorn_serve(app, hypercorn_config(listen, grace_seconds), shutdown_trigger=stop.wait)
