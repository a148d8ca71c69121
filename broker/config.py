"""The broker's configuration (broker.yaml), validated at start."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)

from budget.periods import Period, time_zone
from budget.scopes import check_account, check_scope
from common.configfile import check_address, load
from currency.money import Money, is_iso_currency, parse_amount, parse_currency, set_extra_currencies
from currency.settings import Amount, CurrencyCode

ENV_PREFIX = "RAMP_BROKER_"
# The identity of callers without a key (broker/purchase/agents.py): they own sessions and idempotency
# keys under it, so an agent by that name would share them.
ANONYMOUS_ID = "anonymous"
# exchange_client/ramp.py _GUARD_S: how long past execute_timeout_ms a call may run.
EXECUTE_GUARD_MS = 250


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MoneySetting(_Strict):
    amount: Amount
    currency: CurrencyCode

    def money(self) -> Money:
        return Money.parse(self.amount, self.currency, "limit")


class ExchangeSetting(_Strict):
    # The Exchange's domain, as its offers name it.
    name: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")
    endpoint: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    # 0-100: how far the operator trusts this Exchange; ranks offers after unit cost.
    trust: int = Field(default=50, ge=0, le=100)
    # Lower is asked about first and wins remaining ties.
    priority: int = Field(default=100, ge=0)
    reporting: bool = False
    # Per-Exchange deadline for discovery; the fan-out default otherwise.
    timeout_ms: int | None = Field(default=None, gt=0, le=60000)


class FanoutSetting(_Strict):
    discover_timeout_ms: int = Field(default=1500, gt=0, le=60000)
    overall_timeout_ms: int = Field(default=3000, gt=0, le=120000)
    execute_timeout_ms: int = Field(default=5000, gt=0, le=120000)


class QuotesSetting(_Strict):
    # An Exchange's quote (from Resolve, or a fresh discovery) prices an offer an agent chose
    # until the offer expires, and never longer than this after the broker obtained it.
    max_age_seconds: float = Field(default=60.0, gt=0, le=3600)
    cache_size: int = Field(default=100_000, gt=0, le=10_000_000)
    # A Transact for URIs an Exchange has quoted (all of them, every quote still valid) buys from
    # those quotes without asking it again; false: every Transact discovers.
    reuse: bool = True


class SessionSetting(_Strict):
    # Used for a session the agent did not declare; none means declaring is mandatory.
    default_limit: MoneySetting | None = None
    idle_seconds: int = Field(default=86400, gt=0)


class RequesterSetting(_Strict):
    id: str = Field(default="ramp-broker", min_length=1, max_length=128)
    domain: str = ""
    name: str = "ramp-broker"


def _scope(value: str) -> str:
    check_scope(value, "scope")
    return value


Scope = Annotated[str, AfterValidator(_scope)]


def _period(value: str) -> str:
    return Period.parse(value, "period").spec


PeriodSpec = Annotated[str, AfterValidator(_period)]


class PeriodLimitSetting(_Strict):
    period: PeriodSpec
    amount: Amount
    currency: CurrencyCode

    def money(self) -> Money:
        return Money.parse(self.amount, self.currency, "amount")


class ScopeSetting(_Strict):
    limits: list[PeriodLimitSetting] = Field(default_factory=list)
    # closed: deny while the store is unreachable. open: spend up to
    # open_allowance per broker, journaled locally and replayed on recovery.
    failure: Literal["closed", "open"] = "closed"
    open_allowance: MoneySetting | None = None
    # strict: every purchase reserves in the store. lease: spent from this broker's pre-debited
    # leases, refreshed in batches (budget.leases); synchronous near exhaustion.
    mode: Literal["strict", "lease"] = "strict"
    # How strict a lease's end game is: prepaid goes synchronous from 5% of the limit left,
    # postpaid leases twice the headroom (the bound stays zero overspend: leases are pre-debited).
    tier: Literal["standard", "prepaid", "postpaid"] = "standard"
    # even: while spend runs ahead of an even curve to the period's end, admit purchases with the
    # probability that brings it back onto the curve (budget.pacing).
    pacing: Literal["off", "even"] = "off"

    @model_validator(mode="after")
    def _check(self) -> ScopeSetting:
        periods = [lim.period for lim in self.limits]
        dupes = sorted({p for p in periods if periods.count(p) > 1})
        if dupes:
            raise ValueError(f"one limit per period; repeated: {', '.join(dupes)}")
        if self.failure == "open" and self.open_allowance is None:
            raise ValueError("failure: open needs open_allowance (what one broker may spend while "
                             "the store is unreachable)")
        return self


class AccountSetting(_Strict):
    scopes: dict[Scope, ScopeSetting] = Field(default_factory=dict)


RedisUrl = Annotated[str, Field(pattern=r"^rediss?://")]


class StoreSetting(_Strict):
    kind: Literal["embedded", "redis", "redis-cluster"] = "embedded"
    # embedded: the SQLite file; default under the user's state directory.
    path: str | None = None
    # redis: shared by every broker of a deployment.
    url: RedisUrl = "redis://127.0.0.1:6379/0"
    # redis-cluster: some nodes of the Redis Cluster (redis://host:port); the rest are discovered.
    urls: list[RedisUrl] = Field(default_factory=list, max_length=64)
    # Prefix of every Redis key, so deployments can share one server.
    key_prefix: str = Field(default="ramp", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    # A store call slower than this fails, and the scope's failure policy applies.
    timeout_ms: int = Field(default=250, gt=0, le=30000)
    # redis, redis-cluster: a write counts only once this many replicas have it (WAIT, within half of
    # timeout_ms; fewer fails like an unreachable store). 0: Redis's asynchronous replication, where a
    # failover may lose the last writes (README: Redis Cluster, durability).
    wait_replicas: int = Field(default=0, ge=0, le=8)

    @model_validator(mode="after")
    def _check(self) -> StoreSetting:
        if self.kind == "redis-cluster" and not self.urls:
            raise ValueError("kind redis-cluster needs urls: one or more nodes of the cluster "
                             "(redis://host:port)")
        if self.kind != "redis-cluster" and self.urls:
            raise ValueError(f"urls is for kind redis-cluster (kind {self.kind}"
                             + (" takes url)" if self.kind == "redis" else ")"))
        if self.kind == "embedded" and self.wait_replicas:
            raise ValueError("wait_replicas is for kind redis or redis-cluster (the embedded store has no "
                             "replicas)")
        return self


class LeaseSetting(_Strict):
    # A broker reports its spend and renews its leases this often (sooner when half used).
    refresh_seconds: float = Field(default=1.0, gt=0, le=300)
    # A broker that has not refreshed for this long may not spend its leases any more (it stops
    # at half of it); the store keeps them counted until the broker reports or an operator
    # releases them.
    ttl_seconds: float = Field(default=30.0, gt=0, le=3600)
    # The smoothing of spend rates behind lease sizes and phases (a short burst does not count).
    rate_half_life_seconds: float = Field(default=60.0, gt=0, le=86400)
    # This broker's lease journal; default under the user's state directory, after `listen`'s port.
    journal_path: str | None = None


class EcbSetting(_Strict):
    # A file path or an http(s) URL of an ECB eurofxref XML document.
    source: str = Field(min_length=1)
    max_age_hours: int = Field(default=96, gt=0, le=24 * 30)
    cache_seconds: int = Field(default=3600, gt=0)
    refresh_seconds: int = Field(default=3600, gt=0)


class PeriodBudgetsSetting(_Strict):
    store: StoreSetting = StoreSetting()
    # Calendar periods (hour, day, week, month) start at midnight in this zone.
    time_zone: str = "UTC"
    # A reservation not settled by then is refunded by any broker's sweeper.
    reservation_ttl_seconds: int = Field(default=120, gt=0, le=86400)
    sweep_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Counters are kept this long after their period ends (reports, reconcile).
    grace_seconds: int = Field(default=7 * 86400, ge=0)
    # Fail-open spends are appended here; default under the user's state directory.
    journal_path: str | None = None
    # What this broker has seen of the store (identity, limits version, spend high-water marks)
    # and its instance id; default under the user's state directory, named after `listen`'s port.
    memory_path: str | None = None
    leases: LeaseSetting = LeaseSetting()
    accounts: dict[str, AccountSetting] = Field(default_factory=dict)

    @field_validator("time_zone")
    @classmethod
    def _tz(cls, name: str) -> str:
        time_zone(name, "time_zone")
        return name

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, accounts: dict[str, AccountSetting]) -> dict[str, AccountSetting]:
        owner: dict[str, str] = {}
        for name, account in accounts.items():
            check_account(name, "account")
            for scope in account.scopes:
                if scope in owner:
                    raise ValueError(f"scope {scope} is in accounts {owner[scope]} and {name}; "
                                     "a scope belongs to one account")
                owner[scope] = name
        return accounts


class ChargeSetting(_Strict):
    """Where a caller's purchases are charged."""

    account: str
    # Charged when the request names no scope: billing:<billing_ref>.
    billing_ref: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
    # Charged on every purchase, whatever the request says.
    charged_to: list[Scope] = Field(default_factory=list)
    # Scopes the agent may name in constraints.budget_scope.
    may_name: list[Scope] = Field(default_factory=list)

    @field_validator("account")
    @classmethod
    def _account(cls, name: str) -> str:
        return check_account(name, "account")


