"""Buying and settling: every Exchange asked for its part at once, each part committed as it answers.

A fast Exchange's charge is recorded without waiting for a slow one. The last part's commit ends
the hold, and stores the purchase's answer with it so that any broker can replay the key; it is
made only once every other part is recorded too. A part without an answer, or whose commit did
not land, stays held with its intent until it is rolled forward (broker.purchase.recovery): once
an Exchange may have been asked to charge, nothing is refunded blindly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from broker.purchase import answer
from broker.purchase.execute import Buyer, Outcome, PartResult, stored_answer
from broker.purchase.idempotency import Key
from broker.purchase.order import Order
from broker.purchase.reserve import Held, Part
from budget.layers import Snapshot
from budget.period import PeriodLayer
from budget.stores.contract import StoreUnavailable
from currency.money import Money, total
from ramp.broker.v1 import broker_pb2 as bpb


@dataclass(frozen=True, slots=True)
class Bought:
    outcomes: list[Outcome]  # every item's, part after part
    committed: list[Snapshot] | None  # the period budgets as the last commit left them (None: none did)


class Settler:
    def __init__(self, buyer: Buyer, period: PeriodLayer | None, forget: Callable[[Key], None]) -> None:
        self._buyer = buyer
        self._period = period
        # A key whose answer cannot be final is forgotten at once: a retry goes to the store.
        self._forget = forget

    async def buy(self, order: Order, held: Held, response: bpb.TransactResponse) -> Bought:
        """Ask every Exchange for its part at once, and commit each part as its answer arrives. If
        anything fails, how far the purchase got is unknown: the session counts the whole hold, and
        the period hold stays with its intent for whoever rolls it forward."""
        currency = held.account.currency
        results: dict[int, PartResult] = {}
        settling = asyncio.Lock()  # commits of one purchase go one after another
        after: list[Snapshot] | None = None

        async def buy(part: Part) -> None:
            nonlocal after
            result = await self._buyer.buy(part.exchange, part.request, part.cands, currency)
            async with settling:
                results[part.index] = result
                if held.period is not None and self._period is not None:
                    snaps = await self._settle_part(order, held, part, result, results, response)
                    after = snaps or after

        try:
            await asyncio.gather(*(buy(part) for part in held.parts))
        except BaseException:
            if held.period is not None and self._period is not None:
                self._period.hand_over(held.period)
            await held.session.commit(held.session.amount)
            raise
        return Bought([o for part in held.parts for o in results[part.index].outcomes], after)

    async def settle_session(self, held: Held, outcomes: list[Outcome]) -> Money:
        """The session keeps what was charged (the hold when unknown) and gets the rest back."""
        spent = total((o.charged for o in outcomes), held.account.currency)
        if spent.is_zero():
            await held.session.release()
        else:
            await held.session.commit(spent)
        return spent

    def keep_unsettled(self, order: Order, held: Held) -> None:
        """A purchase not settled yet: its hold stays for whoever rolls it forward, and a retry of its
        key goes to the store (and rolls it forward), not to this answer."""
        assert held.period is not None
        assert self._period is not None
        self._period.hand_over(held.period)
        self._forget((order.caller.id, order.key))

    async def _settle_part(
        self, order: Order, held: Held, part: Part, result: PartResult, results: dict[int, PartResult],
        response: bpb.TransactResponse,
    ) -> list[Snapshot] | None:
        """Commit one Exchange's answer; the last one ends the hold, but only once every other part is
        recorded too (committed, or answered with nothing charged): a part whose commit did not
        land keeps its hold and intent until it is rolled forward. Called under the purchase's lock."""
        assert held.period is not None
        assert self._period is not None
        if not result.answered:
            return None  # stays held with its intent: rolled forward later
        if held.period.settled:
            return None  # another broker rolling it forward committed the key first: counted by it
        items = [o.spend() for o in result.charged()]
        others = {p.index: results.get(p.index) for p in held.parts if p.index != part.index}
        nothing_charged = [i for i, r in others.items() if r is not None and r.answered and not r.charged()]
        last = all(r is not None and r.answered for r in others.values()) and \
            set(others) <= held.period.done | set(nothing_charged)
        try:
            if last:
                everything = [o for p in held.parts for o in results[p.index].outcomes]
                if all(o.charged.is_zero() for o in everything):
                    await self._period.release(held.period)  # nothing bought: the key may be retried
                    return None
                final = bpb.TransactResponse()
                final.CopyFrom(response)
                answer.add_items(final, everything, held.session.amount.currency)
                # The answer is stored with the commit, so any broker can replay this key.
                return await self._period.commit(held.period, items, stored_answer(order.fingerprint, final),
                                                 part=part.index, final=True, nothing_charged=nothing_charged)
            if items:
                part_answer = bpb.TransactResponse(items=[o.item for o in result.outcomes])
                return await self._period.commit(held.period, items, part_answer.SerializeToString(),
                                                 part=part.index, final=False)
        except StoreUnavailable:
            # The Exchange's answer stands; the hold and its intent stay in the store until a
            # roll-forward commits them (the Exchange answers it from its dedupe record).
            self._forget((order.caller.id, order.key))
        return None
