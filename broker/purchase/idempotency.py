"""Broker-side idempotency: a retried Transact gets the first answer, never a second charge.

A key maps to the running (or finished) purchase, so a retry that arrives while
the original is still in flight waits for it instead of buying again. A key is
forgotten when its purchase failed before anything reached an Exchange, so the
agent can retry after fixing the cause (say, raising its budget). Keys are
(caller id, idempotency key): one caller's key never finds another's purchase.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from broker.refusals import InvalidField
from ramp.broker.v1 import broker_pb2 as bpb

Key = tuple[str, str]  # (caller id, idempotency key)


@dataclass(slots=True)
class Entry:
    """A key's purchase: its task while it runs; once it has answered, only the answer.

    The cache holds up to `idempotency_cache_size` keys (100,000 by default). A finished task
    keeps its coroutine and context alive: a dozen objects per key for the garbage collector to
    walk, and full collections of 40-90 ms with the loop stopped. An answer is one message."""

    fingerprint: str
    task: asyncio.Task[bpb.TransactResponse] | None
    answer: bpb.TransactResponse | None = None

    def __post_init__(self) -> None:
        if self.task is not None:
            self.task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[bpb.TransactResponse]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.answer, self.task = task.result(), None  # a failure keeps its task: retries see it

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def result(self) -> bpb.TransactResponse:
        """The purchase's answer (or its error), waiting for it if it runs; a caller that stops
        waiting does not cancel it."""
        if self.task is None:
            assert self.answer is not None
            return self.answer
        return await asyncio.shield(self.task)


class IdempotencyCache:
    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    def find(self, key: Key, fingerprint: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            raise InvalidField("idempotency_key", "was already used for a different request")
        self._entries.move_to_end(key)
        return entry

    def add(self, key: Key, entry: Entry) -> None:
        self._entries[key] = entry
        while len(self._entries) > self._size:
            oldest_key, oldest = next(iter(self._entries.items()))
            if oldest.running():
                break  # never forget a purchase still in flight
            del self._entries[oldest_key]

    def forget(self, key: Key, entry: Entry | None = None) -> None:
        """Forget `key` (only if it still maps to `entry`, when one is given)."""
        if key in self._entries and (entry is None or self._entries[key] is entry):
            del self._entries[key]
