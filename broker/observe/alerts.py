"""Budget threshold alerts: each threshold fires once per (scope, period, window), across brokers.

The purchase path only calls `check` with the numbers a commit left, which never awaits: a crossed
threshold is put on a bounded queue (dropped, logged and counted in
broker_alert_checks_dropped_total when full; the next commit finds it again). A background
worker (`run`) claims each crossing in the store under a name made of scope, period, window,
currency and threshold, so however many brokers see the same crossing, exactly one wins. The
winner logs one structured WARNING (logger `broker.alerts`, extra field `event: budget_alert`),
counts it, and queues one delivery per configured webhook.

Each webhook has its own bounded queue and worker: a JSON POST (sorted keys, compact), signed
with HMAC-SHA256 over exactly the bytes sent when the webhook has a secret
(`X-Ramp-Signature: sha256=<hex>`), retried with exponential backoff on anything but a 2xx, up
to `max_attempts`. A slow or failing webhook holds up only its own queue; a full queue drops
the alert and counts it (broker_alert_webhook_dropped_total). On stop, workers are cancelled at
once (backoffs included) and whatever was not delivered is dropped, with one log line.

A small local memo of names already settled (won or lost) keeps repeated commits in one window
from asking the store again; it forgets names whose window has ended. A claim that failed
because the store was unreachable is not remembered, so a later commit tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, Final

import httpx

from broker.config import AlertsSetting
from broker.observe.metrics import Metrics
from budget.layers import OPEN_ALLOWANCE, Layer, Snapshot
from budget.periods import to_ms
from budget.stores.contract import Store, StoreUnavailable
from common.clock import Clock
from common.configfile import ConfigError
from currency.money import Money

# Not __name__: operators route alert events by this logger's name (examples/broker.yaml), which
# predates the module's move into broker/observe/.
log = logging.getLogger("broker.alerts")

# Names (per account) remembered as settled; the oldest are forgotten beyond this.
MEMO_MAX: Final = 10_000
# Crossings waiting to be claimed. At most one per name is queued at a time, so this only fills
# when the store is far behind; a crossing dropped here is found again by the next commit.
CLAIM_QUEUE_MAX: Final = 10_000
_UTILIZATION_PLACES: Final = Decimal("0.000001")
_CTX: Final = Context(prec=60)


def _canonical(value: Decimal) -> str:
    """A plain decimal string without trailing zeros or exponent: 0.80 -> "0.8", 1.0 -> "1"."""
    return format(value.normalize(_CTX), "f")


@dataclass(frozen=True, slots=True)
class _Threshold:
    text: str  # canonical: "0.8", "1"
    num: int  # the fraction num/den, exactly
    den: int

    @classmethod
    def parse(cls, text: str) -> _Threshold:
        value = Decimal(text)
        num, den = value.as_integer_ratio()
        return cls(_canonical(value), num, den)

    @property
    def percent(self) -> str:
        return _canonical(Decimal(self.text) * 100)

    def crossed(self, spent: int, limit: int) -> bool:
        """spent >= threshold * limit, in integers (nano-units)."""
        return spent * self.den >= self.num * limit


@dataclass(frozen=True, slots=True)
class _Crossing:
    account: str
    name: str  # the claim's name within the account
    snap: Snapshot
    threshold: _Threshold
    start: datetime  # the window's
    end: datetime
    end_ms: int
    expire_at_ms: int  # the claim's: window end + grace

    @property
    def key(self) -> tuple[str, str]:
        return self.account, self.name


@dataclass(frozen=True, slots=True)
class _Delivery:
    alert_id: str
    body: bytes
    headers: dict[str, str]


@dataclass(eq=False)
class _Webhook:
    index: int
    url: str
    secret: bytes | None
    timeout_s: float
    queue: asyncio.Queue[_Delivery]
    current: _Delivery | None = field(default=None)


class Alerter:
    def __init__(self, setting: AlertsSetting, store: Store, clock: Clock, metrics: Metrics, *,
                 grace_ms: int, instance: str) -> None:
        """Raises ConfigError when a webhook's secret_env names a variable that is not set."""
        self._setting = setting
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._grace_ms = grace_ms
        self._instance = instance
        unique: dict[Decimal, _Threshold] = {}
        for text in setting.thresholds:
            unique.setdefault(Decimal(text), _Threshold.parse(text))
        self._thresholds = [unique[v] for v in sorted(unique)]
        self._hooks: list[_Webhook] = []
        for i, hook in enumerate(setting.webhooks):
            secret: bytes | None = None
            if hook.secret_env is not None:
                value = os.environ.get(hook.secret_env, "")
                if not value:
                    # Unsigned alerts would be dropped by a receiver that checks signatures.
                    raise ConfigError(f"alerts.webhooks[{i}].secret_env: environment variable "
                                      f"{hook.secret_env} is not set (or is empty)")
                secret = value.encode()
            self._hooks.append(_Webhook(i, hook.url, secret, hook.timeout_ms / 1000,
                                        asyncio.Queue(maxsize=setting.queue_size)))
        self._crossings: asyncio.Queue[_Crossing] = asyncio.Queue(maxsize=CLAIM_QUEUE_MAX)
        self._pending: set[tuple[str, str]] = set()  # queued, not yet claimed
        self._settled: dict[tuple[str, str], int] = {}  # claimed by someone -> window end ms
        self._client: httpx.AsyncClient | None = None
        self._running = False

    # --- the purchase path: never awaits ------------------------------------------------------

    def check(self, snaps: Sequence[Snapshot]) -> None:
        """Queue every threshold these numbers cross that is not known to have fired already."""
        for snap in snaps:
            if (snap.layer != Layer.PERIOD or snap.period in ("", OPEN_ALLOWANCE)
                    or snap.period_start is None or snap.period_end is None or not snap.account):
                continue
            limit = snap.limit.units()
            if limit <= 0:
                continue
            spent = snap.spent.units()
            start_ms, end_ms = to_ms(snap.period_start), to_ms(snap.period_end)
            for threshold in self._thresholds:
                if not threshold.crossed(spent, limit):
                    break  # ascending: no higher one is crossed either
                name = (f"alert|{snap.scope}|{snap.period}|{start_ms}|{snap.limit.currency}|"
                        f"{threshold.text}")
                crossing = _Crossing(snap.account, name, snap, threshold, snap.period_start,
                                     snap.period_end, end_ms, end_ms + self._grace_ms)
                if crossing.key in self._pending or crossing.key in self._settled:
                    continue
                try:
                    self._crossings.put_nowait(crossing)
                except asyncio.QueueFull:
                    self._metrics.alert_checks_dropped.inc()
                    log.warning("budget alert check for %s %s dropped: %d crossing(s) already queued",
                                snap.scope, snap.period, self._crossings.qsize())
                    return
                self._pending.add(crossing.key)

    # --- background work ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim crossings and deliver alerts until `stop` is set; then stop at once."""
        if self._running:
            raise RuntimeError("Alerter.run is already running")
        self._running = True
        async with httpx.AsyncClient(follow_redirects=False) as client:
            self._client = client
            tasks = [asyncio.create_task(self._claim_worker(), name="alerts-claims")]
            tasks += [asyncio.create_task(self._delivery_worker(h), name=f"alerts-webhook-{h.index}")
                      for h in self._hooks]
            try:
                await stop.wait()
            finally:
                undelivered = sum(h.queue.qsize() + (h.current is not None) for h in self._hooks)
                unclaimed = self._crossings.qsize()
                for task in tasks:
                    task.cancel()
                for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(outcome, Exception):
                        log.error("alert worker failed: %r", outcome)
                self._client = None
                self._running = False
                if undelivered or unclaimed:
                    log.warning("alerts stopping: %d webhook delivery(ies) dropped undelivered, "
                                "%d threshold crossing(s) not yet claimed", undelivered, unclaimed)

    async def _claim_worker(self) -> None:
        while True:
            crossing = await self._crossings.get()
            try:
                await self._claim(crossing)
            except Exception:
                log.exception("budget alert %s: claim failed", crossing.name)
            finally:
                self._pending.discard(crossing.key)

    async def _claim(self, crossing: _Crossing) -> None:
        now_ms = to_ms(self._clock.now())
        try:
            won = await self._store.claim(crossing.account, crossing.name,
                                          expire_at_ms=crossing.expire_at_ms, now_ms=now_ms)
        except StoreUnavailable as exc:
            # Not remembered: the next commit in this window asks again.
            log.warning("budget alert %s not claimed, the store is unavailable: %s", crossing.name, exc)
            return
        self._remember(crossing, now_ms)
        if won:
            self._fire(crossing)

    def _remember(self, crossing: _Crossing, now_ms: int) -> None:
        for key in [k for k, end in self._settled.items() if end <= now_ms]:
            del self._settled[key]
        while len(self._settled) >= MEMO_MAX:
            del self._settled[next(iter(self._settled))]
        if crossing.end_ms > now_ms:
            self._settled[crossing.key] = crossing.end_ms

    def _fire(self, crossing: _Crossing) -> None:
        payload = self._payload(crossing)
        snap, threshold = crossing.snap, crossing.threshold
        fields: dict[str, Any] = {
            "event": "budget_alert", "alert_id": payload["id"], "account": snap.account,
            "scope": snap.scope, "period": snap.period, "window_start": payload["window_start"],
            "window_end": payload["window_end"], "threshold": threshold.text,
            "utilization": payload["utilization"], "currency": snap.limit.currency,
            "limit": snap.limit.text(), "spent": snap.spent.text(), "reserved": snap.reserved.text(),
            "remaining": snap.remaining.text(), "broker": self._instance,
        }
        log.warning("budget alert: %s %s %s%% of %s spent", snap.scope, snap.period, threshold.percent,
                    snap.limit, extra=fields)
        self._metrics.alerts.labels(threshold.text).inc()
        if not self._hooks:
            return
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        for hook in self._hooks:
            headers = {"Content-Type": "application/json", "X-Ramp-Alert-Id": payload["id"],
                       "User-Agent": "ramp-broker"}
            if hook.secret is not None:
                digest = hmac.new(hook.secret, body, hashlib.sha256).hexdigest()
                headers["X-Ramp-Signature"] = f"sha256={digest}"
            try:
                hook.queue.put_nowait(_Delivery(payload["id"], body, headers))
            except asyncio.QueueFull:
                self._metrics.webhook_dropped.inc()
                log.warning("budget alert %s not sent to alerts.webhooks[%d]: its queue is full "
                            "(%d waiting)", payload["id"], hook.index, hook.queue.qsize())

    def _payload(self, crossing: _Crossing) -> dict[str, Any]:
        snap = crossing.snap
        return {
            "event": "budget_threshold_crossed",
            # The same on every broker, so a receiver may deduplicate by it too.
            "id": hashlib.sha256(f"{crossing.account}\n{crossing.name}".encode()).hexdigest()[:32],
            "account": snap.account,
            "scope": snap.scope,
            "period": snap.period,
            "window_start": crossing.start.isoformat(),
            "window_end": crossing.end.isoformat(),
            "threshold": crossing.threshold.text,
            "utilization": _utilization(snap.spent.units(), snap.limit.units()),
            "limit": _money(snap.limit),
            "spent": _money(snap.spent),
            "reserved": _money(snap.reserved),
            "remaining": _money(snap.remaining),
            "as_of": snap.as_of.isoformat(),
            "broker": self._instance,
        }

    async def _delivery_worker(self, hook: _Webhook) -> None:
        while True:
            delivery = await hook.queue.get()
            hook.current = delivery
            try:
                await self._deliver(hook, delivery)
            except Exception:
                log.exception("budget alert %s: delivery to alerts.webhooks[%d] failed",
                              delivery.alert_id, hook.index)
            finally:
                hook.current = None

    async def _deliver(self, hook: _Webhook, delivery: _Delivery) -> None:
        s = self._setting
        delay = s.backoff_initial_seconds
        for attempt in range(1, s.max_attempts + 1):
            problem = await self._post(hook, delivery)
            if problem is None:
                self._metrics.webhooks.labels("delivered").inc()
                log.info("budget alert %s delivered to alerts.webhooks[%d] (attempt %d)",
                         delivery.alert_id, hook.index, attempt)
                return
            if attempt == s.max_attempts:
                break
            self._metrics.webhooks.labels("retried").inc()
            log.warning("budget alert %s to alerts.webhooks[%d]: attempt %d failed (%s); retrying in "
                        "%s s", delivery.alert_id, hook.index, attempt, problem, delay)
            await asyncio.sleep(delay)  # cancelled at once by stop
            delay = min(delay * 2, s.backoff_max_seconds)
        self._metrics.webhooks.labels("failed").inc()
        log.error("budget alert %s to alerts.webhooks[%d]: giving up after %d attempt(s); last: %s",
                  delivery.alert_id, hook.index, s.max_attempts, problem)

    async def _post(self, hook: _Webhook, delivery: _Delivery) -> str | None:
        """None when the webhook answered 2xx, else what went wrong."""
        assert self._client is not None
        try:
            # httpx's timeout is per operation; this bounds the whole exchange.
            async with asyncio.timeout(hook.timeout_s):
                async with self._client.stream("POST", hook.url, content=delivery.body,
                                               headers=delivery.headers, timeout=hook.timeout_s) as r:
                    status = r.status_code
        except TimeoutError:
            return f"no answer within {hook.timeout_s} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


def _utilization(spent: int, limit: int) -> str:
    """spent / limit as a decimal string, rounded down to 6 places (never up past a threshold)."""
    ratio = _CTX.divide(Decimal(spent), Decimal(limit))
    return _canonical(ratio.quantize(_UTILIZATION_PLACES, rounding=ROUND_FLOOR, context=_CTX))


def _money(m: Money) -> dict[str, str]:
    return {"amount": m.text(), "currency": m.currency}
