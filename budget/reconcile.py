"""Counters are derived: rebuild each one's spend from the ledger and compare.

Every commit appends ledger entries in the same atomic step as the counter
change, so for every live counter the sum of its ledger amounts must equal its
`spent`. A difference means something wrote a counter outside that step: it is
reported, and `repair` sets the counter to what the ledger says.

The ledger in turn answers to the Exchanges: every charge an Exchange made must
be in it, at what the Exchange charged (invariant 10). `settle_holds` re-asks
every open hold with an intent (rolling it forward), and `compare_statement`
compares an Exchange's statement of charges, per idempotency key, with the
ledger's original amounts for that Exchange.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from budget.stores.contract import CounterRef, Store, UnsettledHold

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Difference:
    account: str
    counter: CounterRef
    counter_spent: int
    ledger_spent: int
    ledger_entries: int


@dataclass
class Report:
    counters: int = 0
    entries: int = 0
    differences: list[Difference] = field(default_factory=list)
    # Ledger entries whose counter has expired from the store (kept for audit only).
    orphaned_entries: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences


# Called with (accounts done, accounts in all): once before the first account, then after each.
Progress = Callable[[int, int], None]


async def reconcile(
    store: Store, accounts: Iterable[str], *, repair: bool = False, progress: Progress | None = None,
) -> Report:
    report = Report()
    todo = list(accounts)
    if progress is not None:
        progress(0, len(todo))
    for done, account in enumerate(todo, 1):
        sums: dict[str, int] = defaultdict(int)
        counts: dict[str, int] = defaultdict(int)
        async for entry in store.ledger(account):
            key = entry.counter_key
            sums[key] += entry.amount
            counts[key] += 1
            report.entries += 1
        seen: set[str] = set()
        async for ref, state in store.counters(account):
            report.counters += 1
            seen.add(ref.key)
            if state.spent != sums.get(ref.key, 0):
                report.differences.append(
                    Difference(account, ref, state.spent, sums.get(ref.key, 0), counts.get(ref.key, 0)))
                if repair:
                    await store.overwrite_spent(account, ref, sums.get(ref.key, 0), state.count)
        report.orphaned_entries += sum(n for key, n in counts.items() if key not in seen)
        if progress is not None:
            progress(done, len(todo))
    return report


# --- holds: re-ask the Exchanges ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldCheck:
    account: str
    reservation_id: str
    key: str  # the store's (caller-scoped) idempotency key
    settled: bool
    problem: str = ""  # why it is still doubtful


# Rolls one hold forward: its stored answer once settled, None while an Exchange does not answer.
Roller = Callable[[str, UnsettledHold], Awaitable[bytes | None]]


async def settle_holds(store: Store, accounts: Iterable[str], roll: Roller) -> list[HoldCheck]:
    """Every open hold with an intent, re-sent to its Exchanges and committed with their answers;
    the ones still unsettled afterwards are doubtful (an Exchange may have charged them)."""
    checks = []
    for account in accounts:
        for hold in await store.holds(account):
            try:
                settled = await roll(account, hold) is not None
                problem = "" if settled else "an Exchange did not answer (or its intent is unreadable)"
            except Exception as exc:  # one hold's failure must not hide the others'
                log.exception("re-asking hold %s failed", hold.reservation_id)
                settled, problem = False, f"{type(exc).__name__}: {exc}"
            checks.append(HoldCheck(account, hold.reservation_id, hold.idempotency_key, settled, problem))
    return checks


# --- statements: the Exchanges' word against the ledger -------------------------------------------


@dataclass(frozen=True, slots=True)
class Charged:
    """One charged item: which offer, and what it cost as the Exchange charged it."""

    offer_id: str
    amount: Decimal
    currency: str

    def __str__(self) -> str:
        return f"{self.offer_id} {self.amount} {self.currency}"


@dataclass
class KeyCharges:
    """What the ledger records under one Exchange key, for one Exchange."""

    ledger_keys: set[str] = field(default_factory=set)
    # (ledger key, offer, uri) -> the item: one entry per counter, the same item on each.
    items: dict[tuple[str, str, str], Charged] = field(default_factory=dict)
    newest_ms: int = 0

    def charged(self) -> Counter[Charged]:
        return Counter(self.items.values())


# exchange -> Exchange key -> what the ledger says
LedgerCharges = dict[str, dict[str, KeyCharges]]
# Kinds of ledger entries that are not an Exchange's charge (an operator's adoption of a store).
_NOT_CHARGES = frozenset({"adopt"})


async def ledger_charges(
    store: Store, accounts: Iterable[str], exchange_key: Callable[[str], str]
) -> LedgerCharges:
    """The ledger's items per Exchange and per the key each Exchange was sent (`exchange_key` maps
    a ledger key to it)."""
    out: LedgerCharges = defaultdict(dict)
    for account in accounts:
        async for e in store.ledger(account):
            if e.kind in _NOT_CHARGES:
                continue
            key = exchange_key(e.idempotency_key)
            charges = out[e.exchange].setdefault(key, KeyCharges())
            charges.ledger_keys.add(e.idempotency_key)
            charges.newest_ms = max(charges.newest_ms, e.committed_at_ms)
            try:
                amount = Decimal(e.original_amount)
            except InvalidOperation:
                amount = Decimal(-1)  # never equal to a charge: shown as a difference
            charges.items.setdefault((e.idempotency_key, e.offer_id, e.uri),
                                     Charged(e.offer_id, amount, e.original_currency))
    return out


@dataclass(frozen=True, slots=True)
class ChargeDifference:
    exchange: str
    key: str  # as the Exchange was sent it
    ledger_keys: tuple[str, ...]  # the ledger's keys for it; empty: the ledger has none
    exchange_says: tuple[Charged, ...]
    ledger_says: tuple[Charged, ...]


@dataclass
class StatementReport:
    exchange: str
    keys: int = 0  # compared
    skipped: int = 0  # not compared: an open hold, or ledger entries newer than the statement
    differences: list[ChargeDifference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_statement(
    exchange: str, statement: Iterable[tuple[str, Charged]], ledger: dict[str, KeyCharges], *,
    open_keys: Iterable[str] = (), read_at_ms: int | None = None,
) -> StatementReport:
    """Per Exchange key, the Exchange's charges (nonzero ones) against the ledger's items.

    Keys with a hold still open are skipped (already reported as doubtful), and so are keys the
    ledger recorded after the statement was read (a purchase that finished meanwhile)."""
    said: dict[str, Counter[Charged]] = defaultdict(Counter)
    for key, charge in statement:
        if charge.amount:
            said[key][charge] += 1
    skip = set(open_keys)
    report = StatementReport(exchange)
    for key in sorted(set(said) | set(ledger)):
        recorded = ledger.get(key, KeyCharges())
        if key in skip or (read_at_ms is not None and recorded.newest_ms > read_at_ms):
            report.skipped += 1
            continue
        report.keys += 1
        theirs = said.get(key, Counter())
        ours = Counter({c: n for c, n in recorded.charged().items() if c.amount})
        if theirs != ours:
            report.differences.append(ChargeDifference(
                exchange, key, tuple(sorted(recorded.ledger_keys)),
                tuple(sorted(theirs.elements(), key=str)), tuple(sorted(ours.elements(), key=str))))
    return report

