"""The store on a real Redis Cluster (budget.stores.redis_cluster): what one server does not show.

The Store contract itself runs on the cluster in test_store_conformance.py. Here: every key of an
account in one slot, scripts on every primary, writes that wait for a replica; and, with broker
processes, a primary that dies under load (kill -9, failover to its replica, the node back as a
replica) loses no charge, and while a primary is down (before any promotion) its accounts' closed
scopes answer UNAVAILABLE, open ones spend their allowance, and accounts on other primaries buy on.

Every test uses the session's cluster (tests/conftest.py) under a key prefix of its own, and
leaves it healthy: a killed node is started again, a paused one resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from budget.stores.contract import CounterRef, Hold, Line, Reserved, StoreUnavailable
from budget.stores.redis_cluster import RedisClusterStore
from currency.money import Money
from tests.harness import CONNECT_JSON, broker_config, catalog, denial, running_broker, running_exchange
from tests.processes import Child, broker_tree, exchange_state, run_cli, start_broker, start_exchange
from tests.redis_cluster import ClusterNode, RedisCluster
from tests.test_crash_stress import OPENING_BALANCE, REQUESTER, URIS, purchased, to_exchange_key
from tests.test_crash_stress import catalog as chaos_catalog

DAY_MS = 86_400_000
AGENTS_PER_ACCOUNT = 3
RUN_SECONDS = 8.0
AFTER_HEALED_S = 3.0
MAX_RUN_SECONDS = 40.0
MAX_REQUESTS = 4000
KILL_AT_S = 2.0
PROMOTION_TIMEOUT_S = 20.0
TTL_S = 2
SETTLE_SECONDS = 25.0
# Per account: the one on the dead primary still has budget after the failover and runs dry later
# (denials on both sides of it); the others last through the outage. At the paced rate below an
# account spends about 50 USD/s: unpaced, a faster broker spent the first one's 150 before the kill.
LIMITS_USD = ("150.00", "400.00", "400.00")
REQUESTS_PER_S_PER_AGENT = 20.0


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def slot_of(key_prefix: str, account: str) -> int:
    return int(key_slot(f"{key_prefix}:{{{account}}}:id".encode()))


def spread_accounts(cluster: RedisCluster, key_prefix: str, stem: str) -> list[str]:
    """One account name per primary (`<stem><n>`), in the order of the primaries' ports."""
    by_primary: dict[int, str] = {}
    for n in range(500):
        name = f"{stem}{n}"
        by_primary.setdefault(cluster.primary_of(slot_of(key_prefix, name)).port, name)
        if len(by_primary) == 3:
            return [by_primary[port] for port in sorted(by_primary)]
    raise AssertionError("500 names did not land on 3 primaries")


def ref(scope: str = "user:alice") -> CounterRef:
    return CounterRef(scope, "month", "2026-11", "USD", 0, 1)


def hold(amount: int) -> Hold:
    return Hold(ref(), amount, 10**12, int(time.time() * 1000) + 30 * DAY_MS)


@pytest.fixture
async def store(redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterStore]:
    s = await RedisClusterStore.open_cluster(redis_cluster.urls[:1], timeout_ms=2000, prefix=prefix())
    yield s
    await s.close()


# --- the store on its own ---------------------------------------------------------------------------


async def test_an_accounts_keys_share_a_slot_and_accounts_spread_over_the_primaries(
    redis_cluster: RedisCluster, store: RedisClusterStore,
) -> None:
    accounts = spread_accounts(redis_cluster, store.account_prefix("x").split(":")[0], "acct")
    store.check_slots(accounts)
    assert len({redis_cluster.primary_of(store.slot_of(a)).port for a in accounts}) == 3
    # A name that would leave no hash tag is refused (config validation refuses it first).
    with pytest.raises(ValueError, match=r"hash to \d+ Redis Cluster slots, not one"):
        store.check_slots(["ok", ""])
    for a in accounts:  # every call of an account lands on its own primary
        r = await store.reserve(a, [hold(5)], ttl_ms=60_000, idempotency_key="k", now_ms=1, limits_version=0)
        assert isinstance(r, Reserved)
    for node in redis_cluster.nodes:
        with node.client() as c:
            mine = [k for k in c.keys(f"{store.account_prefix('*')}*")]
            if node.info("replication")["role"] == "master":
                served = {a for a in accounts if redis_cluster.primary_of(store.slot_of(a)).port == node.port}
                assert {k.decode().split("{")[1].split("}")[0] for k in mine} == served


