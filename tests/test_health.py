"""grpc.health.v1 and GET /readyz (issue 14): NOT_SERVING while the broker cannot buy.

A grpcio health client (Check and Watch) follows the broker through a budget store outage
under a closed scope (the test's own redis-server, stopped and restarted on its port), every
Exchange going down and coming back, and the drain at shutdown; /readyz says the same.
Probes run every 0.1 s here, each bounded by 0.3 s; every wait below is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc

from reference_exchange.service import ReferenceExchange, reference_app
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    catalog,
    free_port,
    running_broker,
    running_exchange,
    serving,
)
from tests.processes import broker_tree, catalog_tree, start_broker, start_exchange
from tests.redis_server import RedisServer

SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = hpb.HealthCheckResponse.SERVICE_UNKNOWN
BROKER = "ramp.broker.v1.BrokerService"
BUDGET = "ramp.broker.v1.BudgetService"
ADMIN = "ramp.broker.v1.BudgetAdminService"
HEALTH = "grpc.health.v1.Health"
FAST = {"interval_seconds": 0.1, "timeout_ms": 300}
WAIT_S = 5.0
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs lacks it)


@contextlib.asynccontextmanager
async def health_client(b: RunningBroker) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)


async def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    answer = await stub.Check(hpb.HealthCheckRequest(service=service), timeout=WAIT_S)
    return int(answer.status)


async def until(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.05)


async def statuses(stub: health_pb2_grpc.HealthStub, *services: str) -> list[int]:
    return [await check(stub, s) for s in services]


async def readyz(b: RunningBroker) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        r = await client.get(f"{b.url}/readyz")
    body: dict[str, Any] = r.json()
    return r.status_code, body


async def next_status(watch: Any) -> int:
    message = await asyncio.wait_for(watch.read(), WAIT_S)
    assert message is not EOF, "the Watch stream ended"
    return int(message.status)


def limit(amount: str) -> dict[str, str]:
    return {"period": "day", "amount": amount, "currency": "USD"}


async def test_not_serving_while_the_store_is_down_under_a_closed_scope(
        exchange: Exchange, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    await asyncio.to_thread(redis.start)
    try:
        config = broker_config(
            [exchange], readiness=FAST,
            period_budgets={
                "store": {"kind": "redis", "url": redis.url, "timeout_ms": 200},
                "journal_path": str(tmp_path / "journal.jsonl"), "memory_path": str(tmp_path / "memory.json"),
                "accounts": {"acme": {"scopes": {"team:eng": {
                    "limits": [limit("5.00")], "failure": "closed"}}}},
            },
            anonymous={"account": "acme", "charged_to": ["team:eng"]},
        )
        async with running_broker(config) as b, health_client(b) as stub:
            await until("SERVING", lambda: _is(stub, "", SERVING))
            watch = stub.Watch(hpb.HealthCheckRequest(service=BROKER))
            try:
                assert await next_status(watch) == SERVING
                assert await statuses(stub, BROKER, BUDGET, ADMIN, HEALTH) == [SERVING] * 4
                assert await readyz(b) == (200, {"status": "ready"})

                await asyncio.to_thread(redis.stop)
                assert await next_status(watch) == NOT_SERVING
                assert await statuses(stub, "", BROKER, BUDGET, ADMIN) == [NOT_SERVING] * 4
                assert await check(stub, HEALTH) == SERVING
                code, body = await readyz(b)
                assert code == 503, body
                assert body["status"] == "not ready"
                assert body["reasons"] == [
                    "the budget store is unreachable: purchases charged to closed scopes are refused"]

                await asyncio.to_thread(redis.start)  # the same port
                assert await next_status(watch) == SERVING
                assert await statuses(stub, "", BROKER, BUDGET, ADMIN) == [SERVING] * 4
                assert await readyz(b) == (200, {"status": "ready"})
            finally:
                watch.cancel()
    finally:
        await asyncio.to_thread(redis.stop)


async def _is(stub: health_pb2_grpc.HealthStub, service: str, status: int) -> bool:
    return await check(stub, service) == status


async def test_an_open_scope_keeps_the_broker_serving_without_its_store(
        exchange: Exchange, tmp_path: Path) -> None:
    """Fail-open scopes buy from their allowance while the store is down: only the admin API,
    which is all store, stops."""
    redis = RedisServer(tmp_path)
    await asyncio.to_thread(redis.start)
    try:
        config = broker_config(
            [exchange], readiness=FAST,
            period_budgets={
                "store": {"kind": "redis", "url": redis.url, "timeout_ms": 200},
                "journal_path": str(tmp_path / "journal.jsonl"), "memory_path": str(tmp_path / "memory.json"),
                "accounts": {"acme": {"scopes": {"team:eng": {
                    "limits": [limit("5.00")], "failure": "open",
                    "open_allowance": {"amount": "1.00", "currency": "USD"}}}}},
            },
            anonymous={"account": "acme", "charged_to": ["team:eng"]},
        )
        async with running_broker(config) as b, health_client(b) as stub:
            await until("SERVING", lambda: _is(stub, "", SERVING))
            await asyncio.to_thread(redis.stop)
            await until("admin NOT_SERVING", lambda: _is(stub, ADMIN, NOT_SERVING))
            assert await statuses(stub, "", BROKER, BUDGET) == [SERVING] * 3
            assert (await readyz(b))[0] == 200
    finally:
        await asyncio.to_thread(redis.stop)


async def test_not_serving_while_every_exchange_is_down(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    cat = catalog()
    async with contextlib.AsyncExitStack() as exchange_up:
        ex = await exchange_up.enter_async_context(running_exchange(cat))
        port = int(ex.url.rsplit(":", 1)[1])
        dead_exchange = Exchange(ex.ref, f"http://127.0.0.1:{dead}", "dead.test")
        config = broker_config([ex, dead_exchange], readiness=FAST)
        async with running_broker(config) as b, health_client(b) as stub:
            await until("SERVING with one Exchange of two up", lambda: _is(stub, "", SERVING))
            watch = stub.Watch(hpb.HealthCheckRequest(service=""))
            try:
                assert await next_status(watch) == SERVING
                await exchange_up.aclose()  # the last live Exchange stops
                assert await next_status(watch) == NOT_SERVING
                assert await statuses(stub, BROKER, BUDGET) == [NOT_SERVING, SERVING]
                code, body = await readyz(b)
                assert code == 503, body
                (reason,) = body["reasons"]
                assert reason.startswith(
                    "every Exchange is down: dead.test (unreachable), ref.test ("), reason

                async with serving(reference_app(ReferenceExchange(cat)), port):  # back, same address
                    assert await next_status(watch) == SERVING
                    assert await readyz(b) == (200, {"status": "ready"})
            finally:
                watch.cancel()


async def test_unknown_services(broker: RunningBroker) -> None:
    async with health_client(broker) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check(stub, "no.such.Service")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(hpb.HealthCheckRequest(service="no.such.Service"))
        try:
            assert await next_status(watch) == SERVICE_UNKNOWN  # and the stream stays open
        finally:
            watch.cancel()
        listed = await stub.List(hpb.HealthListRequest(), timeout=WAIT_S)
        assert set(listed.statuses) == {"", BROKER, BUDGET, HEALTH, "grpc.reflection.v1.ServerReflection",
                                        "grpc.reflection.v1alpha.ServerReflection"}


async def test_draining_turns_everything_not_serving_and_ends_watch_streams(broker: RunningBroker) -> None:
    async with health_client(broker) as stub:
        await until("SERVING", lambda: _is(stub, "", SERVING))
        watch = stub.Watch(hpb.HealthCheckRequest(service=BROKER))
        assert await next_status(watch) == SERVING
        broker.broker.draining.set()  # what SIGTERM does in `ramp-broker serve`
        assert await next_status(watch) == NOT_SERVING
        assert await asyncio.wait_for(watch.read(), WAIT_S) is EOF
        assert await watch.code() == grpc.StatusCode.OK
        assert await statuses(stub, "", HEALTH) == [NOT_SERVING, NOT_SERVING]
        assert await readyz(broker) == (503, {"status": "not ready", "reasons": ["shutting down"]})


async def test_healthz_stays_liveness(broker: RunningBroker) -> None:
    broker.broker.draining.set()
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        r = await client.get(f"{broker.url}/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


async def test_sigterm_ends_watch_streams_and_the_broker_stops_within_its_grace(tmp_path: Path) -> None:
    """`ramp-broker serve`: SIGTERM turns every service NOT_SERVING and ends Watch streams, so
    they do not hold the shutdown up for the whole grace period."""
    grace = 8.0
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            start_broker(tmp_path, broker_tree(exchange, shutdown_grace_seconds=grace,
                                               readiness=FAST)) as child, \
            grpc.aio.insecure_channel(child.url.removeprefix("http://")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await until("SERVING", lambda: _is(stub, "", SERVING))
        watch = stub.Watch(hpb.HealthCheckRequest(service=""))
        assert await next_status(watch) == SERVING
        started = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        assert await next_status(watch) == NOT_SERVING
        assert await asyncio.wait_for(watch.read(), WAIT_S) is EOF
        code = await asyncio.wait_for(child.proc.wait(), grace + 5)
        assert code == 0, child.stderr
        assert time.monotonic() - started < grace / 2, child.stderr
        assert "Traceback" not in child.stderr, child.stderr
