"""Converting between the broker's values and wire messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from google.protobuf.timestamp_pb2 import Timestamp

from budget.layers import Layer, Snapshot
from currency.money import Money
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
    micros = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    seconds, rest = divmod(micros // _MICROSECOND, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


@lru_cache(maxsize=1024)
def _window_timestamp(when: datetime) -> Timestamp:
    """A window's start or end: the same few in every answer. Shared: passed to a message's
    constructor, which copies it."""
    return timestamp(when)


def budget_state(snap: Snapshot) -> bpb.BudgetState:
    return bpb.BudgetState(
        layer=LAYERS[snap.layer], scope=snap.scope, limit=cost(snap.limit),
        spent=cost(snap.spent), reserved=cost(snap.reserved), remaining=cost(snap.remaining),
        mode=MODES.get(snap.mode, bpb.ENFORCEMENT_MODE_STRICT), transaction_count=snap.transaction_count,
        as_of=timestamp(snap.as_of), period=snap.period, failure_policy=snap.failure_policy,
        phase=snap.phase,
        period_start=None if snap.period_start is None else _window_timestamp(snap.period_start),
        period_end=None if snap.period_end is None else _window_timestamp(snap.period_end),
        projected_exhaustion=(None if snap.projected_exhaustion is None
                              else timestamp(snap.projected_exhaustion)),
        spend_rate_per_hour=None if snap.spend_rate_per_hour is None else cost(snap.spend_rate_per_hour),
    )
