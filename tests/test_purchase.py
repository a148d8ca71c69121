"""The purchase flow end to end: agent -> broker -> reference Exchange, over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from grpc_status import rpc_status
from pyqwest import Client, HTTPTransport

from ramp.broker.v1 import broker_pb2 as bpb
from ramp.broker.v1 import broker_pb2_grpc
from ramp.broker.v1.broker_connect import BrokerServiceClient, BudgetServiceClient
from tests.harness import (
    Exchange,
    RunningBroker,
    broker_config,
    catalog,
    exhausted,
    running_broker,
    running_exchange,
)

A, B, C = "https://x.test/a", "https://x.test/b", "https://x.test/c"


async def declare(broker: RunningBroker, session: str, amount: str, currency: str = "USD") -> None:
    r = await broker.post("BudgetService/DeclareSessionBudget",
                          {"sessionId": session, "limit": {"amount": amount, "currency": currency}})
    assert r.status_code == 200, r.text


async def test_purchase_over_connect_json(broker: RunningBroker, exchange: Exchange) -> None:
    await declare(broker, "s1", "10.00")
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})
    assert r.status_code == 200, r.text
    body = r.json()
    (item,) = body["items"]
    assert item["status"] == "ITEM_STATUS_PURCHASED"
    assert item["result"]["cost"] == {"amount": "1.00", "currency": "USD"}
    assert body["totalCost"] == {"amount": "1.00", "currency": "USD"}
    (session,) = body["budgets"]
    assert session["spent"]["amount"] == "1.00"
    assert session["remaining"]["amount"] == "9.00"
    state = await exchange.state()
    assert state["charges"] == 1
    assert state["balances"]["ramp-broker"]["USD"] == "999.00"


async def test_purchase_over_protobuf_with_generated_client(
    broker: RunningBroker, exchange: Exchange
) -> None:
    transport = HTTPTransport()
    try:
        async with (
            BudgetServiceClient(broker.url, http_client=Client(transport)) as budgets,
            BrokerServiceClient(broker.url, http_client=Client(transport)) as client,
        ):
            await budgets.declare_session_budget(bpb.DeclareSessionBudgetRequest(
                session_id="s1", limit={"amount": "2.50", "currency": "USD"}))
            answer = await client.transact(
                bpb.TransactRequest(session_id="s1", idempotency_key="k1", uris=[B]))
            assert answer.items[0].status == bpb.ITEM_STATUS_PURCHASED
            assert answer.total_cost.amount == "2.00"
            with pytest.raises(ConnectError) as err:
                await client.transact(
                    bpb.TransactRequest(session_id="s1", idempotency_key="k2", uris=[A]))
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            detail, denial_detail = err.value.details
            assert detail.type_name == "ramp.broker.v1.BudgetExhausted"
            info = bpb.BudgetExhausted.FromString(detail.message_bytes)
            assert (info.remaining.amount, info.estimated_cost.amount) == ("0.50", "1.00")
            assert denial_detail.type_name == "ramp.broker.v1.Denial"
            denial = bpb.Denial.FromString(denial_detail.message_bytes)
            assert (denial.reason, denial.layer) == ("session_budget_exhausted", bpb.DENIAL_LAYER_SESSION)
            assert denial.budget == info
    finally:
        await transport.aclose()
    assert (await exchange.state())["charges"] == 1


async def test_purchase_over_grpc(broker: RunningBroker, exchange: Exchange) -> None:
    await declare(broker, "s1", "1.50")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        answer = await stub.Transact(
            bpb.TransactRequest(session_id="s1", idempotency_key="k1", uris=[A]))
        assert answer.items[0].status == bpb.ITEM_STATUS_PURCHASED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Transact(bpb.TransactRequest(session_id="s1", idempotency_key="k2", uris=[A]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    assert status is not None
    info = bpb.BudgetExhausted()
    assert status.details[0].Unpack(info)
    assert info.layer == bpb.BUDGET_LAYER_SESSION
    denial = bpb.Denial()
    assert status.details[1].Unpack(denial)
    assert denial.reason == "session_budget_exhausted"
    assert denial.budget == info
    assert (info.spent.amount, info.limit.amount, info.remaining.amount) == ("1.00", "1.50", "0.50")
    assert (await exchange.state())["charges"] == 1


async def test_fifty_concurrent_purchases_against_a_budget_for_ten(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "10.00")
    replies = await asyncio.gather(*(
        broker.post("BrokerService/Transact",
                    {"sessionId": "s1", "idempotencyKey": f"k{i}", "uris": [A]})
        for i in range(50)
    ))
    ok = [r for r in replies if r.status_code == 200]
    denied = [r for r in replies if r.status_code != 200]
    assert len(ok) == 10
    assert all(r.status_code == 429 for r in denied), {r.status_code for r in denied}
    for r in denied:
        assert r.json()["code"] == "resource_exhausted"
        info = exhausted(r.json())
        assert info.layer == bpb.BUDGET_LAYER_SESSION
        assert info.limit.amount == "10.00"
        assert info.estimated_cost.amount == "1.00"
        assert info.reason == "session_budget_exhausted"
    state = await exchange.state()
    assert state["charges"] == 10
    # The 40 denials never reached the wire: one purchase call per success.
    assert state["execute_calls"] == 10
    assert state["balances"]["ramp-broker"]["USD"] == "990.00"
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    (session,) = status["budgets"]
    assert session["spent"]["amount"] == "10.00"
    assert session["reserved"]["amount"] == "0.00"
    assert session["transactionCount"] == "10"


async def test_max_price_filters_offers_and_blocks_when_nothing_fits(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "100.00")
    cap = {"maxPrice": {"amount": "2.00", "currency": "USD"}}
    r = await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k1", "uris": [A, C, B], "constraints": cap})
    body = r.json()
    assert [i["uri"] for i in body["items"]] == [A, B]
    (dropped,) = body["dropped"]
    assert dropped["uri"] == C
    assert dropped["reason"] == "DROP_REASON_FILTERED"
    assert "max_price" in dropped["detail"]

    r = await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k2", "uris": [C], "constraints": cap})
    assert r.status_code == 429
    info = exhausted(r.json())
    assert info.layer == bpb.BUDGET_LAYER_TRANSACTION
    assert (info.limit.amount, info.estimated_cost.amount) == ("2.00", "3.00")
    assert "max_price" in info.next_action
    assert (await exchange.state())["charges"] == 2


async def test_batch_pruning_drops_the_lowest_priority_uris(
    broker: RunningBroker, exchange: Exchange
) -> None:
    # a=1, b=2, c=3: 4.50 covers a and b but not c, which comes last.
    await declare(broker, "s1", "4.50")
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A, B, C]})
    body = r.json()
    assert [i["uri"] for i in body["items"]] == [A, B]
    assert body["dropped"] == [{
        "uri": C, "reason": "DROP_REASON_BUDGET", "cost": {"amount": "3.00", "currency": "USD"},
        "detail": "batch pruned to fit the remaining budget 4.50 USD",
    }]
    # Order is priority: with c first, c is kept and b (then a) must go.
    await declare(broker, "s2", "4.50")
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s2", "idempotencyKey": "k2", "uris": [C, A, B]})
    body = r.json()
    assert [i["uri"] for i in body["items"]] == [C, A]
    assert [d["uri"] for d in body["dropped"]] == [B]
    assert (await exchange.state())["charges"] == 4


async def test_exchange_timeout_gives_partial_results() -> None:
    slow_cat = catalog(exchange="slow.test", offers=[
        {"uri": B, "offer_id": "slow-b", "rate": "0.10", "currency": "USD"}])
    async with (
        running_exchange(catalog()) as fast,
        running_exchange(slow_cat) as slow,
        running_broker(broker_config([fast, slow], fanout={
            "discover_timeout_ms": 300, "overall_timeout_ms": 2000, "execute_timeout_ms": 2000,
        })) as broker,
    ):
        slow.ref.knobs.discover_latency_ms = 1500
        await declare(broker, "s1", "10.00")
        r = await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A, B]})
        body = r.json()
        assert r.status_code == 200, body
        calls = {c["exchange"]: c["outcome"] for c in body["exchanges"]}
        assert calls == {"ref.test": "OUTCOME_OK", "slow.test": "OUTCOME_TIMEOUT"}
        # b is bought from the fast exchange at 2.00; the slow 0.10 offer never arrived.
        assert {i["uri"]: i["offer"]["exchange"] for i in body["items"]} == {
            A: "ref.test", B: "ref.test"}
        assert (await slow.state())["execute_calls"] == 0


async def test_all_exchanges_down_is_unavailable_and_charges_nothing(
    broker: RunningBroker, exchange: Exchange
) -> None:
    exchange.ref.knobs.fail_discover = True
    await declare(broker, "s1", "10.00")
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})
    assert r.status_code == 503
    assert r.json()["code"] == "unavailable"
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    assert status["budgets"][0]["reserved"]["amount"] == "0.00"


async def test_exchange_denial_releases_the_reservation(
    broker: RunningBroker, exchange: Exchange
) -> None:
    exchange.ref.balances["ramp-broker"]["USD"] = exchange.ref.balances["ramp-broker"]["USD"] * 0
    await declare(broker, "s1", "5.00")
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A, B]})
    body = r.json()
    assert [i["status"] for i in body["items"]] == ["ITEM_STATUS_DENIED"] * 2
    assert body["items"][0]["result"]["denialReason"] == "DENIAL_REASON_INSUFFICIENT_BALANCE"
    assert body["totalCost"]["amount"] == "0.00"
    (session,) = body["budgets"]
    assert (session["spent"]["amount"], session["reserved"]["amount"]) == ("0.00", "0.00")
    assert session["remaining"]["amount"] == "5.00"


async def test_partial_denial_commits_only_what_was_charged(
    broker: RunningBroker, exchange: Exchange
) -> None:
    from decimal import Decimal

    exchange.ref.balances["ramp-broker"]["USD"] = Decimal("1.50")  # a (1.00) fits, b (2.00) not
    await declare(broker, "s1", "5.00")
    body = (await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A, B]})).json()
    assert [i["status"] for i in body["items"]] == ["ITEM_STATUS_PURCHASED", "ITEM_STATUS_DENIED"]
    assert body["totalCost"]["amount"] == "1.00"
    assert body["budgets"][0]["spent"]["amount"] == "1.00"
    assert body["budgets"][0]["reserved"]["amount"] == "0.00"


async def test_exchange_refusing_the_purchase_releases_and_reports_failure(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "5.00")
    exchange.ref.knobs.fail_execute = 2  # both the call and its retry
    body = (await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})).json()
    # UNAVAILABLE is ambiguous (money may have moved): the hold stays spent.
    assert body["items"][0]["status"] == "ITEM_STATUS_UNKNOWN"
    assert body["budgets"][0]["spent"]["amount"] == "1.00"
    assert (await exchange.state())["charges"] == 0


async def test_lost_answer_is_retried_with_the_same_key_and_charged_once(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "5.00")
    exchange.ref.knobs.fail_after_charge = 1
    body = (await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})).json()
    assert body["items"][0]["status"] == "ITEM_STATUS_PURCHASED"
    state = await exchange.state()
    assert (state["charges"], state["execute_calls"]) == (1, 2)
    assert body["budgets"][0]["spent"]["amount"] == "1.00"


async def test_idempotent_retry_is_not_charged_twice(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "10.00")
    request = {"sessionId": "s1", "idempotencyKey": "same", "uris": [A, B]}
    first, *retries = await asyncio.gather(*(
        broker.post("BrokerService/Transact", request) for _ in range(5)))
    later = await broker.post("BrokerService/Transact", request)
    for r in [first, *retries, later]:
        assert r.status_code == 200
        assert r.json()["totalCost"]["amount"] == "3.00"
    assert sum(1 for r in [first, *retries, later] if not r.json().get("replayed")) == 1
    state = await exchange.state()
    assert (state["charges"], state["execute_calls"]) == (2, 1)
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    assert status["budgets"][0]["spent"]["amount"] == "3.00"
    # The same key for a different purchase is refused, not silently replayed.
    r = await broker.post("BrokerService/Transact", {**request, "uris": [C]})
    assert r.status_code == 400
    assert "idempotency_key" in r.json()["message"]


async def test_denied_key_can_be_retried_after_raising_the_budget(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "0.50")
    request = {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]}
    assert (await broker.post("BrokerService/Transact", request)).status_code == 429
    await declare(broker, "s1", "1.00")
    r = await broker.post("BrokerService/Transact", request)
    assert r.status_code == 200
    assert r.json()["items"][0]["status"] == "ITEM_STATUS_PURCHASED"


async def test_offers_in_another_currency_are_converted_against_the_spender(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "1.10")
    body = (await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k1", "uris": ["https://x.test/eur"]})).json()
    assert body["items"][0]["result"]["cost"] == {"amount": "1.00", "currency": "EUR"}
    assert body["totalCost"] == {"amount": "1.10", "currency": "USD"}
    assert body["budgets"][0]["remaining"]["amount"] == "0.00"


async def test_resolve_ranks_and_filters_without_buying(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "1.50")
    r = await broker.post("BrokerService/Resolve", {"sessionId": "s1", "uris": [A, B, A]})
    body = r.json()
    assert [x["uri"] for x in body["results"]] == [A, B, A]
    assert body["results"][0]["offers"][0]["offerId"] == "a"
    assert body["results"][1]["dropped"]["reason"] == "DROP_REASON_BUDGET"
    assert body["results"][2]["dropped"]["reason"] == "DROP_REASON_DUPLICATE"
    assert (await exchange.state())["execute_calls"] == 0


async def test_transact_with_offers_chosen_from_resolve(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "5.00")
    resolved = (await broker.post("BrokerService/Resolve", {"uris": [B]})).json()
    offer = resolved["results"][0]["offers"][0]
    r = await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k1", "offers": [{"uri": B, "offer": offer}]})
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["status"] == "ITEM_STATUS_PURCHASED"


@pytest.mark.parametrize(("body", "field"), [
    ({"uris": []}, "uris"),
    ({"uris": [f"https://x.test/{i}" for i in range(257)]}, "uris"),
    ({"uris": [""]}, "uris[0]"),
    ({"uris": [A, "not a uri"]}, "uris[1]"),
    ({"uris": [A], "idempotencyKey": ""}, "idempotency_key"),
    ({"uris": [A], "sessionId": ""}, "session_id"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "1e3", "currency": "USD"}}},
     "constraints.max_price.amount"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "-1", "currency": "USD"}}},
     "constraints.max_price.amount"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "NaN", "currency": "USD"}}},
     "constraints.max_price.amount"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "0.0000000001", "currency": "USD"}}},
     "constraints.max_price.amount"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "99999999999", "currency": "USD"}}},
     "constraints.max_price.amount"),
    ({"uris": [A], "constraints": {"maxPrice": {"amount": "1.00", "currency": "XYZ"}}},
     "constraints.max_price.currency"),
    ({"uris": [A], "constraints": {"maxUnitCost": "abc"}}, "constraints.max_unit_cost"),
    ({"uris": [A], "constraints": {"exchanges": ["nope.test"]}}, "constraints.exchanges[0]"),
    ({"uris": [A], "offers": [{"uri": A, "offer": {"offerId": "a", "exchange": "ref.test"}}]},
     "offers"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(
    broker: RunningBroker, exchange: Exchange, body: dict[str, Any], field: str
) -> None:
    await declare(broker, "s1", "10.00")
    request = {"sessionId": "s1", "idempotencyKey": "k1", **body}
    r = await broker.post("BrokerService/Transact", request)
    assert r.status_code == 400, r.text
    answer = r.json()
    assert answer["code"] == "invalid_argument"
    assert answer["message"].startswith(field + ":"), answer["message"]
    assert (await exchange.state())["execute_calls"] == 0
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    assert status["budgets"][0]["spent"]["amount"] == "0.00"
    assert status["budgets"][0]["reserved"]["amount"] == "0.00"


@pytest.mark.parametrize(("body", "field"), [
    ({"uris": [A], "constraints": {"maxPrize": {"amount": "1.00", "currency": "USD"}}}, "maxPrize"),
    ({"uris": [A], "constraints": {"deliveryPreference": ["DELIVERY_METHOD_TELEPATHY"]}},
     "deliveryPreference"),
    ({"uris": A}, "uris"),
])
async def test_unknown_or_mistyped_json_fields_are_refused_not_skipped(
    broker: RunningBroker, exchange: Exchange, body: dict[str, Any], field: str
) -> None:
    await declare(broker, "s1", "10.00")
    r = await broker.post("BrokerService/Transact", {"sessionId": "s1", "idempotencyKey": "k1", **body})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_argument"
    assert field in r.json()["message"]
    assert (await exchange.state())["execute_calls"] == 0


@pytest.mark.parametrize(("limit", "field"), [
    ({"amount": "ten", "currency": "USD"}, "limit.amount"),
    ({"amount": "10", "currency": "usd"}, "limit.currency"),
    ({"amount": "10"}, "limit.currency"),
    (None, "limit"),
])
async def test_bad_session_declaration_names_the_field(
    broker: RunningBroker, limit: dict[str, str] | None, field: str
) -> None:
    body: dict[str, Any] = {"sessionId": "s1"}
    if limit is not None:
        body["limit"] = limit
    r = await broker.post("BudgetService/DeclareSessionBudget", body)
    assert r.status_code == 400
    assert r.json()["message"].startswith(field + ":")


async def test_undeclared_session_without_default_is_a_precondition_failure(
    broker: RunningBroker, exchange: Exchange
) -> None:
    r = await broker.post("BrokerService/Transact",
                          {"sessionId": "nobody", "idempotencyKey": "k1", "uris": [A]})
    assert r.status_code == 400  # FAILED_PRECONDITION maps to HTTP 400 in Connect
    assert r.json()["code"] == "failed_precondition"
    assert "DeclareSessionBudget" in r.json()["message"]
    assert (await exchange.state())["execute_calls"] == 0


async def test_default_session_limit_applies_to_undeclared_sessions(exchange: Exchange) -> None:
    config = broker_config([exchange], session={"default_limit": {"amount": "1.00", "currency": "USD"}})
    async with running_broker(config) as broker:
        ok = await broker.post("BrokerService/Transact",
                               {"sessionId": "new", "idempotencyKey": "k1", "uris": [A]})
        assert ok.status_code == 200
        again = await broker.post("BrokerService/Transact",
                                  {"sessionId": "new", "idempotencyKey": "k2", "uris": [A]})
        assert again.status_code == 429


async def test_period_fields_are_refused_for_a_requester_without_period_scopes(
    broker: RunningBroker, exchange: Exchange
) -> None:
    # No agents configured: an anonymous caller has no scope a period budget could apply to,
    # and silently ignoring the limit it asked for would be worse than refusing.
    await declare(broker, "s1", "10.00")
    r = await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k1", "uris": [A],
        "constraints": {"periodBudget": {"amount": "1.00", "currency": "USD"}}})
    assert r.json()["code"] == "permission_denied"
    assert "constraints.period_budget" in r.json()["message"]
    r = await broker.post("BrokerService/Transact", {
        "sessionId": "s1", "idempotencyKey": "k2", "uris": [A],
        "constraints": {"budgetScope": "user:alice"}})
    assert r.json()["code"] == "permission_denied"
    assert "constraints.budget_scope" in r.json()["message"]
    assert (await exchange.state())["execute_calls"] == 0


async def test_agent_hanging_up_mid_purchase_neither_cancels_nor_double_charges(
    broker: RunningBroker, exchange: Exchange
) -> None:
    import httpx

    await declare(broker, "s1", "5.00")
    exchange.ref.knobs.execute_latency_ms = 500
    request = {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]}
    async with httpx.AsyncClient(timeout=0.2) as impatient:
        with pytest.raises(httpx.TimeoutException):
            await impatient.post(f"{broker.url}/ramp.broker.v1.BrokerService/Transact",
                                 json=request, headers={"content-type": "application/json"})
    retry = await broker.post("BrokerService/Transact", request)
    assert retry.status_code == 200
    assert retry.json()["items"][0]["status"] == "ITEM_STATUS_PURCHASED"
    state = await exchange.state()
    assert (state["charges"], state["execute_calls"]) == (1, 1)
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    assert status["budgets"][0]["spent"]["amount"] == "1.00"
    assert status["budgets"][0]["reserved"]["amount"] == "0.00"


async def test_status_of_an_unknown_session_is_not_found(broker: RunningBroker) -> None:
    r = await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "ghost"})
    assert r.status_code == 404
    assert "DeclareSessionBudget" in r.json()["message"]


async def test_redeclaring_raises_the_limit_and_keeps_the_spend(
    broker: RunningBroker, exchange: Exchange
) -> None:
    await declare(broker, "s1", "1.00")
    assert (await broker.post("BrokerService/Transact",
                              {"sessionId": "s1", "idempotencyKey": "k1", "uris": [A]})).status_code == 200
    await declare(broker, "s1", "3.00")
    status = (await broker.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"})).json()
    (session,) = status["budgets"]
    assert (session["limit"]["amount"], session["spent"]["amount"], session["remaining"]["amount"]) == (
        "3.00", "1.00", "2.00")
    # A different currency after spending would silently reset the books: refused.
    r = await broker.post("BudgetService/DeclareSessionBudget",
                          {"sessionId": "s1", "limit": {"amount": "3.00", "currency": "EUR"}})
    assert r.json()["code"] == "failed_precondition"
