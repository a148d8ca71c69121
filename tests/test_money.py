"""Exact money: strict parsing, currency-safe arithmetic, conversion that rounds against the spender."""

from __future__ import annotations

import operator
from collections.abc import Callable
from decimal import Context, Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from currency.convert import ConversionError, FixedRates, NoConverter, convert
from currency.money import (
    MAX_AMOUNT,
    QUANTUM,
    SCALE,
    CurrencyMismatch,
    Money,
    MoneyError,
    format_amount,
    parse_amount,
    parse_currency,
    quantize,
    total,
)

FAST = settings(max_examples=200, deadline=None)
# Enough precision to hold any product in these tests exactly.
EXACT = Context(prec=200)
NANO = Decimal("0.000000001")


def exact_mul(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.multiply(a, b)


# Any amount the wire can carry: 0 <= d < 1e9 with at most 9 decimal places.
amounts = st.integers(min_value=0, max_value=10**18 - 1).map(lambda n: Decimal(n).scaleb(-SCALE))
# Positive rates with up to 6 decimal places, below 1 000 000.
rates = st.integers(min_value=1, max_value=10**12 - 1).map(lambda n: Decimal(n).scaleb(-6))


# --------------------------------------------------------------------------- parse_amount

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Decimal(0)),
        ("0.0", Decimal(0)),
        ("0.5", Decimal("0.5")),
        ("12.50", Decimal("12.5")),
        ("1", Decimal(1)),
        ("10", Decimal(10)),
        ("0.000000001", NANO),
        ("123456789.123456789", Decimal("123456789.123456789")),
        ("999999999.999999999", Decimal("999999999.999999999")),
        ("999999999", Decimal(999999999)),
        ("100.000000000", Decimal(100)),
    ],
)
def test_parse_amount_accepts_plain_decimals(text: str, expected: Decimal) -> None:
    value = parse_amount(text, "f")
    assert isinstance(value, Decimal)
    assert value == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "NaN",
        "nan",
        "sNaN",
        "inf",
        "Infinity",
        "-Infinity",
        "1e3",
        "1E3",
        "1.5e-3",
        "-1",
        "+1",
        "-0",
        "01",
        "00",
        "00.5",
        " 1",
        "1 ",
        " 1 ",
        "1\n",
        "\t1",
        "\u0661",  # ARABIC-INDIC DIGIT ONE
        "1\u0661",
        "\u0966",  # DEVANAGARI DIGIT ZERO
        "\uff11",  # FULLWIDTH DIGIT ONE
        "1.",
        ".5",
        ".",
        "1.2.3",
        "1,5",
        "1_000",
        "0x10",
        "0.1234567890",  # 10 decimals
        "1.0000000000",
        "1000000000",  # == 1e9
        "1000000000.0",
        "9999999999",
        "12345678901234567890",
        "1" * 40,
        "abc",
    ],
)
def test_parse_amount_rejects(text: str) -> None:
    with pytest.raises(MoneyError) as info:
        parse_amount(text, "pricing.rate")
    assert info.value.field == "pricing.rate"
    assert str(info.value).startswith("pricing.rate: ")


def test_parse_amount_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(MoneyError, match="more than 9 decimal places"):
        parse_amount("1.0000000001", "x")
    with pytest.raises(MoneyError, match="too large"):
        parse_amount("1000000000", "x")
    with pytest.raises(MoneyError, match="is required"):
        parse_amount("", "x")
    with pytest.raises(MoneyError, match="not a plain non-negative decimal"):
        parse_amount("-1", "x")


def _oracle_accepts(text: str) -> bool:
    """An independent statement of the wire grammar (no regex)."""
    if not text or any(ch not in "0123456789." for ch in text) or text.count(".") > 1:
        return False
    whole, dot, frac = text.partition(".")
    if not whole or len(whole) > 9 or (len(whole) > 1 and whole[0] == "0"):
        return False
    return not dot or 1 <= len(frac) <= SCALE


@FAST
@given(st.text(alphabet="0123456789.-+eE nI\u0661\uff11", max_size=24))
@example("0")
@example("999999999.999999999")
@example("1000000000")
@example("0.0000000001")
def test_parse_amount_accepts_exactly_the_wire_grammar(text: str) -> None:
    if not _oracle_accepts(text):
        with pytest.raises(MoneyError) as info:
            parse_amount(text, "amt")
        assert info.value.field == "amt"
        return
    value = parse_amount(text, "amt")
    assert value == Decimal(text)
    assert 0 <= value < MAX_AMOUNT


