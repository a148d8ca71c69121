"""The per-period layer: operator limits per scope and period, held in a store.

A purchase is charged to several scopes at once (the agent's mandatory ones and
the one it names, or its billing scope); each scope has one or more limits, one
per period. Every (scope, period, window) is a counter in the store, and one
reservation holds the cost on all of them at once, or on none.

Limits come from the config file, overridden per (scope, period) by operators
through the admin API (kept in the store with a version number: a reservation
made with stale limits is refused by the store and retried with fresh ones, so a
change takes effect on the very next reservation, on every broker). A request's
`period_budget` only ever tightens.

When the store is unreachable, a scope's failure policy decides: `closed` denies
(UNAVAILABLE, within the store timeout); `open` lets this broker spend up to the
scope's allowance, journaled locally and replayed into the store once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar
from zoneinfo import ZoneInfo

from budget.clock import Clock
from budget.journal import Journal
from budget.layers import (
    OPEN_ALLOWANCE,
    BudgetExhausted,
    Layer,
    Snapshot,
    exhausted_reason,
    next_action,
)
from budget.periods import Period, PeriodError, Window, to_ms
from budget.store import (
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    Limits,
    Line,
    Reserved,
    Settled,
    StaleLimits,
    Store,
    StoreUnavailable,
)
from currency.convert import Converter, convert
from currency.money import Money, MoneyError, total

log = logging.getLogger(__name__)

_STALE_RETRIES = 3
_SKIP_AFTER_FAILURE_S = 1.0
T = TypeVar("T")


def close_awaitable(call: Awaitable[object]) -> None:
    if isinstance(call, Coroutine):
        call.close()  # never awaited: no "coroutine was never awaited" warning


class StoreDown(Exception):
    """The store cannot be reached and a charged scope fails closed (UNAVAILABLE)."""

    def __init__(self, message: str, scopes: Sequence[str] = (), reason: str = "store_unavailable") -> None:
        super().__init__(message)
        self.scope = ",".join(scopes)
        self.reason = reason


class KeyInFlight(Exception):
    """Another broker holds an open reservation under this idempotency key (ABORTED)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.scope = key


class AlreadySettled(Exception):
    """The idempotency key was committed before (by this or another broker): replay its result."""

    def __init__(self, result: bytes) -> None:
        super().__init__("already settled")
        self.result = result


class LimitChangeRefused(Exception):
    """An operator's limit change that would lose track of money (FAILED_PRECONDITION)."""

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope


class OpenAllowanceExhausted(BudgetExhausted):
    """A fail-open scope's local allowance is used up while the store is unreachable."""


class PeriodEvents(Protocol):
    """What the layer reports as it happens (the broker's metrics implement this)."""

    def refunded(self, count: int) -> None:
        """`count` expired reservations were refunded by this broker's sweeper."""

    def overage(self) -> None:
        """A commit recorded more than its reservation held."""

    def late_commit(self) -> None:
        """A commit arrived after its reservation had expired and been refunded."""

    def fail_open_spend(self) -> None:
        """A purchase spent from a fail-open allowance while the store was unreachable."""


