"""Offers as the Exchanges quoted them to this broker, kept while they are valid.

The price the broker reserves is always an Exchange's: an agent that chooses an
offer from Resolve names it (exchange, offer id, URI) and the broker looks it up
here, or asks the Exchange again. Only the broker's own discoveries fill the book.
A quote is valid until its offer expires, and never longer than `max_age` after
it was obtained (an offer without an expiry is not a promise forever).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.selection import Discovery, Exchange
from budget.clock import Clock
from ramp.v1 import ramp_pb2 as rpb


@dataclass(frozen=True, slots=True)
class Quote:
    offer: rpb.Offer  # stamped with its Exchange's name by discovery
    exchange: Exchange
    valid_until: datetime


class QuoteBook:
    def __init__(self, clock: Clock, max_age_seconds: float, size: int) -> None:
        self._clock = clock
        self._max_age = timedelta(seconds=max_age_seconds)
        self._size = size
        self._quotes: OrderedDict[tuple[str, str, str], Quote] = OrderedDict()

    def remember(self, discovery: Discovery) -> None:
        now = self._clock.now()
        for uri, offers in discovery.offers.items():
            for offer, ex in offers:
                until = now + self._max_age
                if offer.HasField("expires_at"):
                    until = min(until, offer.expires_at.ToDatetime(tzinfo=now.tzinfo))
                if until <= now:
                    continue
                key = (ex.name, offer.offer_id, uri)
                self._quotes[key] = Quote(offer, ex, until)
                self._quotes.move_to_end(key)
        while len(self._quotes) > self._size:
            self._quotes.popitem(last=False)

    def find(self, exchange: str, offer_id: str, uri: str) -> Quote | None:
        """The Exchange's current quote for this offer of this URI, if one is still valid."""
        key = (exchange, offer_id, uri)
        quote = self._quotes.get(key)
        if quote is None:
            return None
        if quote.valid_until <= self._clock.now():
            del self._quotes[key]
            return None
        return quote

    def __len__(self) -> int:
        return len(self._quotes)
