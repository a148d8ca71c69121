"""Predictive pacing: spreading the last of a budget out instead of spending it at 9:01.

Opt-in per scope (`pacing: even`). When the spend-rate forecast (budget.forecast,
an EWMA) says a paced budget runs out before its period ends, purchases charged
to it are admitted with probability

    p = clamp(target rate / current rate, MIN_ADMISSION, 1)

where the target rate spends what remains evenly over what is left of the period
(seed 000: "deliberately slowing the final dollars"). A purchase drawn out is
refused before anything is reserved: RESOURCE_EXHAUSTED, reason `budget_paced`,
with the numbers and `retry_at`, the moment the target curve has room for its
cost again. Nothing here is a limit: the store still enforces every limit
exactly; pacing only shapes when the money is spent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from budget.layers import BudgetExhausted, Layer, Snapshot
from currency.money import Money

# Never slower than this: a paced budget keeps some throughput (the forecast may lag).
MIN_ADMISSION = Decimal("0.05")


@dataclass(frozen=True, slots=True)
class Admission:
    probability: Decimal
    snap: Snapshot
    target_per_hour: Money


PacedKey = tuple[str, str, str, str]  # account, scope, period, currency


class Pacer:
    """Admission per paced budget, from the latest reading of it (with its forecast)."""

    def __init__(self, clock_now: Callable[[], datetime], rng: random.Random | None = None) -> None:
        self._now = clock_now
        self._rng = rng or random.Random()
        self._latest: dict[PacedKey, Snapshot] = {}

    def observe(self, snaps: Iterable[Snapshot]) -> None:
        """Readings with their forecast (BudgetWatch passes every one through)."""
        for snap in snaps:
            if snap.layer == Layer.PERIOD and snap.period_end is not None:
                self._latest[(snap.account, snap.scope, snap.period, snap.limit.currency)] = snap

    def admission(self, key: PacedKey) -> Admission | None:
        """The admission probability of a paced budget now (None: no forecast for it yet)."""
        latest = self._latest.get(key)
        if latest is None or latest.period_end is None:
            return None
        rate = latest.spend_rate_per_hour
        now = self._now()
        if rate is None or rate.is_zero():
            return None
        hours_left = Decimal((latest.period_end - now) // timedelta(microseconds=1)) / _MICROS_PER_HOUR
        if hours_left <= 0:
            return None
        target = Money(latest.remaining.amount / hours_left, latest.limit.currency)
        early = latest.projected_exhaustion is not None and latest.projected_exhaustion < latest.period_end
        if not early or target >= rate:
            return Admission(Decimal(1), latest, target)
        return Admission(max(MIN_ADMISSION, target.amount / rate.amount), latest, target)

    def admit(self, paced: Sequence[tuple[PacedKey, Money]]) -> None:
        """Draw for each paced budget a purchase is charged to (its key, the purchase's cost in its
        currency); raise BudgetExhausted `budget_paced` for the first that refuses it."""
        for key, cost in paced:
            admission = self.admission(key)
            if admission is None or admission.probability >= 1:
                continue
            if Decimal(self._rng.randrange(1_000_000)) / 1_000_000 < admission.probability:
                continue
            raise self._refusal(admission, cost)

    def _refusal(self, admission: Admission, cost: Money) -> BudgetExhausted:
        latest = admission.snap
        assert latest.period_end is not None
        # When the target curve has room for this purchase's cost again (at least a second).
        hours = cost.amount / admission.target_per_hour.amount if admission.target_per_hour.amount else 1
        wait = timedelta(microseconds=int(min(hours, Decimal(24)) * _MICROS_PER_HOUR))
        retry_at = self._now() + max(timedelta(seconds=1), wait)
        return BudgetExhausted(
            layer=Layer.PERIOD, scope=latest.scope, limit=latest.limit, spent=latest.spent,
            reserved=latest.reserved, cost=cost, reason="budget_paced",
            next_action=(f"retry after {retry_at.isoformat()}: {latest.scope}'s {latest.period} budget is "
                         f"paced to last until {latest.period_end.isoformat()} (admitting "
                         f"{admission.probability * 100:.0f}% of purchases now)"),
            period_end=latest.period_end, retry_at=retry_at, mode=latest.mode, phase=latest.phase,
        )


_MICROS_PER_HOUR = Decimal(3_600_000_000)
