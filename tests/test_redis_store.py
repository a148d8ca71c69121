"""Redis-specific behaviour of budget.stores.redis (generic Store behaviour: test_store_conformance.py).

Key layout and hash tags, TTLs, EVALSHA and script reloading, coalescing, exact big numbers,
and what happens when the server hangs, dies, restarts or crashes with AOF on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from budget.stores.contract import (
    Committed,
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    LeaseAsk,
    Leased,
    LeaseSpend,
    Line,
    Lost,
    Reserved,
    ReserveOutcome,
    Settled,
    StoreIdentity,
    StoreLost,
    StoreUnavailable,
)
from budget.stores.redis import MAX_BATCH, MAX_IN_FLIGHT, RedisStore, _Batcher
from tests.processes import run_cli, write_yaml
from tests.redis_server import RedisServer, redis_server

DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def account() -> str:
    return f"acct-{uuid.uuid4().hex[:12]}"


def ref(scope: str = "user:alice", window: str = "2026-11", start_ms: int = 0, end_ms: int = 1) -> CounterRef:
    return CounterRef(scope, "month", window, "USD", start_ms, end_ms)


def hold(amount: int, limit: int, *, scope: str = "user:alice", expire_at_ms: int | None = None) -> Hold:
    expire_at = expire_at_ms if expire_at_ms is not None else now_ms() + 30 * DAY_MS
    return Hold(ref(scope), amount, limit, expire_at)


def line(amount: int, hold_index: int = 0) -> Line:
    return Line(hold_index, amount, "1.00", "USD", "ref.test", "offer-a", "https://x.test/a")


def crc16(data: bytes) -> int:
    """CRC16-XMODEM, as Redis Cluster hashes key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: bytes) -> int:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc16(key) % 16384


async def reserve(store: RedisStore, acct: str, holds: list[Hold], key: str, *, at: int | None = None,
                  ttl_ms: int = 60_000, version: int = 0) -> ReserveOutcome:
    return await store.reserve(acct, holds, ttl_ms=ttl_ms, idempotency_key=key,
                               now_ms=at if at is not None else now_ms(), limits_version=version)


async def command_calls(store: RedisStore, command: str) -> int:
    stats: dict[str, Any] = await store.client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = await RedisStore.open(redis_url)
    yield s
    await s.close()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of the test's own, to pause, kill and restart."""
    with redis_server() as srv:
        yield srv


# --- keys -----------------------------------------------------------------------------------


async def test_every_key_of_an_account_shares_its_hash_tag(store: RedisStore) -> None:
    acct = account()
    holds = [hold(100, 1000), hold(50, 1000, scope="team:eng")]
    r = await reserve(store, acct, holds, "k-open")
    r2 = await reserve(store, acct, holds, "k-done")
    assert isinstance(r, Reserved)
    assert isinstance(r2, Reserved)
    await store.commit(acct, r2.reservation_id, holds, [line(100)], idempotency_key="k-done", result=b"ok",
                       now_ms=now_ms())
    await store.set_limit(acct, "user:alice", "month", ("USD", 5))

    raw_keys = await store.client.keys(f"ramp:{{{acct}}}:*")
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in raw_keys)
    p = f"ramp:{{{acct}}}:"
    assert keys == sorted([
        f"{p}c:user:alice|month|2026-11|USD", f"{p}c:team:eng|month|2026-11|USD", f"{p}counters", f"{p}exp",
        f"{p}i:k-open", f"{p}i:k-done", f"{p}r:{r.reservation_id}", f"{p}ledger", f"{p}limits",
        f"{p}limits:v",
    ])
    assert {keyslot(k.encode()) for k in keys} == {keyslot(acct.encode())}
    assert await store.client.type(f"{p}ledger") == b"stream"
    assert await store.client.zscore(f"{p}exp", r.reservation_id) == r.expires_at_ms
    assert await store.client.hgetall(f"{p}c:team:eng|month|2026-11|USD") == {
        b"scope": b"team:eng", b"period": b"month", b"window": b"2026-11", b"currency": b"USD",
        b"start_ms": b"0", b"end_ms": b"1", b"spent": b"0", b"reserved": b"50", b"credit": b"0",
        b"count": b"1",  # commit counts a transaction on every hold, with or without lines
    }
    assert await store.client.hgetall(f"{p}limits") == {b"user:alice|month": b"USD 5"}
    assert await store.client.hmget(f"{p}i:k-done", ["state", "result"]) == [b"committed", b"ok"]
    assert await store.client.hmget(f"{p}i:k-open", ["state", "rid"]) == [b"open", r.reservation_id.encode()]


