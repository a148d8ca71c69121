"""gRPC-Web text (`application/grpc-web-text`, base64 framing) beside binary gRPC-Web (issue 14),
as the official grpc-web JavaScript client sends it by default; and a content type nobody
supports gets an answer that names the ones that work."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator

import httpx

from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb
from rpc_server.content_types import SUPPORTED
from tests.harness import RunningBroker

DECLARE = "/ramp.broker.v1.BudgetService/DeclareSessionBudget"
STATUS = "/ramp.broker.v1.BudgetService/GetBudgetStatus"
WATCH = "/grpc.health.v1.Health/Watch"
TEXT = {"content-type": "application/grpc-web-text", "accept": "application/grpc-web-text", "x-grpc-web": "1"}


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def b64(text: bytes) -> bytes:
    """gRPC-Web text as a client reads it: 4 characters at a time, padding allowed after any
    group (the server pads each piece it flushes)."""
    assert len(text) % 4 == 0, text
    return b"".join(base64.b64decode(text[i:i + 4], validate=True) for i in range(0, len(text), 4))


def unframe(raw: bytes) -> tuple[list[bytes], dict[str, str]]:
    """gRPC-Web frames: the messages, and the trailer frame's fields."""
    messages, trailers = [], {}
    while raw:
        flags, size = struct.unpack(">BI", raw[:5])
        body, raw = raw[5:5 + size], raw[5 + size:]
        if flags & 0x80:
            for line in body.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(body)
    return messages, trailers


def status_of(r: httpx.Response) -> tuple[str, str, list[bytes]]:
    """(grpc-status, grpc-message, messages) of a gRPC-Web text answer: the status from a
    trailers-only answer's headers, or from the (base64) trailer frame."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/grpc-web-text"), r.headers
    messages, trailers = unframe(b64(r.content))
    if "grpc-status" in r.headers:
        return r.headers["grpc-status"], r.headers.get("grpc-message", ""), messages
    return trailers["grpc-status"], trailers.get("grpc-message", ""), messages


async def test_a_grpc_web_text_call_round_trips(broker: RunningBroker) -> None:
    declare = bpb.DeclareSessionBudgetRequest(
        session_id="text", limit=rpb.Cost(amount="2.50", currency="USD"))
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
        r = await client.post(DECLARE, content=base64.b64encode(frame(declare.SerializeToString())),
                              headers=TEXT)
        assert r.headers["content-type"] == "application/grpc-web-text+proto"
        code, message, (answer,) = status_of(r)
        assert (code, message) == ("0", "")
        declared = bpb.DeclareSessionBudgetResponse.FromString(answer)
        assert declared.budget.limit == rpb.Cost(amount="2.50", currency="USD")

        # The body in two separately padded base64 pieces (as a client encoding chunk by chunk
        # sends it), arriving in small pieces.
        request = frame(bpb.GetBudgetStatusRequest(session_id="text").SerializeToString())
        text = base64.b64encode(request[:4]) + base64.b64encode(request[4:])
        assert text.count(b"=") >= 2

        async def trickle() -> AsyncIterator[bytes]:
            for i in range(0, len(text), 5):
                yield text[i:i + 5]

        r = await client.post(STATUS, content=trickle(),
                              headers={**TEXT, "content-type": "application/grpc-web-text+proto"})
        code, message, (answer,) = status_of(r)
        assert (code, message) == ("0", "")
        (budget,) = bpb.GetBudgetStatusResponse.FromString(answer).budgets
        assert (budget.scope, budget.limit.amount) == ("text", "2.50")


async def test_errors_come_back_as_grpc_web_text(broker: RunningBroker) -> None:
    unknown = base64.b64encode(frame(
        bpb.GetBudgetStatusRequest(session_id="never-declared").SerializeToString()))
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
        code, message, messages = status_of(await client.post(STATUS, content=unknown, headers=TEXT))
        assert code == "5", message  # NOT_FOUND
        assert not messages
        for bad in (b"!!!!", b"QUJD" + b"QQ"):  # not base64; not whole 4-character groups
            code, message, messages = status_of(await client.post(STATUS, content=bad, headers=TEXT))
            assert code == "3", message  # INVALID_ARGUMENT
            assert "base64" in message, message


async def test_a_server_stream_arrives_as_it_is_sent(broker: RunningBroker) -> None:
    """Health Watch never ends: its first message must be readable before the stream does."""
    request = base64.b64encode(frame(b""))  # HealthCheckRequest{service: ""}
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client, \
            client.stream("POST", WATCH, content=request, headers=TEXT) as r:
        assert r.headers["content-type"] == "application/grpc-web-text+proto"
        received = whole = b""
        async for chunk in r.aiter_bytes():  # the stream stays open: read until one frame is whole
            received += chunk
            whole = b64(received[:len(received) - len(received) % 4])
            if len(whole) >= 5 and len(whole) >= 5 + struct.unpack(">I", whole[1:5])[0]:
                break
        (message,), trailers = unframe(whole)
        assert message == b"\x08\x01"  # status: SERVING
        assert not trailers


async def test_an_unknown_content_type_is_told_what_works(broker: RunningBroker) -> None:
    async with httpx.AsyncClient(base_url=broker.url, timeout=10) as client:
        r = await client.post(STATUS, content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    body = r.json()
    assert body["code"] == "unimplemented"
    assert "'text/plain' is not supported" in body["message"]
    for named in ("application/json", "application/grpc-web-text", "application/grpc "):
        assert named.strip() in body["message"], body["message"]
    assert r.headers["accept-post"].split(", ") == list(SUPPORTED)
