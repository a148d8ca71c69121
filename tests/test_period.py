"""The per-period layer through the broker: scopes, authorization, limits, windows, replay.

The broker runs on loopback with the embedded SQLite store (the default) unless a
test says otherwise, against the reference Exchange, with an injected clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.app import open_store
from broker.config import BrokerConfig, StoreSetting
from common.clock import ManualClock
from ramp.broker.v1 import broker_pb2 as bpb
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    exhausted,
    running_broker,
)

A, B, C, EUR = "https://x.test/a", "https://x.test/b", "https://x.test/c", "https://x.test/eur"
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-secret"
# 23:59:59.999 on the last day of November, UTC.
EDGE = datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=UTC)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def limit(period: str, amount: str, currency: str = "USD") -> dict[str, str]:
    return {"period": period, "amount": amount, "currency": currency}


def period_config(
    exchange: Exchange, state: Path, *, store: dict[str, Any] | None = None,
    scopes: dict[str, Any] | None = None, **overrides: Any,
) -> BrokerConfig:
    default_scopes: dict[str, Any] = {
        "org:acme": {"limits": [limit("month", "100.00")]},
        "team:eng": {"limits": [limit("day", "10.00")]},
        "user:alice": {"limits": [limit("month", "6.00")]},
        "user:bob": {"limits": [limit("month", "20.00")]},
        "billing:alice": {"limits": [limit("month", "50.00")]},
    }
    return broker_config(
        [exchange],
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": store or {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / "journal.jsonl"),
            "accounts": {"acme": {"scopes": scopes if scopes is not None else default_scopes}},
        },
        agents=[
            {"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "billing_ref": "alice",
             "charged_to": ["user:alice", "team:eng", "org:acme"], "may_name": ["project:q4"]},
            {"id": "bob", "key_sha256": sha(BOB), "account": "acme",
             "charged_to": ["user:bob", "org:acme"]},
        ],
        admin={"token_env": "RAMP_TEST_ADMIN_TOKEN"},
        **overrides,
    )


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAMP_TEST_ADMIN_TOKEN", ADMIN)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 23, 12, 0, tzinfo=UTC))


@contextlib.asynccontextmanager
async def period_broker(
    exchange: Exchange, state: Path, clock: ManualClock, **kw: Any
) -> AsyncIterator[RunningBroker]:
    async with running_broker(period_config(exchange, state, **kw), clock) as b:
        yield b


@pytest.fixture(params=["embedded", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Every broker-level test runs on both stores."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return {"kind": "redis", "url": url, "key_prefix": f"t{uuid.uuid4().hex[:10]}"}
    return {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")}


@pytest.fixture
async def broker(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> AsyncIterator[RunningBroker]:
    async with period_broker(exchange, tmp_path, clock, store=store) as b:
        yield b


async def buy(
    b: RunningBroker, key: str, uris: list[str], *, api_key: str = ALICE, session: str = "s1",
    **constraints: Any,
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"sessionId": session, "idempotencyKey": key, "uris": uris}
    if constraints:
        body["constraints"] = constraints
    r = await b.post("BrokerService/Transact", body, api_key)
    return r.status_code, r.json()


def states(body: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Period budget states by (scope, period)."""
    return {(s["scope"], s.get("period", "")): s for s in body["budgets"]
            if s["layer"] == "BUDGET_LAYER_PERIOD"}


async def admin(b: RunningBroker, method: str, body: dict[str, Any], token: str = ADMIN) -> Any:
    return await b.post(f"BudgetAdminService/{method}", body, token)


async def store_rows(setting: dict[str, Any]) -> tuple[int, int]:
    """(counters, ledger entries) of account acme in a store."""
    store = await open_store(StoreSetting.model_validate(setting))
    try:
        counters = [c async for c in store.counters("acme")]
        ledger = [e async for e in store.ledger("acme")]
    finally:
        await store.close()
    return len(counters), len(ledger)


# --- charging every applicable scope -------------------------------------------------------------


async def test_a_purchase_is_charged_to_every_scope_of_the_agent(broker: RunningBroker) -> None:
    code, body = await buy(broker, "k1", [A])
    assert code == 200, body
    st = states(body)
    # Mandatory scopes plus the billing scope (no budget_scope named).
    assert set(st) == {("user:alice", "month"), ("team:eng", "day"), ("org:acme", "month"),
                       ("billing:alice", "month")}
    for s in st.values():
        assert s["spent"] == {"amount": "1.00", "currency": "USD"}
        assert s["reserved"]["amount"] == "0.00"
        assert s["failurePolicy"] == "closed"
    assert st[("team:eng", "day")]["periodStart"] == "2026-11-23T00:00:00Z"
    assert st[("team:eng", "day")]["periodEnd"] == "2026-11-24T00:00:00Z"
    assert st[("user:alice", "month")]["remaining"]["amount"] == "5.00"


