"""Predictive pacing: spreading the last of a budget out instead of spending it at 9:01.

Opt-in per scope (`pacing: even`). The controller closes the loop on spend against
an even curve, never on a forecast of what it admitted (a controller that divides
by the rate it lets through settles at the geometric mean of the target and the
demand, not on the target):

  * The curve: each window starts with an allowance G (spend up to G is admitted
    at once), then rises evenly to the limit at the window's end. When spend falls
    more than G below it, it is lowered to spend + G and rises evenly from there
    to the limit: underspend is spread over the rest of the window, never banked
    for a burst at its end. Evaluated at the moment of each purchase (nothing is a
    rate read some time ago).
  * The band G: the window's even rate (limit / length) times `band_seconds`
    (forecast.half_life_seconds), at most MAX_BAND_SHARE of the limit.
  * Admission: p = clamp(1 - (spent - curve) / G, 0, 1): everything at or below
    the curve, nothing G above it. At steady offered demand D above the curve's
    rate c, spend settles at G (1 - c / D) above the curve; p is then c / D, the
    share of what is offered that the curve has room for.
  * One draw per purchase, dithered: the draw compares a uniform number with the
    budget's credit (the admission probabilities of the purchases it saw, minus
    the purchases it admitted), so what is admitted follows the sum of p to within
    a purchase or two however few purchases there are, and every draw is still
    random (two agents taking turns are not told yes and no in turn).

Spend is the budget's latest reading plus this broker's purchases in flight (admitted,
not yet ended: a burst drawn against one reading is paced like spend); a broker's
first purchase of a window reads the budget before it draws (Pacer.unread).

Bounds (c the curve's rate, D the offered demand, h = band_seconds):
  * spend <= curve + G + two purchases (one past G, one carried by the dithered
    draw), plus in lease mode what the other brokers spent since their last refresh
    (each broker compares the scope's total as its last lease refresh saw it, plus
    its own spend since, with the same curve); the curve is at most G above the even
    line from the window's start;
  * a budget offered more than its curve runs out no earlier than (G + two
    purchases) / c before the window's end: 2% of the window plus their share;
  * after demand drops to D' < c, every purchase is admitted again once spend is
    back on the curve: within G / (c - D'), about 2h for D' = c / 2.

A purchase drawn out is refused before anything is reserved: RESOURCE_EXHAUSTED,
reason `budget_paced`, with the curve's numbers and `retry_at`. A purchase that
does not fit what is left at all is not drawn: the budget refuses it as exhausted
(`period_budget_exhausted`, retry at the next window). Nothing here is a limit:
the store still enforces every limit exactly; pacing only shapes when the money
is spent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from budget.layers import BudgetExhausted, Layer, Snapshot
from currency.money import Money

# The band is at most this share of the limit: spend settles at most this far above the curve, so a
# budget offered any demand lasts to at least 1 - MAX_BAND_SHARE of its window.
MAX_BAND_SHARE = Decimal("0.02")

PacedKey = tuple[str, str, str, str]  # account, scope, period, currency
Admitted = tuple[tuple[PacedKey, Decimal], ...]  # a purchase's cost on each paced budget, in flight

_ONE = Decimal(1)
_ZERO = Decimal(0)
_MICROSECOND = timedelta(microseconds=1)
_MICROS = Decimal(1_000_000)
_CENT = Decimal("0.01")
_SHOWN_WEIGHT = 1 / 32


def _seconds(span: timedelta) -> Decimal:
    return Decimal(span // _MICROSECOND) / _MICROS


@dataclass(frozen=True, slots=True)
class Admission:
    """A paced budget now: its latest reading, where the curve is, and the admission probability."""

    probability: Decimal
    snap: Snapshot
    curve: Decimal  # the curve's value now, in the limit's currency
    rate: Decimal  # how fast the curve rises from here, per second
    band: Decimal  # G
    at: datetime
    in_flight: Decimal = _ZERO  # admitted here, not yet ended (so not in the reading)

    @property
    def ahead(self) -> Decimal:
        """How far spend (read, and in flight) is above the curve (negative: below it)."""
        return self.snap.spent.amount + self.in_flight - self.curve


@dataclass(slots=True)
class _Curve:
    window: datetime  # the window's start: a new window starts a new curve
    since: datetime  # the curve rises evenly from (since, base) to (window end, limit)
    base: Decimal
    credit: Decimal = _ZERO  # the dithered draw's carry: sum of p minus purchases admitted
    shown: float = 1.0  # p averaged over the last purchases (the gauge; never an amount)


class Pacer:
    """Admission per paced budget, from the latest reading of it and the clock."""

    def __init__(
        self, clock_now: Callable[[], datetime], rng: random.Random | None = None, *,
        band_seconds: float = 900.0,
        report: Callable[[PacedKey, float], None] | None = None,
    ) -> None:
        """`band_seconds`: G as seconds of the window's even rate (forecast.half_life_seconds);
        `report`: told each paced budget's admission probability at each purchase, averaged over the
        last few dozen (an EWMA of weight 1/32: the exported gauge)."""
        self._now = clock_now
        self._rng = rng or random.Random()
        self._band_s = Decimal(str(band_seconds))
        self._report = report or (lambda key, p: None)
        self._latest: dict[PacedKey, Snapshot] = {}
        self._curves: dict[PacedKey, _Curve] = {}
        # Purchases admitted and not yet ended, per budget: their spend is in no reading yet (a burst
        # of them, all drawn against the same reading, would otherwise all be admitted).
        self._in_flight: dict[PacedKey, Decimal] = {}

    def observe(self, snaps: Iterable[Snapshot]) -> None:
        """Readings of budgets (BudgetWatch passes every one through); the latest of each is kept."""
        for snap in snaps:
            if snap.layer != Layer.PERIOD or snap.period_end is None or snap.period_start is None:
                continue
            key = (snap.account, snap.scope, snap.period, snap.limit.currency)
            old = self._latest.get(key)
            # Spend only grows within a window: a reading with less is an older one arriving late.
            if (old is None or old.period_start is None or snap.period_start > old.period_start
                    or (snap.period_start == old.period_start and snap.spent.amount >= old.spent.amount)):
                self._latest[key] = snap

    def unread(self, keys: Iterable[PacedKey]) -> bool:
        """Some of these paced budgets have not been read in their current window."""
        now = self._now()
        return any(self._current(key, now) is None for key in keys)

    def _current(self, key: PacedKey, now: datetime) -> Snapshot | None:
        snap = self._latest.get(key)
        if snap is None or snap.period_start is None or snap.period_end is None:
            return None
        return snap if snap.period_start <= now < snap.period_end else None

    def admission(self, key: PacedKey) -> Admission | None:
        """Where a paced budget stands now (None: nothing read of its current window yet)."""
        now = self._now()
        snap = self._current(key, now)
        if snap is None or snap.period_start is None or snap.period_end is None:
            return None
        start, end = snap.period_start, snap.period_end
        in_flight = self._in_flight.get(key, _ZERO)
        limit, spent = snap.limit.amount, snap.spent.amount + in_flight
        band = min(limit * self._band_s / _seconds(end - start), limit * MAX_BAND_SHARE)
        if band <= 0:
            return None
        curve = self._curves.get(key)
        if curve is None or curve.window != start:
            curve = self._curves[key] = _Curve(start, start, band)
        rate = (limit - curve.base) / _seconds(end - curve.since)
        value = curve.base + rate * _seconds(now - curve.since)
        if spent + band < value:
            # More than the allowance below the curve: lowered, the rest spread over the time left.
            curve.since, curve.base = now, min(spent + band, limit)
            value = curve.base
            rate = (limit - value) / _seconds(end - now)
        probability = min(_ONE, max(_ZERO, 1 - (spent - value) / band))
        return Admission(probability, snap, value, max(rate, _ZERO), band, now, in_flight)

    def admit(self, paced: Sequence[tuple[PacedKey, Money]]) -> Admitted:
        """Draw once for each paced budget a purchase is charged to (its key, the purchase's cost in
        its currency); raise BudgetExhausted `budget_paced` for the first that refuses it. What it
        admits counts as spent until `done` is told the purchase ended (bought, or not)."""
        self._draw(paced)
        admitted = tuple((key, cost.amount) for key, cost in paced)
        for key, amount in admitted:
            self._in_flight[key] = self._in_flight.get(key, _ZERO) + amount
        return admitted

    def done(self, admitted: Admitted) -> None:
        """The purchase `admit` let through has ended: its spend, if any, is in the readings now."""
        for key, amount in admitted:
            left = self._in_flight.get(key, _ZERO) - amount
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)

    def _draw(self, paced: Sequence[tuple[PacedKey, Money]]) -> None:
        for key, cost in paced:
            admission = self.admission(key)
            if admission is None:
                continue
            curve = self._curves[key]
            # The gauge: p averaged over the last few dozen purchases (p itself moves with every one
            # admitted; a scrape of it now and then told little of the share admitted).
            curve.shown += (float(admission.probability) - curve.shown) * _SHOWN_WEIGHT
            self._report(key, curve.shown)
            if admission.probability >= 1:
                curve.credit = _ZERO
                continue
            if admission.snap.remaining.amount < cost.amount:
                # It does not fit what is left (or what no lease holds: the last purchase or two): the
                # budget refuses it as exhausted, not paced.
                continue
            credit = curve.credit + admission.probability
            if Decimal(self._rng.randrange(1_000_000)) / 1_000_000 < credit:
                curve.credit = credit - 1
                continue
            curve.credit = credit
            raise _refusal(admission, cost)


def _refusal(admission: Admission, cost: Money) -> BudgetExhausted:
    snap = admission.snap
    assert snap.period_end is not None
    # When the curve has risen by this purchase's cost (or, nothing admitted G above it, back to G).
    need = max(cost.amount, admission.ahead - admission.band)
    wait = need / admission.rate if admission.rate > 0 else _seconds(snap.period_end - admission.at)
    micros = int((wait * _MICROS).to_integral_value(rounding=ROUND_CEILING))  # never too early
    retry_at = min(snap.period_end, admission.at + timedelta(microseconds=micros))
    cur = snap.limit.currency
    curve = Money(admission.curve.quantize(_CENT), cur)
    percent = f"{admission.probability * 100:.0f}%"
    spent = str(snap.spent)
    if admission.in_flight:
        spent += f" (and {Money(admission.in_flight, cur)} in flight)"
    return BudgetExhausted(
        layer=Layer.PERIOD, scope=snap.scope, limit=snap.limit, spent=snap.spent, reserved=snap.reserved,
        cost=cost, reason="budget_paced", period_end=snap.period_end, retry_at=retry_at, mode=snap.mode,
        phase=snap.phase,
        message=(f"{snap.layer} budget {snap.scope!r} paced: spent {spent} against an even curve at "
                 f"{curve} now, rising to the limit {snap.limit} at {snap.period_end.isoformat()}; "
                 f"admitting {percent} of purchases, and not this one (cost {cost})"),
        next_action=(f"retry after {retry_at.isoformat()}: {snap.scope}'s {snap.period} budget is paced to "
                     f"last until {snap.period_end.isoformat()} (admitting {percent} of purchases now)"),
    )
