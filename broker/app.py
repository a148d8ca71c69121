"""Assembling a running broker from its configuration."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from connectrpc.interceptor import Interceptor

from broker.config import BrokerConfig, StoreSetting
from broker.observe.alerts import Alerter
from broker.observe.instrument import TimedExchange, TimedStore
from broker.observe.logs import RequestIds
from broker.observe.metrics import Metrics, PeriodEventMetrics
from broker.observe.watch import BudgetWatch
from broker.purchase.flow import Purchaser
from broker.purchase.selection import Exchange
from broker.rpc.auth import AdminToken, Authenticate, Authenticator, RequireAdmin
from broker.rpc.codecs import MAX_BODY_BYTES, server_codecs, server_compressions
from broker.rpc.errors import ErrorMapping
from broker.rpc.health import HEALTH_SERVICE, Readiness, health_apps, readyz
from broker.rpc.reflection import REFLECTION_SERVICES, reflection_apps
from broker.rpc.service import AdminHandlers, BrokerHandlers, BudgetHandlers
from budget.durability.journal import Journal
from budget.durability.memory import StoreMemory
from budget.forecast import SpendRates
from budget.leases import LeaseBook
from budget.pacing import Pacer
from budget.period import PeriodLayer, ScopeRule
from budget.periods import Period, time_zone
from budget.scopes import billing_scope
from budget.session import SessionBudgets
from budget.stores.contract import Store
from common.clock import Clock, SystemClock
from common.statedir import state_dir
from currency.convert import Chain, ConversionError, Converter, FixedRates, NoConverter
from currency.ecb import EcbConverter, EcbSource, run_refresher
from exchange_client.ramp import ConnectExchange
from ramp.broker.v1.broker_connect import (
    BrokerServiceASGIApplication,
    BudgetAdminServiceASGIApplication,
    BudgetServiceASGIApplication,
)
from rpc_server.serving import ASGIApp, Router

log = logging.getLogger(__name__)


@dataclass
class Broker:
    config: BrokerConfig
    app: Router
    exchanges: dict[str, Exchange]
    sessions: SessionBudgets
    metrics: Metrics
    period: PeriodLayer | None = None
    ecb: EcbConverter | None = None
    alerter: Alerter | None = None
    readiness: Readiness | None = None
    purchaser: Purchaser | None = None
    # Set when the server starts draining (SIGTERM): readiness turns NOT_SERVING, Watch streams end.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        """Background work: the period layer's sweeper and journal replay, rates, alerts."""
        if self._tasks:
            return
        if self.alerter is not None:
            self._tasks.append(asyncio.create_task(self.alerter.run(self._stop)))
        if self.period is not None:
            self._tasks.append(asyncio.create_task(self.period.run_upkeep(
                self.config.period_budgets.sweep_interval_seconds, self._stop)))
            if self.period.leases is not None:
                self._tasks.append(asyncio.create_task(self.period.leases.run(self._stop)))
        if self.ecb is not None and self.config.ecb_rates is not None:
            self._tasks.append(asyncio.create_task(run_refresher(
                self.ecb, self.config.ecb_rates.refresh_seconds, self._stop)))
        if self.readiness is not None:
            self._tasks.append(asyncio.create_task(self.readiness.run(self._stop, self.draining)))

    async def close(self) -> None:
        if self.purchaser is not None:
            await self.purchaser.drain(self.config.shutdown_grace_seconds)
        self._stop.set()
        for task in self._tasks:
            await task
        try:
            if self.period is not None:
                await self.period.close()  # may still ask the Exchanges (settling leases)
        finally:
            for ex in self.exchanges.values():
                await ex.adapter.close()


def scope_owners(config: BrokerConfig) -> dict[str, str]:
    """Every scope the config knows, and the account it belongs to."""
    owners = {s: name for name, acct in config.period_budgets.accounts.items() for s in acct.scopes}
    callers = [*config.agents, *([config.anonymous] if config.anonymous else [])]
    for a in callers:
        for scope in [*a.charged_to, *a.may_name, *([billing_scope(a.billing_ref)] if a.billing_ref else [])]:
            owners.setdefault(scope, a.account)
    return owners


async def open_store(setting: StoreSetting, accounts: Iterable[str] = ()) -> Store:
    """The configured store; on a Redis Cluster, every key of each of `accounts` must share one slot."""
    if setting.kind == "redis":
        from budget.stores.redis import RedisStore

        return await RedisStore.open(
            setting.url, timeout_ms=setting.timeout_ms, prefix=setting.key_prefix, lazy=True,
            wait_replicas=setting.wait_replicas)
    if setting.kind == "redis-cluster":
        from budget.stores.redis_cluster import RedisClusterStore

        return await RedisClusterStore.open_cluster(
            setting.urls, timeout_ms=setting.timeout_ms, prefix=setting.key_prefix, lazy=True,
            wait_replicas=setting.wait_replicas, accounts=accounts)
    from budget.stores.sqlite import SqliteStore, default_path

    return await SqliteStore.open(_file(setting.path, default_path()), timeout_ms=setting.timeout_ms)