async def test_period_exhaustion_is_denied_before_the_wire_with_numbers(
    broker: RunningBroker, exchange: Exchange
) -> None:
    assert (await buy(broker, "k1", [C]))[0] == 200  # user:alice 3 of 6
    assert (await buy(broker, "k2", [B]))[0] == 200  # 5 of 6
    code, body = await buy(broker, "k3", [B])
    assert code == 429
    d = exhausted(body)
    assert d.layer == bpb.BUDGET_LAYER_PERIOD
    assert d.scope == "user:alice"
    assert (d.limit.amount, d.spent.amount, d.remaining.amount) == ("6.00", "5.00", "1.00")
    assert d.estimated_cost.amount == "2.00"
    assert d.reason == "period_budget_exhausted"
    assert d.period_end.ToDatetime(UTC) == datetime(2026, 12, 1, tzinfo=UTC)
    assert "wait for the month period to reset" in d.next_action
    assert (await exchange.state())["execute_calls"] == 2


async def test_batch_is_pruned_to_the_tightest_period_budget(broker: RunningBroker) -> None:
    # user:alice has 6.00 a month: A+B+C = 6 fits, a second C does not.
    code, body = await buy(broker, "k1", [C, B])
    assert code == 200
    code, body = await buy(broker, "k2", [A, C])
    assert code == 200, body
    assert [i["uri"] for i in body["items"]] == [A]
    (dropped,) = body["dropped"]
    assert dropped["uri"] == C
    assert dropped["reason"] == "DROP_REASON_BUDGET"


async def test_all_or_none_across_scopes(broker: RunningBroker) -> None:
    # Bob is charged to user:bob (20) and org:acme (100); alice exhausts nothing of his, but
    # an org-wide limit of 1.00 set by an operator stops him, and nothing is held anywhere.
    r = await admin(broker, "SetPeriodLimit", {"scope": "org:acme", "period": "month",
                                                 "limit": {"amount": "1.00", "currency": "USD"}})
    assert r.status_code == 200, r.text
    code, body = await buy(broker, "k1", [B], api_key=BOB)
    assert code == 429
    assert exhausted(body).scope == "org:acme"
    r = await broker.post("BudgetService/GetBudgetStatus", {}, BOB)
    for s in r.json()["budgets"]:
        assert s.get("reserved", {}).get("amount", "0.00") in ("0.00", "0"), s
        assert s.get("spent", {}).get("amount", "0.00") in ("0.00", "0"), s


# --- authorization and scope validation ----------------------------------------------------------


async def test_requests_need_a_known_api_key(broker: RunningBroker) -> None:
    r = await broker.post("BrokerService/Transact", {"sessionId": "s", "idempotencyKey": "k", "uris": [A]})
    assert r.json()["code"] == "unauthenticated"
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s", "idempotencyKey": "k", "uris": [A]}, "wrong-key")
    assert r.json()["code"] == "unauthenticated"
    assert "wrong-key" not in r.text


async def test_naming_a_scope_not_granted_is_permission_denied(
    broker: RunningBroker, exchange: Exchange, store: dict[str, Any]
) -> None:
    code, body = await buy(broker, "k1", [A], budgetScope="user:bob")
    assert (code, body["code"]) == (403, "permission_denied")
    assert "constraints.budget_scope" in body["message"]
    code, body = await buy(broker, "k2", [A], api_key=BOB, budgetScope="project:q4")
    assert body["code"] == "permission_denied"
    assert (await exchange.state())["execute_calls"] == 0
    assert await store_rows(store) == (0, 0)


async def test_naming_a_granted_scope_charges_it_instead_of_the_billing_scope(
    broker: RunningBroker
) -> None:
    code, body = await buy(broker, "k1", [A], budgetScope="project:q4",
                           periodBudget={"amount": "5.00", "currency": "USD"},
                           budgetPeriod="2592000s")
    assert code == 200, body
    st = states(body)
    assert ("project:q4", "30d") in st
    assert ("billing:alice", "month") not in st
    assert st[("project:q4", "30d")]["limit"]["amount"] == "5.00"


BAD_SCOPES = [
    "user:{acme}", "user:al}ice", "user:a:b", "user:al ice", " user:alice", "user:" + "a" * 1024,
    "user:\u0430lice",  # Cyrillic a
    "user:alice\u200b", "user:alice\n", "USER:alice", "user:", ":alice", "user", "user:ali|ce",
    "user:alice*", "../../etc:passwd",
]


