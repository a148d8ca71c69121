"""The per-period store contract, shared by the embedded (SQLite) and Redis stores.

Everything here is integers: amounts are nano-units (currency.money.SCALE) in
the counter's own currency, times are Unix milliseconds taken from the
broker's injected clock (never the store's own time), so TTLs and period
boundaries are testable without sleeping.

An *account* groups the scopes one purchase can touch (in Redis every key of an
account shares one Cluster hash tag, so a multi-scope script stays in one slot).
A *counter* is one (scope, period, window): spent, reserved, credit and a
transaction count. A *reservation* holds an amount on several counters at once,
all or none, and ends exactly once: committed, released, or expired and refunded
by `sweep` (which any broker may run). Every commit appends ledger entries in the
same atomic step as the counter change.

Each operation is atomic on its own. Callers pass account and scope names that
budget.scopes has already checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CounterRef:
    """One (scope, period, window) counter."""

    scope: str
    period: str  # budget.periods.Period.spec: "month", "day", "30d", ...
    window: str  # budget.periods.Window.id
    currency: str
    start_ms: int
    end_ms: int

    @property
    def key(self) -> str:
        """The counter's name inside its account (no braces, no spaces: see budget.scopes).

        The currency is part of it, so amounts in two currencies can never add up in one
        counter (an operator who changes a limit's currency starts a new counter).
        """
        return counter_key(self.scope, self.period, self.window, self.currency)


def counter_key(scope: str, period: str, window: str, currency: str) -> str:
    return f"{scope}|{period}|{window}|{currency}"


@dataclass(frozen=True, slots=True)
class Hold:
    """One counter's part of a reservation."""

    counter: CounterRef
    amount: int  # nano-units to hold, >= 0
    limit: int  # the effective limit for this purchase, before credit; the store adds the window's credit
    expire_at_ms: int  # the counter's key may be dropped after this (period end + grace)


@dataclass(frozen=True, slots=True)
class CounterState:
    spent: int = 0
    reserved: int = 0
    credit: int = 0
    count: int = 0

    def remaining(self, limit: int) -> int:
        return max(0, limit + self.credit - self.spent - self.reserved)


# --- reserve outcomes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserved:
    reservation_id: str
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class Denied:
    """Nothing was held: `holds[index]` does not fit. `state` is that counter as it was."""

    index: int
    state: CounterState


@dataclass(frozen=True, slots=True)
class Settled:
    """The idempotency key already finished: its stored result, nothing charged again."""

    result: bytes


@dataclass(frozen=True, slots=True)
class InFlight:
    """The idempotency key has an open reservation (another broker may be buying with it)."""

    reservation_id: str


@dataclass(frozen=True, slots=True)
class StaleLimits:
    """The caller read limits at another version: reload them and try again."""

    version: int


ReserveOutcome = Reserved | Denied | Settled | InFlight | StaleLimits


# --- commit ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One purchased item's cost on one counter: a ledger entry when committed."""

    hold_index: int  # which Hold (counter) of the reservation
    amount: int  # nano-units in the counter's currency (converted against the spender)
    original_amount: str  # decimal string as the Exchange charged it
    original_currency: str
    exchange: str
    offer_id: str
    uri: str


@dataclass(frozen=True, slots=True)
class Committed:
    # Per hold: actual spend above what was held (recorded in full, flagged here), >= 0.
    overage: tuple[int, ...]
    # True when the reservation was already gone (expired and refunded by a sweep):
    # the spend is recorded anyway, since the Exchange is the authority.
    late: bool = False
    # True when this idempotency key had already been committed: nothing was changed.
    duplicate: bool = False
    # Per hold, the counter's numbers right after this commit (empty for a duplicate), so the
    # caller can report them without another read. A report, not part of the outcome's identity.
    states: tuple[CounterState, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: str  # store-assigned, increasing within an account
    account: str
    scope: str
    period: str
    window: str
    amount: int
    currency: str
    original_amount: str
    original_currency: str
    idempotency_key: str
    reservation_id: str
    exchange: str
    offer_id: str
    uri: str
    reserved_at_ms: int
    committed_at_ms: int
    kind: str = "commit"  # "commit", or "journal" for a fail-open spend replayed after an outage

    @property
    def counter_key(self) -> str:
        """The key of the counter this entry was added to."""
        return counter_key(self.scope, self.period, self.window, self.currency)


@dataclass(frozen=True, slots=True)
class Limits:
    """Operator limits set through the admin API, per (scope, period): (currency, nano-units).

    `None` as a value means "removed by an operator" (it overrides the config file too).
    `version` increases on every change.
    """

    version: int
    values: dict[tuple[str, str], tuple[str, int] | None] = field(default_factory=dict)


class StoreUnavailable(Exception):
    """The store did not answer in time or could not be reached. Nothing is known to have changed
    for reads; for writes the outcome is unknown."""


class Store(Protocol):
    async def reserve(
        self, account: str, holds: Sequence[Hold], *, ttl_ms: int, idempotency_key: str,
        now_ms: int, limits_version: int,
    ) -> ReserveOutcome:
        """Hold every amount or none.

        In order: if the account's limits version differs from `limits_version` -> StaleLimits;
        if `idempotency_key` has a committed result -> Settled; if it has an open (unexpired)
        reservation -> InFlight (an expired one is refunded first and the key may reserve again);
        if any hold has spent + reserved + amount > limit + credit -> Denied(first such index);
        else every counter's reserved += amount, and the reservation is recorded to expire at
        now_ms + ttl_ms.
        """
        ...

    async def commit(
        self, account: str, reservation_id: str, holds: Sequence[Hold], lines: Sequence[Line], *,
        idempotency_key: str, result: bytes, now_ms: int,
    ) -> Committed:
        """Settle a reservation with what was actually charged, atomically with the ledger.

        Per hold i: spent += sum(lines for i); reserved -= what the reservation held on it;
        count += 1. The ledger gets one entry per line. The key's result is stored for replay.
        If the reservation is gone (expired and swept), the spend is still recorded (late=True);
        if the key was already committed, nothing changes (duplicate=True). `states` holds every
        hold's counter as the commit left it.
        """
        ...

    async def settled(self, account: str, idempotency_key: str) -> bytes | None:
        """The stored result of a key that was committed, else None (a read; changes nothing)."""
        ...

    async def release(self, account: str, reservation_id: str, *, now_ms: int) -> bool:
        """Return the whole hold and forget the key's reservation. False if it was already gone."""
        ...

    async def sweep(self, account: str, *, now_ms: int, batch: int = 100) -> int:
        """Refund up to `batch` reservations that expired at or before now_ms; returns how many."""
        ...

    async def read(self, account: str, counters: Sequence[CounterRef]) -> list[CounterState]:
        """The counters' current numbers (zeros for a counter never written)."""
        ...

    async def add_credit(self, account: str, counter: CounterRef, amount: int, *, expire_at_ms: int) -> None:
        """Raise one window's limit by `amount` (an operator's top-up)."""
        ...

    async def limits(self, account: str) -> Limits:
        ...

    async def set_limit(
        self, account: str, scope: str, period: str, value: tuple[str, int] | None
    ) -> int:
        """Record an operator's limit (or its removal); returns the new version."""
        ...

    async def record_spend(
        self, account: str, holds: Sequence[Hold], lines: Sequence[Line], *, idempotency_key: str,
        now_ms: int, kind: str,
    ) -> bool:
        """Add spend with no reservation (a fail-open journal replay), once per key.

        Returns False, changing nothing, when this key was already recorded.
        """
        ...

    async def claim(self, account: str, name: str, *, expire_at_ms: int, now_ms: int) -> bool:
        """Claim a once-only marker (an alert that fired, say): True for the first claimer only.

        The claim lasts until `expire_at_ms`; once `now_ms` reaches it, the name may be claimed again.
        """
        ...

    def ledger(self, account: str, *, scope: str | None = None) -> AsyncIterator[LedgerEntry]:
        """Every ledger entry of the account, oldest first."""
        ...

    def counters(self, account: str) -> AsyncIterator[tuple[CounterRef, CounterState]]:
        """Every live counter of the account."""
        ...

    async def overwrite_spent(self, account: str, counter: CounterRef, spent: int, count: int) -> None:
        """Set a counter's spent and count (reconcile --repair)."""
        ...

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        """Cache a small document (e.g. ECB rates) shared by all brokers."""
        ...

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        ...

    async def close(self) -> None:
        ...
