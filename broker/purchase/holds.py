"""Operators' view of holds that may have reached an Exchange, and settling one by hand.

A hold with an intent is never refunded blindly: brokers roll it forward with
its Exchanges (broker.purchase.recovery). When an Exchange never answers again (it is
gone, or it lost the purchase), only an operator who has asked it some other
way can say what happened. `ListHolds` shows every open hold with what each
part asked for and holds; `SettleHold` retries it now, or commits it on the
operator's word: the quotes were charged (CHARGED), or nothing was (REFUNDED).
Every settlement is logged at WARNING with the operator's action.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.message import DecodeError

from broker import wire
from broker.purchase.execute import stored_answer
from broker.purchase.recovery import Recovery
from budget.durability.intents import Intent, IntentError, IntentPart
from budget.period import ItemSpend, PeriodHold, PeriodLayer, StoreDown
from budget.periods import from_ms, to_ms
from budget.stores.contract import StoreUnavailable, UnsettledHold
from common.clock import Clock
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)

ACTIONS: dict[int, str] = {
    bpb.SETTLE_ACTION_RETRY: "retry",
    bpb.SETTLE_ACTION_CHARGED: "charged",
    bpb.SETTLE_ACTION_REFUNDED: "refunded",
}


class HoldDesk:
    def __init__(self, period: PeriodLayer, recovery: Recovery, clock: Clock) -> None:
        self._period = period
        self._recovery = recovery
        self._clock = clock

    # --- listing --------------------------------------------------------------------------------

    async def listing(self, accounts: Iterable[str], scope: str = "") -> list[bpb.PurchaseHold]:
        out: list[bpb.PurchaseHold] = []
        for account in accounts:
            for hold in await self._holds(account):
                shown = describe(account, hold)
                # An unreadable intent names no scope: shown anyway, an operator must see it.
                if not scope or shown.problem or any(
                        h.scope == scope for p in shown.parts for h in p.holds):
                    out.append(shown)
        return out

    async def _holds(self, account: str) -> list[UnsettledHold]:
        try:
            return await self._period.store.holds(account)
        except StoreUnavailable:
            raise StoreDown(f"the budget store cannot be reached: the holds of account {account} "
                            "cannot be read now") from None

    async def _find(self, account: str, reservation_id: str) -> UnsettledHold | None:
        return next((h for h in await self._holds(account) if h.reservation_id == reservation_id), None)

    # --- settling -------------------------------------------------------------------------------

    async def settle(self, account: str, reservation_id: str, action: int) -> bpb.SettleHoldResponse:
        name = ACTIONS[action]
        found = await self._find(account, reservation_id)
        if found is None:
            answer = bpb.SettleHoldResponse(
                outcome=bpb.SETTLE_OUTCOME_NOT_FOUND,
                detail=f"account {account} has no open hold {reservation_id} (settled meanwhile, or "
                       "never made)")
        else:
            try:
                if action == bpb.SETTLE_ACTION_RETRY:
                    answer = await self._retry(account, found)
                else:
                    answer = await self._on_word(account, found, charged=action == bpb.SETTLE_ACTION_CHARGED)
            except StoreUnavailable:
                # Nothing known to be recorded: the hold stays as it was, counted.
                log.warning("operator settlement (%s) of hold %s in account %s: the store could not be "
                            "reached; the hold stays", name, reservation_id, account)
                raise StoreDown("the budget store cannot be reached: the hold stays as it was; retry "
                                "the settlement later") from None
        log.warning("operator settlement (%s) of hold %s in account %s (key %r): %s: %s", name,
                    reservation_id, account, found.idempotency_key if found else "",
                    bpb.SettleOutcome.Name(answer.outcome).removeprefix("SETTLE_OUTCOME_").lower(),
                    answer.detail)
        return answer

    async def _retry(self, account: str, hold: UnsettledHold) -> bpb.SettleHoldResponse:
        stored = await self._recovery.roll_forward(account, hold)
        if stored is None:
            return bpb.SettleHoldResponse(
                outcome=bpb.SETTLE_OUTCOME_UNSETTLED,
                detail="an Exchange still did not answer (or the hold's intent is unreadable): the "
                       "hold stays counted; retry later, or settle it with charged or refunded")
        answer = bpb.TransactResponse.FromString(stored.partition(b"\n")[2])
        return _settled(f"rolled forward with its Exchanges: {_summary(answer)}", answer)

    async def _on_word(self, account: str, found: UnsettledHold, *, charged: bool) -> bpb.SettleHoldResponse:
        try:
            intent, hold = self._period.settling(account, found)
        except IntentError as exc:
            if charged or found.done:
                raise ConnectError(Code.FAILED_PRECONDITION, f"hold {found.reservation_id} has an "
                                   f"unreadable intent ({exc}): what it asked is unknown, so it can "
                                   "only be refunded, and only while no part of it is committed") from None
            # Nothing of it was committed and the operator says nothing was charged.
            return await self._release(account, found, bpb.TransactResponse(), "its intent is unreadable")
        todo = [p for p in range(len(intent.parts)) if p not in hold.done]
        items = {p: _operator_items(intent.parts[p], charged) for p in todo}
        answer = bpb.TransactResponse(idempotency_key=found.idempotency_key.partition("#")[2])
        for p in range(len(intent.parts)):
            answer.items.extend(items[p] if p in items
                                else bpb.TransactResponse.FromString(found.done[p]).items)
        total = self._recovery.total_charged(list(answer.items), intent.currency)
        answer.total_cost.CopyFrom(wire.cost(total))
        stored = stored_answer(intent.fingerprint, answer)
        if not charged and not hold.done:
            return await self._release(account, found, answer, _summary(answer))
        await self._commit(intent, hold, todo, charged, stored)
        what = "committed as charged at the quoted prices" if charged else "the rest refunded"
        return _settled(f"{what}: {_summary(answer)}", answer)

    async def _commit(
        self, intent: Intent, hold: PeriodHold, todo: list[int], charged: bool, stored: bytes
    ) -> None:
        """Each part not yet done, the last one ending the hold (as a roll-forward would)."""
        last = todo[-1] if todo else 0
        for p in todo[:-1]:
            spent = _spends(intent.parts[p]) if charged else []
            part = bpb.TransactResponse(items=_operator_items(intent.parts[p], charged))
            await self._period.commit(hold, spent, part.SerializeToString(), part=p, final=False)
        spent = _spends(intent.parts[last]) if charged and todo else []
        await self._period.commit(hold, spent, stored, part=last, final=True)

    async def _release(
        self, account: str, found: UnsettledHold, answer: bpb.TransactResponse, what: str
    ) -> bpb.SettleHoldResponse:
        """The whole hold back (the key is forgotten, as for a purchase that never happened)."""
        # The store itself, not PeriodLayer.release: that one hides an unreachable store, and the
        # operator must be told whether the refund happened.
        if not await self._period.store.release(account, found.reservation_id,
                                                now_ms=to_ms(self._clock.now())):
            return bpb.SettleHoldResponse(
                outcome=bpb.SETTLE_OUTCOME_NOT_FOUND,
                detail=f"hold {found.reservation_id} was settled by someone else meanwhile")
        return _settled(f"refunded: nothing was charged ({what})", answer)


def describe(account: str, hold: UnsettledHold) -> bpb.PurchaseHold:
    """A hold as ListHolds shows it: its parts, items and per-counter holds, from its intent."""
    shown = bpb.PurchaseHold(
        account=account, reservation_id=hold.reservation_id, idempotency_key=hold.idempotency_key,
        owner=hold.owner, attempts=hold.attempts)
    shown.created_at.CopyFrom(wire.timestamp(from_ms(hold.created_ms)))
    shown.expires_at.CopyFrom(wire.timestamp(from_ms(hold.expires_ms)))
    try:
        intent = Intent.decode(hold.intent)
    except IntentError as exc:
        shown.problem = str(exc)
        return shown
    for p, part in enumerate(intent.parts):
        try:
            key = rpb.TransactionRequest.FromString(part.request).idempotency_key
        except DecodeError:  # shown without its key: a listing never fails on one hold
            key = ""
        shown.parts.append(bpb.HoldPart(
            exchange=part.exchange, exchange_key=key, done=p in hold.done,
            items=[bpb.HoldItem(uri=i.uri, offer_id=i.offer_id, quoted=wire.cost(i.quoted))
                   for i in part.items],
            holds=[bpb.CounterHold(scope=h.counter.scope, period=h.counter.period, window=h.counter.window,
                                   amount=wire.cost(Money.from_units(units, h.counter.currency)))
                   for h, units in zip(intent.holds, part.holds, strict=True)],
        ))
    return shown


def _operator_items(part: IntentPart, charged: bool) -> list[bpb.ItemResult]:
    """The part's items as the operator reported them: bought at the quote, or not charged."""
    request = rpb.TransactionRequest.FromString(part.request)
    out = []
    for item, sent in zip(part.items, request.items, strict=True):
        result = bpb.ItemResult(uri=item.uri, offer=sent.offer)
        if charged:
            result.status = bpb.ITEM_STATUS_PURCHASED
            result.result.CopyFrom(rpb.TransactionResultItem(offer_id=item.offer_id,
                                                             cost=wire.cost(item.quoted)))
            result.detail = "settled by an operator: the Exchange charged the quoted price"
        else:
            result.status = bpb.ITEM_STATUS_FAILED
            result.detail = "settled by an operator: the Exchange charged nothing"
        out.append(result)
    return out


def _spends(part: IntentPart) -> list[ItemSpend]:
    return [ItemSpend(part.exchange, i.offer_id, i.uri, i.quoted, i.quoted)
            for i in part.items if not i.quoted.is_zero()]


def _summary(answer: bpb.TransactResponse) -> str:
    bought = sum(1 for i in answer.items if i.status == bpb.ITEM_STATUS_PURCHASED)
    cost = f"{answer.total_cost.amount} {answer.total_cost.currency}".strip()
    return f"{bought} of {len(answer.items)} item(s) charged" + (f", {cost} in all" if cost else "")


def _settled(detail: str, answer: bpb.TransactResponse) -> bpb.SettleHoldResponse:
    return bpb.SettleHoldResponse(outcome=bpb.SETTLE_OUTCOME_SETTLED, detail=detail,
                                  items=answer.items, total_cost=answer.total_cost)