async def test_prefix_and_blob_keys(redis_url: str) -> None:
    store = await RedisStore.open(redis_url, prefix="other")
    try:
        acct = account()
        assert isinstance(await reserve(store, acct, [hold(1, 10)], "k"), Reserved)
        assert await store.client.exists(f"other:{{{acct}}}:c:user:alice|month|2026-11|USD") == 1
        await store.put_blob("ecb", b"\x00rates", ttl_ms=60_000, now_ms=now_ms())
        assert await store.client.hget("other:blob:ecb", "data") == b"\x00rates"
    finally:
        await store.close()


async def test_braces_in_an_idempotency_key_stay_in_the_account_slot(store: RedisStore) -> None:
    acct = account()
    r = await reserve(store, acct, [hold(1, 10)], "{evil}key")
    assert isinstance(r, Reserved)
    key = f"ramp:{{{acct}}}:i:{{evil}}key"
    assert await store.client.exists(key) == 1
    assert keyslot(key.encode()) == keyslot(acct.encode())


# --- TTLs -----------------------------------------------------------------------------------


async def test_counter_ttl_is_the_holds_expire_at(store: RedisStore) -> None:
    acct, now = account(), now_ms()
    expire_at = now + 40 * DAY_MS
    r = await reserve(store, acct, [hold(1, 10, expire_at_ms=expire_at)], "k", at=now, ttl_ms=30_000)
    assert isinstance(r, Reserved)
    p = f"ramp:{{{acct}}}:"
    assert abs(await store.client.pexpiretime(f"{p}c:user:alice|month|2026-11|USD") - expire_at) < 2_000
    # The reservation (and its open record) outlive any sweep; the record settles with the counters.
    for key in (f"{p}r:{r.reservation_id}", f"{p}i:k"):
        assert await store.client.pexpiretime(key) >= expire_at
    await store.commit(acct, r.reservation_id, [hold(1, 10, expire_at_ms=expire_at)], [line(1)],
                       idempotency_key="k", result=b"", now_ms=now)
    assert await store.client.pexpiretime(f"{p}i:k") >= expire_at
    # Account-wide keys never expire.
    for key in ("exp", "ledger", "counters"):
        assert await store.client.pttl(f"{p}{key}") in (-1, -2)


async def test_an_injected_clock_behind_redis_does_not_drop_live_keys(store: RedisStore) -> None:
    """A manual clock in January writes windows whose expire_at is long past on Redis's clock."""
    acct = account()
    jan = 1_767_225_600_000  # 2026-01-01T00:00Z
    holds = [hold(10, 100, expire_at_ms=jan + 40 * DAY_MS)]
    r = await reserve(store, acct, holds, "k", at=jan)
    assert isinstance(r, Reserved)
    await store.add_credit(acct, ref("team:x"), 5, expire_at_ms=jan + 40 * DAY_MS)
    await store.overwrite_spent(acct, ref("team:y"), 7, 1)
    assert await store.read(acct, [ref(), ref("team:x"), ref("team:y")]) == [
        CounterState(reserved=10), CounterState(credit=5), CounterState(spent=7, count=1)]
    ttl = await store.client.pttl(f"ramp:{{{acct}}}:c:user:alice|month|2026-11|USD")
    assert 39 * DAY_MS < ttl <= 40 * DAY_MS


async def test_ttls_only_grow(store: RedisStore) -> None:
    acct, now = account(), now_ms()
    await reserve(store, acct, [hold(1, 10, expire_at_ms=now + 10 * DAY_MS)], "a", at=now)
    await reserve(store, acct, [hold(1, 10, expire_at_ms=now + 2 * DAY_MS)], "b", at=now)
    assert await store.client.pttl(f"ramp:{{{acct}}}:c:user:alice|month|2026-11|USD") > 9 * DAY_MS


