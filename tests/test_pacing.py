"""Predictive pacing (budget/pacing.py): spend held on the even curve, through the real purchase path.

Deterministic: the brokers are built in this process on a ManualClock with seeded draws, on the
embedded store and against the reference Exchange on a real socket, and purchases go through the
real Purchaser. Each scope is offered purchases on a schedule of simulated time, N x its even
rate (limit / period), so every number below is exact for the seeds. test_pacing_processes.py
checks the same targets against broker processes on the wall clock.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.app import Broker, build_broker
from broker.auth import Agent
from broker.config import BrokerConfig
from budget import pacing
from budget.clock import ManualClock
from budget.layers import BudgetExhausted, Layer, Snapshot
from budget.pacing import Pacer
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from tests.harness import Exchange, broker_config, catalog, running_exchange

ACCOUNT = "acme"
ITEM = "https://x.test/p"
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # a minute's start: the 60 s windows are epoch-aligned
PERIOD_S = 60
LIMIT = Decimal("3.00")
PRICE = Decimal("0.01")
HALF_LIFE_S = 3.0  # forecast.half_life_seconds: pacing's band is this much of the even rate
EVEN = LIMIT / PERIOD_S  # USD a second
# Pacing's band G (budget/pacing.py): HALF_LIFE_S of the even rate, at most 2% of the limit.
BAND = min(LIMIT * Decimal(str(HALF_LIFE_S)) / PERIOD_S, LIMIT * Decimal("0.02"))


def issue_bound(multiple: float) -> Decimal:
    """Issue 23's target: max(5% of the limit, 2 forecast half-lives of excess demand)."""
    excess = EVEN * (Decimal(str(multiple)) - 1)
    return max(LIMIT * Decimal("0.05"), 2 * Decimal(str(HALF_LIFE_S)) * excess)


def pacing_config(exchange: Exchange, state: Path, scopes: dict[str, dict[str, Any]], *,
                  name: str = "1") -> BrokerConfig:
    return broker_config(
        [exchange],
        session={"default_limit": {"amount": "1000000.00", "currency": "USD"}},
        forecast={"half_life_seconds": HALF_LIFE_S},
        metrics={"export_scopes": list(scopes)},
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / f"journal-{name}.jsonl"),
            "memory_path": str(state / f"memory-{name}.json"),
            "leases": {"refresh_seconds": 1, "ttl_seconds": 30,
                       "journal_path": str(state / f"leases-{name}.jsonl")},
            "accounts": {ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": f"{PERIOD_S}s", "amount": str(LIMIT), "currency": "USD"}],
                        **rule}
                for scope, rule in scopes.items()}}},
        },
    )


@dataclass
class Attempt:
    t: float  # seconds into the window
    broker: int
    admitted: bool
    reason: str = ""
    retry_at: datetime | None = None
    message: str = ""
    p: float | None = None  # the broker's exported admission probability right after it


@dataclass
class Run:
    """What one scope was offered, and what came of it."""

    attempts: list[Attempt] = field(default_factory=list)

    def spent_at(self) -> list[tuple[float, Decimal]]:
        spent, out = Decimal(0), []
        for a in self.attempts:
            spent += PRICE if a.admitted else 0
            out.append((a.t, spent))
        return out

    def max_deviation(self, until: float = PERIOD_S) -> Decimal:
        """Largest |spend - the even line from the window's start to the limit at its end|."""
        return max(abs(s - LIMIT * Decimal(str(t)) / PERIOD_S) for t, s in self.spent_at() if t <= until)

    def exhausted_at(self) -> float | None:
        """When the first purchase was refused for want of budget, as a share of the period."""
        first = next((a for a in self.attempts if a.reason == "period_budget_exhausted"), None)
        return None if first is None else first.t / PERIOD_S


