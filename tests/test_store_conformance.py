"""The budget store contract (budget.store.Store), run against every implementation.

Each test gets a fresh, empty store: SQLite in its own temporary file, Redis on the
session's redis-server under its own key prefix. Times are injected (never the wall
clock); T0 lies far in the future so that a store turning `expire_at_ms` into a real
Redis expiry keeps its keys for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from budget.store import (
    Committed,
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    LedgerEntry,
    Limits,
    Line,
    Reserved,
    ReserveOutcome,
    Settled,
    StaleLimits,
    Store,
)

USD = 1_000_000_000  # nano-units
SECOND = 1000
DAY = 86_400_000
T0 = 4_000_000_000_000  # 2096-10-02T07:06:40Z
GRACE = 7 * DAY
TIMEOUT_MS = 10_000  # generous: the concurrency test queues hundreds of calls
ACCT = "acme"
KINDS = ["sqlite", "redis"]

# Windows that contain T0 (computed with budget.periods in UTC).
MONTH = ("month", "2096-10", 3_999_888_000_000, 4_002_566_400_000)
DAY_W = ("day", "2096-10-02", 3_999_974_400_000, 4_000_060_800_000)


def counter(scope: str, window: tuple[str, str, int, int] = MONTH, currency: str = "USD") -> CounterRef:
    period, wid, start_ms, end_ms = window
    return CounterRef(scope=scope, period=period, window=wid, currency=currency, start_ms=start_ms,
                      end_ms=end_ms)


ALICE = counter("user:alice")
ENG = counter("team:eng", currency="EUR")  # another currency: ledger entries carry the counter's
ORG_DAY = counter("org:acme", DAY_W)


def hold(c: CounterRef, amount: int, limit: int) -> Hold:
    return Hold(counter=c, amount=amount, limit=limit, expire_at_ms=c.end_ms + GRACE)


def decimal(nanos: int) -> str:
    return f"{nanos // USD}.{nanos % USD:09d}"


def line(index: int, amount: int, *, uri: str = "https://ex.test/a", offer: str = "o-1") -> Line:
    return Line(hold_index=index, amount=amount, original_amount=decimal(amount), original_currency="USD",
                exchange="ex-1", offer_id=offer, uri=uri)


@contextlib.asynccontextmanager
async def open_store(kind: str, *, redis_url: str, directory: Path) -> AsyncIterator[Store]:
    # Imported here so the suite still collects while an implementation is missing.
    store: Store
    if kind == "sqlite":
        from budget.sqlite_store import SqliteStore

        store = await SqliteStore.open(directory / "b.sqlite3", timeout_ms=TIMEOUT_MS)
    else:
        from budget.redis_store import RedisStore

        # A fresh prefix per store: tests share one redis-server.
        store = await RedisStore.open(redis_url, timeout_ms=TIMEOUT_MS, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    # Only start the session redis-server when a redis case actually runs.
    url: str = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    async with open_store(request.param, redis_url=url, directory=tmp_path) as s:
        yield s


# --- small helpers ------------------------------------------------------------------


async def version(store: Store, account: str = ACCT) -> int:
    return (await store.limits(account)).version


async def reserve(
    store: Store, holds: Sequence[Hold], *, key: str, now: int = T0, ttl: int = 60 * SECOND,
    account: str = ACCT, limits_version: int | None = None,
) -> ReserveOutcome:
    v = await version(store, account) if limits_version is None else limits_version
    return await store.reserve(account, holds, ttl_ms=ttl, idempotency_key=key, now_ms=now,
                               limits_version=v)


async def reserved(
    store: Store, holds: Sequence[Hold], *, key: str, now: int = T0, ttl: int = 60 * SECOND,
    account: str = ACCT,
) -> Reserved:
    out = await reserve(store, holds, key=key, now=now, ttl=ttl, account=account)
    assert isinstance(out, Reserved), out
    assert out.expires_at_ms == now + ttl
    return out


async def commit(
    store: Store, r: Reserved, holds: Sequence[Hold], lines: Sequence[Line], *, key: str,
    now: int = T0 + SECOND, result: bytes = b"result", account: str = ACCT,
) -> Committed:
    return await store.commit(account, r.reservation_id, holds, lines, idempotency_key=key, result=result,
                              now_ms=now)


async def read(store: Store, counters: Sequence[CounterRef], account: str = ACCT) -> list[CounterState]:
    return await store.read(account, counters)


async def ledger(store: Store, account: str = ACCT, scope: str | None = None) -> list[LedgerEntry]:
    return [e async for e in store.ledger(account, scope=scope)]


async def live_counters(store: Store, account: str = ACCT) -> dict[str, tuple[CounterRef, CounterState]]:
    return {ref.key: (ref, state) async for ref, state in store.counters(account)}


def ledger_sums(entries: Sequence[LedgerEntry]) -> dict[str, int]:
    sums: dict[str, int] = defaultdict(int)
    for e in entries:
        sums[e.counter_key] += e.amount
    return dict(sums)


def state(spent: int = 0, reserved: int = 0, credit: int = 0, count: int = 0) -> CounterState:
    return CounterState(spent=spent, reserved=reserved, credit=credit, count=count)


# --- reads and limits ---------------------------------------------------------------


async def test_empty_store_reads_zeros(store: Store) -> None:
    assert await read(store, [ALICE, ENG]) == [CounterState(), CounterState()]
    limits = await store.limits(ACCT)
    assert limits.values == {}
    assert await ledger(store) == []
    assert await live_counters(store) == {}
    assert await store.sweep(ACCT, now_ms=T0) == 0


async def test_set_limit_bumps_version_and_limits_lists_values(store: Store) -> None:
    v0 = await version(store)
    v1 = await store.set_limit(ACCT, "user:alice", "month", ("USD", 10 * USD))
    assert v1 > v0
    assert await store.limits(ACCT) == Limits(v1, {("user:alice", "month"): ("USD", 10 * USD)})
    v2 = await store.set_limit(ACCT, "team:eng", "30d", ("EUR", 3))
    assert v2 > v1
    # None records an operator's removal; it must be listed, not dropped.
    v3 = await store.set_limit(ACCT, "user:alice", "month", None)
    assert v3 > v2
    assert await store.limits(ACCT) == Limits(v3, {("user:alice", "month"): None,
                                                   ("team:eng", "30d"): ("EUR", 3)})


async def test_stale_limits_version_is_refused_and_holds_nothing(store: Store) -> None:
    v0 = await version(store)
    v1 = await store.set_limit(ACCT, "user:alice", "month", ("USD", 10 * USD))
    holds = [hold(ALICE, USD, 10 * USD)]
    assert await reserve(store, holds, key="k", limits_version=v0) == StaleLimits(v1)
    assert await reserve(store, holds, key="k", limits_version=v1 + 1) == StaleLimits(v1)
    assert await read(store, [ALICE]) == [state()]
    # The refusal consumed nothing: the key reserves at the current version.
    out = await reserve(store, holds, key="k", limits_version=v1)
    assert isinstance(out, Reserved)


async def test_stale_limits_is_checked_before_the_idempotency_key(store: Store) -> None:
    holds = [hold(ALICE, USD, 10 * USD)]
    v0 = await version(store)
    r_open = await reserved(store, holds, key="open")
    r_done = await reserved(store, holds, key="done")
    await commit(store, r_done, holds, [line(0, USD)], key="done", result=b"done")
    v1 = await store.set_limit(ACCT, "user:alice", "month", ("USD", 5 * USD))
    assert await reserve(store, holds, key="open", limits_version=v0) == StaleLimits(v1)
    assert await reserve(store, holds, key="done", limits_version=v0) == StaleLimits(v1)
    assert await reserve(store, holds, key="open", limits_version=v1) == InFlight(r_open.reservation_id)
    assert await reserve(store, holds, key="done", limits_version=v1) == Settled(b"done")


# --- reserve ------------------------------------------------------------------------


async def test_reserve_holds_the_amount_on_every_counter(store: Store) -> None:
    holds = [hold(ALICE, 3 * USD, 10 * USD), hold(ENG, 2 * USD, 5 * USD), hold(ORG_DAY, 1, 1)]
    r = await reserved(store, holds, key="k", ttl=30 * SECOND)
    assert r.reservation_id
    assert await read(store, [ALICE, ENG, ORG_DAY]) == [state(reserved=3 * USD), state(reserved=2 * USD),
                                                         state(reserved=1)]
    r2 = await reserved(store, holds[:1], key="k2")
    assert r2.reservation_id != r.reservation_id
    assert await read(store, [ALICE]) == [state(reserved=6 * USD)]


async def test_reserve_exact_fit_is_allowed_one_more_nano_is_denied(store: Store) -> None:
    await reserved(store, [hold(ALICE, 10 * USD, 10 * USD)], key="all")
    out = await reserve(store, [hold(ALICE, 1, 10 * USD)], key="one-more")
    assert out == Denied(0, state(reserved=10 * USD))


async def test_denied_reports_the_first_failing_hold_and_holds_nothing(store: Store) -> None:
    await reserved(store, [hold(ENG, 4 * USD, 5 * USD)], key="pre")
    before = await read(store, [ALICE, ENG, ORG_DAY])
    # Index 1 and 2 both fail; index 0 alone would fit.
    holds = [hold(ALICE, 3 * USD, 10 * USD), hold(ENG, 2 * USD, 5 * USD), hold(ORG_DAY, 20 * USD, 10 * USD)]
    out = await reserve(store, holds, key="k")
    assert out == Denied(1, before[1])
    assert await read(store, [ALICE, ENG, ORG_DAY]) == before  # all or none: ALICE untouched too
    out = await reserve(store, [holds[0], holds[2], holds[1]], key="k")
    assert out == Denied(1, before[2])
    assert await read(store, [ALICE, ENG, ORG_DAY]) == before


async def test_denied_key_may_reserve_again(store: Store) -> None:
    out = await reserve(store, [hold(ALICE, 11 * USD, 10 * USD)], key="k")
    assert isinstance(out, Denied)
    await reserved(store, [hold(ALICE, 9 * USD, 10 * USD)], key="k")
    assert await read(store, [ALICE]) == [state(reserved=9 * USD)]


async def test_credit_raises_the_limit(store: Store) -> None:
    await store.add_credit(ACCT, ALICE, 5 * USD, expire_at_ms=ALICE.end_ms + GRACE)
    assert await read(store, [ALICE]) == [state(credit=5 * USD)]
    await reserved(store, [hold(ALICE, 12 * USD, 10 * USD)], key="a")  # 12 <= 10 + 5
    out = await reserve(store, [hold(ALICE, 4 * USD, 10 * USD)], key="b")
    assert out == Denied(0, state(reserved=12 * USD, credit=5 * USD))
    await store.add_credit(ACCT, ALICE, USD, expire_at_ms=ALICE.end_ms + GRACE)  # credits add up
    await reserved(store, [hold(ALICE, 4 * USD, 10 * USD)], key="b")
    assert await read(store, [ALICE]) == [state(reserved=16 * USD, credit=6 * USD)]


async def test_settled_after_commit_returns_the_result_and_charges_nothing(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD), hold(ENG, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    result = b'{"items": 1}\x00\xff binary'  # stored as bytes, not text
    await commit(store, r, holds, [line(0, USD), line(1, USD)], key="k", result=result)
    before = (await read(store, [ALICE, ENG]), await ledger(store))
    assert await reserve(store, holds, key="k", now=T0 + DAY) == Settled(result)
    assert (await read(store, [ALICE, ENG]), await ledger(store)) == before


async def test_commit_reports_the_counters_as_it_left_them(store: Store) -> None:
    holds = [hold(ALICE, 3 * USD, 10 * USD), hold(ENG, 3 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await reserved(store, [hold(ALICE, USD, 10 * USD)], key="other")  # still held afterwards
    done = await commit(store, r, holds, [line(0, 2 * USD), line(1, 2 * USD)], key="k")
    assert list(done.states) == await read(store, [ALICE, ENG])
    assert done.states[0] == state(spent=2 * USD, reserved=USD, count=1)
    assert (await commit(store, r, holds, [line(0, USD)], key="k")).states == ()  # a duplicate


async def test_settled_looks_up_a_committed_key_only(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD)]
    assert await store.settled(ACCT, "k") is None
    r = await reserved(store, holds, key="k")
    assert await store.settled(ACCT, "k") is None  # open, not committed
    await commit(store, r, holds, [line(0, USD)], key="k", result=b"answer")
    assert await store.settled(ACCT, "k") == b"answer"
    assert await store.settled("other", "k") is None
    assert await store.record_spend(ACCT, holds, [line(0, USD)], idempotency_key="j", now_ms=T0,
                                    kind="journal")
    assert await store.settled(ACCT, "j") == b""


async def test_in_flight_while_the_reservation_is_open(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k", ttl=SECOND)
    assert await reserve(store, holds, key="k", now=T0 + SECOND - 1) == InFlight(r.reservation_id)
    assert await read(store, [ALICE]) == [state(reserved=2 * USD)]


async def test_expired_reservation_is_refunded_and_the_key_reserves_again(store: Store) -> None:
    r = await reserved(store, [hold(ALICE, 3 * USD, 10 * USD)], key="k", ttl=SECOND)
    await reserved(store, [hold(ALICE, 2 * USD, 10 * USD)], key="k", now=r.expires_at_ms + 1)
    assert await read(store, [ALICE]) == [state(reserved=2 * USD)]
    # The first reservation ended with that refund: a sweep must not refund it again.
    assert await store.sweep(ACCT, now_ms=r.expires_at_ms + 1) == 0
    assert await read(store, [ALICE]) == [state(reserved=2 * USD)]


async def test_reservation_is_expired_at_exactly_expires_at_ms(store: Store) -> None:
    # reserve and sweep must agree on the boundary: "expired at or before now_ms".
    r = await reserved(store, [hold(ALICE, 3 * USD, 10 * USD)], key="k", ttl=SECOND)
    out = await reserve(store, [hold(ALICE, USD, 10 * USD)], key="k", now=r.expires_at_ms)
    assert isinstance(out, Reserved), out
    assert await read(store, [ALICE]) == [state(reserved=USD)]


# --- commit -------------------------------------------------------------------------


async def test_commit_refunds_the_remainder_and_writes_the_ledger(store: Store) -> None:
    holds = [hold(ALICE, 5 * USD, 10 * USD), hold(ENG, 5 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k", now=T0)
    lines = [line(0, 2 * USD, uri="u:a", offer="o-a"), line(0, USD, uri="u:b", offer="o-b"),
             line(1, 3 * USD, uri="u:c", offer="o-c")]
    out = await commit(store, r, holds, lines, key="k", now=T0 + 500)
    assert out == Committed(overage=(0, 0), late=False, duplicate=False)
    assert await read(store, [ALICE, ENG]) == [state(spent=3 * USD, count=1), state(spent=3 * USD, count=1)]
    entries = await ledger(store)
    assert len({e.id for e in entries}) == 3
    got = sorted((e.scope, e.period, e.window, e.amount, e.currency, e.uri, e.offer_id, e.original_amount,
                  e.original_currency, e.exchange) for e in entries)
    want = sorted((holds[ln.hold_index].counter.scope, "month", "2096-10", ln.amount,
                   holds[ln.hold_index].counter.currency, ln.uri, ln.offer_id, ln.original_amount, "USD",
                   "ex-1") for ln in lines)
    assert got == want
    for e in entries:
        assert (e.account, e.idempotency_key, e.reservation_id, e.kind) == (ACCT, "k", r.reservation_id,
                                                                           "commit")
        assert (e.reserved_at_ms, e.committed_at_ms) == (T0, T0 + 500)


async def test_commit_counts_every_hold_even_without_lines(store: Store) -> None:
    holds = [hold(ALICE, 5 * USD, 10 * USD), hold(ENG, 5 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await commit(store, r, holds, [line(0, USD)], key="k")
    assert await read(store, [ALICE, ENG]) == [state(spent=USD, count=1), state(count=1)]
    assert len(await ledger(store)) == 1


async def test_commit_above_the_hold_records_the_full_spend_and_reports_overage(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 3 * USD), hold(ENG, USD, 10 * USD), hold(ORG_DAY, USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    lines = [line(0, 5 * USD), line(1, USD), line(2, USD // 2)]
    out = await commit(store, r, holds, lines, key="k")
    assert out == Committed(overage=(3 * USD, 0, 0), late=False, duplicate=False)
    assert await read(store, [ALICE, ENG, ORG_DAY]) == [
        state(spent=5 * USD, count=1), state(spent=USD, count=1), state(spent=USD // 2, count=1)]
    # ALICE is now over its limit: nothing more fits there.
    out2 = await reserve(store, [hold(ENG, USD, 10 * USD), hold(ALICE, 1, 3 * USD)], key="next")
    assert out2 == Denied(1, state(spent=5 * USD, count=1))


async def test_late_commit_after_sweep_records_the_spend(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k", ttl=SECOND)
    await reserved(store, [hold(ALICE, USD, 10 * USD)], key="other", ttl=DAY)
    assert await store.sweep(ACCT, now_ms=T0 + SECOND) == 1
    assert await read(store, [ALICE]) == [state(reserved=USD)]
    out = await commit(store, r, holds, [line(0, 3 * USD)], key="k", now=T0 + 2 * SECOND, result=b"late")
    assert out.late
    assert not out.duplicate
    # The Exchange charged: spend recorded; the other reservation's hold is not eaten into.
    assert await read(store, [ALICE]) == [state(spent=3 * USD, reserved=USD, count=1)]
    entries = await ledger(store)
    assert [(e.amount, e.idempotency_key, e.kind) for e in entries] == [(3 * USD, "k", "commit")]
    assert await reserve(store, holds, key="k", now=T0 + 3 * SECOND) == Settled(b"late")
    again = await commit(store, r, holds, [line(0, 3 * USD)], key="k", now=T0 + 4 * SECOND)
    assert again.duplicate
    assert await read(store, [ALICE]) == [state(spent=3 * USD, reserved=USD, count=1)]


async def test_commit_of_an_expired_but_unswept_reservation_is_not_late(store: Store) -> None:
    # Until a sweep (or a reserve with its key) refunds it, the reservation still exists.
    holds = [hold(ALICE, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k", ttl=SECOND)
    out = await commit(store, r, holds, [line(0, USD)], key="k", now=T0 + 5 * SECOND)
    assert out == Committed(overage=(0,), late=False, duplicate=False)
    assert await read(store, [ALICE]) == [state(spent=USD, count=1)]
    assert await store.sweep(ACCT, now_ms=T0 + 6 * SECOND) == 0  # it ended once, by the commit
    assert await read(store, [ALICE]) == [state(spent=USD, count=1)]


async def test_duplicate_commit_changes_nothing(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD), hold(ENG, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await commit(store, r, holds, [line(0, USD), line(1, 2 * USD)], key="k", result=b"first")
    before = (await read(store, [ALICE, ENG]), await ledger(store))
    out = await commit(store, r, holds, [line(0, USD), line(1, 2 * USD)], key="k", now=T0 + DAY)
    assert out.duplicate
    out = await commit(store, r, holds, [line(0, 7 * USD)], key="k", result=b"second")
    assert out.duplicate
    assert (await read(store, [ALICE, ENG]), await ledger(store)) == before
    assert await reserve(store, holds, key="k") == Settled(b"first")


# --- release and sweep --------------------------------------------------------------


async def test_release_returns_the_hold_once_and_frees_the_key(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD), hold(ENG, 3 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    assert await store.release(ACCT, r.reservation_id, now_ms=T0 + 1) is True
    assert await read(store, [ALICE, ENG]) == [state(), state()]
    assert await store.release(ACCT, r.reservation_id, now_ms=T0 + 2) is False
    assert await read(store, [ALICE, ENG]) == [state(), state()]
    await reserved(store, holds, key="k", now=T0 + 3)
    assert await read(store, [ALICE, ENG]) == [state(reserved=2 * USD), state(reserved=3 * USD)]
    assert await ledger(store) == []


async def test_release_after_commit_is_false(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await commit(store, r, holds, [line(0, USD)], key="k")
    assert await store.release(ACCT, r.reservation_id, now_ms=T0 + 2 * SECOND) is False
    assert await read(store, [ALICE]) == [state(spent=USD, count=1)]


async def test_release_of_an_expired_unswept_reservation_refunds_it(store: Store) -> None:
    r = await reserved(store, [hold(ALICE, 2 * USD, 10 * USD)], key="k", ttl=SECOND)
    assert await store.release(ACCT, r.reservation_id, now_ms=T0 + 5 * SECOND) is True
    assert await read(store, [ALICE]) == [state()]
    assert await store.sweep(ACCT, now_ms=T0 + 6 * SECOND) == 0


async def test_sweep_refunds_only_expired_reservations_within_the_batch(store: Store) -> None:
    rs = [await reserved(store, [hold(ALICE, USD, 10 * USD), hold(ENG, USD, 10 * USD)], key=f"k{i}",
                         ttl=i * SECOND)
          for i in range(1, 6)]
    assert await store.sweep(ACCT, now_ms=T0 + SECOND - 1) == 0
    assert await store.sweep(ACCT, now_ms=T0 + 3 * SECOND, batch=2) == 2
    assert await read(store, [ALICE, ENG]) == [state(reserved=3 * USD)] * 2
    # The reservation expiring exactly at now_ms counts as expired.
    assert await store.sweep(ACCT, now_ms=T0 + 3 * SECOND, batch=2) == 1
    assert await store.sweep(ACCT, now_ms=T0 + 3 * SECOND, batch=2) == 0
    assert await read(store, [ALICE, ENG]) == [state(reserved=2 * USD)] * 2
    now = T0 + 3 * SECOND
    for i, r in enumerate(rs, start=1):
        out = await reserve(store, [hold(ALICE, USD, 10 * USD)], key=f"k{i}", now=now)
        if i <= 3:  # swept: the key is free again
            assert isinstance(out, Reserved), (i, out)
            assert await store.release(ACCT, r.reservation_id, now_ms=now) is False
        else:
            assert out == InFlight(r.reservation_id)
            assert await store.release(ACCT, r.reservation_id, now_ms=now) is True
    assert await read(store, [ALICE, ENG]) == [state(reserved=3 * USD), state()]
    assert await ledger(store) == []


# --- record_spend, ledger, counters, repair, blobs ----------------------------------


async def test_record_spend_is_recorded_once_per_key(store: Store) -> None:
    holds = [hold(ALICE, 2 * USD, USD), hold(ENG, USD, USD)]
    lines = [line(0, 2 * USD), line(1, USD)]
    assert await store.record_spend(ACCT, holds, lines, idempotency_key="journal:j1", now_ms=T0,
                                    kind="journal") is True
    # Fail-open spend is already made: recorded even above the limit, holding nothing.
    after = await read(store, [ALICE, ENG])
    assert [(s.spent, s.reserved) for s in after] == [(2 * USD, 0), (USD, 0)]
    entries = await ledger(store)
    assert sorted((e.scope, e.amount, e.kind, e.idempotency_key, e.committed_at_ms) for e in entries) == [
        ("team:eng", USD, "journal", "journal:j1", T0), ("user:alice", 2 * USD, "journal", "journal:j1", T0)]
    assert await store.record_spend(ACCT, holds, lines, idempotency_key="journal:j1", now_ms=T0 + 1,
                                    kind="journal") is False
    assert await read(store, [ALICE, ENG]) == after
    assert await ledger(store) == entries


async def test_ledger_is_oldest_first_and_filters_by_scope(store: Store) -> None:
    holds = [hold(ALICE, 5 * USD, 10 * USD), hold(ENG, 5 * USD, 10 * USD)]
    r1 = await reserved(store, holds, key="k1")
    await commit(store, r1, holds, [line(0, USD, uri="1a"), line(1, USD, uri="1b"), line(0, USD, uri="1c"),
                                    line(1, USD, uri="1d")], key="k1", now=T0 + 1)
    r2 = await reserved(store, holds[:1], key="k2", now=T0 + 2)
    await commit(store, r2, holds[:1], [line(0, 2 * USD, uri="2a")], key="k2", now=T0 + 3)
    everything = await ledger(store)
    assert sorted(e.uri for e in everything[:4]) == ["1a", "1b", "1c", "1d"]
    assert everything[4].uri == "2a"
    alice = await ledger(store, scope="user:alice")
    assert [e.uri for e in alice] == [e.uri for e in everything if e.scope == "user:alice"]
    assert sorted(e.uri for e in alice[:2]) == ["1a", "1c"]
    assert [e.uri for e in alice[2:]] == ["2a"]
    assert sorted(e.uri for e in await ledger(store, scope="team:eng")) == ["1b", "1d"]
    assert await ledger(store, scope="org:nobody") == []


async def test_long_ledger_is_listed_whole_and_once(store: Store) -> None:
    # Stores read the ledger in pages: cross page boundaries, including an exactly full last page.
    holds = [hold(ALICE, 0, 10**6 * USD), hold(ENG, 0, 10**6 * USD)]
    r1 = await reserved(store, holds, key="k1")
    await commit(store, r1, holds, [line(i % 2, 1, uri=f"a{i}") for i in range(1000)], key="k1", now=T0 + 1)
    assert [e.uri for e in await ledger(store)] == [f"a{i}" for i in range(1000)]
    r2 = await reserved(store, holds, key="k2", now=T0 + 2)
    await commit(store, r2, holds, [line(0, 1, uri=f"b{i}") for i in range(201)], key="k2", now=T0 + 3)
    everything = await ledger(store)
    assert [e.uri for e in everything] == [f"a{i}" for i in range(1000)] + [f"b{i}" for i in range(201)]
    assert len({e.id for e in everything}) == 1201
    alice = await ledger(store, scope="user:alice")
    assert [e.uri for e in alice] == [f"a{i}" for i in range(0, 1000, 2)] + [f"b{i}" for i in range(201)]
    assert await read(store, [ALICE, ENG]) == [state(spent=701, count=2), state(spent=500, count=2)]


async def test_many_counters_are_listed_once_each(store: Store) -> None:
    refs = [counter(f"user:u{i}") for i in range(450)]
    await reserved(store, [hold(c, i, 10 * USD) for i, c in enumerate(refs)], key="k")
    listed = [(ref, st_) async for ref, st_ in store.counters(ACCT)]
    assert sorted(listed, key=lambda x: x[0].scope) == sorted(
        ((c, state(reserved=i)) for i, c in enumerate(refs)), key=lambda x: x[0].scope)


async def test_counters_lists_live_counters_with_their_metadata(store: Store) -> None:
    holds = [hold(ALICE, 5 * USD, 10 * USD), hold(ENG, 5 * USD, 10 * USD), hold(ORG_DAY, USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await commit(store, r, holds, [line(0, USD), line(2, USD)], key="k")
    await reserved(store, holds[:1], key="k2")
    await store.add_credit(ACCT, ENG, 2 * USD, expire_at_ms=ENG.end_ms + GRACE)
    listed = await live_counters(store)
    assert set(listed) == {ALICE.key, ENG.key, ORG_DAY.key}
    states = await read(store, [ALICE, ENG, ORG_DAY])
    for ref, st_ in zip([ALICE, ENG, ORG_DAY], states, strict=True):
        assert listed[ref.key] == (ref, st_)


async def test_overwrite_spent_sets_spent_and_count_only(store: Store) -> None:
    holds = [hold(ALICE, 5 * USD, 10 * USD)]
    r = await reserved(store, holds, key="k")
    await commit(store, r, holds, [line(0, USD)], key="k")
    await reserved(store, holds, key="open")
    await store.add_credit(ACCT, ALICE, 2 * USD, expire_at_ms=ALICE.end_ms + GRACE)
    await store.overwrite_spent(ACCT, ALICE, 7 * USD, 4)
    assert await read(store, [ALICE]) == [state(spent=7 * USD, reserved=5 * USD, credit=2 * USD, count=4)]
    # Reservations go on against the overwritten numbers: 7 + 5 + 1 > 10 + 2.
    out = await reserve(store, [hold(ALICE, USD, 10 * USD)], key="k3")
    assert out == Denied(0, state(spent=7 * USD, reserved=5 * USD, credit=2 * USD, count=4))


async def test_blobs_expire_by_the_injected_clock(store: Store) -> None:
    assert await store.get_blob("ecb", now_ms=T0) is None
    data = b"<rates>\x00\xff</rates>"
    await store.put_blob("ecb", data, ttl_ms=SECOND, now_ms=T0)
    assert await store.get_blob("ecb", now_ms=T0) == data
    assert await store.get_blob("ecb", now_ms=T0 + SECOND - 1) == data
    assert await store.get_blob("ecb", now_ms=T0 + SECOND + 1) is None
    assert await store.get_blob("other", now_ms=T0) is None
    await store.put_blob("ecb", b"new", ttl_ms=SECOND, now_ms=T0 + 2 * SECOND)
    assert await store.get_blob("ecb", now_ms=T0 + 2 * SECOND + 1) == b"new"


# --- claims -------------------------------------------------------------------------


async def test_claim_is_won_once_until_it_expires(store: Store) -> None:
    until = T0 + DAY
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until, now_ms=T0) is True
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until, now_ms=T0) is False
    # Another claimer asking for a longer claim changes nothing while the first holds.
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until + DAY, now_ms=until - 1) is False
    # Expired exactly at expire_at_ms (by the caller's clock): claimable again, once.
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until + DAY, now_ms=until) is True
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until + DAY, now_ms=until + 1) is False
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until + 2 * DAY, now_ms=until + DAY) is True


async def test_claims_are_per_name_and_per_account(store: Store) -> None:
    until = T0 + DAY
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until, now_ms=T0) is True
    assert await store.claim(ACCT, "alert|b", expire_at_ms=until, now_ms=T0) is True
    assert await store.claim("globex", "alert|a", expire_at_ms=until, now_ms=T0) is True
    assert await store.claim(ACCT, "alert|b", expire_at_ms=until, now_ms=T0) is False
    assert await store.claim("globex", "alert|a", expire_at_ms=until, now_ms=T0) is False


async def test_claim_survives_a_sweep_until_it_expires(store: Store) -> None:
    until = T0 + DAY
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until, now_ms=T0) is True
    await store.sweep(ACCT, now_ms=until - 1)
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until, now_ms=until - 1) is False
    await store.sweep(ACCT, now_ms=until)
    assert await store.claim(ACCT, "alert|a", expire_at_ms=until + DAY, now_ms=until) is True


async def test_concurrent_claims_have_exactly_one_winner(store: Store) -> None:
    outs = await asyncio.gather(*(
        store.claim(ACCT, "alert|race", expire_at_ms=T0 + DAY, now_ms=T0 + i) for i in range(20)))
    assert outs.count(True) == 1, outs


# --- accounts -----------------------------------------------------------------------


async def test_accounts_are_isolated(store: Store) -> None:
    other = "globex"
    fresh = await store.limits(other)
    holds = [hold(ALICE, 5 * USD, 10 * USD)]
    await store.set_limit(ACCT, "user:alice", "month", ("USD", 10 * USD))
    await store.add_credit(ACCT, ALICE, USD, expire_at_ms=ALICE.end_ms + GRACE)
    r = await reserved(store, holds, key="k", ttl=SECOND)
    await commit(store, r, holds, [line(0, USD)], key="k")
    r_open = await reserved(store, holds, key="k-open", ttl=SECOND)
    await store.record_spend(ACCT, holds, [line(0, USD)], idempotency_key="j", now_ms=T0, kind="journal")
    assert await store.limits(other) == fresh
    assert await read(store, [ALICE], account=other) == [CounterState()]
    assert await ledger(store, account=other) == []
    assert await live_counters(store, account=other) == {}
    assert await store.sweep(other, now_ms=T0 + DAY) == 0
    assert await store.release(other, r_open.reservation_id, now_ms=T0) is False
    # The other account's limit is untouched by ACCT's: all 10 fit there.
    await reserved(store, [hold(ALICE, 10 * USD, 10 * USD)], key="big", account=other)
    (mine,) = await read(store, [ALICE])
    assert (mine.spent, mine.reserved, mine.credit) == (2 * USD, 5 * USD, USD)


async def test_idempotency_keys_are_per_account(store: Store) -> None:
    holds = [hold(ALICE, USD, 10 * USD)]
    r = await reserved(store, holds, key="same")
    r_other = await reserved(store, holds, key="same", account="globex")
    await commit(store, r, holds, [line(0, USD)], key="same")
    assert await reserve(store, holds, key="same", account="globex") == InFlight(r_other.reservation_id)
    assert await store.record_spend(ACCT, holds, [line(0, USD)], idempotency_key="j", now_ms=T0,
                                    kind="journal")
    assert await store.record_spend("globex", holds, [line(0, USD)], idempotency_key="j", now_ms=T0,
                                    kind="journal")


# --- concurrency --------------------------------------------------------------------


async def test_concurrent_reserves_never_overbook(store: Store) -> None:
    counters = [ALICE, ENG, ORG_DAY]
    holds = [hold(c, USD, 50 * USD) for c in counters]
    v = await version(store)
    outs = await asyncio.gather(*(
        store.reserve(ACCT, holds, ttl_ms=60 * SECOND, idempotency_key=f"k{i}", now_ms=T0, limits_version=v)
        for i in range(200)))
    won = [(i, o) for i, o in enumerate(outs) if isinstance(o, Reserved)]
    assert len(won) == 50
    assert all(isinstance(o, Denied) and o.index == 0 for o in outs if not isinstance(o, Reserved))
    assert await read(store, counters) == [state(reserved=50 * USD)] * 3

    async def commit_one(i: int, r: Reserved) -> bool:
        out = await store.commit(ACCT, r.reservation_id, holds, [line(j, USD) for j in range(3)],
                                 idempotency_key=f"k{i}", result=b"ok", now_ms=T0 + SECOND)
        return out == Committed(overage=(0, 0, 0))

    async def release_one(r: Reserved) -> bool:
        return await store.release(ACCT, r.reservation_id, now_ms=T0 + SECOND)

    results = await asyncio.gather(*(commit_one(i, r) if n % 2 else release_one(r)
                                     for n, (i, r) in enumerate(won)))
    assert all(results)
    assert await read(store, counters) == [state(spent=25 * USD, count=25)] * 3
    entries = await ledger(store)
    assert len(entries) == 75
    assert ledger_sums(entries) == {c.key: 25 * USD for c in counters}
    # Exactly the released room is free again.
    await reserved(store, [hold(c, 25 * USD, 50 * USD) for c in counters], key="rest", now=T0 + SECOND)
    out = await reserve(store, [hold(ENG, 1, 50 * USD)], key="over", now=T0 + SECOND)
    assert isinstance(out, Denied)


# --- randomized workload ------------------------------------------------------------

UNIT = USD // 10  # small amounts against small limits: denials and overages happen often
WORK_COUNTERS = (ALICE, ENG, ORG_DAY)
WORK_LIMITS = (10 * UNIT, 6 * UNIT, 15 * UNIT)
# Overlapping subsets, in several orders so Denied's index is exercised.
COMBOS = ((0,), (0, 1), (1, 2), (2, 0), (0, 1, 2), (2, 1, 0))
# TTLs are multiples of 500 ms and every advance is 7 ms off a whole second, so no step lands
# exactly on an expiry instant (that boundary has its own test).
TTLS = (500, 1500, 2500, 10_000)


@dataclass(frozen=True)
class OpReserve:
    combo: int
    amounts: tuple[int, int, int]
    ttl: int
    reuse: int | None  # pick an existing key (InFlight / Settled / refund-and-retry paths)


@dataclass(frozen=True)
class OpCommit:
    pick: int
    mode: str  # below, exact, above, none (no lines), mixed (first hold above, rest below)
    split: bool  # two lines per hold


@dataclass(frozen=True)
class OpRecommit:
    pick: int


@dataclass(frozen=True)
class OpRelease:
    pick: int


@dataclass(frozen=True)
class OpSweep:
    pass


@dataclass(frozen=True)
class OpAdvance:
    ms: int


@dataclass(frozen=True)
class OpDrain:
    """An hour later everything still open has expired: one sweep must end it all."""


@dataclass(frozen=True)
class OpCredit:
    counter: int
    amount: int


@dataclass(frozen=True)
class OpRecord:
    combo: int
    amounts: tuple[int, int, int]


Op = OpReserve | OpCommit | OpRecommit | OpRelease | OpSweep | OpAdvance | OpDrain | OpCredit | OpRecord

_amounts = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))
_reserve = st.builds(OpReserve, st.integers(0, len(COMBOS) - 1), _amounts, st.sampled_from(TTLS),
                     st.integers(0, 2999).map(lambda n: n if n < 1000 else None))  # a third reuse a key
_commit = st.builds(OpCommit, st.integers(0, 1000),
                    st.sampled_from(["below", "exact", "above", "none", "mixed"]), st.booleans())
# Drawn by weight (a branch listed n times is n times as likely): mostly reserve and commit.
_BRANCHES: list[st.SearchStrategy[Op]] = [
    *[_reserve] * 6, *[_commit] * 4,
    *[st.builds(OpRelease, st.integers(0, 1000))] * 2,
    *[st.builds(OpSweep)] * 2,
    *[st.builds(OpAdvance, st.integers(0, 3).map(lambda s: s * SECOND + 7))] * 3,
    st.builds(OpRecommit, st.integers(0, 1000)),
    st.builds(OpCredit, st.integers(0, 2), st.integers(1, 4)),
    st.builds(OpRecord, st.integers(0, len(COMBOS) - 1), st.tuples(*[st.just(1)] * 3)),
    st.builds(OpDrain),
]
OP = st.sampled_from(_BRANCHES).flatmap(lambda s: s)


@dataclass
class MRes:
    key: str
    rid: str
    holds: tuple[Hold, ...]
    idx: tuple[int, ...]  # counter index of each hold
    expires_at: int
    status: str = "open"  # open, committed, released, swept, refunded (by a reserve with its key)
    lines: tuple[Line, ...] = ()
    result: bytes = b""


@dataclass
class Model:
    now: int = T0
    spent: list[int] = field(default_factory=lambda: [0, 0, 0])
    reserved: list[int] = field(default_factory=lambda: [0, 0, 0])
    credit: list[int] = field(default_factory=lambda: [0, 0, 0])
    count: list[int] = field(default_factory=lambda: [0, 0, 0])
    count_known: list[bool] = field(default_factory=lambda: [True, True, True])
    exempt: set[int] = field(default_factory=set)  # counters legitimately pushed over their limit
    keys: dict[str, MRes | None] = field(default_factory=dict)  # each reserve key's latest reservation
    ledger_lines: int = 0
    journal: int = 0

    def end(self, r: MRes, status: str) -> None:
        assert r.status == "open", f"{r.rid} ends twice: {r.status} then {status}"
        r.status = status
        for c, h in zip(r.idx, r.holds, strict=True):
            self.reserved[c] -= h.amount


def _holds(combo: int, amounts: tuple[int, int, int]) -> tuple[tuple[Hold, ...], tuple[int, ...]]:
    idx = COMBOS[combo]
    return tuple(hold(WORK_COUNTERS[c], amounts[j] * UNIT, WORK_LIMITS[c]) for j, c in enumerate(idx)), idx


def _lines(r: MRes, mode: str, split: bool) -> tuple[Line, ...]:
    out: list[Line] = []
    for j, h in enumerate(r.holds):
        actual = {"below": h.amount // 2, "exact": h.amount, "above": h.amount + 2 * UNIT, "none": 0,
                  "mixed": h.amount + UNIT if j == 0 else h.amount - UNIT}[mode]
        parts = [actual // 2, actual - actual // 2] if split else [actual]
        out.extend(line(j, p, uri=f"{r.key}/{j}/{n}") for n, p in enumerate(parts) if p > 0)
    return tuple(out)


async def _step(store: Store, m: Model, op: Op, v: int) -> None:
    if isinstance(op, OpAdvance):
        m.now += op.ms
    elif isinstance(op, OpCredit):
        ref = WORK_COUNTERS[op.counter]
        await store.add_credit(ACCT, ref, op.amount * UNIT, expire_at_ms=ref.end_ms + GRACE)
        m.credit[op.counter] += op.amount * UNIT
    elif isinstance(op, OpReserve):
        holds, idx = _holds(op.combo, op.amounts)
        names = list(m.keys)
        key = names[op.reuse % len(names)] if op.reuse is not None and names else f"k{len(names)}"
        cur = m.keys.get(key)
        out = await store.reserve(ACCT, holds, ttl_ms=op.ttl, idempotency_key=key, now_ms=m.now,
                                  limits_version=v)
        if cur is not None and cur.status == "committed":
            assert out == Settled(cur.result)
            return
        if cur is not None and cur.status == "open":
            if cur.expires_at > m.now:
                assert out == InFlight(cur.rid)
                return
            m.end(cur, "refunded")  # an expired reservation is refunded before trying again
        m.keys.setdefault(key, None)
        fail = next((j for j, (c, h) in enumerate(zip(idx, holds, strict=True))
                     if m.spent[c] + m.reserved[c] + h.amount > WORK_LIMITS[c] + m.credit[c]), None)
        if fail is not None:
            c = idx[fail]
            assert isinstance(out, Denied), out
            assert out.index == fail
            assert (out.state.spent, out.state.reserved, out.state.credit) == (
                m.spent[c], m.reserved[c], m.credit[c])
            return
        assert isinstance(out, Reserved), out
        assert out.expires_at_ms == m.now + op.ttl
        assert all(r is None or r.rid != out.reservation_id or r.status != "open" for r in m.keys.values())
        m.keys[key] = MRes(key, out.reservation_id, holds, idx, out.expires_at_ms)
        for c, h in zip(idx, holds, strict=True):
            m.reserved[c] += h.amount
    elif isinstance(op, OpCommit):
        cands = [r for r in m.keys.values() if r is not None and r.status in ("open", "swept")]
        if not cands:
            return
        r = cands[op.pick % len(cands)]
        lines = _lines(r, op.mode, op.split)
        result = f"result:{r.key}".encode()
        done = await store.commit(ACCT, r.rid, r.holds, lines, idempotency_key=r.key, result=result,
                                  now_ms=m.now)
        sums = [sum(ln.amount for ln in lines if ln.hold_index == j) for j in range(len(r.holds))]
        assert not done.duplicate
        if r.status == "open":  # still there, even if expired: only a sweep makes it gone
            assert not done.late, done
            assert done.overage == tuple(max(0, s - h.amount) for s, h in zip(sums, r.holds, strict=True))
            m.end(r, "committed")
            m.exempt.update(c for c, s, h in zip(r.idx, sums, r.holds, strict=True) if s > h.amount)
        else:
            assert done.late, done
            r.status = "committed"
            m.exempt.update(c for c, s in zip(r.idx, sums, strict=True) if s > 0)
        r.lines, r.result = lines, result
        for c, s in zip(r.idx, sums, strict=True):
            m.spent[c] += s
            m.count[c] += 1
        m.ledger_lines += len(lines)
    elif isinstance(op, OpRecommit):
        cands = [r for r in m.keys.values() if r is not None and r.status == "committed"]
        if not cands:
            return
        r = cands[op.pick % len(cands)]
        done = await store.commit(ACCT, r.rid, r.holds, r.lines, idempotency_key=r.key, result=b"again",
                                  now_ms=m.now)
        assert done.duplicate, done
    elif isinstance(op, OpRelease):
        cands = [r for r in m.keys.values() if r is not None]
        if not cands:
            return
        r = cands[op.pick % len(cands)]
        ok = await store.release(ACCT, r.rid, now_ms=m.now)
        assert ok == (r.status == "open"), (r.status, ok)
        if ok:
            m.end(r, "released")
    elif isinstance(op, OpDrain):
        m.now += 3_600_000
        await _step(store, m, OpSweep(), v)
        assert m.reserved == [0, 0, 0]
    elif isinstance(op, OpSweep):
        due = [r for r in m.keys.values() if r is not None and r.status == "open" and r.expires_at <= m.now]
        assert await store.sweep(ACCT, now_ms=m.now, batch=1000) == len(due)
        for r in due:
            m.end(r, "swept")
    elif isinstance(op, OpRecord):
        holds, idx = _holds(op.combo, op.amounts)
        lines = tuple(line(j, h.amount, uri=f"j{m.journal}/{j}") for j, h in enumerate(holds))
        key = f"journal:{m.journal}"
        m.journal += 1
        assert await store.record_spend(ACCT, holds, lines, idempotency_key=key, now_ms=m.now,
                                        kind="journal") is True
        assert await store.record_spend(ACCT, holds, lines, idempotency_key=key, now_ms=m.now,
                                        kind="journal") is False
        for c, h in zip(idx, holds, strict=True):
            m.spent[c] += h.amount
            m.count_known[c] = False  # the contract does not say whether a journal spend counts
            m.exempt.add(c)
        m.ledger_lines += len(lines)


async def _check(store: Store, m: Model) -> None:
    got = await read(store, WORK_COUNTERS)
    for c, s in enumerate(got):
        assert (s.spent, s.reserved, s.credit) == (m.spent[c], m.reserved[c], m.credit[c]), (c, s)
        if m.count_known[c]:
            assert s.count == m.count[c], (c, s)
        if c not in m.exempt:
            assert s.spent + s.reserved <= WORK_LIMITS[c] + s.credit, (c, s)
    entries = await ledger(store)
    assert len(entries) == m.ledger_lines
    sums = ledger_sums(entries)
    assert [sums.get(ref.key, 0) for ref in WORK_COUNTERS] == [s.spent for s in got]


class _Workload(RuleBasedStateMachine):
    """One fresh store per example, driven from a private event loop (stateful tests are sync)."""

    kind = "sqlite"
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.Runner()
        self.dir = tempfile.TemporaryDirectory(prefix="store-conf-")
        self.exits = contextlib.AsyncExitStack()
        self.store = self.loop.run(self.exits.enter_async_context(
            open_store(self.kind, redis_url=self.redis_url, directory=Path(self.dir.name))))
        self.model = Model()
        self.version = self.loop.run(version(self.store))

    @rule(op=OP)
    def step(self, op: Op) -> None:
        self.loop.run(_step(self.store, self.model, op, self.version))

    @invariant()
    def books_balance(self) -> None:
        self.loop.run(_check(self.store, self.model))

    def teardown(self) -> None:
        try:
            self.loop.run(self.exits.aclose())
        finally:
            self.loop.close()
            self.dir.cleanup()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(900)  # passes in seconds; on a failure, shrinking to a short example takes minutes
def test_random_workload_keeps_the_books(kind: str, request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue("redis_url") if kind == "redis" else ""

    class Workload(_Workload):
        pass

    Workload.kind, Workload.redis_url = kind, url
    run_state_machine_as_test(Workload, settings=settings(
        max_examples=25, stateful_step_count=50, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