@pytest.mark.parametrize("scope", BAD_SCOPES)
async def test_malformed_scopes_are_invalid_and_write_nothing(
    broker: RunningBroker, exchange: Exchange, store: dict[str, Any], scope: str
) -> None:
    code, body = await buy(broker, "k1", [A], budgetScope=scope)
    assert (code, body["code"]) == (400, "invalid_argument"), body
    assert "constraints.budget_scope" in body["message"]
    assert (await exchange.state())["execute_calls"] == 0
    assert await store_rows(store) == (0, 0)


# --- a request's period budget only tightens ----------------------------------------------------------


async def test_request_period_budget_tightens(broker: RunningBroker) -> None:
    # billing:alice allows 50 a month; the request says 2.
    code, body = await buy(broker, "k1", [C], periodBudget={"amount": "2.00", "currency": "USD"})
    assert code == 429
    d = exhausted(body)
    assert (d.scope, d.limit.amount) == ("billing:alice", "2.00")


async def test_request_period_budget_cannot_raise(broker: RunningBroker) -> None:
    big = {"amount": "1000.00", "currency": "USD"}
    assert (await buy(broker, "k1", [C]))[0] == 200  # user:alice 3 of 6
    code, body = await buy(broker, "k2", [C], budgetScope="user:alice", periodBudget=big)
    assert code == 200, body
    assert states(body)[("user:alice", "month")]["limit"]["amount"] == "6.00"
    code, body = await buy(broker, "k3", [A], budgetScope="user:alice", periodBudget=big)
    assert code == 429
    assert (exhausted(body).scope, exhausted(body).limit.amount) == ("user:alice", "6.00")


async def test_budget_period_without_period_budget_is_invalid(broker: RunningBroker) -> None:
    _, body = await buy(broker, "k1", [A], budgetPeriod="3600s")
    assert body["code"] == "invalid_argument"
    assert "constraints.period_budget" in body["message"]
    _, body = await buy(broker, "k2", [A], periodBudget={"amount": "1.00", "currency": "USD"},
                           budgetPeriod="1.5s")
    assert body["code"] == "invalid_argument"
    assert "constraints.budget_period" in body["message"]


# --- windows, limits and credit ---------------------------------------------------------------------------


async def test_period_rollover_at_the_boundary(
    exchange: Exchange, tmp_path: Path, store: dict[str, Any]
) -> None:
    clock = ManualClock(EDGE)
    async with period_broker(exchange, tmp_path, clock, store=store,
                             scopes={"user:alice": {"limits": [limit("month", "3.00")]}}) as b:
        assert (await buy(b, "k1", [C]))[0] == 200  # 3 of 3 in November
        code, body = await buy(b, "k2", [A])
        assert code == 429
        assert exhausted(body).period_end.ToDatetime(UTC) == datetime(2026, 12, 1, tzinfo=UTC)
        clock.advance(0.001)  # 00:00:00.000 on 1 December: a new window
        code, body = await buy(b, "k3", [A])
        assert code == 200, body
        st = states(body)[("user:alice", "month")]
        assert st["spent"]["amount"] == "1.00"
        assert st["periodStart"] == "2026-12-01T00:00:00Z"


async def test_mid_period_limit_raise_takes_effect_on_the_next_reservation(
    broker: RunningBroker
) -> None:
    assert (await buy(broker, "k1", [C, B]))[0] == 200  # 5 of 6
    assert (await buy(broker, "k2", [B]))[0] == 429
    r = await admin(broker, "SetPeriodLimit", {"scope": "user:alice", "period": "month",
                                                 "limit": {"amount": "8.00", "currency": "USD"}})
    assert r.status_code == 200, r.text
    (st,) = r.json()["budgets"]
    assert (st["limit"]["amount"], st["spent"]["amount"]) == ("8.00", "5.00")
    code, body = await buy(broker, "k3", [B])
    assert code == 200, body
    assert states(body)[("user:alice", "month")]["spent"]["amount"] == "7.00"