async def test_scripts_are_loaded_on_every_primary_and_a_node_without_them_gets_their_text(
    redis_cluster: RedisCluster, store: RedisClusterStore,
) -> None:
    shas = [s.sha for s in store._scripts.values()]
    primaries = [n for n in redis_cluster.nodes if n.info("replication")["role"] == "master"]
    for node in primaries:
        with node.client() as c:
            assert all(c.script_exists(*shas)), node.port
    # What a replica promoted without the scripts shows: NOSCRIPT, answered by EVAL of the text.
    account = spread_accounts(redis_cluster, store.account_prefix("x").split(":")[0], "s")[1]
    node = redis_cluster.primary_of(store.slot_of(account))
    with node.client() as c:
        c.script_flush()
    r = await store.reserve(account, [hold(5)], ttl_ms=60_000, idempotency_key="k", now_ms=1,
                            limits_version=0)
    assert isinstance(r, Reserved)
    with node.client() as c:
        assert c.script_exists(store._scripts["reserve"].sha) == [True]
        assert "cmdstat_eval" in c.info("commandstats")


async def test_a_write_waits_for_a_replica_and_fails_like_an_unreachable_store_without_one(
    redis_cluster: RedisCluster,
) -> None:
    key_prefix = prefix()
    durable = await RedisClusterStore.open_cluster(redis_cluster.urls, timeout_ms=400, prefix=key_prefix,
                                                   wait_replicas=1)
    # Each primary has one replica: asking for two can never be met.
    greedy = await RedisClusterStore.open_cluster(redis_cluster.urls, timeout_ms=400, prefix=key_prefix,
                                                  wait_replicas=2)
    try:
        r = await durable.reserve("a", [hold(5)], ttl_ms=60_000, idempotency_key="k1", now_ms=1,
                                  limits_version=0)
        assert isinstance(r, Reserved)
        with pytest.raises(StoreUnavailable, match="reached 1 of 2 replicas"):
            await greedy.reserve("a", [hold(7)], ttl_ms=60_000, idempotency_key="k2", now_ms=1,
                                 limits_version=0)
        # As with a lost reply, the write may still have landed: it did, on the primary and its replica.
        (state,) = await durable.read("a", [ref()])
        assert state.reserved == 12
        # Reads wait for nothing.
        assert (await greedy.read("a", [ref()]))[0].reserved == 12
        line = Line(0, 5, "0.000000005", "USD", "e", "o", "u")
        await durable.commit("a", r.reservation_id, [hold(5)], [line], idempotency_key="k1", result=b"ok",
                             now_ms=2)
        assert (await greedy.read("a", [ref()]))[0].spent == 5
    finally:
        await durable.close()
        await greedy.close()


# --- brokers on the cluster --------------------------------------------------------------------------


def cluster_store(
    cluster: RedisCluster, key_prefix: str, *, timeout_ms: int, wait_replicas: int = 0,
) -> dict[str, Any]:
    # Two startup nodes, not all: the client finds the rest (and the one it was not told about).
    return {"kind": "redis-cluster", "urls": cluster.urls[:2], "key_prefix": key_prefix,
            "timeout_ms": timeout_ms, "wait_replicas": wait_replicas}


