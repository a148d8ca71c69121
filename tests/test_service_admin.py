"""The admin API's reads: GetScopeHistory, and GetScopeStatus of every scope.

The broker runs in the test's event loop on loopback (tests/harness.py) with the
embedded store and an injected clock, against the reference Exchange.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker.rpc.service import HISTORY_DEFAULT, HISTORY_MAX
from budget.periods import Period, to_ms
from budget.stores.contract import CounterRef, Hold, Line
from common.clock import ManualClock
from tests.harness import Exchange, RunningBroker, broker_config, running_broker

A, B, C, EUR = "https://x.test/a", "https://x.test/b", "https://x.test/c", "https://x.test/eur"
ALICE, ADMIN, TOKEN_ENV = "alice-key", "admin-secret", "RAMP_TEST_ADMIN_TOKEN"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def limit(period: str, amount: str) -> dict[str, str]:
    return {"period": period, "amount": amount, "currency": "USD"}


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
async def broker(exchange: Exchange, tmp_path: Path, clock: ManualClock) -> AsyncIterator[RunningBroker]:
    config = broker_config(
        [exchange],
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
            "journal_path": str(tmp_path / "journal.jsonl"),
            "accounts": {
                "acme": {"scopes": {
                    "user:alice": {"limits": [limit("month", "500.00"), limit("day", "400.00")]},
                    "team:eng": {"limits": [limit("day", "300.00")]},
                    "project:idle": {},  # no limit: in no status
                }},
                "globex": {"scopes": {"org:globex": {"limits": [limit("week", "50.00")]}}},
            },
        },
        agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": "acme",
                 "charged_to": ["user:alice", "team:eng"]}],
        admin={"token_env": TOKEN_ENV},
    )
    async with running_broker(config, clock) as b:
        yield b


async def buy(b: RunningBroker, key: str, uris: list[str]) -> dict[str, Any]:
    r = await b.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": key, "uris": uris},
                     ALICE)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def history(b: RunningBroker, token: str = ADMIN, **body: Any) -> tuple[int, dict[str, Any]]:
    r = await b.post("BudgetAdminService/GetScopeHistory", body, token)
    result: dict[str, Any] = r.json()
    return r.status_code, result


async def test_history_is_the_newest_entries_oldest_first(broker: RunningBroker, clock: ManualClock) -> None:
    await buy(broker, "k1", [A])
    clock.advance(60)
    await buy(broker, "k2", [B, EUR])
    code, body = await history(broker, scope="user:alice", period="month")
    assert code == 200, body
    assert int(body["total"]) == 3
    entries = body["entries"]
    assert [e["uri"] for e in entries[:1]] == [A]
    assert {e["uri"] for e in entries[1:]} == {B, EUR}
    first = entries[0]
    assert first["committedAt"] == "2026-11-23T12:00:00Z"
    assert (first["scope"], first["period"], first["window"], first["kind"]) == (
        "user:alice", "month", "2026-11", "commit")
    assert first["amount"] == {"amount": "1.00", "currency": "USD"}
    assert (first["idempotencyKey"], first["exchange"], first["offerId"]) == ("alice#k1", "ref.test", "a")
    (eur,) = [e for e in entries if e["uri"] == EUR]
    # Charged 1.00 EUR; counted 1.10 USD at the configured EUR/USD rate.
    assert eur["original"] == {"amount": "1.00", "currency": "EUR"}
    assert eur["amount"] == {"amount": "1.10", "currency": "USD"}

    code, body = await history(broker, scope="user:alice", limit=2)  # every period: month and day
    assert code == 200, body
    assert int(body["total"]) == 6
    assert len(body["entries"]) == 2
    assert all(e["idempotencyKey"] == "alice#k2" for e in body["entries"])

    code, body = await history(broker, scope="team:eng", period="month")
    assert (code, body.get("entries", []), int(body.get("total", "0"))) == (200, [], 0)
    code, body = await history(broker, scope="team:eng", period="24h")  # not "day": a 1d duration
    assert (code, int(body.get("total", "0"))) == (200, 0)


async def test_history_limit_defaults_and_caps(broker: RunningBroker) -> None:
    b = broker.broker
    assert b.period is not None
    window = Period.parse("month", "period").window(NOW, ZoneInfo("UTC"))
    ref = CounterRef("user:alice", "month", window.id, "USD", window.start_ms, window.end_ms)
    hold = Hold(ref, 0, 0, window.end_ms)
    for i in range(HISTORY_DEFAULT + 5):
        line = Line(0, 1_000_000_000, "1.00", "USD", "ref.test", "a", f"https://x.test/{i}")
        assert await b.period.store.record_spend("acme", [hold], [line], idempotency_key=f"j{i}",
                                                 now_ms=to_ms(NOW), kind="journal")
    code, body = await history(broker, scope="user:alice")
    assert code == 200, body
    assert (len(body["entries"]), int(body["total"])) == (HISTORY_DEFAULT, HISTORY_DEFAULT + 5)
    assert body["entries"][-1]["uri"] == f"https://x.test/{HISTORY_DEFAULT + 4}"
    assert body["entries"][0]["uri"] == "https://x.test/5"
    assert body["entries"][0]["kind"] == "journal"
    code, body = await history(broker, scope="user:alice", limit=HISTORY_MAX)
    assert (code, len(body["entries"])) == (200, HISTORY_DEFAULT + 5)


@pytest.mark.parametrize("bad", [-1, HISTORY_MAX + 1, 2**31 - 1])
async def test_history_limit_out_of_range_names_the_field(broker: RunningBroker, bad: int) -> None:
    code, body = await history(broker, scope="user:alice", limit=bad)
    assert (code, body["code"]) == (400, "invalid_argument"), body
    assert body["message"].startswith(f"limit: {bad} is out of range"), body


async def test_history_refuses_bad_requests(broker: RunningBroker) -> None:
    code, body = await history(broker, scope="user:alice", period="fortnight")
    assert (code, body["code"]) == (400, "invalid_argument")
    assert body["message"].startswith("period: ")
    code, body = await history(broker, scope="user:nobody")
    assert body["code"] == "not_found", body
    code, body = await history(broker, scope="")
    assert body["code"] == "invalid_argument", body
    # The token is checked before anything else.
    code, body = await history(broker, token="wrong", scope="user:alice", limit=-1)
    assert (code, body["code"]) == (401, "unauthenticated"), body


async def test_status_of_every_scope_sorted(broker: RunningBroker) -> None:
    await buy(broker, "k1", [C])
    r = await broker.post("BudgetAdminService/GetScopeStatus", {}, ADMIN)
    assert r.status_code == 200, r.text
    got = [(s["scope"], s["period"], s["spent"]["amount"]) for s in r.json()["budgets"]]
    assert got == [
        ("org:globex", "week", "0.00"),
        ("team:eng", "day", "3.00"),
        ("user:alice", "day", "3.00"),
        ("user:alice", "month", "3.00"),
    ]
    r = await broker.post("BudgetAdminService/GetScopeStatus", {}, "wrong")
    assert r.json()["code"] == "unauthenticated"
    r = await broker.post("BudgetAdminService/GetScopeStatus", {"scope": "project:idle"}, ADMIN)
    assert (r.status_code, r.json().get("budgets", [])) == (200, [])
