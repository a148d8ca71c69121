"""Every charge is counted: a broker SIGKILLed inside a crash window never loses a charge.

Real `ramp-broker serve` processes, the reference Exchange, and a real store: a redis-server of
the test's own (AOF, appendfsync always) or the embedded SQLite file shared by both brokers. A
broker is killed while a purchase's hold is in the store with its intent and an Exchange has
already charged (or is about to answer), before the commit. After the TTL (or at once, for a
broker restarted with the same memory file) the hold is rolled forward: its stored request is
re-sent under the same key, the Exchange answers it from its dedupe record, and what it charged
is committed, once. The last test stalls a broker (SIGSTOP) inside the window past its TTL
instead of killing it: when it resumes, its own late commit must find the key settled.

Afterwards, each test proves the books: what every Exchange charged == the ledger, per key (its
statement against the ledger's original amounts) and per scope; every counter == its ledger's
sum; no counter over its limit (each limit is below what a double count would make); nothing
left reserved, no hold left open; and a retry of each key is answered 200 `replayed` and charges
nothing more. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status
from redis.asyncio import Redis

from broker.purchase.agents import Agent
from broker.purchase.order import exchange_key
from budget.stores.contract import CounterRef, CounterState, LedgerEntry, Store, UnsettledHold
from budget.stores.redis import RedisStore
from budget.stores.sqlite import SqliteStore
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.broker.v1 import broker_pb2_grpc
from tests.harness import agent_key, denial, lasting_port
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    set_knobs,
    start_broker,
    start_exchange,
)
from tests.redis_server import RedisServer

ACCOUNT = "acme"
AGENT_ID, API_KEY = "alice", "crash-alice-key"
ADMIN_ENV, ADMIN = "RAMP_CRASH_TEST_ADMIN_TOKEN", "crash-admin-token"
ADMIN_ENVIRON = {ADMIN_ENV: ADMIN}
# Every purchase is charged to both scopes.
SCOPES = {"user:alice": "month", "team:eng": "day"}
A = "https://x.test/a"  # 1.00 USD flat in catalog_tree()
# The shortest TTL the config allows with execute_timeout_ms 250 (two calls of 250 + 250 ms guard,
# twice over).
TTL_S = 2
EXECUTE_TIMEOUT_MS = 250
SWEEP_S = 0.2
# How long after the TTL a roll-forward may take: a few sweeps, a re-send, a commit.
SETTLE_S = TTL_S + 20 * SWEEP_S + 4.0
# The Exchange charges, then takes this long to answer: longer than the broker waits, so the broker
# hears of the charge only from its retry (answered at once from the dedupe record) ~250 ms later.
SLOW_ANSWER_MS = 2000
ROLLING = "rolling forward hold"  # the sweeper's log line (budget.period)
REFUNDED = "refunded"  # ... and what it must never do with a hold that has an intent


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def usd(units: int) -> Decimal:
    return Money.from_units(units, "USD").amount


def transact(key: str, uris: Sequence[str] = (A,)) -> dict[str, Any]:
    return {"sessionId": f"s-{key}", "idempotencyKey": key, "uris": list(uris)}


# --- the store: Redis of the test's own, or one SQLite file both brokers share -------------------


@dataclass
class Backend:
    kind: str
    sqlite_path: Path
    redis: RedisServer | None = None

    def setting(self, timeout_ms: int) -> dict[str, Any]:
        if self.redis is not None:
            return {"kind": "redis", "url": self.redis.url, "timeout_ms": timeout_ms}
        return {"kind": "embedded", "path": str(self.sqlite_path), "timeout_ms": timeout_ms}

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        store: Store
        if self.redis is not None:
            store = await RedisStore.open(self.redis.url, timeout_ms=2000)
        else:
            store = await SqliteStore.open(self.sqlite_path, timeout_ms=2000)
        try:
            yield store
        finally:
            await store.close()


async def _redis_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    await asyncio.to_thread(server.start)
    try:
        yield Backend("redis", tmp_path / "unused.sqlite3", server)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(params=["redis", "embedded"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "embedded":
        yield Backend("embedded", tmp_path / "shared" / "budget.sqlite3")
        return
    async for b in _redis_backend(tmp_path):
        yield b


@pytest.fixture
async def redis_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in _redis_backend(tmp_path):
        yield b


@dataclass
class StoreView:
    counters: dict[str, tuple[CounterRef, CounterState]]
    ledger: list[LedgerEntry]
    holds: list[UnsettledHold]

    def spent(self, scope: str) -> Decimal:
        return sum((usd(st.spent) for ref, st in self.counters.values() if ref.scope == scope), Decimal(0))

    def reserved(self, scope: str | None = None) -> Decimal:
        return sum((usd(st.reserved) for ref, st in self.counters.values()
                    if scope is None or ref.scope == scope), Decimal(0))

    def brief(self) -> str:
        return "; ".join(f"{ref.scope}: spent {usd(st.spent)} reserved {usd(st.reserved)} count {st.count}"
                         for ref, st in self.counters.values()) + f"; {len(self.ledger)} ledger entries, " \
            f"{len(self.holds)} open holds"


async def read_view(store: Store) -> StoreView:
    counters = {ref.key: (ref, st) async for ref, st in store.counters(ACCOUNT)}
    ledger = [e async for e in store.ledger(ACCOUNT)]
    return StoreView(counters, ledger, await store.holds(ACCOUNT))


async def read_store(backend: Backend) -> StoreView:
    async with backend.open() as store:
        return await read_view(store)


# --- processes -----------------------------------------------------------------------------------------


def broker_config(
    exchanges: Sequence[Child], backend: Backend, limits: dict[str, str], *, ttl_s: int = TTL_S,
    sweep_s: float = SWEEP_S, store_timeout_ms: int = 1000, mode: str = "strict",
    execute_timeout_ms: int = EXECUTE_TIMEOUT_MS,
) -> dict[str, Any]:
    """A broker on `backend` with its own fixed ports (so it can be restarted as itself), the
    admin API on, and agent alice charged to every scope of SCOPES."""
    return broker_tree(
        *exchanges,
        listen=f"127.0.0.1:{lasting_port()}",
        metrics={"listen": f"127.0.0.1:{lasting_port()}"},
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000,
                "execute_timeout_ms": execute_timeout_ms},
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": backend.setting(store_timeout_ms),
            "reservation_ttl_seconds": ttl_s,
            "sweep_interval_seconds": sweep_s,
            "accounts": {ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": period, "amount": limits[scope], "currency": "USD"}],
                        "mode": mode}
                for scope, period in SCOPES.items()}}},
        },
        agents=[{"id": AGENT_ID, "key_sha256": sha(API_KEY), "account": ACCOUNT,
                 "charged_to": list(SCOPES)}],
        admin={"token_env": ADMIN_ENV},
    )


@contextlib.asynccontextmanager
async def two_brokers(
    tmp_path: Path, c1: dict[str, Any], c2: dict[str, Any]
) -> AsyncIterator[tuple[Child, Child]]:
    """broker-1 and broker-2, started side by side (each is stopped on the way out)."""
    cms = [start_broker(tmp_path, c, name=f"broker-{i}", env=ADMIN_ENVIRON) for i, c in ((1, c1), (2, c2))]
    started = await asyncio.gather(*(cm.__aenter__() for cm in cms), return_exceptions=True)
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        b1, b2 = started
        assert isinstance(b1, Child)
        assert isinstance(b2, Child)
        yield b1, b2
    finally:
        for cm, outcome in zip(cms, started, strict=True):
            if not isinstance(outcome, BaseException):
                await cm.__aexit__(None, None, None)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str,
                     every: float = 0.05) -> float:
    """Poll `check` until it holds; the seconds it took. Fails the test after `within` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if await check():
            return loop.time() - start
        if loop.time() - start > within:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(every)


