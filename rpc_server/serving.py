"""Serving Connect applications over HTTP/1.1 and HTTP/2 with hypercorn.

One port carries Connect (JSON and binary), gRPC-Web and gRPC: hypercorn passes
HTTP/2 trailers to the ASGI app, which gRPC needs. Shared by the broker and the
reference Exchange.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from rpc_server.content_types import explain_unsupported, grpc_web_text, is_grpc_web_text
from rpc_server.hypercorn_h2 import patch_hypercorn_h2

log = logging.getLogger(__name__)

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
# A plain JSON route: (method, parsed body or None) -> (status, JSON-able body).
JSONRoute = Callable[[str, Any], Awaitable[tuple[int, Any]]]


async def send_json(send: Any, status: int, body: Any,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *(headers or [])],
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


async def drain_body(
    receive: Any, limit: int = 1 << 20, patience: float = 5.0, idle: float | None = None,
) -> bool:
    """Read and drop the request body (at most `limit` bytes, for at most `patience` s, and, with
    `idle`, giving up once nothing arrived for that long), so an HTTP/1.1 client still sending
    it reads the answer instead of a reset connection. True when the whole body was read (the
    connection can serve the next request)."""
    size = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(patience):
            while size <= limit:
                async with asyncio.timeout(idle):
                    message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return True
                size += len(message.get("body", b""))
    return False


# An early answer waits this long for more of a body still arriving before it gives up on it.
_DRAIN_IDLE_S = 0.25


def drain_before_answering(receive: Any, send: Any) -> tuple[Any, Any]:
    """(receive, send) that read the rest of an HTTP/1.1 request body before an early answer.

    An answer sent before the body was read (an unknown key, a wrong content type, an unknown
    method) left the body on the connection, and hypercorn closed the connection under the
    client, which saw a reset instead of the answer or on its next request. A body that keeps
    arriving is read and dropped first (bounded), so the client reads the answer and keeps
    its connection; a client that sends nothing more (it waits for the answer first) is
    answered after a moment with `connection: close`, so it knows not to reuse it.
    """
    ended = False
    # What the drain read, still owed to the app: a streaming RPC (server reflection over
    # Connect) answers before its request has ended, and then reads the rest of it.
    kept: collections.deque[Any] = collections.deque()

    async def tracked() -> Any:
        nonlocal ended
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            ended = True
        return message

    async def ahead() -> Any:
        message = await tracked()
        kept.append(message)
        return message

    async def app_receive() -> Any:
        return kept.popleft() if kept else await tracked()

    async def answer(message: Any) -> None:
        if (message["type"] == "http.response.start" and not ended
                and not await drain_body(ahead, idle=_DRAIN_IDLE_S)):
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return app_receive, answer


# Protocol headers are short; a longer value is refused before connectrpc would quote it whole.
_MAX_HEADER = 256
_PROTOCOL_HEADERS = frozenset({
    b"content-type", b"content-encoding", b"accept-encoding", b"connect-protocol-version",
    b"connect-timeout-ms", b"connect-content-encoding", b"connect-accept-encoding", b"grpc-timeout",
    b"grpc-encoding", b"grpc-accept-encoding",
})


def _overlong_header(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name in _PROTOCOL_HEADERS and len(value) > _MAX_HEADER:
            return f"header {name.decode()} is too long ({len(value)} bytes; at most {_MAX_HEADER})"
    return None


GRPC_NEEDS_HTTP2 = ("gRPC needs HTTP/2: connect with cleartext HTTP/2 (h2c, prior knowledge); "
                    "over HTTP/1.1 use gRPC-Web or Connect")


def _is_grpc_without_trailers(scope: Any) -> bool:
    """gRPC (not gRPC-Web) on a connection that cannot carry trailers (HTTP/1.1 here)."""
    if "http.response.trailers" in scope.get("extensions", {}):
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return bool(media == b"application/grpc" or media.startswith(b"application/grpc+"))
    return False


async def refuse_grpc_without_trailers(receive: Any, send: Any) -> None:
    """UNIMPLEMENTED, in the gRPC headers and as a Connect error body, with HTTP 505.

    connectrpc would raise (gRPC's status travels in trailers) and the caller would see
    UNKNOWN "ASGI server does not support ASGI trailers extension", with a traceback logged.
    """
    await drain_body(receive)
    await send_json(send, 505, {"code": "unimplemented", "message": GRPC_NEEDS_HTTP2}, [
        (b"grpc-status", b"12"), (b"grpc-message", GRPC_NEEDS_HTTP2.encode())])


async def refuse_overlong_header(scope: Any, send: Any, problem: str) -> None:
    """INVALID_ARGUMENT: as a gRPC trailers-only answer for gRPC and gRPC-Web, else a Connect error."""
    grpc = any(name == b"content-type" and value.lower().startswith(b"application/grpc")
               for name, value in scope["headers"])
    if grpc:
        ctype = next(value for name, value in scope["headers"] if name == b"content-type")
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", ctype), (b"grpc-status", b"3"), (b"grpc-message", problem.encode())]})
        await send({"type": "http.response.body", "body": b""})
        return
    await send_json(send, 400, {"code": "invalid_argument", "message": problem})


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
        if str(scope.get("http_version", "1.1")).startswith("1"):
            receive, send = drain_before_answering(receive, send)
        path: str = scope["path"]
        prefix, _, _ = path[1:].partition("/")
        app = self._services.get("/" + prefix)
        if app is not None:
            if _is_grpc_without_trailers(scope):
                await refuse_grpc_without_trailers(receive, send)
                return
            overlong = _overlong_header(scope)
            if overlong is not None:
                await refuse_overlong_header(scope, send, overlong)
                return
            send = explain_unsupported(scope, send)
            if is_grpc_web_text(scope):
                scope, receive, send = grpc_web_text(scope, receive, send)
            await app(scope, receive, send)
            return
        route = self._routes.get(path)
        if route is None:
            shown = path if len(path) <= 64 else path[:64] + "..."
            await send_json(send, 404, {"error": f"no route for {shown}"})
            return
        body: Any = None
        if scope["method"] == "POST":
            try:
                raw = await read_body(receive)
                body = json.loads(raw) if raw else {}
            except (ValueError, RecursionError):
                # Never the parser's own words: they name Python internals.
                await send_json(send, 400, {"error": "body is not a JSON document (UTF-8, at most 1 MiB)"})
                return
        status, answer = await route(scope["method"], body)
        await send_json(send, status, answer)


KEEP_ALIVE_S = 75.0


def _hypercorn_config(listen: str, grace_seconds: float) -> HypercornConfig:
    patch_hypercorn_h2()
    config = HypercornConfig()
    config.bind = [listen]
    config.graceful_timeout = grace_seconds
    # Past this many requests hypercorn sends GOAWAY on an HTTP/2 connection,
    # which grpcio clients report as UNAVAILABLE: keep connections for good.
    config.keep_alive_max_requests = 2**31
    # Longer than clients keep an idle connection (httpx 5 s, grpcio and browsers longer): with both
    # at 5 s, a client reusing a pooled connection just as the server closed it heard "server
    # disconnected" for a request never processed (HTTP/1.1 has no GOAWAY to say so).
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


# What requests cancelled at the end of the shutdown grace get to answer and end, before hypercorn
# cuts their connections.
_CANCEL_PATIENCE_S = 1.0


class _InFlight:
    """The app, keeping the tasks of the HTTP requests it is serving, so that `serve` can cancel
    those still running when the shutdown grace runs out."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self._app(scope, receive, send)
            return
        self._tasks.add(task)
        try:
            await self._app(scope, receive, send)
        finally:
            self._tasks.discard(task)

    def cancel(self) -> int:
        """Cancel every request still running; how many there were."""
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)