async def test_blob_expiry_follows_the_callers_clock(store: RedisStore) -> None:
    jan = 1_767_225_600_000
    name = f"blob-{uuid.uuid4().hex}"
    await store.put_blob(name, b"data", ttl_ms=60_000, now_ms=jan)
    assert await store.get_blob(name, now_ms=jan + 59_999) == b"data"
    assert await store.get_blob(name, now_ms=jan + 60_000) is None
    assert 0 < await store.client.pttl(f"ramp:blob:{name}") <= 60_000


# --- scripts --------------------------------------------------------------------------------


async def test_scripts_run_by_sha_and_reload_after_a_flush(store: RedisStore) -> None:
    acct = account()
    await store.client.config_resetstat()
    assert isinstance(await reserve(store, acct, [hold(1, 10)], "a"), Reserved)
    assert await command_calls(store, "evalsha") == 1
    assert await command_calls(store, "eval") == 0

    await store.client.script_flush()
    assert isinstance(await reserve(store, acct, [hold(1, 10)], "b"), Reserved)
    assert await store.release(acct, "nonexistent", now_ms=now_ms()) is False
    assert await command_calls(store, "script|load") == 2  # reserve and release, once each
    assert await command_calls(store, "eval") == 0


async def test_reserve_retry_recognises_its_own_reservation(store: RedisStore) -> None:
    """What makes retrying reserve safe: the same request landing twice is one reservation."""
    from budget.stores.redis import _ReserveRequest

    acct = account()
    request = _ReserveRequest(uuid.uuid4().hex, (hold(10, 100),), 60_000, "k", now_ms(), 0, b"", "", None)
    first = await store._reserve_batch(acct, [request])
    second = await store._reserve_batch(acct, [request])
    assert first == second
    assert isinstance(first[0], Reserved)
    assert first[0].reservation_id == request.rid
    assert await store.read(acct, [ref()]) == [CounterState(reserved=10)]


# --- numbers --------------------------------------------------------------------------------


async def test_comparisons_are_exact_beyond_2_to_the_53(store: RedisStore) -> None:
    acct = account()
    limit = 2**53
    assert isinstance(await reserve(store, acct, [hold(limit - 1, limit)], "a"), Reserved)
    assert isinstance(await reserve(store, acct, [hold(1, limit)], "b"), Reserved)
    denied = await reserve(store, acct, [hold(1, limit)], "c")  # a double would see 2^53 + 1 == 2^53
    assert denied == Denied(0, CounterState(reserved=limit))

    big = 9 * 10**18
    acct2 = account()
    assert isinstance(await reserve(store, acct2, [hold(big, big)], "a"), Reserved)
    assert isinstance(await reserve(store, acct2, [hold(1, big)], "b"), Denied)
    assert await store.read(acct2, [ref()]) == [CounterState(reserved=big)]


async def test_amounts_beyond_64_bits_are_refused_before_sending(store: RedisStore) -> None:
    acct = account()
    with pytest.raises(ValueError, match="64 bits"):
        await reserve(store, acct, [hold(2**63, 2**63)], "a")
    with pytest.raises(ValueError, match="64 bits"):
        await store.add_credit(acct, ref(), 2**64, expire_at_ms=now_ms() + DAY_MS)
    assert await store.client.exists(f"ramp:{{{acct}}}:c:user:alice|month|2026-11|USD") == 0


async def test_a_refund_does_not_resurrect_an_expired_counter(store: RedisStore) -> None:
    acct = account()
    r = await reserve(store, acct, [hold(5, 10)], "k")
    assert isinstance(r, Reserved)
    counter_key = f"ramp:{{{acct}}}:c:user:alice|month|2026-11|USD"
    await store.client.delete(counter_key)  # as if its TTL ran out
    assert await store.release(acct, r.reservation_id, now_ms=now_ms()) is True
    assert await store.client.exists(counter_key) == 0


async def test_counters_prunes_expired_entries(store: RedisStore) -> None:
    acct = account()
    await reserve(store, acct, [hold(1, 10), hold(1, 10, scope="team:gone")], "k")
    await store.client.delete(f"ramp:{{{acct}}}:c:team:gone|month|2026-11|USD")
    listed = [(c.scope, s) async for c, s in store.counters(acct)]
    assert listed == [("user:alice", CounterState(reserved=1))]
    assert await store.client.zrange(f"ramp:{{{acct}}}:counters", 0, -1) == [b"user:alice|month|2026-11|USD"]


