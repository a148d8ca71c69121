"""Rolling an unsettled hold forward: re-send its stored requests, commit what the Exchanges say.

A hold whose purchase may have reached an Exchange (its broker died between the
call and the commit, an Exchange did not answer, the store was down at commit) is
handed to whoever finds it: this broker after a restart, any broker's sweeper
after the TTL, or a retry of the key. The exact request is re-sent under the same
key; a RAMP Exchange answers a key it knows from its dedupe record and charges
nothing again, and one that never got it executes it now, inside the hold. An
Exchange that still cannot be reached leaves the hold counted; it is handed over
again later, after a longer lease each time (the store doubles it).
"""

from __future__ import annotations

import logging

from broker import wire
from broker.purchase.execute import Buyer, PartResult, stored_answer
from broker.purchase.selection import Candidate, Exchange
from budget.durability.intents import Intent, IntentError
from budget.period import HoldUnsettled, ItemSpend, OutcomePending, PeriodLayer
from budget.periods import from_ms
from budget.stores.contract import UnsettledHold
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, period: PeriodLayer, exchanges: dict[str, Exchange], buyer: Buyer) -> None:
        self._period = period
        self._exchanges = exchanges
        self._buyer = buyer

    async def roll_forward(self, account: str, unsettled: UnsettledHold) -> bytes | None:
        """Settle the hold; returns the key's stored answer (fingerprint, newline, TransactResponse),
        or None while some Exchange still has not answered (the hold stays counted)."""
        try:
            intent, hold = self._period.settling(account, unsettled)
        except IntentError as exc:
            log.error("hold %s in account %s has an unreadable intent (%s): it stays counted until an "
                      "operator settles it", unsettled.reservation_id, account, exc)
            return None
        key = unsettled.idempotency_key
        answers: dict[int, list[bpb.ItemResult]] = {
            p: list(bpb.TransactResponse.FromString(raw).items) for p, raw in unsettled.done.items()}
        charged_before = any(
            item.status in (bpb.ITEM_STATUS_PURCHASED, bpb.ITEM_STATUS_UNKNOWN)
            for items in answers.values() for item in items)
        todo = [p for p in range(len(intent.parts)) if p not in hold.done]
        results: dict[int, PartResult] = {}
        for p in todo:
            result = await self._resend(intent, p)
            if result is None or not result.answered:
                log.warning("hold %s: %s did not answer; it stays counted and is retried later",
                            unsettled.reservation_id, intent.parts[p].exchange)
                return None
            results[p] = result
        # Every part has its answer now: commit the new ones, the last of them ending the hold.
        outcomes = [o for r in results.values() for o in r.outcomes]
        if not charged_before and all(o.charged.is_zero() for o in outcomes):
            await self._period.release(hold)
            log.info("hold %s settled: nothing was charged", unsettled.reservation_id)
            return stored_answer(intent.fingerprint, self._answer(intent, key, answers, results))
        nothing_charged = [p for p in todo[:-1] if not results[p].charged()]
        for p in todo[:-1]:
            spent = [o.spend() for o in results[p].charged()]
            if spent:
                part_answer = bpb.TransactResponse(items=[o.item for o in results[p].outcomes])
                await self._period.commit(hold, spent, part_answer.SerializeToString(), part=p, final=False)
        last = todo[-1] if todo else 0
        stored = stored_answer(intent.fingerprint, self._answer(intent, key, answers, results))
        await self._period.commit(hold, [o.spend() for o in results[last].charged()] if todo else [], stored,
                                  part=last, final=True, nothing_charged=nothing_charged)
        if not hold.settled:
            return None  # the store refused to end it (a part not settled): it stays counted
        log.info("hold %s rolled forward: %d part(s) settled with their Exchanges", unsettled.reservation_id,
                 len(todo))
        return stored

    async def retry_answer(self, found: HoldUnsettled) -> bytes:
        """The stored answer for a retry of a key whose purchase was sent and never settled: its hold
        rolled forward now, or OutcomePending while an Exchange has not confirmed it."""
        result = await self.roll_forward(found.account, found.hold)
        if result is None:
            raise OutcomePending("this purchase was sent to an Exchange that has not confirmed it yet; the "
                                 "broker keeps asking: retry the same request later",
                                 found.hold.idempotency_key.partition("#")[2], "exchange",
                                 from_ms(found.hold.expires_ms))
        return result

    def total_charged(self, items: list[bpb.ItemResult], currency: str) -> Money:
        """What `items` say was charged, in `currency` (an operator's settlement builds its answer)."""
        return self._buyer.total_charged(items, currency)

    async def roll_forward_local(self, account: str, raw: bytes) -> tuple[list[ItemSpend], bytes] | None:
        """A fail-open or lease purchase whose intent the journal kept: re-send every part, and
        return what the Exchanges say they charged with the key's stored answer (None while one
        has not answered)."""
        try:
            intent = Intent.decode(raw)
        except IntentError as exc:
            log.error("a journaled intent in account %s is unreadable (%s): it stays counted", account, exc)
            return None
        results: dict[int, PartResult] = {}
        for p in range(len(intent.parts)):
            result = await self._resend(intent, p)
            if result is None or not result.answered:
                return None
            results[p] = result
        charged = [o.spend() for r in results.values() for o in r.charged()]
        return charged, stored_answer(intent.fingerprint, self._answer(intent, intent.key, {}, results))

    async def _resend(self, intent: Intent, p: int) -> PartResult | None:
        part = intent.parts[p]
        ex = self._exchanges.get(part.exchange)
        if ex is None:
            log.error("hold of key %r: exchange %s is not configured any more", intent.key, part.exchange)
            return None
        request = rpb.TransactionRequest.FromString(part.request)
        cands = [
            Candidate(uri=item.uri, offer=sent.offer, exchange=ex, price=item.quoted, unit_cost=item.quoted,
                      preferred=False, trust=ex.setting.trust)
            for item, sent in zip(part.items, request.items, strict=True)
        ]
        return await self._buyer.buy(ex, request, cands, intent.currency)

    def _answer(
        self, intent: Intent, key: str, earlier: dict[int, list[bpb.ItemResult]],
        results: dict[int, PartResult],
    ) -> bpb.TransactResponse:
        """The key's answer, as the purchase would have given it: every part's items, in order.
        `key` is the store's (`<agent id>#<key>`); the answer carries the agent's part."""
        response = bpb.TransactResponse(idempotency_key=key.partition("#")[2])
        for p in range(len(intent.parts)):
            if p in results:
                response.items.extend(o.item for o in results[p].outcomes)
            else:
                response.items.extend(earlier.get(p, []))
        response.total_cost.CopyFrom(wire.cost(self._buyer.total_charged(response.items, intent.currency)))
        return response
