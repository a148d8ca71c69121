"""Budget threshold alerts (stub: being written)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broker.config import AlertsSetting
from broker.metrics import Metrics
from budget.clock import Clock
from budget.layers import Snapshot
from budget.store import Store


class Alerter:
    def __init__(self, setting: AlertsSetting, store: Store, clock: Clock, metrics: Metrics, *,
                 grace_ms: int, instance: str) -> None:
        self._setting = setting

    def check(self, snaps: Sequence[Snapshot]) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
