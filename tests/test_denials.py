"""Every kind of denial explains itself: a stable reason, the layer and scope, the numbers, and
what to do next, as a `Denial` Connect error detail (budget denials also carry `BudgetExhausted`).

Each case runs through a real broker on loopback and reads the Connect JSON error body field by
field; nothing denied here reaches an Exchange's execute call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from common.clock import ManualClock
from ramp.broker.v1 import broker_pb2 as bpb
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    denial,
    exhausted,
    free_port,
    running_broker,
)
from tests.redis_server import redis_server
from tests.test_period import ADMIN, ALICE, A, B, C, admin, buy, limit, period_config

NOV_23 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEC_1 = "2026-12-01T00:00:00Z"


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAMP_TEST_ADMIN_TOKEN", ADMIN)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOV_23)


@contextlib.asynccontextmanager
async def period_broker(exchange: Exchange, tmp_path: Path, clock: ManualClock,
                        **kw: Any) -> AsyncIterator[RunningBroker]:
    async with running_broker(period_config(exchange, tmp_path, **kw), clock) as b:
        yield b


@pytest.fixture
async def broker(exchange: Exchange, tmp_path: Path, clock: ManualClock) -> AsyncIterator[RunningBroker]:
    async with period_broker(exchange, tmp_path, clock) as b:
        yield b


def ts(message: Any) -> str:
    return str(message.ToJsonString())


async def declare(b: RunningBroker, session: str, amount: str, currency: str = "USD") -> dict[str, Any]:
    r = await b.post("BudgetService/DeclareSessionBudget",
                     {"sessionId": session, "limit": {"amount": amount, "currency": currency}}, ALICE)
    body: dict[str, Any] = r.json()
    return body


# --- budget layers -------------------------------------------------------------------------------


async def test_transaction_cap(broker: RunningBroker, exchange: Exchange) -> None:
    code, body = await buy(broker, "k1", [C], maxPrice={"amount": "2.50", "currency": "USD"})
    assert (code, body["code"]) == (429, "resource_exhausted")
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("transaction_cap_exceeded", bpb.DENIAL_LAYER_TRANSACTION,
                                            "max_price")
    assert "max_price" in d.next_action
    assert not d.HasField("retry_at")
    info = exhausted(body)
    assert (info.limit.amount, info.estimated_cost.amount, info.spent.amount) == ("2.50", "3.00", "0.00")
    assert (await exchange.state())["execute_calls"] == 0


async def test_session_budget(broker: RunningBroker, exchange: Exchange) -> None:
    await declare(broker, "s9", "1.50")
    assert (await buy(broker, "k1", [A], session="s9"))[0] == 200
    code, body = await buy(broker, "k2", [B], session="s9")
    assert code == 429
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("session_budget_exhausted", bpb.DENIAL_LAYER_SESSION, "s9")
    assert "raise the session budget" in d.next_action
    assert not d.HasField("retry_at")  # a session never resets on its own
    b = d.budget
    assert (b.layer, b.limit.amount, b.spent.amount, b.reserved.amount, b.remaining.amount,
            b.estimated_cost.amount) == (bpb.BUDGET_LAYER_SESSION, "1.50", "1.00", "0.00", "0.50", "2.00")
    assert b.mode == bpb.ENFORCEMENT_MODE_STRICT
    assert (await exchange.state())["execute_calls"] == 1


async def test_period_budget_says_when_it_resets(broker: RunningBroker, exchange: Exchange) -> None:
    # user:alice has 6.00 a month: 3 + 2 leave 1.00, so another 3.00 article is refused.
    assert (await buy(broker, "k1", [C]))[0] == 200
    assert (await buy(broker, "k2", [B]))[0] == 200
    code, body = await buy(broker, "k3", [C])
    assert code == 429
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("period_budget_exhausted", bpb.DENIAL_LAYER_PERIOD, "user:alice")
    assert ts(d.retry_at) == DEC_1
    assert f"reset at {datetime(2026, 12, 1, tzinfo=UTC).isoformat()}" in d.next_action
    assert "user:alice" in d.next_action
    b = d.budget
    assert (b.limit.amount, b.spent.amount, b.reserved.amount, b.remaining.amount,
            b.estimated_cost.amount, b.limit.currency) == ("6.00", "5.00", "0.00", "1.00", "3.00", "USD")
    assert ts(b.period_end) == DEC_1
    assert (await exchange.state())["execute_calls"] == 2


# --- authorization -------------------------------------------------------------------------------


async def test_missing_and_unknown_keys(broker: RunningBroker) -> None:
    for key in (None, "not-a-key"):
        r = await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]}, key)
        assert r.status_code == 401
        d = denial(r.json())
        assert (d.reason, d.layer) == ("unauthenticated", bpb.DENIAL_LAYER_AUTHORIZATION)
        assert "authorization: Bearer" in d.next_action


async def test_scope_not_granted(broker: RunningBroker) -> None:
    code, body = await buy(broker, "k1", [A], budgetScope="user:bob")
    assert (code, body["code"]) == (403, "permission_denied")
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("scope_not_granted", bpb.DENIAL_LAYER_AUTHORIZATION, "user:bob")
    assert "may_name" in d.next_action


async def test_admin_token_wrong_and_admin_api_off(
    broker: RunningBroker, exchange: Exchange, tmp_path: Path, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = await admin(broker, "GetScopeStatus", {"scope": "user:alice"}, token="wrong")
    assert r.status_code == 401
    d = denial(r.json())
    assert (d.reason, d.layer) == ("admin_token_invalid", bpb.DENIAL_LAYER_AUTHORIZATION)
    monkeypatch.delenv("RAMP_TEST_ADMIN_TOKEN")
    async with period_broker(exchange, tmp_path / "off", clock) as off:
        r = await admin(off, "GetScopeStatus", {"scope": "user:alice"})
    assert r.status_code == 403
    d = denial(r.json())
    assert (d.reason, d.layer, d.scope) == ("admin_api_disabled", bpb.DENIAL_LAYER_AUTHORIZATION, "admin")
    assert "admin.token_env" in d.next_action


# --- the store -----------------------------------------------------------------------------------


async def test_store_unavailable_names_the_closed_scopes(
    exchange: Exchange, tmp_path: Path, clock: ManualClock
) -> None:
    with redis_server() as server:
        store = {"kind": "redis", "url": server.url, "timeout_ms": 200}
        async with period_broker(exchange, tmp_path, clock, store=store) as b:
            assert (await buy(b, "k1", [A]))[0] == 200
            server.kill()
            code, body = await buy(b, "k2", [A])
    assert (code, body["code"]) == (503, "unavailable")
    d = denial(body)
    assert (d.reason, d.layer) == ("store_unavailable", bpb.DENIAL_LAYER_STORE)
    assert d.scope == "billing:alice,org:acme,team:eng,user:alice"
    assert "retry" in d.next_action
    assert (await exchange.state())["execute_calls"] == 1


# --- exchanges -----------------------------------------------------------------------------------


async def test_no_exchange_answered(tmp_path: Path, clock: ManualClock) -> None:
    down = Exchange(None, f"http://127.0.0.1:{free_port()}", "down.test")  # type: ignore[arg-type]
    async with period_broker(down, tmp_path, clock) as b:
        code, body = await buy(b, "k1", [A])
    assert (code, body["code"]) == (503, "unavailable")
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("exchange_unavailable", bpb.DENIAL_LAYER_EXCHANGE, "down.test")
    (call,) = d.exchanges
    assert (call.exchange, call.outcome) == ("down.test", bpb.ExchangeCall.OUTCOME_ERROR)
    assert d.next_action


async def test_no_offers_and_no_offer_meeting_constraints(broker: RunningBroker) -> None:
    code, body = await buy(broker, "k1", ["https://x.test/nothing"])
    assert (code, body["code"]) == (404, "not_found")
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("no_offers", bpb.DENIAL_LAYER_EXCHANGE, "ref.test")
    assert [c.outcome for c in d.exchanges] == [bpb.ExchangeCall.OUTCOME_OK]

    code, body = await buy(broker, "k2", [A], reportingCapable=True)
    assert (code, body["code"]) == (400, "failed_precondition")
    d = denial(body)
    assert (d.reason, d.layer) == ("no_offer_meets_constraints", bpb.DENIAL_LAYER_TRANSACTION)
    assert "relax the constraints" in d.next_action


# --- sessions, currencies, operators -------------------------------------------------------------


async def test_session_without_budget_and_locked_currency(
    exchange: Exchange, tmp_path: Path, clock: ManualClock
) -> None:
    config = broker_config([exchange])  # no default session limit
    async with running_broker(config, clock) as b:
        r = await b.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})
        d = denial(r.json())
        assert (r.status_code, d.reason, d.layer, d.scope) == (
            400, "session_has_no_budget", bpb.DENIAL_LAYER_SESSION, "s1")
        assert "DeclareSessionBudget" in d.next_action
        await b.post("BudgetService/DeclareSessionBudget",
                     {"sessionId": "s1", "limit": {"amount": "5", "currency": "USD"}})
        r = await b.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})
        assert r.status_code == 200
        r = await b.post("BudgetService/DeclareSessionBudget",
                         {"sessionId": "s1", "limit": {"amount": "5", "currency": "EUR"}})
        d = denial(r.json())
        assert (r.status_code, d.reason, d.layer, d.scope) == (
            400, "session_currency_locked", bpb.DENIAL_LAYER_SESSION, "s1")


async def test_missing_conversion_rate(exchange: Exchange, tmp_path: Path, clock: ManualClock) -> None:
    scopes = {"user:alice": {"limits": [limit("month", "10.00", "JPY")]}}
    async with period_broker(exchange, tmp_path, clock, scopes=scopes) as b:
        code, body = await buy(b, "k1", [A])
    assert (code, body["code"]) == (400, "failed_precondition")
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == (
        "conversion_rate_unavailable", bpb.DENIAL_LAYER_CURRENCY, "currency")
    assert "rates" in d.next_action
    assert (await exchange.state())["execute_calls"] == 0


async def test_limit_currency_change_refused(broker: RunningBroker) -> None:
    assert (await buy(broker, "k1", [A]))[0] == 200
    r = await admin(broker, "SetPeriodLimit", {"scope": "user:alice", "period": "month",
                                               "limit": {"amount": "9", "currency": "EUR"}})
    assert r.status_code == 400
    d = denial(r.json())
    assert (d.reason, d.layer, d.scope) == ("limit_change_refused", bpb.DENIAL_LAYER_PERIOD, "user:alice")


async def test_denials_are_counted_by_layer_and_reason(broker: RunningBroker) -> None:
    await buy(broker, "k1", [C], maxPrice={"amount": "1", "currency": "USD"})
    await buy(broker, "k2", [A], budgetScope="user:bob")
    registry = broker.broker.metrics.registry
    assert registry.get_sample_value(
        "broker_denials_total", {"layer": "transaction", "reason": "transaction_cap_exceeded"}) == 1
    assert registry.get_sample_value(
        "broker_denials_total", {"layer": "authorization", "reason": "scope_not_granted"}) == 1
    assert registry.get_sample_value("broker_budget_exhausted_total", {"layer": "transaction"}) == 1
    assert registry.get_sample_value("broker_budget_exhausted_total", {"layer": "period"}) == 0


# --- "may be charged": retry the same key ------------------------------------------------------------


async def test_a_failure_after_the_exchange_was_asked_says_the_purchase_may_be_charged(
    broker: RunningBroker, exchange: Exchange, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Something fails in the broker after the Exchange charged (here: reading its answer). The
    agent must not hear a generic error it could take for "nothing happened" and retry under a new
    key: it hears ABORTED `outcome_pending`. A retry of the same key is in flight until the hold is
    rolled forward, then answered with the purchase, charged once."""
    from broker.purchase.execute import Buyer

    real = Buyer._outcome
    failures = [RuntimeError("a bug after the Exchange answered")]

    def outcome_or_bug(self: Buyer, *args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(self, *args)

    monkeypatch.setattr(Buyer, "_outcome", outcome_or_bug)
    code, body = await buy(broker, "k-bug", [A])
    assert (code, body["code"]) == (409, "aborted"), body
    d = denial(body)
    assert (d.reason, d.layer, d.scope) == ("outcome_pending", bpb.DENIAL_LAYER_EXCHANGE, "k-bug"), d
    assert "same idempotency key" in d.next_action
    assert "may already be charged" in d.next_action
    assert "a bug" not in body["message"]  # no internal text
    assert (await exchange.state())["charges"] == 1

    # Retried at once: the hold is not yet handed over to anyone (its TTL runs).
    code, body = await buy(broker, "k-bug", [A])
    assert (code, denial(body).reason) == (409, "idempotency_key_in_flight"), body
    assert "may already be charged" in denial(body).next_action
    # After the TTL a sweep rolls it forward; the retry is answered with the purchase.
    assert broker.broker.period is not None
    clock.advance(broker.broker.config.period_budgets.reservation_ttl_seconds + 1)
    await broker.broker.period.upkeep()
    code, body = await buy(broker, "k-bug", [A])
    assert code == 200, body
    assert body.get("replayed") is True, body
    assert [i["status"] for i in body["items"]] == ["ITEM_STATUS_PURCHASED"]
    state = await exchange.state()
    assert state["charges"] == 1, state