def arrivals(multiples: Sequence[tuple[float, float]]) -> list[float]:
    """Offer times over the window: (from second, N x the even rate) pieces, evenly spaced, in whole
    microseconds (the clock's resolution: the last one stays inside the window)."""
    out: list[float] = []
    us = 0
    for i, (start, multiple) in enumerate(multiples):
        end = (multiples[i + 1][0] if i + 1 < len(multiples) else PERIOD_S) * 1_000_000
        gap = int(PRICE / (EVEN * Decimal(str(multiple))) * 1_000_000)
        us = max(us, int(start * 1_000_000))
        while (us := us + gap) < end:
            out.append(us / 1_000_000)
    return out


@contextlib.asynccontextmanager
async def brokers(exchange: Exchange, state: Path, clock: ManualClock, scopes: dict[str, dict[str, Any]],
                  count: int = 1) -> AsyncIterator[list[Broker]]:
    built: list[Broker] = []
    try:
        for i in range(count):
            config = pacing_config(exchange, state, scopes, name=str(i + 1))
            built.append(await build_broker(config, clock, random.Random(2300 + i)))
        yield built
    finally:
        for b in built:
            await b.close()


def at(clock: ManualClock, t: float) -> None:
    """Move the clock to `t` seconds into the window (to the microsecond: no drift over thousands)."""
    clock.advance((T0 + timedelta(microseconds=round(t * 1_000_000)) - clock.now()).total_seconds())


async def offer(clock: ManualClock, fleet: Sequence[Broker], plan: dict[str, list[float]],
                refresh_s: float | None = None) -> dict[str, Run]:
    """Offer each scope's purchases at its times (alternating between the brokers), one at a time in
    time order; each broker's leases are refreshed every `refresh_s` of simulated time, as its
    refresh loop would, the brokers' refreshes spread evenly over the interval (not in lockstep)."""
    runs = {scope: Run() for scope in plan}
    events: list[tuple[float, str, int]] = sorted(
        (t, scope, n) for scope, times in plan.items() for n, t in enumerate(times))
    if refresh_s is not None:
        end = max(t for t, _, _ in events)
        ticks = int(end / refresh_s) + 1
        events += [((k + (i + 1) / len(fleet)) * refresh_s, "", i)
                   for k in range(ticks) for i in range(len(fleet))]
        events.sort()
    agents = {scope: Agent(f"agent-{scope}", ACCOUNT, charged_to=(scope,)) for scope in plan}
    for t, scope, n in events:
        at(clock, t)
        if not scope:  # broker n's lease refresh
            period = fleet[n].period
            assert period is not None
            assert period.leases is not None
            await period.leases.refresh(ACCOUNT)
            continue
        which = n % len(fleet)
        broker = fleet[which]
        assert broker.purchaser is not None
        req = bpb.TransactRequest(session_id="s", idempotency_key=f"{scope}-{n}", uris=[ITEM])
        try:
            await broker.purchaser.transact(req, agents[scope])
            attempt = Attempt(t, which, True)
        except BudgetExhausted as exc:
            attempt = Attempt(t, which, False, exc.reason, exc.retry_at, str(exc))
        attempt.p = gauge(broker, scope)
        runs[scope].attempts.append(attempt)
    return runs


def gauge(broker: Broker, scope: str) -> float | None:
    """The exported admission probability of `scope` (its own collector: not the whole registry)."""
    samples = [s for m in broker.metrics.admission.collect() for s in m.samples]
    return next((s.value for s in samples if s.labels["scope"] == scope), None)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The brokers' files on a RAM disk where there is one: the same SQLite, without an fsync of
    several milliseconds per store call (the simulation makes a thousand purchases, one at a time)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="pacing-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def exchange() -> AsyncIterator[Exchange]:
    cat = catalog(offers=[{"uri": ITEM, "offer_id": "p", "rate": str(PRICE), "currency": "USD"}],
                  accounts={"ramp-broker": {"USD": "1000000.00"}})
    async with running_exchange(cat) as e:
        yield e


