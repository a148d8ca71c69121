"""Offers as the Exchanges quoted them to this broker, kept while they are valid.

The price the broker reserves is always an Exchange's: an agent that chooses an
offer from Resolve names it (exchange, offer id, URI) and the broker looks it up
here, or asks the Exchange again. Only the broker's own discoveries fill the book.
A quote is valid until its offer expires, and never longer than `max_age` after
it was obtained (an offer without an expiry is not a promise forever).

The book also remembers each Exchange's whole answer for a URI, so a purchase of
a URI that every Exchange it may buy from has quoted (and whose quotes are all
still valid) needs no discovery call: `known` splits the Exchanges into those
answered from the book and those to ask. Only answers with offers are kept (an
Exchange that offered nothing is asked again), and an answer is dropped when a
purchase from it fails, so the next purchase asks again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.purchase.selection import Discovery, Exchange
from common.clock import Clock
from ramp.broker.v1 import broker_pb2 as bpb
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
        # (exchange, uri) -> every offer the Exchange quoted for the URI, valid until the first expires.
        self._answers: OrderedDict[tuple[str, str], tuple[list[Quote], datetime]] = OrderedDict()

    def remember(self, discovery: Discovery) -> None:
        now = self._clock.now()
        answered = {c.exchange for c in discovery.calls if c.outcome == bpb.ExchangeCall.OUTCOME_OK}
        for uri, offers in discovery.offers.items():
            by_exchange: dict[str, list[Quote] | None] = {name: [] for name in answered}
            for offer, ex in offers:
                until = now + self._max_age
                if offer.HasField("expires_at"):
                    until = min(until, offer.expires_at.ToDatetime(tzinfo=now.tzinfo))
                if until <= now:
                    by_exchange[ex.name] = None  # an answer with an expired offer is not reused
                    continue
                key = (ex.name, offer.offer_id, uri)
                self._quotes[key] = quote = Quote(offer, ex, until)
                self._quotes.move_to_end(key)
                kept = by_exchange.get(ex.name)
                if kept is not None:
                    kept.append(quote)
            for name, quotes in by_exchange.items():
                self._answers.pop((name, uri), None)
                if quotes:
                    self._answers[(name, uri)] = (quotes, min(q.valid_until for q in quotes))
        for book in (self._quotes, self._answers):
            while len(book) > self._size:
                book.popitem(last=False)

    def known(
        self, exchanges: Sequence[Exchange], uris: Sequence[str]
    ) -> tuple[dict[str, list[tuple[rpb.Offer, Exchange]]], list[Exchange]]:
        """The offers of every Exchange whose valid answers cover all `uris`, and the Exchanges that
        must be asked (all the URIs: one call each, as a discovery would make)."""
        now = self._clock.now()
        offers: dict[str, list[tuple[rpb.Offer, Exchange]]] = {uri: [] for uri in uris}
        ask: list[Exchange] = []
        for ex in exchanges:
            answers = [self._answers.get((ex.name, uri)) for uri in uris]
            if not all(a is not None and a[1] > now for a in answers):
                ask.append(ex)
                continue
            for uri, answer in zip(uris, answers, strict=True):
                assert answer is not None
                offers[uri].extend((q.offer, q.exchange) for q in answer[0])
        return offers, ask

    def forget(self, exchange: str, uri: str) -> None:
        """A purchase from this answer failed: ask the Exchange again next time."""
        self._answers.pop((exchange, uri), None)

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
