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

A reservation made with an *intent* (the exact requests the broker is about to
send to Exchanges, opaque to the store) may have reached an Exchange, so it is
never refunded blindly: once expired, `sweep` (or a `reserve` of its key) hands it
to the caller to roll forward (re-send the intent, commit what the Exchange says),
extending its expiry by a lease so nobody else works on it meanwhile. An intent
has parts (one per Exchange); each part is committed when its answer arrives and
the last commit finishes the reservation.

A *lease* is budget pre-debited to one broker: `lease` moves an amount out of a
counter's remaining into that broker's lease (it counts in the counter's
`reserved`, and in `leased`), so spent + reserved <= limit + credit still holds
with every lease counted. The broker spends from it in memory and, at each
refresh, reports what it spent (ledger lines, once per idempotency key) and gets
its lease renewed, resized or returned, in the same atomic step. A refresh is
idempotent by the broker's sequence number. A lease whose broker stops
refreshing stays counted (fail closed) until the broker reports again or an
operator releases it.

Each account's data carries an *identity* (id and generation), created once. A
caller that passes the identity it has seen, and per hold the spent high-water
mark it has seen (Hold.floor), gets `Lost` (or StoreLost) from a store that shows
less: one that was emptied, replaced, or restored from an older copy.

Each operation is atomic on its own. Callers pass account and scope names that
budget.scopes has already checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


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


def counter_record(c: CounterRef) -> dict[str, Any]:
    """dataclasses.asdict(c), built directly: asdict deep-copies field by field, on every purchase."""
    return {"scope": c.scope, "period": c.period, "window": c.window, "currency": c.currency,
            "start_ms": c.start_ms, "end_ms": c.end_ms}


@dataclass(frozen=True, slots=True)
class Hold:
    """One counter's part of a reservation."""

    counter: CounterRef
    amount: int  # nano-units to hold, >= 0
    limit: int  # the effective limit for this purchase, before credit; the store adds the window's credit
    expire_at_ms: int  # the counter's key may be dropped after this (period end + grace)
    # The highest `spent` the caller has seen on this counter: a store showing less lost data.
    floor: int = 0


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """Who an account's data is: created with it, never recreated silently. An operator who
    adopts a store (after a loss, or a repair) raises the generation."""

    id: str
    generation: int = 1


@dataclass(frozen=True, slots=True)
class CounterState:
    spent: int = 0
    reserved: int = 0  # held by reservations and leases
    credit: int = 0
    count: int = 0
    leased: int = field(default=0, compare=False)  # the part of `reserved` leased to brokers

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


# A sweep's lease on a handed-over hold doubles with each hand-over, at most this many times.
LEASE_DOUBLINGS = 6


def lease_for(lease_ms: int, attempts: int) -> int:
    """The lease of a hold handed over after `attempts` earlier hand-overs (backoff)."""
    return lease_ms << min(attempts, LEASE_DOUBLINGS)


@dataclass(frozen=True, slots=True)
class UnsettledHold:
    """A reservation with an intent that may have reached an Exchange, handed over to be rolled
    forward (its expiry extended by the caller's lease while it does)."""

    reservation_id: str
    idempotency_key: str
    intent: bytes
    created_ms: int
    expires_ms: int
    owner: str  # the broker instance that made it
    attempts: int  # how many times it has been handed over
    # Parts already committed, with the answer each was committed with.
    done: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsettled:
    """The idempotency key's hold expired with an intent: roll it forward, never re-plan it."""

    hold: UnsettledHold


@dataclass(frozen=True, slots=True)
class Lost:
    """The store does not show what the caller has seen of it: nothing was changed."""

    problem: str


ReserveOutcome = Reserved | Denied | Settled | InFlight | StaleLimits | Unsettled | Lost


@dataclass(frozen=True, slots=True)
class Swept:
    refunded: int  # expired reservations without an intent, refunded
    unsettled: tuple[UnsettledHold, ...] = ()  # expired ones with an intent, handed to the caller


# --- leases -------------------------------------------------------------------------