async def test_credit_raises_only_the_current_window(
    exchange: Exchange, tmp_path: Path, store: dict[str, Any]
) -> None:
    clock = ManualClock(EDGE)
    async with period_broker(exchange, tmp_path, clock, store=store,
                             scopes={"user:alice": {"limits": [limit("month", "3.00")]}}) as b:
        assert (await buy(b, "k1", [C]))[0] == 200
        r = await admin(b, "AddCredit", {"scope": "user:alice", "period": "month",
                                          "amount": {"amount": "2.00", "currency": "USD"}})
        assert r.status_code == 200, r.text
        assert r.json()["budgets"][0]["limit"]["amount"] == "5.00"
        assert (await buy(b, "k2", [B]))[0] == 200
        clock.advance(1)
        code, body = await buy(b, "k3", [C])
        assert code == 200
        assert states(body)[("user:alice", "month")]["limit"]["amount"] == "3.00"


async def test_admin_api_needs_the_token(broker: RunningBroker) -> None:
    body = {"scope": "user:alice", "period": "month", "limit": {"amount": "999.00", "currency": "USD"}}
    assert (await admin(broker, "SetPeriodLimit", body, token="nope")).json()["code"] == "unauthenticated"
    assert (await admin(broker, "SetPeriodLimit", body, token=ALICE)).json()["code"] == "unauthenticated"
    r = await admin(broker, "GetScopeStatus", {"scope": "user:alice"})
    assert r.json()["budgets"][0]["limit"]["amount"] == "6.00"
    r = await admin(broker, "SetPeriodLimit", {"scope": "user:nobody", "period": "month",
                                                 "limit": {"amount": "1", "currency": "USD"}})
    assert r.json()["code"] == "not_found"
    r = await admin(broker, "SetPeriodLimit", {"scope": "user:alice", "period": "fortnight",
                                                 "limit": {"amount": "1", "currency": "USD"}})
    assert r.json()["code"] == "invalid_argument"
    assert "period" in r.json()["message"]


async def test_a_limit_changes_currency_only_between_windows(
    broker: RunningBroker, clock: ManualClock
) -> None:
    assert (await buy(broker, "k1", [A]))[0] == 200  # user:alice spent 1.00 USD this month
    eur = {"scope": "user:alice", "period": "month", "limit": {"amount": "6.00", "currency": "EUR"}}
    r = await admin(broker, "SetPeriodLimit", eur)
    assert r.json()["code"] == "failed_precondition", r.text
    assert "1.00 USD spent" in r.json()["message"]
    clock.advance(8 * 86400)  # 1 December: a new window, nothing spent in it yet
    r = await admin(broker, "SetPeriodLimit", eur)
    assert r.status_code == 200, r.text
    code, body = await buy(broker, "k2", [A])
    assert code == 200, body
    # 1.00 USD at EUR/USD 1.10, rounded up: in a counter of its own currency.
    assert states(body)[("user:alice", "month")]["spent"] == {"amount": "0.90909091", "currency": "EUR"}


async def test_clearing_a_limit_stops_enforcing_it(broker: RunningBroker) -> None:
    assert (await buy(broker, "k1", [C, B]))[0] == 200
    r = await admin(broker, "SetPeriodLimit", {"scope": "user:alice", "period": "month", "clear": True})
    assert r.status_code == 200, r.text
    assert r.json().get("budgets", []) == []
    assert (await buy(broker, "k2", [C]))[0] == 200


# --- idempotency through the store --------------------------------------------------------------------------


