"""Counters are derived: rebuild each one's spend from the ledger and compare.

Every commit appends ledger entries in the same atomic step as the counter
change, so for every live counter the sum of its ledger amounts must equal its
`spent`. A difference means something wrote a counter outside that step: it is
reported, and `repair` sets the counter to what the ledger says.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from budget.store import CounterRef, Store


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