def charged_at(client: httpx.AsyncClient, exchange: Child) -> Callable[[], Awaitable[bool]]:
    """A check: the Exchange has charged something."""
    async def check() -> bool:
        return int((await exchange_state(client, exchange))["charges"]) >= 1
    return check


async def kill_in_window(broker: Child, purchase: asyncio.Task[httpx.Response],
                         inside: Callable[[], Awaitable[bool]], what: str) -> None:
    """SIGKILL `broker` as soon as `inside()` holds (polled every few ms), and check its caller
    never heard back: a 200 would mean the window closed before the kill."""
    try:
        await eventually(inside, 10.0, what, every=0.003)
        assert await broker.kill() == -9
        answer = await asyncio.wait_for(asyncio.gather(purchase, return_exceptions=True), 10.0)
    finally:
        purchase.cancel()
    assert isinstance(answer[0], httpx.TransportError), (
        f"the purchase was answered before the kill (window missed): {answer[0]!r}")


async def killed_once_charged(
    client: httpx.AsyncClient, exchange: Child, broker: Child, key: str,
) -> dict[str, Any]:
    """Send a purchase of A under `key` to `broker` and SIGKILL it once the Exchange has charged
    (its answer held back meanwhile); the purchase's body."""
    await set_knobs(client, exchange, answer_latency_ms=SLOW_ANSWER_MS)
    body = transact(key)
    purchase = asyncio.create_task(connect_call(client, broker, "BrokerService/Transact", body, key=API_KEY))
    await kill_in_window(broker, purchase, charged_at(client, exchange),
                         f"the Exchange charges {broker.name}'s purchase")
    await set_knobs(client, exchange, answer_latency_ms=0)
    return body


def assert_in_window(view: StoreView, spent: Decimal, reserved: Decimal, broker: Child) -> None:
    """The killed broker's hold is in the store as the window left it, on every scope."""
    for scope in SCOPES:
        assert (view.spent(scope), view.reserved(scope)) == (spent, reserved), (
            f"{scope} not as the crash window leaves it (spent {spent}, reserved {reserved}): "
            f"{view.brief()}\n{broker.name} stderr:\n{broker.stderr[-3000:]}")
    assert len(view.holds) == 1, view.brief()


# --- the books -----------------------------------------------------------------------------------------


async def statement(client: httpx.AsyncClient, exchange: Child) -> list[dict[str, str]]:
    r = await client.get(f"{exchange.url}/admin/statement")
    assert r.status_code == 200, r.text
    charges: list[dict[str, str]] = r.json()["charges"]
    return charges


def to_exchange_key(store_key: str) -> str:
    """The key an Exchange was sent for a ledger key `<agent id>#<key>`."""
    agent_id, _, key = store_key.partition("#")
    return exchange_key(Agent(agent_id), key)


Line = tuple[str, Decimal, str]  # offer id, amount, currency


