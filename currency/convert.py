"""Currency conversion for budget checks.

A conversion made to reserve or charge a budget rounds against the spender
(up), so converting can only make the broker stop earlier, never overspend.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Protocol

from currency.money import Money, MoneyError, quantize


class ConversionError(MoneyError):
    """No usable rate between two currencies."""


class Converter(Protocol):
    def rate(self, source: str, target: str) -> Decimal:
        """Units of `target` per unit of `source`; raises ConversionError when unknown."""
        ...


def convert(money: Money, target: str, converter: Converter, *, round_up: bool = True) -> Money:
    """`money` in `target`; rounds up by default (against the spender)."""
    if money.currency == target:
        return money
    rate = converter.rate(money.currency, target)
    return Money(quantize(money.amount * rate, round_up=round_up), target)


class NoConverter:
    """The default: different currencies are an error, never a silent sum."""

    def rate(self, source: str, target: str) -> Decimal:
        raise ConversionError(
            "currency",
            f"offer is priced in {source} but the budget is in {target}, and no exchange "
            "rates are configured",
        )


class FixedRates:
    """Rates from configuration, e.g. {"EUR": {"USD": "1.08"}}; inverses are derived."""

    def __init__(self, rates: Mapping[str, Mapping[str, Decimal]]) -> None:
        self._rates: dict[tuple[str, str], Decimal] = {}
        for source, targets in rates.items():
            for target, rate in targets.items():
                if rate <= 0:
                    raise ConversionError(f"rates.{source}.{target}", "must be positive")
                self._rates[(source, target)] = rate
        for (source, target), rate in list(self._rates.items()):
            # An explicit inverse wins over a derived one.
            self._rates.setdefault((target, source), Decimal(1) / rate)

    def rate(self, source: str, target: str) -> Decimal:
        if source == target:
            return Decimal(1)
        try:
            return self._rates[(source, target)]
        except KeyError:
            raise ConversionError(
                "currency", f"no exchange rate from {source} to {target} is configured"
            ) from None
