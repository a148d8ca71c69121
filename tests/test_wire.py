"""Budget readings on the wire: every field of a snapshot, into a fresh or a given message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker import wire
from budget.layers import Layer, Snapshot
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb


def usd(amount: str) -> Money:
    return Money.parse(amount, "USD", "amount")


def test_a_budget_state_carries_every_field_of_its_snapshot_into_the_message_it_is_given() -> None:
    now = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
    snap = Snapshot(layer=Layer.PERIOD, scope="team:a", limit=usd("100.00"), spent=usd("12.345"),
                    reserved=usd("0.01"), transaction_count=7, as_of=now,
                    period_start=datetime(2026, 11, 1, tzinfo=UTC),
                    period_end=datetime(2026, 12, 1, tzinfo=UTC), period="month", failure_policy="open",
                    account="acme", spend_rate_per_hour=usd("1.50"),
                    projected_exhaustion=now + timedelta(hours=58, microseconds=7), mode="lease",
                    phase="generous")
    response = bpb.TransactResponse()
    into = response.budgets.add()
    state = wire.budget_state(snap, into)
    assert state is into
    assert response.budgets[0] == state
    assert (state.layer, state.scope, state.mode, state.phase) == (
        bpb.BUDGET_LAYER_PERIOD, "team:a", bpb.ENFORCEMENT_MODE_LEASE, "generous")
    assert (state.period, state.failure_policy, state.transaction_count) == ("month", "open", 7)
    costs = {f: (getattr(state, f).amount, getattr(state, f).currency)
             for f in ("limit", "spent", "reserved", "remaining", "spend_rate_per_hour")}
    assert costs == {"limit": ("100.00", "USD"), "spent": ("12.345", "USD"), "reserved": ("0.01", "USD"),
                     "remaining": ("87.645", "USD"), "spend_rate_per_hour": ("1.50", "USD")}
    assert state.as_of.ToDatetime(tzinfo=UTC) == now
    assert state.period_start.ToDatetime(tzinfo=UTC) == snap.period_start
    assert state.period_end.ToDatetime(tzinfo=UTC) == snap.period_end
    assert state.projected_exhaustion.ToDatetime(tzinfo=UTC) == snap.projected_exhaustion


def test_a_budget_state_without_a_window_or_forecast_leaves_those_fields_unset() -> None:
    snap = Snapshot(layer=Layer.SESSION, scope="s-1", limit=usd("5.00"), spent=usd("6.00"), reserved=usd("0"),
                    transaction_count=0, as_of=datetime(2026, 11, 30, tzinfo=UTC))
    state = wire.budget_state(snap)
    for name in ("period_start", "period_end", "projected_exhaustion", "spend_rate_per_hour"):
        assert not state.HasField(name), name
    # Overspent: remaining is never negative.
    assert (state.remaining.amount, state.mode) == ("0.00", bpb.ENFORCEMENT_MODE_STRICT)
    assert state == wire.budget_state(snap, bpb.BudgetState())
