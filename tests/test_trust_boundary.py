"""Nothing an agent sends is believed where an authority exists (design invariant 9).

Prices come from the Exchange, never from a chosen offer's fields; idempotency keys,
sessions and replays belong to the caller that made them; a refused request leaves no
state behind; an outcome is counted whether or not its caller still listens. Every test
runs a real broker and the reference Exchange on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.config import BrokerConfig
from broker.purchase.selection import TrustPenalties, choose
from broker.purchase.validation import Constraints
from common.clock import ManualClock
from currency.convert import NoConverter
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    catalog,
    denial,
    running_broker,
    running_exchange,
)
from tests.test_alerts import eventually

A, B, PRICES = "https://x.test/a", "https://x.test/b", "https://data.test/prices"
ALICE, BOB, CAROL = "alice-key", "bob-key", "carol-key"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TEN_USD = {"amount": "10.00", "currency": "USD"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def trust_catalog(**overrides: Any) -> Any:
    """The usual articles, plus a dataset priced 4.00 EUR and a metered feed."""
    base = catalog()
    offers = [o.model_dump() for o in base.offers] + [
        {"uri": PRICES, "offer_id": "prices", "rate": "4.00", "currency": "EUR"},
        {"uri": "https://x.test/short", "offer_id": "short", "rate": "1.00", "currency": "USD",
         "ttl_seconds": 30},
    ]
    return catalog(offers=offers, **overrides)


def agents_config(exchange: Exchange, state: Path, **overrides: Any) -> BrokerConfig:
    """alice and bob in account acme, carol in account other; period budgets on the embedded store."""
    return broker_config(
        [exchange],
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / "journal.jsonl"),
            "accounts": {
                "acme": {"scopes": {"user:alice": {"limits": [
                    {"period": "month", "amount": "1.00", "currency": "USD"}]}}},
                "other": {"scopes": {"user:carol": {"limits": [
                    {"period": "month", "amount": "50.00", "currency": "USD"}]}}},
            },
        },
        agents=[
            {"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "charged_to": ["user:alice"]},
            {"id": "bob", "key_sha256": sha(BOB), "account": "acme"},
            {"id": "carol", "key_sha256": sha(CAROL), "account": "other", "charged_to": ["user:carol"]},
        ],
        **overrides,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
async def ex(clock: ManualClock) -> AsyncIterator[Exchange]:
    async with running_exchange(trust_catalog(), clock) as e:
        yield e


@contextlib.asynccontextmanager
async def agents_broker(
    ex: Exchange, state: Path, clock: ManualClock, **overrides: Any
) -> AsyncIterator[RunningBroker]:
    async with running_broker(agents_config(ex, state, **overrides), clock) as b:
        yield b


async def declare(b: RunningBroker, session: str, amount: str, key: str | None) -> httpx.Response:
    return await b.post("BudgetService/DeclareSessionBudget",
                        {"sessionId": session, "limit": {"amount": amount, "currency": "USD"}}, key)


async def status(b: RunningBroker, session: str, key: str | None) -> httpx.Response:
    return await b.post("BudgetService/GetBudgetStatus", {"sessionId": session}, key)


async def first_offer(b: RunningBroker, uri: str, key: str) -> dict[str, Any]:
    resolved = (await b.post("BrokerService/Resolve", {"uris": [uri]}, key)).json()
    offer: dict[str, Any] = resolved["results"][0]["offers"][0]
    return offer


async def sessions_held(b: RunningBroker) -> int:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{b.url}/healthz")
    count: int = r.json()["sessions"]
    return count


# --- 1. a chosen offer is priced by its Exchange --------------------------------------------------


async def test_a_forged_price_on_a_chosen_offer_is_refused_and_nothing_is_charged(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    # The attack as found: the 4.00 EUR dataset sent back with rate "0" and a 0.01 cap, on a
    # 0.10 USD session and a 1.00 USD period scope.
    async with agents_broker(ex, tmp_path, clock) as b:
        assert (await declare(b, "s1", "0.10", ALICE)).status_code == 200
        resolved = (await b.post("BrokerService/Resolve", {"uris": [PRICES]}, ALICE)).json()
        assert resolved["results"][0]["dropped"]["reason"] == "DROP_REASON_BUDGET"
        forged = {"offerId": "prices", "exchange": "ref.test", "pricing": {
            "model": "PRICING_MODEL_FLAT", "rate": "0", "currency": "EUR"}}
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k1", "offers": [{"uri": PRICES, "offer": forged}],
            "constraints": {"maxPrice": {"amount": "0.01", "currency": "USD"}}}, ALICE)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "invalid_argument"
        assert r.json()["message"].startswith("offers[0].offer.pricing: differs from ref.test's quote")
        state = await ex.state()
        assert (state["execute_calls"], state["charges"]) == (0, 0)
        budgets = (await status(b, "s1", ALICE)).json()["budgets"]
        assert {s["spent"]["amount"] for s in budgets} == {"0.00"}
        assert {s["reserved"]["amount"] for s in budgets} == {"0.00"}


async def test_a_chosen_offer_without_a_price_is_priced_from_the_quote_and_denied_like_a_uri(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "0.10", ALICE)
        await b.post("BrokerService/Resolve", {"uris": [PRICES]}, ALICE)
        by_id = {"offerId": "prices", "exchange": "ref.test"}
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k1", "offers": [{"uri": PRICES, "offer": by_id}]}, ALICE)
        assert r.status_code == 429, r.text
        d = denial(r.json())
        # 4.00 EUR at 1.10 is 4.40 USD: the session's 0.10 cannot hold it.
        assert (d.reason, d.budget.estimated_cost.amount) == ("session_budget_exhausted", "4.40")
        by_uri = await b.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k2", "uris": [PRICES]}, ALICE)
        assert by_uri.status_code == 429
        assert denial(by_uri.json()).budget == d.budget
        assert (await ex.state())["execute_calls"] == 0


async def test_the_exact_offer_from_resolve_buys_at_the_exchanges_price(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "10.00", CAROL)
        offer = await first_offer(b, B, CAROL)
        discovered = (await ex.state())["discover_calls"]
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k1", "offers": [{"uri": B, "offer": offer}]}, CAROL)
        assert r.status_code == 200, r.text
        assert r.json()["items"][0]["result"]["cost"] == {"amount": "2.00", "currency": "USD"}
        # The quote from Resolve priced it: the Exchange was not asked again.
        assert (await ex.state())["discover_calls"] == discovered


async def test_a_chosen_offer_without_a_quote_is_quoted_afresh(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    # Chosen on another broker (or long ago): this broker asks the Exchange itself.
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "10.00", CAROL)
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k1",
            "offers": [{"uri": A, "offer": {"offerId": "a", "exchange": "ref.test"}}]}, CAROL)
        assert r.status_code == 200, r.text
        assert r.json()["totalCost"] == {"amount": "1.00", "currency": "USD"}
        assert (await ex.state())["discover_calls"] == 1


async def test_an_offer_the_exchange_does_not_quote_is_refused(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "10.00", CAROL)
        for offer_id, uri in (("nope", A), ("b", A)):  # unknown id; a real id under another URI
            r = await b.post("BrokerService/Transact", {
                "sessionId": "s1", "idempotencyKey": f"k-{offer_id}",
                "offers": [{"uri": uri, "offer": {"offerId": offer_id, "exchange": "ref.test"}}]}, CAROL)
            assert r.status_code == 400, r.text  # FAILED_PRECONDITION
            assert r.json()["code"] == "failed_precondition"
            assert denial(r.json()).reason == "offer_not_quoted"
            assert r.json()["message"].startswith("offers[0]: ref.test does not quote offer")
        assert (await ex.state())["execute_calls"] == 0


async def test_an_expired_quote_is_not_used(ex: Exchange, tmp_path: Path, clock: ManualClock) -> None:
    short = "https://x.test/short"
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "10.00", CAROL)
        offer = await first_offer(b, short, CAROL)
        clock.advance(31)  # the offer expired; the Exchange quotes a fresh one when asked
        ex.ref.catalog.offers[-1].rate = "1.50"  # the Exchange's price has moved since
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k1", "offers": [{"uri": short, "offer": offer}]}, CAROL)
        # The agent's copy carries the old price: refused, not silently re-priced.
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith("offers[0].offer.pricing: differs")
        r = await b.post("BrokerService/Transact", {
            "sessionId": "s1", "idempotencyKey": "k2",
            "offers": [{"uri": short, "offer": {"offerId": "short", "exchange": "ref.test"}}]}, CAROL)
        assert r.status_code == 200, r.text
        assert r.json()["totalCost"] == {"amount": "1.50", "currency": "USD"}


async def test_an_exchange_that_charges_above_its_quote_is_counted_and_ranks_lower(
    clock: ManualClock, tmp_path: Path,
) -> None:
    metered = {"uri": A, "offer_id": "m", "model": "per_unit", "rate": "0.50", "currency": "USD",
               "estimated_quantity": 2, "actual_quantity": 3}
    honest = {"uri": A, "offer_id": "h", "rate": "1.00", "currency": "USD"}
    async with running_exchange(catalog(exchange="greedy.test", offers=[metered]), clock) as greedy, \
            running_exchange(catalog(exchange="honest.test", offers=[honest]), clock) as fair:
        # The metered offer is cheaper per unit, so it wins; it then charges 3 units, not 2.
        config = broker_config([greedy, fair], session={"default_limit": TEN_USD})
        async with running_broker(config, clock) as b:
            r = await b.post("BrokerService/Transact", {"sessionId": "s", "idempotencyKey": "k1",
                                                        "uris": [A]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["items"][0]["offer"]["exchange"] == "greedy.test"
            assert body["totalCost"] == {"amount": "1.50", "currency": "USD"}  # in full: 3 units, not 2
            assert b.broker.metrics.overcharges.labels("greedy.test")._value.get() == 1
            scrape = await _metrics(b)
            assert 'broker_exchange_overcharges_total{exchange="greedy.test"} 1.0' in scrape


async def _metrics(b: RunningBroker) -> str:
    from prometheus_client import generate_latest

    return generate_latest(b.broker.metrics.registry).decode()


def test_trust_penalties_rank_an_overcharging_exchange_below_an_equal_one() -> None:
    from tests.test_selection import exchange, offer

    greedy, fair = exchange("greedy.test", trust=60), exchange("fair.test", trust=50)
    offers = [(offer("g", "1.00"), greedy), (offer("f", "1.00"), fair)]
    c = Constraints(frozenset(), None, None, frozenset(), False, ())
    penalties = TrustPenalties()
    first = choose(A, offers, c, "USD", NoConverter(), NOW, penalties).ranked[0]
    assert first.exchange.name == "greedy.test"
    penalties.overcharged("greedy.test")
    penalties.overcharged("greedy.test")  # 60 - 20 = 40 < 50
    first = choose(A, offers, c, "USD", NoConverter(), NOW, penalties).ranked[0]
    assert first.exchange.name == "fair.test"
    for _ in range(10):
        penalties.overcharged("greedy.test")
    assert penalties.trust(greedy) == 0  # never below zero


# --- 2. idempotency keys belong to their caller ---------------------------------------------------


async def test_the_same_key_from_another_caller_is_another_purchase_never_a_replay(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    body = {"sessionId": "s1", "idempotencyKey": "K", "uris": [A]}
    async with agents_broker(ex, tmp_path, clock, session={
            "default_limit": {"amount": "10.00", "currency": "USD"}}) as b:
        alice = await b.post("BrokerService/Transact", body, ALICE)
        assert alice.status_code == 200, alice.text
        mine = alice.json()["items"][0]["result"]["transactionId"]
        for key in (CAROL, BOB):  # another account's agent, and one of the same account
            other = await b.post("BrokerService/Transact", body, key)
            assert other.status_code == 200, other.text
            answer = other.json()
            assert not answer.get("replayed", False)
            assert answer["items"][0]["result"]["transactionId"] != mine
        again = await b.post("BrokerService/Transact", body, ALICE)
        assert again.json()["replayed"] is True
        assert again.json()["items"][0]["result"]["transactionId"] == mine
        # Three purchases, each under its own key at the Exchange, none naming its caller.
        keys = list(ex.ref._done)
        assert len(keys) == len(set(keys)) == 3
        assert all(k.startswith("rb-") and "alice" not in k and "K" not in k for k in keys)
        assert (await ex.state())["charges"] == 3


async def test_a_replay_is_only_shown_to_its_owner_across_brokers(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    # The store's settled record is per caller too: a second broker on the same store answers
    # alice's retry from it, and bob's identical request is a purchase of his own.
    body = {"sessionId": "s1", "idempotencyKey": "K", "uris": [A]}
    session = {"default_limit": {"amount": "10.00", "currency": "USD"}}
    async with agents_broker(ex, tmp_path, clock, session=session) as first:
        assert (await first.post("BrokerService/Transact", body, ALICE)).status_code == 200
    async with agents_broker(ex, tmp_path, clock, session=session) as second:
        retry = await second.post("BrokerService/Transact", body, ALICE)
        assert retry.json()["replayed"] is True
        bob = await second.post("BrokerService/Transact", body, BOB)
        assert bob.status_code == 200, bob.text
        assert not bob.json().get("replayed", False)
    assert (await ex.state())["charges"] == 2


# --- 3. sessions belong to their caller -----------------------------------------------------------


async def test_budget_rpcs_need_a_valid_key_where_agents_are_configured(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        for key in (None, "wrong-key"):
            for r in (await declare(b, "s1", "1.00", key), await status(b, "s1", key)):
                assert r.status_code == 401, r.text
                assert r.json()["code"] == "unauthenticated"
        assert await sessions_held(b) == 0


async def test_another_callers_session_is_not_found_and_cannot_be_redeclared(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        assert (await declare(b, "s1", "1.00", ALICE)).status_code == 200
        theirs = await status(b, "s1", BOB)
        never = await status(b, "never-declared", BOB)
        assert theirs.status_code == never.status_code == 404
        # The same answer as for a session that does not exist: nothing says alice has one.
        assert theirs.json()["message"] == never.json()["message"].replace("never-declared", "s1")
        # bob's "s1" is his own session; alice's keeps her limit.
        assert (await declare(b, "s1", "700.00", BOB)).status_code == 200
        (mine,) = [s for s in (await status(b, "s1", ALICE)).json()["budgets"]
                   if s["layer"] == "BUDGET_LAYER_SESSION"]
        assert mine["limit"]["amount"] == "1.00"
        # The owner may still re-declare, higher or lower.
        raised = await declare(b, "s1", "3.00", ALICE)
        assert raised.json()["budget"]["limit"]["amount"] == "3.00"
        lowered = await declare(b, "s1", "0.50", ALICE)
        assert lowered.json()["budget"]["limit"]["amount"] == "0.50"


async def test_a_purchase_spends_only_its_callers_session(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        await declare(b, "s1", "1.00", ALICE)
        await declare(b, "s1", "5.00", CAROL)
        r = await b.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": "k", "uris": [B]},
                         CAROL)
        assert r.status_code == 200, r.text  # carol's 5.00 session, not alice's 1.00
        (mine,) = [s for s in (await status(b, "s1", ALICE)).json()["budgets"]
                   if s["layer"] == "BUDGET_LAYER_SESSION"]
        assert mine["spent"]["amount"] == "0.00"


async def test_keyless_calls_are_refused_without_an_anonymous_identity_and_owned_with_one(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b:
        assert (await declare(b, "s1", "1.00", None)).status_code == 401
    anonymous = {"account": "acme", "charged_to": ["user:alice"]}
    async with agents_broker(ex, tmp_path, clock, anonymous=anonymous) as b:
        assert (await declare(b, "s1", "2.00", None)).status_code == 200
        assert (await status(b, "s1", None)).status_code == 200
        assert (await status(b, "s1", ALICE)).status_code == 404  # the anonymous identity's session


# --- 4. a refused request leaves nothing behind ---------------------------------------------------


@pytest.mark.parametrize("body", [
    {"uris": []},
    {"uris": ["not a uri"]},
    {"uris": [A], "idempotencyKey": ""},
    {"uris": [A], "constraints": {"maxPrice": {"amount": "-1", "currency": "USD"}}},
    {"uris": [A], "constraints": {"budgetScope": "user:bob"}},  # not granted
    {"offers": [{"uri": A, "offer": {"offerId": "a", "exchange": "nope.test"}}]},
    {"offers": [{"uri": A, "offer": {"offerId": "a", "exchange": "ref.test", "pricing": {
        "model": "PRICING_MODEL_FLAT", "rate": "x", "currency": "USD"}}}]},
])
async def test_a_refused_transact_creates_no_session(
    ex: Exchange, tmp_path: Path, clock: ManualClock, body: dict[str, Any],
) -> None:
    async with agents_broker(ex, tmp_path, clock, session={
            "default_limit": {"amount": "10.00", "currency": "USD"}}) as b:
        for i in range(20):
            request = {"sessionId": f"s{i}", "idempotencyKey": f"k{i}", **body}
            r = await b.post("BrokerService/Transact", request, ALICE)
            assert 400 <= r.status_code < 500, r.text
        assert await sessions_held(b) == 0
        r = await b.post("BrokerService/Resolve", {"uris": [A], "sessionId": "s-resolve"}, ALICE)
        assert r.status_code == 200
        assert await sessions_held(b) == 0  # Resolve buys nothing, so it keeps nothing
        assert (await ex.state())["execute_calls"] == 0


async def test_authentication_comes_before_the_body_is_read(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    async with agents_broker(ex, tmp_path, clock) as b, httpx.AsyncClient() as client:
        # A body that cannot even be parsed: an unknown caller learns only that it is unknown.
        r = await client.post(f"{b.url}/ramp.broker.v1.BrokerService/Transact", content=b"\xff{[",
                              headers={"content-type": "application/json", "authorization": "Bearer nope"})
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "unauthenticated"
        r = await client.post(f"{b.url}/ramp.broker.v1.BudgetAdminService/GetScopeStatus", content=b"\xff{[",
                              headers={"content-type": "application/json", "authorization": "Bearer nope"})
        assert r.status_code in (401, 403), r.text
        assert "x-request-id" in r.headers


# --- 9. every outcome is recorded, whoever still listens ------------------------------------------


async def test_a_purchase_whose_caller_gave_up_is_still_counted_and_logged(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "broker.purchase")
    async with running_exchange(trust_catalog(knobs={"execute_latency_ms": 400}), clock) as slow:
        config = broker_config([slow], session={"default_limit": {"amount": "10.00", "currency": "USD"}})
        async with running_broker(config, clock) as b, httpx.AsyncClient() as client:
            r = await client.post(
                f"{b.url}/ramp.broker.v1.BrokerService/Transact",
                json={"sessionId": "s", "idempotencyKey": "k", "uris": [A]},
                headers={"content-type": "application/json", "connect-timeout-ms": "100"})
            assert r.json()["code"] == "deadline_exceeded"
            purchased = b.broker.metrics.purchases.labels("purchased")
            # The purchase goes on without its caller.
            await eventually(lambda: purchased._value.get() >= 1, "the purchase was counted")
            assert (await slow.state())["charges"] == 1
            assert any("transact purchased: 1 item(s)" in rec.getMessage() for rec in caplog.records)
            # The agent's retry gets the purchase, not a second charge.
            again = await b.post("BrokerService/Transact",
                                 {"sessionId": "s", "idempotencyKey": "k", "uris": [A]})
            assert again.json()["replayed"] is True
            assert (await slow.state())["charges"] == 1


async def test_a_uri_is_bounded_in_bytes_not_characters(
    ex: Exchange, tmp_path: Path, clock: ManualClock,
) -> None:
    # 700 three-byte characters: 700 characters, 2100 bytes.
    wide = "https://x.test/" + "€" * 700
    async with agents_broker(ex, tmp_path, clock) as b:
        r = await b.post("BrokerService/Resolve", {"uris": [wide]}, CAROL)
        assert r.status_code == 400, r.text
        assert r.json()["message"] == "uris[0]: is longer than 2048 bytes (UTF-8)"
        assert (await ex.state())["discover_calls"] == 0