async def test_ledger_pages(store: RedisStore) -> None:
    acct = account()
    lines = [line(1) for _ in range(1_234)]
    assert await store.record_spend(acct, [hold(0, 0)], lines, idempotency_key="j", now_ms=now_ms(),
                                    kind="journal")
    entries = [e async for e in store.ledger(acct)]
    assert len(entries) == 1_234
    assert all(e.kind == "journal" for e in entries)
    ids = [tuple(map(int, e.id.split("-"))) for e in entries]
    assert ids == sorted(set(ids))  # increasing, no page overlaps
    assert [e async for e in store.ledger(acct, scope="team:none")] == []


# --- coalescing -----------------------------------------------------------------------------


async def test_concurrent_reserves_are_coalesced_and_stay_all_or_none(store: RedisStore) -> None:
    acct = account()
    await store.client.config_resetstat()
    outcomes = await asyncio.gather(*(
        reserve(store, acct, [hold(1, 150), hold(2, 10**6, scope="team:eng")], f"k{i}") for i in range(200)
    ))
    calls = await command_calls(store, "evalsha")
    assert calls < 20, calls  # 200 requests, at most 64 a batch
    assert sum(isinstance(o, Reserved) for o in outcomes) == 150
    assert all(o.index == 0 for o in outcomes if isinstance(o, Denied))
    assert await store.read(acct, [ref(), ref("team:eng")]) == [CounterState(reserved=150),
                                                              CounterState(reserved=300)]


async def test_coalesced_requests_with_one_key_see_each_other(store: RedisStore) -> None:
    acct = account()
    outcomes = await asyncio.gather(*(reserve(store, acct, [hold(1, 100)], "same") for _ in range(10)))
    reserved = [o for o in outcomes if isinstance(o, Reserved)]
    assert len(reserved) == 1
    assert all(isinstance(o, InFlight) and o.reservation_id == reserved[0].reservation_id
               for o in outcomes if o is not reserved[0])


async def test_concurrent_commits_are_coalesced(store: RedisStore) -> None:
    acct = account()
    holds = [hold(10, 10**6)]
    rs = await asyncio.gather(*(reserve(store, acct, holds, f"k{i}") for i in range(MAX_BATCH * 2)))
    await store.client.config_resetstat()
    done = await asyncio.gather(*(
        store.commit(acct, r.reservation_id, holds, [line(12)], idempotency_key=f"k{i}", result=b"r",
                     now_ms=now_ms())
        for i, r in enumerate(rs) if isinstance(r, Reserved)
    ), store.commit(acct, "gone", holds, [line(3)], idempotency_key="k0", result=b"r", now_ms=now_ms()))
    assert await command_calls(store, "evalsha") <= 4
    assert done[:-1] == [Committed(overage=(2,))] * (MAX_BATCH * 2)
    assert done[-1] == Committed(overage=(0,), duplicate=True)  # the same key, later in its batch
    assert await store.read(acct, [ref()]) == [CounterState(spent=12 * MAX_BATCH * 2, count=MAX_BATCH * 2)]


# --- failures -------------------------------------------------------------------------------


async def test_a_request_submitted_as_every_batch_returns_is_still_sent() -> None:
    """A drain that has returned still counts as running until its done callback: a request
    submitted in between started no drain, and once the callbacks ran the batcher went idle with it
    inside. Its caller heard "store unreachable" after the timeout (a commit left held; seen about
    once in 6000 commits of bench.layers' Redis strict row)."""
    gates = [asyncio.Event() for _ in range(MAX_IN_FLIGHT)]
    sent: list[list[int]] = []
    late: list[asyncio.Future[int]] = []
    submitted = asyncio.Event()

    def submit_late() -> None:
        late.append(batcher.submit(99))
        submitted.set()

    async def run(batch: list[int]) -> list[int]:
        if batch[0] < len(gates):
            await gates[batch[0]].wait()
        sent.append(batch)
        if batch[0] == 0:
            # Queued behind the drains' last steps, ahead of every drain's done callback.
            asyncio.get_running_loop().call_soon(submit_late)
        return batch

    batcher: _Batcher[int, int] = _Batcher(run, lambda: None)
    first = []
    for i in range(MAX_IN_FLIGHT):
        first.append(batcher.submit(i))
        await asyncio.sleep(0)  # a drain of its own takes it and waits at its gate
    assert len(batcher.tasks) == MAX_IN_FLIGHT
    for gate in gates:
        gate.set()
    assert await asyncio.gather(*first) == list(range(MAX_IN_FLIGHT))
    async with asyncio.timeout(2):
        await submitted.wait()
        assert await late[0] == 99
    assert sent == [[i] for i in range(MAX_IN_FLIGHT)] + [[99]]


