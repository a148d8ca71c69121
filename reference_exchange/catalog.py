"""The reference Exchange's catalog file (catalog.yaml), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.configfile import check_address, load
from currency.money import parse_amount, parse_currency
from currency.settings import Amount, CurrencyCode

ENV_PREFIX = "RAMP_EXCHANGE_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CatalogOffer(_Strict):
    uri: str = Field(min_length=1, max_length=2048)
    offer_id: str = Field(min_length=1, max_length=128)
    title: str = ""
    model: Literal["free", "flat", "per_unit"] = "flat"
    # Flat price, or price per unit (decimal string).
    rate: Amount = "0"
    currency: CurrencyCode = "USD"
    unit: str | None = None
    # What the offer announces it will charge for (per_unit).
    estimated_quantity: int = Field(default=1, ge=1)
    # What it really charges for (per_unit); the estimate when absent.
    actual_quantity: int | None = Field(default=None, ge=0)
    delivery: Literal["inline", "url", "api"] = "url"
    # Seconds the offer stays valid after discovery; none means no expiry.
    ttl_seconds: int | None = Field(default=None, gt=0)



class Knobs(_Strict):
    """Test knobs: latency and failures on demand."""

    discover_latency_ms: int = Field(default=0, ge=0)
    execute_latency_ms: int = Field(default=0, ge=0)
    # Discovery answers UNAVAILABLE.
    fail_discover: bool = False
    # The next N purchases fail with UNAVAILABLE before charging anything.
    fail_execute: int = Field(default=0, ge=0)
    # The next N purchases charge, then fail with UNAVAILABLE (a lost answer).
    fail_after_charge: int = Field(default=0, ge=0)
    # Every purchase charges first, then waits this long before answering: the window in which
    # the buyer knows nothing of a charge that happened.
    answer_latency_ms: int = Field(default=0, ge=0)


class Catalog(_Strict):
    # The Exchange's domain, stamped on every offer.
    exchange: str = Field(default="ref.exchange.local", min_length=1)
    listen: str = "127.0.0.1:9191"
    # Balances per billing account (the requester id), per currency.
    accounts: dict[str, dict[str, str]] = Field(default_factory=dict)
    offers: list[CatalogOffer] = Field(default_factory=list)
    knobs: Knobs = Knobs()

    _check_listen = field_validator("listen")(check_address)

    @field_validator("accounts")
    @classmethod
    def _balances(cls, accounts: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for account, balances in accounts.items():
            for cur, amount in balances.items():
                parse_currency(cur, f"accounts.{account}")
                parse_amount(amount, f"accounts.{account}.{cur}")
        return accounts

    @field_validator("offers")
    @classmethod
    def _unique(cls, offers: list[CatalogOffer]) -> list[CatalogOffer]:
        ids = [o.offer_id for o in offers]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"offer_id must be unique; repeated: {', '.join(dupes)}")
        return offers


def load_catalog(path: str | Path | None) -> Catalog:
    return load(Catalog, path, ENV_PREFIX)
