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
from functools import cache, lru_cache

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


# ISO 4217 codes that name no money one can price and convert: testing (XTS), "no currency"
# (XXX), precious metals (XAU XAG XPT XPD), bond-market units (XBA-XBD) and other units of
# account (XDR XSU XUA XAD), and the fund codes (indexed units such as CLF, MXV, UYI;
# settlement variants such as USN, CHE, CHW). An X code is supranational or special, so only
# the real currencies among them are spendable: a code ISO adds later stays refused until it is
# listed here or allowed with set_extra_currencies.
_FUND_CODES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"})
_X_CURRENCIES = frozenset({"XAF", "XCD", "XCG", "XOF", "XPF"})
# Codes a deployment spends anyway (the broker's extra_currencies); see set_extra_currencies.
_extra: frozenset[str] = frozenset()


def _iso_name(code: str) -> str | None:
    """The ISO 4217 name of an uppercase 3-letter `code`, or None when ISO has no such code."""
    found = pycountry.currencies.get(alpha_3=code)
    return None if found is None else str(found.name)


@cache
def _spendable(code: str) -> bool:
    if _iso_name(code) is None:
        return False
    if code in _extra:
        return True
    return code not in _FUND_CODES and (code[0] != "X" or code in _X_CURRENCIES)


def _well_formed(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


def is_currency(code: str) -> bool:
    """True for an ISO 4217 code one can spend here (see _FUND_CODES and set_extra_currencies)."""
    # Checked before the cache, so the cache holds at most 26**3 codes whatever callers send.
    return _well_formed(code) and _spendable(code)


def is_iso_currency(code: str) -> bool:
    """True for any ISO 4217 code, spendable or not (XAU, XTS, XXX...)."""
    return _well_formed(code) and _iso_name(code) is not None


def set_extra_currencies(codes: Iterable[str]) -> frozenset[str]:
    """Process-wide: also accept these ISO 4217 codes (e.g. XAU), replacing the previous set.

    For the whole process because amounts are parsed everywhere (config, wire, stores) and one
    process serves one configuration. Returns the previous set, so a caller can restore it.
    """
    global _extra
    new = frozenset(codes)
    for code in sorted(new):
        if not is_iso_currency(code):
            raise MoneyError("extra_currencies", f"{code[:16]!r} is not an ISO 4217 currency code")
    previous, _extra = _extra, new
    if new != previous:
        _spendable.cache_clear()
    return previous


def parse_currency(code: str, field: str) -> str:
    if not code:
        raise MoneyError(field, "is required (an ISO 4217 code such as USD)")
    if not is_currency(code):
        if is_iso_currency(code):
            raise MoneyError(field, f"{code!r} ({_iso_name(code)}) is not a spendable currency")
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


@lru_cache(maxsize=8192)  # the same limits, prices and totals are written into every answer
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
