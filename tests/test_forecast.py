"""Spend rate (EWMA) and projected exhaustion, on a synthetic clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from budget.forecast import SpendRates
from budget.layers import Layer, Snapshot
from common.clock import ManualClock
from currency.money import Money
from tests.harness import Exchange, running_broker
from tests.test_period import ALICE, A, C, buy, period_config

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)


def usd(amount: str) -> Money:
    return Money.parse(amount, "USD", "amount")


NOV_1 = T0.replace(day=1)


def reading(spent: str, at: datetime, *, limit: str = "10.00", start: datetime = NOV_1,
            end: datetime = END) -> Snapshot:
    return Snapshot(layer=Layer.PERIOD, scope="team:eng", limit=usd(limit), spent=usd(spent),
                    reserved=usd("0"), transaction_count=0, as_of=at, period_start=start,
                    period_end=end, period="month", account="acme")


def test_the_first_reading_has_no_rate() -> None:
    snap = SpendRates(60).observe(reading("1.00", T0))
    assert (snap.spend_rate_per_hour, snap.projected_exhaustion) == (None, None)


def test_rate_and_projection_from_two_readings() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    snap = rates.observe(reading("1.00", T0 + timedelta(seconds=60)))
    # 1.00 a minute is 60.00 an hour; from zero, one half-life reaches half of it. 9.00 left
    # lasts 18 minutes at 30.00 an hour.
    assert snap.spend_rate_per_hour == usd("30")
    assert snap.projected_exhaustion == T0 + timedelta(minutes=19)


def test_a_quiet_interval_halves_the_rate_after_one_half_life() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    rates.observe(reading("1.00", T0 + timedelta(seconds=60)))
    snap = rates.observe(reading("1.00", T0 + timedelta(seconds=120)))
    assert snap.spend_rate_per_hour == usd("15")
    assert snap.projected_exhaustion == T0 + timedelta(minutes=2 + 36)


def test_irregular_readings_weigh_by_the_time_they_cover() -> None:
    # Many small steps make the same rate as one step covering the same time.
    one, many = SpendRates(600), SpendRates(600)
    for r in (one, many):
        r.observe(reading("0", T0))
        r.observe(reading("6.00", T0 + timedelta(seconds=600)))  # 36.00/h for a half-life: 18.00/h
    last_one = one.observe(reading("6.00", T0 + timedelta(seconds=1200)))
    last_many = reading("6.00", T0)
    for i in range(1, 61):
        last_many = many.observe(reading("6.00", T0 + timedelta(seconds=600 + 10 * i)))
    assert last_one.spend_rate_per_hour == usd("9")
    assert last_many.spend_rate_per_hour is not None
    assert abs(last_many.spend_rate_per_hour.amount - Decimal(9)) < Decimal("0.000001")


def test_no_projection_when_the_window_resets_first() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    snap = rates.observe(reading("0.01", T0 + timedelta(hours=1)))  # 9.99 left at 0.01/h
    assert snap.spend_rate_per_hour == usd("0.01")
    assert snap.projected_exhaustion is None


def test_an_exhausted_budget_is_projected_now() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    snap = rates.observe(reading("10.00", T0 + timedelta(seconds=30)))
    assert snap.projected_exhaustion == T0 + timedelta(seconds=30)


def test_zero_rate_projects_nothing() -> None:
    rates = SpendRates(60)
    rates.observe(reading("2.00", T0))
    snap = rates.observe(reading("2.00", T0 + timedelta(seconds=30)))
    assert snap.spend_rate_per_hour == usd("0")
    assert snap.projected_exhaustion is None


def test_a_new_window_keeps_the_rate_and_restarts_the_baseline() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    rates.observe(reading("1.00", T0 + timedelta(seconds=60)))
    dec = datetime(2026, 12, 1, tzinfo=UTC)
    snap = rates.observe(reading("0", dec, start=dec, end=datetime(2027, 1, 1, tzinfo=UTC)))
    assert snap.spend_rate_per_hour == usd("30")  # not a negative rate from 1.00 -> 0
    snap = rates.observe(reading("1.00", dec + timedelta(seconds=60), start=dec,
                                 end=datetime(2027, 1, 1, tzinfo=UTC)))
    assert snap.spend_rate_per_hour == usd("45")


def test_a_late_reading_is_skipped() -> None:
    rates = SpendRates(60)
    rates.observe(reading("0", T0))
    rates.observe(reading("1.00", T0 + timedelta(seconds=60)))
    snap = rates.observe(reading("0.50", T0 + timedelta(seconds=61)))  # read before the 1.00 commit
    assert snap.spend_rate_per_hour == usd("30")


def test_budgets_are_bounded() -> None:
    rates = SpendRates(60, max_budgets=2)
    for scope in ("a:1", "a:2", "a:3"):
        rates.observe(Snapshot(layer=Layer.PERIOD, scope=scope, limit=usd("1"), spent=usd("0"),
                               reserved=usd("0"), transaction_count=0, as_of=T0))
    assert len(rates._tracks) == 2


@given(st.lists(st.tuples(st.integers(1, 3600), st.integers(0, 10**9)), min_size=2, max_size=30))
def test_the_rate_stays_within_the_interval_rates(steps: list[tuple[int, int]]) -> None:
    """Starting from zero, the rate is a weighted sum of the interval rates whose weights add up
    to 1 - 2^(-elapsed / half-life): bounded by the slowest and fastest intervals times that."""
    rates = SpendRates(300)
    at, spent = T0, 0
    rates.observe(reading("0", at, limit="1000000"))
    seen: list[Decimal] = []
    snap = None
    for seconds, units in steps:
        at += timedelta(seconds=seconds)
        spent += units
        seen.append(Decimal(units) / seconds * 3600 / 10**9)
        snap = rates.observe(reading(Money.from_units(spent, "USD").text(), at, limit="1000000"))
    assert snap is not None
    assert snap.spend_rate_per_hour is not None
    mass = 1 - Decimal(2) ** (-Decimal(sum(sec for sec, _ in steps)) / 300)
    tolerance = Decimal("0.000000001")
    assert min(seen) * mass - tolerance <= snap.spend_rate_per_hour.amount <= max(seen) * mass + tolerance


async def test_status_reports_rate_projection_and_freshness(exchange: Exchange, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    async with running_broker(period_config(exchange, tmp_path, forecast={"half_life_seconds": 60}),
                              clock) as b:
        assert (await buy(b, "k1", [A]))[0] == 200  # 1.00 on every scope
        clock.advance(60)
        status, _ = await buy(b, "k2", [C])  # 3.00 more, a minute later
        assert status == 200
        clock.advance(30)
        r = await b.post("BudgetService/GetBudgetStatus", {"sessionId": "s1"}, ALICE)
    budgets = {(s["scope"], s.get("period", "")): s for s in r.json()["budgets"]}
    alice = budgets[("user:alice", "month")]  # 6.00 a month: 4.00 spent, 2.00 left
    assert alice["asOf"] == "2026-11-23T12:01:30Z"
    assert alice["mode"] == "ENFORCEMENT_MODE_STRICT"
    # From zero: 3.00 in the first minute (180.00/h, weight 1/2), then nothing for half a
    # minute (weight 1 - 2^-0.5).
    rate = Decimal(90) * Decimal(2) ** Decimal("-0.5")
    assert Decimal(alice["spendRatePerHour"]["amount"]) == rate.quantize(Decimal("0.000000001"))
    seconds = Decimal(2) / (rate / 3600)
    projected = datetime.fromisoformat(alice["projectedExhaustion"].replace("Z", "+00:00"))
    expected = T0 + timedelta(seconds=90) + timedelta(microseconds=int(seconds * 10**6))
    assert abs(projected - expected) <= timedelta(milliseconds=1)


def test_a_burst_is_spread_over_the_half_life() -> None:
    # Two purchases a millisecond apart are not a rate of 1.00 per millisecond (3,600,000/h):
    # from zero, the burst counts as 1.00 * ln 2 per half-life.
    rates = SpendRates(900)
    rates.observe(reading("0", T0))
    snap = rates.observe(reading("1.00", T0 + timedelta(milliseconds=1)))
    assert snap.spend_rate_per_hour is not None
    expected = Decimal(2).ln() * 3600 / 900
    assert abs(snap.spend_rate_per_hour.amount - expected) < Decimal("0.00001")


def test_readings_a_moment_apart_fold_in_as_one_interval() -> None:
    # At hundreds of purchases a second, readings under 100 ms apart are folded in together: the
    # rate is the one a single reading covering them gives, and each is still forecast.
    every, sparse = SpendRates(60), SpendRates(60)
    for r in (every, sparse):
        r.observe(reading("0", T0))
        r.observe(reading("1.00", T0 + timedelta(seconds=60)))
    for ms, spent in ((30, "1.10"), (60, "1.20"), (90, "1.30")):
        snap = every.observe(reading(spent, T0 + timedelta(seconds=60, milliseconds=ms)))
        assert snap.spend_rate_per_hour == usd("30")  # the last folded rate, the numbers of now
        assert snap.projected_exhaustion is not None
    last_every = every.observe(reading("1.40", T0 + timedelta(seconds=61)))
    last_sparse = sparse.observe(reading("1.40", T0 + timedelta(seconds=61)))
    assert last_every == last_sparse
    assert last_every.spend_rate_per_hour is not None
    assert last_every.spend_rate_per_hour > usd("30")


def test_a_forecast_keeps_every_other_field_of_the_reading() -> None:
    """Snapshot.with_forecast spells dataclasses.replace out, positionally (it runs for every budget
    of every purchase): a field added to Snapshot and not copied there would vanish from every
    answer, and two fields out of order would swap values. Every field gets its own value."""
    import dataclasses

    def value(i: int, f: dataclasses.Field[object]) -> object:
        kind = str(f.type)
        if kind == "Layer":
            return Layer.PERIOD
        if kind == "int":
            return i
        if kind.startswith("Money"):
            return usd(f"{i}.00")
        if kind.startswith("datetime"):
            return T0 + timedelta(hours=i)
        return f.name  # str fields: each its own name

    snap = Snapshot(**{f.name: value(i, f) for i, f in enumerate(dataclasses.fields(Snapshot))})  # type: ignore[arg-type]
    later = T0 + timedelta(days=1)
    assert snap.with_forecast(usd("99"), later) == dataclasses.replace(
        snap, spend_rate_per_hour=usd("99"), projected_exhaustion=later)


def test_the_projection_counts_what_is_reserved_as_gone() -> None:
    rates = SpendRates(60)
    rates.observe(reading("1.00", T0))
    first = rates.observe(reading("2.00", T0 + timedelta(seconds=60)))
    held = rates.observe(replace(reading("2.00", T0 + timedelta(seconds=60)), reserved=usd("4.00")))
    assert first.projected_exhaustion is not None
    assert held.projected_exhaustion is not None
    now = T0 + timedelta(seconds=60)
    # 4.00 left instead of 8.00 at the same rate: half as long (to the microsecond it is rounded to).
    assert abs((held.projected_exhaustion - now) * 2 - (first.projected_exhaustion - now)) <= timedelta(
        microseconds=1)
    spent_out = rates.observe(replace(reading("2.00", T0 + timedelta(seconds=60)), reserved=usd("9.00")))
    assert spent_out.projected_exhaustion == T0 + timedelta(seconds=60)  # nothing left: exhausted now