async def test_while_a_primary_is_down_its_closed_scopes_are_unavailable_others_buy(
    redis_cluster: RedisCluster,
) -> None:
    """Paused, with a node timeout long enough that no replica is promoted during the test."""
    key_prefix = prefix()
    down_acct, other_acct, _ = spread_accounts(redis_cluster, key_prefix, "p")
    # An open-failure account on the same primary as down_acct.
    victim = redis_cluster.primary_of(slot_of(key_prefix, down_acct))
    open_acct = next(a for a in (f"o{n}" for n in range(2000))
                     if redis_cluster.primary_of(slot_of(key_prefix, a)).port == victim.port)
    limit = [{"period": "month", "amount": "100.00", "currency": "USD"}]
    accounts = {
        down_acct: {"scopes": {"user:down": {"limits": limit}}},
        other_acct: {"scopes": {"user:other": {"limits": limit}}},
        open_acct: {"scopes": {"user:open": {"limits": limit, "failure": "open",
                                             "open_allowance": {"amount": "5.00", "currency": "USD"}}}},
    }
    agents = [{"id": f"agent-{scope}", "key_sha256": hashlib.sha256(f"key-{scope}".encode()).hexdigest(),
               "account": account, "charged_to": [f"user:{scope}"]}
              for account, scope in ((down_acct, "down"), (other_acct, "other"), (open_acct, "open"))]
    async with running_exchange(catalog()) as ex:
        config = broker_config([ex], period_budgets={
            "store": cluster_store(redis_cluster, key_prefix, timeout_ms=300), "sweep_interval_seconds": 0.2,
            "accounts": accounts}, agents=agents,
            session={"default_limit": {"amount": "1000.00", "currency": "USD"}})
        async with running_broker(config) as b:

            async def buy(scope: str, key: str) -> httpx.Response:
                body = {"sessionId": f"s-{scope}", "idempotencyKey": key, "uris": ["https://x.test/a"]}
                return await b.post("BrokerService/Transact", body, key=f"key-{scope}")

            for scope in ("down", "other", "open"):
                r = await buy(scope, "before")
                assert r.status_code == 200, r.text
            set_node_timeout(redis_cluster, 120_000)
            victim.pause()
            try:
                r = await buy("down", "during")
                # Sent to the paused primary and unanswered: the reservation may be made when it
                # resumes (its retry, same key, is answered with the purchase), so not "unavailable".
                assert (r.status_code, r.json()["code"]) == (409, "aborted"), r.text
                assert denial(r.json()).reason == "outcome_pending"
                r = await buy("other", "during")
                assert r.status_code == 200, r.text
                assert purchased(r.json())
                r = await buy("open", "during")  # spent from the open allowance, journaled
                assert r.status_code == 200, r.text
                assert purchased(r.json())
            finally:
                victim.resume()
                set_node_timeout(redis_cluster, redis_cluster.node_timeout_ms)
            # The primary is back (never replaced): its accounts buy again, once the broker stops skipping
            # it (a moment after a failure).
            for attempt in range(50):
                r = await buy("down", f"after-{attempt}")
                if r.status_code == 200:
                    break
                assert r.status_code == 503, r.text
                await asyncio.sleep(0.2)
            assert r.status_code == 200, r.text
            # And the open scope's spend from its allowance is replayed into the store, once.
            store = await RedisClusterStore.open_cluster(redis_cluster.urls, timeout_ms=2000,
                                                         prefix=key_prefix)
            try:
                for _ in range(50):
                    keys = [e.idempotency_key async for e in store.ledger(open_acct)]
                    if len(keys) == 2:
                        break
                    await asyncio.sleep(0.2)
                assert sorted(k.split("#")[1] for k in keys) == ["before", "during"], keys
            finally:
                await store.close()


def set_node_timeout(cluster: RedisCluster, ms: int) -> None:
    for node in cluster.nodes:
        if node.alive():
            with node.client() as c:
                c.config_set("cluster-node-timeout", str(ms))


@dataclass(frozen=True, slots=True)
class Answer:
    account: int
    started: float
    status: int
    body: dict[str, Any]


