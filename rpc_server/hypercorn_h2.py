"""hypercorn 0.18's HTTP/2 connections, mended where they failed this project's servers.

`patch_hypercorn_h2()` (idempotent, called before any server starts) wraps three methods:

- Late request data (pgjones/hypercorn#329; fixes proposed in #312 and #334): once a
  response is complete hypercorn forgets the stream, and request body that arrives after it
  (an answer sent before the body was read: an unknown path or method, 415, an auth refusal)
  makes `H2Protocol._handle_events` raise KeyError. That kills the connection's reader: its
  other calls hang, the socket is never closed, and shutdown waits for it forever. Such data
  is dropped, its flow-control credit still given back (h2 skips the stream window of a
  stream it has closed), so the client can finish.
- A connection that had not sent a request yet was never closed: hypercorn's HTTP/1.1 parser
  reads the HTTP/2 preface ("PRI * HTTP/2.0": prior knowledge, how every gRPC client
  connects) as a request and stops the connection's idle timer, which `H2Protocol` restarts
  only when a stream ends. It outlived `keep_alive_timeout`, and at SIGTERM the server waited
  its whole grace period for it, then cancelled it (which Python 3.11 logs as an asyncio
  CancelledError traceback). `H2Protocol.initiate` restarts the timer.
- Closing an idle connection (past `keep_alive_timeout`, or at once when the server stops),
  hypercorn sent no GOAWAY: a request the client sent meanwhile was lost, with no sign that
  it was never processed. `TCPServer._initiate_server_close` sends one first (its last stream
  id says what was processed).

And what goes with GOAWAY (RFC 9113 §6.8, §8.7): a request after it, or on a connection still
answering others while the server stops, is refused with REFUSED_STREAM (nothing of it was
processed: it can be retried elsewhere), where hypercorn reset it with NO_ERROR (gRPC reports
INTERNAL) or h2 failed the whole connection; and the client's frames sent before it read the
GOAWAY are still read (`_Connection`).

A connection with requests in flight stays hypercorn's: GOAWAY and the close come once the
last one is answered. Never before: h2 then refuses the server's own remaining answers, and
h2-based clients (httpx) refuse to read them.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import h2.connection
import h2.events
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger(__name__)

# hypercorn versions these patches were checked against.
_CHECKED = ("0.18.",)


class _Connection(h2.connection.H2Connection):
    """h2's connection, still reading after it sent a graceful GOAWAY.

    h2 takes a connection that sent GOAWAY for closed (python-hyper/h2#1181) and answers any
    later frame but GOAWAY with a second GOAWAY, PROTOCOL_ERROR: a WINDOW_UPDATE or PING the
    client sent before it read the GOAWAY (gRPC clients send both as they read an answer, and
    log that error). The socket is closed right after a graceful GOAWAY; until then frames are
    read as before, and a request is refused (`going_away`).
    """

    going_away = False

    def close_connection(self, error_code: ErrorCodes | int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        state = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        self.going_away = True
        if error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = state


def _handle_events(original: Callable[[H2Protocol, list[h2.events.Event]], Awaitable[None]]) -> Any:
    async def handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        # One event at a time: the stream may close while an earlier event is awaited.
        for event in events:
            if (isinstance(event, h2.events.DataReceived | h2.events.StreamEnded)
                    and event.stream_id not in self.streams):
                if isinstance(event, h2.events.DataReceived):
                    self.connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id)
                continue
            if isinstance(event, h2.events.RequestReceived) and (
                    self.context.terminated.is_set() or getattr(self.connection, "going_away", False)):
                # What hypercorn does while stopping, but refused (not reset with NO_ERROR); and
                # past a GOAWAY, whose last stream id this one is above.
                self.connection.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                self.connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
                continue
            await original(self, [event])
        # What h2 queued without an event (window updates, a reset) goes out now too.
        await self._flush()

    return handle_events


def _initiate(original: Callable[..., Awaitable[None]]) -> Any:
    async def initiate(self: H2Protocol, headers: list[tuple[bytes, bytes]] | None = None,
                       settings: bytes | None = None) -> None:
        # Built by H2Protocol.__init__, before anything was sent or received on it.
        self.connection.__class__ = _Connection
        await original(self, headers, settings)
        if self.idle:  # no stream: the idle timer stopped on the preface runs again
            await self.send(Updated(idle=True))

    return initiate


def _initiate_server_close(original: Callable[[TCPServer], Awaitable[None]]) -> Any:
    async def initiate_server_close(self: TCPServer) -> None:
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)  # ProtocolWrapper's
        if (isinstance(protocol, H2Protocol) and not getattr(protocol.connection, "going_away", False)
                and protocol.connection.state_machine.state is not ConnectionState.CLOSED):
            protocol.connection.close_connection()
            await protocol._flush()
        await original(self)

    return initiate_server_close


# (class, method, its parameters, wrapper)
_PATCHES: list[tuple[type, str, list[str], Callable[[Any], Any]]] = [
    (H2Protocol, "_handle_events", ["self", "events"], _handle_events),
    (H2Protocol, "initiate", ["self", "headers", "settings"], _initiate),
    (TCPServer, "_initiate_server_close", ["self"], _initiate_server_close),
]


def patch_hypercorn_h2() -> None:
    """Wrap what the module docstring lists. Idempotent. Raises at startup if hypercorn no
    longer has what is wrapped, rather than serving unpatched."""
    hypercorn = version("hypercorn")
    for cls, name, parameters, _ in _PATCHES:
        method = getattr(cls, name, None)
        if method is None or not inspect.iscoroutinefunction(method) or (
                list(inspect.signature(method).parameters) != parameters):
            raise RuntimeError(
                f"hypercorn {hypercorn}: {cls.__name__}.{name}({', '.join(parameters)}) is gone; "
                "re-check rpc_server/hypercorn_h2.py (pgjones/hypercorn#329, the idle timer, GOAWAY)")
    if not hasattr(H2Protocol, "_flush"):
        raise RuntimeError(f"hypercorn {hypercorn}: H2Protocol._flush is gone; re-check "
                           "rpc_server/hypercorn_h2.py")
    if not hypercorn.startswith(_CHECKED):
        log.info("hypercorn %s: patching its HTTP/2 connections (checked against %s); see whether "
                 "pgjones/hypercorn#329 is fixed", hypercorn, ", ".join(_CHECKED))
    for cls, name, _, wrap in _PATCHES:
        original = getattr(cls, name)
        if not getattr(original, "_ramp_patched", False):
            patched = functools.wraps(original)(wrap(original))
            patched._ramp_patched = True  # type: ignore[attr-defined]
            setattr(cls, name, patched)