async def test_a_retry_on_another_broker_replays_and_charges_nothing(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    async with period_broker(exchange, tmp_path, clock, store=store) as first:
        code, body = await buy(first, "k1", [A, B])
        assert code == 200
    # A second broker process on the same store: its in-memory cache is empty.
    async with period_broker(exchange, tmp_path, clock, store=store) as second:
        code, again = await buy(second, "k1", [A, B])
        assert code == 200, again
        assert again["replayed"] is True
        assert again["items"] == body["items"]
        assert again["totalCost"] == body["totalCost"]
        code, other = await buy(second, "k1", [C])
        assert other["code"] == "invalid_argument"
        assert "idempotency_key" in other["message"]
    state = await exchange.state()
    assert state["execute_calls"] == 1
    assert await store_rows(store) == (4, 8)  # 4 counters, 2 items on each


async def test_a_retry_after_the_budget_ran_out_is_replayed_not_denied(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    scopes = {"user:alice": {"limits": [limit("month", "3.00")]}}
    async with period_broker(exchange, tmp_path, clock, store=store, scopes=scopes) as first:
        code, body = await buy(first, "k1", [C])  # the whole 3.00
        assert code == 200
    async with period_broker(exchange, tmp_path, clock, store=store, scopes=scopes) as second:
        code, again = await buy(second, "k1", [C])
        assert code == 200, again
        assert again["replayed"] is True
        assert again["items"] == body["items"]
        code, other = await buy(second, "k2", [C])
        assert code == 429
        assert exhausted(other).scope == "user:alice"
    assert (await exchange.state())["execute_calls"] == 1


async def test_budget_status_reports_every_scope(broker: RunningBroker) -> None:
    await buy(broker, "k1", [A])
    r = await broker.post("BudgetService/GetBudgetStatus", {"budgetScope": "project:q4"}, ALICE)
    assert r.status_code == 200, r.text
    scopes = {s["scope"] for s in r.json()["budgets"]}
    assert {"user:alice", "team:eng", "org:acme"} <= scopes
    r = await broker.post("BudgetService/GetBudgetStatus", {"budgetScope": "user:bob"}, ALICE)
    assert r.json()["code"] == "permission_denied"
    assert "budget_scope" in r.json()["message"]


# --- currencies --------------------------------------------------------------------------------


async def test_period_budget_in_another_currency_is_converted_against_the_spender(
    broker: RunningBroker
) -> None:
    code, body = await buy(broker, "k1", [A], budgetScope="project:q4",
                           periodBudget={"amount": "10.00", "currency": "EUR"},
                           budgetPeriod="86400s")
    assert code == 200, body
    st = states(body)[("project:q4", "1d")]
    # 1.00 USD at EUR/USD 1.10 is 0.909090909... EUR, rounded up.
    assert st["spent"] == {"amount": "0.90909091", "currency": "EUR"}


async def test_counters_in_two_currencies_each_hold_and_spend_the_price_in_their_own(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    """One purchase over counters in USD and in EUR: each holds, then spends, the price converted
    to its own currency (converted once per currency, so the amounts must not trade places). The
    EUR limit fits 1.00 USD (0.909 EUR), not a hold of 1.00 EUR."""
    scopes = {"user:alice": {"limits": [limit("month", "6.00")]},
              "team:eng": {"limits": [limit("day", "0.95", "EUR")]},
              "org:acme": {"limits": [limit("month", "100.00")]}}
    async with period_broker(exchange, tmp_path, clock, store=store, scopes=scopes) as b:
        code, body = await buy(b, "k1", [A])
        assert code == 200, body
        spent = {scope: st["spent"] for (scope, _), st in states(body).items()}
        assert spent == {"user:alice": {"amount": "1.00", "currency": "USD"},
                         "team:eng": {"amount": "0.90909091", "currency": "EUR"},
                         "org:acme": {"amount": "1.00", "currency": "USD"}}


async def test_missing_rates_deny_clearly(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    scopes = {"user:alice": {"limits": [limit("month", "10.00", "JPY")]}}
    async with period_broker(exchange, tmp_path, clock, store=store, scopes=scopes) as b:
        _, body = await buy(b, "k1", [A])
        assert body["code"] == "failed_precondition", body
        assert "JPY" in body["message"]
    assert (await exchange.state())["execute_calls"] == 0



async def test_daily_ecb_rates_convert_until_stale_then_deny_clearly(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    ecb = Path(__file__).parent / "data" / "eurofxref-daily.xml"  # rates of 2026-11-20
    scopes = {"user:alice": {"limits": [limit("month", "1000", "JPY")]}}
    async with period_broker(exchange, tmp_path, clock, store=store, scopes=scopes, rates={},
                             ecb_rates={"source": str(ecb), "max_age_hours": 96}) as b:
        code, body = await buy(b, "k1", [A])
        assert code == 200, body
        spent = states(body)[("user:alice", "month")]["spent"]
        assert spent["currency"] == "JPY"
        assert Decimal(spent["amount"]) > 0
        clock.advance(86400)  # 24 Nov 12:00: the 20 Nov rates are older than 4 days
        code, body = await buy(b, "k2", [A])
        assert (code, body["code"]) == (400, "failed_precondition"), body
        assert "2026-11-20" in body["message"]
        assert "older than" in body["message"]
    assert (await exchange.state())["execute_calls"] == 1


async def test_an_anonymous_sidecar_caller_is_charged_where_the_operator_says(
    exchange: Exchange, tmp_path: Path, clock: ManualClock, store: dict[str, Any]
) -> None:
    anonymous = {"account": "acme", "billing_ref": "alice", "charged_to": ["team:eng"]}
    async with period_broker(exchange, tmp_path, clock, store=store, anonymous=anonymous) as b:
        code, body = await buy(b, "k1", [A], api_key="")
        assert code == 200, body
        assert set(states(body)) == {("team:eng", "day"), ("billing:alice", "month")}
        # A wrong key is still refused, not treated as anonymous.
        code, body = await buy(b, "k2", [A], api_key="wrong")
        assert body["code"] == "unauthenticated"