async def test_a_primary_killed_under_load_fails_over_and_loses_no_charge(
    redis_cluster: RedisCluster, tmp_path: Path,
) -> None:
    key_prefix = prefix()
    accounts = spread_accounts(redis_cluster, key_prefix, "acme")
    victim = redis_cluster.primary_of(slot_of(key_prefix, accounts[0]))
    # (account index, agent number)
    agents = [(i, i * AGENTS_PER_ACCOUNT + j)
              for i in range(len(accounts)) for j in range(AGENTS_PER_ACCOUNT)]
    tree = {
        # The shortest TTL allows execute_timeout_ms 250 (as in test_crash_stress).
        "fanout": {"discover_timeout_ms": 2000, "overall_timeout_ms": 4000, "execute_timeout_ms": 250},
        "rates": {"EUR": {"USD": "1.10"}},
        "session": {"default_limit": {"amount": "1000000.00", "currency": "USD"}},
        "period_budgets": {
            # wait_replicas: 1 keeps "every charge is counted" through the failover (README).
            "store": cluster_store(redis_cluster, key_prefix, timeout_ms=1000, wait_replicas=1),
            "reservation_ttl_seconds": TTL_S, "sweep_interval_seconds": 0.2,
            "accounts": {a: {"scopes": {f"user:{a}": {"limits": [
                {"period": "month", "amount": limit, "currency": "USD"}]}}}
                for a, limit in zip(accounts, LIMITS_USD, strict=True)},
        },
        "agents": [{"id": f"agent-{n}", "key_sha256": hashlib.sha256(f"key-{n}".encode()).hexdigest(),
                    "account": accounts[i], "charged_to": [f"user:{accounts[i]}"]} for i, n in agents],
    }
    answers: list[Answer] = []
    async with start_exchange(tmp_path, chaos_catalog()) as exchange, \
            start_broker(tmp_path, broker_tree(exchange, **tree), name="broker-0") as b0, \
            start_broker(tmp_path, broker_tree(exchange, **tree), name="broker-1") as b1:
        brokers = [b0, b1]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # The load runs RUN_SECONDS, and on until AFTER_HEALED_S after the shard has its replica back.
        deadline = [t0 + RUN_SECONDS]
        promoted_at: list[float] = []
        healed_at: list[float] = []

        async def shopper(account: int, agent: int, rng: random.Random) -> None:
            while loop.time() < min(deadline[0], t0 + MAX_RUN_SECONDS) and len(answers) < MAX_REQUESTS:
                started = loop.time()
                body = {"sessionId": f"s-{agent}", "idempotencyKey": f"k{rng.getrandbits(48):012x}",
                        "uris": rng.sample(URIS, rng.randint(1, 2))}
                try:
                    headers = {**CONNECT_JSON, "authorization": f"Bearer key-{agent}"}
                    r = await client.post(f"{rng.choice(brokers).url}/ramp.broker.v1.BrokerService/Transact",
                                          json=body, headers=headers)
                    answers.append(Answer(account, loop.time() - t0, r.status_code, r.json()))
                except (httpx.HTTPError, ValueError) as exc:
                    answers.append(Answer(account, loop.time() - t0, 0, {"error": repr(exc)}))
                await asyncio.sleep(max(0.0, started + 1 / REQUESTS_PER_S_PER_AGENT - loop.time()))

        async def failover() -> None:
            await asyncio.sleep(KILL_AT_S)
            deadline[0] = t0 + MAX_RUN_SECONDS  # until the shard is healed
            await asyncio.to_thread(victim.kill)
            await asyncio.to_thread(wait_promoted, redis_cluster, victim, slot_of(key_prefix, accounts[0]))
            promoted_at.append(loop.time() - t0)
            # Back as its replica: the shard can meet wait_replicas again.
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(redis_cluster.wait_healthy)
            healed_at.append(loop.time() - t0)
            deadline[0] = max(t0 + RUN_SECONDS, loop.time() + AFTER_HEALED_S)

        rng = random.Random(20261130)
        async with httpx.AsyncClient(timeout=15) as client, asyncio.timeout(MAX_RUN_SECONDS + 30):
            await asyncio.gather(failover(), *(shopper(i, n, random.Random(rng.random())) for i, n in agents))
        await settle(redis_cluster, key_prefix, accounts, brokers)
        store = await RedisClusterStore.open_cluster(redis_cluster.urls, timeout_ms=2000, prefix=key_prefix)
        try:
            ledgers = {a: [e async for e in store.ledger(a)] for a in accounts}
            counters = {a: [c async for c in store.counters(a)] for a in accounts}
        finally:
            await store.close()
        async with httpx.AsyncClient(timeout=10) as client:
            books = await exchange_state(client, exchange)
            statement = (await client.get(f"{exchange.url}/admin/statement")).json()["charges"]
        assert b0.config_path is not None
        reconcile = await asyncio.to_thread(run_cli, ["reconcile", "--config", str(b0.config_path)], tmp_path)
        logs = {b.name: b.stderr for b in brokers}

    statuses = Counter((a.account, a.status) for a in answers)
    promoted = promoted_at[0] if promoted_at else float("inf")
    resumed = min((a.started for a in answers if a.account == 0 and a.status == 200 and a.started > promoted),
                  default=float("inf"))
    healed = healed_at[0] if healed_at else float("inf")
    summary = (f"{len(answers)} requests, statuses by account {dict(sorted(statuses.items()))}; primary "
               f"{victim.port} killed at {KILL_AT_S}s, replica promoted at {promoted:.1f}s, the node back as "
               f"its replica at {healed:.1f}s, its account bought again at {resumed:.1f}s; "
               f"exchange charges {books['charges']}")
    print(summary)
    # The failover happened under load, and it cost the dead primary's account alone.
    assert promoted_at, summary
    bought = [a for a in answers if a.status == 200 and purchased(a.body)]
    assert any(a.account == 0 and a.started > promoted for a in bought), f"purchases never resumed: {summary}"
    for other in (1, 2):
        assert any(a.account == other and KILL_AT_S < a.started < promoted for a in bought), summary
    odd = [a for a in answers if not (
        a.status == 200 or (a.status == 429 and a.body.get("code") == "resource_exhausted")
        or (a.status == 409 and a.body.get("code") == "aborted")
        or (a.status == 503 and a.account == 0 and a.body.get("code") == "unavailable"))]
    assert not odd, f"{len(odd)} unexpected answers, e.g. {odd[:3]}\n{summary}"
    assert statuses[(0, 503)] > 0, f"the dead primary's account never saw it: {summary}"

    # 0 overspend, counters == ledger, Exchange charges == ledger, reconcile agrees.
    for a, limit_usd in zip(accounts, LIMITS_USD, strict=True):
        limit = Money.parse(limit_usd, "USD", "limit").units()
        for counter_ref, st in counters[a]:
            assert st.reserved == 0, (a, counter_ref, st)
            assert st.leased == 0, (a, counter_ref, st)
            assert st.spent <= limit + st.credit, (a, counter_ref, st, summary)
            assert st.spent == sum(e.amount for e in ledgers[a] if e.counter_key == counter_ref.key), (a, st)
    charged: dict[str, list[tuple[str, Decimal, str]]] = defaultdict(list)
    for c in statement:
        charged[c["idempotency_key"]].append((c["offer_id"], Decimal(c["amount"]), c["currency"]))
    in_ledger: dict[str, list[tuple[str, Decimal, str]]] = defaultdict(list)
    for entries in ledgers.values():
        for e in entries:
            in_ledger[to_exchange_key(e.idempotency_key)].append(
                (e.offer_id, Decimal(e.original_amount), e.original_currency))
    assert {k: sorted(v) for k, v in charged.items()} == {k: sorted(v) for k, v in in_ledger.items()}, summary
    assert books["charges"] == len(statement) > 0, summary
    for cur in ("USD", "EUR"):
        spent = OPENING_BALANCE - Decimal(books["balances"][REQUESTER][cur])
        assert spent == sum((x for lines in in_ledger.values() for _, x, c in lines if c == cur), Decimal(0))
    assert reconcile.returncode == 0, f"reconcile: {reconcile.stdout}{reconcile.stderr}\n{summary}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[text.find('Traceback') - 500:][:4000]}"


