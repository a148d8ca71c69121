"""`ramp-broker holds list|settle`: holds a killed broker left behind, seen and settled by an
operator through another broker's admin API. Real processes on loopback.

Broker 1 buys three articles from a reference Exchange that sleeps on every purchase, and is
SIGKILLed while the Exchange still holds them: its three holds (with their intents) stay in
the embedded store. Broker 2, on the same store, never takes them over (their TTL is long and
they are not its own), so the operator settles each one: retried, charged on their word,
refunded on their word.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.purchase.agents import Agent
from broker.purchase.order import exchange_key
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    run_cli,
    set_knobs,
    start_broker,
    start_exchange,
)

A, B, C = "https://x.test/a", "https://x.test/b", "https://x.test/c"  # 1.00, 2.00, 3.00 USD
ALICE = "alice-key"
TOKEN_ENV, TOKEN = "RAMP_HOLDS_TEST_ADMIN_TOKEN", "holds-admin-token"
# Long enough that neither broker's sweeper touches the holds during a test.
TTL_S = 300
# The Exchange sleeps this long on every purchase made before the kill (it is SIGKILLed at the end).
SLOW_MS = 120_000


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(exchange: Child, state: Path, *, journal: str) -> dict[str, Any]:
    return broker_tree(
        exchange,
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000, "execute_timeout_ms": 5000},
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / journal),
            "reservation_ttl_seconds": TTL_S,
            "sweep_interval_seconds": 0.2,
            "accounts": {"acme": {"scopes": {
                "user:alice": {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}]},
            }}},
        },
        agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "charged_to": ["user:alice"]}],
        admin={"token_env": TOKEN_ENV},
    )


def transact(key: str, uri: str) -> dict[str, Any]:
    return {"sessionId": "s1", "idempotencyKey": key, "uris": [uri]}


async def eventually_true(check: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Run:
    code: int
    out: str
    err: str


async def holds(broker: Child, *args: str) -> Run:
    result = await asyncio.to_thread(
        run_cli, ["holds", *args, "--broker", broker.url, "--token-env", TOKEN_ENV], Path.cwd(),
        {TOKEN_ENV: TOKEN})
    assert "Traceback" not in result.stderr, result.stderr
    return Run(result.returncode, result.stdout, result.stderr)


async def listed(broker: Child) -> dict[str, dict[str, Any]]:
    """`holds list --json`, by store key."""
    run = await holds(broker, "list", "--json")
    assert run.code == 0, run
    return {h["idempotencyKey"]: h for h in json.loads(run.out).get("holds", [])}


async def alice_month(client: httpx.AsyncClient, broker: Child) -> dict[str, Any]:
    r = await connect_call(client, broker, "BudgetAdminService/GetScopeStatus", {"scope": "user:alice"},
                           token=TOKEN)
    assert r.status_code == 200, r.text
    (state,) = r.json()["budgets"]
    result: dict[str, Any] = state
    return result


def money(state: dict[str, Any], name: str) -> Decimal:
    return Decimal(state.get(name, {}).get("amount", "0") or "0")


@pytest.fixture
async def stranded(tmp_path: Path) -> AsyncIterator[tuple[Child, Child]]:
    """(exchange, broker 2) after broker 1 was killed holding k1 (A), k2 (B), k3 (C)."""
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        try:
            async with httpx.AsyncClient(timeout=15.0) as client:
                await set_knobs(client, exchange, execute_latency_ms=SLOW_MS)
                async with start_broker(tmp_path, config(exchange, tmp_path, journal="j1.jsonl"),
                                        name="broker-1", env={TOKEN_ENV: TOKEN}) as b1:
                    buys = [asyncio.create_task(connect_call(client, b1, "BrokerService/Transact",
                                                             transact(k, uri), key=ALICE))
                            for k, uri in (("k1", A), ("k2", B), ("k3", C))]
                    try:
                        async def at_exchange() -> bool:
                            return int((await exchange_state(client, exchange))["execute_calls"]) >= 3
                        await eventually_true(at_exchange, 15.0, "the purchases reach the Exchange")
                        assert await b1.kill() == -9
                        await asyncio.gather(*buys, return_exceptions=True)
                    finally:
                        for task in buys:
                            task.cancel()
                await set_knobs(client, exchange, execute_latency_ms=0)
            async with start_broker(tmp_path, config(exchange, tmp_path, journal="j2.jsonl"),
                                    name="broker-2", env={TOKEN_ENV: TOKEN}) as b2:
                yield exchange, b2
        finally:
            await exchange.kill()  # its sleeping purchases need no graceful end


async def test_list_shows_each_hold_with_its_intent(stranded: tuple[Child, Child]) -> None:
    _, broker = stranded
    found = await listed(broker)
    assert sorted(found) == ["alice#k1", "alice#k2", "alice#k3"]
    k2 = found["alice#k2"]
    assert k2["account"] == "acme"
    assert k2["reservationId"]
    assert k2["owner"]
    assert k2["createdAt"] < k2["expiresAt"]
    (part,) = k2["parts"]
    assert part["exchange"] == "ref.test"
    assert part["exchangeKey"] == exchange_key(Agent("alice"), "k2")
    assert part["items"] == [{"uri": B, "offerId": "b", "quoted": {"amount": "2.00", "currency": "USD"}}]
    assert not part.get("done", False)
    (held,) = part["holds"]
    assert (held["scope"], held["period"], held["amount"]) == (
        "user:alice", "month", {"amount": "2.00", "currency": "USD"})

    table = await holds(broker, "list")
    assert table.code == 0, table
    for h in found.values():
        assert h["reservationId"] in table.out
    assert "alice#k1" in table.out
    assert "b https://x.test/b 2.00 USD" in table.out
    assert "user:alice month 3.00 USD" in table.out
    assert "3 open holds with an intent" in table.out

    # Filters: by scope (acme's only scope), by account, and an unknown account.
    assert len(json.loads((await holds(broker, "list", "--json", "--scope", "user:alice")).out)["holds"]) == 3
    assert len(json.loads((await holds(broker, "list", "--json", "--account", "acme")).out)["holds"]) == 3
    unknown = await holds(broker, "list", "--account", "nope")
    assert unknown.code == 1, unknown
    assert "account 'nope' is not configured" in unknown.err, unknown


async def test_settle_retry_charged_refunded(stranded: tuple[Child, Child]) -> None:
    exchange, broker = stranded
    found = await listed(broker)
    rid = {key: h["reservationId"] for key, h in found.items()}
    async with httpx.AsyncClient(timeout=15.0) as client:
        before = await alice_month(client, broker)
        assert (money(before, "spent"), money(before, "reserved")) == (Decimal(0), Decimal(6))

        # RETRY: the Exchange answers now (it never charged k1 before): committed as it says.
        run = await holds(broker, "settle", rid["alice#k1"], "--account", "acme", "--retry")
        assert run.code == 0, run
        assert f"hold {rid['alice#k1']}: settled: rolled forward" in run.out
        assert "1 of 1 item(s) charged, 1.00 USD in all" in run.out
        state = await exchange_state(client, exchange)
        assert state["charges"] == 1

        # RETRY while the Exchange fails (both tries): still unsettled, exit 1, nothing changed.
        await set_knobs(client, exchange, fail_execute=2)
        run = await holds(broker, "settle", rid["alice#k2"], "--account", "acme", "--retry")
        assert run.code == 1, run
        assert f"hold {rid['alice#k2']}: unsettled: an Exchange still did not answer" in run.err
        assert "alice#k2" in await listed(broker)

        # CHARGED: the operator's word: the quote is committed as spent, nothing asked.
        calls = int((await exchange_state(client, exchange))["execute_calls"])
        run = await holds(broker, "settle", rid["alice#k2"], "--account", "acme", "--charged", "--json")
        assert run.code == 0, run
        body = json.loads(run.out)
        assert body["outcome"] == "SETTLE_OUTCOME_SETTLED"
        assert body["totalCost"] == {"amount": "2.00", "currency": "USD"}
        (item,) = body["items"]
        assert (item["status"], item["result"]["cost"]["amount"]) == ("ITEM_STATUS_PURCHASED", "2.00")
        assert int((await exchange_state(client, exchange))["execute_calls"]) == calls

        # REFUNDED: nothing was charged: the hold goes back whole.
        run = await holds(broker, "settle", rid["alice#k3"], "--account", "acme", "--refunded")
        assert run.code == 0, run
        assert "refunded: nothing was charged" in run.out

        after = await alice_month(client, broker)
        assert (money(after, "spent"), money(after, "reserved")) == (Decimal(3), Decimal(0))
        assert await listed(broker) == {}
        assert "0 open holds" in (await holds(broker, "list")).out

        # Settled already: not found, exit 1.
        again = await holds(broker, "settle", rid["alice#k3"], "--account", "acme", "--charged")
        assert again.code == 1, again
        assert "not found" in again.err

        # The agent's retry of k2 is answered from what the operator settled, charging nothing.
        r = await connect_call(client, broker, "BrokerService/Transact", transact("k2", B), key=ALICE)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["replayed"] is True
        assert [i["status"] for i in answer["items"]] == ["ITEM_STATUS_PURCHASED"]
        assert (await exchange_state(client, exchange))["charges"] == 1

    # Every operator settlement is a WARNING naming the action.
    for action in ("retry", "charged", "refunded"):
        assert f"operator settlement ({action}) of hold" in broker.stderr, broker.stderr[-3000:]
    assert "WARNING" in broker.stderr


async def test_settle_usage_errors(stranded: tuple[Child, Child]) -> None:
    _, broker = stranded
    for args in (["settle", "r1", "--account", "acme"],  # no action
                 ["settle", "r1", "--retry"],  # no account
                 ["settle", "r1", "--account", "acme", "--retry", "--charged"]):
        run = await holds(broker, *args)
        assert run.code == 2, (args, run)
        assert "usage: ramp-broker holds settle" in run.err
    bad = await holds(broker, "settle", "r1", "--account", "no such", "--retry")
    assert bad.code == 1, bad
    assert "(invalid_argument)" in bad.err, bad