# How long a counter asks its lease holders to give back unused budget after a denial.
RECLAIM_MS = 30_000


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """One counter in a lease refresh: what the broker wants leased to it from now on."""

    hold: Hold  # the counter, its effective limit, expiry and floor (`amount` is unused)
    want: int  # nano-units: the lease after this refresh (0: return it all); granted up to remaining


@dataclass(frozen=True, slots=True)
class LeaseSpend:
    """One purchase a broker made on its leases: recorded once per idempotency key."""

    idempotency_key: str
    lines: tuple[Line, ...]  # hold_index: the LeaseAsk it is on
    result: bytes  # the key's answer, for replay by any broker


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    granted: int  # this broker's lease on the counter now
    state: CounterState  # the counter after the refresh (its `reserved` includes every lease)
    holders: int  # brokers holding a lease on this counter now (this one included)
    reclaim: bool  # a purchase was denied while leases held budget: give back what is unused


@dataclass(frozen=True, slots=True)
class Leased:
    grants: tuple[LeaseGrant, ...]  # per LeaseAsk
    duplicates: tuple[str, ...]  # keys already recorded (by another broker, or an earlier refresh)
    seq: int  # the broker's sequence number now
    # False: `seq` was not above the broker's last one, nothing of this refresh was applied (its
    # spends not recorded); the grants are what the store holds. The broker resends above `seq`.
    applied: bool = True


LeaseOutcome = Leased | StaleLimits | Lost


@dataclass(frozen=True, slots=True)
class BrokerLease:
    """A broker's lease on one counter, as the store keeps it."""

    broker: str
    counter: CounterRef
    granted: int
    seq: int  # the broker's last refresh
    expires_ms: int  # the broker's leases are due for a refresh by then


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
    # A final commit refused because these parts are neither committed nor said to have charged
    # nothing: nothing was changed, and the reservation (with their holds) stays open.
    unsettled_parts: tuple[int, ...] = ()


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
    for reads; for writes the outcome is unknown, unless `not_sent`: the call certainly changed
    nothing (it never reached the store, or the store rolled it back)."""

    def __init__(self, *args: object, not_sent: bool = False) -> None:
        super().__init__(*args)
        self.not_sent = not_sent


class StoreLost(StoreUnavailable):
    """The store does not show what the caller has seen of it (a write checked against an identity
    or a floor): nothing was changed. Spend must be kept elsewhere until an operator adopts it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args, not_sent=True)


