"""What Prometheus scrapes: one registry per broker, served on its own address.

Label values are bounded: layers, outcomes, reasons and operations are fixed sets;
exchanges come from the config file. Scopes appear as labels only for the scopes
an operator lists in `metrics.export_scopes`. Money exported as a gauge is a float
because Prometheus has nothing else; it is for graphs, never for enforcement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

from budget.layers import Layer, Snapshot
from rpc_server.serving import ASGIApp, not_a_request

METRICS_PATH = "/metrics"
UTILIZATION_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, float("inf"))
# Seconds: store calls are sub-millisecond to the store timeout; exchange calls up to seconds.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class Metrics:
    def __init__(self, export_scopes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._export = frozenset(export_scopes)
        self.purchases = Counter(
            "broker_purchases", "Transact calls by outcome: purchased, partial (some items bought), "
            "failed (none bought), replayed, denied (a budget), rejected (other refusals), error.",
            ["outcome"], registry=r)
        self.denials = Counter(
            "broker_denials", "Refused requests by layer and stable reason (the Denial error detail).",
            ["layer", "reason"], registry=r)
        self.exhausted = Counter(
            "broker_budget_exhausted", "Purchases denied because a budget could not cover them.",
            ["layer"], registry=r)
        self.utilization = Histogram(
            "broker_budget_utilization_ratio", "Per committed purchase and layer: the highest "
            "(spent + reserved) / limit over that layer's budgets, after the commit.",
            ["layer"], buckets=UTILIZATION_BUCKETS, registry=r)
        self.reservation = Histogram(
            "broker_reservation_duration_seconds", "Time to hold a purchase on every budget "
            "(session and period), including re-reads after a lost race.",
            buckets=_FAST, registry=r)
        self.store_latency = Histogram(
            "broker_store_operation_duration_seconds", "Budget store calls by operation.",
            ["operation"], buckets=_FAST, registry=r)
        self.store_errors = Counter(
            "broker_store_errors", "Budget store calls that failed (unreachable or timed out).",
            ["operation"], registry=r)
        self.fail_open = Counter(
            "broker_fail_open_spends", "Purchases spent from a fail-open allowance while the "
            "store was unreachable.", registry=r)
        self.exchange_latency = Histogram(
            "broker_exchange_request_duration_seconds", "Calls to Exchanges by method "
            "(discover, execute).", ["exchange", "method"], buckets=_SLOW, registry=r)
        self.exchange_errors = Counter(
            "broker_exchange_errors", "Exchange calls without an answer, by kind (timeout, "
            "unavailable, or the Connect code).", ["exchange", "method", "kind"], registry=r)
        self.refunded = Counter(
            "broker_reservations_expired", "Expired reservations refunded by this broker's sweeper.",
            registry=r)
        self.late = Counter(
            "broker_late_commits", "Commits that arrived after their reservation expired.", registry=r)
        self.overages = Counter(
            "broker_overages", "Commits that recorded more than was reserved (the Exchange "
            "charged above the offer).", registry=r)
        self.mode = Gauge(
            "broker_budget_mode", "1 for how each scope in metrics.export_scopes is enforced now: strict "
            "(strict mode), or lease mode and its phase (lease_generous ... lease_exhausted).",
            ["scope", "period", "currency", "mode"], registry=r)
        self.lease_refreshes = Counter(
            "broker_lease_refreshes", "Lease refreshes this broker sent to the store, by outcome (ok, "
            "failed).", ["outcome"], registry=r)
        self.admission = Gauge(
            "broker_pacing_admission_probability", "Share of purchases a paced budget admits now, "
            "averaged over its last few dozen (1: not pacing), for the scopes in metrics.export_scopes.",
            ["scope", "period", "currency"],
            registry=r)
        self.over_limit = Counter(
            "broker_counters_over_limit", "Commits that left a counter's spend above its limit (an "
            "overage or a late commit; logged as an error, the counter denies until raised).", registry=r)
        self.store_lost = Counter(
            "broker_store_lost", "Times this broker found an account's store showing less than it had "
            "seen (identity, generation, limits version or spend): refused until adopted.", registry=r)
        self.overcharges = Counter(
            "broker_exchange_overcharges", "Items an Exchange charged above its own quote (counted "
            "in full; the Exchange then ranks lower, see selection.TrustPenalties).", ["exchange"],
            registry=r)
        self.alerts = Counter(
            "broker_budget_alerts", "Budget threshold alerts fired by this broker (each threshold "
            "fires once per scope, period and window across all brokers).", ["threshold"], registry=r)
        self.webhooks = Counter(
            "broker_alert_webhook_deliveries", "Alert webhook POSTs by outcome: delivered, retried, "
            "failed (gave up after the last attempt).", ["outcome"], registry=r)
        self.alert_checks_dropped = Counter(
            "broker_alert_checks_dropped", "Threshold crossings not queued for a claim because the "
            "queue was full (a later commit finds them again).", registry=r)
        self.webhook_dropped = Counter(
            "broker_alert_webhook_dropped", "Alerts dropped because a webhook's queue was full.",
            registry=r)
        self.remaining = Gauge(
            "broker_budget_remaining", "Remaining budget of the scopes in metrics.export_scopes, "
            "in the limit's currency.", ["scope", "period", "currency"], registry=r)
        self.limit = Gauge(
            "broker_budget_limit", "Limit (with credit) of the scopes in metrics.export_scopes.",
            ["scope", "period", "currency"], registry=r)
        for layer in Layer:
            self.exhausted.labels(layer.value)
            self.utilization.labels(layer.value)

    # --- the purchase path ------------------------------------------------------------

    def purchase(self, outcome: str) -> None:
        self.purchases.labels(outcome).inc()

    def paced(self, scope: str, period: str, currency: str, probability: float) -> None:
        """A paced budget's admission probability, for the exported scopes."""
        if scope in self._export:
            self.admission.labels(scope, period, currency).set(probability)

    def overcharged(self, exchange: str) -> None:
        self.overcharges.labels(exchange).inc()

    def denied(self, layer: str, reason: str) -> None:
        self.denials.labels(layer, reason).inc()
        if layer in _BUDGET_LAYERS and _is_exhaustion(reason):
            self.exhausted.labels(layer).inc()

    def committed(self, snaps: Sequence[Snapshot]) -> None:
        """One observation per layer: its budget closest to its limit."""
        worst: dict[Layer, float] = {}
        for s in snaps:
            limit = s.limit.amount
            # A ratio for a histogram, not an amount: Decimal straight to float.
            ratio = 1.0 if limit <= 0 else float((s.spent.amount + s.reserved.amount) / limit)
            worst[s.layer] = max(ratio, worst.get(s.layer, 0.0))
        for layer, ratio in worst.items():
            self.utilization.labels(layer.value).observe(ratio)

    def seen(self, snaps: Sequence[Snapshot]) -> None:
        """Budgets read anywhere: update the exported scopes' gauges."""
        for s in snaps:
            if s.layer is Layer.PERIOD and s.scope in self._export and s.period:
                labels = (s.scope, s.period, s.limit.currency)
                self.remaining.labels(*labels).set(float(s.remaining.text()))
                self.limit.labels(*labels).set(float(s.limit.text()))
                state = f"lease_{s.phase}" if s.mode == "lease" and s.phase else s.mode
                for name in _MODES:
                    self.mode.labels(*labels, name).set(1 if name == state else 0)

    # --- calls out of the broker ---------------------------------------------------------

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self.store_latency.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()

    def exchange_call(self, exchange: str, method: str, seconds: float, error: str | None) -> None:
        self.exchange_latency.labels(exchange, method).observe(seconds)
        if error is not None:
            self.exchange_errors.labels(exchange, method, error).inc()

    def rate_age(self, age_seconds: Callable[[], float | None]) -> None:
        """Export the age of the loaded conversion rates (NaN until some are loaded)."""
        gauge = Gauge("broker_conversion_rate_age_seconds", "Age of the loaded ECB reference "
                      "rates (from their publication date).", registry=self.registry)
        gauge.set_function(lambda: _nan_if_none(age_seconds()))

    def asgi_app(self) -> ASGIApp:
        """GET /metrics; 404 elsewhere. Lifespan events are answered before the scrape app
        sees them (prometheus_client's app asserts on them, which hypercorn logs as an error)."""
        scrape: ASGIApp = make_asgi_app(self.registry)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if await not_a_request(scope, receive, send):
                return
            if scope["path"] == METRICS_PATH:
                await scrape(scope, receive, send)
                return
            body = f"not found: metrics are at {METRICS_PATH}\n".encode()
            await send({"type": "http.response.start", "status": 404, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return app


class PeriodEventMetrics:
    """budget.period.PeriodEvents, counted."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def refunded(self, count: int) -> None:
        self._m.refunded.inc(count)

    def overage(self) -> None:
        self._m.overages.inc()

    def late_commit(self) -> None:
        self._m.late.inc()

    def fail_open_spend(self) -> None:
        self._m.fail_open.inc()

    def over_limit(self) -> None:
        self._m.over_limit.inc()

    def store_lost(self) -> None:
        self._m.store_lost.inc()


_BUDGET_LAYERS = frozenset(layer.value for layer in Layer)
_MODES = ("strict", "lease", "lease_generous", "lease_tightening", "lease_strict", "lease_synchronous",
          "lease_exhausted")


def _is_exhaustion(reason: str) -> bool:
    """A budget that could not cover a cost (BudgetExhausted: "session_budget_exhausted",
    "period_budget_exhausted", "open_allowance_exhausted", "transaction_cap_exceeded"), as
    opposed to other refusals on the same layers ("session_has_no_budget",
    "idempotency_key_in_flight", "no_offer_meets_constraints", "limit_change_refused")."""
    return reason.endswith("_exhausted") or reason == "transaction_cap_exceeded"


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value
