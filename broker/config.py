"""The broker's configuration (broker.yaml), validated at start."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.configfile import Amount, CurrencyCode, load
from currency.money import Money, parse_amount, parse_currency

ENV_PREFIX = "RAMP_BROKER_"
_ADDR = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_address(value: str) -> str:
    m = _ADDR.fullmatch(value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{value!r} is not host:port (IPv6 as [::1]:port)")
    return value


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


class SessionSetting(_Strict):
    # Used for a session the agent did not declare; none means declaring is mandatory.
    default_limit: MoneySetting | None = None
    idle_seconds: int = Field(default=86400, gt=0)


class RequesterSetting(_Strict):
    id: str = Field(default="ramp-broker", min_length=1, max_length=128)
    domain: str = ""
    name: str = "ramp-broker"


class BrokerConfig(_Strict):
    listen: str = "127.0.0.1:9090"
    # Currency offers are compared in when no session budget applies.
    default_currency: str = "USD"
    requester: RequesterSetting = RequesterSetting()
    exchanges: list[ExchangeSetting] = Field(default_factory=list)
    fanout: FanoutSetting = FanoutSetting()
    session: SessionSetting = SessionSetting()
    # Fixed conversion rates: {EUR: {USD: "1.08"}}; inverses are derived.
    rates: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Seconds to let in-flight purchases finish on shutdown.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    # Broker-side answers kept for idempotent retries.
    idempotency_cache_size: int = Field(default=100_000, gt=0)

    _check_listen = field_validator("listen")(check_address)

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, code: str) -> str:
        return parse_currency(code, "default_currency")

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

    def decimal_rates(self) -> dict[str, dict[str, Decimal]]:
        return {s: {t: Decimal(r) for t, r in ts.items()} for s, ts in self.rates.items()}


def load_broker_config(path: str | Path | None) -> BrokerConfig:
    return load(BrokerConfig, path, ENV_PREFIX)