class Store(Protocol):
    async def reserve(
        self, account: str, holds: Sequence[Hold], *, ttl_ms: int, idempotency_key: str,
        now_ms: int, limits_version: int, intent: bytes = b"", owner: str = "",
        identity: StoreIdentity | None = None,
    ) -> ReserveOutcome:
        """Hold every amount or none.

        In order: if `identity` is given and the account's differs (missing, another id, an
        older generation) -> Lost; if the account's limits version differs from
        `limits_version` -> StaleLimits; if `idempotency_key` has a committed result -> Settled;
        if it has an open reservation: unexpired -> InFlight, expired with an intent -> Unsettled
        (handed over: its expiry becomes now_ms + ttl_ms), expired without -> refunded, and the
        key may reserve again; if any counter's spent is below its hold's floor -> Lost; if any
        hold has spent + reserved + amount > limit + credit -> Denied(first such index); else
        every counter's reserved += amount, and the reservation is recorded (with `intent` and
        `owner`) to expire at now_ms + ttl_ms.
        """
        ...

    async def commit(
        self, account: str, reservation_id: str, holds: Sequence[Hold], lines: Sequence[Line], *,
        idempotency_key: str, result: bytes, now_ms: int, part: int = 0, release: Sequence[int] = (),
        final: bool = True, identity: StoreIdentity | None = None, parts: int = 1,
        nothing_charged: Sequence[int] = (),
    ) -> Committed:
        """Settle one part of a reservation with what was actually charged, atomically with the ledger.

        Unless the part was committed before: per hold i, spent += sum(lines for i) and the
        ledger gets one entry per line; reserved -= release[i] (at most what the reservation
        still holds there; without `release`, everything it holds), and the part is recorded
        with `result` (its answer). With `final`, the reservation then ends: whatever it still
        holds is refunded, count += 1, and `result` is stored as the key's answer for replay.
        A final commit settles only what it is told about: every other part of the reservation's
        `parts` (0 .. parts-1) must be committed already or listed in `nothing_charged` (answered,
        nothing charged: their holds may go back); else nothing changes and `unsettled_parts`
        names the others, whose holds stay until they are rolled forward (a part whose commit did
        not land is never released by another part's commit).
        If the reservation is gone (refunded), the spend is still recorded (late=True); if the key
        was already committed, nothing changes (duplicate=True). `states` holds every hold's
        counter as the commit left it. StoreLost (changing nothing) if `identity` is given and
        differs, or a counter is below its hold's floor.
        """
        ...

    async def settled(self, account: str, idempotency_key: str) -> bytes | None:
        """The stored result of a key that was committed, else None (a read; changes nothing)."""
        ...

    async def release(self, account: str, reservation_id: str, *, now_ms: int) -> bool:
        """Return the whole hold and forget the key's reservation. False if it was already gone."""
        ...

    async def sweep(
        self, account: str, *, now_ms: int, batch: int = 100, lease_ms: int = 0, taker: str = "",
        reclaim: bool = False,
    ) -> Swept:
        """Refund up to `batch` reservations without an intent that expired at or before now_ms,
        and hand over (up to `batch`) expired ones with an intent: each one's expiry becomes
        now_ms + lease_ms * 2**min(attempts, LEASE_DOUBLINGS) (attempts: hand-overs before this
        one) and its attempts count grows, so no other sweeper takes it meanwhile, and an
        Exchange that keeps not answering is asked less and less often.
        With `reclaim`, the taker's own reservations with an intent are handed over even before
        they expire (a broker that restarted: nothing of its own is in flight any more). A handed
        over reservation's owner becomes its taker.
        """
        ...

    async def holds(self, account: str) -> list[UnsettledHold]:
        """Every open reservation with an intent (a read: nothing is handed over)."""
        ...

    async def identity(self, account: str) -> StoreIdentity | None:
        """The account's identity, or None for data never initialised (or lost)."""
        ...

    async def set_identity(
        self, account: str, identity: StoreIdentity, *, replace: bool = False
    ) -> StoreIdentity:
        """Initialise the account's identity if it has none (or, with `replace`, overwrite it: an
        operator adopting the store); returns the identity the account has now."""
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
        now_ms: int, kind: str, identity: StoreIdentity | None = None, result: bytes = b"",
    ) -> bool:
        """Add spend with no reservation (a fail-open journal replay), once per key; `result` is
        kept as the key's answer for replay (empty: the spend is known, its answer is not).

        Returns False, changing nothing, when this key was already recorded.
        """
        ...

    async def lease(
        self, account: str, broker: str, seq: int, asks: Sequence[LeaseAsk], spends: Sequence[LeaseSpend], *,
        ttl_ms: int, now_ms: int, limits_version: int, identity: StoreIdentity | None = None,
    ) -> LeaseOutcome:
        """Refresh `broker`'s leases on the asked counters, all in one atomic step.

        In order: identity (Lost), limits version (StaleLimits), floors (Lost); if `seq` is not
        above the broker's last one, nothing changes and the current grants are returned (a
        refresh that landed unseen). Else each spend whose key is not yet recorded adds its
        lines (spent, ledger kind "lease") and records the key with its result; then, per
        ask, the broker's old lease is given back and min(want, remaining) leased again.
        The broker's leases are due for a refresh by now_ms + ttl_ms. A denial with leases
        outstanding (here, a want not granted in full while other brokers hold leases; or a
        `reserve` Denied on a counter with leases) flags the counter for reclaim for a while.
        """
        ...

    async def leases(self, account: str) -> list[BrokerLease]:
        """Every broker's lease of the account (a read)."""
        ...

    async def release_leases(self, account: str, broker: str, *, as_spent: bool, now_ms: int) -> int:
        """An operator ends a broker's leases (a broker that will not come back): given back to the
        counters, or with `as_spent` counted as spent (ledger kind "lease-expired"). Returns how
        much was released, in nano-units summed over counters."""
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
