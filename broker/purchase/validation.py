"""Checking agent requests before anything else happens.

Each check raises InvalidField naming the request field, so the agent sees
exactly what to fix and nothing is reserved or charged.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal

from broker.refusals import InvalidField
from budget.periods import Period
from currency.money import Money, parse_amount
from ramp.v1 import ramp_pb2 as rpb

MAX_URIS = 256
MAX_URI_LENGTH = 2048
_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:[^\s\x00-\x1f\x7f]+")


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidField(field, "is required")
    if not _ID.fullmatch(value):
        raise InvalidField(
            field, "must be 1-128 characters of letters, digits and . _ : @ / + = -"
        )
    return value


def check_uris(uris: Sequence[str], field: str = "uris") -> list[str]:
    if not uris:
        raise InvalidField(field, "at least one URI is required")
    if len(uris) > MAX_URIS:
        raise InvalidField(field, f"{len(uris)} URIs given; at most {MAX_URIS} per request")
    for i, uri in enumerate(uris):
        if not uri:
            raise InvalidField(f"{field}[{i}]", "is empty")
        # In bytes (UTF-8), so a request's size is bounded by what it may contain.
        if len(uri) > MAX_URI_LENGTH or len(uri.encode("utf-8", "surrogatepass")) > MAX_URI_LENGTH:
            raise InvalidField(f"{field}[{i}]", f"is longer than {MAX_URI_LENGTH} bytes (UTF-8)")
        if not _URI.fullmatch(uri):
            raise InvalidField(f"{field}[{i}]", "is not an absolute URI (scheme:rest, no spaces)")
    return list(uris)


@dataclass(frozen=True, slots=True)
class Constraints:
    exchanges: frozenset[str]
    max_price: Money | None
    max_unit_cost: Decimal | None
    delivery: frozenset[int]
    reporting_capable: bool
    preferred: tuple[str, ...]
    budget_scope: str = ""
    period_budget: Money | None = None
    budget_period: Period | None = None


def check_constraints(
    c: rpb.RequestConstraints, known_exchanges: Collection[str], field: str = "constraints"
) -> Constraints:
    for i, name in enumerate(c.exchanges):
        if name not in known_exchanges:
            raise InvalidField(f"{field}.exchanges[{i}]", f"{name[:64]!r} is not a configured exchange")
    max_price = (
        Money.parse(c.max_price.amount, c.max_price.currency, f"{field}.max_price")
        if c.HasField("max_price") else None
    )
    max_unit = parse_amount(c.max_unit_cost, f"{field}.max_unit_cost") if c.max_unit_cost else None
    for i, method in enumerate(c.delivery_preference):
        if method not in rpb.DeliveryMethod.values() or method == rpb.DELIVERY_METHOD_UNSPECIFIED:
            raise InvalidField(f"{field}.delivery_preference[{i}]", "is not a delivery method")
    period_budget = (
        Money.parse(c.period_budget.amount, c.period_budget.currency, f"{field}.period_budget")
        if c.HasField("period_budget") else None
    )
    budget_period = None
    if c.HasField("budget_period"):
        if c.budget_period.nanos:
            raise InvalidField(f"{field}.budget_period", "must be whole seconds")
        budget_period = Period.of_seconds(c.budget_period.seconds, f"{field}.budget_period")
    return Constraints(
        exchanges=frozenset(c.exchanges), max_price=max_price, max_unit_cost=max_unit,
        delivery=frozenset(c.delivery_preference), reporting_capable=c.reporting_capable,
        preferred=tuple(c.preferred_exchanges), budget_scope=c.budget_scope,
        period_budget=period_budget, budget_period=budget_period,
    )


def check_deadline_ms(seconds: int, nanos: int, field: str, default_ms: int) -> int:
    if seconds == 0 and nanos == 0:
        return default_ms
    ms = seconds * 1000 + nanos // 1_000_000
    if ms <= 0 or ms > 120_000:
        raise InvalidField(field, "must be between 1 ms and 120 s")
    return ms
