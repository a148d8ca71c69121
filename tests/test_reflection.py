"""gRPC server reflection (issue 14): grpcio's own reflection client lists the broker's services
and resolves their descriptors with no proto files, over v1 and v1alpha, on the broker's port.

grpcio's client is synchronous: it runs in a thread, the broker in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ramp.grpc.reflection.v1 import reflection_pb2 as v1
from tests.harness import Exchange, RunningBroker, broker_config, running_broker

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
ALWAYS = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
          "grpc.reflection.v1alpha.ServerReflection", "ramp.broker.v1.BrokerService",
          "ramp.broker.v1.BudgetService"]


class _V1Stub:
    """grpcio-reflection's client speaks v1alpha. v1 has the same messages (fields and numbers)
    in another package, so that client, sent to v1's method, is a v1 client."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            V1_METHOD, request_serializer=alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=alpha.ServerReflectionResponse.FromString)


def _reflect(port: int, version: str) -> dict[str, Any]:
    """What a reflection client learns from the broker, through a pool fed only by reflection."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        if version == "v1":
            database._stub = _V1Stub(channel)
        pool = DescriptorPool(database)
        broker = pool.FindServiceByName("ramp.broker.v1.BrokerService")
        transact = pool.FindMessageTypeByName("ramp.broker.v1.TransactRequest")
        cost = pool.FindMessageTypeByName("ramp.v1.Cost")  # a ramp.v1 message, found through its import
        health = pool.FindServiceByName("grpc.health.v1.Health")
        missing = None
        try:
            pool.FindMessageTypeByName("ramp.broker.v1.NoSuchMessage")
        except KeyError as exc:
            missing = str(exc)
        return {
            "services": sorted(database.get_services()),
            "methods": {m.name: (m.input_type.full_name, m.output_type.full_name) for m in broker.methods},
            "transact_fields": {f.name: f.number for f in transact.fields},
            "uris_repeated": transact.fields_by_name["uris"].is_repeated,
            "cost_fields": [f.name for f in cost.fields],
            "health": {m.name: m.server_streaming for m in health.methods},
            "missing": missing,
        }


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_a_reflection_client_resolves_the_broker_without_protos(
        broker: RunningBroker, version: str) -> None:
    seen = await asyncio.wait_for(asyncio.to_thread(_reflect, broker.port, version), 20)
    assert seen["services"] == ALWAYS  # no period budgets configured: no BudgetAdminService
    assert seen["methods"] == {
        "Resolve": ("ramp.broker.v1.ResolveRequest", "ramp.broker.v1.ResolveResponse"),
        "Transact": ("ramp.broker.v1.TransactRequest", "ramp.broker.v1.TransactResponse"),
    }
    fields = seen["transact_fields"]
    assert {"session_id", "idempotency_key", "uris", "offers", "constraints"} <= set(fields), fields
    assert seen["uris_repeated"]
    assert seen["cost_fields"][:2] == ["amount", "currency"]
    assert seen["health"] == {"Check": False, "List": False, "Watch": True}
    assert seen["missing"] is not None  # NOT_FOUND from the server, as a KeyError


def _v1_stream(port: int) -> list[v1.ServerReflectionResponse]:
    """Two requests on one v1 stream, with v1's own message classes."""
    requests = [v1.ServerReflectionRequest(list_services=""),
                v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
                v1.ServerReflectionRequest(file_by_filename="no/such/file.proto")]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            V1_METHOD, request_serializer=v1.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=10))


async def test_v1_answers_in_order_with_its_own_messages(broker: RunningBroker) -> None:
    listed, described, missing = await asyncio.wait_for(asyncio.to_thread(_v1_stream, broker.port), 20)
    assert [s.name for s in listed.list_services_response.service] == ALWAYS
    assert listed.original_request.HasField("list_services")
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    (reflection,) = [f for f in files if f.package == "grpc.reflection.v1"]
    assert [s.name for s in reflection.service] == ["ServerReflection"]
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_over_connect_needs_no_grpc(broker: RunningBroker) -> None:
    """Connect streaming (JSON, HTTP/1.1), as `buf curl` sends it by default."""
    request = json.dumps({"listServices": ""}).encode()
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{broker.url}/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            content=struct.pack(">BI", 0, len(request)) + request,
            headers={"content-type": "application/connect+json", "connect-protocol-version": "1"})
    assert r.status_code == 200, r.text
    body, messages = r.content, []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        messages.append((flags, json.loads(body[5:5 + size])))
        body = body[5 + size:]
    (first_flags, first), (end_flags, end) = messages
    assert first_flags == 0
    assert [s["name"] for s in first["listServicesResponse"]["service"]] == ALWAYS
    assert end_flags == 2
    assert "error" not in end, end


async def test_the_admin_service_is_listed_when_it_is_served(exchange: Exchange, tmp_path: Path) -> None:
    config = broker_config([exchange], period_budgets={
        "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
        "journal_path": str(tmp_path / "journal.jsonl"), "memory_path": str(tmp_path / "memory.json"),
        "accounts": {"acme": {"scopes": {"team:eng": {
            "limits": [{"period": "day", "amount": "5.00", "currency": "USD"}]}}}},
    }, anonymous={"account": "acme", "charged_to": ["team:eng"]})
    async with running_broker(config) as b:
        seen = await asyncio.wait_for(asyncio.to_thread(_reflect, b.port, "v1"), 20)
    assert seen["services"] == sorted([*ALWAYS, "ramp.broker.v1.BudgetAdminService"])
