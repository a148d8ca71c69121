"""Money as an exact decimal amount in an ISO 4217 currency.

The wire carries decimal strings; Python holds `decimal.Decimal`; stores hold
integers in units of 10**-SCALE. Parsing is strict: anything a person could
misread (exponents, NaN, signs, surplus precision, absurd magnitudes) is refused
with the name of the field, never rounded or clamped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from functools import cache

import pycountry

# Fractional digits kept everywhere (nano-units, as google.type.Money).
SCALE = 9
QUANTUM = Decimal(1).scaleb(-SCALE)
# Largest amount accepted on the wire, exclusive: keeps sums of limits and
# reservations far inside a signed 64-bit integer of nano-units.
MAX_AMOUNT = Decimal(10) ** 9

_AMOUNT = re.compile(rf"(0|[1-9][0-9]{{0,8}})(\.[0-9]{{1,{SCALE}}})?")
# Plenty of digits for any amount below MAX_AMOUNT at SCALE, and for products of rates.
_CTX = Context(prec=60)


class MoneyError(ValueError):
    """An amount or currency that cannot be accepted; `field` names where it came from."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class CurrencyMismatch(MoneyError):
    """Two amounts in different currencies were combined without a converter."""


@cache
def is_currency(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isupper() and (
        pycountry.currencies.get(alpha_3=code) is not None
    )


def parse_currency(code: str, field: str) -> str:
    if not code:
        raise MoneyError(field, "is required (an ISO 4217 code such as USD)")
    if not is_currency(code):
        raise MoneyError(field, f"{code[:16]!r} is not an ISO 4217 currency code")
    return code


def parse_amount(text: str, field: str) -> Decimal:
    """A non-negative decimal string such as "12.50" -> Decimal."""
    if not text:
        raise MoneyError(field, "is required (a decimal string such as \"12.50\")")
    if len(text) > 32 or not _AMOUNT.fullmatch(text):
        shown = text if len(text) <= 32 else text[:32] + "..."
        if re.fullmatch(r"[0-9]+\.[0-9]+", text) and len(text.split(".")[1]) > SCALE:
            raise MoneyError(field, f"{shown!r} has more than {SCALE} decimal places")
        if re.fullmatch(r"[0-9]{10,}(\.[0-9]*)?", text):
            raise MoneyError(field, f"{shown!r} is too large (must be below {MAX_AMOUNT:,})")
        raise MoneyError(
            field,
            f"{shown!r} is not a plain non-negative decimal (digits, optional '.' and up to "
            f"{SCALE} decimals; no sign, exponent, spaces or leading zeros)",
        )
    return Decimal(text)


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency. Arithmetic refuses to mix currencies."""

    amount: Decimal
    currency: str

    @classmethod
    def parse(cls, amount: str, currency: str, field: str) -> Money:
        return cls(
            parse_amount(amount, f"{field}.amount"), parse_currency(currency, f"{field}.currency")
        )

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(Decimal(0), currency)

    @classmethod
    def from_units(cls, units: int, currency: str) -> Money:
        return cls(Decimal(units).scaleb(-SCALE, _CTX), currency)

    def units(self) -> int:
        """Integer nano-units; exact because amounts never carry more than SCALE decimals."""
        scaled = self.amount.scaleb(SCALE, _CTX)
        if scaled != scaled.to_integral_value():
            raise MoneyError("amount", f"{self.amount} has more than {SCALE} decimal places")
        return int(scaled)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(
                "currency", f"cannot combine {self.currency} and {other.currency} without a converter"
            )

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(_CTX.add(self.amount, other.amount), self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(_CTX.subtract(self.amount, other.amount), self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.amount < other.amount

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.amount <= other.amount

    def __gt__(self, other: Money) -> bool:
        self._same(other)
        return self.amount > other.amount

    def __ge__(self, other: Money) -> bool:
        self._same(other)
        return self.amount >= other.amount

    def times(self, factor: Decimal | int, *, round_up: bool) -> Money:
        """Multiply and quantize to SCALE; round_up rounds toward the larger amount."""
        product = _CTX.multiply(self.amount, Decimal(factor))
        return Money(quantize(product, round_up=round_up), self.currency)

    def clamp_zero(self) -> Money:
        return self if self.amount >= 0 else Money.zero(self.currency)

    def is_zero(self) -> bool:
        return self.amount == 0

    def text(self) -> str:
        """Canonical decimal string: no exponent, no trailing zeros past two decimals."""
        return format_amount(self.amount)

    def __str__(self) -> str:
        return f"{self.text()} {self.currency}"


def quantize(value: Decimal, *, round_up: bool) -> Decimal:
    return value.quantize(QUANTUM, rounding=ROUND_CEILING if round_up else ROUND_FLOOR, context=_CTX)


def format_amount(value: Decimal) -> str:
    q = value.quantize(QUANTUM, context=_CTX).normalize(_CTX)
    text = format(q, "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def total(items: Iterable[Money], currency: str) -> Money:
    """The sum of `items`, all in `currency` (CurrencyMismatch otherwise); zero when empty."""
    acc = Money.zero(currency)
    for m in items:
        acc = acc + m
    return acc
