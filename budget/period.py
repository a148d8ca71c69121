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
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol, TypeVar
from zoneinfo import ZoneInfo

from budget.durability.guard import StoreGuard
from budget.durability.intents import Intent, IntentPart, PartOrder
from budget.durability.journal import Journal, JournalEntry
from budget.durability.memory import StoreMemory
from budget.layers import (
    OPEN_ALLOWANCE,
    BudgetExhausted,
    Layer,
    Snapshot,
    exhausted_reason,
    next_action,
)
from budget.leases import TIERS, LeaseBook, LeaseHold
from budget.periods import Period, PeriodError, Window, from_ms, to_ms
from budget.stores.contract import (
    Committed,
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    Limits,
    Line,
    Lost,
    Reserved,
    Settled,
    StaleLimits,
    Store,
    StoreLost,
    StoreUnavailable,
    Unsettled,
    UnsettledHold,
)
from common.clock import Clock
from currency.convert import Converter, convert
from currency.money import Money, MoneyError, total

log = logging.getLogger(__name__)

_STALE_RETRIES = 3
_SKIP_AFTER_FAILURE_S = 1.0
# How long a clean shutdown waits for Exchanges to settle lease purchases a crash cut off.
_SETTLE_AT_CLOSE_S = 5.0
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


class OutcomePending(Exception):
    """An Exchange may have been asked to charge for this key (or its hold, with the request it
    would send, may have reached the store and be rolled forward), and the outcome is not known
    yet: retry with the same key, never a new one (ABORTED outcome_pending)."""

    reason = "outcome_pending"

    def __init__(self, message: str, key: str, layer: str, retry_at: datetime | None = None) -> None:
        super().__init__(message)
        self.scope = key
        self.layer = layer  # "store" or "exchange": where the outcome is unknown
        self.retry_at = retry_at


def in_flight(key: str) -> KeyInFlight:
    """`key`: the store's (`<agent id>#<key>`); the caller is told its own part."""
    own = key.partition("#")[2] or key
    return KeyInFlight(f"a purchase with idempotency key {own!r} is still in progress; retry shortly", own)


class HoldUnsettled(Exception):
    """The idempotency key has a hold that may have reached an Exchange and was handed to this
    caller: roll it forward with its stored intent (never re-plan the purchase)."""

    def __init__(self, account: str, hold: UnsettledHold) -> None:
        super().__init__("unsettled hold handed over")
        self.account = account
        self.hold = hold


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

    def over_limit(self) -> None:
        """A commit left a counter's spend above its limit (an overage, or a late commit)."""

    def store_lost(self) -> None:
        """An account's store showed less than this broker had seen of it: refused from now on."""


