"""Resolve and Transact: the purchase flow.

validate every field (broker.purchase.order) -> discover, or price the chosen offers from
the Exchanges' own quotes (broker.purchase.quotes) -> filter and rank -> prune to the
tightest budget -> reserve on every budget -> ExecuteTransaction per Exchange
(broker.purchase.execute) -> commit what was charged, release the rest. Nothing over
budget reaches an Exchange: the reservation is taken before the first purchase
call. Sessions, idempotency keys and replays belong to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal

from connectrpc.code import Code

from broker import wire
from broker.config import BrokerConfig
from broker.observe.logs import IDEMPOTENCY_KEY
from broker.observe.metrics import Metrics
from broker.observe.watch import BudgetWatch
from broker.purchase.agents import ANONYMOUS, Agent, charge_for
from broker.purchase.execute import Buyer, PartResult, replayed, stored_answer
from broker.purchase.idempotency import Entry, IdempotencyCache
from broker.purchase.order import ChosenOffer, Order, check_order, dedupe
from broker.purchase.quotes import QuoteBook
from broker.purchase.recovery import Recovery
from broker.purchase.selection import (
    Candidate,
    Discovery,
    Exchange,
    TrustPenalties,
    UriChoice,
    affordable,
    choose,
    discover,
    exchanges_for,
    prune,
)
from broker.purchase.validation import (
    Constraints,
    check_constraints,
    check_deadline_ms,
    check_id,
    check_uris,
)
from broker.refusals import InvalidField, NothingToBuy
from broker.wire import offer_price
from budget.durability.intents import IntentItem, PartOrder
from budget.forecast import SpendRates
from budget.layers import (
    BudgetExhausted,
    Headroom,
    Layer,
    Reservation,
    Snapshot,
    exhausted_reason,
    headroom_of,
    next_action,
)
from budget.pacing import Admitted
from budget.period import (
    AlreadySettled,
    Charge,
    HoldUnsettled,
    OutcomePending,
    PeriodHold,
    PeriodLayer,
    Plan,
    StoreDown,
)
from budget.periods import from_ms
from budget.session import SessionAccount, SessionBudgets
from budget.stores.contract import StoreUnavailable, UnsettledHold
from common.clock import Clock
from currency.convert import ConversionError, Converter, convert
from currency.money import Money, total
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)

# An optimistic reservation, then re-reading headroom after a lost race for the last of a budget.
_RESERVE_ATTEMPTS = 4
# What pacing admitted of this purchase (set in its own task's context): in flight until it ends.
_PACED: ContextVar[Admitted] = ContextVar("paced", default=())


class AfterWire(Exception):
    """A purchase failed after Exchanges were asked to buy: its key is kept, never re-bought."""


class Purchaser:
    def __init__(
        self, config: BrokerConfig, exchanges: dict[str, Exchange], sessions: SessionBudgets,
        converter: Converter, clock: Clock, period: PeriodLayer | None = None,
        watch: BudgetWatch | None = None,
    ) -> None:
        self._config = config
        self._exchanges = exchanges
        self._sessions = sessions
        self._converter = converter
        self._clock = clock
        self._period = period
        self._watch = watch or BudgetWatch(SpendRates(config.forecast.half_life_seconds), Metrics())
        self._idem = IdempotencyCache(config.idempotency_cache_size)
        self._running: set[asyncio.Task[bpb.TransactResponse]] = set()
        self._quotes = QuoteBook(clock, config.quotes.max_age_seconds, config.quotes.cache_size)
        self._penalties = TrustPenalties()
        self._requester = rpb.Requester(
            id=config.requester.id, domain=config.requester.domain, name=config.requester.name,
            type="broker",
        )
        self._buyer = Buyer(self._requester, config.fanout.execute_timeout_ms / 1000, converter,
                            self._overcharged)
        self.recovery = Recovery(period, exchanges, self._buyer) if period is not None else None
        if period is not None and self.recovery is not None:
            period.recover = self._recover
            period.recover_local = self.recovery.roll_forward_local

    async def _recover(self, account: str, hold: UnsettledHold) -> None:
        assert self.recovery is not None
        await self.recovery.roll_forward(account, hold)

    def _overcharged(self, exchange: str) -> None:
        self._penalties.overcharged(exchange)
        self._watch.metrics.overcharged(exchange)

    # --- Resolve -------------------------------------------------------------

    async def resolve(self, req: bpb.ResolveRequest, agent: Agent = ANONYMOUS) -> bpb.ResolveResponse:
        uris = check_uris(req.uris)
        c = check_constraints(req.constraints, self._exchanges)
        overall = check_deadline_ms(req.deadline.seconds, req.deadline.nanos, "deadline",
                                    self._config.fanout.overall_timeout_ms)
        session_id = check_id(req.session_id, "session_id") if req.session_id else None
        charge = charge_for(agent, c)
        # Resolve buys nothing, so it creates no session: an undeclared one is shown as it would be.
        account = self._sessions.view(agent.id, session_id) if session_id else None
        plan = await self._plan(charge)
        currency = account.currency if account else self._config.default_currency
        unique, dupes = dedupe(uris)
        discovery = await self._discover(unique, c, overall)
        self._quotes.remember(discovery)  # an offer chosen from this answer is priced from these
        room = headroom_of(await self.snapshots(account, plan), currency, self._converter)
        response = bpb.ResolveResponse(
            exchanges=discovery.calls, budgets=[wire.budget_state(s) for s in room.snapshots]
        )
        for uri in unique:
            choice = affordable(self._choose(uri, discovery.offers[uri], c, currency), room.room)
            entry = response.results.add(uri=uri, offers=[cand.offer for cand in choice.ranked])
            if not choice.ranked:
                entry.dropped.CopyFrom(bpb.DroppedUri(
                    uri=uri, reason=choice.reason, detail=choice.detail))  # type: ignore[arg-type]
        for uri in dupes:
            response.results.add(uri=uri, dropped=bpb.DroppedUri(
                uri=uri, reason=bpb.DROP_REASON_DUPLICATE, detail="listed earlier in the request"))
        return response

    # --- Transact ------------------------------------------------------------

    async def transact(self, req: bpb.TransactRequest, agent: Agent = ANONYMOUS) -> bpb.TransactResponse:
        # Every field first: a request refused here leaves nothing behind (no session, no key).
        order = check_order(req, agent, self._exchanges, self._config.fanout.overall_timeout_ms)
        IDEMPOTENCY_KEY.set(order.key)  # this request's context only: every record logged from here on
        # Keys belong to their caller: another caller's identical key is another purchase.
        entry = self._idem.find((agent.id, order.key), order.fingerprint)
        replay = entry is not None
        if entry is None:
            # The purchase runs in its own task: an agent that hangs up mid-purchase
            # does not cancel money in flight, and its retry joins the same task.
            task = asyncio.create_task(self._run(order))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            entry = Entry(order.fingerprint, task)
            self._idem.add((agent.id, order.key), entry)
        try:
            answer = await entry.result()
        except AfterWire:
            # Its hold stays (handed over to be rolled forward): a retry must reach it, not this error.
            self._idem.forget((agent.id, order.key), entry)
            raise OutcomePending(
                "the purchase failed after the Exchanges were asked to buy: it may be charged; retry "
                "with the same idempotency key to hear what happened", order.key, "exchange") from None
        except Exception:
            # Nothing reached an Exchange: the agent may fix the cause and retry the key.
            self._idem.forget((agent.id, order.key), entry)
            raise
        if not replay:
            return answer
        self._watch.metrics.purchase("replayed")
        again = bpb.TransactResponse()
        again.CopyFrom(answer)
        again.replayed = True
        return again

    async def drain(self, within_s: float) -> None:
        """At shutdown: let the purchases still running finish (their callers may have hung up), so
        what they hold is committed or released before the budget store is closed."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=within_s)

    async def _run(self, order: Order) -> bpb.TransactResponse:
        """One purchase, its outcome counted and logged whether or not its caller still waits."""
        try:
            answer = await self._transact(order)
        except AfterWire:
            self._watch.metrics.purchase("error")
            log.warning("transact error after the Exchanges were asked to buy")
            raise
        except Exception as exc:
            outcome = "denied" if isinstance(exc, BudgetExhausted) else "rejected"
            self._watch.metrics.purchase(outcome)
            log.info("transact %s: %s", outcome, type(exc).__name__)
            raise
        finally:
            # Its spend is in the budgets' readings now (or there is none): no longer in flight.
            if (admitted := _PACED.get()) and self._watch.pacer is not None:
                self._watch.pacer.done(admitted)
        outcome = "replayed" if answer.replayed else _outcome_label(answer)
        self._watch.metrics.purchase(outcome)
        log.info("transact %s: %d item(s), total %s %s", outcome, len(answer.items),
                 answer.total_cost.amount or "0", answer.total_cost.currency)
        return answer

    async def _transact(self, order: Order) -> bpb.TransactResponse:
        c = order.constraints
        plan = await self._plan(order.charge)
        response = bpb.TransactResponse(idempotency_key=order.key)
        unique, dupes = dedupe(order.uris)
        for uri in dupes:
            response.dropped.add(uri=uri, reason=bpb.DROP_REASON_DUPLICATE,
                                 detail="listed earlier in the request")
        if order.chosen:
            # Priced from the Exchanges' own quotes, never from what the agent sent.
            offers, calls = await self._quoted(order)
            discovery = None
        else:
            discovery = await self._offers(unique, c, order.deadline_ms)
            offers, calls = discovery.offers, discovery.calls
        response.exchanges.extend(calls)
        # The session as it is, or as it would be: it comes into being with the first hold.
        account = self._sessions.view(order.caller.id, order.session_id)
        currency = account.currency
        choices = [self._choose(uri, offers[uri], c, currency) for uri in unique]

        try:
            try:
                started = time.perf_counter()
                held = await self._reserve(account, order, plan, choices, discovery, response)
                self._watch.metrics.reservation.observe(time.perf_counter() - started)
            except (BudgetExhausted, NothingToBuy):
                # A retry of a key bought earlier (on another broker, or before a restart) is
                # replayed even when nothing fits any more; only then is the denial final.
                if plan is not None and self._period is not None:
                    await self._period.replay_if_settled(plan, order.store_key)
                raise
        except AlreadySettled as done:
            # Another broker (or this one before a restart) finished this key: replay its answer.
            return replayed(done.result, order.fingerprint)
        except HoldUnsettled as found:
            # This key's purchase was sent before and never settled (its broker died): finish
            # that one, with its stored requests, and answer with it. Never buy again.
            return replayed(await self._settle_unsettled(found), order.fingerprint)
        try:
            return await self._buy(order, held.account, held, response)
        except Exception as exc:
            raise AfterWire(str(exc)) from exc

    async def _settle_unsettled(self, found: HoldUnsettled) -> bytes:
        assert self.recovery is not None
        result: bytes | None = await self.recovery.roll_forward(found.account, found.hold)
        if result is None:
            raise OutcomePending("this purchase was sent to an Exchange that has not confirmed it yet; the "
                                 "broker keeps asking: retry the same request later",
                                 found.hold.idempotency_key.partition("#")[2], "exchange",
                                 from_ms(found.hold.expires_ms))
        return result

    async def _quoted(
        self, order: Order
    ) -> tuple[dict[str, list[tuple[rpb.Offer, Exchange]]], list[bpb.ExchangeCall]]:
        """The chosen offers as their Exchanges quote them now: from quotes this broker obtained
        (still valid), else from a fresh discovery. An offer no Exchange quotes is refused, and
        so is a price the agent sent that differs from the quote."""
        calls: list[bpb.ExchangeCall] = []
        missing = [ch for ch in order.chosen if self._quotes.find(ch.exchange, ch.offer_id, ch.uri) is None]
        if missing:
            asked = sorted({ch.exchange for ch in missing})
            discovery = await discover(
                [self._exchanges[name] for name in asked], list(dict.fromkeys(ch.uri for ch in missing)),
                self._requester, self._config.fanout.discover_timeout_ms, order.deadline_ms)
            self._quotes.remember(discovery)
            calls = discovery.calls
        offers: dict[str, list[tuple[rpb.Offer, Exchange]]] = {uri: [] for uri in order.uris}
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

    async def _plan(self, charge: Charge | None) -> Plan | None:
        """The period counters a purchase is charged to now (None: no period layer)."""
        return await self._period.plan(charge) if charge and self._period else None

    async def _pace(self, account: SessionAccount, plan: Plan, cost: Money) -> None:
        """Draw admission for every paced budget of the purchase (BudgetExhausted budget_paced); what
        is admitted counts as in flight until the purchase ends (_run)."""
        pacer = self._watch.pacer
        if pacer is None or not any(c.pacing for c in plan.counters):
            return
        paced = [((plan.account, c.ref.scope, c.ref.period, c.ref.currency),
                  convert(cost, c.ref.currency, self._converter)) for c in plan.counters if c.pacing]
        if pacer.unread(key for key, _ in paced):
            await self.snapshots(account, plan)  # the curve needs the spend: read once a window
        _PACED.set(pacer.admit(paced))

    def tightest(self, budgets: Sequence[bpb.BudgetState]) -> bpb.BudgetState | None:
        return tightest(budgets, self._converter)

    async def plan(self, agent: Agent, c: Constraints, prefix: str = "constraints.") -> Plan | None:
        """The period counters a caller's purchase with constraints `c` would be charged to."""
        return await self._plan(charge_for(agent, c, prefix))

    async def snapshots(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        """Every budget's numbers now, with their forecast."""
        return self._watch.seen(await self._read(account, plan))

    async def _read(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        snaps = [account.snap()] if account else []
        if plan is not None and self._period is not None:
            snaps.extend(await self._period.snapshots(plan))
        return snaps

    async def _reserve(
        self, account: SessionAccount, order: Order, plan: Plan | None, choices: Sequence[UriChoice],
        discovery: Discovery | None, response: bpb.TransactResponse,
    ) -> _Held:
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
            snaps = [account.snap()] if optimistic else await self.snapshots(account, plan)
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
            for ch in fitted:
                if not ch.ranked:
                    response.dropped.add(uri=ch.uri, reason=ch.reason, detail=ch.detail)
            for cand in pruned:
                response.dropped.add(
                    uri=cand.uri, reason=bpb.DROP_REASON_BUDGET, cost=wire.cost(cand.price),
                    detail=f"batch pruned to fit the remaining budget {room.room}",
                )
            return held
        raise AssertionError("unreachable")

    async def _hold(
        self, account: SessionAccount, order: Order, plan: Plan | None, kept: list[Candidate], cost: Money,
    ) -> _Held:
        """Session first (in memory, no await), then every period counter in one store call, with
        the exact request each Exchange will be sent as the hold's intent."""
        by_exchange: dict[str, list[Candidate]] = {}
        for cand in kept:
            by_exchange.setdefault(cand.exchange.name, []).append(cand)
        parts = [_Part(i, cands[0].exchange, self._buyer.request(cands, order.exchange_key), cands)
                 for i, cands in enumerate(by_exchange.values())]
        account, session = self._sessions.hold(order.caller.id, account, cost)
        if plan is None or order.charge is None or self._period is None:
            return _Held(account, session, None, parts)
        try:
            period = await self._period.reserve(
                order.charge, plan, cost, order.store_key, [p.order() for p in parts],
                fingerprint=order.fingerprint)
            return _Held(account, session, period, parts)
        except BaseException:
            await session.release()
            self._sessions.forget_unused(order.caller.id, account)  # a refused first purchase
            raise

    async def _buy(
        self, order: Order, account: SessionAccount, held: _Held, response: bpb.TransactResponse,
    ) -> bpb.TransactResponse:
        """Ask every Exchange for its part at once, and commit each part as its answer arrives: a fast
        Exchange's charge is recorded without waiting for a slow one. A part without an answer stays
        held (with its intent) until it is rolled forward."""
        currency = account.currency
        results: dict[int, PartResult] = {}
        settling = asyncio.Lock()  # commits of one purchase go one after another
        after: list[Snapshot] | None = None

        async def buy(part: _Part) -> None:
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
            # Unknown how far the purchase got: the session counts the whole hold, and the period
            # hold stays with its intent for whoever rolls it forward. Nothing is refunded blindly.
            if held.period is not None and self._period is not None:
                self._period.hand_over(held.period)
            await held.session.commit(held.session.amount)
            raise
        outcomes = [o for part in held.parts for o in results[part.index].outcomes]
        for o in outcomes:
            if o.item.status != bpb.ITEM_STATUS_PURCHASED:
                self._quotes.forget(o.cand.exchange.name, o.cand.uri)  # ask again next time
        spent = total((o.charged for o in outcomes), currency)
        if spent.is_zero():
            await held.session.release()
        else:
            await held.session.commit(spent)
        response.items.extend(o.item for o in outcomes)
        charged = total((o.actual for o in outcomes if o.actual is not None), currency)
        response.total_cost.CopyFrom(wire.cost(charged))
        plan = held.period.plan if held.period is not None else None
        if after is not None or plan is None or not plan.counters:
            snaps = [account.snap(), *(after or [])]  # as the commits left them: no second read
        else:
            try:
                snaps = await self._read(account, plan)
            except StoreDown:
                snaps = [account.snap()]  # bought and recorded; only the report is partial
        # Only money that moved counts as a committed purchase (utilization, alerts).
        watched = self._watch.seen(snaps) if spent.is_zero() else self._watch.committed(snaps)
        for s in watched:
            wire.budget_state(s, response.budgets.add())
        if held.period is not None and not held.period.settled:
            # Not settled yet (an Exchange did not answer, or a part's commit did not land): a retry
            # must go to the store (and roll it forward), not this answer.
            assert self._period is not None
            self._period.hand_over(held.period)
            self._idem.forget((order.caller.id, order.key))
        return response

    async def _settle_part(
        self, order: Order, held: _Held, part: _Part, result: PartResult, results: dict[int, PartResult],
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
                final.items.extend(o.item for o in everything)
                final.total_cost.CopyFrom(wire.cost(total(
                    (o.actual for o in everything if o.actual is not None), held.session.amount.currency)))
                # The answer is stored with the commit, so any broker can replay this key.
                return await self._period.commit(held.period, items, stored_answer(order.fingerprint, final),
                                                 part=part.index, final=True, nothing_charged=nothing_charged)
            if items:
                answer = bpb.TransactResponse(items=[o.item for o in result.outcomes])
                return await self._period.commit(held.period, items, answer.SerializeToString(),
                                                 part=part.index, final=False)
        except StoreUnavailable:
            # The Exchange's answer stands; the hold and its intent stay in the store until a
            # roll-forward commits them (the Exchange answers it from its dedupe record).
            self._idem.forget((order.caller.id, order.key))
        return None

    async def _offers(self, uris: Sequence[str], c: Constraints, overall_ms: int) -> Discovery:
        """What the Exchanges offer for `uris`: from an Exchange's still-valid answers where it has
        quoted every URI (no call), else asked now; the answers are remembered for the next purchase."""
        if not self._config.quotes.reuse:
            return await self._discover(uris, c, overall_ms)
        known, ask = self._quotes.known(exchanges_for(self._exchanges, c), uris)
        if not ask:
            return Discovery(offers=known)
        discovery = await discover(ask, uris, self._requester, self._config.fanout.discover_timeout_ms,
                                   overall_ms)
        self._quotes.remember(discovery)
        for uri, offers in known.items():
            discovery.offers[uri].extend(offers)
        return discovery

    async def _discover(self, uris: Sequence[str], c: Constraints, overall_ms: int) -> Discovery:
        return await discover(
            exchanges_for(self._exchanges, c), uris, self._requester,
            self._config.fanout.discover_timeout_ms, overall_ms,
        )

    def _choose(
        self, uri: str, offers: Sequence[tuple[rpb.Offer, Exchange]], c: Constraints, currency: str
    ) -> UriChoice:
        return choose(uri, offers, c, currency, self._converter, self._clock.now(), self._penalties)

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


@dataclass(frozen=True)
class _Part:
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
class _Held:
    account: SessionAccount  # the session as registered (the view, if this purchase created it)
    session: Reservation
    period: PeriodHold | None
    parts: list[_Part]




def _not_quoted(ch: ChosenOffer, calls: Sequence[bpb.ExchangeCall]) -> NothingToBuy:
    asked = [c for c in calls if c.exchange == ch.exchange]
    if asked and all(c.outcome != bpb.ExchangeCall.OUTCOME_OK for c in asked):
        return NothingToBuy(Code.UNAVAILABLE, f"{ch.field}: {ch.exchange} did not answer, so offer "
                            f"{ch.offer_id!r} cannot be priced: {asked[0].detail}",
                            "exchange_unavailable", asked)
    return NothingToBuy(Code.FAILED_PRECONDITION, f"{ch.field}: {ch.exchange} does not quote offer "
                        f"{ch.offer_id!r} for {ch.uri} now (expired, withdrawn, or never offered)",
                        "offer_not_quoted", asked)


def _outcome_label(answer: bpb.TransactResponse) -> str:
    bought = sum(i.status == bpb.ITEM_STATUS_PURCHASED for i in answer.items)
    if bought and bought == len(answer.items):
        return "purchased"
    return "partial" if bought else "failed"


def tightest(budgets: Sequence[bpb.BudgetState], converter: Converter) -> bpb.BudgetState | None:
    """The budget with the least left, compared in the first one's currency (rounded down); None
    when one cannot be converted."""
    if not budgets:
        return None
    currency = budgets[0].remaining.currency

    def left(b: bpb.BudgetState) -> Decimal:
        # The broker's own canonical amounts (wire.cost): no need to validate them again.
        amount = Decimal(b.remaining.amount)
        if b.remaining.currency == currency:
            return amount
        return convert(Money(amount, b.remaining.currency), currency, converter, round_up=False).amount

    try:
        return min(budgets, key=left)
    except ConversionError:
        return None
