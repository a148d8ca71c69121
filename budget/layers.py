"""The seam every budget layer plugs into.

A purchase gathers the budgets that apply to it (the session's now; the
period scopes' next) and reserves the batch total on every one of them before
any Exchange is called: all reserve or none do. After the Exchanges answer,
each reservation is settled once with what was actually charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from currency.convert import Converter, convert
from currency.money import Money


class Layer(StrEnum):
    TRANSACTION = "transaction"
    SESSION = "session"
    PERIOD = "period"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One budget's numbers at one instant."""

    layer: Layer
    scope: str
    limit: Money
    spent: Money
    reserved: Money
    transaction_count: int
    as_of: datetime
    period_start: datetime | None = None
    period_end: datetime | None = None
    period: str = ""  # period layer: "month", "30d", ...
    failure_policy: str = ""  # period layer: "closed" or "open"
    account: str = ""  # period layer: the account the scope belongs to
    # From the spend-rate forecast (budget.forecast), when one is known.
    spend_rate_per_hour: Money | None = None
    projected_exhaustion: datetime | None = None
    # Period layer: "strict" (every purchase reserves in the store) or "lease" (budget.leases),
    # and for a lease, its phase ("generous" ... "exhausted").
    mode: str = "strict"
    phase: str = ""

    @property
    def remaining(self) -> Money:
        return (self.limit - self.spent - self.reserved).clamp_zero()

    def with_forecast(self, rate_per_hour: Money, projected_exhaustion: datetime | None) -> Snapshot:
        """This reading with its forecast (dataclasses.replace, spelled out, positionally in field
        order: it runs for every budget of every purchase, and replace looks every field up by name)."""
        return Snapshot(
            self.layer, self.scope, self.limit, self.spent, self.reserved, self.transaction_count, self.as_of,
            self.period_start, self.period_end, self.period, self.failure_policy, self.account, rate_per_hour,
            projected_exhaustion, self.mode, self.phase)


class BudgetExhausted(Exception):
    """A budget cannot cover a cost. Raised before anything reaches the wire."""

    def __init__(
        self,
        *,
        layer: Layer,
        scope: str,
        limit: Money,
        spent: Money,
        reserved: Money,
        cost: Money,
        reason: str,
        next_action: str,
        period_end: datetime | None = None,
        retry_at: datetime | None = None,
        mode: str = "strict",
        phase: str = "",
        message: str | None = None,
    ) -> None:
        """`message`: what the caller reads, when it is not that the cost does not fit (pacing)."""
        self.layer = layer
        self.scope = scope
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.cost = cost
        self.reason = reason
        self.next_action = next_action
        self.period_end = period_end
        # When a retry can succeed: the period's end unless said otherwise (pacing knows sooner).
        self.retry_at = retry_at or period_end
        self.mode, self.phase = mode, phase  # how the budget is enforced (Snapshot.mode and .phase)
        self.snapshot: Snapshot | None = None  # the reading that refused it, when there is one
        super().__init__(message or (
            f"{layer} budget {scope!r} exhausted: cost {cost} does not fit; "
            f"spent {spent}, reserved {reserved}, limit {limit}, remaining {self.remaining}"
        ))

    @property
    def remaining(self) -> Money:
        return (self.limit - self.spent - self.reserved).clamp_zero()

    @classmethod
    def from_snapshot(
        cls, snap: Snapshot, cost: Money, *, reason: str, next_action: str
    ) -> BudgetExhausted:
        exc = cls(
            layer=snap.layer, scope=snap.scope, limit=snap.limit, spent=snap.spent,
            reserved=snap.reserved, cost=cost, reason=reason, next_action=next_action,
            period_end=snap.period_end, mode=snap.mode, phase=snap.phase,
        )
        exc.snapshot = snap
        return exc


# Snapshot.period of a fail-open scope's local allowance, used while the store is unreachable.
OPEN_ALLOWANCE = "open-allowance"


def exhausted_reason(snap: Snapshot) -> str:
    """BudgetExhausted.reason for a denial by this budget."""
    if snap.period == OPEN_ALLOWANCE:
        return "open_allowance_exhausted"
    return f"{snap.layer}_budget_exhausted"


def next_action(snap: Snapshot) -> str:
    """What an agent denied by this budget can do about it."""
    if snap.period == OPEN_ALLOWANCE:
        return ("the budget store is unreachable and this broker's fail-open allowance is used up: "
                "retry when the store is back (a key bought before on another broker is then answered "
                "with that purchase)")
    if snap.layer == Layer.SESSION:
        return "raise the session budget with DeclareSessionBudget, or buy fewer or cheaper resources"
    if snap.period_end is not None:
        return (f"wait for the {snap.period} period to reset at {snap.period_end.isoformat()}, "
                f"or ask an operator to raise {snap.scope}'s limit")
    return "ask an operator to raise the limit, or retry later"


class Reservation(Protocol):
    """Money held on one budget for one purchase; settled exactly once."""

    @property
    def amount(self) -> Money: ...

    async def commit(self, actual: Money) -> None:
        """Record `actual` as spent and return the rest of the hold."""
        ...

    async def release(self) -> None:
        """Return the whole hold; nothing was spent."""
        ...


class Budget(Protocol):
    """One budget that applies to a purchase, in its own currency."""

    @property
    def currency(self) -> str: ...

    async def snapshot(self) -> Snapshot: ...

    async def reserve(self, amount: Money) -> Reservation:
        """Hold `amount` (in this budget's currency) or raise BudgetExhausted."""
        ...


async def reserve_all(
    budgets: Sequence[Budget], cost: Money, converter: Converter
) -> list[Reservation]:
    """Reserve `cost` on every budget, converted up; on any failure release what was held."""
    held: list[Reservation] = []
    try:
        for budget in budgets:
            held.append(await budget.reserve(convert(cost, budget.currency, converter)))
    except BaseException:
        for r in held:
            await r.release()
        raise
    return held


@dataclass(frozen=True, slots=True)
class Headroom:
    """The tightest budget of a purchase, and every budget's numbers."""

    room: Money | None
    tightest: Snapshot | None
    snapshots: list[Snapshot]


async def headroom(budgets: Sequence[Budget], currency: str, converter: Converter) -> Headroom:
    """The smallest remaining amount over `budgets`, expressed in `currency`.

    Converting a remaining amount rounds down, so the pre-filter never thinks
    there is more room than there is. `room` is None when no budget applies.
    """
    return headroom_of([await b.snapshot() for b in budgets], currency, converter)


def headroom_of(snaps: Sequence[Snapshot], currency: str, converter: Converter) -> Headroom:
    """`headroom` over numbers already read."""
    room: Money | None = None
    tightest: Snapshot | None = None
    for s in snaps:
        left = convert(s.remaining, currency, converter, round_up=False)
        if room is None or left < room:
            room, tightest = left, s
    return Headroom(room, tightest, list(snaps))