def check_on_the_curve(run: Run, multiple: float, *, lag: Decimal = Decimal(0)) -> None:
    """The targets of a scope offered `multiple` x its even rate all window long."""
    exhausted = run.exhausted_at()
    assert exhausted is not None
    assert exhausted >= 0.95, f"{multiple}x: ran out at {exhausted}"
    assert sum(a.admitted for a in run.attempts) * PRICE == LIMIT  # all of it spent, none refused over
    # Design bound (budget/pacing.py): the curve starts G above the even line, spend settles at most G
    # above the curve, plus a purchase (plus, on leases, what the other broker has not reported yet).
    deviation = run.max_deviation()
    assert deviation <= 2 * BAND + PRICE + lag, f"{multiple}x: {deviation} off the curve"
    assert deviation <= issue_bound(multiple)
    assert exhausted is not None
    knows: set[int] = set()  # brokers that have seen the budget used up (read it from the store)
    for a in run.attempts:
        if a.t / PERIOD_S < exhausted:
            assert a.admitted or a.reason == "budget_paced", a
        elif a.reason == "period_budget_exhausted":
            assert a.retry_at == T0 + timedelta(seconds=PERIOD_S)  # the next window
            knows.add(a.broker)
        elif a.broker in knows:
            # Once a broker has seen the budget used up, it says so: never "paced" again.
            assert a.admitted, a


def check_gauge(run: Run, broker: int, until: float) -> None:
    """The exported admission probability matches the share admitted, over every 10 s at steady
    demand (from 10 s on: the first seconds spend the window's allowance, admitted at once)."""
    for start in range(10, int(until) - 9, 10):
        window = [a for a in run.attempts if a.broker == broker and start <= a.t < start + 10]
        share = sum(a.admitted for a in window) / len(window)
        exported = sum(a.p or 0 for a in window) / len(window)
        assert abs(exported - share) <= 0.1 * share, (start, exported, share)


async def test_spend_follows_the_even_curve_at_2x_4x_and_10x_demand(exchange: Exchange, state: Path) -> None:
    clock = ManualClock(T0)
    scopes = {"team:x2": {"pacing": "even"}, "team:x4": {"pacing": "even"}, "team:x10": {"pacing": "even"},
              "team:drop": {"pacing": "even"}}
    plan = {"team:x2": arrivals([(0, 2)]), "team:x4": arrivals([(0, 4)]), "team:x10": arrivals([(0, 10)]),
            "team:drop": arrivals([(0, 4), (30, 0.5)])}
    async with brokers(exchange, state, clock, scopes) as fleet:
        runs = await offer(clock, fleet, plan)
    for multiple in (2, 4, 10):
        run = runs[f"team:x{multiple}"]
        check_on_the_curve(run, multiple)
        exhausted = run.exhausted_at()
        assert exhausted is not None
        check_gauge(run, 0, until=exhausted * PERIOD_S)
    # Demand drops to half the curve's rate at 30 s: within 2 half-lives every purchase is admitted.
    drop = runs["team:drop"]
    assert drop.max_deviation(until=30) <= 2 * BAND + PRICE
    after = [a for a in drop.attempts if a.t >= 30 + 2 * HALF_LIFE_S]
    assert after
    assert all(a.admitted for a in after)
    # A paced refusal says so, with the curve's numbers; it retries when the curve has room.
    paced = next(a for a in runs["team:x4"].attempts if a.reason == "budget_paced")
    assert "'team:x4' paced: spent " in paced.message
    assert "against an even curve at " in paced.message
    assert "exhausted" not in paced.message
    assert paced.retry_at is not None
    assert T0 + timedelta(seconds=paced.t) < paced.retry_at <= T0 + timedelta(seconds=PERIOD_S)