async def test_a_paused_server_is_unavailable_within_the_timeout(server: RedisServer) -> None:
    store = await RedisStore.open(server.url, timeout_ms=200)
    acct = account()
    try:
        r = await reserve(store, acct, [hold(1, 10)], "k")
        assert isinstance(r, Reserved)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            calls = {
                "reserve": reserve(store, acct, [hold(1, 10)], "k2"),
                "commit": store.commit(acct, r.reservation_id, [hold(1, 10)], [line(1)], idempotency_key="k",
                                       result=b"", now_ms=now_ms()),
                "read": store.read(acct, [ref()]),
                "counters": anext(store.counters(acct)),
                "blob": store.get_blob("x", now_ms=now_ms()),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call
                assert time.monotonic() - started < 0.5, name
            # Many callers queued behind a hung batch each give up on their own deadline.
            started = time.monotonic()
            queued = [reserve(store, acct, [hold(1, 10)], f"q{i}") for i in range(100)]
            results = await asyncio.gather(*queued, return_exceptions=True)
            assert all(isinstance(e, StoreUnavailable) for e in results)
            assert time.monotonic() - started < 0.6
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # Writes that timed out may still have run once the server resumed: their outcome is unknown.
        [state] = await store.read(acct, [ref()])
        assert state.spent + state.reserved <= 10
    finally:
        await store.close()


async def test_open_fails_fast_when_nothing_listens(server: RedisServer) -> None:
    server.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await RedisStore.open(server.url, timeout_ms=200)
    assert time.monotonic() - started < 0.5


async def test_reconnects_and_reloads_scripts_after_a_restart(server: RedisServer) -> None:
    store = await RedisStore.open(server.url, timeout_ms=200)
    acct = account()
    try:
        assert isinstance(await reserve(store, acct, [hold(1, 10)], "a"), Reserved)
        assert await store.read(acct, [ref()]) == [CounterState(reserved=1)]
        server.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await reserve(store, acct, [hold(1, 10)], "b")
        with pytest.raises(StoreUnavailable):
            await store.release(acct, "x", now_ms=now_ms())
        assert time.monotonic() - started < 0.5
        server.start()  # same port, empty (no persistence): scripts are gone too
        # The pool's connections are dead; the first call of each kind must still go through.
        assert await store.release(acct, "x", now_ms=now_ms()) is False
        r = await reserve(store, acct, [hold(1, 10)], "c")
        assert isinstance(r, Reserved)
        assert await store.commit(acct, r.reservation_id, [hold(1, 10)], [line(1)], idempotency_key="c",
                                  result=b"", now_ms=now_ms()) == Committed(overage=(0,))
        assert await store.read(acct, [ref()]) == [CounterState(spent=1, count=1)]
    finally:
        await store.close()


async def test_aof_keeps_a_commit_through_a_crash() -> None:
    with redis_server(appendonly=True) as server:
        store = await RedisStore.open(server.url)
        acct = account()
        holds = [hold(100, 1000)]
        try:
            r = await reserve(store, acct, holds, "k")
            assert isinstance(r, Reserved)
            assert await store.commit(acct, r.reservation_id, holds, [line(120)], idempotency_key="k",
                                      result=b"receipt", now_ms=now_ms()) == Committed(overage=(20,))
            open_r = await reserve(store, acct, holds, "k2")
            assert isinstance(open_r, Reserved)
            server.kill()  # SIGKILL right after the replies: appendfsync always has them on disk
            server.start()
            assert await store.read(acct, [ref()]) == [CounterState(spent=120, reserved=100, count=1)]
            assert [e.amount async for e in store.ledger(acct)] == [120]
            assert await reserve(store, acct, holds, "k") == Settled(b"receipt")
            assert await store.commit(acct, r.reservation_id, holds, [line(120)], idempotency_key="k",
                                      result=b"receipt", now_ms=now_ms()) == Committed((0,), duplicate=True)
            assert await store.release(acct, open_r.reservation_id, now_ms=now_ms()) is True
            assert await store.read(acct, [ref()]) == [CounterState(spent=120, count=1)]
        finally:
            await store.close()


# --- identity -------------------------------------------------------------------------------


async def test_identity_key_never_expires_and_shares_the_account_slot(store: RedisStore) -> None:
    acct = account()
    seen = await store.set_identity(acct, StoreIdentity("id-1", 2))
    key = f"{store.account_prefix(acct)}id"
    assert await store.client.hgetall(key) == {b"id": b"id-1", b"gen": b"2"}
    assert await store.client.pttl(key) == -1  # unlike counters and reservations: never dropped
    assert keyslot(key.encode()) == keyslot(acct.encode())
    assert isinstance(await store.reserve(acct, [hold(1, 10)], ttl_ms=60_000, idempotency_key="k",
                                          now_ms=now_ms(), limits_version=0, identity=seen), Reserved)


async def test_a_lost_commit_in_a_coalesced_batch_fails_alone(store: RedisStore) -> None:
    acct = account()
    seen = await store.set_identity(acct, StoreIdentity("id-1"))
    holds = [hold(10, 10**6)]
    rs = [await reserve(store, acct, holds, f"k{i}") for i in range(6)]
    assert all(isinstance(r, Reserved) for r in rs)

    async def settle(i: int, r: ReserveOutcome) -> Committed | StoreLost:
        assert isinstance(r, Reserved)
        identity = StoreIdentity("id-2") if i % 3 == 1 else seen
        try:
            return await store.commit(acct, r.reservation_id, holds, [line(4)], idempotency_key=f"k{i}",
                                      result=b"r", now_ms=now_ms(), identity=identity)
        except StoreLost as exc:
            return exc

    await store.client.config_resetstat()
    done = await asyncio.gather(*(settle(i, r) for i, r in enumerate(rs)))
    assert await command_calls(store, "evalsha") == 1  # one batch
    assert [isinstance(d, StoreLost) for d in done] == [False, True, False, False, True, False]
    assert await store.read(acct, [ref()]) == [CounterState(spent=16, reserved=20, count=4)]


async def test_a_server_restarted_empty_is_lost_to_callers_that_saw_it(server: RedisServer) -> None:
    store = await RedisStore.open(server.url, timeout_ms=1000)
    acct = account()
    try:
        seen = await store.set_identity(acct, StoreIdentity("id-1"))
        holds = [hold(100, 1000)]
        r = await store.reserve(acct, holds, ttl_ms=60_000, idempotency_key="k", now_ms=now_ms(),
                                limits_version=0, intent=b"intent", owner="a", identity=seen)
        assert isinstance(r, Reserved)
        server.kill()
        server.start()  # no persistence: everything is gone, the identity too
        assert await store.identity(acct) is None
        out = await store.reserve(acct, holds, ttl_ms=60_000, idempotency_key="k", now_ms=now_ms(),
                                  limits_version=0, identity=seen)
        assert isinstance(out, Lost), out
        with pytest.raises(StoreLost):
            await store.commit(acct, r.reservation_id, holds, [line(100)], idempotency_key="k", result=b"",
                               now_ms=now_ms(), identity=seen)
        with pytest.raises(StoreLost):
            await store.record_spend(acct, holds, [line(100)], idempotency_key="k", now_ms=now_ms(),
                                     kind="journal", identity=seen)
        assert await store.client.keys(f"{store.account_prefix(acct)}*") == []
    finally:
        await store.close()


# --- leases ---------------------------------------------------------------------------------


async def lease(store: RedisStore, acct: str, broker: str, seq: int, asks: list[LeaseAsk],
                spends: tuple[LeaseSpend, ...] = (), *, at: int | None = None) -> Leased:
    out = await store.lease(acct, broker, seq, asks, spends, ttl_ms=30_000,
                            now_ms=at if at is not None else now_ms(), limits_version=0)
    assert isinstance(out, Leased), out
    return out


async def test_lease_keys_share_the_account_slot_and_live_as_long_as_the_counters(store: RedisStore) -> None:
    acct, now = account(), now_ms()
    expire_at = now + 40 * DAY_MS
    broker = "{evil} broker"  # braces and spaces in a broker name stay in the account's slot
    asks = [LeaseAsk(hold(0, 1000, expire_at_ms=expire_at), 300),
            LeaseAsk(hold(0, 1000, scope="team:eng", expire_at_ms=expire_at), 200)]
    await lease(store, acct, broker, 1, asks, (LeaseSpend("p1", (line(5),), b"ok"),), at=now)
    p = store.account_prefix(acct)
    alice, eng = "user:alice|month|2026-11|USD", "team:eng|month|2026-11|USD"
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await store.client.keys(f"{p}*"))
    assert keys == sorted([
        f"{p}c:{alice}", f"{p}c:{eng}", f"{p}counters", f"{p}ledger", f"{p}i:p1", f"{p}lh:{alice}",
        f"{p}lh:{eng}", f"{p}lb:{broker}", f"{p}lc:{broker}"])
    assert {keyslot(k.encode()) for k in keys} == {keyslot(acct.encode())}
    assert await store.client.hgetall(f"{p}lh:{alice}") == {broker.encode(): b"300"}
    expires = str(now + 30_000).encode()
    assert await store.client.hgetall(f"{p}lb:{broker}") == {b"seq": b"1", b"expires": expires}
    assert await store.client.smembers(f"{p}lc:{broker}") == {alice.encode(), eng.encode()}
    assert await store.client.hmget(f"{p}c:{alice}", ["spent", "reserved", "leased", "count"]) == [
        b"5", b"300", b"300", b"1"]
    assert await store.client.hmget(f"{p}i:p1", ["state", "rid", "result"]) == [b"committed", b"", b"ok"]
    for key in (f"{p}lh:{alice}", f"{p}lb:{broker}", f"{p}lc:{broker}", f"{p}i:p1"):
        assert await store.client.pexpiretime(key) >= expire_at - 2_000, key
    # Returning a lease drops it from the broker's and the counter's sets.
    await lease(store, acct, broker, 2, [LeaseAsk(asks[0].hold, 0)], at=now)
    assert await store.client.exists(f"{p}lh:{alice}") == 0
    assert await store.client.smembers(f"{p}lc:{broker}") == {eng.encode()}
    assert await store.release_leases(acct, broker, as_spent=False, now_ms=now) == 200
    assert await store.client.exists(f"{p}lh:{eng}", f"{p}lb:{broker}", f"{p}lc:{broker}") == 0