class AgentSetting(ChargeSetting):
    """One agent credential and what it is charged to."""

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+$")
    # The credential: the SHA-256 (hex) of the API key, or the name of an
    # environment variable holding the key. Never the key itself in the file.
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("id")
    @classmethod
    def _not_anonymous(cls, agent_id: str) -> str:
        if agent_id == ANONYMOUS_ID:
            raise ValueError(f"{ANONYMOUS_ID!r} is reserved for callers without a key (their "
                             "sessions and idempotency keys are kept under it); choose another id")
        return agent_id

    @model_validator(mode="after")
    def _check(self) -> AgentSetting:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_sha256 and key_env")
        return self


class AdminSetting(_Strict):
    # Environment variable holding the admin token; the admin API is off without it.
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class MetricsSetting(_Strict):
    # Prometheus scrapes http://<listen>/metrics; its own address, apart from the RPCs.
    enabled: bool = True
    listen: str = "127.0.0.1:9091"
    # Scopes whose remaining budget is exported as a gauge (labelled by scope). Scopes
    # are never labels otherwise, so the number of series stays bounded.
    export_scopes: list[Scope] = Field(default_factory=list, max_length=1000)

    _check_listen = field_validator("listen")(check_address)


class WebhookSetting(_Strict):
    url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    # Environment variable holding the HMAC-SHA256 key; the body's signature is sent as
    # "X-Ramp-Signature: sha256=<hex>". Unsigned when unset.
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_ms: int = Field(default=5000, gt=0, le=60000)


