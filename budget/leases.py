"""Pre-debited leases: spending a store's budget in memory, many brokers at once.

In lease mode a broker does not ask the store for every purchase. It takes a
*lease* on each counter it spends from: one atomic store step (Store.lease)
moves an amount out of the counter's remaining into this broker's lease, so
spent + reserved (leases included) <= limit holds in the store at every instant,
and steady-state overspend is zero, not merely bounded. Purchases then hold and
commit against the local lease in memory, all counters of a purchase at once or
none, with their intent journaled locally (fsync) before the Exchange call and their
spend after it (written with the next fsync: a crash before it rolls the intent
forward). A refresh, batched over all counters of an account (every
`refresh_seconds`, when a lease is half used, when REPORT_AT_ONCE / 2 spends wait, when a
purchase needs more, or when the store asks lease holders to give back), reports the
spend since the last one (ledger lines, once per idempotency key; REPORT_AT_ONCE to a
store step) and renews, resizes or returns each lease in the same step; refreshes are
idempotent by sequence number. Purchases that need more share one refresh, after the one
under way; a failure answers all of them at once, and none waits for more than the store
timeout (where its calls have one: Redis): a store outage refuses them within it, rather than
one timeout after another.

Lease size follows the broker's smoothed spend rate and the counter's remaining
budget (seed 001): clamp(rate x headroom, L_min, L_max) with L_min the largest
purchase seen (a restart's journal included; none seen: no lease) and L_max =
remaining / (2 x brokers holding leases), through phases set by remaining / the
counter's smoothed spend rate:

    generous     > 1 h of spend left        headroom 60 s
    tightening   > 5 min                    headroom 10 s
    strict       > 30 s                     headroom 1 s, leases returned at every refresh
    synchronous  less, or too little left for every holder's largest purchase: no lease;
                 every purchase reserves in the store (the strict mode's path)
    exhausted    nothing left

The rate is an EWMA (half-life `rate_half_life_seconds`), so a short burst does
not flip a scope to strict; phases are recomputed at every refresh, so a change
converges within one. A `prepaid` tier goes synchronous from a larger share of
remaining budget; `postpaid` leases twice the headroom.

A lease can never be shrunk below what is in use: the broker sets aside what a
refresh may take back before it asks, and the store never grants less than the
old lease minus the spend it reports. A refresh whose answer is lost keeps that
set aside until one is known applied (the lost one may have landed); one that
finds its sequence already used was not applied, and is sent again above it.
The book is brought in line with the store's answer before anything is awaited.

A broker that dies leaves its lease counted (fail closed) until it restarts (its
journal's spends are reported at its first refresh, its journaled intents rolled
forward) or an operator releases it. A purchase that gives up on an Exchange's
answer hands its intent to the same roll-forward without a restart; a clean
shutdown settles those it can, then gives every lease back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from budget.durability.journal import Journal, JournalEntry
from budget.periods import to_ms
from budget.stores.contract import (
    CounterRef,
    CounterState,
    Hold,
    LeaseAsk,
    Leased,
    LeaseSpend,
    Line,
    Lost,
    StaleLimits,
    Store,
    StoreIdentity,
    StoreUnavailable,
)
from common.clock import Clock

log = logging.getLogger(__name__)
_LN2 = Decimal(2).ln()
_RATE_WARM_S = Decimal(5)  # a new rate counts as if observed for at least this long
# Answers of keys settled before a restart (from the journal), kept for retries (the newest ones).
_RECOVERED_ANSWERS = 10_000
# Spends reported in one store step at most; a refresh is due as soon as half this many wait
# (the step then has room for those that come meanwhile: one step, not a full one and a short
# one). The step's cost grows with them (about 15 µs each of the broker's loop, more of
# Redis's): all of a second's at once, at a few hundred purchases a second, held the loop
# 10-20 ms every second, the p99 of every purchase caught behind it.
REPORT_AT_ONCE = 128


class Phase(StrEnum):
    GENEROUS = "generous"
    TIGHTENING = "tightening"
    STRICT = "strict"
    SYNCHRONOUS = "synchronous"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class Tier:
    """How strict a scope's end game is."""

    name: str = "standard"
    headroom_factor: int = 1  # postpaid: 2 (larger leases)
    synchronous_share: Decimal = Decimal(0)  # prepaid: go synchronous below this share of the limit