async def test_leases_are_exact_beyond_2_to_the_53(store: RedisStore) -> None:
    acct = account()
    limit = 2**53 + 3
    first = await lease(store, acct, "b1", 1, [LeaseAsk(hold(0, limit), 2**53 + 1)])
    assert first.grants[0].granted == 2**53 + 1
    # Two nano-units are left, whatever a double would round 2^53 + 3 - (2^53 + 1) to.
    second = await lease(store, acct, "b2", 1, [LeaseAsk(hold(0, limit), 2**60)])
    assert second.grants[0].granted == 2
    assert second.grants[0].state == CounterState(reserved=limit)
    assert second.grants[0].state.leased == limit
    big = 9 * 10**18
    acct2 = account()
    await lease(store, acct2, "b1", 1, [LeaseAsk(hold(0, big), big - 7)])
    assert (await lease(store, acct2, "b2", 1, [LeaseAsk(hold(0, big), big)])).grants[0].granted == 7
    assert await store.release_leases(acct2, "b1", as_spent=True, now_ms=now_ms()) == big - 7
    entries = [e async for e in store.ledger(acct2)]
    assert [(e.amount, e.original_amount) for e in entries] == [(big - 7, "8999999999.999999993")]
    assert await store.read(acct2, [ref()]) == [CounterState(spent=big - 7, reserved=7, count=1)]
    with pytest.raises(ValueError, match="64 bits"):
        await store.lease(acct, "b1", 2, [LeaseAsk(hold(0, limit), 2**63)], (), ttl_ms=1, now_ms=now_ms(),
                          limits_version=0)


