"""An operator adopting a budget store that lost its memory (`ramp-broker store adopt`).

Brokers refuse an account whose store shows less than they have seen (budget.durability.memory):
an emptied Redis, a deleted SQLite file, an old backup. Adopting it seeds it from
the brokers' memory files and raises its generation, after which every broker
takes the store's numbers as its new baseline:

1. every remembered counter whose store `spent` is below the highest mark any
   broker saw gets the difference as spend of kind "adopt", with a ledger line
   (so reconcile's counters == ledger still holds), once per generation and counter;
2. the operator limits of the memory with the newest limits version are set again;
3. the identity becomes the newest one seen (id of the highest generation), one
   generation higher than anything seen.

`compare` says, per memory file, how the store looks to that broker.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from budget.durability.memory import AccountMemory, CounterMark, StoreMemory
from budget.stores.contract import CounterRef, Hold, Line, Store, StoreIdentity
from currency.money import Money

ADOPT = "adopt"


@dataclass(frozen=True, slots=True)
class Remembered:
    """One memory file, as read."""

    path: Path
    memory: StoreMemory

    def of(self, account: str) -> AccountMemory | None:
        return self.memory.accounts.get(account)


@dataclass(frozen=True, slots=True)
class Restored:
    counter: CounterRef
    before: int  # the store's spent
    after: int  # the highest mark seen
    source: Path


@dataclass
class Adoption:
    account: str
    before: StoreIdentity | None
    after: StoreIdentity
    restored: list[Restored] = field(default_factory=list)
    # (scope, period, value) re-applied, and from which memory at which limits version.
    limits: list[tuple[str, str, tuple[str, int] | None]] = field(default_factory=list)
    limits_source: Path | None = None
    limits_version: int = 0


async def adopt(store: Store, account: str, memories: Sequence[Remembered], *, now_ms: int) -> Adoption:
    found = await store.identity(account)
    seen = [(r.path, m) for r in memories if (m := r.of(account)) is not None]
    identities = [m.identity for _, m in seen if m.identity is not None]
    top = max([i.generation for i in identities] + ([found.generation] if found else []), default=0)
    identity = StoreIdentity(_newest_id(identities, found), top + 1)
    adoption = Adoption(account, found, identity)

    # 1. Spend no broker may lose: the highest mark of every live counter, over every memory.
    marks: dict[str, tuple[CounterMark, Path]] = {}
    for path, m in seen:
        for key, mark in m.counters.items():
            if mark.expire_at_ms >= now_ms and (key not in marks or mark.spent > marks[key][0].spent):
                marks[key] = (mark, path)
    todo = sorted(marks.values(), key=lambda mp: mp[0].counter.key)
    states = await store.read(account, [mark.counter for mark, _ in todo]) if todo else []
    for (mark, path), state in zip(todo, states, strict=True):
        if state.spent >= mark.spent:
            continue
        diff, cur = mark.spent - state.spent, mark.counter.currency
        # Its own ledger line, once per generation and counter (a rerun after a crash adds nothing).
        await store.record_spend(
            account, [Hold(mark.counter, 0, 0, mark.expire_at_ms)],
            [Line(0, diff, Money.from_units(diff, cur).text(), cur, ADOPT, ADOPT, ADOPT)],
            idempotency_key=f"adopt:{identity.generation}:{mark.counter.key}", now_ms=now_ms, kind=ADOPT)
        adoption.restored.append(Restored(mark.counter, state.spent, mark.spent, path))

    # 2. Operator limits, as the memory with the newest version saw them.
    newest = max(seen, key=lambda pm: pm[1].limits_version, default=None)
    if newest is not None and newest[1].limits_version > 0:
        adoption.limits_source, adoption.limits_version = newest[0], newest[1].limits_version
        have = (await store.limits(account)).values
        for (scope, period), value in sorted(newest[1].limits.items()):
            if (scope, period) not in have or have[(scope, period)] != value:
                await store.set_limit(account, scope, period, value)
                adoption.limits.append((scope, period, value))

    # 3. Last: brokers take the store's numbers as their baseline once they see this.
    adoption.after = await store.set_identity(account, identity, replace=True)
    return adoption


def _newest_id(identities: Sequence[StoreIdentity], found: StoreIdentity | None) -> str:
    """The id of the highest generation seen (by brokers, or the store's own); on a tie the
    store's, then the one most brokers saw; a new one when nobody has any."""
    every = [*identities, *([found] if found is not None else [])]
    if not every:
        return uuid.uuid4().hex
    top = max(i.generation for i in every)
    ids = Counter(i.id for i in every if i.generation == top)
    if found is not None and found.id in ids:
        return found.id
    return min(ids, key=lambda i: (-ids[i], i))


# --- status ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    path: Path
    verdict: str  # "same", "lost", "older", "adopted", or "unseen" (never used this account)
    detail: str

    @property
    def refused(self) -> bool:
        """That broker refuses the account's purchases until an operator acts."""
        return self.verdict in ("lost", "older")


async def compare(
    store: Store, account: str, memories: Sequence[Remembered], *, now_ms: int
) -> tuple[StoreIdentity | None, list[Comparison]]:
    found = await store.identity(account)
    limits = await store.limits(account)
    out = []
    for r in memories:
        m = r.of(account)
        seen = m.identity if m is not None else None
        if m is None or seen is None:
            out.append(Comparison(r.path, "unseen", "this broker has not used the account's store"))
        elif found is None:
            out.append(Comparison(r.path, "lost", "the store has no identity for the account (emptied, or "
                                  f"a new store); this broker saw {seen.id} generation {seen.generation}"))
        elif found.id != seen.id:
            out.append(Comparison(r.path, "lost", f"the store is another one: identity {found.id}, this "
                                  f"broker saw {seen.id}"))
        elif found.generation < seen.generation:
            out.append(Comparison(r.path, "older", f"the store is at generation {found.generation}, this "
                                  f"broker saw generation {seen.generation} (restored from an older copy)"))
        elif found.generation > seen.generation:
            out.append(Comparison(r.path, "adopted", f"adopted at generation {found.generation} since this "
                                  f"broker saw generation {seen.generation}: it takes the store's numbers "
                                  "as its baseline"))
        else:
            out.append(await _same_identity(store, account, r.path, m, limits.version, now_ms))
    return found, out


async def _same_identity(
    store: Store, account: str, path: Path, m: AccountMemory, limits_version: int, now_ms: int
) -> Comparison:
    if limits_version < m.limits_version:
        return Comparison(path, "older", f"operator limits are at version {limits_version}, this broker "
                          f"saw version {m.limits_version}")
    marks = [mark for mark in m.counters.values() if mark.expire_at_ms >= now_ms]
    states = await store.read(account, [mark.counter for mark in marks]) if marks else []
    low = [(mark, st) for mark, st in zip(marks, states, strict=True) if st.spent < mark.spent]
    if low:
        mark, st = low[0]
        cur = mark.counter.currency
        return Comparison(path, "older", f"{len(low)} counter(s) show less spent than this broker saw, "
                          f"e.g. {mark.counter.key}: {Money.from_units(st.spent, cur)}, seen "
                          f"{Money.from_units(mark.spent, cur)}")
    return Comparison(path, "same", "the store shows everything this broker saw")
