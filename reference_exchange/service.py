"""A reference RAMP Exchange for local use and tests.

It is the authority a real Exchange would be: it keeps a balance per billing
account, charges its own catalog price (not what the buyer claims), denies items
it cannot cover with INSUFFICIENT_BALANCE, and answers a repeated
idempotency_key with the first result without charging again. It publishes a
statement of every charge (GET /admin/statement) for buyers to reconcile with.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from decimal import Decimal
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from common.clock import Clock, SystemClock
from currency.money import Money, MoneyError, format_amount, parse_amount
from ramp.v1 import ramp_pb2 as rpb
from ramp.v1.ramp_connect import ExchangeServiceASGIApplication
from reference_exchange.catalog import Catalog, CatalogOffer, Knobs
from rpc_server.serving import Router

_MODELS = {
    "free": rpb.PRICING_MODEL_FREE, "flat": rpb.PRICING_MODEL_FLAT,
    "per_unit": rpb.PRICING_MODEL_PER_UNIT,
}
_DELIVERY = {
    "inline": rpb.DELIVERY_METHOD_INLINE, "url": rpb.DELIVERY_METHOD_URL,
    "api": rpb.DELIVERY_METHOD_API,
}
MAX_URIS = 256


def _charge_for(offer: CatalogOffer) -> Money:
    rate = Money(parse_amount(offer.rate, "rate"), offer.currency)
    if offer.model == "free":
        return Money.zero(offer.currency)
    if offer.model == "flat":
        return rate
    qty = offer.estimated_quantity if offer.actual_quantity is None else offer.actual_quantity
    return rate.times(qty, round_up=True)


class ReferenceExchange:
    def __init__(self, catalog: Catalog, clock: Clock | None = None) -> None:
        self.catalog = catalog
        self.knobs: Knobs = catalog.knobs
        self._clock = clock or SystemClock()
        self._by_uri: dict[str, list[CatalogOffer]] = {}
        self._by_id = {o.offer_id: o for o in catalog.offers}
        for o in catalog.offers:
            self._by_uri.setdefault(o.uri, []).append(o)
        self.balances: dict[str, dict[str, Decimal]] = {
            acct: {cur: Decimal(v) for cur, v in bal.items()}
            for acct, bal in catalog.accounts.items()
        }
        # idempotency_key -> (request fingerprint, serialized answer); a lock serializes
        # purchases so a retry racing its original still sees one charge. Bytes, not messages:
        # the garbage collector does not walk them (with a message per charge, its full
        # collections grew with every charge: 40-60 ms stalls after a bench's tens of thousands).
        self._done: dict[str, tuple[str, bytes]] = {}
        self._lock = asyncio.Lock()
        self.charges = 0
        # Every charge, in order: what GET /admin/statement publishes for a buyer's reconcile.
        self.statement: list[dict[str, str]] = []
        self.execute_calls = 0
        self.discover_calls = 0
        self._seq = 0

    # --- ExchangeService ---------------------------------------------------

    async def discover_resources(
        self, request: rpb.ResourceQuery, ctx: RequestContext[Any, Any]
    ) -> rpb.ResourceResponse:
        self.discover_calls += 1
        if self.knobs.discover_latency_ms:
            await asyncio.sleep(self.knobs.discover_latency_ms / 1000)
        if self.knobs.fail_discover:
            raise ConnectError(Code.UNAVAILABLE, "discovery is switched off (test knob)")
        if not request.uris:
            raise ConnectError(Code.INVALID_ARGUMENT, "uris: at least one URI is required")
        if len(request.uris) > MAX_URIS:
            raise ConnectError(Code.INVALID_ARGUMENT, f"uris: at most {MAX_URIS} URIs")
        response = rpb.ResourceResponse(ver="1", exchange=self.catalog.exchange)
        now = self._clock.now()
        for uri in request.uris:
            group = response.offer_groups.add(uri=uri)
            offers = self._by_uri.get(uri, [])
            if not offers:
                group.absence_reason = rpb.ABSENCE_REASON_NOT_FOUND
            for o in offers:
                offer = group.offers.add(
                    offer_id=o.offer_id, title=o.title, exchange=self.catalog.exchange,
                    delivery_method=_DELIVERY[o.delivery],
                    pricing=rpb.Pricing(
                        model=_MODELS[o.model], rate=o.rate, currency=o.currency,
                        estimated_quantity=o.estimated_quantity, unit=o.unit,
                    ),
                )
                if o.ttl_seconds is not None:
                    offer.expires_at.FromDatetime(now + timedelta(seconds=o.ttl_seconds))
        return response

    async def execute_transaction(
        self, request: rpb.TransactionRequest, ctx: RequestContext[Any, Any]
    ) -> rpb.TransactionResponse:
        self.execute_calls += 1
        if self.knobs.execute_latency_ms:
            await asyncio.sleep(self.knobs.execute_latency_ms / 1000)
        key = request.idempotency_key
        if not key:
            raise ConnectError(Code.INVALID_ARGUMENT, "idempotency_key: is required")
        if not request.items:
            raise ConnectError(Code.INVALID_ARGUMENT, "items: at least one item is required")
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        async with self._lock:
            if key in self._done:
                seen, stored = self._done[key]
                if seen != fingerprint:
                    raise ConnectError(
                        Code.INVALID_ARGUMENT,
                        "idempotency_key: already used for a different transaction",
                    )
                return rpb.TransactionResponse.FromString(stored)
            if self.knobs.fail_execute:
                self.knobs.fail_execute -= 1
                raise ConnectError(Code.UNAVAILABLE, "purchase failed before charging (test knob)")
            answer = self._charge(request)
            self._done[key] = (fingerprint, answer.SerializeToString())
            if self.knobs.fail_after_charge:
                self.knobs.fail_after_charge -= 1
                raise ConnectError(Code.UNAVAILABLE, "answer lost after charging (test knob)")
        if self.knobs.answer_latency_ms:
            # Charged already (outside the lock, so others are not held up): a buyer that dies or
            # gives up now never hears of it.
            await asyncio.sleep(self.knobs.answer_latency_ms / 1000)
        return answer

    def _charge(self, request: rpb.TransactionRequest) -> rpb.TransactionResponse:
        account = request.requester.id
        balances = self.balances.get(account, {})
        response = rpb.TransactionResponse(ver="1")
        totals: dict[str, Decimal] = {}
        now = self._clock.now()
        for item in request.items:
            self._seq += 1
            result = response.items.add(offer_id=item.offer.offer_id)
            offer = self._by_id.get(item.offer.offer_id)
            if offer is None:
                result.denial_reason = rpb.DENIAL_REASON_CONTENT_UNAVAILABLE
                continue
            if item.offer.HasField("expires_at") and item.offer.expires_at.ToDatetime(
                tzinfo=now.tzinfo
            ) < now:
                result.denial_reason = rpb.DENIAL_REASON_OFFER_EXPIRED
                continue
            cost = _charge_for(offer)
            have = balances.get(cost.currency, Decimal(0))
            if have < cost.amount:
                result.denial_reason = rpb.DENIAL_REASON_INSUFFICIENT_BALANCE
                continue
            balances[cost.currency] = have - cost.amount
            self.charges += 1
            self.statement.append({"idempotency_key": request.idempotency_key, "account": account,
                                   "offer_id": offer.offer_id, "amount": cost.text(),
                                   "currency": cost.currency, "transaction_id": f"txn-{self._seq}"})
            totals[cost.currency] = totals.get(cost.currency, Decimal(0)) + cost.amount
            result.transaction_id = f"txn-{self._seq}"
            result.billing_id = f"{account}/{self._seq}"
            result.cost.CopyFrom(rpb.Cost(amount=cost.text(), currency=cost.currency))
            result.retrieval_endpoint = f"https://{self.catalog.exchange}/r/{offer.offer_id}"
        if len(totals) == 1:
            (cur, amount), = totals.items()
            response.total_cost.CopyFrom(rpb.Cost(amount=format_amount(amount), currency=cur))
        return response

    # --- admin routes (loopback test control) -------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "exchange": self.catalog.exchange,
            "balances": {a: {c: format_amount(v) for c, v in b.items()}
                         for a, b in self.balances.items()},
            "charges": self.charges,
            "execute_calls": self.execute_calls,
            "discover_calls": self.discover_calls,
            "knobs": self.knobs.model_dump(),
        }

    async def admin_state(self, method: str, body: Any) -> tuple[int, Any]:
        return 200, self.state()

    async def admin_statement(self, method: str, body: Any) -> tuple[int, Any]:
        """Every charge (idempotency key, billing account, offer, amount, currency), oldest first."""
        return 200, {"exchange": self.catalog.exchange, "charges": list(self.statement)}

    async def admin_knobs(self, method: str, body: Any) -> tuple[int, Any]:
        if method != "POST" or not isinstance(body, dict):
            return 400, {"error": "POST a JSON object of knobs"}
        try:
            self.knobs = Knobs.model_validate({**self.knobs.model_dump(), **body})
        except ValueError as exc:
            return 400, {"error": str(exc)}
        return 200, self.state()

    async def admin_balance(self, method: str, body: Any) -> tuple[int, Any]:
        if method != "POST" or not isinstance(body, dict):
            return 400, {"error": "POST {account, currency, amount}"}
        try:
            amount = parse_amount(str(body.get("amount", "")), "amount")
            account, cur = str(body["account"]), str(body["currency"])
        except (KeyError, MoneyError) as exc:
            return 400, {"error": str(exc)}
        self.balances.setdefault(account, {})[cur] = amount
        return 200, self.state()


def reference_app(exchange: ReferenceExchange) -> Router:
    service = ExchangeServiceASGIApplication(exchange)
    return Router(
        {service.path: service},
        {
            "/healthz": _healthy,
            "/admin/state": exchange.admin_state,
            "/admin/statement": exchange.admin_statement,
            "/admin/knobs": exchange.admin_knobs,
            "/admin/balance": exchange.admin_balance,
        },
    )


async def _healthy(method: str, body: Any) -> tuple[int, Any]:
    return 200, {"status": "ok"}
