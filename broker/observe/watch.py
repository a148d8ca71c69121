"""Every budget reading passes through here on its way to the caller.

A reading feeds the spend-rate forecast (and comes back with it), the exported
scope gauges, and, after a commit, the utilization histogram and the threshold
alerts. None of it waits on the network: alerts are queued for a background task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.observe.metrics import Metrics
from budget.forecast import SpendRates
from budget.layers import Snapshot
from budget.pacing import Pacer


class AlertSink(Protocol):
    def check(self, snaps: Sequence[Snapshot]) -> None:
        """Look for crossed thresholds; must not block (queue the work)."""


class BudgetWatch:
    def __init__(
        self, rates: SpendRates, metrics: Metrics, alerts: AlertSink | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.rates = rates
        self.metrics = metrics
        self.alerts = alerts
        self.pacer = pacer

    def seen(self, snaps: Sequence[Snapshot]) -> list[Snapshot]:
        """Numbers read from the budgets: returned with their forecast."""
        out = self.rates.observe_all(snaps)
        self.metrics.seen(out)
        if self.pacer is not None:
            self.pacer.observe(out)
        return out

    def committed(self, snaps: Sequence[Snapshot]) -> list[Snapshot]:
        """Numbers as a purchase's commit left them."""
        out = self.seen(snaps)
        self.metrics.committed(out)
        if self.alerts is not None:
            self.alerts.check(out)
        return out