TIERS = {
    "standard": Tier(),
    "prepaid": Tier("prepaid", 1, Decimal("0.05")),
    "postpaid": Tier("postpaid", 2, Decimal(0)),
}
# (seconds of spend left above which the phase applies, the phase, its headroom in seconds)
_PHASES = ((3600, Phase.GENEROUS, 60), (300, Phase.TIGHTENING, 10), (30, Phase.STRICT, 1))


def _weight(seconds: Decimal, half_life_s: Decimal) -> Decimal:
    """The EWMA weight of `seconds` of observation: 1 - 2^(-seconds / half-life)."""
    return 1 - (-(seconds * _LN2) / half_life_s).exp()


@dataclass(slots=True)
class Rate:
    """An EWMA of a spend rate, nano-units per second, folded in at each refresh: the spend since
    the previous one over the time since (weight 1 - 2^(-dt / half-life), like budget.forecast).

    Bias-corrected: started from zero, the average is divided by the weight it has gathered, so a
    broker a few seconds old sizes its leases (and phases) on the rate it sees, not a fraction;
    but never by less than 5 s worth, so a burst in its first milliseconds is not taken for a
    rate that would flip the scope to strict."""

    half_life_s: Decimal
    ewma: Decimal = Decimal(0)
    gathered: Decimal = Decimal(0)  # the weight of all observations: 1 - 2^(-observed / half-life)
    at: float | None = None  # monotonic seconds of the last observation

    @property
    def per_s(self) -> Decimal:
        if self.gathered == 0:
            return Decimal(0)
        return self.ewma / max(self.gathered, _weight(_RATE_WARM_S, self.half_life_s))

    def observe(self, amount: int, now: float) -> None:
        if self.at is not None and now > self.at:
            dt = Decimal(now - self.at).quantize(Decimal("0.000001"))
            if dt > 0:
                weight = _weight(dt, self.half_life_s)
                self.ewma += weight * (Decimal(amount) / dt - self.ewma)
                self.gathered += weight * (1 - self.gathered)
        self.at = now


def phase_of(
    remaining: int, rate_per_s: Decimal, holders: int, largest: int, limit: int, tier: Tier,
) -> Phase:
    """The phase of a counter: how much time (or room) its remaining budget leaves."""
    if remaining <= 0:
        return Phase.EXHAUSTED
    if remaining < 2 * max(holders, 1) * max(largest, 1) or remaining < tier.synchronous_share * limit:
        return Phase.SYNCHRONOUS
    seconds_left = Decimal(remaining) / rate_per_s if rate_per_s > 0 else Decimal("Infinity")
    for above, phase, _ in _PHASES:
        if seconds_left > above:
            return phase
    return Phase.SYNCHRONOUS


def lease_size(
    phase: Phase, local_rate: Decimal, remaining: int, holders: int, largest: int, tier: Tier,
) -> int:
    """clamp(rate x headroom, L_min, L_max) for the phase (0 when no lease should be held, or
    nothing was bought on the counter and nothing is spent on it: no purchase seen, no L_min)."""
    headroom = next((h for _, p, h in _PHASES if p == phase), 0) * tier.headroom_factor
    if not headroom:
        return 0
    l_max = remaining // (2 * max(holders, 1))
    l_min = min(largest, l_max)
    return max(l_min, min(int(local_rate * headroom), l_max))


@dataclass(slots=True)
class CounterLease:
    """This broker's lease on one counter, and what it does with it."""

    counter: CounterRef
    limit: int | None  # effective, before credit; None: not known yet (a lease found after a restart)
    expire_at_ms: int
    tier: Tier
    rate: Rate  # this broker's spend on it
    counter_rate: Rate  # the counter's spend, all brokers, as refreshes see it
    granted: int = 0  # pre-debited in the store at the last refresh
    held: int = 0  # local purchases in flight
    spent: int = 0  # committed locally, not yet reported
    count: int = 0  # purchases that spent on it locally, not yet reported (the store counts each once)
    returning: int = 0  # set aside while a refresh may give it back
    state: CounterState = field(default_factory=CounterState)
    holders: int = 0
    reclaim: bool = False
    largest: int = 0  # the largest purchase seen on it (L_min), journaled ones of a previous run included
    phase: Phase | None = None  # None until a refresh has read the counter (its numbers unknown)
    recent: int = 0  # spend reported at the last refresh, plus room purchases asked for since

    @property
    def available(self) -> int:
        return self.granted - self.held - self.spent - self.returning

    @property
    def remaining(self) -> int:
        """Budget neither spent nor held in the store (leases, this one's included, excluded)."""
        st = self.state
        return (self.limit or 0) + st.credit - st.spent - (st.reserved - st.leased)