async def check_books(
    client: httpx.AsyncClient, backend: Backend, exchanges: dict[str, Child], limits: dict[str, str],
    bodies: dict[str, dict[str, Any]], survivor: Child, *, lease: bool = False,
) -> tuple[StoreView, dict[str, dict[str, Any]]]:
    """Everything the Exchanges charged is in the ledger, once, and nothing else is; the counters are
    their ledgers; no limit is exceeded; nothing is held; every key replays without a charge.

    `lease`: the survivor spends from leases and did not settle these keys itself, so a retry is
    sent to the Exchange again (no store call), which answers it from its dedupe record: nothing
    more is charged, and the store counts the key once."""
    view = await read_store(backend)
    context = f"{view.brief()}\n{survivor.name} stderr:\n{survivor.stderr[-3000:]}"
    assert view.holds == [], context
    for ref, st in view.counters.values():
        assert st.reserved == 0, context
        entries = [e for e in view.ledger if e.counter_key == ref.key]
        assert st.spent == sum(e.amount for e in entries), (ref.key, context)
        assert st.count == len({e.idempotency_key for e in entries}), (ref.key, context)
        assert usd(st.spent) <= Decimal(limits[ref.scope]), (f"{ref.key} over its limit", context)
    assert {ref.scope for ref, _ in view.counters.values()} == set(SCOPES), context

    # Per Exchange and key: its statement == the ledger's original amounts, on every scope.
    charged: dict[tuple[str, str], list[Line]] = defaultdict(list)
    for name, ex in exchanges.items():
        for c in await statement(client, ex):
            charged[(name, c["idempotency_key"])].append(
                (c["offer_id"], Decimal(c["amount"]), c["currency"]))
    for scope in SCOPES:
        recorded: dict[tuple[str, str], list[Line]] = defaultdict(list)
        for e in view.ledger:
            if e.scope == scope:
                recorded[(e.exchange, to_exchange_key(e.idempotency_key))].append(
                    (e.offer_id, Decimal(e.original_amount), e.original_currency))
        assert {k: sorted(v) for k, v in recorded.items()} == {k: sorted(v) for k, v in charged.items()}, (
            f"{scope}: ledger {dict(recorded)} != Exchange statements {dict(charged)}\n{context}")
    assert sorted({agent_key(e.idempotency_key) for e in view.ledger}) == sorted(bodies), context

    # A retry of each key is the settled purchase, replayed: no Exchange is asked to buy again.
    before = {name: await exchange_state(client, ex) for name, ex in exchanges.items()}
    replays: dict[str, dict[str, Any]] = {}
    for key, body in bodies.items():
        retry = await connect_call(client, survivor, "BrokerService/Transact", body, key=API_KEY)
        assert retry.status_code == 200, retry.text
        replays[key] = retry.json()
        assert lease or replays[key].get("replayed") is True, replays[key]
    for name, ex in exchanges.items():
        after = await exchange_state(client, ex)
        for field in ("charges", "balances") if lease else ("charges", "execute_calls", "balances"):
            assert after[field] == before[name][field], (name, field, before[name], after)
    return view, replays


def purchased(body: dict[str, Any]) -> list[tuple[str, Decimal]]:
    return [(i["uri"], Decimal(i["result"]["cost"]["amount"])) for i in body.get("items", [])
            if i["status"] == "ITEM_STATUS_PURCHASED"]


# --- 1. charged, not yet committed: another broker rolls it forward -------------------------------------


async def test_killed_after_the_exchange_charged_before_the_commit(tmp_path: Path, backend: Backend) -> None:
    limits = {"user:alice": "1.50", "team:eng": "1.50"}  # one purchase of 1.00 fits; two do not
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        configs = [broker_config([exchange], backend, limits) for _ in range(2)]
        async with two_brokers(tmp_path, configs[0], configs[1]) as (b1, b2), \
                httpx.AsyncClient(timeout=15.0) as client:
            body = await killed_once_charged(client, exchange, b1, "k1")
            killed_at = asyncio.get_running_loop().time()
            assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)

            async def settled() -> bool:
                return (await read_store(backend)).reserved() == 0
            took = await eventually(settled, SETTLE_S, "broker 2 rolls the dead broker's hold forward")
            # Not before the TTL: the hold was counted as long as its broker might still commit it.
            assert asyncio.get_running_loop().time() - killed_at >= TTL_S - 0.5, took
            assert ROLLING in b2.stderr, b2.stderr[-3000:]
            assert REFUNDED not in b2.stderr, b2.stderr[-3000:]
            state = await exchange_state(client, exchange)
            assert state["charges"] == 1, state
            view, replays = await check_books(client, backend, {"ref.test": exchange}, limits,
                                              {"k1": body}, b2)
            assert view.spent("user:alice") == view.spent("team:eng") == 1
            assert purchased(replays["k1"]) == [(A, Decimal("1.00"))], replays




# --- 2. the commit blocked by a paused Redis, then the broker killed -------------------------------------


def redis_client_ports(pid: int, redis_port: int) -> set[int]:
    """The local ports of process `pid`'s TCP connections to `redis_port` (from Linux's /proc)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
            next(f)
            for row in f:
                cols = row.split()
                local, remote, inode = cols[1], cols[2], cols[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def client_port(info: dict[str, Any]) -> int:
    """The client's own port in a CLIENT LIST entry (addr=127.0.0.1:PORT)."""
    return int(str(info["addr"]).rsplit(":", 1)[1])


async def test_commit_blocked_by_paused_redis_then_killed_is_rolled_forward(
    tmp_path: Path, redis_backend: Backend
) -> None:
    """The Exchange answers at once, but the broker's commit waits on a paused Redis (CLIENT PAUSE
    WRITE); killed there, its commit never lands, and the other broker rolls the hold forward."""
    backend = redis_backend
    server = backend.redis
    assert server is not None
    limits = {"user:alice": "1.50", "team:eng": "1.50"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        # Broker 1 waits out the pause (store timeout 5 s) and makes no writes of its own meanwhile
        # (its sweeper ran once, at start); broker 2's sweeps time out during the pause and go on.
        c1 = broker_config([exchange], backend, limits, sweep_s=600, store_timeout_ms=5000)
        c2 = broker_config([exchange], backend, limits, store_timeout_ms=500)
        async with two_brokers(tmp_path, c1, c2) as (b1, b2), \
                httpx.AsyncClient(timeout=15.0) as client:
            redis = Redis.from_url(server.url)
            try:
                # Time to pause the store between the charge and the answer (which comes in time:
                # the broker waits 250 ms).
                await set_knobs(client, exchange, answer_latency_ms=150)
                body = transact("k1")
                purchase = asyncio.create_task(connect_call(client, b1, "BrokerService/Transact", body,
                                                            key=API_KEY))
                await eventually(charged_at(client, exchange), 10.0, "the Exchange charges",
                                 every=0.003)
                await redis.client_pause(20000, all=False)  # CLIENT PAUSE 20000 WRITE
                try:
                    blocked: set[int] = set()

                    async def commit_blocked() -> bool:
                        ports = redis_client_ports(b1.proc.pid, server.port)
                        blocked.update(client_port(c) for c in await redis.client_list()
                                       if client_port(c) in ports and "b" in str(c["flags"])
                                       and c["cmd"] == "evalsha")
                        return bool(blocked)
                    await eventually(commit_blocked, 5.0, "broker 1's commit waits on the paused Redis")
                    assert not purchase.done(), purchase
                    assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)
                    await kill_in_window(b1, purchase, _true, "broker 1 is killed")

                    async def dropped() -> bool:
                        # Redis freed the dead broker's client, and its postponed commit with it.
                        return not any(client_port(c) in blocked for c in await redis.client_list())
                    await eventually(dropped, 5.0, "Redis drops the dead broker's blocked client")
                finally:
                    await redis.client_unpause()
            finally:
                await redis.aclose()
            # The blocked commit never ran: the hold is there, unsettled, until its TTL.
            assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)
            await set_knobs(client, exchange, answer_latency_ms=0)

            async def settled() -> bool:
                return (await read_store(backend)).reserved() == 0
            await eventually(settled, SETTLE_S, "broker 2 rolls the hold forward after the unpause")
            assert ROLLING in b2.stderr, b2.stderr[-3000:]
            assert REFUNDED not in b2.stderr, b2.stderr[-3000:]
            assert (await exchange_state(client, exchange))["charges"] == 1
            view, replays = await check_books(client, backend, {"ref.test": exchange}, limits,
                                              {"k1": body}, b2)
            assert view.spent("user:alice") == 1
            assert purchased(replays["k1"]) == [(A, Decimal("1.00"))], replays