async def serve(app: ASGIApp, listen: str, grace_seconds: float, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then stop: no new connections, idle ones closed at once (HTTP/2
    ones after a GOAWAY), in-flight requests answered, each connection closed once it has none
    left (see rpc_server.hypercorn_h2); returns when none is left.

    Requests still running after `grace_seconds` are cancelled (logged), so they answer CANCELED
    and their connections close as above. hypercorn itself would cancel whole connections, and
    then an answer sent on an HTTP/2 one waited for its cancelled sender: forever (connectrpc
    answers a cancelled request), and the process never exited.
    """
    in_flight = _InFlight(app)

    async def cancel_at_grace() -> None:
        await stop.wait()
        await asyncio.sleep(grace_seconds)
        cancelled = in_flight.cancel()
        if cancelled:
            log.warning("%s: the shutdown grace (%g s) ran out: %d request(s) still running cancelled",
                        listen, grace_seconds, cancelled)

    canceller = asyncio.create_task(cancel_at_grace())
    try:
        await hypercorn_serve(in_flight, _hypercorn_config(listen, grace_seconds + _CANCEL_PATIENCE_S),
                              shutdown_trigger=stop.wait)
    finally:
        canceller.cancel()
        await asyncio.gather(canceller, return_exceptions=True)


async def serve_until_signalled(
    app: ASGIApp, listen: str, grace_seconds: float, stop: asyncio.Event | None = None,
) -> None:
    """`serve` until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, listen, grace_seconds, stop)
