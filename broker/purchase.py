"""Resolve and Transact: the purchase flow.

validate -> discover (or take chosen offers) -> filter and rank -> prune to the
tightest budget -> reserve on every budget -> ExecuteTransaction per Exchange
-> commit what was charged, release the rest. Nothing over budget reaches an
Exchange: the reservation is taken before the first purchase call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from connectrpc.code import Code

from broker import wire
from broker.auth import ANONYMOUS, Agent, charge_for
from broker.config import BrokerConfig
from broker.errors import InvalidField, NothingToBuy
from broker.idempotency import Entry, IdempotencyCache
from broker.logs import IDEMPOTENCY_KEY
from broker.metrics import Metrics
from broker.selection import (
    Candidate,
    Discovery,
    Exchange,
    UriChoice,
    affordable,
    choose,
    discover,
    exchanges_for,
    prune,
)
from broker.validation import (
    Constraints,
    check_constraints,
    check_deadline_ms,
    check_id,
    check_uris,
)
from broker.watch import BudgetWatch
from budget.clock import Clock
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
from budget.period import AlreadySettled, Charge, ItemSpend, PeriodHold, PeriodLayer, Plan, StoreDown
from budget.session import SessionAccount, SessionBudgets
from currency.convert import Converter, convert
from currency.money import Money, MoneyError, total
from exchange_client.adapter import ExchangeError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)

# An optimistic reservation, then re-reading headroom after a lost race for the last of a budget.
_RESERVE_ATTEMPTS = 4


class AfterWire(Exception):
    """A purchase failed after Exchanges were asked to buy: its key is kept, never re-bought."""


@dataclass
class _Outcome:
    """One item's result and what it means for the budgets (in budget currency)."""

    item: bpb.ItemResult
    charged: Money  # counted as spent (actual, or the hold when unknown)
    actual: Money | None  # what the Exchange said it charged
    cand: Candidate
    original: Money | None = None  # `actual` in the currency the Exchange charged in


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
        self._requester = rpb.Requester(
            id=config.requester.id, domain=config.requester.domain, name=config.requester.name,
            type="broker",
        )

    # --- Resolve -------------------------------------------------------------

    async def resolve(self, req: bpb.ResolveRequest, agent: Agent = ANONYMOUS) -> bpb.ResolveResponse:
        uris = check_uris(req.uris)
        c = check_constraints(req.constraints, self._exchanges)
        overall = check_deadline_ms(req.deadline.seconds, req.deadline.nanos, "deadline",
                                    self._config.fanout.overall_timeout_ms)
        account = self._sessions.get(check_id(req.session_id, "session_id")) if req.session_id else None
        plan = await self.plan(agent, c)
        currency = account.currency if account else self._config.default_currency
        unique, dupes = _dedupe(uris)
        discovery = await self._discover(unique, c, overall)
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
        session_id = check_id(req.session_id, "session_id")
        key = check_id(req.idempotency_key, "idempotency_key")
        IDEMPOTENCY_KEY.set(key)  # this request's context only: every record logged from here on
        fingerprint = hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()
        entry = self._idem.find(key, fingerprint)
        replay = entry is not None
        if entry is None:
            # The purchase runs in its own task: an agent that hangs up mid-purchase
            # does not cancel money in flight, and its retry joins the same task.
            entry = Entry(fingerprint, asyncio.create_task(
                self._transact(req, agent, session_id, key, fingerprint)))
            self._idem.add(key, entry)
        try:
            answer = await asyncio.shield(entry.task)
        except AfterWire as exc:
            self._watch.metrics.purchase("error")
            raise exc.__cause__ or exc from None
        except Exception as exc:
            # Nothing reached an Exchange: the agent may fix the cause and retry the key.
            self._idem.forget(key, entry)
            self._watch.metrics.purchase("denied" if isinstance(exc, BudgetExhausted) else "rejected")
            raise
        outcome = "replayed" if replay or answer.replayed else _outcome_label(answer)
        self._watch.metrics.purchase(outcome)
        log.info("transact %s: %d item(s), total %s %s", outcome, len(answer.items),
                 answer.total_cost.amount or "0", answer.total_cost.currency)
        if not replay:
            return answer
        replayed = bpb.TransactResponse()
        replayed.CopyFrom(answer)
        replayed.replayed = True
        return replayed

    async def _transact(
        self, req: bpb.TransactRequest, agent: Agent, session_id: str, key: str, fingerprint: str,
    ) -> bpb.TransactResponse:
        c = check_constraints(req.constraints, self._exchanges)
        deadline_ms = check_deadline_ms(req.deadline.seconds, req.deadline.nanos, "deadline",
                                        self._config.fanout.overall_timeout_ms)
        account = self._sessions.get(session_id)
        charge, plan = await self._charge(agent, c)
        currency = account.currency
        response = bpb.TransactResponse(idempotency_key=key)

        if req.uris and req.offers:
            raise InvalidField("offers", "give either uris or offers, not both")
        if req.offers:
            uris, offers = self._chosen_offers(req.offers)
        else:
            uris = check_uris(req.uris)
            offers = None
        unique, dupes = _dedupe(uris)
        for uri in dupes:
            response.dropped.add(uri=uri, reason=bpb.DROP_REASON_DUPLICATE,
                                 detail="listed earlier in the request")
        if offers is None:
            discovery = await self._discover(unique, c, deadline_ms)
            response.exchanges.extend(discovery.calls)
            offers = discovery.offers
        else:
            discovery = None
        choices = [self._choose(uri, offers[uri], c, currency) for uri in unique]

        try:
            try:
                started = time.perf_counter()
                held, kept = await self._reserve(
                    account, charge, plan, key, choices, c, discovery, response)
                self._watch.metrics.reservation.observe(time.perf_counter() - started)
            except (BudgetExhausted, NothingToBuy):
                # A retry of a key bought earlier (on another broker, or before a restart) is
                # replayed even when nothing fits any more; only then is the denial final.
                if plan is not None and self._period is not None:
                    await self._period.replay_if_settled(plan, key)
                raise
        except AlreadySettled as done:
            # Another broker (or this one before a restart) finished this key: replay its answer.
            return _replay(done.result, fingerprint)
        try:
            # The hold's plan: the one the store accepted (limits may have been reloaded).
            bought_plan = held.period.plan if held.period is not None else plan
            return await self._buy(key, fingerprint, account, bought_plan, held, kept, response)
        except Exception as exc:
            raise AfterWire(str(exc)) from exc

    async def plan(self, agent: Agent, c: Constraints, prefix: str = "constraints.") -> Plan | None:
        return (await self._charge(agent, c, prefix))[1]

    async def _charge(
        self, agent: Agent, c: Constraints, prefix: str = "constraints."
    ) -> tuple[Charge | None, Plan | None]:
        """The scopes a purchase is charged to, and their counters now (None: no period layer)."""
        charge = charge_for(agent, c, prefix)
        return charge, (await self._period.plan(charge) if charge and self._period else None)

    async def snapshots(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        """Every budget's numbers now, with their forecast."""
        return self._watch.seen(await self._read(account, plan))

    async def _read(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        snaps = [account.snap()] if account else []
        if plan is not None and self._period is not None:
            snaps.extend(await self._period.snapshots(plan))
        return snaps

    async def _reserve(
        self, account: SessionAccount, charge: Charge | None, plan: Plan | None, key: str,
        choices: Sequence[UriChoice], c: Constraints, discovery: Discovery | None,
        response: bpb.TransactResponse,
    ) -> tuple[_Held, list[Candidate]]:
        """Prune to the tightest budget and hold the batch total on the session and period budgets."""
        currency = account.currency
        for attempt in range(_RESERVE_ATTEMPTS):
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
                raise self._nothing_to_buy(fitted, room, c, discovery)
            cost = total((cand.price for cand in kept), currency)
            try:
                held = await self._hold(account, charge, plan, cost, key)
            except BudgetExhausted:
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
            return held, kept
        raise AssertionError("unreachable")

    async def _hold(
        self, account: SessionAccount, charge: Charge | None, plan: Plan | None, cost: Money, key: str,
    ) -> _Held:
        """Session first (in memory, no await), then every period counter in one store call."""
        session = await account.reserve(cost)
        if plan is None or charge is None or self._period is None:
            return _Held(session, None)
        try:
            return _Held(session, await self._period.reserve(charge, plan, cost, key))
        except BaseException:
            await session.release()
            raise

    async def _buy(
        self, key: str, fingerprint: str, account: SessionAccount, plan: Plan | None, held: _Held,
        kept: list[Candidate], response: bpb.TransactResponse,
    ) -> bpb.TransactResponse:
        by_exchange: dict[str, list[Candidate]] = {}
        for cand in kept:
            by_exchange.setdefault(cand.exchange.name, []).append(cand)
        currency = account.currency
        try:
            groups = await asyncio.gather(*(
                self._execute(self._exchanges[name], cands, key, currency)
                for name, cands in by_exchange.items()
            ))
        except BaseException:
            # Unknown how far the purchase got: count every hold as spent.
            await held.session.commit(held.session.amount)
            if held.period is not None and self._period is not None:
                await self._period.commit(held.period, [
                    ItemSpend(c.exchange.name, c.offer.offer_id, c.uri, c.price, c.price) for c in kept
                ], fingerprint.encode() + b"\n")
            raise
        outcomes = [o for group in groups for o in group]
        spent = total((o.charged for o in outcomes), currency)
        if spent.is_zero():
            await held.session.release()
        else:
            await held.session.commit(spent)
        response.items.extend(o.item for o in outcomes)
        charged = total((o.actual for o in outcomes if o.actual is not None), currency)
        response.total_cost.CopyFrom(wire.cost(charged))
        after: list[Snapshot] | None = None
        if held.period is not None and self._period is not None:
            # The answer is stored with the commit, so any broker can replay this key.
            after = await self._period.commit(held.period, [
                ItemSpend(o.cand.exchange.name, o.cand.offer.offer_id, o.cand.uri,
                          o.original or o.charged, o.charged)
                for o in outcomes if not o.charged.is_zero()
            ], fingerprint.encode() + b"\n" + response.SerializeToString())
        if after is not None or plan is None or not plan.counters:
            snaps = [account.snap(), *(after or [])]  # as the commit left them: no second read
        else:
            try:
                snaps = await self._read(account, plan)
            except StoreDown:
                snaps = [account.snap()]  # bought and recorded; only the report is partial
        # Only money that moved counts as a committed purchase (utilization, alerts).
        watched = self._watch.seen(snaps) if spent.is_zero() else self._watch.committed(snaps)
        response.budgets.extend(wire.budget_state(s) for s in watched)
        return response

    async def _execute(
        self, ex: Exchange, cands: list[Candidate], key: str, currency: str
    ) -> list[_Outcome]:
        request = rpb.TransactionRequest(
            ver="1", idempotency_key=key, requester=self._requester,
            items=[rpb.TransactionItem(offer=cand.offer) for cand in cands],
        )
        timeout_s = self._config.fanout.execute_timeout_ms / 1000
        answer: rpb.TransactionResponse | None = None
        failure: ExchangeError | None = None
        for _ in range(2):  # one retry, same key: the Exchange charges a key once
            try:
                answer = await ex.adapter.execute(request, timeout_s)
                break
            except ExchangeError as exc:
                failure = exc
                if not exc.ambiguous:
                    break
        if answer is None:
            assert failure is not None
            return [self._failed(cand, failure) for cand in cands]
        return [self._outcome(cand, res, currency) for cand, res in _match(cands, answer)]

    def _failed(self, cand: Candidate, failure: ExchangeError) -> _Outcome:
        item = bpb.ItemResult(uri=cand.uri, offer=cand.offer)
        if failure.ambiguous:
            # The Exchange may have charged: keep the hold as spent, err toward stopping early.
            item.status = bpb.ITEM_STATUS_UNKNOWN
            item.detail = f"exchange did not answer ({failure.kind}); the reserved amount stays spent"
            return _Outcome(item, cand.price, None, cand)
        item.status = bpb.ITEM_STATUS_FAILED
        item.detail = f"exchange refused the request ({failure.kind}): {failure.detail}"
        return _Outcome(item, Money.zero(cand.price.currency), None, cand)

    def _outcome(
        self, cand: Candidate, res: rpb.TransactionResultItem | None, currency: str
    ) -> _Outcome:
        item = bpb.ItemResult(uri=cand.uri, offer=cand.offer)
        zero = Money.zero(currency)
        if res is None:
            item.status = bpb.ITEM_STATUS_UNKNOWN
            item.detail = "exchange answer has no result for this offer; the reserved amount stays spent"
            return _Outcome(item, cand.price, None, cand)
        item.result.CopyFrom(res)
        if res.denial_reason != rpb.DENIAL_REASON_UNSPECIFIED:
            item.status = bpb.ITEM_STATUS_DENIED
            item.detail = rpb.DenialReason.Name(res.denial_reason)
            return _Outcome(item, zero, None, cand)
        try:
            original = Money.parse(res.cost.amount, res.cost.currency, "cost")
            actual = convert(original, currency, self._converter)
        except MoneyError as exc:
            item.status = bpb.ITEM_STATUS_UNKNOWN
            item.detail = f"exchange reported an unusable cost ({exc}); the reserved amount stays spent"
            return _Outcome(item, cand.price, None, cand)
        item.status = bpb.ITEM_STATUS_PURCHASED
        if actual > cand.price:
            # Recorded in full, never dropped: the Exchange is the authority.
            log.warning("overage: %s/%s charged %s, reserved %s", cand.exchange.name,
                        cand.offer.offer_id, actual, cand.price)
        return _Outcome(item, actual, actual, cand, original)

    # --- helpers ---------------------------------------------------------------

    async def _discover(self, uris: Sequence[str], c: Constraints, overall_ms: int) -> Discovery:
        return await discover(
            exchanges_for(self._exchanges, c), uris, self._requester,
            self._config.fanout.discover_timeout_ms, overall_ms,
        )

    def _choose(
        self, uri: str, offers: Sequence[tuple[rpb.Offer, Exchange]], c: Constraints, currency: str
    ) -> UriChoice:
        return choose(uri, offers, c, currency, self._converter, self._clock.now())

    def _chosen_offers(
        self, chosen: Sequence[bpb.ChosenOffer]
    ) -> tuple[list[str], dict[str, list[tuple[rpb.Offer, Exchange]]]]:
        uris = check_uris([ch.uri for ch in chosen], "offers")
        offers: dict[str, list[tuple[rpb.Offer, Exchange]]] = {}
        for i, ch in enumerate(chosen):
            if not ch.offer.offer_id:
                raise InvalidField(f"offers[{i}].offer.offer_id", "is required")
            ex = self._exchanges.get(ch.offer.exchange)
            if ex is None:
                raise InvalidField(f"offers[{i}].offer.exchange",
                                   f"{ch.offer.exchange[:64]!r} is not a configured exchange")
            offers.setdefault(ch.uri, []).append((ch.offer, ex))
        return uris, offers

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


@dataclass
class _Held:
    session: Reservation
    period: PeriodHold | None


def _replay(stored: bytes, fingerprint: str) -> bpb.TransactResponse:
    if not stored:
        # Recorded from a fail-open journal: the spend is known, the original answer is not.
        return bpb.TransactResponse(replayed=True)
    digest, _, body = stored.partition(b"\n")
    if digest.decode() != fingerprint:
        raise InvalidField("idempotency_key", "was already used for a different request")
    answer = bpb.TransactResponse.FromString(body)
    answer.replayed = True
    return answer


def _outcome_label(answer: bpb.TransactResponse) -> str:
    bought = sum(i.status == bpb.ITEM_STATUS_PURCHASED for i in answer.items)
    if bought and bought == len(answer.items):
        return "purchased"
    return "partial" if bought else "failed"


def _dedupe(uris: Sequence[str]) -> tuple[list[str], list[str]]:
    seen: set[str] = set()
    unique: list[str] = []
    dupes: list[str] = []
    for uri in uris:
        (dupes if uri in seen else unique).append(uri)
        seen.add(uri)
    return unique, dupes


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