async def test_two_lease_brokers_share_one_curve(exchange: Exchange, state: Path) -> None:
    """Lease mode, 2 brokers offered 2x the even rate each (4x in all): each compares the scope's
    total (as its last refresh saw it, plus its own spend since) with the one curve."""
    clock = ManualClock(T0)
    scopes = {"team:lease": {"pacing": "even", "mode": "lease"}}
    async with brokers(exchange, state, clock, scopes, count=2) as fleet:
        runs = await offer(clock, fleet, {"team:lease": arrivals([(0, 4)])}, refresh_s=1.0)
    run = runs["team:lease"]
    # What the other broker spent since its last refresh (1 s): up to 2 s of its share of the curve.
    check_on_the_curve(run, 4, lag=2 * EVEN)
    exhausted = run.exhausted_at()
    assert exhausted is not None
    for broker in (0, 1):
        check_gauge(run, broker, until=exhausted * PERIOD_S)
    # The curve is not split: both admit about the same share of what each is offered.
    shares = [sum(a.admitted for a in run.attempts if a.broker == b) for b in (0, 1)]
    assert abs(shares[0] - shares[1]) <= 0.2 * max(shares)


class CountingRandom(random.Random):
    """A seeded generator that counts pacing's draws."""

    draws = 0

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        self.draws += 1
        return super().randrange(*args, **kwargs)


async def test_a_paced_refusal_is_drawn_once_and_reads_nothing(exchange: Exchange, state: Path) -> None:
    """A purchase is drawn once, before anything is held: a paced refusal is final, not a lost race
    that re-reads the budgets and draws again (which admitted 1 - (1 - p)^4 of them)."""
    clock = ManualClock(T0)
    rng = CountingRandom(23)
    config = pacing_config(exchange, state, {"team:x10": {"pacing": "even"}})
    broker = await build_broker(config, clock, rng)
    try:
        runs = await offer(clock, [broker], {"team:x10": [t for t in arrivals([(0, 10)]) if t < 20]})
        reads = broker.metrics.registry.get_sample_value(
            "broker_store_operation_duration_seconds_count", {"operation": "read"})
    finally:
        await broker.close()
    attempts = runs["team:x10"].attempts
    drawn = [a for a in attempts if a.p is not None and a.p < 1]
    assert sum(a.reason == "budget_paced" for a in attempts) > 100
    assert rng.draws == len(drawn)  # one draw per purchase that had to be drawn
    assert not reads  # nothing read for a refusal (or a purchase: reservation and commit tell)


# --- the controller alone ---------------------------------------------------------------------


KEY = (ACCOUNT, "team:p", "1m", "USD")


def reading(clock: ManualClock, spent: str, *, reserved: str = "0") -> Snapshot:
    return Snapshot(layer=Layer.PERIOD, scope="team:p", limit=Money(LIMIT, "USD"),
                    spent=Money.parse(spent, "USD", "s"), reserved=Money.parse(reserved, "USD", "r"),
                    transaction_count=0, as_of=clock.now(), period_start=T0,
                    period_end=T0 + timedelta(seconds=PERIOD_S), period="1m", account=ACCOUNT)


def test_admission_falls_from_one_on_the_curve_to_zero_one_band_above_it() -> None:
    clock = ManualClock(T0)
    pacer = Pacer(clock.now, random.Random(1), band_seconds=HALF_LIFE_S)
    assert pacer.admission(KEY) is None  # nothing read yet: admitted
    assert BAND == Decimal("0.06") == LIMIT * pacing.MAX_BAND_SHARE  # 3 s of 0.05 a second is 0.15: capped
    at(clock, 30)  # the curve: 0.06 at the window's start, rising evenly to 3.00 at its end: 1.53 now
    for spent, p in (("1.50", "1"), ("1.53", "1"), ("1.56", "0.5"), ("1.575", "0.25"), ("1.59", "0"),
                     ("2.50", "0")):
        pacer.observe([reading(clock, spent)])
        admission = pacer.admission(KEY)
        assert admission is not None
        assert (admission.curve, admission.probability) == (Decimal("1.53"), Decimal(p)), spent
    # A reading with less spent in the same window is an older one arriving late: skipped.
    pacer.observe([reading(clock, "1.00")])
    assert admission == pacer.admission(KEY)
    # Decayed to now: a reading 0.03 above the curve, 1.2 s later, is 0.0288 below it (2.94 a minute).
    pacer = Pacer(clock.now, random.Random(1), band_seconds=HALF_LIFE_S)
    pacer.observe([reading(clock, "1.56")])
    at(clock, 31.2)
    admission = pacer.admission(KEY)
    assert admission is not None
    assert (admission.curve, admission.probability) == (Decimal("1.5888"), Decimal(1))
    # The next window has a curve of its own; until it is read, purchases are admitted.
    at(clock, PERIOD_S)
    assert pacer.admission(KEY) is None


