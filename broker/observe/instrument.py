"""Timing every call the broker makes out: to the budget store and to Exchanges.

Both wrappers keep the wrapped object's contract exactly; they only measure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from budget.stores.contract import (
    BrokerLease,
    Committed,
    CounterRef,
    CounterState,
    Hold,
    LeaseAsk,
    LeaseOutcome,
    LeaseSpend,
    LedgerEntry,
    Limits,
    Line,
    ReserveOutcome,
    Store,
    StoreIdentity,
    StoreUnavailable,
    Swept,
    UnsettledHold,
)
from exchange_client.adapter import ExchangeAdapter, ExchangeError
from ramp.v1 import ramp_pb2 as rpb

T = TypeVar("T")
StoreObserver = Callable[[str, float, bool], None]  # operation, seconds, failed
ExchangeObserver = Callable[[str, str, float, str | None], None]  # exchange, method, seconds, error


class TimedStore:
    """A Store whose calls are timed; StoreUnavailable counts as a store error."""

    def __init__(self, store: Store, observe: StoreObserver) -> None:
        self.inner = store
        self._observe = observe

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return await call
        except StoreUnavailable:
            failed = True
            raise
        finally:
            self._observe(operation, time.perf_counter() - started, failed)

    async def reserve(
        self, account: str, holds: Sequence[Hold], *, ttl_ms: int, idempotency_key: str,
        now_ms: int, limits_version: int, intent: bytes = b"", owner: str = "",
        identity: StoreIdentity | None = None,
    ) -> ReserveOutcome:
        return await self._timed("reserve", self.inner.reserve(
            account, holds, ttl_ms=ttl_ms, idempotency_key=idempotency_key, now_ms=now_ms,
            limits_version=limits_version, intent=intent, owner=owner, identity=identity))

    async def commit(
        self, account: str, reservation_id: str, holds: Sequence[Hold], lines: Sequence[Line], *,
        idempotency_key: str, result: bytes, now_ms: int, part: int = 0, release: Sequence[int] = (),
        final: bool = True, identity: StoreIdentity | None = None, parts: int = 1,
        nothing_charged: Sequence[int] = (),
    ) -> Committed:
        return await self._timed("commit", self.inner.commit(
            account, reservation_id, holds, lines, idempotency_key=idempotency_key, result=result,
            now_ms=now_ms, part=part, release=release, final=final, identity=identity, parts=parts,
            nothing_charged=nothing_charged))

    async def settled(self, account: str, idempotency_key: str) -> bytes | None:
        return await self._timed("settled", self.inner.settled(account, idempotency_key))

    async def release(self, account: str, reservation_id: str, *, now_ms: int) -> bool:
        return await self._timed("release", self.inner.release(account, reservation_id, now_ms=now_ms))

    async def sweep(
        self, account: str, *, now_ms: int, batch: int = 100, lease_ms: int = 0, taker: str = "",
        reclaim: bool = False,
    ) -> Swept:
        return await self._timed("sweep", self.inner.sweep(
            account, now_ms=now_ms, batch=batch, lease_ms=lease_ms, taker=taker, reclaim=reclaim))

    async def lease(
        self, account: str, broker: str, seq: int, asks: Sequence[LeaseAsk],
        spends: Sequence[LeaseSpend], *, ttl_ms: int, now_ms: int, limits_version: int,
        identity: StoreIdentity | None = None,
    ) -> LeaseOutcome:
        return await self._timed("lease", self.inner.lease(
            account, broker, seq, asks, spends, ttl_ms=ttl_ms, now_ms=now_ms,
            limits_version=limits_version, identity=identity))

    async def leases(self, account: str) -> list[BrokerLease]:
        return await self._timed("leases", self.inner.leases(account))

    async def release_leases(self, account: str, broker: str, *, as_spent: bool, now_ms: int) -> int:
        return await self._timed("release_leases", self.inner.release_leases(
            account, broker, as_spent=as_spent, now_ms=now_ms))

    async def holds(self, account: str) -> list[UnsettledHold]:
        return await self._timed("holds", self.inner.holds(account))

    async def identity(self, account: str) -> StoreIdentity | None:
        return await self._timed("identity", self.inner.identity(account))

    async def set_identity(
        self, account: str, identity: StoreIdentity, *, replace: bool = False
    ) -> StoreIdentity:
        return await self._timed("set_identity", self.inner.set_identity(account, identity, replace=replace))

    async def read(self, account: str, counters: Sequence[CounterRef]) -> list[CounterState]:
        return await self._timed("read", self.inner.read(account, counters))

    async def add_credit(self, account: str, counter: CounterRef, amount: int, *, expire_at_ms: int) -> None:
        await self._timed("add_credit", self.inner.add_credit(
            account, counter, amount, expire_at_ms=expire_at_ms))

    async def limits(self, account: str) -> Limits:
        return await self._timed("limits", self.inner.limits(account))

    async def set_limit(
        self, account: str, scope: str, period: str, value: tuple[str, int] | None
    ) -> int:
        return await self._timed("set_limit", self.inner.set_limit(account, scope, period, value))

    async def record_spend(
        self, account: str, holds: Sequence[Hold], lines: Sequence[Line], *, idempotency_key: str,
        now_ms: int, kind: str, identity: StoreIdentity | None = None, result: bytes = b"",
    ) -> bool:
        return await self._timed("record_spend", self.inner.record_spend(
            account, holds, lines, idempotency_key=idempotency_key, now_ms=now_ms, kind=kind,
            identity=identity, result=result))

    async def claim(self, account: str, name: str, *, expire_at_ms: int, now_ms: int) -> bool:
        return await self._timed("claim", self.inner.claim(
            account, name, expire_at_ms=expire_at_ms, now_ms=now_ms))

    def ledger(self, account: str, *, scope: str | None = None) -> AsyncIterator[LedgerEntry]:
        return self.inner.ledger(account, scope=scope)

    def counters(self, account: str) -> AsyncIterator[tuple[CounterRef, CounterState]]:
        return self.inner.counters(account)

    async def overwrite_spent(self, account: str, counter: CounterRef, spent: int, count: int) -> None:
        await self.inner.overwrite_spent(account, counter, spent, count)

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        await self._timed("put_blob", self.inner.put_blob(name, data, ttl_ms=ttl_ms, now_ms=now_ms))

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        return await self._timed("get_blob", self.inner.get_blob(name, now_ms=now_ms))

    async def close(self) -> None:
        await self.inner.close()


class TimedExchange:
    """An ExchangeAdapter whose calls are timed; an ExchangeError counts by its kind."""

    def __init__(self, adapter: ExchangeAdapter, observe: ExchangeObserver) -> None:
        self.inner = adapter
        self._observe = observe

    @property
    def name(self) -> str:
        return self.inner.name

    async def _timed(self, method: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        error: str | None = None
        try:
            return await call
        except ExchangeError as exc:
            error = exc.kind
            raise
        finally:
            self._observe(self.inner.name, method, time.perf_counter() - started, error)

    async def discover(self, query: rpb.ResourceQuery, timeout_s: float) -> rpb.ResourceResponse:
        return await self._timed("discover", self.inner.discover(query, timeout_s))

    async def execute(
        self, request: rpb.TransactionRequest, timeout_s: float
    ) -> rpb.TransactionResponse:
        return await self._timed("execute", self.inner.execute(request, timeout_s))

    async def close(self) -> None:
        await self.inner.close()