def _threshold(value: str) -> str:
    t = parse_amount(value, "alerts.thresholds")
    if not 0 < t <= 1:
        raise ValueError(f"alerts.thresholds: {value} is not a fraction in (0, 1]")
    return value


class AlertsSetting(_Strict):
    # Fractions of a period limit; each fires once per (scope, period, window).
    thresholds: list[Annotated[str, AfterValidator(_threshold)]] = Field(
        default_factory=lambda: ["0.5", "0.8", "0.95", "1"], max_length=20)
    webhooks: list[WebhookSetting] = Field(default_factory=list)
    # Alerts waiting for delivery, per webhook; more are dropped (and counted).
    queue_size: int = Field(default=1000, gt=0, le=1_000_000)
    # Deliveries are retried with exponential backoff, up to this many attempts.
    max_attempts: int = Field(default=6, gt=0, le=50)
    backoff_initial_seconds: float = Field(default=0.5, gt=0, le=60)
    backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600)


class ForecastSetting(_Strict):
    # Spend rate: an exponentially weighted moving average with this half-life. Pacing's band is
    # this many seconds of a window's even rate (at most 2% of the limit; budget.pacing).
    half_life_seconds: float = Field(default=900.0, gt=0, le=30 * 86400)


class LoggingSetting(_Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ReadinessSetting(_Strict):
    """The background probes behind grpc.health.v1.Health and GET /readyz."""

    # How often the budget store and every Exchange are probed.
    interval_seconds: float = Field(default=2.0, gt=0, le=300)
    # How long one probe may take before it counts as a failure.
    timeout_ms: int = Field(default=1000, gt=0, le=30000)


def _extra_currency(code: str) -> str:
    if not (len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()):
        raise ValueError(f"{code[:16]!r} is not three uppercase letters (an ISO 4217 code such as XAU)")
    if not is_iso_currency(code):
        raise ValueError(f"{code!r} is not an ISO 4217 currency code")
    return code


def min_reservation_ttl_seconds(execute_timeout_ms: int) -> int:
    """The shortest reservation TTL that outlives a purchase's Exchange calls twice over.

    A purchase calls ExecuteTransaction at most twice (one retry, same key), each for up to
    execute_timeout_ms plus the adapter's guard; a hold swept sooner is refunded while the
    Exchange may still charge. Twice that, in whole seconds, leaves room for the store's own
    calls and clock skew between brokers.
    """
    worst_ms = 2 * (execute_timeout_ms + EXECUTE_GUARD_MS)
    return -(-2 * worst_ms // 1000)


class BrokerConfig(_Strict):
    listen: str = "127.0.0.1:9090"
    # asyncio: the standard library's loop. uvloop (libuv) answers the same requests for about 10%
    # less CPU, but under load an HTTP/2 connection was seen to stall after an oversized gRPC
    # message (tests/test_hostile_inputs.py, 3 runs in 5), so it is opt-in until that is understood.
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    # ISO 4217 codes that are not spendable currencies (XAU, XDR, XTS...) but are priced and
    # converted here anyway; process-wide, for settings and requests alike.
    extra_currencies: list[Annotated[str, AfterValidator(_extra_currency)]] = Field(
        default_factory=list, max_length=100)
    # Currency offers are compared in when no session budget applies.
    default_currency: str = "USD"
    requester: RequesterSetting = RequesterSetting()
    exchanges: list[ExchangeSetting] = Field(default_factory=list)
    fanout: FanoutSetting = FanoutSetting()
    quotes: QuotesSetting = QuotesSetting()
    session: SessionSetting = SessionSetting()
    # Fixed conversion rates: {EUR: {USD: "1.08"}}; inverses are derived.
    rates: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Seconds to let in-flight purchases finish on shutdown.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    # Broker-side answers kept for idempotent retries.
    idempotency_cache_size: int = Field(default=100_000, gt=0)
    # Daily ECB reference rates (instead of, or beside, fixed rates: fixed ones win).
    ecb_rates: EcbSetting | None = None
    period_budgets: PeriodBudgetsSetting = PeriodBudgetsSetting()
    # Agent credentials. A request without one is refused when agents are listed,
    # unless `anonymous` says where such requests are charged (e.g. a local sidecar).
    agents: list[AgentSetting] = Field(default_factory=list)
    anonymous: ChargeSetting | None = None
    admin: AdminSetting = AdminSetting()
    metrics: MetricsSetting = MetricsSetting()
    alerts: AlertsSetting = AlertsSetting()
    forecast: ForecastSetting = ForecastSetting()
    logging: LoggingSetting = LoggingSetting()
    readiness: ReadinessSetting = ReadinessSetting()

    _check_listen = field_validator("listen")(check_address)

    @model_validator(mode="wrap")
    @classmethod
    def _allow_extra_currencies(
        cls, data: Any, handler: ModelWrapValidatorHandler[BrokerConfig]
    ) -> BrokerConfig:
        """Allow extra_currencies before the settings written in them are validated."""
        codes = data.get("extra_currencies", []) if isinstance(data, dict) else None
        previous = None
        if isinstance(codes, list) and all(isinstance(c, str) for c in codes):
            # A bad code is left for the field's own validation, which names its index.
            with contextlib.suppress(ValueError):
                previous = set_extra_currencies(_extra_currency(c) for c in codes)
        try:
            return handler(data)
        except ValidationError:
            if previous is not None:
                set_extra_currencies(previous)  # a refused config allows nothing
            raise

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, code: str) -> str:
        return parse_currency(code, "default_currency")

    @field_validator("agents")
    @classmethod
    def _distinct_keys(cls, agents: list[AgentSetting]) -> list[AgentSetting]:
        # One key, two identities: whichever matched would own the other's sessions and keys.
        owner: dict[str, str] = {}
        for a in agents:
            if a.key_sha256 is None:
                continue  # key_env: compared once read, by the Authenticator at start
            if a.key_sha256 in owner:
                raise ValueError(f"agents {owner[a.key_sha256]} and {a.id} have the same key_sha256; "
                                 "each agent needs its own key")
            owner[a.key_sha256] = a.id
        return agents

    @field_validator("exchanges")
    @classmethod
    def _unique(cls, exchanges: list[ExchangeSetting]) -> list[ExchangeSetting]:
        names = [e.name for e in exchanges]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"exchange names must be unique; repeated: {', '.join(dupes)}")
        return exchanges

    @field_validator("rates")
    @classmethod
    def _rates(cls, rates: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for source, targets in rates.items():
            parse_currency(source, f"rates.{source}")
            for target, rate in targets.items():
                parse_currency(target, f"rates.{source}.{target}")
                if parse_amount(rate, f"rates.{source}.{target}") == 0:
                    raise ValueError(f"rates.{source}.{target} must be positive")
        return rates

    @model_validator(mode="after")
    def _agents(self) -> BrokerConfig:
        ids = [a.id for a in self.agents]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"agent ids must be unique; repeated: {', '.join(dupes)}")
        owner = {s: name for name, acct in self.period_budgets.accounts.items() for s in acct.scopes}
        callers: list[tuple[str, ChargeSetting]] = [(f"agents[{i}]", a) for i, a in enumerate(self.agents)]
        callers += [("anonymous", self.anonymous)] if self.anonymous else []
        for name, agent in callers:
            for scope in [*agent.charged_to, *agent.may_name]:
                if owner.get(scope, agent.account) != agent.account:
                    raise ValueError(f"{name}: scope {scope} belongs to account "
                                     f"{owner[scope]}, not {agent.account}")
        return self

    @model_validator(mode="after")
    def _reservation_ttl(self) -> BrokerConfig:
        # Only when reservations can be made (some scope is configured): a broker without
        # period budgets never holds anything, and may wait on Exchanges as long as it likes.
        if not self.uses_period_budgets():
            return self
        ttl = self.period_budgets.reservation_ttl_seconds
        timeout_ms = self.fanout.execute_timeout_ms
        least = min_reservation_ttl_seconds(timeout_ms)
        if ttl < least:
            raise ValueError(
                f"period_budgets.reservation_ttl_seconds {ttl} is too short for "
                f"fanout.execute_timeout_ms {timeout_ms}: the minimum is {least} (twice a "
                f"purchase's longest wait on an Exchange, two calls of {timeout_ms} ms + "
                f"{EXECUTE_GUARD_MS} ms), or a hold can be refunded while the Exchange still "
                "charges; raise the TTL or lower the timeout")
        return self

    def uses_period_budgets(self) -> bool:
        """True when some scope is configured, so purchases reserve in the store."""
        callers = [*self.agents, *([self.anonymous] if self.anonymous else [])]
        return any(acct.scopes for acct in self.period_budgets.accounts.values()) or any(
            a.charged_to or a.may_name or a.billing_ref for a in callers)

    def decimal_rates(self) -> dict[str, dict[str, Decimal]]:
        return {s: {t: Decimal(r) for t, r in ts.items()} for s, ts in self.rates.items()}


def load_broker_config(path: str | Path | None) -> BrokerConfig:
    return load(BrokerConfig, path, ENV_PREFIX)