def test_underspend_is_spread_over_the_rest_of_the_window_not_banked() -> None:
    clock = ManualClock(T0)
    pacer = Pacer(clock.now, random.Random(1), band_seconds=HALF_LIFE_S)
    at(clock, 30)
    pacer.observe([reading(clock, "0.30")])  # 1.23 below the curve: more than the band
    admission = pacer.admission(KEY)
    assert admission is not None
    # Lowered to spend + G, then evenly to the limit: 2.64 over the 30 s left.
    assert (admission.curve, admission.rate, admission.probability) == (
        Decimal("0.36"), Decimal("0.088"), Decimal(1))
    at(clock, 40)
    pacer.observe([reading(clock, "1.20")])  # spent along it
    admission = pacer.admission(KEY)
    assert admission is not None
    assert (admission.curve, admission.probability) == (Decimal("1.24"), Decimal(1))
    at(clock, 50)  # nothing spent for 10 s: lowered again, never more than G above spend
    admission = pacer.admission(KEY)
    assert admission is not None
    assert (admission.curve, admission.rate) == (Decimal("1.26"), Decimal("0.174"))


def test_draws_follow_the_admission_probability_to_within_two_purchases() -> None:
    clock = ManualClock(T0)
    pacer = Pacer(clock.now, random.Random(5), band_seconds=HALF_LIFE_S)
    at(clock, 30)
    pacer.observe([reading(clock, "1.575")])  # p = 0.25
    cost = Money(PRICE, "USD")
    admitted = 0
    for n in range(1, 2001):
        with contextlib.suppress(BudgetExhausted):
            pacer.admit([(KEY, cost)])
            admitted += 1
        assert abs(admitted - n / 4) <= 2, n  # however few purchases: not a binomial's sqrt(n)


def test_a_paced_refusal_says_paced_with_the_curve_and_when_to_retry() -> None:
    clock = ManualClock(T0)
    pacer = Pacer(clock.now, random.Random(5), band_seconds=HALF_LIFE_S)
    at(clock, 30)
    pacer.observe([reading(clock, "1.60")])  # 0.07 above the curve: p = 0
    with pytest.raises(BudgetExhausted) as refused:
        pacer.admit([(KEY, Money(PRICE, "USD"))])
    exc = refused.value
    assert exc.reason == "budget_paced"
    assert str(exc) == ("period budget 'team:p' paced: spent 1.60 USD against an even curve at 1.53 USD now, "
                        "rising to the limit 3.00 USD at 2026-11-23T12:01:00+00:00; admitting 0% of "
                        "purchases, and not this one (cost 0.01 USD)")
    # Nothing admitted until spend is within G of the curve: 0.01 more of curve, at 0.049 a second.
    assert exc.retry_at == clock.now() + timedelta(microseconds=204082)
    # A purchase that does not fit what is left is not paced: the budget refuses it as exhausted.
    pacer.observe([reading(clock, "2.995")])
    pacer.admit([(KEY, Money(PRICE, "USD"))])
    pacer.observe([reading(clock, "2.98", reserved="0.015")])
    pacer.admit([(KEY, Money(PRICE, "USD"))])
