"""Resolve and Transact: the purchase flow, told top to bottom in Purchaser._purchase.

Each step is its own module: the request checked field by field (order) -> priced from the
Exchanges' own offers and quotes (pricing) -> each URI's offers filtered and ranked (selection)
-> pruned to the tightest budget, paced, and held on every budget (reserve) -> every Exchange
asked for its part at once (execute), each part committed as it answers (settle) -> the answer
(answer). Nothing over budget reaches an Exchange: every budget is held before the first
purchase call. Sessions, idempotency keys (idempotency) and replays belong to the caller; a hold
a crash left unsettled is rolled forward (recovery).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from broker import wire
from broker.config import BrokerConfig
from broker.observe.logs import IDEMPOTENCY_KEY
from broker.observe.metrics import Metrics
from broker.observe.watch import BudgetWatch
from broker.purchase import answer
from broker.purchase.agents import ANONYMOUS, Agent, charge_for
from broker.purchase.budgets import Budgets
from broker.purchase.execute import Buyer, replayed
from broker.purchase.idempotency import Entry, IdempotencyCache
from broker.purchase.order import Order, check_order, dedupe
from broker.purchase.pricing import Pricing
from broker.purchase.recovery import Recovery
from broker.purchase.reserve import Reserver, end_pacing
from broker.purchase.selection import Exchange, TrustPenalties, UriChoice, affordable, choose
from broker.purchase.settle import Settler
from broker.purchase.validation import Constraints, check_constraints, check_deadline_ms, check_id, check_uris
from budget.forecast import SpendRates
from budget.layers import BudgetExhausted, Snapshot, headroom_of
from budget.period import AlreadySettled, HoldUnsettled, OutcomePending, PeriodLayer, Plan
from budget.session import SessionAccount, SessionBudgets
from budget.stores.contract import UnsettledHold
from common.clock import Clock
from currency.convert import Converter
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)


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
        self._watch = watch or BudgetWatch(SpendRates(config.forecast.half_life_seconds), Metrics())
        self._idem = IdempotencyCache(config.idempotency_cache_size)
        self._running: set[asyncio.Task[bpb.TransactResponse]] = set()
        self._penalties = TrustPenalties()
        requester = rpb.Requester(
            id=config.requester.id, domain=config.requester.domain, name=config.requester.name,
            type="broker",
        )
        buyer = Buyer(requester, config.fanout.execute_timeout_ms / 1000, converter, self._overcharged)
        self._budgets = Budgets(period, self._watch, converter)
        self._pricing = Pricing(config, exchanges, requester, clock)
        self._reserver = Reserver(sessions, period, self._budgets, buyer, converter, self._watch)
        self._settler = Settler(buyer, period, self._idem.forget)
        self.recovery = Recovery(period, exchanges, buyer) if period is not None else None
        if period is not None and self.recovery is not None:
            period.recover = self._recover
            period.recover_local = self.recovery.roll_forward_local

    async def _recover(self, account: str, hold: UnsettledHold) -> None:
        assert self.recovery is not None
        await self.recovery.roll_forward(account, hold)

    def _overcharged(self, exchange: str) -> None:
        self._penalties.overcharged(exchange)
        self._watch.metrics.overcharged(exchange)

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
            response = await self._purchase(order)
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
            end_pacing(self._watch.pacer)
        outcome = "replayed" if response.replayed else answer.outcome(response)
        self._watch.metrics.purchase(outcome)
        log.info("transact %s: %d item(s), total %s %s", outcome, len(response.items),
                 response.total_cost.amount or "0", response.total_cost.currency)
        return response

    async def _purchase(self, order: Order) -> bpb.TransactResponse:
        """One purchase, as it happens. Every budget is held before any Exchange is asked to buy."""
        plan = await self._budgets.plan(order.charge)
        response, uris = answer.begin(order)
        if order.chosen:
            # Priced from the Exchanges' own quotes, never from what the agent sent.
            offers, calls = await self._pricing.quoted(order)
            discovery = None
        else:
            discovery = await self._pricing.offered(uris, order.constraints, order.deadline_ms)
            offers, calls = discovery.offers, discovery.calls
        response.exchanges.extend(calls)
        # The session as it is, or as it would be: it comes into being with the first hold.
        account = self._sessions.view(order.caller.id, order.session_id)
        choices = [self._choose(uri, offers[uri], order.constraints, account.currency) for uri in uris]
        try:
            held = await self._reserver.reserve(account, order, plan, choices, discovery)
        except AlreadySettled as done:
            # Another broker (or this one before a restart) finished this key: replay its answer.
            return replayed(done.result, order.fingerprint)
        except HoldUnsettled as found:
            # This key's purchase was sent before and never settled (its broker died): finish
            # that one, with its stored requests, and answer with it. Never buy again.
            assert self.recovery is not None
            return replayed(await self.recovery.retry_answer(found), order.fingerprint)
        answer.add_left_out(response, held)
        try:
            bought = await self._settler.buy(order, held, response)
            self._pricing.forget_unbought(bought.outcomes)  # asked again next time
            spent = await self._settler.settle_session(held, bought.outcomes)
            answer.add_items(response, bought.outcomes, held.account.currency)
            answer.add_budgets(response, await self._budgets.after(held.account, held.plan, bought.committed,
                                                                   spent))
            if held.period is not None and not held.period.settled:
                # An Exchange did not answer, or a part's commit did not land.
                self._settler.keep_unsettled(order, held)
            return response
        except Exception as exc:
            raise AfterWire(str(exc)) from exc

    async def resolve(self, req: bpb.ResolveRequest, agent: Agent = ANONYMOUS) -> bpb.ResolveResponse:
        uris = check_uris(req.uris)
        c = check_constraints(req.constraints, self._exchanges)
        overall = check_deadline_ms(req.deadline.seconds, req.deadline.nanos, "deadline",
                                    self._config.fanout.overall_timeout_ms)
        session_id = check_id(req.session_id, "session_id") if req.session_id else None
        charge = charge_for(agent, c)
        # Resolve buys nothing, so it creates no session: an undeclared one is shown as it would be.
        account = self._sessions.view(agent.id, session_id) if session_id else None
        plan = await self._budgets.plan(charge)
        currency = account.currency if account else self._config.default_currency
        unique, dupes = dedupe(uris)
        discovery = await self._pricing.discover(unique, c, overall)
        room = headroom_of(await self._budgets.snapshots(account, plan), currency, self._converter)
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

    def tightest(self, budgets: Sequence[bpb.BudgetState]) -> bpb.BudgetState | None:
        return self._budgets.tightest(budgets)

    async def plan(self, agent: Agent, c: Constraints, prefix: str = "constraints.") -> Plan | None:
        """The period counters a caller's purchase with constraints `c` would be charged to."""
        return await self._budgets.plan(charge_for(agent, c, prefix))

    async def snapshots(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        """Every budget's numbers now, with their forecast."""
        return await self._budgets.snapshots(account, plan)

    def _choose(
        self, uri: str, offers: Sequence[tuple[rpb.Offer, Exchange]], c: Constraints, currency: str
    ) -> UriChoice:
        return choose(uri, offers, c, currency, self._converter, self._clock.now(), self._penalties)