async def _true() -> bool:
    return True


# --- 3. two Exchanges: the fast part committed at once, the slow one rolled forward ---------------------

FAST, SLOW = "https://fast.test/a", "https://slow.test/b"


async def test_two_exchanges_fast_part_committed_slow_part_rolled_forward(
    tmp_path: Path, backend: Backend
) -> None:
    # 1.00 + 2.00 = 3.00 fits; counting either part twice (4.00 or 5.00) would not.
    limits = {"user:alice": "3.50", "team:eng": "3.50"}
    fast_catalog = catalog_tree("ref.fast", offers=[
        {"uri": FAST, "offer_id": "fast-a", "rate": "1.00", "currency": "USD"}])
    slow_catalog = catalog_tree("ref.slow", offers=[
        {"uri": SLOW, "offer_id": "slow-b", "rate": "2.00", "currency": "USD"}])
    async with start_exchange(tmp_path, fast_catalog, name="exchange-fast") as fast, \
            start_exchange(tmp_path, slow_catalog, name="exchange-slow") as slow:
        configs = [broker_config([fast, slow], backend, limits) for _ in range(2)]
        async with two_brokers(tmp_path, configs[0], configs[1]) as (b1, b2), \
                httpx.AsyncClient(timeout=15.0) as client, backend.open() as store:
            await set_knobs(client, slow, answer_latency_ms=SLOW_ANSWER_MS)
            body = transact("k2", [FAST, SLOW])
            purchase = asyncio.create_task(connect_call(client, b1, "BrokerService/Transact", body,
                                                        key=API_KEY))

            async def fast_committed_slow_charged() -> bool:
                if int((await exchange_state(client, slow))["charges"]) < 1:
                    return False
                view = await read_view(store)
                return all(view.spent(scope) == 1 for scope in SCOPES)
            await kill_in_window(b1, purchase, fast_committed_slow_charged,
                                 "the fast part is committed while the slow Exchange has charged")
            await set_knobs(client, slow, answer_latency_ms=0)
            # The fast part is spent, the slow part still held (with its intent).
            view = await read_view(store)
            assert_in_window(view, Decimal(1), Decimal(2), b1)
            assert sorted((e.scope, e.exchange, e.original_amount) for e in view.ledger) == sorted(
                (scope, "ref.fast", "1.00") for scope in SCOPES), view.ledger
            assert set(view.holds[0].done) == {0}, view.holds

            async def settled() -> bool:
                return (await read_view(store)).reserved() == 0
            await eventually(settled, SETTLE_S, "broker 2 rolls the slow part forward")
            assert ROLLING in b2.stderr, b2.stderr[-3000:]
            assert REFUNDED not in b2.stderr, b2.stderr[-3000:]
            fast_state, slow_state = await exchange_state(client, fast), await exchange_state(client, slow)
            # Only the unsettled part was re-sent: the fast Exchange was asked once.
            assert (fast_state["execute_calls"], fast_state["charges"]) == (1, 1), fast_state
            assert slow_state["charges"] == 1, slow_state
            assert slow_state["execute_calls"] >= 2, slow_state
            view, replays = await check_books(client, backend, {"ref.fast": fast, "ref.slow": slow}, limits,
                                              {"k2": body}, b2)
            assert all(view.spent(scope) == 3 for scope in SCOPES), view.brief()
            assert purchased(replays["k2"]) == [(FAST, Decimal("1.00")), (SLOW, Decimal("2.00"))], replays
            assert Decimal(replays["k2"]["totalCost"]["amount"]) == 3, replays


# --- 3b. two Exchanges: the first part's commit does not land, the last part answers ----------------------

# The store is made to refuse writes for a moment: Redis paused (CLIENT PAUSE WRITE), or the shared
# SQLite file locked by another connection (BEGIN EXCLUSIVE). Either way a commit waits out its timeout.
LOST_COMMIT = "budget store unreachable at commit"  # budget.period's warning