class NoEvents:
    def refunded(self, count: int) -> None:
        pass

    def overage(self) -> None:
        pass

    def late_commit(self) -> None:
        pass

    def fail_open_spend(self) -> None:
        pass

    def over_limit(self) -> None:
        pass

    def store_lost(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ScopeRule:
    limits: Mapping[str, tuple[Period, Money]] = field(default_factory=dict)
    failure: str = "closed"
    open_allowance: Money | None = None
    mode: str = "strict"  # or "lease": spent from this broker's pre-debited leases (budget.leases)
    tier: str = "standard"  # how strict a lease's end game is: standard, prepaid, postpaid
    pacing: bool = False  # purchases admitted to keep spend on an even curve (budget.pacing)


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
    mode: str = "strict"
    tier: str = "standard"
    pacing: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    account: str
    counters: tuple[Counter, ...]
    version: int
    scopes: tuple[str, ...]

    def fails_open(self) -> bool:
        return bool(self.counters) and all(c.failure == "open" for c in self.counters)

    def leased(self) -> bool:
        """Every counter is spent from leases (a plan that mixes modes reserves in the store)."""
        return bool(self.counters) and all(c.mode == "lease" for c in self.counters)


@dataclass(frozen=True, slots=True)
class ItemSpend:
    """One bought item: as the Exchange charged it, and in the purchase's currency."""

    exchange: str
    offer_id: str
    uri: str
    original: Money
    charged: Money  # in the currency the reservation was made in (rounded up)


# A journaled intent settled with its Exchanges: what they charged, and the key's stored answer.
LocalSettlement = tuple[list[ItemSpend], bytes]


@dataclass
class PeriodHold:
    plan: Plan
    holds: tuple[Hold, ...]
    key: str
    reservation_id: str | None  # None: held on the local fail-open allowance
    settled: bool = False
    # Per part (one per Exchange), what it holds on each counter; one part when no intent.
    part_holds: tuple[tuple[int, ...], ...] = ()
    done: set[int] = field(default_factory=set)  # parts committed
    local_lines: tuple[Line, ...] = ()  # a fail-open or lease hold's spend, journaled at its final commit
    journal_id: str | None = None  # a fail-open hold's intent entry in the journal
    lease: LeaseHold | None = None  # held on this broker's leases, not in the store

    @property
    def local(self) -> bool:
        """Held on the fail-open allowance (nothing of it in the store)."""
        return self.reservation_id is None and self.lease is None

    @property
    def parts(self) -> int:
        return max(1, len(self.part_holds))


@dataclass(frozen=True, slots=True)
class _CachedPlan:
    """A plan, valid while its limits are the account's current ones and now is in its windows."""

    plan: Plan
    limits: Limits
    start: datetime
    end: datetime


_PLAN_CACHE = 10_000  # charges whose plans are kept (the oldest planned goes first)
_PLAN_WITHOUT_WINDOW = timedelta(seconds=1)  # a plan with no counters: looked at again after this


class PeriodLayer:
    def __init__(
        self, store: Store, accounts: Mapping[str, Mapping[str, ScopeRule]], *, clock: Clock,
        tz: ZoneInfo, converter: Converter, ttl_s: int, grace_s: int, journal: Journal | None,
        events: PeriodEvents | None = None, memory: StoreMemory | None = None, lease_s: float = 0.0,
        leases: LeaseBook | None = None, failure_domain: Callable[[str], str] | None = None,
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
        # waiting out its own timeout; upkeep keeps probing. Per failure domain: the accounts that
        # fail together (one Redis Cluster shard; by default the whole store).
        self._skip_until: dict[str, float] = {}
        self._probing: set[str] = set()  # failure domains with a probing call under way
        self._domain = failure_domain or _whole_store
        # What this broker has seen of the store, and the accounts whose store shows less.
        self.guard = StoreGuard(store, memory, self.events, self._guarded)
        # Pre-debited leases for scopes in lease mode (None: every scope is strict).
        self.leases = leases
        # How long a sweeper may work on a hold handed to it before another may take it (the
        # store doubles it on each further hand-over).
        self._lease_ms = int(lease_s * 1000) or self._ttl_ms
        # Roll an unsettled hold (a journaled fail-open intent) forward: set by the broker, which
        # can reach the Exchanges.
        self.recover: Callable[[str, UnsettledHold], Awaitable[None]] | None = None
        self.recover_local: Callable[[str, bytes], Awaitable[LocalSettlement | None]] | None = None
        self._reclaimed: set[str] = set()  # accounts swept since the start (with reclaim)
        self._plans: dict[Charge, _CachedPlan] = {}

    @property
    def instance(self) -> str:
        """This broker's id as the owner of the holds it makes."""
        return self.guard.instance

    def _check_lost(self, plan: Plan) -> None:
        problem = self.guard.problem(plan.account)
        if problem is not None and plan.counters:
            raise StoreDown(
                f"the budget store lost data ({problem}); purchases charged to "
                f"{', '.join(plan.scopes)} are refused until an operator restores or adopts it",
                plan.scopes, reason="store_lost")

    def _saw(self, account: str, c: Counter, state: CounterState) -> None:
        self.guard.saw(account, c.ref, state, c.window.end_ms + self._grace_ms)

    async def _guarded(self, account: str, call: Awaitable[T]) -> T:
        """The store call, unless the store failed moments ago: then one call at a time goes
        through as a probe (the others fail at once), and the first that succeeds ends the skip,
        so one slow answer does not refuse a second of purchases."""
        domain = self._domain(account)
        probing = self._clock.monotonic() < self._skip_until.get(domain, 0.0)
        if probing:
            if domain in self._probing:
                close_awaitable(call)
                raise StoreUnavailable("the budget store failed moments ago", not_sent=True)
            self._probing.add(domain)
        try:
            result = await call
        except StoreUnavailable:
            self._skip_until[domain] = self._clock.monotonic() + _SKIP_AFTER_FAILURE_S
            raise
        finally:
            if probing:
                self._probing.discard(domain)
        self._skip_until.pop(domain, None)
        return result

    # --- limits ----------------------------------------------------------------

    def rule(self, account: str, scope: str) -> ScopeRule:
        return self.accounts.get(account, {}).get(scope, ScopeRule())

    async def _load_limits(self, account: str) -> Limits:
        limits = await self.store.limits(account)
        self.guard.saw_limits(account, limits)
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
        if charge.tighten is None:
            # The same charge under the same limits (the very object: a reload is a new one) plans
            # the same counters until one of its windows ends. (A tightened charge converts the
            # agent's cap at today's rates: planned afresh.)
            cached = self._plans.get(charge)
            if cached is not None and cached.limits is limits and cached.start <= at < cached.end:
                return cached.plan
        plan = self._plan_now(charge, limits, at)
        if charge.tighten is None:
            windows = [c.window for c in plan.counters]
            if charge not in self._plans and len(self._plans) >= _PLAN_CACHE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[charge] = _CachedPlan(
                plan, limits, max((w.start for w in windows), default=at),
                min((w.end for w in windows), default=at + _PLAN_WITHOUT_WINDOW))
        return plan

    def _plan_now(self, charge: Charge, limits: Limits, at: datetime) -> Plan:
        counters: list[Counter] = []
        for scope in charge.scopes:
            rule = self.rule(charge.account, scope)
            own = self.scope_limits(charge.account, scope, limits)
            if scope == charge.target and charge.tighten is not None:
                own = self._tightened(own, charge.tighten, charge.tighten_period)
            for spec in sorted(own):
                period, limit = own[spec]
                ref, window = self._counter(scope, period, limit.currency, at)
                counters.append(Counter(ref, window, limit, rule.failure, rule.mode, rule.tier, rule.pacing))
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
        self._check_lost(plan)
        if plan.leased():
            local = self._lease_snapshots(plan)
            if local is not None:
                return local  # as of this broker's last refresh, plus its own spend since
        try:
            states = await self._guarded(
                plan.account, self.store.read(plan.account, [c.ref for c in plan.counters]))
        except StoreUnavailable:
            if plan.fails_open():
                return self._local_snapshots(plan)
            raise self._down(plan) from None
        for c, st in zip(plan.counters, states, strict=True):
            self._saw(plan.account, c, st)
        return [self._snapshot(plan.account, c, s) for c, s in zip(plan.counters, states, strict=True)]

    def _snapshot(
        self, account: str, c: Counter, s: CounterState, phase: str | None = None,
        as_of: datetime | None = None,
    ) -> Snapshot:
        """`phase`: the lease's, read from this broker's book unless given (a counter in lease mode read
        or committed in the store is in the synchronous phase, or has no lease yet). `as_of`: now,
        unless the caller read the clock once for several counters. Built positionally (Snapshot's
        field order): three of these for every purchase on three scopes."""
        if phase is None:
            phase = self.leases.phase(account, c.ref) if c.mode == "lease" and self.leases is not None else ""
        cur = c.ref.currency
        limit = c.limit if s.credit == 0 else c.limit + Money.from_units(s.credit, cur)
        return Snapshot(
            Layer.PERIOD, c.ref.scope, limit, Money.from_units(s.spent, cur),
            Money.from_units(s.reserved, cur), s.count, self._clock.now() if as_of is None else as_of,
            c.window.start, c.window.end, c.ref.period, c.failure, account, None, None, c.mode, phase,
        )

    def _lease_snapshots(self, plan: Plan) -> list[Snapshot] | None:
        """Every counter as this broker's leases know it, or None if one is not leased yet."""
        if self.leases is None:
            return None
        views = [self.leases.view(plan.account, c.ref) for c in plan.counters]
        if any(v is None for v in views):
            return None
        now = self._clock.now()
        return [self._snapshot(plan.account, c, v[0], v[1].value, now)
                for c, v in zip(plan.counters, views, strict=True) if v is not None]

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
                # A spend counts what it spent; an intent (a purchase in flight, or cut off) its hold.
                units = (entry.holds[first].amount if entry.intent else
                         sum(ln.amount for ln in entry.lines if ln.hold_index == first))
                used = used + self._in(units, entry.holds[first].counter.currency, currency)
        for hold in (h for h in self._local_holds if h.journal_id is None):
            first = _first_hold(hold.holds, scope) if hold.plan.account == account else None
            if first is not None:
                h = hold.holds[first]
                used = used + self._in(h.amount, h.counter.currency, currency)
        return used

    def _in(self, units: int, source: str, currency: str) -> Money:
        return convert(Money.from_units(units, source), currency, self._converter)

    # --- reserving ---------------------------------------------------------------

    async def reserve(
        self, charge: Charge, plan: Plan, cost: Money, key: str, parts: Sequence[PartOrder] = (), *,
        fingerprint: str = "",
    ) -> PeriodHold | None:
        """Hold `cost` on every counter of the plan, or raise. None when no period limit applies.

        With `parts` (what each Exchange will be sent), the hold carries them as its intent: from
        then on it is rolled forward, never refunded blindly. HoldUnsettled when the key already
        has such a hold, expired: the caller rolls it forward instead of buying again.
        """
        for _ in range(_STALE_RETRIES):
            if not plan.counters:
                return None
            self._check_lost(plan)
            now_ms = to_ms(self._clock.now())
            # Each part holds its own cost, rounded up on its own, so it can be settled alone (converted
            # once per currency: a purchase's counters mostly share one).
            currencies = dict.fromkeys(counter.ref.currency for counter in plan.counters)
            by_part: list[tuple[int, ...]] = []
            for part_cost in [part.cost for part in parts] or [cost]:
                units = {cur: convert(part_cost, cur, self._converter).units() for cur in currencies}
                by_part.append(tuple(units[counter.ref.currency] for counter in plan.counters))
            part_holds = tuple(by_part)
            holds = tuple(
                Hold(c.ref, sum(p[i] for p in part_holds), c.limit.units(), c.ref.end_ms + self._grace_ms,
                     floor=self.guard.floor(plan.account, c.ref))
                for i, c in enumerate(plan.counters)
            )
            intent = Intent(
                plan.account, key, fingerprint, cost.currency, holds,
                tuple(IntentPart(p.exchange, p.request, p.items, ph) for p, ph in zip(parts, part_holds,
                                                                                    strict=True)),
            ).encode() if parts else b""
            try:
                if self.leases is not None and plan.leased() and self.guard.problem(plan.account) is None:
                    # StoreUnavailable: the leases needed the store, which did not answer in time (or
                    # failed); the failure policy applies now, with no store reservation after it (it
                    # would wait out a timeout of its own, and could land after this refusal).
                    leased = await self._hold_on_leases(plan, holds, part_holds, key, intent)
                    if leased is not None:
                        return leased  # else synchronous: this purchase reserves in the store
                identity = await self.guard.identity(plan.account)
                outcome = await self._guarded(plan.account, self.store.reserve(
                    plan.account, holds, ttl_ms=self._ttl_ms, idempotency_key=key, now_ms=now_ms,
                    limits_version=plan.version, intent=intent, owner=self.instance, identity=identity,
                ))
            except StoreUnavailable as exc:
                self._check_lost(plan)  # a lease refresh may have found the store lost
                # Unanswered, the hold may have landed with its intent: a sweeper would then roll it
                # forward (and the Exchange execute it) after the TTL. Not "nothing happened".
                maybe_made = bool(intent) and not exc.not_sent
                if plan.fails_open():
                    try:
                        return await self._reserve_locally(plan, holds, cost, key, intent)
                    except OpenAllowanceExhausted:
                        if not maybe_made:
                            raise
                if maybe_made:
                    raise OutcomePending(
                        "the budget store did not confirm the reservation, which may have been made: "
                        "this purchase may still go through; retry with the same idempotency key (it is "
                        "answered once the store is back, by retryAt at the latest)",
                        key.partition("#")[2], "store", from_ms(now_ms + self._ttl_ms)) from None
                raise self._down(plan) from None
            if isinstance(outcome, Reserved):
                return PeriodHold(plan, holds, key, outcome.reservation_id, part_holds=part_holds)
            if isinstance(outcome, Denied):
                c = plan.counters[outcome.index]
                self._saw(plan.account, c, outcome.state)
                snap = self._snapshot(plan.account, c, outcome.state)
                raise BudgetExhausted.from_snapshot(
                    snap, Money.from_units(holds[outcome.index].amount, c.ref.currency),
                    reason="period_budget_exhausted", next_action=next_action(snap),
                )
            if isinstance(outcome, Settled):
                raise AlreadySettled(outcome.result)
            if isinstance(outcome, InFlight):
                raise in_flight(key)
            if isinstance(outcome, Unsettled):
                raise HoldUnsettled(plan.account, outcome.hold)
            if isinstance(outcome, Lost):
                self.guard.mark_lost(plan.account, outcome.problem)
                self._check_lost(plan)
            assert isinstance(outcome, StaleLimits)
            plan = self._plan(charge, await self._load_limits(plan.account))
        raise StoreDown("operator limits kept changing during the reservation; retry", plan.scopes,
                        reason="limits_kept_changing")

    async def _hold_on_leases(
        self, plan: Plan, holds: tuple[Hold, ...], part_holds: tuple[tuple[int, ...], ...], key: str,
        intent: bytes,
    ) -> PeriodHold | None:
        """Hold on this broker's leases (growing them once if a purchase does not fit); None when
        the leases cannot take it (near exhaustion); StoreUnavailable when they needed the store and
        it did not answer within its timeout."""
        assert self.leases is not None
        recovered = self.leases.recovered(plan.account, key)
        if recovered is not None:
            raise AlreadySettled(recovered)
        if self.leases.cut_off(plan.account, key):
            raise in_flight(key)  # its roll-forward settles it
        tiers = [TIERS.get(c.tier, TIERS["standard"]) for c in plan.counters]
        lease = self.leases.try_hold(plan.account, holds, tiers)
        if lease is None:
            try:
                lease = await self.leases.grow(plan.account, holds, tiers)
            except StoreUnavailable as exc:
                # What went unanswered was a lease refresh: nothing of this purchase was sent.
                raise StoreUnavailable(str(exc), not_sent=True) from exc
        if lease is None:
            return None
        if intent:
            try:
                lease = await self.leases.journal_intent(lease, key, holds, intent)
            except BaseException:
                self.leases.release(lease)
                raise
        return PeriodHold(plan, holds, key, None, part_holds=part_holds, lease=lease)

    async def replay_if_settled(self, plan: Plan, key: str) -> None:
        """Raise AlreadySettled when `key` was committed before: a retry is answered, not denied."""
        if not plan.counters:
            return
        try:
            stored = await self._guarded(plan.account, self.store.settled(plan.account, key))
        except StoreUnavailable:
            return  # the denial stands; the agent retries later
        if stored is not None:
            raise AlreadySettled(stored)

    async def _reserve_locally(
        self, plan: Plan, holds: tuple[Hold, ...], cost: Money, key: str, intent: bytes,
    ) -> PeriodHold:
        self._check_known_locally(plan.account, key)
        for snap in self._local_snapshots(plan):
            need = convert(cost, snap.limit.currency, self._converter)
            if snap.spent + need > snap.limit:
                raise OpenAllowanceExhausted.from_snapshot(
                    snap, need, reason=exhausted_reason(snap), next_action=next_action(snap),
                )
        hold = PeriodHold(plan, holds, key, None)
        self._local_holds.append(hold)  # counted from here on, with no await before the check
        if intent and self._journal is not None:
            # Durable before any Exchange is asked: a crash after its charge is rolled forward.
            try:
                entry = await self._journal.append(plan.account, key, holds, (), to_ms(self._clock.now()),
                                                   intent=intent)
            except BaseException:
                self._local_holds.remove(hold)
                raise
            hold.journal_id = entry.id
        log.warning("budget store unreachable: scopes %s spend from the fail-open allowance",
                    ", ".join(plan.scopes))
        return hold

    def _check_known_locally(self, account: str, key: str) -> None:
        """Without the store, a key is answered from what this broker knows of it: a spend it journaled
        (AlreadySettled, with its answer) or a purchase of it still in flight here (KeyInFlight).
        A key bought on another broker cannot be known here (see the README: a repeated key)."""
        if any(h.key == key and h.plan.account == account for h in self._local_holds):
            raise in_flight(key)
        for entry in self._journal.pending() if self._journal is not None else ():
            if entry.account == account and entry.idempotency_key == key:
                if entry.intent:
                    raise in_flight(key)  # cut off by a restart: its roll-forward settles it
                raise AlreadySettled(entry.result)

    def _down(self, plan: Plan) -> StoreDown:
        closed = sorted({c.ref.scope for c in plan.counters if c.failure != "open"})
        return StoreDown(f"the budget store is unreachable and scope {', '.join(closed)} fails "
                         "closed; retry later", closed)

    # --- settling ------------------------------------------------------------------

    async def commit(
        self, hold: PeriodHold, items: Sequence[ItemSpend], result: bytes, *, part: int = 0,
        final: bool = True, nothing_charged: Sequence[int] = (),
    ) -> list[Snapshot] | None:
        """Record what one part of the purchase bought (all of it, for a hold of one part); the
        final commit ends the hold. Returns every counter's numbers after the commit, when known.

        A final commit ends a store hold only if every other part was committed or is listed in
        `nothing_charged` (answered, nothing charged); else the store changes nothing and the hold
        stays, with its intent, until it is rolled forward: a part whose commit did not land is
        never released by another's. A hold with nothing bought at all is released instead (by the
        caller, or here when no part was charged). If the store cannot be reached the part stays
        unsettled: its intent is in the store, and whoever rolls it forward commits it. If the
        store lost its memory, the spend goes to the journal and is recorded once an operator has
        adopted the store.
        """
        if hold.settled:
            raise RuntimeError("period reservation settled twice")
        others = set(range(hold.parts)) - {part}
        if not items and final and not hold.done and others <= set(nothing_charged):
            await self.release(hold)
            return None
        lines = self._lines(hold.holds, items)
        now_ms = to_ms(self._clock.now())
        if hold.lease is not None:
            assert self.leases is not None
            hold.local_lines += lines
            hold.done.add(part)
            if not final:
                return None
            hold.settled = True
            if hold.local_lines:
                await self.leases.commit(hold.lease, hold.key, hold.holds, hold.local_lines, result)
            else:
                await self.leases.release_journaled(hold.lease)
            return self._lease_snapshots(hold.plan)
        if hold.local:
            # Fail-open: nothing of it is in the store; the journal takes the whole purchase at once.
            hold.local_lines += lines
            hold.done.add(part)
            if not final:
                return None
            hold.settled = True
            assert self._journal is not None
            if hold.local_lines:
                # Its spend is journaled, and its intent with it: nothing to roll forward.
                await self._journal.append(hold.plan.account, hold.key, hold.holds, hold.local_lines, now_ms,
                                           result=result, settles=hold.journal_id)
                self.events.fail_open_spend()
            elif hold.journal_id is not None:
                await self._journal.ack(hold.journal_id)
            self._local_holds.remove(hold)
            return None
        assert hold.reservation_id is not None
        release = hold.part_holds[part] if len(hold.part_holds) > 1 else ()
        floors = tuple(replace(h, floor=self.guard.floor(hold.plan.account, h.counter)) for h in hold.holds)
        try:
            done = await self.store.commit(
                hold.plan.account, hold.reservation_id, floors, lines, idempotency_key=hold.key,
                result=result, now_ms=now_ms, part=part, release=release, final=final,
                identity=self.guard.seen_identity(hold.plan.account), parts=hold.parts,
                nothing_charged=nothing_charged,
            )
        except StoreLost as exc:
            self.guard.mark_lost(hold.plan.account, str(exc))
            hold.settled = final
            if lines:
                # Its intent went with the store's memory: the journal keeps the spend.
                await self._journal_lost(hold, part, lines, now_ms)
            return None
        except StoreUnavailable:
            # Not recorded (or unknown): the hold and its intent stay in the store, and the
            # part is committed by whoever rolls the hold forward. Nothing is dropped.
            log.warning("budget store unreachable at commit of %r: the hold stays until it is rolled "
                        "forward", hold.key)
            raise
        if done.unsettled_parts:
            # The caller thought every other part settled; the store knows better. Its hold stays
            # with its intent, for the roll-forward to commit part by part.
            log.error("final commit of %r refused: part(s) %s are not settled; the hold stays until it "
                      "is rolled forward", hold.key, ", ".join(map(str, done.unsettled_parts)))
            return None
        hold.done.add(part)
        hold.settled = final
        if done.duplicate:
            # Another broker rolling it forward committed this key first: counted once, by it.
            hold.settled = True
            return None
        self._report(hold, done)
        if len(done.states) != len(hold.plan.counters):
            return None
        for c, st in zip(hold.plan.counters, done.states, strict=True):
            self._saw(hold.plan.account, c, st)
        return [self._snapshot(hold.plan.account, c, st)
                for c, st in zip(hold.plan.counters, done.states, strict=True)]

    def _report(self, hold: PeriodHold, done: Committed) -> None:
        for h, over in zip(hold.holds, done.overage, strict=True):
            if over:
                log.warning("overage on %s: %s above the reservation", h.counter.key,
                            Money.from_units(over, h.counter.currency))
        if any(done.overage):
            self.events.overage()
        if done.late:
            self.events.late_commit()
            log.warning("reservation %s was refunded before its commit; spend recorded late",
                        hold.reservation_id)
        for c, st in zip(hold.plan.counters, done.states, strict=True):
            if st.spent > c.limit.units() + st.credit:
                # Recorded in full (the Exchange charged it); the counter denies until it is
                # raised or its window ends. Flagged so an operator can look.
                self.events.over_limit()
                log.error("counter %s is over its limit after a commit: spent %s, limit %s",
                          c.ref.key, Money.from_units(st.spent, c.ref.currency),
                          c.limit + Money.from_units(st.credit, c.ref.currency))

    async def _journal_lost(self, hold: PeriodHold, part: int, lines: tuple[Line, ...], now_ms: int) -> None:
        if self._journal is None:
            log.error("spend of %r could not be recorded (store lost, no journal)", hold.key)
            return
        key = hold.key if hold.parts == 1 else f"{hold.key}#{part}"
        await self._journal.append(hold.plan.account, key, hold.holds, lines, now_ms)
        log.warning("budget store lost data: spend of %r journaled until it is adopted", key)

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

    def hand_over(self, hold: PeriodHold) -> None:
        """The purchase gives up on settling `hold` (an Exchange did not answer, or it was cut
        short): its intent is for the roll-forward now. A store hold is the sweepers' after its
        TTL; a lease or fail-open hold, journaled here, is this broker's upkeep's."""
        if hold.settled:
            return
        if hold.lease is not None and hold.lease.intent_id is not None:
            assert self.leases is not None
            hold.settled = True  # a late commit of it would count it twice: the roll-forward's now
            self.leases.hand_over(hold.lease, hold.key)
        elif hold.local and hold.journal_id is not None:
            hold.settled = True
            self._local_holds.remove(hold)  # its journaled intent is replayed (rolled forward)
        # Else nothing journaled to roll forward: it stays held (counted) until a restart.

    async def release(self, hold: PeriodHold) -> None:
        if hold.settled:
            raise RuntimeError("period reservation settled twice")
        hold.settled = True
        if hold.lease is not None:
            assert self.leases is not None
            await self.leases.release_journaled(hold.lease)
            return
        if hold.local:
            if hold.journal_id is not None and self._journal is not None:
                await self._journal.ack(hold.journal_id)  # the Exchanges refused it: nothing spent
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
        """Record journaled spends in the store, each exactly once; returns how many were sent.
        Nothing is replayed into an account's store while it is flagged as having lost data."""
        if self._journal is None:
            return 0
        sent = 0
        live = {h.journal_id for h in self._local_holds}
        for entry in self._journal.pending():
            if self.guard.problem(entry.account) is not None or entry.id in live:
                continue  # a lost store waits for adoption; a purchase in flight settles itself
            lines, result = entry.lines, entry.result
            if entry.intent:
                rolled = await self._roll_forward_local(entry)
                if rolled is None:
                    continue  # an Exchange has not answered: it stays counted, tried again later
                lines, result = rolled
            identity = self.guard.seen_identity(entry.account)
            try:
                await self.store.record_spend(
                    entry.account, entry.holds, lines, idempotency_key=entry.store_key,
                    now_ms=entry.at_ms, kind="journal", identity=identity, result=result,
                )
            except StoreLost as exc:
                self.guard.mark_lost(entry.account, str(exc))
                continue
            await self._journal.ack(entry.id)
            sent += 1
        return sent

    async def upkeep(self) -> None:
        """One round of the background work every broker does: check the store is the one it has
        seen, sweep (refund what never reached an Exchange, roll forward what may have), replay the
        journal, refresh limits."""
        now_ms = to_ms(self._clock.now())
        down: dict[str, StoreUnavailable] = {}  # by failure domain
        for account in self.accounts:
            domain = self._domain(account)
            if domain in down:
                continue  # failed moments ago: each of its accounts would wait out the timeout again
            try:
                if await self.guard.check(account):
                    await self._load_limits(account)  # adopted: its limits are the baseline too
                swept = await self.store.sweep(
                    account, now_ms=now_ms, lease_ms=self._lease_ms, taker=self.instance,
                    # After a restart nothing of this broker's own is in flight: reclaim it at once.
                    reclaim=account not in self._reclaimed and bool(self.instance))
            except StoreUnavailable as exc:
                down[domain] = exc
                continue
            self._reclaimed.add(account)
            self._skip_until.pop(domain, None)  # the store answered: purchases may use it again
            self.events.refunded(swept.refunded)
            if swept.refunded:
                log.info("refunded %d expired reservation(s) in account %s", swept.refunded, account)
            for unsettled in swept.unsettled:
                await self._roll_forward(account, unsettled)
        if down and all(self._domain(account) in down for account in self.accounts):
            raise next(iter(down.values()))  # the whole store is down: nothing more this round
        # Only part of it (a Redis Cluster primary): the rest is looked after all the same.
        await self._roll_leases_forward()
        replayed = await self.replay_journal()
        if replayed:
            log.info("replayed %d journaled spend(s) into the store", replayed)
        for account in list(self._limits):
            if self._domain(account) not in down:
                await self._load_limits(account)
        await self.guard.save(now_ms)
        if down:
            raise next(iter(down.values()))

    async def _roll_forward(self, account: str, hold: UnsettledHold) -> None:
        if self.recover is None:
            log.error("unsettled hold %s in account %s: no way to reach Exchanges here; it stays "
                      "counted until a broker rolls it forward", hold.reservation_id, account)
            return
        log.info("rolling forward hold %s (key %r, attempt %d) in account %s", hold.reservation_id,
                 hold.idempotency_key, hold.attempts, account)
        try:
            await self.recover(account, hold)
        except StoreUnavailable:
            raise
        except Exception:
            # It stays counted, handed over again after its lease: never refunded blindly.
            log.exception("rolling forward hold %s failed; it stays counted and is retried",
                          hold.reservation_id)

    async def _roll_leases_forward(self) -> None:
        """Lease purchases cut off by a restart after their intent was journaled: settled with their
        Exchanges, their spend then reported at the next lease refresh."""
        if self.leases is None:
            return
        for entry in self.leases.pending_intents():
            rolled = await self._roll_forward_local(entry)
            if rolled is not None:
                await self.leases.rolled_forward(entry, *rolled)

    async def _settle_leases(self, within_s: float) -> None:
        """Before a clean shutdown gives the leases back: settle the purchases a crash cut off, so
        what they hold goes back too. Bounded: what is still unsettled stays leased (counted)
        until the next start rolls it forward."""
        assert self.leases is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self.leases.pending_intents():
                    await self._roll_leases_forward()
                    if self.leases.pending_intents():
                        await asyncio.sleep(0.2)  # an Exchange still executing the cut-off call
        if left := len(self.leases.pending_intents()):
            log.warning("%d journaled purchase(s) not settled at shutdown: their share of the leases "
                        "stays counted until this broker starts again", left)

    async def _roll_forward_local(self, entry: JournalEntry) -> tuple[tuple[Line, ...], bytes] | None:
        """A fail-open or lease purchase cut off after its intent was journaled: what its Exchanges
        say they charged, as lines on its holds, and its answer (None while one has not answered)."""
        if self.recover_local is None:
            return None
        try:
            settled = await self.recover_local(entry.account, entry.intent)
        except Exception:
            log.exception("rolling forward the journaled purchase %r failed; retried later",
                          entry.idempotency_key)
            return None
        if settled is None:
            return None
        items, answer = settled
        log.info("rolled forward the journaled purchase %r: %d item(s) charged", entry.idempotency_key,
                 len(items))
        return self._lines(entry.holds, items), answer

    def _lines(self, holds: Sequence[Hold], items: Sequence[ItemSpend]) -> tuple[Line, ...]:
        """Each item's share on each hold's counter (see _split: once per currency, as a purchase's
        counters mostly share one)."""
        splits: dict[str, list[int]] = {}
        for h in holds:
            if items and h.counter.currency not in splits:
                splits[h.counter.currency] = self._split(items, h.counter.currency)
        return tuple(
            Line(i, amount, item.original.text(), item.original.currency, item.exchange,
                 item.offer_id, item.uri)
            for i, h in enumerate(holds)
            for item, amount in zip(items, splits.get(h.counter.currency, []), strict=True)
        )

    def settling(self, account: str, hold: UnsettledHold) -> tuple[Intent, PeriodHold]:
        """An unsettled hold as a PeriodHold its roller can commit part by part (IntentError if its
        intent is unreadable)."""
        intent = Intent.decode(hold.intent)
        counters = tuple(
            Counter(h.counter,
                    Window(h.counter.window, from_ms(h.counter.start_ms), from_ms(h.counter.end_ms)),
                    Money.from_units(h.limit, h.counter.currency),
                    self.rule(account, h.counter.scope).failure)
            for h in intent.holds)
        plan = Plan(account, counters, -1, tuple(dict.fromkeys(h.counter.scope for h in intent.holds)))
        period_hold = PeriodHold(plan, intent.holds, hold.idempotency_key, hold.reservation_id,
                                 part_holds=tuple(p.holds for p in intent.parts), done=set(hold.done))
        return intent, period_hold

    async def close(self) -> None:
        """Give the leases back, keep what this broker has seen (the next start compares the store
        with it), then close."""
        try:
            if self.leases is not None:
                await self._settle_leases(_SETTLE_AT_CLOSE_S)
                await self.leases.close()
            await self.guard.save()
        finally:
            if self._journal is not None:
                self._journal.close()
            await self.store.close()

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


def _whole_store(account: str) -> str:
    return ""
