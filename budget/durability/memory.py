"""What this broker has seen of the budget store, kept in its state directory.

A store that lost its memory (Redis restarted without persistence, FLUSHALL, a
deleted SQLite file, a backup restored over newer data) must not hand every scope
its whole budget again. So each broker remembers, per account: the store's
identity and generation, the newest limits version, and every live counter's
highest `spent`. A store that shows less is refused until an operator adopts it
(`ramp-broker store adopt`), which seeds it from these files and raises its
generation; a broker that then sees the same identity at a newer generation
takes the store's numbers as its new baseline.

The file also holds the broker's instance id: the owner recorded with each hold
it makes, so that after a restart it can reclaim its own unsettled holds at once.
Written atomically (temporary file, fsync, rename); a torn or missing file is a
broker that has seen nothing yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from budget.durability.durable import sync_directory
from budget.stores.contract import CounterRef, StoreIdentity

log = logging.getLogger(__name__)


@dataclass
class CounterMark:
    counter: CounterRef
    spent: int  # the highest seen
    expire_at_ms: int  # forgotten after this (the counter's own lifetime)


@dataclass
class AccountMemory:
    identity: StoreIdentity | None = None
    limits_version: int = 0
    # Operator limits at that version, (scope, period) -> (currency, units) or None: what `store
    # adopt` re-applies to a store that lost them.
    limits: dict[tuple[str, str], tuple[str, int] | None] = field(default_factory=dict)
    counters: dict[str, CounterMark] = field(default_factory=dict)


class StoreMemory:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.instance = uuid.uuid4().hex
        self.accounts: dict[str, AccountMemory] = {}
        self._dirty = False
        self._lock = asyncio.Lock()
        if path is not None:
            self._load(path)

    # --- reading --------------------------------------------------------------------------

    def account(self, name: str) -> AccountMemory:
        memory = self.accounts.get(name)
        if memory is None:
            memory = self.accounts[name] = AccountMemory()
        return memory

    def floor(self, account: str, counter: CounterRef) -> int:
        mark = self.account(account).counters.get(counter.key)
        return 0 if mark is None else mark.spent

    # --- learning ---------------------------------------------------------------------------

    def saw_identity(self, account: str, identity: StoreIdentity) -> None:
        memory = self.account(account)
        if memory.identity != identity:
            adopted = memory.identity is not None and memory.identity.generation < identity.generation
            memory.identity = identity
            if adopted:
                # An operator adopted the store: its numbers are the baseline from here on.
                memory.counters.clear()
                memory.limits_version = 0
            self._dirty = True

    def saw_limits(
        self, account: str, version: int, values: dict[tuple[str, str], tuple[str, int] | None]
    ) -> None:
        memory = self.account(account)
        if version > memory.limits_version:
            memory.limits_version = version
            memory.limits = dict(values)
            self._dirty = True

    def saw_spent(self, account: str, counter: CounterRef, spent: int, expire_at_ms: int) -> None:
        marks = self.account(account).counters
        mark = marks.get(counter.key)
        if mark is None:
            marks[counter.key] = CounterMark(counter, spent, expire_at_ms)
            self._dirty = True
        elif spent > mark.spent:
            mark.spent = spent
            mark.expire_at_ms = max(mark.expire_at_ms, expire_at_ms)
            self._dirty = True

    def forget_expired(self, now_ms: int) -> None:
        for memory in self.accounts.values():
            for key in [k for k, m in memory.counters.items() if m.expire_at_ms < now_ms]:
                del memory.counters[key]
                self._dirty = True

    # --- the file ---------------------------------------------------------------------------

    async def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        async with self._lock:
            self._dirty = False
            text = json.dumps(self._document(), separators=(",", ":"))
            try:
                await asyncio.to_thread(_write_atomically, self.path, text)
            except OSError:
                self._dirty = True
                raise

    def _document(self) -> dict[str, Any]:
        return {"v": 1, "instance": self.instance, "accounts": {
            name: {
                "identity": asdict(m.identity) if m.identity else None,
                "limits_version": m.limits_version,
                "limits": [[scope, period, value[0] if value else None, value[1] if value else None]
                           for (scope, period), value in m.limits.items()],
                "counters": [{"counter": asdict(c.counter), "spent": c.spent, "expire_at_ms": c.expire_at_ms}
                             for c in m.counters.values()],
            } for name, m in self.accounts.items()}}

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._dirty = True  # write the instance id at the first save
            return
        except (OSError, ValueError) as exc:
            log.error("broker memory %s is unreadable (%s): starting from nothing", path, exc)
            self._dirty = True
            return
        self.instance = doc.get("instance") or self.instance
        for name, raw in doc.get("accounts", {}).items():
            memory = self.account(name)
            if raw.get("identity"):
                memory.identity = StoreIdentity(**raw["identity"])
            memory.limits_version = int(raw.get("limits_version", 0))
            memory.limits = {(scope, period): (cur, units) if cur is not None else None
                             for scope, period, cur, units in raw.get("limits", [])}
            for c in raw.get("counters", []):
                ref = CounterRef(**c["counter"])
                memory.counters[ref.key] = CounterMark(ref, int(c["spent"]), int(c["expire_at_ms"]))


def read_memory(path: Path) -> StoreMemory:
    """A broker's memory file, for `store adopt` (never written back)."""
    memory = StoreMemory(None)
    memory._load(path)
    return memory


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)