@contextlib.asynccontextmanager
async def writes_refused(backend: Backend) -> AsyncIterator[None]:
    if backend.redis is not None:
        redis = Redis.from_url(backend.redis.url)
        await redis.client_pause(30_000, all=False)
        try:
            yield
        finally:
            await redis.client_unpause()
            await redis.aclose()
        return
    conn = sqlite3.connect(backend.sqlite_path, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(conn.execute, "BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        await asyncio.to_thread(conn.execute, "ROLLBACK")
        conn.close()


async def _held_by_leases(backend: Backend, amount: Decimal) -> bool:
    view = await read_store(backend)
    return all(usd(st.leased) == amount for _, st in view.counters.values())


# Each store, mode and fault twice, in pairs (all eight took two minutes).
@pytest.mark.parametrize(("backend", "mode", "fault"), [
    ("redis", "strict", "live"), ("embedded", "strict", "killed"),
    ("redis", "lease", "killed"), ("embedded", "lease", "live"),
], indirect=["backend"])
async def test_two_exchanges_a_part_whose_commit_failed_is_not_released_by_the_last(
    tmp_path: Path, backend: Backend, mode: str, fault: str,
) -> None:
    """The fast Exchange charges and answers while the store refuses writes, so its part's commit
    fails; the slow Exchange answers after the store is back, last. Its commit must not end the
    hold: the fast part's charge is not in the ledger yet, and releasing its hold would free budget
    the Exchange already took. The agent is answered (both bought); the fast part stays held with
    its intent until a sweeper rolls it forward: the broker itself, or (`killed`: the broker
    SIGKILLed right after answering) the other one. In lease mode the scopes are too small for a
    lease (synchronous phase): the purchase reserves in the store, as in strict mode."""
    # Lease mode first buys the slow resource (2.00) alone, so that what is left (3.50) is under twice
    # the largest purchase seen: the synchronous phase. Then 1.00 + 2.00 fits; a part lost, or
    # counted twice (one more 1.00 or 2.00 over the limit), does not.
    limits = {scope: "5.50" if mode == "lease" else "3.50" for scope in SCOPES}
    fast_catalog = catalog_tree("ref.fast", offers=[
        {"uri": FAST, "offer_id": "fast-a", "rate": "1.00", "currency": "USD"}])
    slow_catalog = catalog_tree("ref.slow", offers=[
        {"uri": SLOW, "offer_id": "slow-b", "rate": "2.00", "currency": "USD"}])
    execute_timeout_ms = 1000
    ttl_s = 5  # the shortest the config allows with that timeout
    async with start_exchange(tmp_path, fast_catalog, name="exchange-fast") as fast, \
            start_exchange(tmp_path, slow_catalog, name="exchange-slow") as slow:
        configs = [broker_config([fast, slow], backend, limits, mode=mode, ttl_s=ttl_s, store_timeout_ms=150,
                                 execute_timeout_ms=execute_timeout_ms) for _ in range(2)]
        async with two_brokers(tmp_path, configs[0], configs[1]) as (b1, b2), \
                httpx.AsyncClient(timeout=15.0) as client:
            # The fast Exchange charges at once and answers 200 ms later. The slow one's first call
            # sleeps past the broker's timeout; the broker's retry (same key) is answered at once,
            # once the knob is off: so the slow answer comes after the store is back.
            bodies: dict[str, dict[str, Any]] = {}
            spent_before = Decimal(0)
            if mode == "lease":
                bodies["k-warm"] = transact("k-warm", [SLOW])
                warm = await connect_call(client, b1, "BrokerService/Transact", bodies["k-warm"], key=API_KEY)
                assert warm.status_code == 200, warm.text
                spent_before = Decimal(2)

                async def synchronous() -> bool:
                    r = await connect_call(client, b1, "BudgetService/GetBudgetStatus", {}, key=API_KEY)
                    phases = [b.get("phase") for b in r.json()["budgets"]]
                    return phases == ["synchronous"] * len(SCOPES)
                await eventually(synchronous, 10.0, "the scopes' leases reach the synchronous phase")
                await eventually(lambda: _held_by_leases(backend, Decimal(0)), 10.0,
                                 "the broker reports its spend and gives its leases back")
            await set_knobs(client, fast, answer_latency_ms=200)
            await set_knobs(client, slow, execute_latency_ms=30_000)
            body = bodies["k-two"] = transact("k-two", [FAST, SLOW])
            purchase = asyncio.create_task(connect_call(client, b1, "BrokerService/Transact", body,
                                                        key=API_KEY))
            try:
                await eventually(charged_at(client, fast), 10.0, "the fast Exchange charges", every=0.003)
                async with writes_refused(backend):
                    async def commit_failed() -> bool:
                        return LOST_COMMIT in b1.stderr
                    await eventually(commit_failed, 5.0, "the fast part's commit fails", every=0.005)
                await set_knobs(client, slow, execute_latency_ms=0)
                answer = await asyncio.wait_for(purchase, 15.0)
            finally:
                purchase.cancel()
            assert answer.status_code == 200, f"{answer.text}\n{b1.stderr[-3000:]}"
            assert purchased(answer.json()) == [(FAST, Decimal("1.00")), (SLOW, Decimal("2.00"))], answer.text
            if mode == "lease":
                assert "synchronous" in answer.headers["x-budget-mode"], answer.headers
            # The slow part is committed; the fast part's hold is still there, with its intent.
            view = await read_store(backend)
            assert_in_window(view, spent_before + 2, Decimal(1), b1)
            assert set(view.holds[0].done) == {1}, view.holds
            survivor = b1
            if fault == "killed":
                assert await b1.kill() == -9
                survivor = b2

            async def settled() -> bool:
                return (await read_store(backend)).reserved() == 0
            await eventually(settled, ttl_s + 20 * SWEEP_S + 4.0, "the fast part is rolled forward")
            # By either broker's sweeper (the live one's, or the other's), never refunded.
            logs = b1.stderr + b2.stderr
            assert ROLLING in (logs if fault == "live" else b2.stderr), logs[-5000:]
            assert REFUNDED not in logs, logs[-5000:]
            fast_state = await exchange_state(client, fast)
            assert fast_state["charges"] == 1, fast_state
            view, replays = await check_books(client, backend, {"ref.fast": fast, "ref.slow": slow}, limits,
                                              bodies, survivor)
            assert all(view.spent(scope) == spent_before + 3 for scope in SCOPES), view.brief()
            assert purchased(replays["k-two"]) == [(FAST, Decimal("1.00")), (SLOW, Decimal("2.00"))], replays


async def test_lease_purchase_whose_last_exchange_charges_nothing_keeps_the_first_charge(
    tmp_path: Path, backend: Backend
) -> None:
    """Lease mode, nobody killed: the fast Exchange charges its part, the slow one (no balance)
    refuses its part last. The last answer charged nothing, but the purchase did: the fast part's
    spend must be committed on the leases and reported, not released with the hold."""
    limits = {"user:alice": "5.00", "team:eng": "5.00"}
    fast_catalog = catalog_tree("ref.fast", offers=[
        {"uri": FAST, "offer_id": "fast-a", "rate": "1.00", "currency": "USD"}])
    slow_catalog = catalog_tree("ref.slow", accounts={"ramp-broker": {"USD": "0.00"}}, offers=[
        {"uri": SLOW, "offer_id": "slow-b", "rate": "2.00", "currency": "USD"}])
    async with start_exchange(tmp_path, fast_catalog, name="exchange-fast") as fast, \
            start_exchange(tmp_path, slow_catalog, name="exchange-slow") as slow, \
            httpx.AsyncClient(timeout=15.0) as client:
        config = broker_config([fast, slow], backend, limits, mode="lease")
        body = transact("k-denied-last", [FAST, SLOW])
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
            await set_knobs(client, slow, answer_latency_ms=150)  # its refusal comes last
            answer = await connect_call(client, b1, "BrokerService/Transact", body, key=API_KEY)
            assert answer.status_code == 200, answer.text
            statuses = [i["status"] for i in answer.json()["items"]]
            assert statuses == ["ITEM_STATUS_PURCHASED", "ITEM_STATUS_DENIED"], answer.text
        # Stopped cleanly: the leases reported their spend and went back.
        view = await read_store(backend)
        assert view.reserved() == 0, view.brief()
        assert all(view.spent(scope) == 1 for scope in SCOPES), view.brief()
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as again:
            await check_books(client, backend, {"ref.fast": fast, "ref.slow": slow}, limits,
                              {"k-denied-last": body}, again, lease=True)


# --- 4. a retry of the key after the TTL rolls the hold forward itself ----------------------------------


async def test_retry_after_the_ttl_rolls_the_hold_forward_itself(tmp_path: Path, backend: Backend) -> None:
    limits = {"user:alice": "1.50", "team:eng": "1.50"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        # Broker 2's sweeper runs once, at its start (before the purchase), then not for 10 minutes:
        # only the retry can find the hold.
        c1 = broker_config([exchange], backend, limits)
        c2 = broker_config([exchange], backend, limits, sweep_s=600)
        async with two_brokers(tmp_path, c1, c2) as (b1, b2), \
                httpx.AsyncClient(timeout=15.0) as client:
            loop = asyncio.get_running_loop()
            body = await killed_once_charged(client, exchange, b1, "k3")
            killed_at = loop.time()
            assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)
            calls = int((await exchange_state(client, exchange))["execute_calls"])

            # Within the TTL the key is in flight (its broker might still commit): nothing is sent.
            early = await connect_call(client, b2, "BrokerService/Transact", body, key=API_KEY)
            assert loop.time() - killed_at < TTL_S - 0.5
            assert early.status_code == 409, early.text
            assert denial(early.json()).reason == "idempotency_key_in_flight", early.json()
            assert int((await exchange_state(client, exchange))["execute_calls"]) == calls

            # After the TTL, before any sweeper: the hold is still there, and the retry settles it.
            await asyncio.sleep(max(0.0, killed_at + TTL_S + 0.3 - loop.time()))
            assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)
            retry = await connect_call(client, b2, "BrokerService/Transact", body, key=API_KEY)
            assert retry.status_code == 200, f"{retry.text}\n{b2.stderr[-3000:]}"
            assert retry.json().get("replayed") is True, retry.json()
            assert purchased(retry.json()) == [(A, Decimal("1.00"))], retry.json()
            state = await exchange_state(client, exchange)
            # The stored request, re-sent once under its key and answered from the dedupe record (a
            # re-planned request under the used key would have been refused by the Exchange).
            assert (state["charges"], state["execute_calls"]) == (1, calls + 1), state
            assert ROLLING not in b2.stderr, b2.stderr[-3000:]  # the retry did it, not a sweeper
            assert "rolled forward" in b2.stderr, b2.stderr[-3000:]
            view, _ = await check_books(client, backend, {"ref.test": exchange}, limits, {"k3": body}, b2)
            assert view.spent("user:alice") == 1


# --- 5. a broker restarted with the same memory file reclaims its own hold at once -------------------------


async def test_restarted_broker_reclaims_its_own_hold_at_once(tmp_path: Path, backend: Backend) -> None:
    ttl_s = 30  # long: the hold must not wait for it
    limits = {"user:alice": "1.50", "team:eng": "1.50"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            httpx.AsyncClient(timeout=15.0) as client:
        config = broker_config([exchange], backend, limits, ttl_s=ttl_s)
        port = str(config["listen"]).rsplit(":", 1)[1]
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
            body = await killed_once_charged(client, exchange, b1, "k4")
            view = await read_store(backend)
            assert_in_window(view, Decimal(0), Decimal(1), b1)
        # Same port, so the same memory file (named after it), which holds the instance that owns
        # the hold.
        memory = Path(os.environ["XDG_STATE_HOME"]) / "ramp-broker" / f"memory-{port}.json"
        assert memory.is_file(), memory
        assert view.holds[0].owner == json.loads(memory.read_text(encoding="utf-8"))["instance"], view.holds

        loop = asyncio.get_running_loop()
        restarted_at = loop.time()
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as again:
            assert again.url == b1.url

            async def settled() -> bool:
                return (await read_store(backend)).reserved() == 0
            await eventually(settled, 10.0, "the restarted broker reclaims its own hold")
            took = loop.time() - restarted_at
            assert took < 10.0 < ttl_s, took
            assert ROLLING in again.stderr, again.stderr[-3000:]
            assert (await exchange_state(client, exchange))["charges"] == 1
            view, _ = await check_books(client, backend, {"ref.test": exchange}, limits, {"k4": body}, again)
            assert view.spent("user:alice") == 1


async def test_lease_broker_killed_after_the_charge_settles_it_even_if_stopped_at_once(
    tmp_path: Path, backend: Backend
) -> None:
    """Lease mode: the hold is in the broker's lease and its intent in its own journal, so only
    it can roll the purchase forward. Killed after the Exchange charged, restarted, and stopped
    as soon as it is up: the charge is counted and nothing stays leased."""
    limits = {"user:alice": "5.00", "team:eng": "5.00"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            httpx.AsyncClient(timeout=15.0) as client:
        config = broker_config([exchange], backend, limits, mode="lease")
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
            body = await killed_once_charged(client, exchange, b1, "k7")
        view = await read_store(backend)
        for scope in SCOPES:  # the dead broker's lease, not yet reported: counted, not spent
            assert view.spent(scope) == 0, view.brief()
            assert view.reserved(scope) >= 1, view.brief()
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as again:
            pass
        assert (await exchange_state(client, exchange))["charges"] == 1
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as again:
            view, replays = await check_books(client, backend, {"ref.test": exchange}, limits,
                                              {"k7": body}, again, lease=True)
        assert view.spent("user:alice") == view.spent("team:eng") == 1
        assert purchased(replays["k7"]) == [(A, Decimal("1.00"))], replays
        # The retry's spend, reported when the broker stopped, was found recorded: counted once.
        after = await read_store(backend)
        assert after.spent("user:alice") == after.spent("team:eng") == 1, after.brief()
        assert after.reserved() == 0, after.brief()


async def test_lease_purchase_the_exchange_did_not_answer_is_rolled_forward_without_a_restart(
    tmp_path: Path, backend: Backend
) -> None:
    """Lease mode, nobody killed: the Exchange executes too slowly to answer in time, so the
    purchase ends with its part unanswered. Its journaled intent is handed to the broker's own upkeep, which
    rolls it forward (answered from the dedupe record); the charge reaches the ledger, and a
    clean shutdown leaves nothing leased."""
    limits = {"user:alice": "5.00", "team:eng": "5.00"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            httpx.AsyncClient(timeout=15.0) as client:
        config = broker_config([exchange], backend, limits, mode="lease")
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
            # Slow to execute: the broker's call and its retry both time out before the charge.
            await set_knobs(client, exchange, execute_latency_ms=SLOW_ANSWER_MS)
            body = transact("k8")
            answer = await connect_call(client, b1, "BrokerService/Transact", body, key=API_KEY)
            await set_knobs(client, exchange, execute_latency_ms=0)
            assert answer.status_code == 200, answer.text
            assert purchased(answer.json()) == [], answer.text  # unknown: the Exchange has not said

            async def counted() -> bool:
                return (await read_store(backend)).spent("user:alice") == 1
            await eventually(counted, SETTLE_S, "the broker rolls its unanswered purchase forward")
            assert "rolled forward the journaled purchase" in b1.stderr, b1.stderr[-3000:]
            retry = await connect_call(client, b1, "BrokerService/Transact", body, key=API_KEY)
            assert retry.status_code == 200, retry.text
            assert purchased(retry.json()) == [(A, Decimal("1.00"))], retry.text
        view = await read_store(backend)
        assert view.reserved() == 0, view.brief()
        assert (await exchange_state(client, exchange))["charges"] == 1
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as again:
            view, _ = await check_books(client, backend, {"ref.test": exchange}, limits, {"k8": body}, again,
                                        lease=True)
        assert view.spent("user:alice") == view.spent("team:eng") == 1


# --- 6. a broker frozen past its TTL comes back to find its purchase rolled forward ----------------------


async def test_broker_frozen_past_its_ttl_finds_its_purchase_settled(
    tmp_path: Path, backend: Backend
) -> None:
    """Not a crash but a stall (SIGSTOP: a VM pause, a swapped-out process) inside the same window,
    longer than the TTL: broker 2 rolls the hold forward meanwhile. Broker 1, resumed, hears the
    Exchange's answer and commits it: the key is settled already, so that commit changes nothing,
    and its agent is answered with the purchase; nothing is counted twice, no error is logged."""
    limits = {"user:alice": "1.50", "team:eng": "1.50"}
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        configs = [broker_config([exchange], backend, limits) for _ in range(2)]
        async with two_brokers(tmp_path, configs[0], configs[1]) as (b1, b2), \
                httpx.AsyncClient(timeout=30.0) as client:
            await set_knobs(client, exchange, answer_latency_ms=SLOW_ANSWER_MS)
            body = transact("k6")
            purchase = asyncio.create_task(connect_call(client, b1, "BrokerService/Transact", body,
                                                        key=API_KEY))
            try:
                await eventually(charged_at(client, exchange), 10.0, "the Exchange charges", every=0.003)
                b1.proc.send_signal(signal.SIGSTOP)
                try:
                    await set_knobs(client, exchange, answer_latency_ms=0)
                    assert_in_window(await read_store(backend), Decimal(0), Decimal(1), b1)

                    async def settled() -> bool:
                        return (await read_store(backend)).reserved() == 0
                    await eventually(settled, SETTLE_S, "broker 2 rolls the frozen broker's hold forward")
                    assert ROLLING in b2.stderr, b2.stderr[-3000:]
                finally:
                    b1.proc.send_signal(signal.SIGCONT)
                answer = await asyncio.wait_for(purchase, 20.0)
            finally:
                purchase.cancel()
            state = await exchange_state(client, exchange)
            assert state["charges"] == 1, state
            view, _ = await check_books(client, backend, {"ref.test": exchange}, limits, {"k6": body}, b2)
            assert view.spent("user:alice") == 1
            # Broker 1's own (late) commit found the key settled: its agent still gets the purchase,
            # and so does a retry of the key on broker 1 (replayed).
            again = await connect_call(client, b1, "BrokerService/Transact", body, key=API_KEY)
            outcome = (answer.status_code, again.status_code, again.json().get("replayed"))
            assert outcome == (200, 200, True), (
                f"broker 1's answer: {answer.status_code} {answer.text}; a retry on broker 1: "
                f"{again.status_code} {again.text}\nbroker-1 stderr:\n{b1.stderr[-4000:]}")
            assert purchased(answer.json()) == purchased(again.json()) == [(A, Decimal("1.00"))], (
                answer.json(), again.json())
            assert "Traceback" not in b1.stderr, b1.stderr[-4000:]
            assert (await exchange_state(client, exchange))["charges"] == 1


# --- 7. what a caller hears: "may be charged" (same key) is not "nothing happened" (new key is safe) ----


async def _replica_in_sync(replica: RedisServer) -> bool:
    client = Redis.from_url(replica.url)
    try:
        return (await client.info("replication")).get("master_link_status") == "up"
    finally:
        await client.aclose()


async def _grpc_transact(broker: Child, body: dict[str, Any]) -> tuple[grpc.StatusCode, bpb.Denial | None]:
    """The purchase over gRPC (grpcio): its status code and the Denial in its status details."""
    request = json_format.ParseDict(body, bpb.TransactRequest())
    async with grpc.aio.insecure_channel(broker.url.removeprefix("http://")) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        try:
            await stub.Transact(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=10)
        except grpc.aio.AioRpcError as err:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
            denials = [bpb.Denial.FromString(d.value) for d in (status.details if status else [])
                       if d.type_url.endswith("ramp.broker.v1.Denial")]
            return err.code(), (denials[0] if denials else None)
    return grpc.StatusCode.OK, None


async def test_a_reservation_the_store_may_have_made_is_answered_outcome_pending(tmp_path: Path) -> None:
    """`wait_replicas: 1` with the replica stopped: the reservation (with its intent) lands on the
    primary, but WAIT times out. The broker never asked the Exchange, yet a sweeper will roll that
    hold forward and the Exchange execute it: the answer is ABORTED `outcome_pending` (retry the same
    key), not `store_unavailable`. The retry is then answered with the purchase, bought once. A
    store that cannot be reached at all (nothing sent) is `store_unavailable`, and nothing is ever
    charged for it."""
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    primary = RedisServer(tmp_path / "p", appendonly=True, extra=("--repl-diskless-sync-delay", "0"))
    await asyncio.to_thread(primary.start)
    replica = RedisServer(tmp_path / "r", extra=("--replicaof", "127.0.0.1", str(primary.port)))
    await asyncio.to_thread(replica.start)
    backend = Backend("redis", tmp_path / "unused.sqlite3", primary)
    limits = {"user:alice": "10.00", "team:eng": "10.00"}
    try:
        await eventually(lambda: _replica_in_sync(replica), 10.0, "the replica syncs")
        async with start_exchange(tmp_path, catalog_tree()) as exchange, \
                httpx.AsyncClient(timeout=15.0) as client:
            config = broker_config([exchange], backend, limits, store_timeout_ms=500)
            config["period_budgets"]["store"]["wait_replicas"] = 1
            async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
                bodies = {"k0": transact("k0")}
                warm = await connect_call(client, b1, "BrokerService/Transact", bodies["k0"], key=API_KEY)
                assert warm.status_code == 200, warm.text

                replica.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                try:
                    bodies["k1"] = transact("k1")
                    pending = await connect_call(client, b1, "BrokerService/Transact", bodies["k1"],
                                                 key=API_KEY)
                    code, over_grpc = await _grpc_transact(b1, transact("k1-grpc"))
                    bodies["k1-grpc"] = transact("k1-grpc")
                finally:
                    replica.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                assert (pending.status_code, pending.json()["code"]) == (409, "aborted"), pending.text
                d = denial(pending.json())
                assert (d.reason, d.layer, d.scope) == ("outcome_pending", bpb.DENIAL_LAYER_STORE, "k1"), d
                assert "same idempotency key" in d.next_action
                assert "may already be charged" in d.next_action
                assert d.HasField("retry_at"), d
                assert (code, over_grpc and over_grpc.reason) == (grpc.StatusCode.ABORTED, "outcome_pending")
                # Nothing was sent to the Exchange yet: only the warm-up is charged.
                assert (await exchange_state(client, exchange))["charges"] == 1

                # The hold, with its intent, is in the store: rolled forward after the TTL, so the
                # Exchange does charge it; the retry with the same key hears it, bought once.
                async def charged() -> bool:
                    return int((await exchange_state(client, exchange))["charges"]) == 3
                await eventually(charged, SETTLE_S, "the sweeper rolls the pending holds forward")
                for key in ("k1", "k1-grpc"):
                    retry = await connect_call(client, b1, "BrokerService/Transact", bodies[key], key=API_KEY)
                    assert retry.status_code == 200, retry.text
                    assert purchased(retry.json()) == [(A, Decimal("1.00"))], retry.text

                # The store unreachable (nothing sent): store_unavailable, and a new key is safe.
                await asyncio.to_thread(primary.stop)

                async def not_ready() -> bool:
                    return (await client.get(f"{b1.url}/readyz")).status_code == 503
                await eventually(not_ready, 10.0, "the broker notices the store is down")
                down = await connect_call(client, b1, "BrokerService/Transact", transact("k2"), key=API_KEY)
                assert (down.status_code, denial(down.json()).reason) == (503, "store_unavailable"), down.text
                await asyncio.to_thread(primary.start)
                await asyncio.sleep(TTL_S + 10 * SWEEP_S)
                assert (await exchange_state(client, exchange))["charges"] == 3  # never k2
                await check_books(client, backend, {"ref.test": exchange}, limits, bodies, b1)
    finally:
        await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(primary.stop)