@dataclass(slots=True)
class _Pending:
    """A purchase committed on leases, not yet reported to the store."""

    entry_id: str
    key: str
    lines: tuple[Line, ...]  # hold_index: position in `counters`
    counters: tuple[str, ...]  # counter keys, by hold_index
    result: bytes

    def touched(self) -> set[str]:
        """The counters it spent on: the store counts it once on each."""
        return {self.counters[line.hold_index] for line in self.lines}


@dataclass(slots=True)
class _Waiter:
    """A purchase waiting for a refresh of its account to make room for it."""

    holds: Sequence[Hold]
    tiers: Sequence[Tier]
    need: dict[str, int]  # counter key -> room it asks for (nothing on counters past leasing)
    sizes: dict[str, int]  # counter key -> what it costs there (a purchase seen: L_min)
    answer: asyncio.Future[LeaseHold | None]


@dataclass(slots=True)
class _Account:
    name: str
    counters: dict[str, CounterLease] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    seq: int = 0
    limits_version: int = 0
    valid_until: float = 0.0  # monotonic: leases may be spent until then without a refresh
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    down: bool = False  # the last refresh failed
    adopted: bool = False  # this broker's leases left in the store by an earlier run were looked up
    waiting: list[_Waiter] = field(default_factory=list)  # for the next refresh to serve
    serving: asyncio.Task[None] | None = None  # that refresh, until it starts (takes the lock)


@dataclass(frozen=True, slots=True)
class LeaseHold:
    """A purchase held on this broker's leases: amounts per counter key, in the plan's order."""

    account: str
    amounts: tuple[tuple[str, int], ...]
    intent_id: str | None = None


