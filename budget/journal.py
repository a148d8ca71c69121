"""The fail-open journal: spends made while the store was unreachable.

An append-only file of JSON lines, fsynced before the purchase's answer is
sent. Each spend has an id; once the store has recorded it (idempotently, under
the purchase's own idempotency key), an ack line follows. A crash between the two
only means the spend is offered to the store again, which records it once. When
everything is acknowledged the file is truncated.

A purchase on the fail-open allowance journals its *intent* first (the requests it
is about to send, budget.intents), fsynced before any Exchange is called, and
acknowledges it once its spend is journaled. An intent still pending at start was
cut off (a crash between the Exchange's charge and the spend entry): it is rolled
forward (re-sent under its key, answered from the Exchange's dedupe record) and
its spend recorded, so the allowance never loses count of a charge.

The purchase's key, not the entry's id: the Exchange charges a key once, so the
store must count it once too, whether this broker's commit landed after all
(its answer lost to a timeout), another broker journaled a retry of the same key
during the outage, or committed one after it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from budget.store import CounterRef, Hold, Line


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: str
    account: str
    idempotency_key: str
    holds: tuple[Hold, ...]
    lines: tuple[Line, ...]
    at_ms: int
    intent: bytes = b""  # an intent entry (no lines yet): roll it forward if it is still pending

    @property
    def store_key(self) -> str:
        """The key the store records this spend under, once: the purchase's idempotency key."""
        return self.idempotency_key


def _hold(d: dict[str, Any]) -> Hold:
    return Hold(counter=CounterRef(**d["counter"]), amount=d["amount"], limit=d["limit"],
                expire_at_ms=d["expire_at_ms"])


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self._pending: dict[str, JournalEntry] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash mid-write: that spend was never answered
            if "ack" in d:
                self._pending.pop(d["ack"], None)
                continue
            self._pending[d["id"]] = JournalEntry(
                id=d["id"], account=d["account"], idempotency_key=d["idempotency_key"],
                holds=tuple(_hold(h) for h in d["holds"]),
                lines=tuple(Line(**ln) for ln in d["lines"]), at_ms=d["at_ms"],
                intent=base64.b64decode(d.get("intent", "")),
            )

    def pending(self) -> list[JournalEntry]:
        return list(self._pending.values())

    async def append(
        self, account: str, idempotency_key: str, holds: tuple[Hold, ...], lines: tuple[Line, ...],
        at_ms: int, intent: bytes = b"",
    ) -> JournalEntry:
        entry = JournalEntry(uuid.uuid4().hex, account, idempotency_key, holds, lines, at_ms, intent)
        record = {"id": entry.id, "account": account, "idempotency_key": idempotency_key,
                  "holds": [asdict(h) for h in holds], "lines": [asdict(ln) for ln in lines],
                  "at_ms": at_ms, **({"intent": base64.b64encode(intent).decode()} if intent else {})}
        async with self._lock:
            await asyncio.to_thread(self._write, json.dumps(record, separators=(",", ":")))
            self._pending[entry.id] = entry
        return entry

    async def ack(self, entry_id: str) -> None:
        async with self._lock:
            self._pending.pop(entry_id, None)
            if self._pending:
                await asyncio.to_thread(self._write, json.dumps({"ack": entry_id}))
            else:
                await asyncio.to_thread(self._truncate)

    def _write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _truncate(self) -> None:
        if self.path.exists():
            with self.path.open("w", encoding="utf-8") as f:
                f.flush()
                os.fsync(f.fileno())
