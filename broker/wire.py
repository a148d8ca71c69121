"""Converting between the broker's values and wire messages: costs, timestamps, budget states, and
the price of an offer as its Exchange quoted it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from google.protobuf.timestamp_pb2 import Timestamp

from budget.layers import Layer, Snapshot
from currency.money import Money, MoneyError, parse_amount, parse_currency, quantize
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

MODES = {"strict": bpb.ENFORCEMENT_MODE_STRICT, "lease": bpb.ENFORCEMENT_MODE_LEASE}
LAYERS = {
    Layer.TRANSACTION: bpb.BUDGET_LAYER_TRANSACTION,
    Layer.SESSION: bpb.BUDGET_LAYER_SESSION,
    Layer.PERIOD: bpb.BUDGET_LAYER_PERIOD,
}


def cost(money: Money) -> rpb.Cost:
    return rpb.Cost(amount=money.text(), currency=money.currency)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(when: datetime) -> Timestamp:
    """Exact integer arithmetic (protobuf's FromDatetime goes through a time tuple: several times
    slower, and this runs for every budget of every answer). Naive datetimes are UTC."""
    out = Timestamp()
    _set_timestamp(out, when)
    return out


def _set_timestamp(out: Timestamp, when: datetime) -> None:
    micros = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    out.seconds, rest = divmod(micros // _MICROSECOND, 1_000_000)
    out.nanos = rest * 1000


def _set_cost(out: rpb.Cost, money: Money) -> None:
    out.amount = money.text()
    out.currency = money.currency


@lru_cache(maxsize=1024)
def _window_timestamp(when: datetime) -> Timestamp:
    """A window's start or end: the same few in every answer. Shared: copied into each message."""
    return timestamp(when)


def budget_state(snap: Snapshot, into: bpb.BudgetState | None = None) -> bpb.BudgetState:
    """`snap` as a message, filled into `into` (`response.budgets.add()`) when given. Field by field
    into the message's own submessages: building each Cost and Timestamp apart and handing them to
    the constructor, which copies them, took 11 µs a budget against 7 (4 budgets per purchase)."""
    b = bpb.BudgetState() if into is None else into
    b.layer = LAYERS[snap.layer]
    b.scope = snap.scope
    b.mode = MODES.get(snap.mode, bpb.ENFORCEMENT_MODE_STRICT)
    b.transaction_count = snap.transaction_count
    b.period = snap.period
    b.failure_policy = snap.failure_policy
    b.phase = snap.phase
    _set_cost(b.limit, snap.limit)
    _set_cost(b.spent, snap.spent)
    _set_cost(b.reserved, snap.reserved)
    _set_cost(b.remaining, snap.remaining)
    _set_timestamp(b.as_of, snap.as_of)
    if snap.period_start is not None:
        b.period_start.CopyFrom(_window_timestamp(snap.period_start))
    if snap.period_end is not None:
        b.period_end.CopyFrom(_window_timestamp(snap.period_end))
    if snap.projected_exhaustion is not None:
        _set_timestamp(b.projected_exhaustion, snap.projected_exhaustion)
    if snap.spend_rate_per_hour is not None:
        _set_cost(b.spend_rate_per_hour, snap.spend_rate_per_hour)
    return b


def offer_price(offer: rpb.Offer) -> tuple[Money, Money]:
    """(price, unit cost) of an offer in its own currency; MoneyError if malformed."""
    p = offer.pricing
    cur = parse_currency(p.currency, "pricing.currency")
    # A priced model without a rate is malformed, never free.
    rate = Money(parse_amount(p.rate, "pricing.rate"), cur) if p.model != rpb.PRICING_MODEL_FREE \
        else Money.zero(cur)
    qty = p.estimated_quantity if p.HasField("estimated_quantity") else 1
    if qty < 1:
        raise MoneyError("pricing.estimated_quantity", "must be at least 1")
    if p.model == rpb.PRICING_MODEL_FREE:
        price = Money.zero(cur)
    elif p.model == rpb.PRICING_MODEL_FLAT:
        price = rate
    elif p.model == rpb.PRICING_MODEL_PER_UNIT:
        price = rate.times(qty, round_up=True)
    else:
        raise MoneyError("pricing.model", "is not set")
    if p.HasField("unit_cost"):
        unit = Money(parse_amount(p.unit_cost, "pricing.unit_cost"), cur)
    elif p.model == rpb.PRICING_MODEL_PER_UNIT:
        unit = rate
    else:
        unit = Money(quantize(price.amount / qty, round_up=True), cur)
    return price, unit
