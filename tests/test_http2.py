"""HTTP/2 and gRPC transport edge cases, against real `ramp-broker` processes.

A request answered before its body arrived (unknown path or method, 415) used to make
hypercorn's HTTP/2 protocol raise on the late body (pgjones/hypercorn#329): every call
in flight on the connection then hung, and SIGTERM no longer stopped the broker.
gRPC over HTTP/1.1 (no trailers) used to answer UNKNOWN with a traceback logged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol.h2 import H2Protocol

from ramp.broker.v1 import broker_pb2 as bpb
from rpc_server.hypercorn_h2 import patch_hypercorn_h2
from tests.h2client import H2Client
from tests.processes import Child, broker_tree, catalog_tree, start_broker, start_exchange

GRACE_SECONDS = 2.0
JSON = [("content-type", "application/json")]
GRPC = [("content-type", "application/grpc"), ("te", "trailers")]
DECLARE = "/ramp.broker.v1.BudgetService/DeclareSessionBudget"
STATUS = "/ramp.broker.v1.BudgetService/GetBudgetStatus"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Child]:
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            start_broker(tmp_path, broker_tree(exchange, shutdown_grace_seconds=GRACE_SECONDS)) as child:
        yield child


def _port(child: Child) -> int:
    return int(child.url.rsplit(":", 1)[1])


def _declare(session: str) -> bytes:
    return json.dumps({"sessionId": session, "limit": {"amount": "1.00", "currency": "USD"}}).encode()


def _grpc_status_request(session: str) -> bytes:
    payload = bpb.GetBudgetStatusRequest(session_id=session).SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


# Requests answered before their body is read: (path, headers, expected HTTP status).
EARLY_ANSWERS = [
    ("/no/such/path", JSON, 404),
    ("/ramp.broker.v1.BrokerService/NoSuchMethod", JSON, 404),
    (STATUS, [("content-type", "text/plain")], 415),
]


async def test_body_after_an_early_answer_leaves_the_connection_working(broker: Child) -> None:
    async with H2Client.connect("127.0.0.1", _port(broker), patience=10) as h2:
        # A call in flight across everything below: headers and half its body now.
        in_flight = await h2.start(DECLARE, JSON)
        body = _declare("s1")
        await h2.send(in_flight, body[:10], end=False)

        for path, headers, expected in EARLY_ANSWERS:
            late = await h2.start(path, headers)
            answer = await h2.headers(late)  # answered before any body was sent
            assert answer.status == expected, path
            await h2.send(late, b'{"sessionId": "late", "padding": "' + b"x" * 100_000 + b'"}')

        await h2.send(in_flight, body[10:])
        declared = await h2.response(in_flight)
        assert declared.status == 200, bytes(declared.body)

        # New calls on the same connection: Connect JSON and gRPC.
        budgets = await h2.request(STATUS, JSON, b'{"sessionId": "s1"}')
        assert budgets.status == 200, bytes(budgets.body)
        assert json.loads(budgets.body)["budgets"][0]["limit"]["amount"] == "1.00"
        grpc_call = await h2.request(STATUS, GRPC, _grpc_status_request("s1"))
        assert grpc_call.grpc_status == 0, grpc_call.grpc_message

        # SIGTERM with the connection still open: the broker stops within its grace period.
        broker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(broker.proc.wait(), GRACE_SECONDS + 8)
    assert code == 0, broker.stderr
    assert "Traceback" not in broker.stderr, broker.stderr


async def test_grpc_over_http1_is_refused_clearly(broker: Child) -> None:
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
        for content_type in ("application/grpc", "application/grpc+proto"):
            r = await client.post(
                "/ramp.broker.v1.BrokerService/Transact", content=struct.pack(">BI", 0, 0),
                headers={"content-type": content_type, "te": "trailers"})
            assert r.status_code == 505
            assert r.headers["grpc-status"] == "12"
            assert "HTTP/2" in r.headers["grpc-message"]
            body = r.json()
            assert body["code"] == "unimplemented"
            assert "gRPC-Web or Connect" in body["message"]
        # gRPC-Web and Connect still work over HTTP/1.1 on the same connection.
        r = await client.post(DECLARE, content=_declare("h1"), headers=dict(JSON))
        assert r.status_code == 200, r.text
    await asyncio.sleep(0.2)  # let the child's log lines arrive
    assert "Traceback" not in broker.stderr, broker.stderr
    assert "trailers extension" not in broker.stderr, broker.stderr


def test_hypercorn_patches_are_installed_once_and_fail_loudly_without_their_hooks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def installed() -> list[object]:
        return [H2Protocol._handle_events, H2Protocol.initiate, TCPServer._initiate_server_close]

    patch_hypercorn_h2()
    patched = installed()
    patch_hypercorn_h2()
    assert installed() == patched
    assert all(getattr(method, "_ramp_patched", False) for method in patched)
    for cls, name in ((H2Protocol, "_handle_events"), (TCPServer, "_initiate_server_close")):
        with monkeypatch.context() as m:
            m.delattr(cls, name)
            with pytest.raises(RuntimeError, match=f"{cls.__name__}.{name}.*hypercorn#329"):
                patch_hypercorn_h2()
