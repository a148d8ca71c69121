"""ListHolds and SettleHold on purchases split over two Exchanges, one of which never answered.

The broker runs in the test's event loop (tests/harness.py) with the embedded store; Exchange
"ref.test" sells A, B, C and answers, Exchange "two.test" sells Z and fails both tries of each
purchase (an ambiguous UNAVAILABLE), so every purchase of [x, Z] commits its ref.test part and
leaves the two.test part held with its intent, until an operator settles it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Exchange, RunningBroker, broker_config, catalog, running_broker, running_exchange

A, B, C, Z = "https://x.test/a", "https://x.test/b", "https://x.test/c", "https://y.test/z"
ALICE, ADMIN, TOKEN_ENV = "alice-key", "admin-secret", "RAMP_TEST_HOLDS_ADMIN_TOKEN"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN)


@pytest.fixture
async def two() -> AsyncIterator[Exchange]:
    cat = catalog(exchange="two.test", accounts={"ramp-broker": {"USD": "100.00"}},
                  offers=[{"uri": Z, "offer_id": "z", "rate": "5.00", "currency": "USD"}])
    async with running_exchange(cat) as ex:
        yield ex


@pytest.fixture
async def broker(exchange: Exchange, two: Exchange, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    config = broker_config(
        [exchange, two],
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
            "journal_path": str(tmp_path / "journal.jsonl"),
            # No sweeper round after the first: the holds stay for the operator.
            "sweep_interval_seconds": 3600,
            "accounts": {"acme": {"scopes": {
                "user:alice": {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}]}}}},
        },
        agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "charged_to": ["user:alice"]}],
        admin={"token_env": TOKEN_ENV},
    )
    async with running_broker(config) as b:
        yield b


async def half_bought(b: RunningBroker, two: Exchange, key: str, uri: str) -> dict[str, Any]:
    """Buy [uri, Z] under `key` while two.test fails: the Z part stays held."""
    two.ref.knobs.fail_execute = 2
    r = await b.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": key, "uris": [uri, Z]},
                     ALICE)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert sorted(i["status"] for i in body["items"]) == ["ITEM_STATUS_PURCHASED", "ITEM_STATUS_UNKNOWN"]
    return body


async def admin(b: RunningBroker, method: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await b.post(f"BudgetAdminService/{method}", body, ADMIN)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def hold_of(b: RunningBroker, key: str) -> dict[str, Any]:
    holds: list[dict[str, Any]] = (await admin(b, "ListHolds", {})).get("holds", [])
    (found,) = [h for h in holds if h["idempotencyKey"] == key]
    return found


async def alice(b: RunningBroker) -> tuple[int, int]:
    """user:alice's (spent, reserved), in whole dollars (every price here is whole)."""
    (state,) = (await admin(b, "GetScopeStatus", {"scope": "user:alice"}))["budgets"]
    spent, reserved = Decimal(state["spent"]["amount"]), Decimal(state["reserved"]["amount"])
    assert spent % 1 == 0, state
    assert reserved % 1 == 0, state
    return int(spent), int(reserved)


async def settle(b: RunningBroker, rid: str, action: str) -> dict[str, Any]:
    return await admin(b, "SettleHold", {"account": "acme", "reservationId": rid,
                                         "action": f"SETTLE_ACTION_{action}"})


async def test_a_half_done_hold_shows_its_parts(broker: RunningBroker, two: Exchange) -> None:
    await half_bought(broker, two, "k1", A)
    hold = await hold_of(broker, "alice#k1")
    parts = {p["exchange"]: p for p in hold["parts"]}
    assert parts["ref.test"].get("done") is True
    assert not parts["two.test"].get("done", False)
    z = parts["two.test"]
    assert z["items"] == [{"uri": Z, "offerId": "z", "quoted": {"amount": "5.00", "currency": "USD"}}]
    assert [(h["scope"], h["amount"]["amount"]) for h in z["holds"]] == [("user:alice", "5.00")]
    # The done part is spent, the other still held.
    assert await alice(broker) == (1, 5)

    r = await broker.post("BudgetAdminService/ListHolds", {})  # no token
    assert r.status_code == 401, r.text
    r = await broker.post("BudgetAdminService/SettleHold", {"account": "acme", "reservationId": "x"}, ADMIN)
    assert r.status_code == 400, r.text
    assert "action" in r.json()["message"], r.text


async def test_refunded_with_a_part_done_ends_the_hold_with_no_lines(
    broker: RunningBroker, two: Exchange
) -> None:
    await half_bought(broker, two, "k1", A)
    rid = (await hold_of(broker, "alice#k1"))["reservationId"]
    answer = await settle(broker, rid, "REFUNDED")
    assert answer["outcome"] == "SETTLE_OUTCOME_SETTLED", answer
    assert answer["totalCost"] == {"amount": "1.00", "currency": "USD"}
    statuses = {i["uri"]: i["status"] for i in answer["items"]}
    assert statuses == {A: "ITEM_STATUS_PURCHASED", Z: "ITEM_STATUS_FAILED"}
    assert await alice(broker) == (1, 0)
    assert (await admin(broker, "ListHolds", {})).get("holds", []) == []
    assert two.ref.charges == 0

    # The key's stored answer is the operator's: a retry replays it.
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A, Z]}, ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is True
    assert {i["uri"]: i["status"] for i in r.json()["items"]} == statuses


async def test_charged_and_retry_on_a_half_done_hold(broker: RunningBroker, two: Exchange) -> None:
    await half_bought(broker, two, "k2", B)
    await half_bought(broker, two, "k3", C)
    assert await alice(broker) == (5, 10)
    charged = await settle(broker, (await hold_of(broker, "alice#k2"))["reservationId"], "CHARGED")
    assert charged["outcome"] == "SETTLE_OUTCOME_SETTLED", charged
    assert charged["totalCost"] == {"amount": "7.00", "currency": "USD"}
    assert await alice(broker) == (10, 5)
    assert two.ref.charges == 0  # the operator's word only

    # two.test answers now: the retry buys Z under k3's key and commits what it charged.
    retried = await settle(broker, (await hold_of(broker, "alice#k3"))["reservationId"], "RETRY")
    assert retried["outcome"] == "SETTLE_OUTCOME_SETTLED", retried
    assert retried["totalCost"] == {"amount": "8.00", "currency": "USD"}
    assert two.ref.charges == 1
    assert await alice(broker) == (15, 0)

    history = await admin(broker, "GetScopeHistory", {"scope": "user:alice"})
    lines = sorted((e["idempotencyKey"], e["offerId"], e["amount"]["amount"]) for e in history["entries"])
    assert lines == [("alice#k2", "b", "2.00"), ("alice#k2", "z", "5.00"),
                     ("alice#k3", "c", "3.00"), ("alice#k3", "z", "5.00")]

    gone = await settle(broker, "no-such-hold", "RETRY")
    assert gone["outcome"] == "SETTLE_OUTCOME_NOT_FOUND", gone
