"""Asking one Exchange to buy, and reading what it says it charged.

The Exchange is the authority on money: what it answers is recorded as charged,
an answer that never came (timeout, dropped connection) keeps the hold counted
as spent, and a charge above the quote is recorded in full, flagged, and makes
that Exchange rank lower afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.purchase.selection import Candidate, Exchange
from broker.refusals import InvalidField
from budget.period import ItemSpend
from currency.convert import Converter, convert
from currency.money import Money, MoneyError, total
from exchange_client.adapter import ExchangeError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One item's result and what it means for the budgets (in budget currency)."""

    item: bpb.ItemResult
    charged: Money  # counted as spent (actual, or the hold when unknown)
    actual: Money | None  # what the Exchange said it charged
    cand: Candidate
    original: Money | None = None  # `actual` in the currency the Exchange charged in

    def spend(self) -> ItemSpend:
        """This item as the period layer records it."""
        return ItemSpend(self.cand.exchange.name, self.cand.offer.offer_id, self.cand.uri,
                         self.original or self.charged, self.charged)


@dataclass
class PartResult:
    """What one Exchange said about its part of a purchase."""

    outcomes: list[Outcome]
    answered: bool = True  # False: no answer; it may have charged (the part stays unsettled)

    def charged(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.charged.is_zero()]


class Buyer:
    def __init__(
        self, requester: rpb.Requester, timeout_s: float, converter: Converter,
        overcharged: Callable[[str], None],
    ) -> None:
        self._requester = requester
        self._timeout_s = timeout_s
        self._converter = converter
        self._overcharged = overcharged

    def request(self, cands: Sequence[Candidate], key: str) -> rpb.TransactionRequest:
        """The exact request an Exchange is sent for these offers under `key`."""
        return rpb.TransactionRequest(
            ver="1", idempotency_key=key, requester=self._requester,
            items=[rpb.TransactionItem(offer=cand.offer) for cand in cands],
        )

    async def buy(
        self, ex: Exchange, request: rpb.TransactionRequest, cands: Sequence[Candidate], currency: str
    ) -> PartResult:
        """Send `request` (the offers of `cands`, in order) and read the answer. Not `answered` when
        the Exchange may have acted but said nothing: the hold stays until it is rolled forward."""
        answer: rpb.TransactionResponse | None = None
        failure: ExchangeError | None = None
        for _ in range(2):  # one retry, same key: the Exchange charges a key once
            try:
                answer = await ex.adapter.execute(request, self._timeout_s)
                break
            except ExchangeError as exc:
                failure = exc
                if not exc.ambiguous:
                    break
        if answer is None:
            assert failure is not None
            return PartResult([_failed(cand, failure) for cand in cands], answered=not failure.ambiguous)
        return PartResult([self._outcome(cand, res, currency) for cand, res in _match(cands, answer)])

    def total_charged(self, items: Sequence[bpb.ItemResult], currency: str) -> Money:
        """What the Exchanges said they charged for `items`, in `currency` (rounded up)."""
        charged = []
        for item in items:
            if item.status == bpb.ITEM_STATUS_PURCHASED:
                cost = item.result.cost
                spent = Money.parse(cost.amount, cost.currency, "cost")
                charged.append(convert(spent, currency, self._converter))
        return total(charged, currency)

    def _outcome(
        self, cand: Candidate, res: rpb.TransactionResultItem | None, currency: str
    ) -> Outcome:
        item = bpb.ItemResult(uri=cand.uri, offer=cand.offer)
        zero = Money.zero(currency)
        if res is None:
            item.status = bpb.ITEM_STATUS_UNKNOWN
            item.detail = "exchange answer has no result for this offer; the reserved amount stays spent"
            return Outcome(item, cand.price, None, cand)
        item.result.CopyFrom(res)
        if res.denial_reason != rpb.DENIAL_REASON_UNSPECIFIED:
            item.status = bpb.ITEM_STATUS_DENIED
            item.detail = rpb.DenialReason.Name(res.denial_reason)
            return Outcome(item, zero, None, cand)
        try:
            original = Money.parse(res.cost.amount, res.cost.currency, "cost")
            actual = convert(original, currency, self._converter)
        except MoneyError as exc:
            item.status = bpb.ITEM_STATUS_UNKNOWN
            item.detail = f"exchange reported an unusable cost ({exc}); the reserved amount stays spent"
            return Outcome(item, cand.price, None, cand)
        item.status = bpb.ITEM_STATUS_PURCHASED
        if actual > cand.price:
            # Recorded in full, never dropped: the Exchange is the authority. It broke its quote.
            log.warning("overcharge: %s/%s charged %s, quoted %s", cand.exchange.name,
                        cand.offer.offer_id, actual, cand.price)
            self._overcharged(cand.exchange.name)
        return Outcome(item, actual, actual, cand, original)


def _failed(cand: Candidate, failure: ExchangeError) -> Outcome:
    item = bpb.ItemResult(uri=cand.uri, offer=cand.offer)
    if failure.ambiguous:
        # The Exchange may have charged: the hold stays counted until the broker settles it with
        # the Exchange (re-sending this very request), erring toward stopping early.
        item.status = bpb.ITEM_STATUS_UNKNOWN
        item.detail = (f"exchange did not answer ({failure.kind}); the reserved amount stays held until "
                       "the broker settles the purchase with the Exchange")
        return Outcome(item, cand.price, None, cand)
    item.status = bpb.ITEM_STATUS_FAILED
    item.detail = f"exchange refused the request ({failure.kind}): {failure.detail}"
    return Outcome(item, Money.zero(cand.price.currency), None, cand)


def _match(
    cands: Sequence[Candidate], answer: rpb.TransactionResponse
) -> list[tuple[Candidate, rpb.TransactionResultItem | None]]:
    """Pairs each bought offer with its result: by position when the answer lines up, else by id."""
    items = list(answer.items)
    if len(items) == len(cands) and all(
        i.offer_id == c.offer.offer_id for i, c in zip(items, cands, strict=True)
    ):
        return list(zip(cands, items, strict=True))
    by_id: dict[str, list[rpb.TransactionResultItem]] = {}
    for i in items:
        by_id.setdefault(i.offer_id, []).append(i)
    return [(c, by_id[c.offer.offer_id].pop(0) if by_id.get(c.offer.offer_id) else None)
            for c in cands]


def stored_answer(fingerprint: str, answer: bpb.TransactResponse) -> bytes:
    """A key's answer as the store keeps it for replay: the request's fingerprint, then the answer."""
    return fingerprint.encode() + b"\n" + answer.SerializeToString()


def replayed(stored: bytes, fingerprint: str) -> bpb.TransactResponse:
    """A stored answer shown again, to a request with the same fingerprint only."""
    if not stored:
        # Recorded from a fail-open journal: the spend is known, the original answer is not.
        return bpb.TransactResponse(replayed=True)
    digest, _, body = stored.partition(b"\n")
    if digest.decode() != fingerprint:
        raise InvalidField("idempotency_key", "was already used for a different request")
    answer = bpb.TransactResponse.FromString(body)
    answer.replayed = True
    return answer