def failure_domain(store: Store) -> Callable[[str], str] | None:
    """Which accounts fail together, for a store whose parts fail alone (Redis Cluster primaries)."""
    from budget.stores.redis_cluster import RedisClusterStore

    return store.failure_domain if isinstance(store, RedisClusterStore) else None


def _file(configured: str | None, default: Path) -> Path:
    return Path(configured).expanduser() if configured else default


async def load_converter(
    config: BrokerConfig, clock: Clock, store: Store | None
) -> tuple[Converter, EcbConverter | None]:
    """build_converter, with the ECB rates (if configured) loaded once."""
    converter, ecb = build_converter(config, clock, store)
    if ecb is not None:
        try:
            await ecb.refresh()
        except ConversionError as exc:
            # Conversions are refused until a refresh succeeds; same-currency purchases go on.
            log.error("ECB reference rates not loaded: %s", exc)
    return converter, ecb


def build_converter(
    config: BrokerConfig, clock: Clock, store: Store | None
) -> tuple[Converter, EcbConverter | None]:
    fixed: list[Converter] = [FixedRates(config.decimal_rates())] if config.rates else []
    if config.ecb_rates is None:
        return (fixed[0] if fixed else NoConverter()), None
    s = config.ecb_rates
    ecb = EcbConverter(EcbSource(s.source, cache_ttl=timedelta(seconds=s.cache_seconds)), clock,
                       store=store, max_age=timedelta(hours=s.max_age_hours))
    return Chain(*fixed, ecb), ecb


def scope_rules(config: BrokerConfig, owners: dict[str, str]) -> dict[str, dict[str, ScopeRule]]:
    """Every account (those of agents too) and the configured rules of its scopes."""
    rules: dict[str, dict[str, ScopeRule]] = {account: {} for account in owners.values()}
    for name, account in config.period_budgets.accounts.items():
        for scope, s in account.scopes.items():
            rules[name][scope] = ScopeRule(
                limits={lim.period: (Period.parse(lim.period, "period"), lim.money()) for lim in s.limits},
                failure=s.failure,
                open_allowance=s.open_allowance.money() if s.open_allowance else None,
                mode=s.mode, tier=s.tier, pacing=s.pacing == "even",
            )
    return rules


def build_period_layer(
    config: BrokerConfig, owners: dict[str, str], clock: Clock, converter: Converter, store: Store,
    metrics: Metrics | None = None, failure_domain: Callable[[str], str] | None = None,
) -> PeriodLayer:
    def refreshed(ok: bool) -> None:
        if metrics is not None:
            metrics.lease_refreshes.labels("ok" if ok else "failed").inc()

    pb = config.period_budgets
    rules = scope_rules(config, owners)
    # One journal and one memory per broker: the defaults are named after its port.
    port = config.listen.rsplit(":", 1)[1]
    journal_path = _file(pb.journal_path, state_dir() / f"journal-{port}.jsonl")
    memory_path = _file(pb.memory_path, state_dir() / f"memory-{port}.json")
    period = PeriodLayer(
        store, rules, clock=clock, tz=time_zone(pb.time_zone, "period_budgets.time_zone"),
        converter=converter, ttl_s=pb.reservation_ttl_seconds, grace_s=pb.grace_seconds,
        journal=Journal(journal_path), events=PeriodEventMetrics(metrics) if metrics else None,
        memory=StoreMemory(memory_path), failure_domain=failure_domain,
    )
    leasing = [account for account, scopes in rules.items()
               if any(rule.mode == "lease" for rule in scopes.values())]
    if leasing:
        ls = pb.leases
        # A purchase waits on the store for room in its leases at most a store call's deadline in all;
        # the embedded store's calls have none (its timeout_ms is SQLite's busy timeout): there it
        # waits for its refresh as a strict purchase waits for its reservation.
        wait_s = None if pb.store.kind == "embedded" else pb.store.timeout_ms / 1000
        period.leases = LeaseBook(
            store, clock=clock, broker=period.instance,
            journal=Journal(_file(ls.journal_path, state_dir() / f"leases-{port}.jsonl")),
            identity=period.guard.identity, floor=period.guard.floor, on_lost=period.guard.mark_lost,
            refresh_s=ls.refresh_seconds, ttl_s=ls.ttl_seconds, rate_half_life_s=ls.rate_half_life_seconds,
            store_timeout_s=wait_s, on_refresh=refreshed, accounts=leasing)
    return period