def wait_promoted(cluster: RedisCluster, dead: ClusterNode, slot: int) -> None:
    deadline = time.monotonic() + PROMOTION_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if cluster.primary_of(slot).port != dead.port:
                return
        except RuntimeError:
            pass  # marked failed, nobody promoted yet
        time.sleep(0.1)
    raise AssertionError(f"no replica of {dead.port} was promoted in {PROMOTION_TIMEOUT_S:g} s")


async def settle(cluster: RedisCluster, key_prefix: str, accounts: list[str], brokers: list[Child]) -> None:
    """Until nothing is reserved and no hold is open in any account (the sweepers roll forward what the
    failover left), within the TTL plus SETTLE_SECONDS."""
    store = await RedisClusterStore.open_cluster(cluster.urls, timeout_ms=2000, prefix=key_prefix)
    try:
        await asyncio.sleep(TTL_S + 1.0)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            left = {a: ([(r.key, st.reserved) async for r, st in store.counters(a) if st.reserved],
                        [h.idempotency_key for h in await store.holds(a)]) for a in accounts}
            if not any(held or holds for held, holds in left.values()):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(b.stderr[-3000:] for b in brokers)
                raise AssertionError(f"still held {SETTLE_SECONDS}s after the quiet period: {left}\n{logs}")
            await asyncio.sleep(0.2)
    finally:
        await store.close()

