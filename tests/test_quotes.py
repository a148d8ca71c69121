"""A repeated purchase is priced from the Exchange's still-valid quote, without asking it again.

Only the broker's own discoveries fill the quote book; a quote is used inside its validity
only (the offer's expiry, and never longer than quotes.max_age_seconds); a purchase that
fails makes the broker ask again; an Exchange that offered nothing is always asked again.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from broker.config import BrokerConfig
from common.clock import ManualClock
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    catalog,
    running_broker,
    running_exchange,
)
from tests.processes import broker_tree, catalog_tree, connect_call, start_broker, start_exchange

A = "https://x.test/a"
SESSION = {"default_limit": {"amount": "1000.00", "currency": "USD"}}


def config(exchanges: list[Exchange], **overrides: Any) -> BrokerConfig:
    return broker_config(exchanges, session=SESSION, **overrides)


async def buy(b: RunningBroker, key: str, uri: str = A, **extra: Any) -> dict[str, Any]:
    r = await b.post("BrokerService/Transact",
                     {"sessionId": "s", "idempotencyKey": key, "uris": [uri], **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def statuses(body: dict[str, Any]) -> list[str]:
    return [i["status"] for i in body.get("items", [])]


async def calls(ex: Exchange) -> tuple[int, int, int]:
    s = await ex.state()
    return s["discover_calls"], s["execute_calls"], s["charges"]


async def test_a_repeated_purchase_of_a_uri_is_bought_from_the_still_valid_quote_without_discovery() -> None:
    async with running_exchange(catalog()) as ex, running_broker(config([ex])) as b:
        for i in range(3):
            assert statuses(await buy(b, f"k{i}")) == ["ITEM_STATUS_PURCHASED"]
        assert await calls(ex) == (1, 3, 3)
        first = await buy(b, "k9")
        # No Exchange was called for quotes: the answer lists no discovery call.
        assert first.get("exchanges", []) == []
        assert first["totalCost"] == {"amount": "1.00", "currency": "USD"}


async def test_a_quote_is_not_used_past_its_offers_expiry_nor_past_max_age() -> None:
    clock = ManualClock()
    cat = catalog(offers=[
        {"uri": A, "offer_id": "a", "rate": "1.00", "currency": "USD", "ttl_seconds": 30},
        {"uri": "https://x.test/b", "offer_id": "b", "rate": "2.00", "currency": "USD"},
    ])
    async with running_exchange(cat, clock) as ex, \
            running_broker(config([ex], quotes={"max_age_seconds": 60}), clock) as b:
        await buy(b, "a1")
        clock.advance(29)
        await buy(b, "a2")
        assert (await calls(ex))[0] == 1
        clock.advance(2)  # past the offer's expiry (30 s after it was quoted)
        await buy(b, "a3")
        assert (await calls(ex))[0] == 2
        # An offer without expiry: quoted for max_age_seconds at most.
        await buy(b, "b1", "https://x.test/b")
        clock.advance(59)
        await buy(b, "b2", "https://x.test/b")
        assert (await calls(ex))[0] == 3
        clock.advance(2)
        await buy(b, "b3", "https://x.test/b")
        assert await calls(ex) == (4, 6, 6)


async def test_a_purchase_that_fails_at_the_exchange_makes_the_broker_ask_for_quotes_again() -> None:
    async with running_exchange(catalog()) as ex, running_broker(config([ex])) as b:
        await buy(b, "k1")
        # The Exchange refuses the next sale (the buyer's balance there is gone).
        ex.ref.balances["ramp-broker"]["USD"] = Decimal(0)
        assert statuses(await buy(b, "k2")) == ["ITEM_STATUS_DENIED"]
        assert (await calls(ex))[0] == 1
        await buy(b, "k3")
        assert (await calls(ex))[0] == 2  # asked again after the failure


async def test_an_exchange_that_offered_nothing_is_asked_again_and_one_that_quoted_is_not() -> None:
    other = catalog(exchange="other.test", offers=[
        {"uri": "https://x.test/elsewhere", "offer_id": "e", "rate": "1.00", "currency": "USD"}])
    async with running_exchange(catalog()) as ex, running_exchange(other) as ex2, \
            running_broker(config([ex, ex2])) as b:
        await buy(b, "k1")
        await buy(b, "k2")
        assert (await calls(ex))[0] == 1
        assert (await calls(ex2))[0] == 2


async def test_with_reuse_off_every_transact_discovers() -> None:
    async with running_exchange(catalog()) as ex, \
            running_broker(config([ex], quotes={"reuse": False})) as b:
        await buy(b, "k1")
        await buy(b, "k2")
        assert await calls(ex) == (2, 2, 2)


async def test_offers_chosen_by_the_agent_never_fill_the_book_for_uri_purchases() -> None:
    """An agent's forged offer (a price of its own) is refused and leaves no quote behind."""
    async with running_exchange(catalog()) as ex, running_broker(config([ex])) as b:
        forged = {"offerId": "a", "exchange": ex.name, "pricing": {
            "model": "PRICING_MODEL_FLAT", "rate": "0.01", "currency": "USD"}}
        r = await b.post("BrokerService/Transact", {"sessionId": "s", "idempotencyKey": "f",
                                                     "offers": [{"uri": A, "offer": forged}]})
        assert r.status_code == 400, r.text
        body = await buy(b, "k1")
        assert body["totalCost"] == {"amount": "1.00", "currency": "USD"}


async def test_a_broker_on_uvloop_serves_buys_and_stops(tmp_path: Path) -> None:
    """event_loop: uvloop (opt-in) runs the same broker: a purchase, its quote reused, a clean stop."""
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            start_broker(tmp_path, broker_tree(exchange, event_loop="uvloop", session=SESSION)) as broker, \
            httpx.AsyncClient(timeout=15.0) as client:
        for key in ("u1", "u2"):
            r = await connect_call(client, broker, "BrokerService/Transact",
                                   {"sessionId": "s", "idempotencyKey": key, "uris": [A]})
            assert r.status_code == 200, r.text
            assert statuses(r.json()) == ["ITEM_STATUS_PURCHASED"]
        state = (await client.get(f"{exchange.url}/admin/state")).json()
        assert (state["discover_calls"], state["charges"]) == (1, 2)