async def build_broker(
    config: BrokerConfig, clock: Clock | None = None, rng: random.Random | None = None,
) -> Broker:
    """`rng`: pacing's admission draws (budget.pacing), seeded by tests that must not be left to chance."""
    clock = clock or SystemClock()
    auth = Authenticator(config.agents, config.anonymous)
    admin_token = AdminToken(config)
    owners = scope_owners(config)
    metrics = Metrics(config.metrics.export_scopes)
    store: Store | None = None
    domain: Callable[[str], str] | None = None
    if owners:
        opened = await open_store(config.period_budgets.store, owners.values())
        domain = failure_domain(opened)
        store = TimedStore(opened, metrics.store_call)
    converter, ecb = await load_converter(config, clock, store)
    if ecb is not None:
        metrics.rate_age(lambda: _age_seconds(ecb, clock))
    period = (build_period_layer(config, owners, clock, converter, store, metrics, failure_domain=domain)
              if store is not None else None)
    alerter = None
    if store is not None:
        alerter = Alerter(config.alerts, store, clock, metrics,
                          grace_ms=config.period_budgets.grace_seconds * 1000, instance=config.listen)
    pacer = Pacer(clock.now, rng, band_seconds=config.forecast.half_life_seconds,
                  report=lambda key, p: metrics.paced(key[1], key[2], key[3], p))
    watch = BudgetWatch(SpendRates(config.forecast.half_life_seconds), metrics, alerter, pacer)
    default = config.session.default_limit.money() if config.session.default_limit else None
    sessions = SessionBudgets(clock, default, idle_seconds=config.session.idle_seconds)
    exchanges = {
        e.name: Exchange(e, TimedExchange(ConnectExchange(e.name, e.endpoint), metrics.exchange_call))
        for e in config.exchanges
    }
    purchaser = Purchaser(config, exchanges, sessions, converter, clock, period, watch)
    errors = ErrorMapping(metrics)
    # Metadata interceptors first: they run on the headers, before the body is read, so a
    # caller without a valid key costs the broker no decoding.
    agents: list[Interceptor] = [RequestIds(), Authenticate(auth, errors), errors]
    # Unknown JSON fields are refused, not skipped: a misspelled "maxPrize" must
    # not quietly buy without the cap the agent meant to set.
    codecs, compressions = server_codecs(), server_compressions()
    broker_app = BrokerServiceASGIApplication(
        BrokerHandlers(purchaser), interceptors=agents, codecs=codecs,
        compressions=compressions, read_max_bytes=MAX_BODY_BYTES)
    budget_app = BudgetServiceASGIApplication(
        BudgetHandlers(sessions, purchaser), interceptors=agents, codecs=codecs,
        compressions=compressions, read_max_bytes=MAX_BODY_BYTES)
    apps: dict[str, ASGIApp] = {broker_app.path: broker_app, budget_app.path: budget_app}
    if period is not None:
        admin_app = BudgetAdminServiceASGIApplication(
            AdminHandlers(period, owners, watch, purchaser.recovery, clock),
            interceptors=[RequestIds(), RequireAdmin(admin_token, errors), errors], codecs=codecs,
            compressions=compressions, read_max_bytes=MAX_BODY_BYTES)
        apps[admin_app.path] = admin_app
    # For tools and probes, without keys: grpc.health.v1 and server reflection (issue 14).
    served = [*(path[1:] for path in apps), HEALTH_SERVICE, *REFLECTION_SERVICES]
    readiness = Readiness(
        config.readiness, served, store=period.store if period else None,
        account=min(period.accounts, default=None) if period else None,
        closed_scopes=period is not None and any(
            period.rule(account, scope).failure == "closed" for scope, account in owners.items()),
        exchanges={e.name: e.endpoint for e in config.exchanges})
    apps.update(health_apps(readiness, [RequestIds()]))
    apps.update(reflection_apps(served, [RequestIds()]))

    async def healthz(method: str, body: Any) -> tuple[int, Any]:
        return 200, {"status": "ok", "exchanges": sorted(exchanges), "sessions": len(sessions)}

    router = Router(apps, {"/healthz": healthz, "/readyz": readyz(readiness)})
    return Broker(config, router, exchanges, sessions, metrics, period, ecb, alerter, readiness, purchaser)


def _age_seconds(ecb: EcbConverter, clock: Clock) -> float | None:
    rates = ecb.rates
    if rates is None:
        return None
    return (clock.now() - datetime.combine(rates.date, time(0), UTC)).total_seconds()
