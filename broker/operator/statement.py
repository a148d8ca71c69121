"""An Exchange's statement of charges, for `ramp-broker reconcile`.

RAMP has no statement RPC; an Exchange that publishes one serves it as JSON at
`<endpoint>/admin/statement` (the reference Exchange does):

    {"exchange": "ref.test", "charges": [{"idempotency_key": "rb-...", "account": "ramp-broker",
      "offer_id": "a", "amount": "1.00", "currency": "USD"}, ...]}

A 404 or an answer that is not such a JSON document means the Exchange
publishes no statement; that is not an error, there is just nothing to compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from currency.money import MoneyError, parse_amount, parse_currency

PATH = "/admin/statement"


@dataclass(frozen=True, slots=True)
class StatementLine:
    key: str  # the idempotency key the Exchange was sent
    account: str  # the billing account (RAMP requester id) charged; "" when not stated
    offer_id: str
    amount: Decimal
    currency: str


class NoStatement(Exception):
    """The Exchange publishes no statement (404, or not a statement document)."""


class StatementUnavailable(Exception):
    """The statement could not be read: unreachable, an HTTP error, or a malformed line."""


async def fetch_statement(endpoint: str, timeout_s: float) -> list[StatementLine]:
    url = endpoint.rstrip("/") + PATH
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(url, headers={"accept": "application/json"})
    except httpx.TransportError as exc:
        raise StatementUnavailable(f"{url}: {type(exc).__name__}: {exc}"[:300]) from None
    if r.status_code == 404:
        raise NoStatement(f"{url} answered 404")
    try:
        doc = r.json()
    except ValueError:
        raise NoStatement(f"{url} answered HTTP {r.status_code} without JSON") from None
    if r.status_code != 200:
        raise StatementUnavailable(f"{url} answered HTTP {r.status_code}: {str(doc)[:200]}")
    if not isinstance(doc, dict) or not isinstance(doc.get("charges"), list):
        raise NoStatement(f"{url} answered JSON that is not a statement (no `charges` list)")
    return [_line(i, c) for i, c in enumerate(doc["charges"])]


def _line(i: int, raw: Any) -> StatementLine:
    try:
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        key, offer = raw["idempotency_key"], raw["offer_id"]
        if not isinstance(key, str) or not isinstance(offer, str):
            raise TypeError("idempotency_key and offer_id must be strings")
        amount = parse_amount(str(raw["amount"]), "amount")
        currency = parse_currency(str(raw["currency"]), "currency")
        return StatementLine(key, str(raw.get("account", "")), offer, amount, currency)
    except (KeyError, TypeError, MoneyError) as exc:
        raise StatementUnavailable(f"charges[{i}] is unreadable: {exc}") from None
