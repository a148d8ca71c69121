"""Finding offers and choosing what to buy.

discover() asks every Exchange in parallel under per-Exchange and overall
deadlines (an Exchange that fails or is late is skipped and reported);
choose() filters each URI's offers by the request's caps and the budget,
ranks them, keeps the best per URI; prune() drops the lowest-priority URIs
(later in the request) until the batch fits the tightest budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from google.protobuf.duration_pb2 import Duration

from broker.config import ExchangeSetting
from broker.purchase.validation import Constraints
from broker.wire import offer_price
from currency.convert import ConversionError, Converter, convert
from currency.money import Money, MoneyError
from exchange_client.adapter import ExchangeAdapter, ExchangeError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb


@dataclass(frozen=True, slots=True)
class Exchange:
    setting: ExchangeSetting
    adapter: ExchangeAdapter

    @property
    def name(self) -> str:
        return self.setting.name


class TrustPenalties:
    """Exchanges that charged more than they quoted rank lower afterwards.

    Each overcharge takes STEP points off the Exchange's configured trust (down to 0) for as
    long as this broker runs: its offers lose ties on unit cost to Exchanges that kept their word.
    The overcharge itself is recorded in full (the Exchange is the authority) and counted in
    broker_exchange_overcharges_total.
    """

    STEP = 10

    def __init__(self) -> None:
        self._points: dict[str, int] = {}

    def overcharged(self, exchange: str) -> None:
        self._points[exchange] = self._points.get(exchange, 0) + self.STEP

    def trust(self, ex: Exchange) -> int:
        return max(0, ex.setting.trust - self._points.get(ex.name, 0))


_NO_PENALTIES = TrustPenalties()


@dataclass(frozen=True, slots=True)
class Candidate:
    """An offer for a URI, priced in the budget's currency (rounded up)."""

    uri: str
    offer: rpb.Offer
    exchange: Exchange
    price: Money
    unit_cost: Money
    preferred: bool
    trust: int  # the Exchange's trust when ranked: configured, less TrustPenalties

    def rank_key(self) -> tuple[bool, object, int, int, object, str, str]:
        return (
            not self.preferred, self.unit_cost.amount, -self.trust,
            self.exchange.setting.priority, self.price.amount, self.exchange.name,
            self.offer.offer_id,
        )


@dataclass
class Discovery:
    offers: dict[str, list[tuple[rpb.Offer, Exchange]]] = field(default_factory=dict)
    calls: list[bpb.ExchangeCall] = field(default_factory=list)

    @property
    def any_answered(self) -> bool:
        return any(c.outcome == bpb.ExchangeCall.OUTCOME_OK for c in self.calls)


def _call_record(name: str, outcome: int, detail: str, started: int) -> bpb.ExchangeCall:
    latency = Duration()
    latency.FromNanoseconds(time.monotonic_ns() - started)
    return bpb.ExchangeCall(
        exchange=name, outcome=outcome, detail=detail, latency=latency  # type: ignore[arg-type]
    )


async def discover(
    exchanges: Sequence[Exchange], uris: Sequence[str], requester: rpb.Requester,
    per_exchange_ms: int, overall_ms: int,
) -> Discovery:
    result = Discovery(offers={u: [] for u in uris})
    wanted = set(uris)
    started = time.monotonic_ns()

    async def ask(ex: Exchange) -> rpb.ResourceResponse:
        timeout_ms = min(ex.setting.timeout_ms or per_exchange_ms, overall_ms)
        query = rpb.ResourceQuery(ver="1", requester=requester, uris=list(uris))
        query.deadline.FromMilliseconds(timeout_ms)
        return await ex.adapter.discover(query, timeout_ms / 1000)

    tasks = {asyncio.create_task(ask(ex)): ex for ex in exchanges}
    if not tasks:
        return result
    done, pending = await asyncio.wait(tasks, timeout=overall_ms / 1000)
    for task in pending:
        task.cancel()
        result.calls.append(_call_record(
            tasks[task].name, bpb.ExchangeCall.OUTCOME_TIMEOUT,
            f"no answer within the overall {overall_ms} ms", started))
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        ex = tasks[task]
        exc = task.exception()
        if isinstance(exc, ExchangeError):
            outcome = (bpb.ExchangeCall.OUTCOME_TIMEOUT if exc.kind == "timeout"
                       else bpb.ExchangeCall.OUTCOME_ERROR)
            result.calls.append(_call_record(ex.name, outcome, exc.detail, started))
            continue
        if exc is not None:
            result.calls.append(_call_record(
                ex.name, bpb.ExchangeCall.OUTCOME_ERROR, type(exc).__name__, started))
            continue
        result.calls.append(_call_record(ex.name, bpb.ExchangeCall.OUTCOME_OK, "", started))
        for group in task.result().offer_groups:
            if group.uri not in wanted:
                continue
            for offer in group.offers:
                # An Exchange speaks only for itself.
                if offer.exchange and offer.exchange != ex.name:
                    continue
                stamped = rpb.Offer()
                stamped.CopyFrom(offer)
                stamped.exchange = ex.name
                result.offers[group.uri].append((stamped, ex))
    result.calls.sort(key=lambda c: c.exchange)
    return result


