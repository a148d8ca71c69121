"""Choosing offers (broker/purchase/selection.py) and holding session budgets (budget/session.py), offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import ExchangeSetting
from broker.purchase.budgets import tightest
from broker.purchase.selection import Candidate, Exchange, UriChoice, affordable, choose, exchanges_for, prune
from broker.purchase.validation import Constraints
from broker.wire import offer_price
from budget.layers import BudgetExhausted, Layer, Reservation, headroom, reserve_all
from budget.session import SessionAccount, SessionBudgets, SessionError
from common.clock import ManualClock
from currency.convert import Converter, FixedRates, NoConverter, convert
from currency.money import CurrencyMismatch, Money, MoneyError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

FAST = settings(max_examples=200, deadline=None)
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
URI = "https://x.test/a"
EUR_USD = FixedRates({"EUR": {"USD": Decimal("1.25")}})


def usd(amount: str) -> Money:
    return Money(Decimal(amount), "USD")


class NeverCalled:
    """An adapter that choose/prune/affordable must never touch."""

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def discover(self, query: rpb.ResourceQuery, timeout_s: float) -> rpb.ResourceResponse:
        raise AssertionError("discover must not be called")

    async def execute(
        self, request: rpb.TransactionRequest, timeout_s: float
    ) -> rpb.TransactionResponse:
        raise AssertionError("execute must not be called")

    async def close(self) -> None:
        raise AssertionError("close must not be called")


def exchange(
    name: str, *, trust: int = 50, priority: int = 100, reporting: bool = False
) -> Exchange:
    setting = ExchangeSetting(
        name=name, endpoint=f"https://{name}", trust=trust, priority=priority, reporting=reporting
    )
    return Exchange(setting, NeverCalled(name))


def offer(
    offer_id: str,
    rate: str = "1.00",
    currency: str = "USD",
    *,
    model: rpb.PricingModel = rpb.PRICING_MODEL_FLAT,
    quantity: int | None = None,
    unit_cost: str | None = None,
    delivery: rpb.DeliveryMethod = rpb.DELIVERY_METHOD_INLINE,
    expires_at: datetime | None = None,
) -> rpb.Offer:
    pricing = rpb.Pricing(model=model, rate=rate, currency=currency)
    if quantity is not None:
        pricing.estimated_quantity = quantity
    if unit_cost is not None:
        pricing.unit_cost = unit_cost
    o = rpb.Offer(offer_id=offer_id, pricing=pricing, delivery_method=delivery)
    if expires_at is not None:
        o.expires_at.FromDatetime(expires_at)
    return o


def constraints(
    *,
    max_price: Money | None = None,
    max_unit_cost: str | None = None,
    delivery: frozenset[int] = frozenset(),
    reporting_capable: bool = False,
    preferred: tuple[str, ...] = (),
    exchanges: frozenset[str] = frozenset(),
) -> Constraints:
    return Constraints(
        exchanges=exchanges,
        max_price=max_price,
        max_unit_cost=Decimal(max_unit_cost) if max_unit_cost is not None else None,
        delivery=delivery,
        reporting_capable=reporting_capable,
        preferred=preferred,
    )


NONE = constraints()


def pick(
    offers: list[tuple[rpb.Offer, Exchange]],
    c: Constraints = NONE,
    *,
    currency: str = "USD",
    converter: Converter | None = None,
    now: datetime = NOW,
) -> UriChoice:
    return choose(URI, offers, c, currency, converter or NoConverter(), now)


def ids(choice: UriChoice) -> list[str]:
    return [cand.offer.offer_id for cand in choice.ranked]


def candidate(price: Money, name: str = "a.test", offer_id: str = "o") -> Candidate:
    return Candidate(
        uri=f"https://x.test/{offer_id}", offer=offer(offer_id, price.text(), price.currency),
        exchange=exchange(name), price=price, unit_cost=price, preferred=False,
        trust=exchange(name).setting.trust,
    )


# --------------------------------------------------------------------------- offer_price


def test_offer_price_free() -> None:
    price, unit = offer_price(offer("f", "", model=rpb.PRICING_MODEL_FREE))
    assert price == Money.zero("USD")
    assert unit == Money.zero("USD")


def test_offer_price_flat() -> None:
    price, unit = offer_price(offer("f", "2.50", "EUR"))
    assert price == Money(Decimal("2.5"), "EUR")
    assert unit == Money(Decimal("2.5"), "EUR")


def test_offer_price_flat_unit_cost_is_price_over_quantity_rounded_up() -> None:
    price, unit = offer_price(offer("f", "1.00", quantity=3))
    assert price == usd("1")
    assert unit == usd("0.333333334")


def test_offer_price_per_unit() -> None:
    price, unit = offer_price(offer("p", "0.001", model=rpb.PRICING_MODEL_PER_UNIT, quantity=1500))
    assert price == usd("1.5")
    assert unit == usd("0.001")
    assert isinstance(price.amount, Decimal)


def test_offer_price_per_unit_defaults_to_one_unit() -> None:
    price, unit = offer_price(offer("p", "0.000000007", model=rpb.PRICING_MODEL_PER_UNIT))
    assert price == usd("0.000000007")
    assert unit == usd("0.000000007")


def test_offer_price_explicit_unit_cost_wins() -> None:
    price, unit = offer_price(
        offer("p", "0.25", model=rpb.PRICING_MODEL_PER_UNIT, quantity=4, unit_cost="0.2")
    )
    assert price == usd("1")
    assert unit == usd("0.2")
    price, unit = offer_price(offer("f", "3", unit_cost="0.03"))
    assert price == usd("3")
    assert unit == usd("0.03")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (offer("m", model=rpb.PRICING_MODEL_UNSPECIFIED), "pricing.model"),
        (offer("m", "1.00", "usd"), "pricing.currency"),
        (offer("m", "1.00", ""), "pricing.currency"),
        (offer("m", "1e2"), "pricing.rate"),
        (offer("m", "-1"), "pricing.rate"),
        (offer("m", "1", quantity=0), "pricing.estimated_quantity"),
        (offer("m", "1", quantity=-5, model=rpb.PRICING_MODEL_PER_UNIT), "pricing.estimated_quantity"),
        (offer("m", "1", unit_cost="NaN"), "pricing.unit_cost"),
        # A priced model with no rate is malformed, never free.
        (offer("m", ""), "pricing.rate"),
        (offer("m", "", model=rpb.PRICING_MODEL_PER_UNIT), "pricing.rate"),
    ],
)
def test_offer_price_malformed(bad: rpb.Offer, field: str) -> None:
    with pytest.raises(MoneyError) as info:
        offer_price(bad)
    assert info.value.field == field


def test_offer_price_missing_pricing_is_malformed() -> None:
    with pytest.raises(MoneyError):
        offer_price(rpb.Offer(offer_id="bare"))


# --------------------------------------------------------------------------- choose: ranking


def test_choose_ranks_preferred_then_unit_cost_then_trust_then_priority_then_name_and_id() -> None:
    pref = exchange("pref.test", trust=0, priority=999)
    cheap_lo_trust = exchange("lo.test", trust=10)
    hi_trust = exchange("hi.test", trust=90, priority=500)
    hi_trust_first = exchange("hi-first.test", trust=90, priority=1)
    b = exchange("b.test")
    a = exchange("a.test")
    offers = [
        (offer("a-2", "2.00"), a),
        (offer("b-1", "2.00"), b),
        (offer("a-1", "2.00"), a),
        (offer("hi", "2.00"), hi_trust),
        (offer("hi-first", "2.00"), hi_trust_first),
        (offer("cheap", "1.00"), cheap_lo_trust),
        (offer("pref-dear", "9.00"), pref),
        (offer("pref-cheap", "5.00"), pref),
    ]
    choice = pick(offers, constraints(preferred=("pref.test",)))
    assert ids(choice) == [
        "pref-cheap", "pref-dear",  # preferred first, cheaper first within
        "cheap",  # then lowest unit cost, whatever the trust
        "hi-first", "hi",  # equal unit cost: higher trust, then lower priority
        "a-1", "a-2", "b-1",  # full tie: exchange name, then offer id
    ]
    assert [c.preferred for c in choice.ranked] == [True, True] + [False] * 6
    assert choice.reason == bpb.DROP_REASON_UNSPECIFIED
    assert choice.over_cap is None
    # The order does not depend on the order offers arrived in.
    assert ids(pick(list(reversed(offers)), constraints(preferred=("pref.test",)))) == ids(choice)


def test_choose_ranks_by_unit_cost_not_price() -> None:
    ex = exchange("a.test")
    bulk = offer("bulk", "0.01", model=rpb.PRICING_MODEL_PER_UNIT, quantity=1000)  # 10.00, 0.01/unit
    single = offer("single", "1.00")  # 1.00, 1.00/unit
    choice = pick([(single, ex), (bulk, ex)])
    assert ids(choice) == ["bulk", "single"]
    assert choice.ranked[0].price == usd("10")
    assert choice.ranked[0].unit_cost == usd("0.01")


def test_choose_equal_unit_cost_prefers_lower_price_before_name() -> None:
    z = exchange("z.test")
    a = exchange("a.test")
    # Same unit cost (1.00), trust and priority; z's batch is cheaper overall.
    small = offer("small", "1.00", model=rpb.PRICING_MODEL_PER_UNIT, quantity=2)
    big = offer("big", "1.00", model=rpb.PRICING_MODEL_PER_UNIT, quantity=5)
    assert ids(pick([(big, a), (small, z)])) == ["small", "big"]


def test_choose_converts_into_budget_currency_rounding_up() -> None:
    ex = exchange("a.test")
    choice = pick([(offer("e", "1.00", "EUR"), ex), (offer("u", "1.20", "USD"), ex)], converter=EUR_USD)
    assert ids(choice) == ["u", "e"]
    assert choice.ranked[1].price == usd("1.25")
    assert choice.ranked[1].unit_cost == usd("1.25")
    # And back the other way, 1/1.25 = 0.8 exactly.
    choice = pick([(offer("u", "1.00", "USD"), ex)], currency="EUR", converter=EUR_USD)
    assert choice.ranked[0].price == Money(Decimal("0.8"), "EUR")


def test_choose_no_offers() -> None:
    choice = pick([])
    assert choice.ranked == []
    assert choice.reason == bpb.DROP_REASON_NO_OFFERS
    assert choice.detail
    assert choice.uri == URI


# --------------------------------------------------------------------------- choose: filters


def test_choose_max_price_filters_and_reports_cheapest_blocked() -> None:
    ex = exchange("a.test")
    offers = [(offer("ok", "1.00"), ex), (offer("dear", "7.00"), ex), (offer("dearer", "9.00"), ex)]
    choice = pick(offers, constraints(max_price=usd("5")))
    assert ids(choice) == ["ok"]
    assert choice.over_cap == usd("7")
    # Nothing fits the cap: filtered, with the reasons in detail.
    choice = pick(offers[1:], constraints(max_price=usd("5")))
    assert choice.ranked == []
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert choice.over_cap == usd("7")
    assert "max_price" in choice.detail
    assert "a.test/dear" in choice.detail


def test_choose_max_price_is_inclusive() -> None:
    choice = pick([(offer("edge", "5.00"), exchange("a.test"))], constraints(max_price=usd("5")))
    assert ids(choice) == ["edge"]
    assert choice.over_cap is None


def test_choose_over_cap_is_in_max_price_currency() -> None:
    ex = exchange("a.test")
    cap = Money(Decimal("2"), "EUR")
    offers = [(offer("u3", "3.00"), ex), (offer("u2", "2.60"), ex), (offer("u1", "2.00"), ex)]
    choice = pick(offers, constraints(max_price=cap), currency="USD", converter=EUR_USD)
    # 2.00 USD = 1.60 EUR fits; 2.60 USD = 2.08 EUR and 3.00 USD = 2.40 EUR do not.
    assert ids(choice) == ["u1"]
    assert choice.over_cap == Money(Decimal("2.08"), "EUR")
    assert choice.ranked[0].price == usd("2")


def test_choose_max_unit_cost() -> None:
    ex = exchange("a.test")
    offers = [
        (offer("per", "0.02", model=rpb.PRICING_MODEL_PER_UNIT, quantity=100), ex),
        (offer("cheap", "0.01", model=rpb.PRICING_MODEL_PER_UNIT, quantity=100), ex),
        (offer("stated", "5.00", unit_cost="0.015"), ex),
    ]
    choice = pick(offers, constraints(max_unit_cost="0.015"))
    assert ids(choice) == ["cheap", "stated"]
    assert choice.over_cap is None
    choice = pick(offers[:1], constraints(max_unit_cost="0.015"))
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "max_unit_cost" in choice.detail


def test_choose_delivery_preference() -> None:
    ex = exchange("a.test")
    offers = [
        (offer("inline", delivery=rpb.DELIVERY_METHOD_INLINE), ex),
        (offer("url", "0.50", delivery=rpb.DELIVERY_METHOD_URL), ex),
        (offer("api", "0.10", delivery=rpb.DELIVERY_METHOD_API), ex),
    ]
    c = constraints(delivery=frozenset({rpb.DELIVERY_METHOD_INLINE, rpb.DELIVERY_METHOD_URL}))
    assert ids(pick(offers, c)) == ["url", "inline"]
    assert ids(pick(offers)) == ["api", "url", "inline"]
    choice = pick(offers[2:], c)
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "delivery" in choice.detail


def test_choose_reporting_capable() -> None:
    reporter = exchange("rep.test", reporting=True)
    silent = exchange("silent.test", reporting=False)
    offers = [(offer("s", "0.10"), silent), (offer("r", "1.00"), reporter)]
    assert ids(pick(offers, constraints(reporting_capable=True))) == ["r"]
    assert ids(pick(offers)) == ["s", "r"]
    choice = pick(offers[:1], constraints(reporting_capable=True))
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "report" in choice.detail


def test_choose_skips_expired_offers() -> None:
    ex = exchange("a.test")
    offers = [
        (offer("past", "0.10", expires_at=NOW - timedelta(seconds=1)), ex),
        (offer("now", "0.20", expires_at=NOW), ex),
        (offer("future", "0.30", expires_at=NOW + timedelta(seconds=1)), ex),
        (offer("forever", "0.40"), ex),
    ]
    choice = pick(offers)
    assert ids(choice) == ["future", "forever"]
    # Expiry is judged against `now`, not the wall clock.
    assert ids(pick(offers, now=NOW - timedelta(days=1))) == ["past", "now", "future", "forever"]
    choice = pick(offers[:2])
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "a.test/past: expired" in choice.detail
    assert "a.test/now: expired" in choice.detail


def test_choose_skips_malformed_offers_with_a_note() -> None:
    ex = exchange("a.test")
    offers = [
        (offer("nomodel", model=rpb.PRICING_MODEL_UNSPECIFIED), ex),
        (offer("badrate", "1e3"), ex),
        (offer("badcur", "1", "usd"), ex),
        (offer("good", "3.00"), ex),
    ]
    choice = pick(offers)
    assert ids(choice) == ["good"]
    choice = pick(offers[:3])
    assert choice.ranked == []
    assert choice.reason == bpb.DROP_REASON_FILTERED
    for oid in ("nomodel", "badrate", "badcur"):
        assert f"a.test/{oid}: malformed offer" in choice.detail


def test_choose_skips_offers_without_a_conversion_rate() -> None:
    ex = exchange("a.test")
    offers = [(offer("yen", "100", "JPY"), ex), (offer("usd", "2.00"), ex)]
    choice = pick(offers, converter=EUR_USD)
    assert ids(choice) == ["usd"]
    choice = pick(offers[:1], converter=EUR_USD)
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "a.test/yen" in choice.detail
    assert "JPY" in choice.detail
    assert "USD" in choice.detail
    choice = pick([(offer("eur", "1", "EUR"), ex)])  # no rates at all
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "EUR" in choice.detail
    assert "malformed" not in choice.detail


def test_choose_skips_offer_without_rate_into_max_price_currency() -> None:
    ex = exchange("a.test")
    c = constraints(max_price=Money(Decimal(100), "JPY"))
    choice = pick([(offer("usd", "1.00"), ex)], c, converter=EUR_USD)
    assert choice.ranked == []
    assert choice.reason == bpb.DROP_REASON_FILTERED
    assert "JPY" in choice.detail


def test_exchanges_for_filters_and_orders_by_priority_then_name() -> None:
    exs = {
        n: exchange(n, priority=p)
        for n, p in [("c.test", 1), ("b.test", 5), ("a.test", 5), ("d.test", 0)]
    }
    assert [e.name for e in exchanges_for(exs, NONE)] == ["d.test", "c.test", "a.test", "b.test"]
    only = constraints(exchanges=frozenset({"b.test", "c.test"}))
    assert [e.name for e in exchanges_for(exs, only)] == ["c.test", "b.test"]


# --------------------------------------------------------------------------- affordable


def _choice(*prices: str) -> UriChoice:
    ex = exchange("a.test")
    return pick([(offer(f"o{i}", p), ex) for i, p in enumerate(prices)])


def test_affordable_drops_offers_above_room() -> None:
    choice = _choice("3.00", "1.00", "2.00")
    assert ids(choice) == ["o1", "o2", "o0"]
    fit = affordable(choice, usd("2"))
    assert ids(fit) == ["o1", "o2"]
    assert fit.reason == bpb.DROP_REASON_UNSPECIFIED
    assert fit.cheapest is None


def test_affordable_without_room_or_offers_is_unchanged() -> None:
    choice = _choice("3.00")
    assert affordable(choice, None) is choice
    empty = pick([])
    assert affordable(empty, usd("0")) is empty


def test_affordable_none_fit_drops_for_budget() -> None:
    choice = _choice("3.00", "2.50", "4.00")
    dropped = affordable(choice, usd("2.49"))
    assert dropped.ranked == []
    assert dropped.reason == bpb.DROP_REASON_BUDGET
    assert dropped.cheapest == usd("2.5")
    assert "2.50 USD" in dropped.detail
    assert "2.49 USD" in dropped.detail


def test_affordable_keeps_over_cap() -> None:
    ex = exchange("a.test")
    choice = pick([(offer("ok", "1"), ex), (offer("dear", "9"), ex)], constraints(max_price=usd("5")))
    assert affordable(choice, usd("10")).over_cap == usd("9")
    assert affordable(choice, usd("0.5")).over_cap == usd("9")


def test_affordable_refuses_room_in_another_currency() -> None:
    with pytest.raises(CurrencyMismatch):
        affordable(_choice("1.00"), Money(Decimal(5), "EUR"))


# --------------------------------------------------------------------------- prune


def test_prune_keeps_longest_fitting_prefix() -> None:
    best = [candidate(usd(p), offer_id=f"u{i}") for i, p in enumerate(["3", "4", "1", "1"])]
    kept, dropped = prune(best, usd("8"))
    # 3+4+1 = 8 fits; the later (lower-priority) URI is dropped even though it is cheap.
    assert [c.offer.offer_id for c in kept] == ["u0", "u1", "u2"]
    assert [c.offer.offer_id for c in dropped] == ["u3"]
    kept, dropped = prune(best, usd("6.99"))
    assert [c.offer.offer_id for c in kept] == ["u0"]
    assert [c.offer.offer_id for c in dropped] == ["u1", "u2", "u3"]
    kept, dropped = prune(best, usd("2"))
    assert kept == []
    assert dropped == best
    kept, dropped = prune(best, None)
    assert kept == best
    assert dropped == []
    assert prune([], usd("0")) == ([], [])


nanos = st.integers(min_value=0, max_value=10**12).map(lambda n: Decimal(n).scaleb(-9))


@FAST
@given(st.lists(nanos, max_size=12), nanos)
def test_prune_property(prices: list[Decimal], room: Decimal) -> None:
    best = [candidate(Money(p, "USD"), offer_id=f"u{i}") for i, p in enumerate(prices)]
    kept, dropped = prune(best, Money(room, "USD"))
    assert kept + dropped == best
    assert kept == best[: len(kept)]
    spent = sum((c.price.amount for c in kept), start=Decimal(0))
    assert spent <= room
    if dropped:
        assert spent + dropped[0].price.amount > room


# --------------------------------------------------------------------------- session budgets


def account(limit: str = "10", clock: ManualClock | None = None) -> SessionAccount:
    return SessionAccount("s1", usd(limit), clock or ManualClock())


async def test_reserve_commit_release_arithmetic() -> None:
    acct = account("10")
    h1 = await acct.reserve(usd("4"))
    h2 = await acct.reserve(usd("3"))
    assert acct.reserved == usd("7")
    assert acct.spent == usd("0")
    assert (await acct.snapshot()).remaining == usd("3")
    await h1.commit(usd("2.5"))
    assert acct.reserved == usd("3")
    assert acct.spent == usd("2.5")
    assert acct.transaction_count == 1
    await h2.release()
    assert acct.reserved == usd("0")
    assert acct.spent == usd("2.5")
    assert acct.transaction_count == 1
    snap = acct.snap()
    assert snap.layer is Layer.SESSION
    assert snap.scope == "s1"
    assert snap.remaining == usd("7.5")


async def test_reserve_up_to_the_limit_then_exhausted() -> None:
    acct = account("10")
    await acct.reserve(usd("6"))
    await acct.reserve(usd("4"))
    with pytest.raises(BudgetExhausted) as info:
        await acct.reserve(usd("0.000000001"))
    exc = info.value
    assert exc.layer is Layer.SESSION
    assert exc.scope == "s1"
    assert exc.limit == usd("10")
    assert exc.reserved == usd("10")
    assert exc.cost == usd("0.000000001")
    assert exc.remaining == usd("0")
    assert exc.reason == "session_budget_exhausted"
    # A refused reservation holds nothing.
    assert acct.reserved == usd("10")


async def test_reserve_in_other_currency_is_refused() -> None:
    with pytest.raises(CurrencyMismatch):
        await account().reserve(Money(Decimal(1), "EUR"))


@pytest.mark.parametrize("first", ["commit", "release"])
@pytest.mark.parametrize("second", ["commit", "release"])
async def test_settling_twice_raises(first: str, second: str) -> None:
    acct = account("10")
    hold = await acct.reserve(usd("4"))
    if first == "commit":
        await hold.commit(usd("1"))
    else:
        await hold.release()
    before = (acct.spent, acct.reserved, acct.transaction_count)
    settle = hold.commit(usd("1")) if second == "commit" else hold.release()
    with pytest.raises(RuntimeError, match="twice"):
        await settle
    assert (acct.spent, acct.reserved, acct.transaction_count) == before


async def test_commit_above_the_hold_records_full_actual() -> None:
    acct = account("10")
    hold = await acct.reserve(usd("9"))
    await hold.commit(usd("12"))
    assert acct.spent == usd("12")
    assert acct.reserved == usd("0")
    assert acct.snap().remaining == usd("0")
    with pytest.raises(BudgetExhausted):
        await acct.reserve(usd("0.01"))
    # Zero cost still fits nothing over a negative balance.
    with pytest.raises(BudgetExhausted):
        await acct.reserve(usd("0"))


async def test_session_budgets_redeclare_keeps_spent() -> None:
    budgets = SessionBudgets(ManualClock(), None)
    acct = budgets.declare("alice", "s1", usd("10"))
    await (await acct.reserve(usd("4"))).commit(usd("4"))
    again = budgets.declare("alice", "s1", usd("20"))
    assert again is acct
    assert again.limit == usd("20")
    assert again.spent == usd("4")
    assert again.snap().remaining == usd("16")
    # Lowering below what was spent leaves no room, but forgets nothing.
    budgets.declare("alice", "s1", usd("1"))
    assert acct.spent == usd("4")
    assert acct.snap().remaining == usd("0")


async def test_session_budgets_change_currency_only_before_spending() -> None:
    budgets = SessionBudgets(ManualClock(), None)
    acct = budgets.declare("alice", "s1", usd("10"))
    switched = budgets.declare("alice", "s1", Money(Decimal(8), "EUR"))
    assert switched.currency == "EUR"
    assert switched.spent == Money.zero("EUR")
    assert switched.reserved == Money.zero("EUR")
    await (await acct.reserve(Money(Decimal(1), "EUR"))).commit(Money(Decimal(1), "EUR"))
    with pytest.raises(SessionError):
        budgets.declare("alice", "s1", usd("10"))
    assert acct.currency == "EUR"
    assert acct.spent == Money(Decimal(1), "EUR")


async def test_session_budgets_change_currency_refused_while_held() -> None:
    budgets = SessionBudgets(ManualClock(), None)
    acct = budgets.declare("alice", "s1", usd("10"))
    hold = await acct.reserve(usd("1"))
    with pytest.raises(SessionError):
        budgets.declare("alice", "s1", Money(Decimal(10), "EUR"))
    await hold.release()
    assert budgets.declare("alice", "s1", Money(Decimal(10), "EUR")).currency == "EUR"


def test_undeclared_session_without_default_raises() -> None:
    budgets = SessionBudgets(ManualClock(), None)
    with pytest.raises(SessionError, match="no budget"):
        budgets.get("alice", "nobody")
    assert budgets.peek("alice", "nobody") is None
    assert len(budgets) == 0


def test_undeclared_session_gets_the_default() -> None:
    budgets = SessionBudgets(ManualClock(), usd("5"))
    acct = budgets.get("alice", "new")
    assert acct.limit == usd("5")
    assert budgets.get("alice", "new") is acct
    assert budgets.peek("alice", "new") is acct
    assert len(budgets) == 1


async def test_idle_sessions_are_forgotten_unless_holding() -> None:
    clock = ManualClock()
    budgets = SessionBudgets(clock, None, idle_seconds=50)
    budgets.declare("alice", "idle", usd("1"))
    busy = budgets.declare("alice", "busy", usd("1"))
    await busy.reserve(usd("1"))
    clock.advance(100)
    budgets.declare("alice", "fresh", usd("1"))
    assert budgets.peek("alice", "idle") is None
    assert budgets.peek("alice", "busy") is busy
    assert budgets.peek("alice", "fresh") is not None


def test_sessions_belong_to_their_owner() -> None:
    budgets = SessionBudgets(ManualClock(), usd("5"))
    mine = budgets.declare("alice", "s1", usd("1"))
    # Another owner's "s1" is another session: alice's is neither seen nor changed.
    assert budgets.peek("bob", "s1") is None
    theirs = budgets.declare("bob", "s1", usd("700"))
    assert theirs is not mine
    assert mine.limit == usd("1")
    assert budgets.get("bob", "s1") is theirs
    assert budgets.view("carol", "s1").limit == usd("5")
    assert budgets.peek("carol", "s1") is None  # view creates nothing


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 4000)),
        st.tuples(st.just("commit"), st.integers(0, 10**6)),
        st.tuples(st.just("release"), st.integers(0, 10**6)),
    ),
    max_size=40,
)


@FAST
@given(st.integers(0, 10_000), ops)
async def test_session_account_never_overcommits(limit_cents: int, steps: list[tuple[str, int]]) -> None:
    acct = SessionAccount("s", Money.from_units(limit_cents * 10**7, "USD"), ManualClock())
    open_holds: list[Reservation] = []
    expected_spent = Money.zero("USD")
    for op, n in steps:
        if op == "reserve":
            amount = Money.from_units(n * 10**7, "USD")
            try:
                open_holds.append(await acct.reserve(amount))
            except BudgetExhausted:
                assert acct.spent + acct.reserved + amount > acct.limit
        elif open_holds:
            hold = open_holds.pop(n % len(open_holds))
            if op == "commit":
                actual = Money.from_units(hold.amount.units() * (n % 101) // 100, "USD")
                await hold.commit(actual)
                expected_spent = expected_spent + actual
            else:
                await hold.release()
        assert acct.spent + acct.reserved <= acct.limit
        assert acct.reserved == sum((h.amount for h in open_holds), start=Money.zero("USD"))
        assert acct.spent == expected_spent
        assert acct.snap().remaining == acct.limit - acct.spent - acct.reserved


# --------------------------------------------------------------------------- layers


async def test_reserve_all_is_all_or_nothing() -> None:
    roomy = account("10")
    tight = SessionAccount("s2", usd("1"), ManualClock())
    with pytest.raises(BudgetExhausted):
        await reserve_all([roomy, tight], usd("2"), NoConverter())
    assert roomy.reserved == usd("0")
    held = await reserve_all([roomy, tight], usd("1"), NoConverter())
    assert [h.amount for h in held] == [usd("1"), usd("1")]
    assert roomy.reserved == tight.reserved == usd("1")


async def test_reserve_all_converts_up() -> None:
    eur = SessionAccount("e", Money(Decimal(10), "EUR"), ManualClock())
    rates = FixedRates({"USD": {"EUR": Decimal("0.9")}})
    (hold,) = await reserve_all([eur], usd("1.000000001"), rates)
    assert hold.amount == Money(Decimal("0.900000001"), "EUR")


async def test_headroom_picks_the_tightest_budget_rounding_down() -> None:
    usd_acct = account("10")
    eur_acct = SessionAccount("e", Money(Decimal(3), "EUR"), ManualClock())
    rates = FixedRates({"EUR": {"USD": Decimal("1.000000001")}})
    await usd_acct.reserve(usd("6"))
    h = await headroom([usd_acct, eur_acct], "USD", rates)
    assert h.room == usd("3.000000003")
    assert h.tightest is not None
    assert h.tightest.scope == "e"
    assert len(h.snapshots) == 2
    # The derived rate is exactly 1/3: 3 EUR is exactly 1 USD, no 28-digit residue ...
    rates = FixedRates({"USD": {"EUR": Decimal(3)}})
    h = await headroom([eur_acct], "USD", rates)
    assert h.room == usd("1")
    # ... and 1 EUR is 0.333333333... USD: headroom rounds down, a reservation up.
    one_eur = SessionAccount("e1", Money(Decimal(1), "EUR"), ManualClock())
    h = await headroom([one_eur], "USD", rates)
    assert h.room == usd("0.333333333")
    assert convert(Money(Decimal(1), "EUR"), "USD", rates) == usd("0.333333334")
    h = await headroom([], "USD", rates)
    assert h.room is None
    assert h.tightest is None


def test_the_tightest_budget_in_the_header_is_compared_in_one_currency_rounding_down() -> None:
    """x-budget-remaining names the budget with the least left: amounts in other currencies are
    converted to the first one's (rounded down); an unconvertible one leaves the header out."""
    def state(scope: str, amount: str, currency: str) -> bpb.BudgetState:
        return bpb.BudgetState(scope=scope, remaining=rpb.Cost(amount=amount, currency=currency))

    rates = FixedRates({"EUR": {"USD": Decimal("1.10")}})
    usd, eur = state("s", "10.00", "USD"), state("e", "9.50", "EUR")
    assert tightest([usd, eur], rates) is usd  # 9.50 EUR = 10.45 USD
    less = state("e", "9.00", "EUR")
    assert tightest([usd, less], rates) is less  # 9.90 USD
    close = state("t", "10.449999999", "USD")
    assert tightest([close, eur], rates) is close
    # 10.00 USD = 9.0909090909... EUR: rounded down (9.090909090) it is below 9.090909091 EUR.
    assert tightest([state("e", "9.090909091", "EUR"), usd], rates) is usd
    assert tightest([eur, usd], rates) is usd
    assert tightest([usd, eur], NoConverter()) is None
    assert tightest([], rates) is None