@FAST
@given(st.from_regex(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?", fullmatch=True))
def test_parse_amount_accepts_every_well_formed_amount(text: str) -> None:
    value = parse_amount(text, "amt")
    assert value == Decimal(text)
    assert value.is_finite()
    assert 0 <= value < MAX_AMOUNT


@FAST
@given(amounts)
def test_format_then_parse_round_trips(d: Decimal) -> None:
    text = format_amount(d)
    assert "e" not in text.lower()
    assert parse_amount(text, "amt") == d


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal(0), "0.00"),
        (Decimal("1"), "1.00"),
        (Decimal("100"), "100.00"),
        (Decimal("1.5"), "1.50"),
        (Decimal("1.234"), "1.234"),
        (Decimal("0.000000001"), "0.000000001"),
        (Decimal("1E+2"), "100.00"),
        (Decimal("12.500000000"), "12.50"),
    ],
)
def test_format_amount_is_canonical(value: Decimal, text: str) -> None:
    assert format_amount(value) == text
    assert Money(value, "USD").text() == text
    assert str(Money(value, "USD")) == f"{text} USD"


# --------------------------------------------------------------------------- units


@FAST
@given(st.integers(min_value=0, max_value=10**18 - 1))
@example(0)
@example(1)
@example(10**18 - 1)
def test_units_round_trip(n: int) -> None:
    m = Money.from_units(n, "USD")
    assert isinstance(m.amount, Decimal)
    assert m.units() == n
    assert Money.from_units(m.units(), "USD") == m


@FAST
@given(amounts)
def test_units_of_parsed_amounts_are_exact(d: Decimal) -> None:
    m = Money(parse_amount(format_amount(d), "amt"), "EUR")
    assert Money.from_units(m.units(), "EUR").amount == d


def test_units_refuses_surplus_precision() -> None:
    with pytest.raises(MoneyError):
        Money(Decimal("0.0000000001"), "USD").units()


# --------------------------------------------------------------------------- currencies


@pytest.mark.parametrize("code", ["USD", "EUR", "JPY", "GBP", "CHF"])
def test_parse_currency_accepts_iso_codes(code: str) -> None:
    assert parse_currency(code, "c") == code


@pytest.mark.parametrize("code", ["usd", "Usd", "XYZ", "", "US", "USDD", " USD", "\uff35\uff33\uff24", "U$D"])
def test_parse_currency_rejects(code: str) -> None:
    with pytest.raises(MoneyError) as info:
        parse_currency(code, "limit.currency")
    assert info.value.field == "limit.currency"


def test_money_parse_names_the_subfield() -> None:
    assert Money.parse("1.5", "USD", "limit") == Money(Decimal("1.5"), "USD")
    with pytest.raises(MoneyError) as info:
        Money.parse("1e3", "USD", "limit")
    assert info.value.field == "limit.amount"
    with pytest.raises(MoneyError) as info:
        Money.parse("1", "usd", "limit")
    assert info.value.field == "limit.currency"


# --------------------------------------------------------------------------- arithmetic

USD1 = Money(Decimal("1.10"), "USD")
EUR1 = Money(Decimal("1.10"), "EUR")

OPS: list[Callable[[Money, Money], object]] = [
    operator.add, operator.sub, operator.lt, operator.le, operator.gt, operator.ge,
]


@pytest.mark.parametrize("op", OPS)
def test_mixing_currencies_is_refused(op: Callable[[Money, Money], object]) -> None:
    with pytest.raises(CurrencyMismatch) as info:
        op(USD1, EUR1)
    assert "USD" in str(info.value)
    assert "EUR" in str(info.value)
    with pytest.raises(CurrencyMismatch):
        op(EUR1, USD1)


def test_currency_mismatch_is_a_money_error() -> None:
    assert issubclass(CurrencyMismatch, MoneyError)
    with pytest.raises(CurrencyMismatch):
        total([USD1, EUR1], "USD")


