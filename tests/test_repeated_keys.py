"""What a repeated idempotency key gets, per scope kind and store state, across two brokers.

Real processes: two `ramp-broker serve` on one redis-server of the test's own (AOF, so a restart
keeps its data), the reference Exchange. A key is bought on broker A, then repeated on A and on B
(which never saw it) while the store is up, while it is down, and after it is back. The contract
(README, "A repeated key"): a replay never buys twice; with the store up every broker answers it
(`replayed: true`, strict and open scopes; a lease scope's other broker re-sends it to the
Exchange, which answers from its dedupe record); with the store down a broker answers only what
it knows itself, a closed scope's other broker says `store_unavailable` (nothing sent), and a
fail-open scope's other broker, which cannot tell a retry from a new purchase, buys under the
same key (charged once by the Exchange, counted once in the ledger). Afterwards every key is one
purchase: Exchange charges == ledger, and every broker replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import agent_key, denial, lasting_port
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    start_broker,
    start_exchange,
)
from tests.redis_server import RedisServer
from tests.test_crash_windows import Backend, purchased, read_store

ACCOUNT = "acme"
API_KEY = "repeat-alice-key"
A = "https://x.test/a"  # 1.00 USD


def config(exchange: Child, redis: RedisServer, kind: str) -> dict[str, Any]:
    scope: dict[str, Any] = {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}]}
    if kind == "open":
        scope |= {"failure": "open", "open_allowance": {"amount": "10.00", "currency": "USD"}}
    if kind == "lease":
        scope |= {"mode": "lease"}
    return broker_tree(
        exchange,
        listen=f"127.0.0.1:{lasting_port()}",
        metrics={"listen": f"127.0.0.1:{lasting_port()}"},
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000, "execute_timeout_ms": 500},
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis.url, "timeout_ms": 300},
            "reservation_ttl_seconds": 5, "sweep_interval_seconds": 0.2,
            "accounts": {ACCOUNT: {"scopes": {"user:alice": scope}}},
        },
        agents=[{"id": "alice", "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                 "account": ACCOUNT, "charged_to": ["user:alice"]}],
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["closed", "open", "lease"])
async def test_a_repeated_key_is_one_purchase_in_every_store_state(tmp_path: Path, kind: str) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(redis.start)
    try:
        async with contextlib.AsyncExitStack() as stack:
            exchange = await stack.enter_async_context(start_exchange(tmp_path, catalog_tree()))
            config_a = config(exchange, redis, kind)
            a = await stack.enter_async_context(start_broker(tmp_path, config_a, name="broker-a"))
            b = await stack.enter_async_context(start_broker(tmp_path, config(exchange, redis, kind),
                                                             name="broker-b"))
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=15.0))

            async def buy(broker: Child, key: str) -> httpx.Response:
                body = {"sessionId": "s", "idempotencyKey": key, "uris": [A]}
                return await connect_call(client, broker, "BrokerService/Transact", body, key=API_KEY)

            async def charges() -> int:
                return int((await exchange_state(client, exchange))["charges"])

            # --- store up: every broker answers the key, none buys it again.
            first = await buy(a, "up")
            assert first.status_code == 200, first.text
            again = await buy(a, "up")
            assert (again.status_code, again.json().get("replayed")) == (200, True), again.text
            other = await buy(b, "up")
            assert other.status_code == 200, other.text
            assert purchased(other.json()) == [(A, Decimal("1.00"))], other.text
            # Strict and open scopes: the store's answer. A lease scope's other broker does not look
            # the key up (no store call per purchase): the Exchange answers it from its dedupe record.
            assert other.json().get("replayed", False) is (kind != "lease"), other.text
            assert await charges() == 1

            # --- store down.
            await asyncio.to_thread(redis.kill)

            async def noticed() -> bool:
                r = await client.get(f"{b.url}/readyz")
                return r.status_code == 503 or kind == "open" or "store" in r.text
            await eventually(noticed, 10.0, "broker B notices the store is down")
            mine = await buy(a, "up")
            assert (mine.status_code, mine.json().get("replayed")) == (200, True), mine.text
            if kind == "closed":
                # B cannot look the key up, and sends nothing: a retry of the same key later is safe.
                unknown = await buy(b, "down-retry")
                assert (unknown.status_code, denial(unknown.json()).reason) == (503, "store_unavailable")
            bought_down = await buy(a, "down")
            if kind == "closed":
                assert (bought_down.status_code, denial(bought_down.json()).reason) == (
                    503, "store_unavailable"), bought_down.text
            else:
                # Open: A's allowance. Lease: A's lease, still usable for a while.
                assert bought_down.status_code == 200, bought_down.text
                assert (await buy(a, "down")).json().get("replayed") is True
                # B has never seen "down" and cannot ask the store: it buys it under the same key,
                # and the Exchange, which knows the key, charges nothing more.
                repeat = await buy(b, "down")
                assert repeat.status_code == 200, repeat.text
                assert purchased(repeat.json()) == [(A, Decimal("1.00"))], repeat.text
                assert repeat.json().get("replayed", False) is False
                # Bought on A alone; A restarted (same port: its journal), forgetting its answers
                # in memory: it still knows the key from its journal, and replays it.
                assert (await buy(a, "down-a")).status_code == 200
                await a.stop()
                a = await stack.enter_async_context(start_broker(tmp_path, config_a, name="broker-a"))
                restarted = await buy(a, "down-a")
                assert restarted.status_code == 200, restarted.text
                assert restarted.json().get("replayed") is True, restarted.text
                assert purchased(restarted.json()) == [(A, Decimal("1.00"))], restarted.text
            assert await charges() == (1 if kind == "closed" else 3)

            # --- store back: every key is one purchase, answered by every broker.
            await asyncio.to_thread(redis.start)
            keys = ["up"] if kind == "closed" else ["up", "down", "down-a"]
            backend = Backend("redis", tmp_path / "unused.sqlite3", redis)

            async def recorded() -> bool:
                view = await read_store(backend)
                return sorted({agent_key(e.idempotency_key) for e in view.ledger}) == sorted(keys) and \
                    view.reserved() == view.reserved("user:alice") and \
                    all(st.reserved == st.leased for _, st in view.counters.values())
            await eventually(recorded, 15.0, "every key is in the ledger, nothing held but leases")
            for key in keys:
                for broker in (a, b):
                    replay = await buy(broker, key)
                    assert replay.status_code == 200, (broker.name, key, replay.text)
                    assert purchased(replay.json()) == [(A, Decimal("1.00"))], (broker.name, key, replay.text)
            assert await charges() == len(keys)
            view = await read_store(backend)
            per_key: dict[str, Decimal] = {}
            for e in view.ledger:
                key = agent_key(e.idempotency_key)
                per_key[key] = per_key.get(key, Decimal(0)) + Decimal(e.original_amount)
            assert per_key == {key: Decimal("1.00") for key in keys}, view.ledger
    finally:
        await asyncio.to_thread(redis.stop)
