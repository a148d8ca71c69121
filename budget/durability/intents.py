"""Durable intents: what a purchase is about to ask each Exchange, recorded with its hold.

Once an Exchange may have been asked to charge, a hold is never refunded blindly.
The reservation carries the intent (the exact request for each Exchange, byte for
byte, with the key it is sent under, what each item was quoted at, and what each
part holds on each counter), so whoever finds the hold unsettled (this broker
after a restart, any broker's sweeper after the TTL, a retry of the key) can roll
it forward: re-send the same request, which a RAMP Exchange answers from its
dedupe record (or executes now, inside the hold), and commit what it says.

The store keeps an intent as opaque bytes; this module owns their format.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from budget.durability import jsonl
from budget.stores.contract import CounterRef, Hold, counter_record
from currency.money import Money


class IntentError(ValueError):
    """Bytes that are not an intent this broker wrote (a bug or a foreign writer)."""


@dataclass(frozen=True, slots=True)
class IntentItem:
    uri: str
    offer_id: str
    quoted: Money  # in the purchase's currency, as reserved


@dataclass(frozen=True, slots=True)
class IntentPart:
    """What one Exchange is asked: the request bytes are re-sent exactly, never rebuilt."""

    exchange: str
    request: bytes  # a serialized ramp.v1.TransactionRequest
    items: tuple[IntentItem, ...]
    holds: tuple[int, ...]  # what this part holds on each of the intent's counters (nano-units)


@dataclass(frozen=True, slots=True)
class Intent:
    account: str
    key: str  # the store's idempotency key (caller-scoped)
    fingerprint: str  # of the agent's request: a retry must match it to be shown the answer
    currency: str  # the purchase's (session) currency
    holds: tuple[Hold, ...]
    parts: tuple[IntentPart, ...]

    def encode(self) -> bytes:
        doc = {
            "v": 1, "account": self.account, "key": self.key, "fingerprint": self.fingerprint,
            "currency": self.currency,
            "holds": [{"counter": counter_record(h.counter), "amount": h.amount, "limit": h.limit,
                       "expire_at_ms": h.expire_at_ms} for h in self.holds],
            "parts": [{"exchange": p.exchange, "request": base64.b64encode(p.request).decode(),
                       "holds": list(p.holds),
                       "items": [{"uri": i.uri, "offer_id": i.offer_id, "quoted": i.quoted.text()}
                                 for i in p.items]}
                      for p in self.parts],
        }
        return jsonl.dumps(doc)

    @classmethod
    def decode(cls, data: bytes) -> Intent:
        try:
            doc: dict[str, Any] = jsonl.loads(data)
            if doc.get("v") != 1:
                raise IntentError(f"intent version {doc.get('v')!r} is not one this broker reads")
            currency = doc["currency"]
            holds = tuple(Hold(CounterRef(**h["counter"]), h["amount"], h["limit"], h["expire_at_ms"])
                          for h in doc["holds"])
            parts = tuple(
                IntentPart(p["exchange"], base64.b64decode(p["request"]),
                           tuple(IntentItem(i["uri"], i["offer_id"],
                                            Money.parse(i["quoted"], currency, "quoted"))
                                 for i in p["items"]),
                           tuple(p["holds"]))
                for p in doc["parts"])
            return cls(doc["account"], doc["key"], doc["fingerprint"], currency, holds, parts)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntentError(f"not a readable intent: {exc}") from None


@dataclass(frozen=True, slots=True)
class PartOrder:
    """One Exchange's share of a purchase, before it is reserved: what will be sent, and its cost."""

    exchange: str
    request: bytes
    items: tuple[IntentItem, ...]
    cost: Money  # in the purchase's currency: the sum of the items' quotes
