"""SIGTERM with connections open, against real `ramp-broker` processes.

A sidecar is stopped on every deploy. An HTTP/2 connection that had not sent a request yet (every
gRPC client keeps one) used to hold the stop up for the whole grace period, after which Python
logged an asyncio CancelledError traceback per connection; an idle connection was closed without
GOAWAY, and a request sent on a connection still draining was reset with NO_ERROR. A call still
running when the grace ran out kept the broker from ever exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import httpx
import pytest
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.typing import ConnectionState
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame

from rpc_server.hypercorn_h2 import patch_hypercorn_h2
from tests.h2client import H2Client
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    exchange_state,
    set_knobs,
    start_broker,
    start_exchange,
)

JSON = [("content-type", "application/json")]
DECLARE = "/ramp.broker.v1.BudgetService/DeclareSessionBudget"
STATUS = "/ramp.broker.v1.BudgetService/GetBudgetStatus"
TRANSACT = "/ramp.broker.v1.BrokerService/Transact"
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
# Generous bound on how long a broker with nothing in flight takes to exit after SIGTERM.
PROMPT_S = 3.0
PATIENCE_S = 15.0


def _port(child: Child) -> int:
    return int(child.url.rsplit(":", 1)[1])


def _quiet(child: Child) -> None:
    """Nothing logged at ERROR, no traceback."""
    assert "Traceback" not in child.stderr, child.stderr
    assert " ERROR " not in child.stderr, child.stderr


async def _exit_code(child: Child, within_s: float) -> int:
    code = await asyncio.wait_for(child.proc.wait(), within_s)
    await asyncio.sleep(0.2)  # the last log lines
    return code


@pytest.fixture
async def exchange(tmp_path: Path) -> AsyncIterator[Child]:
    async with start_exchange(tmp_path, catalog_tree()) as child:
        yield child


async def _transact(h2c: H2Client, session: str) -> int:
    """Declare a session budget on the connection and start a purchase there; its stream id."""
    declared = await h2c.request(DECLARE, JSON, json.dumps(
        {"sessionId": session, "limit": {"amount": "5.00", "currency": "USD"}}).encode())
    assert declared.status == 200, bytes(declared.body)
    stream_id = await h2c.start(TRANSACT, JSON)
    await h2c.send(stream_id, json.dumps(
        {"sessionId": session, "idempotencyKey": "k1", "uris": ["https://x.test/a"]}).encode())
    return stream_id


async def _until_at_exchange(exchange: Child) -> None:
    """Until the Exchange counted the purchase (it does before sleeping): the call is in flight."""
    deadline = time.monotonic() + PATIENCE_S
    async with httpx.AsyncClient(timeout=5) as client:
        while (await exchange_state(client, exchange))["execute_calls"] < 1:
            assert time.monotonic() < deadline, "the purchase never reached the Exchange"
            await asyncio.sleep(0.02)


async def test_sigterm_closes_idle_connections_with_goaway_and_exits_at_once(
        tmp_path: Path, exchange: Child) -> None:
    grace = 10.0
    async with start_broker(tmp_path, broker_tree(exchange, shutdown_grace_seconds=grace)) as broker, \
            H2Client.connect("127.0.0.1", _port(broker), patience=PATIENCE_S) as fresh, \
            H2Client.connect("127.0.0.1", _port(broker), patience=PATIENCE_S) as used, \
            grpc.aio.insecure_channel(f"127.0.0.1:{_port(broker)}") as channel:
        # `fresh` sent the HTTP/2 preface and nothing else; `used` one request; the gRPC channel
        # is connected, with no call yet (what a client keeps between calls).
        answer = await used.request(DECLARE, JSON, json.dumps(
            {"sessionId": "s", "limit": {"amount": "1.00", "currency": "USD"}}).encode())
        assert answer.status == 200, bytes(answer.body)
        await asyncio.wait_for(channel.channel_ready(), PATIENCE_S)
        await health_pb2_grpc.HealthStub(channel).Check(hpb.HealthCheckRequest(), timeout=PATIENCE_S)

        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        code = await _exit_code(broker, grace + 5)
        took = time.monotonic() - started
        assert took < PROMPT_S, (took, broker.stderr)
        assert code == 0, broker.stderr
        assert "broker stopped" in broker.stderr
        _quiet(broker)
        for h2c in (fresh, used):
            await asyncio.wait_for(h2c.disconnected.wait(), PATIENCE_S)
        assert fresh.goaways == [(NO_ERROR, 0)]
        assert used.goaways == [(NO_ERROR, 1)]  # its one stream was processed


async def test_sigterm_lets_an_in_flight_call_finish_refuses_new_ones_then_exits(
        tmp_path: Path, exchange: Child) -> None:
    grace = 10.0
    latency_ms = 2000
    async with start_broker(tmp_path, broker_tree(exchange, shutdown_grace_seconds=grace)) as broker, \
            H2Client.connect("127.0.0.1", _port(broker), patience=PATIENCE_S) as busy, \
            H2Client.connect("127.0.0.1", _port(broker), patience=PATIENCE_S) as idle:
        async with httpx.AsyncClient(timeout=5) as client:
            await set_knobs(client, exchange, execute_latency_ms=latency_ms)
        purchase = await _transact(busy, "s1")
        await _until_at_exchange(exchange)

        broker.proc.send_signal(signal.SIGTERM)
        # The idle connection is told and closed while the purchase is still running.
        await asyncio.wait_for(idle.disconnected.wait(), PATIENCE_S)
        assert idle.goaways == [(NO_ERROR, 0)]
        assert not busy.closed.is_set()
        # A new call on the draining connection is refused: nothing of it was processed.
        late = await busy.request(STATUS, JSON, b'{"sessionId": "s1"}')
        assert late.reset == h2.errors.ErrorCodes.REFUSED_STREAM, late

        answered = await busy.response(purchase)
        assert answered.status == 200, bytes(answered.body)
        (item,) = json.loads(answered.body)["items"]
        assert item["status"] == "ITEM_STATUS_PURCHASED"
        answered_at = time.monotonic()
        # Then the connection is told and closed, and the broker exits.
        await asyncio.wait_for(busy.disconnected.wait(), PATIENCE_S)
        ((error, last_stream),) = busy.goaways
        assert error == NO_ERROR
        assert last_stream >= purchase
        code = await _exit_code(broker, grace + 5)
        assert time.monotonic() - answered_at < PROMPT_S, broker.stderr
    assert code == 0, broker.stderr
    _quiet(broker)


async def test_a_grace_that_runs_out_cancels_the_call_which_answers_canceled(
        tmp_path: Path, exchange: Child) -> None:
    """hypercorn cancelled the whole connection, and connectrpc's CANCELED answer then waited for
    the connection's cancelled sender: the broker never exited."""
    grace = 1.0
    async with start_broker(tmp_path, broker_tree(exchange, shutdown_grace_seconds=grace)) as broker, \
            H2Client.connect("127.0.0.1", _port(broker), patience=PATIENCE_S) as busy:
        async with httpx.AsyncClient(timeout=5) as client:
            await set_knobs(client, exchange, execute_latency_ms=int((grace + 2) * 1000))
        purchase = await _transact(busy, "s1")
        await _until_at_exchange(exchange)

        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        answered = await busy.response(purchase)
        assert answered.status == 499, bytes(answered.body)
        assert json.loads(answered.body)["code"] == "canceled"
        await asyncio.wait_for(busy.disconnected.wait(), PATIENCE_S)
        assert [error for error, _ in busy.goaways] == [NO_ERROR]
        # The purchase itself is given the grace again to finish (Purchaser.drain).
        code = await _exit_code(broker, PATIENCE_S)
        assert time.monotonic() - started < 2 * grace + PROMPT_S, broker.stderr
    assert code == 0, broker.stderr
    assert "the shutdown grace (1 s) ran out: 1 request(s) still running cancelled" in broker.stderr, \
        broker.stderr
    _quiet(broker)


