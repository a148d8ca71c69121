"""Holding the money: the batch pruned to the tightest budget, paced, and held on every budget.

All of it before any Exchange is called, so nothing over budget reaches one. The session is held
first (in memory, no await), then every period counter in one store call, with the exact request
each Exchange will be sent as the hold's intent: whoever finds the hold unsettled can finish it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from connectrpc.code import Code

from broker.observe.watch import BudgetWatch
from broker.purchase.budgets import Budgets
from broker.purchase.execute import Buyer
from broker.purchase.order import Order
from broker.purchase.selection import Candidate, Discovery, Exchange, UriChoice, affordable, prune
from broker.purchase.validation import Constraints
from broker.refusals import NothingToBuy
from budget.durability.intents import IntentItem, PartOrder
from budget.layers import (
    BudgetExhausted,
    Headroom,
    Layer,
    Reservation,
    exhausted_reason,
    headroom_of,
    next_action,
)
from budget.pacing import Admitted, Pacer
from budget.period import PeriodHold, PeriodLayer, Plan
from budget.session import SessionAccount, SessionBudgets
from currency.convert import Converter, convert
from currency.money import Money, total
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

# An optimistic reservation, then re-reading headroom after a lost race for the last of a budget.
_RESERVE_ATTEMPTS = 4
# What pacing admitted of this purchase (set in its own task's context): in flight until it ends.
_PACED: ContextVar[Admitted] = ContextVar("paced", default=())


@dataclass(frozen=True)
class Part:
    """One Exchange's share of a purchase: the request it is sent, byte for byte, and its offers."""

    index: int
    exchange: Exchange
    request: rpb.TransactionRequest
    cands: list[Candidate]

    def order(self) -> PartOrder:
        return PartOrder(
            self.exchange.name, self.request.SerializeToString(deterministic=True),
            tuple(IntentItem(c.uri, c.offer.offer_id, c.price) for c in self.cands),
            total((c.price for c in self.cands), self.cands[0].price.currency))


@dataclass
class Held:
    """A purchase's money, held on every budget; what is bought is settled against it."""

    account: SessionAccount  # the session as registered (the view, if this purchase created it)
    session: Reservation
    period: PeriodHold | None
    parts: list[Part]
    # What the purchase leaves out, for its answer: URIs no offer of which fits, and the URIs pruned
    # to fit `room`, the tightest budget's.
    unfit: list[UriChoice] = field(default_factory=list)
    pruned: list[Candidate] = field(default_factory=list)
    room: Money | None = None

    @property
    def plan(self) -> Plan | None:
        return self.period.plan if self.period is not None else None