def test_arithmetic_is_exact_decimal() -> None:
    a = Money(Decimal("0.1"), "USD")
    b = Money(Decimal("0.2"), "USD")
    s = a + b
    assert isinstance(s.amount, Decimal)
    assert s == Money(Decimal("0.3"), "USD")
    d = s - a
    assert isinstance(d.amount, Decimal)
    assert d.amount == Decimal("0.2")
    assert a < b
    assert a <= b
    assert b > a
    assert b >= a
    assert a <= a
    assert a >= a
    t = total([a, b, s], "USD")
    assert isinstance(t.amount, Decimal)
    assert t.amount == Decimal("0.6")
    assert total([], "JPY") == Money.zero("JPY")


def test_times_rounds_in_the_asked_direction() -> None:
    third = Money(Decimal(1), "USD").times(Decimal(1) / Decimal(3), round_up=True)
    assert third.amount == Decimal("0.333333334")
    third = Money(Decimal(1), "USD").times(Decimal(1) / Decimal(3), round_up=False)
    assert third.amount == Decimal("0.333333333")
    tripled = Money(Decimal("1.25"), "USD").times(3, round_up=True)
    assert isinstance(tripled.amount, Decimal)
    assert tripled.amount == Decimal("3.75")


def test_clamp_zero_and_is_zero() -> None:
    neg = Money(Decimal(1), "USD") - Money(Decimal(2), "USD")
    assert neg.amount == Decimal(-1)
    assert neg.clamp_zero() == Money.zero("USD")
    assert neg.clamp_zero().is_zero()
    assert USD1.clamp_zero() is USD1
    assert not USD1.is_zero()


@FAST
@given(amounts, amounts)
def test_add_sub_are_exact_and_decimal(a: Decimal, b: Decimal) -> None:
    ma, mb = Money(a, "USD"), Money(b, "USD")
    s = ma + mb
    assert isinstance(s.amount, Decimal)
    assert s.amount == a + b
    assert (s - mb).amount == a
    assert (ma <= mb) == (a <= b)
    assert (ma < mb) == (a < b)
    assert (ma >= mb) == (a >= b)
    assert (ma > mb) == (a > b)


def test_quantize_directions() -> None:
    x = Decimal("1.0000000001")
    assert quantize(x, round_up=True) == Decimal("1.000000001")
    assert quantize(x, round_up=False) == Decimal(1)
    assert quantize(Decimal(2), round_up=True) == Decimal(2)
    assert QUANTUM == NANO


# --------------------------------------------------------------------------- convert


def test_same_currency_conversion_is_identity() -> None:
    m = Money(Decimal("12.345"), "USD")
    assert convert(m, "USD", NoConverter()) is m
    assert convert(m, "USD", FixedRates({"EUR": {"USD": Decimal("1.08")}})) is m
    assert convert(m, "USD", FixedRates({}), round_up=False) is m


def test_no_converter_names_both_currencies() -> None:
    with pytest.raises(ConversionError) as info:
        convert(Money(Decimal(1), "EUR"), "USD", NoConverter())
    assert "EUR" in str(info.value)
    assert "USD" in str(info.value)
    assert isinstance(info.value, MoneyError)


def test_fixed_rates_convert_and_round_up() -> None:
    rates = FixedRates({"EUR": {"USD": Decimal("1.08")}})
    out = convert(Money(Decimal("10"), "EUR"), "USD", rates)
    assert out == Money(Decimal("10.80"), "USD")
    assert isinstance(out.amount, Decimal)
    # 1/1.08 is not exact: up is against the spender, down for headroom.
    up = convert(Money(Decimal(1), "USD"), "EUR", rates)
    down = convert(Money(Decimal(1), "USD"), "EUR", rates, round_up=False)
    assert up.currency == down.currency == "EUR"
    assert up.amount == Decimal("0.925925926")
    assert down.amount == Decimal("0.925925925")


def test_fixed_rates_derive_inverse() -> None:
    rates = FixedRates({"EUR": {"USD": Decimal("1.25")}})
    assert rates.rate("EUR", "USD") == Decimal("1.25")
    assert rates.rate("USD", "EUR") == Decimal("0.8")
    assert rates.rate("USD", "USD") == Decimal(1)


