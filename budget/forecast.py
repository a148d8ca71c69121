"""Spend rate and projected exhaustion, per budget, from the numbers the broker reads.

Every reading of a budget (a commit's answer, a status call) is an observation of
its counter: `spent` at `as_of`. The rate is an exponentially weighted moving
average over time of the spend between readings, with weight
1 - 2^(-dt / half_life) for the newest interval, so irregular readings weigh by
the time they cover. It starts from zero at the first reading: two purchases a
millisecond apart are a burst spread over the half-life, not a rate of a purchase
per millisecond (a steady rate is half reached after one half-life). All in
Decimal: a rate multiplied back into money must not pick up binary rounding.

A reading sees the counter's total, whoever spent it, so with several brokers
on one store each one's rate is the scope's rate, not only its own share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from budget.layers import Snapshot
from currency.money import SCALE, Money

_LN2 = Decimal(2).ln()
_MICROS = Decimal(1_000_000)
_ZERO = timedelta(0)
# Projections further out than this are reported as none (and kept inside datetime's range).
_HORIZON = timedelta(days=3660)
_MICROSECOND = timedelta(microseconds=1)
_HORIZON_MICROS = _HORIZON // _MICROSECOND


# Once a budget has a rate, readings closer together than this are folded in together, as one
# interval (the spend between them is the same; only the smoothing's steps are coarser): at
# hundreds of purchases a second, an exp() per budget per purchase was a sixth of a purchase's CPU.
_FOLD_EVERY = timedelta(milliseconds=100)


@dataclass(slots=True)
class _Track:
    at: datetime
    spent: int  # nano-units
    window: datetime | None
    rate: Decimal  # nano-units per second
    per_hour: Money | None = None  # the rate as money an hour: None until two readings made one


class SpendRates:
    """Per-budget EWMA spend rates; bounded, least recently read budgets are forgotten first."""

    def __init__(self, half_life_seconds: float, *, max_budgets: int = 100_000) -> None:
        self._half_life = Decimal(str(half_life_seconds))
        self._max = max_budgets
        self._tracks: OrderedDict[tuple[str, ...], _Track] = OrderedDict()

    def observe(self, snap: Snapshot) -> Snapshot:
        """Fold one reading into its budget's rate; returns the reading with the forecast."""
        # The layer itself, not its .value: an enum's value is a property lookup, on every budget of
        # every purchase (a StrEnum hashes and compares as its string).
        key = (snap.layer, snap.account, snap.scope, snap.period, snap.limit.currency)
        track = self._tracks.get(key)
        if track is None:
            self._tracks[key] = _Track(snap.as_of, snap.spent.units(), snap.period_start, Decimal(0))
            if len(self._tracks) > self._max:
                self._tracks.popitem(last=False)
            return snap
        self._tracks.move_to_end(key)
        elapsed = snap.as_of - track.at
        if track.window != snap.period_start:
            # A new window starts from zero: keep the rate, restart the baseline.
            track.at, track.spent, track.window = snap.as_of, snap.spent.units(), snap.period_start
        elif elapsed > _ZERO and (elapsed >= _FOLD_EVERY or track.per_hour is None):
            spent = snap.spent.units()
            if spent >= track.spent:  # (an older reading arriving late, with less spent, is skipped)
                dt = Decimal(elapsed // _MICROSECOND) / _MICROS
                instant = Decimal(spent - track.spent) / dt
                weight = 1 - (-(dt * _LN2) / self._half_life).exp()
                track.rate += weight * (instant - track.rate)
                track.at, track.spent = snap.as_of, spent
                per_hour = int((track.rate * 3600).to_integral_value())
                track.per_hour = Money.from_units(per_hour, snap.limit.currency)
        if track.per_hour is None:
            return snap
        return self._forecast(snap, track.rate, track.per_hour)

    def observe_all(self, snaps: Sequence[Snapshot]) -> list[Snapshot]:
        return [self.observe(s) for s in snaps]

    @staticmethod
    def _forecast(snap: Snapshot, rate: Decimal, per_hour: Money) -> Snapshot:
        projected = None
        # snap.remaining, in Decimal without the Money objects (this runs for every budget of
        # every purchase); exact: amounts have at most 18 digits.
        remaining = snap.limit.amount - snap.spent.amount - snap.reserved.amount
        if remaining <= 0:
            projected = snap.as_of
        elif rate > 0:
            micros = (remaining.scaleb(SCALE) * _MICROS / rate).to_integral_value()
            if micros < _HORIZON_MICROS:
                projected = snap.as_of + timedelta(microseconds=int(micros))
            if projected is not None and snap.period_end is not None and projected >= snap.period_end:
                projected = None  # the window resets before the money runs out
        return snap.with_forecast(per_hour, projected)