class Reserver:
    def __init__(
        self, sessions: SessionBudgets, period: PeriodLayer | None, budgets: Budgets, buyer: Buyer,
        converter: Converter, watch: BudgetWatch,
    ) -> None:
        self._sessions = sessions
        self._period = period
        self._budgets = budgets
        self._buyer = buyer
        self._converter = converter
        self._watch = watch

    async def reserve(
        self, account: SessionAccount, order: Order, plan: Plan | None, choices: Sequence[UriChoice],
        discovery: Discovery | None,
    ) -> Held:
        """Hold what fits on every budget. A denial is final only when the key was not bought
        before: a retry of a key bought earlier (on another broker, or before a restart) is
        replayed even when nothing fits any more (AlreadySettled, from the store)."""
        try:
            started = time.perf_counter()
            held = await self._reserve(account, order, plan, choices, discovery)
            self._watch.metrics.reservation.observe(time.perf_counter() - started)
            return held
        except (BudgetExhausted, NothingToBuy):
            if plan is not None and self._period is not None:
                await self._period.replay_if_settled(plan, order.store_key)
            raise

    async def _reserve(
        self, account: SessionAccount, order: Order, plan: Plan | None, choices: Sequence[UriChoice],
        discovery: Discovery | None,
    ) -> Held:
        """Prune to the tightest budget and hold the batch total on the session and period budgets."""
        currency = account.currency
        charge = order.charge
        drawn = False
        for attempt in range(_RESERVE_ATTEMPTS):
            if attempt:
                account = self._sessions.view(order.caller.id, order.session_id)  # as it is now
            # First try optimistically, pruned to the session only (in memory): the store
            # checks every period limit in the reservation itself, so a batch that fits costs
            # one store call. Only when it does not fit are the period budgets read to prune.
            optimistic = attempt == 0 and plan is not None and bool(plan.counters)
            snaps = [account.snap()] if optimistic else await self._budgets.snapshots(account, plan)
            room = headroom_of(snaps, currency, self._converter)
            fitted = [affordable(ch, room.room) for ch in choices]
            best = [ch.ranked[0] for ch in fitted if ch.ranked]
            kept, pruned = prune(best, room.room)
            if not kept:
                if optimistic:
                    continue  # explain the denial with every budget's numbers
                raise self._nothing_to_buy(fitted, room, order.constraints, discovery)
            cost = total((cand.price for cand in kept), account.currency)
            if plan is not None and not drawn:
                # A paced budget decides once per purchase, before anything is held (or read again): its
                # refusal is final, never taken for a lost race and drawn again below.
                drawn = True
                await self._pace(account, plan, cost)
            try:
                held = await self._hold(account, order, plan, kept, cost)
            except BudgetExhausted as exc:
                if exc.snapshot is not None:
                    self._watch.seen([exc.snapshot])  # the store's numbers: fresher than a lease's view
                # Another purchase took budget since headroom was read (or an operator changed
                # a limit, which the store made the period layer reload): look again.
                if attempt == _RESERVE_ATTEMPTS - 1:
                    raise
                if charge is not None and self._period is not None:
                    plan = await self._period.plan(charge)
                continue
            return replace(held, unfit=[ch for ch in fitted if not ch.ranked], pruned=pruned, room=room.room)
        raise AssertionError("unreachable")

    async def _pace(self, account: SessionAccount, plan: Plan, cost: Money) -> None:
        """Draw admission for every paced budget of the purchase (BudgetExhausted budget_paced); what
        is admitted counts as in flight until the purchase ends (end_pacing)."""
        pacer = self._watch.pacer
        if pacer is None or not any(c.pacing for c in plan.counters):
            return
        paced = [((plan.account, c.ref.scope, c.ref.period, c.ref.currency),
                  convert(cost, c.ref.currency, self._converter)) for c in plan.counters if c.pacing]
        if pacer.unread(key for key, _ in paced):
            await self._budgets.snapshots(account, plan)  # the curve needs the spend: read once a window
        _PACED.set(pacer.admit(paced))

    async def _hold(
        self, account: SessionAccount, order: Order, plan: Plan | None, kept: list[Candidate], cost: Money,
    ) -> Held:
        """Session first (in memory, no await), then every period counter in one store call, with
        the exact request each Exchange will be sent as the hold's intent."""
        by_exchange: dict[str, list[Candidate]] = {}
        for cand in kept:
            by_exchange.setdefault(cand.exchange.name, []).append(cand)
        parts = [Part(i, cands[0].exchange, self._buyer.request(cands, order.exchange_key), cands)
                 for i, cands in enumerate(by_exchange.values())]
        account, session = self._sessions.hold(order.caller.id, account, cost)
        if plan is None or order.charge is None or self._period is None:
            return Held(account, session, None, parts)
        try:
            period = await self._period.reserve(
                order.charge, plan, cost, order.store_key, [p.order() for p in parts],
                fingerprint=order.fingerprint)
            return Held(account, session, period, parts)
        except BaseException:
            await session.release()
            self._sessions.forget_unused(order.caller.id, account)  # a refused first purchase
            raise

    def _nothing_to_buy(
        self, fitted: Sequence[UriChoice], room: Headroom, c: Constraints,
        discovery: Discovery | None,
    ) -> Exception:
        """The error for a request with nothing left to buy, from its first URI's reason."""
        for ch in fitted:
            if ch.cheapest is not None and room.tightest is not None:
                # In the tightest budget's own currency, rounded up like a reservation.
                cost = convert(ch.cheapest, room.tightest.limit.currency, self._converter)
                return BudgetExhausted.from_snapshot(
                    room.tightest, cost, reason=exhausted_reason(room.tightest),
                    next_action=next_action(room.tightest),
                )
            if ch.over_cap is not None and c.max_price is not None:
                zero = Money.zero(c.max_price.currency)
                return BudgetExhausted(
                    layer=Layer.TRANSACTION, scope="max_price", limit=c.max_price, spent=zero,
                    reserved=zero, cost=ch.over_cap, reason="transaction_cap_exceeded",
                    next_action="raise constraints.max_price, or ask for cheaper resources",
                )
        if discovery is not None and discovery.calls and not discovery.any_answered:
            return NothingToBuy(Code.UNAVAILABLE, "no exchange answered: " + "; ".join(
                f"{c.exchange}: {c.detail}" for c in discovery.calls), "exchange_unavailable",
                discovery.calls)
        reasons = "; ".join(f"{ch.uri}: {ch.detail}" for ch in fitted[:8])
        if all(ch.reason == bpb.DROP_REASON_NO_OFFERS for ch in fitted):
            return NothingToBuy(Code.NOT_FOUND, f"no exchange offered any of the URIs ({reasons})",
                                "no_offers", discovery.calls if discovery else ())
        return NothingToBuy(Code.FAILED_PRECONDITION, f"no offer passes the constraints ({reasons})",
                            "no_offer_meets_constraints")


def end_pacing(pacer: Pacer | None) -> None:
    """This task's purchase has ended: what pacing admitted of it is in the budgets' readings now (or
    there is none), no longer in flight."""
    if (admitted := _PACED.get()) and pacer is not None:
        pacer.done(admitted)