@dataclass
class UriChoice:
    """The outcome of filtering and ranking one URI's offers."""

    uri: str
    ranked: list[Candidate]
    # Why nothing is left, when ranked is empty.
    reason: int = bpb.DROP_REASON_UNSPECIFIED
    detail: str = ""
    # The cheapest price blocked by max_price, in max_price's currency
    # (for the transaction-layer denial).
    over_cap: Money | None = None
    # The cheapest price when the URI was dropped for budget, in budget currency.
    cheapest: Money | None = None


def choose(
    uri: str, offers: Sequence[tuple[rpb.Offer, Exchange]], c: Constraints,
    budget_currency: str, converter: Converter, now: datetime,
    penalties: TrustPenalties = _NO_PENALTIES,
) -> UriChoice:
    ranked: list[Candidate] = []
    notes: list[str] = []
    over_cap: Money | None = None
    cap_currency = c.max_price.currency if c.max_price else budget_currency
    for offer, ex in offers:
        try:
            price, unit = offer_price(offer)
            cand = Candidate(
                uri=uri, offer=offer, exchange=ex,
                price=convert(price, budget_currency, converter),
                unit_cost=convert(unit, budget_currency, converter),
                preferred=ex.name in c.preferred, trust=penalties.trust(ex),
            )
            cap_price = convert(price, cap_currency, converter)
            cap_unit = convert(unit, cap_currency, converter)
        except ConversionError as exc:
            notes.append(f"{ex.name}/{offer.offer_id}: {exc.problem}")
            continue
        except MoneyError as exc:
            notes.append(f"{ex.name}/{offer.offer_id}: malformed offer ({exc})")
            continue
        if offer.HasField("expires_at") and offer.expires_at.ToDatetime(tzinfo=now.tzinfo) <= now:
            notes.append(f"{ex.name}/{offer.offer_id}: expired")
        elif c.delivery and offer.delivery_method not in c.delivery:
            notes.append(f"{ex.name}/{offer.offer_id}: delivery method not preferred")
        elif c.reporting_capable and not ex.setting.reporting:
            notes.append(f"{ex.name}/{offer.offer_id}: exchange cannot report usage")
        elif c.max_price is not None and cap_price > c.max_price:
            notes.append(f"{ex.name}/{offer.offer_id}: price {cap_price} above max_price {c.max_price}")
            if over_cap is None or cap_price < over_cap:
                over_cap = cap_price
        elif c.max_unit_cost is not None and cap_unit.amount > c.max_unit_cost:
            notes.append(f"{ex.name}/{offer.offer_id}: unit cost {cap_unit} above max_unit_cost")
        else:
            ranked.append(cand)
    ranked.sort(key=Candidate.rank_key)
    choice = UriChoice(uri, ranked, over_cap=over_cap)
    if not ranked:
        if not offers:
            choice.reason, choice.detail = bpb.DROP_REASON_NO_OFFERS, "no exchange offered it"
        else:
            choice.reason = bpb.DROP_REASON_FILTERED
            choice.detail = "; ".join(notes[:8])
    return choice


def affordable(choice: UriChoice, room: Money | None) -> UriChoice:
    """Drops offers above `room`; the URI is then dropped for budget if none is left."""
    if room is None or not choice.ranked:
        return choice
    fits = [cand for cand in choice.ranked if cand.price <= room]
    if fits:
        return UriChoice(choice.uri, fits, over_cap=choice.over_cap)
    cheapest = min((cand.price for cand in choice.ranked), key=lambda m: m.amount)
    return UriChoice(
        choice.uri, [], bpb.DROP_REASON_BUDGET,
        f"cheapest offer {cheapest} is above the remaining budget {room}",
        over_cap=choice.over_cap, cheapest=cheapest,
    )


def prune(best: Sequence[Candidate], room: Money | None) -> tuple[list[Candidate], list[Candidate]]:
    """Keep the longest prefix (highest priority first) whose total fits `room`."""
    kept = list(best)
    dropped: list[Candidate] = []
    if room is None:
        return kept, dropped
    total = sum((c.price.amount for c in kept), start=Decimal(0))
    while kept and total > room.amount:
        last = kept.pop()
        total -= last.price.amount
        dropped.insert(0, last)
    return kept, dropped


def exchanges_for(
    all_exchanges: Mapping[str, Exchange], c: Constraints
) -> list[Exchange]:
    chosen = [ex for name, ex in all_exchanges.items() if not c.exchanges or name in c.exchanges]
    return sorted(chosen, key=lambda ex: (ex.setting.priority, ex.name))