class NoEvents:
    def refunded(self, count: int) -> None:
        pass

    def overage(self) -> None:
        pass

    def late_commit(self) -> None:
        pass

    def fail_open_spend(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ScopeRule:
    limits: Mapping[str, tuple[Period, Money]] = field(default_factory=dict)
    failure: str = "closed"
    open_allowance: Money | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    """What one purchase is charged to, as authorization decided it."""

    account: str
    scopes: tuple[str, ...]
    # The scope a request's period_budget tightens (the named one, or the billing scope).
    target: str | None = None
    tighten: Money | None = None
    tighten_period: Period | None = None


@dataclass(frozen=True, slots=True)
class Counter:
    ref: CounterRef
    window: Window
    limit: Money  # before the window's credit
    failure: str


@dataclass(frozen=True, slots=True)
class Plan:
    account: str
    counters: tuple[Counter, ...]
    version: int
    scopes: tuple[str, ...]

    def fails_open(self) -> bool:
        return bool(self.counters) and all(c.failure == "open" for c in self.counters)


@dataclass(frozen=True, slots=True)
class ItemSpend:
    """One bought item: as the Exchange charged it, and in the purchase's currency."""

    exchange: str
    offer_id: str
    uri: str
    original: Money
    charged: Money  # in the currency the reservation was made in (rounded up)


@dataclass
class PeriodHold:
    plan: Plan
    holds: tuple[Hold, ...]
    key: str
    reservation_id: str | None  # None: held on the local fail-open allowance
    settled: bool = False

    @property
    def local(self) -> bool:
        return self.reservation_id is None


class PeriodLayer:
    def __init__(
        self, store: Store, accounts: Mapping[str, Mapping[str, ScopeRule]], *, clock: Clock,
        tz: ZoneInfo, converter: Converter, ttl_s: int, grace_s: int, journal: Journal | None,
        events: PeriodEvents | None = None,
    ) -> None:
        self.store = store
        self.events = events or NoEvents()
        self.accounts = accounts
        self._clock = clock
        self._tz = tz
        self._converter = converter
        self._ttl_ms = ttl_s * 1000
        self._grace_ms = grace_s * 1000
        self._journal = journal
        self._limits: dict[str, Limits] = {}
        # Fail-open spends not yet in the store, plus open local holds, per scope.
        self._local_holds: list[PeriodHold] = []
        # After a store failure, purchases skip the store for a moment instead of each
        # waiting out its own timeout; upkeep keeps probing.
        self._skip_until = 0.0

    async def _guarded(self, call: Awaitable[T]) -> T:
        if self._clock.monotonic() < self._skip_until:
            close_awaitable(call)
            raise StoreUnavailable("the budget store failed moments ago")
        try:
            return await call
        except StoreUnavailable:
            self._skip_until = self._clock.monotonic() + _SKIP_AFTER_FAILURE_S
            raise

    # --- limits ----------------------------------------------------------------

    def rule(self, account: str, scope: str) -> ScopeRule:
        return self.accounts.get(account, {}).get(scope, ScopeRule())

    async def _load_limits(self, account: str) -> Limits:
        limits = await self.store.limits(account)
        self._limits[account] = limits
        return limits

    async def set_limit(self, account: str, scope: str, period: Period, limit: Money | None) -> None:
        """An operator's new limit (None removes it), effective on the next reservation.

        Changing a limit's currency starts a new counter, so it is refused while the current
        window of the old one has money spent or held: that money would stop counting.
        """
        own = self.scope_limits(account, scope, await self._load_limits(account))
        old = own.get(period.spec)
        if old is not None and limit is not None and old[1].currency != limit.currency:
            ref, window = self._counter(scope, period, old[1].currency, self._clock.now())
            (state,) = await self.store.read(account, [ref])
            if state.spent or state.reserved:
                raise LimitChangeRefused(
                    f"the {period.spec} limit of {scope} is in {old[1].currency} and its current window "
                    f"has {Money.from_units(state.spent, old[1].currency)} spent and "
                    f"{Money.from_units(state.reserved, old[1].currency)} reserved; keep "
                    f"{old[1].currency} until the window ends at {window.end.isoformat()}", scope)
        value = None if limit is None else (limit.currency, limit.units())
        await self.store.set_limit(account, scope, period.spec, value)
        await self._load_limits(account)

    async def add_credit(self, account: str, scope: str, period: Period, amount: Money) -> None:
        """Top up the current window of one of the scope's limits."""
        own = self.scope_limits(account, scope, await self._load_limits(account))
        if period.spec not in own:
            raise PeriodError("period", f"scope {scope} has no {period.spec} limit to credit")
        limit = own[period.spec][1]
        if amount.currency != limit.currency:
            raise MoneyError("amount.currency", f"the {period.spec} limit of {scope} is in "
                             f"{limit.currency}; credit it in {limit.currency}")
        ref, window = self._counter(scope, period, limit.currency, self._clock.now())
        await self.store.add_credit(account, ref, amount.units(), expire_at_ms=window.end_ms + self._grace_ms)

    async def limits_for(self, account: str) -> Limits:
        cached = self._limits.get(account)
        if cached is not None:
            return cached
        try:
            return await self._load_limits(account)
        except StoreUnavailable:
            # Config limits until upkeep reloads them; the store refuses a reservation made
            # with this version (StaleLimits) once it is back, so nothing runs on them for long.
            self._limits[account] = Limits(version=-1)
            return self._limits[account]

    def scope_limits(self, account: str, scope: str, limits: Limits) -> dict[str, tuple[Period, Money]]:
        """The operator's limits of one scope: the config file's, overridden through the admin API."""
        merged = dict(self.rule(account, scope).limits)
        for (s, spec), value in limits.values.items():
            if s != scope:
                continue
            if value is None:
                merged.pop(spec, None)
            else:
                merged[spec] = (Period.parse(spec, "period"), Money.from_units(value[1], value[0]))
        return merged

    # --- planning ------------------------------------------------------------

    async def plan(self, charge: Charge) -> Plan:
        limits = await self.limits_for(charge.account)
        return self._plan(charge, limits)

    def _plan(self, charge: Charge, limits: Limits) -> Plan:
        at = self._clock.now()
        counters: list[Counter] = []
        for scope in charge.scopes:
            rule = self.rule(charge.account, scope)
            own = self.scope_limits(charge.account, scope, limits)
            if scope == charge.target and charge.tighten is not None:
                own = self._tightened(own, charge.tighten, charge.tighten_period)
            for spec in sorted(own):
                period, limit = own[spec]
                ref, window = self._counter(scope, period, limit.currency, at)
                counters.append(Counter(ref, window, limit, rule.failure))
        return Plan(charge.account, tuple(counters), limits.version, charge.scopes)

    def _counter(self, scope: str, period: Period, currency: str, at: datetime) -> tuple[CounterRef, Window]:
        """The counter of `scope`'s `period` limit that the instant `at` falls in."""
        window = period.window(at, self._tz)
        return CounterRef(scope, period.spec, window.id, currency, window.start_ms, window.end_ms), window

    def _tightened(
        self, own: dict[str, tuple[Period, Money]], cap: Money, period: Period | None
    ) -> dict[str, tuple[Period, Money]]:
        out = dict(own)
        if period is None and not own:
            raise PeriodError("constraints.budget_period", "is required: the scope has no operator "
                              "period limit for period_budget to tighten")
        targets = [period.spec] if period is not None else list(own)
        for spec in targets:
            if spec in out:
                p, limit = out[spec]
                # The agent's cap in the limit's currency, rounded down: only ever tighter.
                agent = convert(cap, limit.currency, self._converter, round_up=False)
                out[spec] = (p, min(limit, agent))
            else:
                assert period is not None
                out[spec] = (period, cap)
        return out

    # --- reading ---------------------------------------------------------------

    async def snapshots(self, plan: Plan) -> list[Snapshot]:
        if not plan.counters:
            return []
        try:
            states = await self._guarded(self.store.read(plan.account, [c.ref for c in plan.counters]))
        except StoreUnavailable:
            if plan.fails_open():
                return self._local_snapshots(plan)
            raise self._down(plan) from None
        return [self._snapshot(plan.account, c, s) for c, s in zip(plan.counters, states, strict=True)]

    def _snapshot(self, account: str, c: Counter, s: CounterState) -> Snapshot:
        cur = c.ref.currency
        return Snapshot(
            account=account, layer=Layer.PERIOD, scope=c.ref.scope,
            limit=c.limit + Money.from_units(s.credit, cur),
            spent=Money.from_units(s.spent, cur), reserved=Money.from_units(s.reserved, cur),
            transaction_count=s.count, as_of=self._clock.now(), period_start=c.window.start,
            period_end=c.window.end, period=c.ref.period, failure_policy=c.failure,
        )

    def _local_snapshots(self, plan: Plan) -> list[Snapshot]:
        """While the store is down: what this broker may still spend on each fail-open scope."""
        snaps = []
        for scope in dict.fromkeys(c.ref.scope for c in plan.counters):
            allowance = self.rule(plan.account, scope).open_allowance
            assert allowance is not None
            used = self._local_used(plan.account, scope, allowance.currency)
            zero = Money.zero(allowance.currency)
            snaps.append(Snapshot(
                account=plan.account, layer=Layer.PERIOD, scope=scope, limit=allowance, spent=used,
                reserved=zero,
                transaction_count=0, as_of=self._clock.now(), period=OPEN_ALLOWANCE,
                failure_policy="open",
            ))
        return snaps

    def _local_used(self, account: str, scope: str, currency: str) -> Money:
        """What this broker spent or holds on `scope` without the store: journaled spends not
        yet replayed, and open local holds (each counted once, on the scope's first counter)."""
        used = Money.zero(currency)
        pending = self._journal.pending() if self._journal else []
        for entry in pending:
            first = _first_hold(entry.holds, scope) if entry.account == account else None
            if first is not None:
                units = sum(ln.amount for ln in entry.lines if ln.hold_index == first)
                used = used + self._in(units, entry.holds[first].counter.currency, currency)
        for hold in self._local_holds:
            first = _first_hold(hold.holds, scope) if hold.plan.account == account else None
            if first is not None:
                h = hold.holds[first]
                used = used + self._in(h.amount, h.counter.currency, currency)
        return used

    def _in(self, units: int, source: str, currency: str) -> Money:
        return convert(Money.from_units(units, source), currency, self._converter)

    # --- reserving ---------------------------------------------------------------

    async def reserve(self, charge: Charge, plan: Plan, cost: Money, key: str) -> PeriodHold | None:
        """Hold `cost` on every counter of the plan, or raise. None when no period limit applies."""
        for _ in range(_STALE_RETRIES):
            if not plan.counters:
                return None
            now_ms = to_ms(self._clock.now())
            holds = tuple(
                Hold(c.ref, convert(cost, c.ref.currency, self._converter).units(), c.limit.units(),
                     c.window.end_ms + self._grace_ms)
                for c in plan.counters
            )
            try:
                outcome = await self._guarded(self.store.reserve(
                    plan.account, holds, ttl_ms=self._ttl_ms, idempotency_key=key, now_ms=now_ms,
                    limits_version=plan.version,
                ))
            except StoreUnavailable:
                if plan.fails_open():
                    return self._reserve_locally(plan, holds, cost, key)
                raise self._down(plan) from None
            if isinstance(outcome, Reserved):
                return PeriodHold(plan, holds, key, outcome.reservation_id)
            if isinstance(outcome, Denied):
                c = plan.counters[outcome.index]
                snap = self._snapshot(plan.account, c, outcome.state)
                raise BudgetExhausted.from_snapshot(
                    snap, Money.from_units(holds[outcome.index].amount, c.ref.currency),
                    reason="period_budget_exhausted", next_action=next_action(snap),
                )
            if isinstance(outcome, Settled):
                raise AlreadySettled(outcome.result)
            if isinstance(outcome, InFlight):
                raise KeyInFlight(
                    f"a purchase with idempotency key {key!r} is still in progress; retry shortly", key)
            assert isinstance(outcome, StaleLimits)
            plan = self._plan(charge, await self._load_limits(plan.account))
        raise StoreDown("operator limits kept changing during the reservation; retry", plan.scopes,
                        reason="limits_kept_changing")

    async def replay_if_settled(self, plan: Plan, key: str) -> None:
        """Raise AlreadySettled when `key` was committed before: a retry is answered, not denied."""
        if not plan.counters:
            return
        try:
            stored = await self._guarded(self.store.settled(plan.account, key))
        except StoreUnavailable:
            return  # the denial stands; the agent retries later
        if stored is not None:
            raise AlreadySettled(stored)

    def _reserve_locally(self, plan: Plan, holds: tuple[Hold, ...], cost: Money, key: str) -> PeriodHold:
        for snap in self._local_snapshots(plan):
            need = convert(cost, snap.limit.currency, self._converter)
            if snap.spent + need > snap.limit:
                raise OpenAllowanceExhausted.from_snapshot(
                    snap, need, reason=exhausted_reason(snap), next_action=next_action(snap),
                )
        hold = PeriodHold(plan, holds, key, None)
        self._local_holds.append(hold)
        log.warning("budget store unreachable: scopes %s spend from the fail-open allowance",
                    ", ".join(plan.scopes))
        return hold

    def _down(self, plan: Plan) -> StoreDown:
        closed = sorted({c.ref.scope for c in plan.counters if c.failure != "open"})
        return StoreDown(f"the budget store is unreachable and scope {', '.join(closed)} fails "
                         "closed; retry later", closed)

    # --- settling ------------------------------------------------------------------

    async def commit(
        self, hold: PeriodHold, items: Sequence[ItemSpend], result: bytes
    ) -> list[Snapshot] | None:
        """Record what was bought; returns every counter's numbers after the commit, when known."""
        if hold.settled:
            raise RuntimeError("period reservation settled twice")
        if not items:
            await self.release(hold)
            return None
        hold.settled = True
        lines = tuple(
            Line(i, amount, item.original.text(), item.original.currency, item.exchange,
                 item.offer_id, item.uri)
            for i, h in enumerate(hold.holds)
            for item, amount in zip(items, self._split(items, h.counter.currency), strict=True)
        )
        now_ms = to_ms(self._clock.now())
        if hold.local:
            assert self._journal is not None
            await self._journal.append(hold.plan.account, hold.key, hold.holds, lines, now_ms)
            self._local_holds.remove(hold)
            self.events.fail_open_spend()
            return None
        assert hold.reservation_id is not None
        try:
            done = await self.store.commit(
                hold.plan.account, hold.reservation_id, hold.holds, lines,
                idempotency_key=hold.key, result=result, now_ms=now_ms,
            )
        except StoreUnavailable:
            # The spend happened: keep it in the journal and replay it, never drop it.
            if self._journal is None:
                raise
            await self._journal.append(hold.plan.account, hold.key, hold.holds, lines, now_ms)
            log.warning("budget store unreachable at commit; spend of %r journaled", hold.key)
            return None
        for h, over in zip(hold.holds, done.overage, strict=True):
            if over:
                log.warning("overage on %s: %s above the reservation", h.counter.key,
                            Money.from_units(over, h.counter.currency))
        if any(done.overage):
            self.events.overage()
        if done.late:
            self.events.late_commit()
            log.warning("reservation %s expired before its commit; spend recorded late",
                        hold.reservation_id)
        if len(done.states) != len(hold.plan.counters):
            return None
        return [self._snapshot(hold.plan.account, c, s)
                for c, s in zip(hold.plan.counters, done.states, strict=True)]

    def _split(self, items: Sequence[ItemSpend], currency: str) -> list[int]:
        """Each item's share of the batch total in `currency`, rounded once, like the hold.

        Rounding every item up on its own could commit a few nano-units more than was held
        for the same charges; instead the items are rounded down and the last one takes the
        difference to the total rounded up.
        """
        exact_total = convert(total((i.charged for i in items), items[0].charged.currency),
                              currency, self._converter).units()
        shares = [convert(i.charged, currency, self._converter, round_up=False).units() for i in items]
        shares[-1] += exact_total - sum(shares)
        return shares

    async def release(self, hold: PeriodHold) -> None:
        if hold.settled:
            raise RuntimeError("period reservation settled twice")
        hold.settled = True
        if hold.local:
            self._local_holds.remove(hold)
            return
        assert hold.reservation_id is not None
        try:
            await self.store.release(hold.plan.account, hold.reservation_id,
                                     now_ms=to_ms(self._clock.now()))
        except StoreUnavailable:
            # The sweeper refunds it after its TTL.
            log.warning("budget store unreachable at release; reservation %s expires on its own",
                        hold.reservation_id)

    # --- upkeep ----------------------------------------------------------------------

    async def replay_journal(self) -> int:
        """Record fail-open spends in the store, each exactly once; returns how many were sent."""
        if self._journal is None:
            return 0
        sent = 0
        for entry in self._journal.pending():
            await self.store.record_spend(
                entry.account, entry.holds, entry.lines, idempotency_key=entry.store_key,
                now_ms=entry.at_ms, kind="journal",
            )
            await self._journal.ack(entry.id)
            sent += 1
        return sent

    async def upkeep(self) -> None:
        """One round of the background work every broker does: sweep, replay, refresh limits."""
        now_ms = to_ms(self._clock.now())
        for account in self.accounts:
            refunded = await self.store.sweep(account, now_ms=now_ms)
            self.events.refunded(refunded)
            if refunded:
                log.info("refunded %d expired reservation(s) in account %s", refunded, account)
        self._skip_until = 0.0  # the store answered the sweep: purchases may use it again
        replayed = await self.replay_journal()
        if replayed:
            log.info("replayed %d fail-open spend(s) into the store", replayed)
        for account in list(self._limits):
            await self._load_limits(account)

    async def run_upkeep(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.upkeep()
            except StoreUnavailable as exc:
                log.warning("budget upkeep skipped: store unreachable (%s)", exc)
            except Exception:
                log.exception("budget upkeep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


def _first_hold(holds: Sequence[Hold], scope: str) -> int | None:
    return next((i for i, h in enumerate(holds) if h.counter.scope == scope), None)
