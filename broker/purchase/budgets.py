"""The budgets of a purchase, read as its caller sees them.

A purchase is charged to its caller's session (in memory) and, when the caller has period
scopes, to the period counters of its charge: its plan. Every reading passes through the budget
watch (forecast, gauges, alerts) on its way to an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from broker.observe.watch import BudgetWatch
from budget.layers import Snapshot
from budget.period import Charge, PeriodLayer, Plan, StoreDown
from budget.session import SessionAccount
from currency.convert import ConversionError, Converter, convert
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb


class Budgets:
    def __init__(self, period: PeriodLayer | None, watch: BudgetWatch, converter: Converter) -> None:
        self._period = period
        self._watch = watch
        self._converter = converter

    async def plan(self, charge: Charge | None) -> Plan | None:
        """The period counters a purchase is charged to now (None: no period layer)."""
        return await self._period.plan(charge) if charge and self._period else None

    async def snapshots(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        """Every budget's numbers now, with their forecast."""
        return self._watch.seen(await self.read(account, plan))

    async def read(self, account: SessionAccount | None, plan: Plan | None) -> list[Snapshot]:
        snaps = [account.snap()] if account else []
        if plan is not None and self._period is not None:
            snaps.extend(await self._period.snapshots(plan))
        return snaps

    async def after(
        self, account: SessionAccount, plan: Plan | None, committed: list[Snapshot] | None, spent: Money,
    ) -> list[Snapshot]:
        """Every budget as a purchase that spent `spent` left it: as its commits answered (no second
        read), else read again. Only money that moved counts as a committed purchase (utilization,
        alerts)."""
        if committed is not None or plan is None or not plan.counters:
            snaps = [account.snap(), *(committed or [])]
        else:
            try:
                snaps = await self.read(account, plan)
            except StoreDown:
                snaps = [account.snap()]  # bought and recorded; only the report is partial
        return self._watch.seen(snaps) if spent.is_zero() else self._watch.committed(snaps)

    def tightest(self, budgets: Sequence[bpb.BudgetState]) -> bpb.BudgetState | None:
        return tightest(budgets, self._converter)


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