def test_fixed_rates_explicit_inverse_wins() -> None:
    rates = FixedRates({"EUR": {"USD": Decimal("1.25")}, "USD": {"EUR": Decimal("0.9")}})
    assert rates.rate("USD", "EUR") == Decimal("0.9")
    assert rates.rate("EUR", "USD") == Decimal("1.25")
    # Order of declaration does not matter.
    rates = FixedRates({"USD": {"EUR": Decimal("0.9")}, "EUR": {"USD": Decimal("1.25")}})
    assert rates.rate("USD", "EUR") == Decimal("0.9")
    assert rates.rate("EUR", "USD") == Decimal("1.25")


def test_fixed_rates_unknown_pair() -> None:
    rates = FixedRates({"EUR": {"USD": Decimal("1.25")}})
    with pytest.raises(ConversionError) as info:
        rates.rate("EUR", "JPY")
    assert "EUR" in str(info.value)
    assert "JPY" in str(info.value)
    with pytest.raises(ConversionError):
        convert(Money(Decimal(1), "GBP"), "USD", rates)


@pytest.mark.parametrize("bad", [Decimal(0), Decimal("-1.08"), Decimal("-0.000001")])
def test_fixed_rates_reject_non_positive(bad: Decimal) -> None:
    with pytest.raises(ConversionError) as info:
        FixedRates({"EUR": {"USD": bad}})
    assert info.value.field == "rates.EUR.USD"


@FAST
@given(amounts, rates)
@example(Decimal("999999999.999999999"), Decimal("9999.999999"))
@example(Decimal("0.000000001"), Decimal("0.000001"))
def test_convert_rounds_against_the_spender(amount: Decimal, rate: Decimal) -> None:
    rates = FixedRates({"EUR": {"USD": rate}})
    m = Money(amount, "EUR")
    exact = exact_mul(amount, rate)
    up = convert(m, "USD", rates)
    assert up == convert(m, "USD", rates, round_up=True)
    down = convert(m, "USD", rates, round_up=False)
    for out in (up, down):
        assert out.currency == "USD"
        assert isinstance(out.amount, Decimal)
        assert out.amount == out.amount.quantize(NANO)
    # The bounds in the exact context too: the default 28 digits would round them.
    assert exact <= up.amount < EXACT.add(exact, NANO)
    assert EXACT.subtract(exact, NANO) < down.amount <= exact
    assert down.amount <= up.amount


@FAST
@given(amounts, rates, st.one_of(amounts, st.just(None)))
def test_conversion_never_lets_a_reservation_overspend(
    price: Decimal, rate: Decimal, limit_or_none: Decimal | None
) -> None:
    rates = FixedRates({"EUR": {"USD": rate}})
    converted = convert(Money(price, "EUR"), "USD", rates)
    # Either a random limit, or one sitting right at the converted price (the boundary).
    limit = Money(converted.amount if limit_or_none is None else limit_or_none, "USD")
    assume(limit.amount < MAX_AMOUNT)
    if converted <= limit:
        assert exact_mul(price, rate) <= limit.amount


# Products needing more than 28 significant digits, where a conversion done in the
# default decimal context would round half-even before the directed rounding.


def test_convert_large_product_still_rounds_up() -> None:
    amount, rate = Decimal("999999999.000000001"), Decimal("100000.000001")
    up = convert(Money(amount, "EUR"), "USD", FixedRates({"EUR": {"USD": rate}}))
    assert up.amount >= exact_mul(amount, rate)


def test_convert_large_product_still_rounds_down() -> None:
    amount, rate = Decimal("828639892.029728098"), Decimal("221401.331020")
    down = convert(Money(amount, "EUR"), "USD", FixedRates({"EUR": {"USD": rate}}), round_up=False)
    assert down.amount <= exact_mul(amount, rate)


def test_derived_inverse_conversion_never_overspends() -> None:
    rates = FixedRates({"USD": {"EUR": Decimal("1.1")}})
    price = Decimal("135802467.9")  # EUR
    converted = convert(Money(price, "EUR"), "USD", rates)
    limit = Money(Decimal("123456789"), "USD")
    assert converted <= limit  # the broker would let this through ...
    # ... and the exact (derived, fractional) rate agrees.
    assert Fraction(price) * rates.rate("EUR", "USD") <= Fraction(limit.amount)
