"""Currency conversion for budget checks.

Rates are exact fractions (a configured "1.08" is 27/25; a derived inverse is
25/27, not a 28-digit approximation), and a conversion multiplies integer
nano-units by that fraction exactly, then rounds once, in the direction asked.
A conversion made to reserve or charge a budget rounds against the spender
(up), so converting can only make the broker stop earlier, never overspend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from currency.money import Money, MoneyError


class ConversionError(MoneyError):
    """No usable rate between two currencies."""


class Converter(Protocol):
    def rate(self, source: str, target: str) -> Fraction:
        """Units of `target` per unit of `source`, exactly; raises ConversionError when unknown."""
        ...


def convert(money: Money, target: str, converter: Converter, *, round_up: bool = True) -> Money:
    """`money` in `target`; rounds up by default (against the spender)."""
    if money.currency == target:
        return money
    exact = money.units() * converter.rate(money.currency, target)
    return Money.from_units(math.ceil(exact) if round_up else math.floor(exact), target)


class NoConverter:
    """The default: different currencies are an error, never a silent sum."""

    def rate(self, source: str, target: str) -> Fraction:
        raise ConversionError(
            "currency",
            f"offer is priced in {source} but the budget is in {target}, and no exchange "
            "rates are configured",
        )


class FixedRates:
    """Rates from configuration, e.g. {"EUR": {"USD": "1.08"}}; inverses are derived."""

    def __init__(self, rates: Mapping[str, Mapping[str, Decimal]]) -> None:
        self._rates: dict[tuple[str, str], Fraction] = {}
        for source, targets in rates.items():
            for target, rate in targets.items():
                if not rate.is_finite() or rate <= 0:
                    raise ConversionError(f"rates.{source}.{target}", "must be positive")
                self._rates[(source, target)] = Fraction(rate)
        for (source, target), forward in list(self._rates.items()):
            # An explicit inverse wins over a derived one.
            self._rates.setdefault((target, source), 1 / forward)

    def rate(self, source: str, target: str) -> Fraction:
        if source == target:
            return Fraction(1)
        try:
            return self._rates[(source, target)]
        except KeyError:
            raise ConversionError(
                "currency", f"no exchange rate from {source} to {target} is configured"
            ) from None


class Chain:
    """The first converter that knows a rate wins; fixed rates from config go before daily ones."""

    def __init__(self, *converters: Converter) -> None:
        self._converters = converters

    def rate(self, source: str, target: str) -> Fraction:
        if source == target:
            return Fraction(1)
        error: ConversionError | None = None
        for conv in self._converters:
            try:
                return conv.rate(source, target)
            except ConversionError as exc:
                error = exc  # the last one's reason (e.g. stale daily rates) says the most
        if error is None:
            return NoConverter().rate(source, target)
        raise error
