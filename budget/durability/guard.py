"""Noticing a store that lost its memory (design invariant 11).

The guard compares each account's store with what this broker has seen of it
(budget.durability.memory): its identity and generation, the operator limits version, and
every counter's highest `spent`. A store that shows less (emptied, replaced, an
older copy) is flagged: the period layer refuses that account's purchases, open
scopes included, until the store is back as it was or an operator adopts it (a
newer generation of the same identity, whose numbers become the baseline).
Writes carry the identity and floors, so the store itself refuses them atomically
(budget.stores.contract: Lost, StoreLost); reads and upkeep are checked here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from budget.durability.memory import StoreMemory
from budget.stores.contract import CounterRef, CounterState, Limits, Store, StoreIdentity

log = logging.getLogger(__name__)
T = TypeVar("T")


class LostEvents(Protocol):
    def store_lost(self) -> None: ...


class StoreGuard:
    def __init__(
        self, store: Store, memory: StoreMemory | None, events: LostEvents,
        guarded: Callable[[str, Awaitable[StoreIdentity | None]], Awaitable[StoreIdentity | None]],
    ) -> None:
        self._store = store
        self._memory = memory
        self._events = events
        self._guarded = guarded  # the period layer's store-call wrapper (skips a failing store)
        self._lost: dict[str, str] = {}

    @property
    def instance(self) -> str:
        """This broker's id as the owner of the holds it makes ("" without a memory)."""
        return self._memory.instance if self._memory else ""

    # --- what the writes carry --------------------------------------------------------------

    async def identity(self, account: str) -> StoreIdentity | None:
        """The identity this broker has seen the account's store at; learnt (or, for a store that
        has none and a broker that has seen none, created) on first use. None: nothing checked."""
        if self._memory is None:
            return None
        memory = self._memory.account(account)
        if memory.identity is None:
            found = await self._guarded(account, self._store.identity(account))
            if found is None:
                fresh = StoreIdentity(uuid.uuid4().hex)
                found = await self._guarded(account, self._store.set_identity(account, fresh))
            assert found is not None
            self._memory.saw_identity(account, found)
            await self._memory.save()
        return memory.identity

    def seen_identity(self, account: str) -> StoreIdentity | None:
        """The identity seen so far, without asking the store."""
        return self._memory.account(account).identity if self._memory else None

    def floor(self, account: str, counter: CounterRef) -> int:
        return self._memory.floor(account, counter) if self._memory else 0

    # --- learning ---------------------------------------------------------------------------

    def saw(self, account: str, counter: CounterRef, state: CounterState, expire_at_ms: int) -> None:
        if self._memory is not None:
            self._memory.saw_spent(account, counter, state.spent, expire_at_ms)

    def saw_limits(self, account: str, limits: Limits) -> None:
        if self._memory is None:
            return
        seen = self._memory.account(account).limits_version
        if limits.version < seen:
            self.mark_lost(account, f"operator limits are at version {limits.version}, older than version "
                           f"{seen} seen before")
        self._memory.saw_limits(account, limits.version, limits.values)

    # --- losses -----------------------------------------------------------------------------

    def problem(self, account: str) -> str | None:
        """Why the account's store is refused, while it is."""
        return self._lost.get(account)

    def mark_lost(self, account: str, problem: str) -> None:
        if account not in self._lost:
            log.error("budget store of account %s lost data: %s. Purchases charged to it are refused "
                      "until an operator restores the store or adopts it (ramp-broker store adopt)",
                      account, problem)
            self._events.store_lost()
        self._lost[account] = problem

    async def check(self, account: str) -> bool:
        """Compare the store's identity with what this broker has seen (upkeep): flag a loss, clear it
        when the store is back as it was, take a newer generation (adopted) as the baseline. True when
        an adoption was taken (the caller reloads what it caches)."""
        if self._memory is None:
            return False
        seen = await self.identity(account)
        found = await self._store.identity(account)
        if (seen is not None and found is not None and found.id == seen.id
                and found.generation > seen.generation):
            self._memory.saw_identity(account, found)
            log.warning("budget store of account %s was adopted at generation %d: its numbers are the "
                        "baseline now", account, found.generation)
            self._lost.pop(account, None)
            return True
        if found is None or seen is None or found.id != seen.id or found.generation < seen.generation:
            self.mark_lost(account, "the store has no identity for this account (emptied, or a new store)"
                           if found is None else f"the store shows identity {found.id} generation "
                           f"{found.generation}, not what this broker saw")
        elif account in self._lost and not await self._below_floors(account):
            log.warning("budget store of account %s is back as it was: purchases resume", account)
            self._lost.pop(account, None)
        return False

    async def _below_floors(self, account: str) -> bool:
        assert self._memory is not None
        marks = list(self._memory.account(account).counters.values())
        states = await self._store.read(account, [m.counter for m in marks]) if marks else []
        low = [m for m, st in zip(marks, states, strict=True) if st.spent < m.spent]
        if low:
            self.mark_lost(account, f"counter {low[0].counter.key} shows less spent than seen before")
        return bool(low)

    # --- the file ---------------------------------------------------------------------------

    async def save(self, now_ms: int | None = None) -> None:
        """Keep what was seen (forgetting counters past their lifetime, given `now_ms`)."""
        if self._memory is None:
            return
        if now_ms is not None:
            self._memory.forget_expired(now_ms)
        await self._memory.save()
