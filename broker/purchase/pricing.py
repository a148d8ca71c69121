"""Pricing a purchase: what the Exchanges offer for its URIs, at their own prices.

Buying by URI, the offers come from an Exchange's still-valid answers where it has quoted every
URI (no call), else from asking it now (selection.discover). Offers an agent chose from Resolve
are priced from the quotes this broker obtained (still valid), else from a fresh discovery: an
offer no Exchange quotes is refused, and so is a price the agent sent that differs from the quote.
The price reserved is always an Exchange's, never the agent's.
"""

from __future__ import annotations

from collections.abc import Sequence

from connectrpc.code import Code

from broker.config import BrokerConfig
from broker.purchase.execute import Outcome
from broker.purchase.order import ChosenOffer, Order
from broker.purchase.quotes import QuoteBook
from broker.purchase.selection import Discovery, Exchange, discover, exchanges_for
from broker.purchase.validation import Constraints
from broker.refusals import InvalidField, NothingToBuy
from broker.wire import offer_price
from common.clock import Clock
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

Offers = dict[str, list[tuple[rpb.Offer, Exchange]]]  # per URI, every offer with its Exchange


class Pricing:
    def __init__(
        self, config: BrokerConfig, exchanges: dict[str, Exchange], requester: rpb.Requester, clock: Clock,
    ) -> None:
        self._config = config
        self._exchanges = exchanges
        self._requester = requester
        self._quotes = QuoteBook(clock, config.quotes.max_age_seconds, config.quotes.cache_size)

    async def discover(self, uris: Sequence[str], c: Constraints, overall_ms: int) -> Discovery:
        """Every Exchange's offers for `uris`, asked now and remembered (Resolve: an offer chosen from
        this answer is priced from these)."""
        discovery = await self._ask(exchanges_for(self._exchanges, c), uris, overall_ms)
        self._quotes.remember(discovery)
        return discovery

    async def offered(self, uris: Sequence[str], c: Constraints, overall_ms: int) -> Discovery:
        """What the Exchanges offer for `uris`: from an Exchange's still-valid answers where it has
        quoted every URI (no call), else asked now; the answers are remembered for the next purchase."""
        if not self._config.quotes.reuse:
            return await self._ask(exchanges_for(self._exchanges, c), uris, overall_ms)
        known, ask = self._quotes.known(exchanges_for(self._exchanges, c), uris)
        if not ask:
            return Discovery(offers=known)
        discovery = await self._ask(ask, uris, overall_ms)
        self._quotes.remember(discovery)
        for uri, offers in known.items():
            discovery.offers[uri].extend(offers)
        return discovery

    async def quoted(self, order: Order) -> tuple[Offers, list[bpb.ExchangeCall]]:
        """The chosen offers as their Exchanges quote them now: from quotes this broker obtained
        (still valid), else from a fresh discovery. An offer no Exchange quotes is refused, and
        so is a price the agent sent that differs from the quote."""
        calls: list[bpb.ExchangeCall] = []
        missing = [ch for ch in order.chosen if self._quotes.find(ch.exchange, ch.offer_id, ch.uri) is None]
        if missing:
            asked = sorted({ch.exchange for ch in missing})
            discovery = await self._ask([self._exchanges[name] for name in asked],
                                        list(dict.fromkeys(ch.uri for ch in missing)), order.deadline_ms)
            self._quotes.remember(discovery)
            calls = discovery.calls
        offers: Offers = {uri: [] for uri in order.uris}
        for ch in order.chosen:
            quote = self._quotes.find(ch.exchange, ch.offer_id, ch.uri)
            if quote is None:
                raise _not_quoted(ch, calls)
            if ch.claimed is not None:
                price, unit = offer_price(quote.offer)
                if ch.claimed != (price, unit, quote.offer.pricing.model):
                    raise InvalidField(
                        f"{ch.field}.offer.pricing",
                        f"differs from {ch.exchange}'s quote for offer {ch.offer_id!r} ({price}); send "
                        "the offer exactly as Resolve returned it, or only its exchange and offer_id")
            offers[ch.uri].append((quote.offer, quote.exchange))
        return offers, calls

    def forget_unbought(self, outcomes: Sequence[Outcome]) -> None:
        """An offer a purchase did not get is asked for again next time, not taken from its answer."""
        for o in outcomes:
            if o.item.status != bpb.ITEM_STATUS_PURCHASED:
                self._quotes.forget(o.cand.exchange.name, o.cand.uri)

    async def _ask(self, exchanges: Sequence[Exchange], uris: Sequence[str], overall_ms: int) -> Discovery:
        return await discover(exchanges, uris, self._requester, self._config.fanout.discover_timeout_ms,
                              overall_ms)


def _not_quoted(ch: ChosenOffer, calls: Sequence[bpb.ExchangeCall]) -> NothingToBuy:
    asked = [c for c in calls if c.exchange == ch.exchange]
    if asked and all(c.outcome != bpb.ExchangeCall.OUTCOME_OK for c in asked):
        return NothingToBuy(Code.UNAVAILABLE, f"{ch.field}: {ch.exchange} did not answer, so offer "
                            f"{ch.offer_id!r} cannot be priced: {asked[0].detail}",
                            "exchange_unavailable", asked)
    return NothingToBuy(Code.FAILED_PRECONDITION, f"{ch.field}: {ch.exchange} does not quote offer "
                        f"{ch.offer_id!r} for {ch.uri} now (expired, withdrawn, or never offered)",
                        "offer_not_quoted", asked)