# --- one HTTP/2 connection in memory: what a client sends as the GOAWAY is on its way ------------
# (against a real server the race is too quick to catch every time)


def _frames(data: bytes | bytearray) -> list[Frame]:
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        frames.append(frame)
        view = view[9 + length:]
    return frames


@contextlib.asynccontextmanager
async def _h2_server() -> AsyncIterator[tuple[H2Protocol, h2.connection.H2Connection, bytearray]]:
    """hypercorn's HTTP/2 protocol (patched) with a client connected; what the server sends
    collects in the bytearray. It has sent GOAWAY, as when it closes an idle connection or
    answered its last request while stopping."""
    patch_hypercorn_h2()
    sent = bytearray()

    async def send(event: Event) -> None:
        if isinstance(event, RawData):
            sent.extend(event.data)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request reaches the app")

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    async with TaskGroup(asyncio.get_running_loop()) as tasks:
        server = H2Protocol(ASGIWrapper(app), HypercornConfig(), WorkerContext(None), tasks,
                            ConnectionState({}), False, None, None, send)
        await server.initiate()
        client.initiate_connection()
        await server.handle(RawData(client.data_to_send()))
        client.receive_data(bytes(sent))
        await server.handle(RawData(client.data_to_send()))
        server.connection.close_connection()
        await server._flush()
        assert [type(f) for f in _frames(sent)][-1:] == [GoAwayFrame]
        sent.clear()
        try:
            yield server, client, sent
        finally:
            await server.handle(Closed())


async def test_after_goaway_the_server_still_reads_the_clients_window_updates_and_pings() -> None:
    """h2 answered them with a second GOAWAY, PROTOCOL_ERROR (python-hyper/h2#1181), which grpcio
    clients, which send both as they read an answer, logged after the broker's last answer."""
    async with _h2_server() as (server, client, sent):
        client.increment_flow_control_window(65_535)
        client.ping(b"12345678")
        await server.handle(RawData(client.data_to_send()))
        (pong,) = _frames(sent)
        assert isinstance(pong, PingFrame)
        assert "ACK" in pong.flags


async def test_a_request_sent_after_goaway_is_refused_before_the_app_sees_it() -> None:
    async with _h2_server() as (server, client, sent):
        client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                                (":path", STATUS), ("content-type", "application/json")], end_stream=True)
        await server.handle(RawData(client.data_to_send()))
        refused = [(f.stream_id, f.error_code) for f in _frames(sent) if isinstance(f, RstStreamFrame)]
        assert refused == [(1, h2.errors.ErrorCodes.REFUSED_STREAM)]
        assert not server.streams


def test_the_server_keeps_idle_connections_longer_than_clients_do() -> None:
    """A server that closes an idle HTTP/1.1 connection as the client reuses it loses that request
    ("server disconnected": the stress test saw one). httpx drops idle connections after 5 s."""
    import httpx

    from rpc_server.serving import _hypercorn_config

    config = _hypercorn_config("127.0.0.1:0", 1.0)
    pool_expiry = httpx.AsyncHTTPTransport()._pool._keepalive_expiry
    assert pool_expiry is not None
    assert config.keep_alive_timeout > 2 * pool_expiry
