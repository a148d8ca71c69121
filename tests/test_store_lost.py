"""A store that lost its memory is noticed (design invariant 11), with real brokers and Redis.

Two `ramp-broker serve` processes share one redis-server; agents spend part of a month's
limit. Then the server loses everything: restarted without persistence, or FLUSHALL. From
then on no purchase is charged (every attempt is UNAVAILABLE `store_lost`, the Exchange sees
no purchase) until an operator runs `ramp-broker store adopt` with the brokers' memory files;
after that purchases resume and spend the rest, and no scope ends over its limit.
"""

from __future__ import annotations

import asyncio
import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from budget.stores.redis import RedisStore
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    run_cli,
    start_broker,
    start_exchange,
)
from tests.redis_server import RedisServer

ALICE, BOB = "alice-key", "bob-key"
ACCOUNT = "acme"
LIMIT = Decimal("10.00")  # a month, per user; every article costs 1.00
A = "https://x.test/a"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(exchange: Child, redis: RedisServer, tmp_path: Path, name: str) -> dict[str, Any]:
    return broker_tree(
        exchange,
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000, "execute_timeout_ms": 1000},
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis.url, "timeout_ms": 500},
            "reservation_ttl_seconds": 10, "sweep_interval_seconds": 0.2,
            "journal_path": str(tmp_path / f"journal-{name}.jsonl"),
            "memory_path": str(tmp_path / f"memory-{name}.json"),
            "accounts": {ACCOUNT: {"scopes": {
                "user:alice": {"limits": [{"period": "month", "amount": str(LIMIT), "currency": "USD"}]},
                "user:bob": {"limits": [{"period": "month", "amount": str(LIMIT), "currency": "USD"}]},
                # open: even a fail-open scope gets no allowance from a store that lost data
                "team:all": {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}],
                             "failure": "open", "open_allowance": {"amount": "50.00", "currency": "USD"}},
            }}},
        },
        agents=[
            {"id": "alice", "key_sha256": sha(ALICE), "account": ACCOUNT,
             "charged_to": ["user:alice", "team:all"]},
            {"id": "bob", "key_sha256": sha(BOB), "account": ACCOUNT, "charged_to": ["user:bob", "team:all"]},
        ],
    )


async def buy(client: httpx.AsyncClient, broker: Child, agent: str, key: str) -> httpx.Response:
    return await connect_call(client, broker, "BrokerService/Transact",
                              {"sessionId": "s", "idempotencyKey": key, "uris": [A]}, key=agent)


async def charges(client: httpx.AsyncClient, exchange: Child) -> int:
    return int((await exchange_state(client, exchange))["charges"])


async def spent(redis: RedisServer) -> dict[str, int]:
    """Each scope's spent (nano-units), and the ledger's sum per scope, straight from Redis."""
    store = await RedisStore.open(redis.url, timeout_ms=2000)
    try:
        counters = {ref.scope: state.spent async for ref, state in store.counters(ACCOUNT)}
        ledger: dict[str, int] = {}
        async for e in store.ledger(ACCOUNT):
            ledger[e.scope] = ledger.get(e.scope, 0) + e.amount
    finally:
        await store.close()
    assert counters == ledger, (counters, ledger)  # counters are derived, adoption included
    return counters


@pytest.mark.parametrize("loss", ["restart-empty", "flushall"])
async def test_a_store_that_lost_its_data_is_refused_until_adopted(tmp_path: Path, loss: str) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisServer(directory, appendonly=False)  # nothing kept across a restart
    await asyncio.to_thread(redis.start)
    try:
        async with start_exchange(tmp_path, catalog_tree()) as exchange, \
                start_broker(tmp_path, config(exchange, redis, tmp_path, "1"), name="broker-1") as b1, \
                start_broker(tmp_path, config(exchange, redis, tmp_path, "2"), name="broker-2") as b2, \
                httpx.AsyncClient(timeout=15.0) as client:
            # 6.00 of alice's 10.00 and 3.00 of bob's, across both brokers.
            for i in range(6):
                assert (await buy(client, (b1, b2)[i % 2], ALICE, f"a{i}")).status_code == 200
            for i in range(3):
                assert (await buy(client, (b2, b1)[i % 2], BOB, f"b{i}")).status_code == 200
            before = await charges(client, exchange)
            assert before == 9
            await asyncio.sleep(1.0)  # a few upkeep rounds: both brokers' memories are on disk

            if loss == "restart-empty":
                await asyncio.to_thread(redis.kill)
                await asyncio.to_thread(redis.start)
            else:
                store = await RedisStore.open(redis.url, timeout_ms=2000)
                try:
                    await store.client.flushall()
                finally:
                    await store.close()

            # Nothing is charged while the store is unadopted: not on either broker, not by
            # either agent, not even on the fail-open scope (no allowance for a lost store).
            for i in range(6):
                for broker in (b1, b2):
                    r = await buy(client, broker, (ALICE, BOB)[i % 2], f"lost-{broker.name}-{i}")
                    assert r.status_code == 503, r.text
                    assert r.json()["code"] == "unavailable"
                    (detail,) = [d for d in r.json()["details"] if d["type"] == "ramp.broker.v1.Denial"]
                    assert detail["debug"]["reason"] == "store_lost", detail
                    assert "lost data" in r.json()["message"]
            assert await charges(client, exchange) == before
            for broker in (b1, b2):
                assert "lost data" in broker.stderr

            adopted = await asyncio.to_thread(
                run_cli, ["store", "adopt", "--config", str(b1.config_path),
                          "--memory", str(tmp_path / "memory-1.json"),
                          "--memory", str(tmp_path / "memory-2.json")], tmp_path)
            assert adopted.returncode == 0, adopted.stdout + adopted.stderr

            # Purchases resume, from what was spent before (never from zero), to the limit.
            bought = {ALICE: 0, BOB: 0}
            for agent in (ALICE, BOB):
                for i in range(15):
                    r = await buy(client, (b1, b2)[i % 2], agent, f"after-{agent}-{i}")
                    if r.status_code == 503:  # a broker not yet past its next upkeep round
                        await asyncio.sleep(0.3)
                        continue
                    if r.status_code == 429:
                        break
                    assert r.status_code == 200, r.text
                    bought[agent] += 1
            assert bought == {ALICE: 4, BOB: 7}, bought
            # A commit refused by a broker still holding the store's old identity (answered: the
            # Exchange charged) is rolled forward by that broker's next upkeep round.
            full = int(LIMIT) * 10**9
            for _ in range(50):
                after = await spent(redis)
                if after["user:alice"] == after["user:bob"] == full:
                    break
                await asyncio.sleep(0.2)
            assert after["user:alice"] == after["user:bob"] == full, after
            assert await charges(client, exchange) == before + 11 == 20
    finally:
        await asyncio.to_thread(redis.stop)