class LeaseBook:
    def __init__(
        self, store: Store, *, clock: Clock, broker: str, journal: Journal | None,
        identity: Callable[[str], Awaitable[StoreIdentity | None]], floor: Callable[[str, CounterRef], int],
        refresh_s: float = 1.0, ttl_s: float = 30.0, rate_half_life_s: float = 60.0,
        store_timeout_s: float | None = 1.0, on_lost: Callable[[str, str], None] | None = None,
        on_refresh: Callable[[bool], None] | None = None, accounts: Sequence[str] = (),
    ) -> None:
        self._store = store
        self._clock = clock
        self.broker = broker
        self._journal = journal
        self._identity = identity
        self._floor = floor
        self.refresh_s = refresh_s
        self._ttl_ms = int(ttl_s * 1000)
        self._ttl_s = ttl_s
        self._half_life = Decimal(str(rate_half_life_s))
        # The longest a purchase waits on the store for room in its leases, in all (None: as long as
        # the store takes; the embedded one's calls have no deadline).
        self._store_timeout_s = store_timeout_s
        self._on_lost = on_lost
        self._on_refresh = on_refresh or (lambda ok: None)
        self._accounts: dict[str, _Account] = {}
        self._due = asyncio.Event()  # some lease is half used: refresh soon
        self._serving: set[asyncio.Task[None]] = set()  # refreshes for waiting purchases, referenced
        self._live: set[str] = set()  # journaled intents of purchases in flight here
        # Keys of the previous incarnation (from the journal): a retry of one it settled is shown
        # its answer, one it was cut off in waits for the roll-forward. (Retries of this
        # incarnation's keys are the purchaser's idempotency cache's; a key settled on another
        # broker reaches its Exchange again, which answers from its dedupe record, and the store
        # counts it once.)
        self._recovered: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._cut_off: set[tuple[str, str]] = set()
        self.store_calls = 0  # lease refreshes sent (bench: store calls per purchase)
        # Known from the start, so the refresh loop (and a clean shutdown) takes back the leases a
        # previous incarnation left even when no purchase comes to this one.
        for name in accounts:
            self._account(name)
        if journal is not None:
            self._recover_pending(journal)

    # --- the purchase path (no await between a check and its hold) ---------------------------

    def recovered(self, account: str, key: str) -> bytes | None:
        """The stored answer of `key`, if this broker settled it before a restart."""
        return self._recovered.get((account, key))

    def cut_off(self, account: str, key: str) -> bool:
        """`key`'s purchase was cut off by a restart and is not rolled forward yet."""
        return (account, key) in self._cut_off

    def counter(self, account: str, hold: Hold, tier: Tier) -> CounterLease:
        acct = self._account(account)
        lease = acct.counters.get(hold.counter.key)
        if lease is None:
            lease = CounterLease(hold.counter, hold.limit, hold.expire_at_ms, tier,
                                 Rate(self._half_life), Rate(self._half_life))
            acct.counters[hold.counter.key] = lease
        lease.limit, lease.expire_at_ms, lease.tier = hold.limit, hold.expire_at_ms, tier
        return lease

    def usable(self, account: str) -> bool:
        """The account's leases may be spent: refreshed recently enough (a store outage leaves the
        rest of an unexpired lease spendable, then the scope's failure policy applies)."""
        return self._clock.monotonic() < self._account(account).valid_until

    def try_hold(self, account: str, holds: Sequence[Hold], tiers: Sequence[Tier]) -> LeaseHold | None:
        """Hold `holds` on this broker's leases, all or none; None when a lease lacks room (or the
        counter is past leasing): the caller grows the leases or reserves in the store."""
        if not self.usable(account):
            return None
        leases = [self.counter(account, h, t) for h, t in zip(holds, tiers, strict=True)]
        if any(lease.phase in (Phase.SYNCHRONOUS, Phase.EXHAUSTED) for lease in leases):
            return None
        need: dict[str, int] = {}
        for h in holds:
            need[h.counter.key] = need.get(h.counter.key, 0) + h.amount
        acct = self._account(account)
        if any(acct.counters[key].available < amount for key, amount in need.items()):
            return None
        for key, amount in need.items():
            lease = acct.counters[key]
            lease.held += amount
            lease.largest = max(lease.largest, amount)
            if lease.spent + lease.held >= lease.granted // 2:
                self._due.set()  # half used: refresh soon, in the background
        return LeaseHold(account, tuple(need.items()))

    async def journal_intent(
        self, hold: LeaseHold, key: str, holds: tuple[Hold, ...], intent: bytes,
    ) -> LeaseHold:
        """Durable before any Exchange is asked: a crash after its charge is rolled forward."""
        if self._journal is None:
            return hold
        entry = await self._journal.append(hold.account, key, holds, (), self._now_ms(), intent=intent)
        self._live.add(entry.id)
        return LeaseHold(hold.account, hold.amounts, entry.id)

    def release(self, hold: LeaseHold) -> None:
        acct = self._account(hold.account)
        for key, amount in hold.amounts:
            acct.counters[key].held -= amount

    async def release_journaled(self, hold: LeaseHold) -> None:
        self.release(hold)
        if hold.intent_id is not None and self._journal is not None:
            # The Exchanges charged nothing. On disk before the answer (a rare path): an intent left
            # pending would be re-sent at a restart, and an Exchange may then execute it.
            await self._journal.ack(hold.intent_id)
            self._live.discard(hold.intent_id)

    def hand_over(self, hold: LeaseHold, key: str) -> None:
        """The purchase stopped waiting for an Exchange's answer: its journaled intent is rolled
        forward by the upkeep, as if a restart had cut it off (its hold stays until then)."""
        assert hold.intent_id is not None
        self._live.discard(hold.intent_id)
        self._cut_off.add((hold.account, key))

    async def commit(
        self, hold: LeaseHold, key: str, holds: tuple[Hold, ...], lines: tuple[Line, ...], result: bytes,
    ) -> None:
        """Record what the purchase spent on its leases: journaled, then counted locally and reported
        at the next refresh. The answer does not wait for the fsync: the intent is on disk, so a crash
        before this record is rolls it forward (the Exchange answers from its dedupe record)."""
        entry_id = ""
        if self._journal is not None:
            entry = await self._journal.append(hold.account, key, holds, lines, self._now_ms(), result=result,
                                               settles=hold.intent_id, durable=False)
            entry_id = entry.id
            if hold.intent_id is not None:
                self._live.discard(hold.intent_id)
        acct = self._account(hold.account)
        keys = tuple(h.counter.key for h in holds)
        per_key: dict[str, int] = {}
        for line in lines:
            per_key[keys[line.hold_index]] = per_key.get(keys[line.hold_index], 0) + line.amount
        for k in per_key:
            acct.counters[k].count += 1
        for k, amount in hold.amounts:
            lease = acct.counters[k]
            lease.held -= amount
            lease.spent += per_key.get(k, 0)
            if lease.spent + lease.held >= lease.granted // 2:
                self._due.set()
        acct.pending.append(_Pending(entry_id, key, lines, keys, result))
        if len(acct.pending) >= REPORT_AT_ONCE // 2:
            self._due.set()

    # --- refreshing ---------------------------------------------------------------------------

    async def refresh(self, account: str, grow: dict[str, int] | None = None) -> bool:
        """Report this broker's spend on the account's leases and renew or resize them: every spend
        waiting now, REPORT_AT_ONCE to a store step. `grow`: counter key -> extra room a purchase
        needs now. False when the store cannot be reached (the leases stay as they were,
        spendable until they expire)."""
        acct = self._account(account)
        async with acct.lock:
            for _ in range(max(1, -(-len(acct.pending) // REPORT_AT_ONCE))):
                if not await self._refresh(acct, grow or {}):
                    return False
            return True

    async def _adopt_store_leases(self, acct: _Account) -> None:
        """Leases this broker (its instance id) still holds from before a restart: taken back into
        the book, so the first refresh reports and resizes them instead of leaving them stranded."""
        for lease in await self._store.leases(acct.name):
            if lease.broker != self.broker:
                continue
            mine = acct.counters.get(lease.counter.key)
            if mine is None:
                mine = acct.counters[lease.counter.key] = CounterLease(
                    lease.counter, None, lease.counter.end_ms, TIERS["standard"], Rate(self._half_life),
                    Rate(self._half_life))
            mine.granted = lease.granted
            acct.seq = max(acct.seq, lease.seq)
        acct.adopted = True

    async def _refresh(
        self, acct: _Account, grow: dict[str, int], seen: dict[str, int] | None = None,
    ) -> bool:
        """One store step (or a few, when the store says so). `seen`: counter key -> the largest
        purchase waiting for this refresh, counted in L_min from its phase on (a purchase that
        finds too little left makes the counter synchronous at once)."""
        if not acct.adopted:
            try:
                await self._adopt_store_leases(acct)
            except StoreUnavailable as exc:
                return self._unreachable(acct, exc)
        if not acct.counters:
            return True
        now = self._clock.monotonic()
        leases = list(acct.counters.values())
        reported = acct.pending[:REPORT_AT_ONCE]  # the rest is counted in use, and reported next
        spent_now = {lease.counter.key: 0 for lease in leases}
        for p in reported:
            for line in p.lines:
                key = p.counters[line.hold_index]
                spent_now[key] = spent_now.get(key, 0) + line.amount
        asks: list[LeaseAsk] = []
        for lease in leases:
            key = lease.counter.key
            in_use = lease.held + lease.spent - spent_now[key]  # what stays spent or in flight
            lease.recent += spent_now[key] + grow.get(key, 0)
            target = self._target(lease, grow.get(key, 0))
            want = max(target, in_use)
            keep = lease.granted - spent_now[key]
            # Set aside what this refresh may give back, so no hold takes it meanwhile. What an
            # earlier refresh set aside stays aside until one is known to be applied: its answer
            # may have been lost after the store applied it.
            lease.returning = max(lease.returning, keep - want, 0)
            asks.append(LeaseAsk(Hold(lease.counter, 0, lease.limit or 0, lease.expire_at_ms,
                                      floor=self._floor(acct.name, lease.counter)), want))
        index = {lease.counter.key: i for i, lease in enumerate(leases)}
        spends = [
            LeaseSpend(p.key, tuple(
                Line(index[p.counters[ln.hold_index]], ln.amount, ln.original_amount, ln.original_currency,
                     ln.exchange, ln.offer_id, ln.uri) for ln in p.lines), p.result)
            for p in reported]
        try:
            identity = await self._identity(acct.name)
            for _ in range(3):
                self.store_calls += 1
                outcome = await self._store.lease(
                    acct.name, self.broker, acct.seq + 1, asks, spends, ttl_ms=self._ttl_ms,
                    now_ms=self._now_ms(), limits_version=acct.limits_version, identity=identity)
                if isinstance(outcome, Leased) and not outcome.applied:
                    # Not above the store's sequence: an earlier refresh landed unseen (its answer
                    # lost), or a restarted broker is behind its own. Nothing of this one was
                    # applied (none of its spends recorded): send it again above the store's.
                    acct.seq = max(acct.seq, outcome.seq)
                    continue
                break
        except StoreUnavailable as exc:
            return self._unreachable(acct, exc)
        if isinstance(outcome, Leased) and not outcome.applied:
            return self._unreachable(acct, StoreUnavailable(
                f"lease refresh not applied: the store's sequence for broker {self.broker} keeps moving "
                "(is another process running with this broker's memory file?)"))
        if isinstance(outcome, StaleLimits):
            acct.limits_version = outcome.version
            return await self._refresh(acct, grow, seen)
        if isinstance(outcome, Lost):
            acct.valid_until = 0.0  # nothing of it is spendable until the store is adopted
            if self._on_lost is not None:
                self._on_lost(acct.name, outcome.problem)
            return False
        assert isinstance(outcome, Leased)
        # No await from here until the book matches the store: a purchase held meanwhile would
        # see reported spend gone while the old (larger) grant still stood.
        self._on_refresh(True)
        acct.seq = outcome.seq
        acct.down = False
        for p in reported:
            for line in p.lines:
                acct.counters[p.counters[line.hold_index]].spent -= line.amount
            for key in p.touched():
                acct.counters[key].count -= 1
        # Spends only ever join the end of the list, and refreshes of an account take turns (its
        # lock): what was reported is its head. (A membership test per entry was quadratic: at
        # hundreds of purchases a second it cost more than the purchases.)
        del acct.pending[:len(reported)]
        for lease, grant in zip(leases, outcome.grants, strict=True):
            lease.returning = 0  # the store's grant is the truth now
            previous = lease.state.spent
            lease.granted, lease.state, lease.holders, lease.reclaim = (
                grant.granted, grant.state, grant.holders, grant.reclaim)
            lease.rate.observe(spent_now[lease.counter.key], now)
            lease.counter_rate.observe(max(0, grant.state.spent - previous), now)
            lease.recent = 0
            lease.largest = max(lease.largest, (seen or {}).get(lease.counter.key, 0))
            if lease.limit is not None:  # else no phase: nothing is known to size one with
                lease.phase = phase_of(lease.remaining, max(lease.counter_rate.per_s, lease.rate.per_s),
                                       grant.holders, lease.largest, lease.limit, lease.tier)
        acct.valid_until = now + self._ttl_s / 2  # never spend on a lease the store may think expired
        if self._journal is not None:
            # Recorded: one write acknowledges them all (a crash before it reports them again,
            # and the store finds them duplicates), with the next write.
            await self._journal.ack(*(p.entry_id for p in reported if p.entry_id), durable=False)
        return True

    def _unreachable(self, acct: _Account, exc: StoreUnavailable) -> bool:
        """A refresh the store did not answer: the leases stay as they were, less what it set aside
        (it may have been applied; the next applied refresh settles which). Purchases queued for
        the next refresh hear it now, rather than each wait out a store timeout of its own."""
        self._on_refresh(False)
        if not acct.down:
            log.warning("lease refresh of account %s failed (%s): spending what is left of the leases "
                        "until they expire", acct.name, exc)
        acct.down = True
        for waiter in acct.waiting:
            _answer(waiter, exc)
        acct.waiting.clear()
        return False

    def _target(self, lease: CounterLease, ask: int) -> int:
        """The lease this counter should have after a refresh, with `ask` (room purchases wait for
        now) in it; what is in use is kept anyway."""
        if lease.phase is None and not ask:
            # Known only from a previous run (its journal, its leases in the store) and its numbers
            # not read yet: no purchase needs a lease on it now.
            return 0
        if lease.reclaim or lease.phase in (Phase.SYNCHRONOUS, Phase.EXHAUSTED):
            # At the end, and while another broker was denied budget leases hold: nothing spare.
            return ask
        phase = lease.phase or Phase.GENEROUS  # a first purchase on it: demand pull, below
        size = lease_size(phase, lease.rate.per_s, lease.remaining, max(lease.holders, 1),
                          lease.largest, lease.tier)
        l_max = lease.remaining // (2 * max(lease.holders, 1))
        if lease.rate.gathered == 0 and phase == Phase.GENEROUS:
            # No rate known yet (demand pull, first refresh): a hundredth of what remains, or ten
            # purchases, so the first burst does not refresh for every purchase.
            size = max(size, min(l_max, max(10 * lease.largest, lease.remaining // 100)))
        # Before the smoothed rate has caught up with a burst: at least twice the last interval's
        # spend and asks (within L_max).
        return max(size, min(2 * lease.recent, l_max)) + ask

    async def grow(self, account: str, holds: Sequence[Hold], tiers: Sequence[Tier]) -> LeaseHold | None:
        """A purchase that did not fit the leases: the next refresh of its account asks for its room
        (one refresh for every purchase waiting by then), and holds it. None when the leases cannot
        take it (the counter is past leasing, or the store lent too little): the caller reserves in
        the store. StoreUnavailable when that refresh, or the one under way when it asked, failed, or
        no answer came within the store timeout of its asking: it is not sent to the store again."""
        need: dict[str, int] = {}
        leases = []
        for h, t in zip(holds, tiers, strict=True):
            leases.append(self.counter(account, h, t))
            need[h.counter.key] = need.get(h.counter.key, 0) + h.amount
        sizes = dict(need)
        past = [lease for lease in leases if lease.phase in (Phase.SYNCHRONOUS, Phase.EXHAUSTED)]
        if past:
            # Past leasing: give back what is spare on those counters now, so the store
            # reservation that follows is not denied by this broker's own lease. (Leases on the
            # purchase's other counters are kept: they are not what stops it.)
            if not any(lease.available > 0 for lease in past):
                return None
            need = {}
        acct = self._account(account)
        waiter = _Waiter(holds, tiers, need, sizes, asyncio.get_running_loop().create_future())
        acct.waiting.append(waiter)
        if acct.serving is None:
            acct.serving = serving = asyncio.create_task(self._serve(acct))
            self._serving.add(serving)
            serving.add_done_callback(lambda task: self._served(acct, task))
        answer = waiter.answer
        try:
            async with asyncio.timeout(self._store_timeout_s):
                return await asyncio.shield(answer)
        except TimeoutError:
            if _answered(answer):
                return answer.result()  # as the time ran out
            answer.cancel()  # the refresh serves it no more
            raise StoreUnavailable(f"no lease refresh answered within {self._store_timeout_s:g} s") from None
        except BaseException:
            # Told the refresh failed, or the purchase is gone (cancelled): then what was held for it
            # is let go.
            if _answered(answer) and (held := answer.result()) is not None:
                self.release(held)
            answer.cancel()
            raise

    @staticmethod
    def _lent_past(acct: _Account, waiter: _Waiter) -> bool:
        """A counter of the waiting purchase is past leasing, and this broker still holds a lease there."""
        return any((lease := acct.counters[h.counter.key]).phase in (Phase.SYNCHRONOUS, Phase.EXHAUSTED)
                   and lease.available > 0 for h in waiter.holds)

    def _served(self, acct: _Account, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if acct.serving is task:  # cancelled before it started (a shutdown): the next waiter starts one
            acct.serving = None

    async def _serve(self, acct: _Account) -> None:
        """Serve the purchases waiting for room: at once those that the refresh before this one made
        room for, the others with one refresh that asks for all of their room."""
        async with acct.lock:
            waiting = [w for w in acct.waiting if not w.answer.done()]
            acct.waiting, acct.serving = [], None  # purchases from now on wait for the next one
            pending = []
            for waiter in waiting:
                held = self.try_hold(acct.name, waiter.holds, waiter.tiers)
                if held is None:
                    pending.append(waiter)
                else:
                    waiter.answer.set_result(held)
            if not pending:
                return
            grow: dict[str, int] = {}
            seen: dict[str, int] = {}
            for waiter in pending:
                for key, amount in waiter.need.items():
                    grow[key] = grow.get(key, 0) + amount
                for key, amount in waiter.sizes.items():
                    seen[key] = max(seen.get(key, 0), amount)
            try:
                ok = await self._refresh(acct, grow, seen)
                if ok and any(self._lent_past(acct, waiter) for waiter in pending):
                    # That refresh lent on a counter it then found past leasing (too little left for
                    # the purchases asking): give it back, so the store reservations that follow
                    # are not denied by this broker's own lease.
                    ok = await self._refresh(acct, {})
            except Exception as exc:
                if not [waiter for waiter in pending if _answer(waiter, exc)]:
                    log.exception("lease refresh of account %s failed", acct.name)
                return
            except BaseException:  # cancelled (a shutdown): no purchase is left waiting for it
                for waiter in pending:
                    _answer(waiter, StoreUnavailable("the lease refresh was cancelled"))
                raise
            failed = StoreUnavailable("the lease refresh failed")
            for waiter in pending:
                if not ok:
                    _answer(waiter, failed)
                elif not waiter.answer.done():
                    waiter.answer.set_result(self.try_hold(acct.name, waiter.holds, waiter.tiers))

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every account every `refresh_s`, sooner when a lease is half used."""
        while not stop.is_set():
            self._due.clear()
            for name in list(self._accounts):
                try:
                    await self.refresh(name)
                except Exception:
                    log.exception("lease refresh of account %s failed", name)
            due = asyncio.ensure_future(self._due.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait((due, stopped), timeout=self.refresh_s, return_when=asyncio.FIRST_COMPLETED)
            due.cancel()
            stopped.cancel()

    async def close(self) -> None:
        """Report what was spent and give every lease back (a clean shutdown strands nothing)."""
        for name, acct in list(self._accounts.items()):
            for lease in acct.counters.values():
                lease.phase = Phase.EXHAUSTED  # target 0: keep only what is in flight
            with contextlib.suppress(StoreUnavailable):
                await self.refresh(name)
        if self._journal is not None:
            try:
                await self._journal.flush()
                self._journal.close()
            except OSError as exc:  # what it held is recovered at the next start, as after a crash
                log.warning("lease journal: the last records could not be written at shutdown (%s)", exc)

    # --- reading ---------------------------------------------------------------------------

    def view(self, account: str, counter: CounterRef) -> tuple[CounterState, Phase] | None:
        """The counter as this broker knows it: the last refresh's numbers plus its own spend since."""
        lease = self._account(account).counters.get(counter.key)
        if lease is None or lease.phase is None:
            return None  # not read from the store yet
        st = lease.state
        return (CounterState(st.spent + lease.spent, st.reserved - lease.spent, st.credit,
                             st.count + lease.count, st.leased), lease.phase)

    def phase(self, account: str, counter: CounterRef) -> str:
        """The phase of this broker's lease on `counter` ("" before its first lease). Reads only: a
        status read of an account this broker never leased on starts no book (nor refreshes) for it."""
        acct = self._accounts.get(account)
        lease = None if acct is None else acct.counters.get(counter.key)
        return "" if lease is None or lease.phase is None else lease.phase.value

    def leases(self, account: str) -> list[CounterLease]:
        return list(self._account(account).counters.values())

    # --- restart ---------------------------------------------------------------------------

    def _recover_pending(self, journal: Journal) -> None:
        """After a restart: spends journaled but not reported are reported at the first refresh;
        purchases cut off after their intent stay held until the upkeep rolls them forward."""
        for entry in journal.pending():
            if entry.intent:
                for h in entry.holds:
                    self._journaled(entry.account, h).held += h.amount
                self._cut_off.add((entry.account, entry.idempotency_key))
            else:
                self._adopt(entry)

    def _adopt(self, entry: JournalEntry) -> None:
        acct = self._account(entry.account)
        acct.pending.append(_Pending(entry.id, entry.idempotency_key, entry.lines,
                                     tuple(h.counter.key for h in entry.holds), entry.result))
        if entry.result:
            self._recovered[(entry.account, entry.idempotency_key)] = entry.result
            while len(self._recovered) > _RECOVERED_ANSWERS:
                self._recovered.popitem(last=False)
        for h in entry.holds:
            self._journaled(entry.account, h)
        for line in entry.lines:
            acct.counters[entry.holds[line.hold_index].counter.key].spent += line.amount
        for key in acct.pending[-1].touched():
            acct.counters[key].count += 1

    def _journaled(self, account: str, hold: Hold) -> CounterLease:
        """The lease of a journaled purchase's counter, that purchase counted in L_min (a restarted
        broker's phases know what it bought)."""
        lease = self.counter(account, hold, TIERS["standard"])
        lease.largest = max(lease.largest, hold.amount)
        return lease

    def pending_intents(self) -> list[JournalEntry]:
        """Journaled intents of purchases cut off by a restart (not those in flight now)."""
        if self._journal is None:
            return []
        return [e for e in self._journal.pending() if e.intent and e.id not in self._live]

    async def rolled_forward(self, entry: JournalEntry, lines: tuple[Line, ...], result: bytes) -> None:
        """A journaled intent settled with its Exchanges after a restart: its spend (and the answer
        a retry of its key is shown) joins the report."""
        assert self._journal is not None
        spend = await self._journal.append(entry.account, entry.idempotency_key, entry.holds, lines,
                                           self._now_ms(), result=result, settles=entry.id)
        for h in entry.holds:
            self.counter(entry.account, h, TIERS["standard"]).held -= h.amount
        self._cut_off.discard((entry.account, entry.idempotency_key))
        self._adopt(spend)

    # --- plumbing ---------------------------------------------------------------------------

    def _account(self, name: str) -> _Account:
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account(name)
        return acct

    def _now_ms(self) -> int:
        return to_ms(self._clock.now())


def _answered(answer: asyncio.Future[LeaseHold | None]) -> bool:
    """`answer` holds a result (a hold, or None), not an error, nor a cancellation."""
    return answer.done() and not answer.cancelled() and answer.exception() is None


def _answer(waiter: _Waiter, exc: Exception) -> bool:
    """Tell a waiting purchase that its refresh failed (unless it was answered, or gave up)."""
    if waiter.answer.done():
        return False
    waiter.answer.set_exception(exc)
    return True