async def test_wait_replicas_makes_a_write_count_once_a_replica_has_it(tmp_path: Path) -> None:
    """One server and its replica (`--replicaof`): the durability option outside a cluster too."""
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    primary = RedisServer(tmp_path / "p", extra=("--repl-diskless-sync-delay", "0"))  # sync at once
    primary.start()
    replica = RedisServer(tmp_path / "r", extra=("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        replica.start()
        durable = await RedisStore.open(primary.url, timeout_ms=2000, wait_replicas=1)
        greedy = await RedisStore.open(primary.url, timeout_ms=400, wait_replicas=2)
        try:
            acct = account()
            for _ in range(200):  # until the replica has synced: WAIT counts it from then on
                if (await copy_info(replica)).get("master_link_status") == "up":
                    break
                await asyncio.sleep(0.05)
            r = await reserve(durable, acct, [hold(5, 1000)], "k1")
            assert isinstance(r, Reserved)
            await durable.commit(acct, r.reservation_id, [hold(5, 1000)], [line(5)], idempotency_key="k1",
                                 result=b"ok", now_ms=now_ms())
            with pytest.raises(StoreUnavailable, match="reached 1 of 2 replicas"):
                await reserve(greedy, acct, [hold(7, 1000)], "k2")
            # On the replica: the commit, and the write the greedy store was refused (it landed).
            copy = await RedisStore.open(replica.url, timeout_ms=2000)
            try:
                assert await copy.read(acct, [ref()]) == [CounterState(spent=5, reserved=7, count=1)]
            finally:
                await copy.close()
        finally:
            await durable.close()
            await greedy.close()
    finally:
        replica.stop()
        primary.stop()


async def copy_info(replica: RedisServer) -> dict[str, Any]:
    client = Redis.from_url(replica.url)
    try:
        info: dict[str, Any] = await client.info("replication")
        return info
    finally:
        await client.aclose()


# --- warnings ---------------------------------------------------------------------------------


async def test_reconcile_on_redis_prints_no_warning(redis_url: str, tmp_path: Path) -> None:
    """redis-py warned, for every connection pool the store built, that a synchronous Retry was
    given to its asyncio client: 277 times in one `make test` (pyproject's filterwarnings now
    makes any such warning fail the test), and as the first line `ramp-broker reconcile` printed."""
    config = write_yaml(tmp_path / "broker.yaml", {"period_budgets": {
        "store": {"kind": "redis", "url": redis_url, "key_prefix": f"w{uuid.uuid4().hex[:8]}"},
        "accounts": {"acme": {"scopes": {"user:alice": {
            "limits": [{"period": "month", "amount": "1", "currency": "USD"}]}}}},
    }})
    result = await asyncio.to_thread(run_cli, ["reconcile", "--config", str(config)], tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "counters match the ledger" in result.stdout, result.stdout
    assert "Warning" not in result.stderr, result.stderr


async def test_a_write_whose_first_attempt_may_have_run_is_never_said_unsent(store: RedisStore) -> None:
    """A retried call (reserve is, after a dropped connection) whose first attempt was sent and lost
    its connection may have run in Redis (then Redis died): even if the retry then finds the port
    refusing connections, it is not `not_sent` (the broker must not tell its caller nothing
    happened: a reservation made by the first attempt would be rolled forward)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    def attempts(*errors: Exception) -> Any:
        pending = list(errors)

        async def operation() -> None:
            raise pending.pop(0)
        return operation

    refused = RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    dropped = RedisConnectionError("Connection closed by server.")
    with pytest.raises(StoreUnavailable) as first_sent:
        await store._call(attempts(dropped, refused), retry=True)
    assert first_sent.value.not_sent is False
    with pytest.raises(StoreUnavailable) as never_sent:
        await store._call(attempts(refused, refused), retry=True)
    assert never_sent.value.not_sent is True
    with pytest.raises(StoreUnavailable) as unanswered:
        await store._call(attempts(dropped), retry=False)
    assert unanswered.value.not_sent is False
