"""Real servers on loopback for tests: the reference Exchange and the broker.

Both run in the test's event loop behind hypercorn on a free 127.0.0.1 port, so
every call crosses a real socket while the test can still read the Exchange's
books directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from google.protobuf import json_format

from broker.app import Broker, build_broker
from broker.config import BrokerConfig
from common.clock import Clock
from ramp.broker.v1 import broker_pb2 as bpb
from reference_exchange.catalog import Catalog
from reference_exchange.service import ReferenceExchange, reference_app
from rpc_server.serving import ASGIApp, serve

CONNECT_JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lasting_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), for a server that is killed and
    started again on it: while it is down, no outgoing connection takes the port as its own."""
    for _ in range(200):
        port = random.SystemRandom().randrange(20000, 32768)  # not the seeded generator of the tests
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


async def _wait_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, f"127.0.0.1:{port}", 2.0, stop))
    try:
        await _wait_listening(port)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def catalog(**overrides: Any) -> Catalog:
    """A small catalog: three flat-priced articles in USD and one EUR dataset."""
    base: dict[str, Any] = {
        "exchange": "ref.test",
        "accounts": {"ramp-broker": {"USD": "1000.00", "EUR": "1000.00"}},
        "offers": [
            {"uri": "https://x.test/a", "offer_id": "a", "rate": "1.00", "currency": "USD"},
            {"uri": "https://x.test/b", "offer_id": "b", "rate": "2.00", "currency": "USD"},
            {"uri": "https://x.test/c", "offer_id": "c", "rate": "3.00", "currency": "USD"},
            {"uri": "https://x.test/eur", "offer_id": "eur", "rate": "1.00", "currency": "EUR"},
        ],
    }
    base.update(overrides)
    return Catalog.model_validate(base)


@dataclass
class Exchange:
    ref: ReferenceExchange
    url: str
    name: str

    async def state(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{self.url}/admin/state")
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result


@contextlib.asynccontextmanager
async def running_exchange(cat: Catalog, clock: Clock | None = None) -> AsyncIterator[Exchange]:
    port = free_port()
    ref = ReferenceExchange(cat, clock)
    async with serving(reference_app(ref), port):
        yield Exchange(ref, f"http://127.0.0.1:{port}", cat.exchange)


@dataclass
class RunningBroker:
    broker: Broker
    url: str
    port: int

    async def post(self, method: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        """One Connect JSON call, e.g. post("BrokerService/Transact", {...}), with an optional API key."""
        headers = {**CONNECT_JSON, **({"authorization": f"Bearer {key}"} if key else {})}
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"{self.url}/ramp.broker.v1.{method}", json=body, headers=headers)


def broker_config(exchanges: list[Exchange], **overrides: Any) -> BrokerConfig:
    base: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "exchanges": [
            {"name": ex.name, "endpoint": ex.url, "trust": 50, "priority": i}
            for i, ex in enumerate(exchanges)
        ],
        "fanout": {"discover_timeout_ms": 1000, "overall_timeout_ms": 2000,
                   "execute_timeout_ms": 2000},
        "rates": {"EUR": {"USD": "1.10"}},
    }
    base.update(overrides)
    return BrokerConfig.model_validate(base)


@contextlib.asynccontextmanager
async def running_broker(
    config: BrokerConfig, clock: Clock | None = None,
    edit: Callable[[BrokerConfig], BrokerConfig] | None = None, rng: random.Random | None = None,
) -> AsyncIterator[RunningBroker]:
    port = int(config.listen.rsplit(":", 1)[1])
    broker = await build_broker(edit(config) if edit else config, clock, rng)
    broker.start()
    try:
        async with serving(broker.app, port):
            yield RunningBroker(broker, f"http://127.0.0.1:{port}", port)
    finally:
        await broker.close()


def agent_key(store_key: str) -> str:
    """The agent's own idempotency key in a store or ledger key (`<agent id>#<key>[#part]`)."""
    return store_key.split("#")[1]


def exhausted(body: dict[str, Any]) -> bpb.BudgetExhausted:
    """The BudgetExhausted detail of a Connect JSON error body (checked against its Denial)."""
    detail, _ = body["details"]
    assert detail["type"] == "ramp.broker.v1.BudgetExhausted"
    info = bpb.BudgetExhausted.FromString(base64.b64decode(detail["value"] + "=="))
    assert denial(body).budget == info
    return info


def denial(body: dict[str, Any]) -> bpb.Denial:
    """The Denial detail of a Connect JSON error body (every denial has exactly one)."""
    (found,) = [d for d in body["details"] if d["type"] == "ramp.broker.v1.Denial"]
    message = bpb.Denial.FromString(base64.b64decode(found["value"] + "=="))
    # The readable copy a curl user sees is the same message.
    assert found["debug"] == json_format.MessageToDict(message)
    return message
