"""Fault injection for per-period budgets: real broker processes on one real redis-server.

Every process (redis-server, the reference Exchange, each broker) runs on its own
127.0.0.1 port, and every fault is a real signal: SIGKILL a broker holding
reservations, SIGKILL redis-server mid-load, SIGKILL it right after commits. The
store is checked through a broker's admin API and by reading Redis directly with
RedisStore. Every state, journal and Redis file lives under the test's tmp_path;
every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from broker.purchase.agents import Agent as Caller
from broker.purchase.order import exchange_key
from budget.stores.contract import CounterState, LedgerEntry
from budget.stores.redis import RedisStore
from currency.money import Money
from tests.harness import agent_key, denial, exhausted
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    run_cli,
    set_knobs,
    start_broker,
    start_exchange,
)
from tests.redis_server import RedisServer

A = "https://x.test/a"  # 1.00 USD flat in catalog_tree()
ACCOUNT = "acme"
ADMIN_ENV, ADMIN = "RAMP_FAULT_TEST_ADMIN_TOKEN", "fault-admin-token"
ALICE, CLOSER, OPENER, LEASER = "alice-key", "closer-key", "opener-key", "leaser-key"
START_BALANCE = Decimal("1000.00")
REFUNDED = re.compile(rf"refunded (\d+) expired reservation\(s\) in account {ACCOUNT}")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def limit(period: str, amount: str) -> dict[str, str]:
    return {"period": period, "amount": amount, "currency": "USD"}


def usd(units: int) -> Decimal:
    return Money.from_units(units, "USD").amount


def period_config(
    exchange: Child, redis: RedisServer, journal: Path, *, scopes: dict[str, Any],
    agents: list[dict[str, Any]], ttl_s: int = 30, sweep_s: float = 0.2, timeout_ms: int = 1000,
    execute_timeout_ms: int = 5000,
) -> dict[str, Any]:
    """A broker on `redis` with its own fail-open journal file, and the admin API on.

    A TTL needs an execute_timeout_ms it outlives (min_reservation_ttl_seconds): a 2 s TTL
    allows 250 ms, 3 s allows 500 ms.
    """
    return broker_tree(
        exchange,
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000,
                "execute_timeout_ms": execute_timeout_ms},
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis.url, "timeout_ms": timeout_ms},
            "reservation_ttl_seconds": ttl_s,
            "sweep_interval_seconds": sweep_s,
            "journal_path": str(journal),
            "accounts": {ACCOUNT: {"scopes": scopes}},
        },
        agents=agents,
        admin={"token_env": ADMIN_ENV},
    )


ADMIN_ENVIRON = {ADMIN_ENV: ADMIN}


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, AOF on (appendfsync always), its files in tmp_path."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def redis_store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = await RedisStore.open(redis.url, timeout_ms=2000)
    try:
        yield store
    finally:
        await store.close()


def journal_empty(path: Path) -> bool:
    return not path.exists() or path.stat().st_size == 0


def _journal_empty(path: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return journal_empty(path)
    return check


async def buy_until_bought(client: httpx.AsyncClient, broker: Child, api_key: str, key: str,
                           within: float = 5.0) -> dict[str, Any]:
    """Buy A under `key`-0, -1, ... until one is bought; only UNAVAILABLE answers are retried.

    Right after the store comes back, a broker may deny for a moment more (it skips the store
    briefly after a failure); it must not deny for long, nor any other way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for i in range(int(within / 0.1) + 1):
        r = await connect_call(client, broker, "BrokerService/Transact", transact(f"{key}-{i}"),
                               key=api_key)
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            assert charged(body) == 1, body
            return body
        assert (r.status_code, r.json().get("code")) == (503, "unavailable"), r.text
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    pytest.fail(f"no purchase went through within {within}s of the store coming back")


@dataclass
class StoreView:
    counters: dict[str, tuple[str, CounterState]]  # counter key -> (scope, state)
    ledger: list[LedgerEntry]

    def spent(self, scope: str) -> Decimal:
        return sum((usd(s.spent) for sc, s in self.counters.values() if sc == scope), Decimal(0))

    def reserved(self) -> Decimal:
        return sum((usd(s.reserved) for _, s in self.counters.values()), Decimal(0))


async def read_store(redis: RedisServer) -> StoreView:
    """Every counter and ledger entry of the account, read straight from Redis."""
    async with redis_store(redis) as store:
        counters = {ref.key: (ref.scope, state) async for ref, state in store.counters(ACCOUNT)}
        ledger = [e async for e in store.ledger(ACCOUNT)]
    return StoreView(counters, ledger)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` every 50 ms until it holds; the seconds it took. Fails after `within` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(int(within / 0.05) + 2):
        if await check():
            return loop.time() - start
        if loop.time() - start > within:
            break
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {within}s: {what}")


def amount(state: dict[str, Any], name: str) -> Decimal:
    """A Money field of a Connect JSON BudgetState (absent means zero)."""
    return Decimal(state.get(name, {}).get("amount", "0") or "0")


async def scope_status(client: httpx.AsyncClient, broker: Child, scope: str) -> dict[str, Any]:
    """The scope's one period BudgetState, from the broker's admin API."""
    r = await connect_call(client, broker, "BudgetAdminService/GetScopeStatus", {"scope": scope},
                           token=ADMIN)
    assert r.status_code == 200, r.text
    (state,) = r.json()["budgets"]
    result: dict[str, Any] = state
    return result


def transact(key: str, uris: list[str] | None = None) -> dict[str, Any]:
    return {"sessionId": f"s-{key}", "idempotencyKey": key, "uris": uris or [A]}


def charged(body: dict[str, Any]) -> Decimal:
    """What the Exchange said it charged for a Transact answer's purchased items."""
    return sum((Decimal(i["result"]["cost"]["amount"]) for i in body.get("items", [])
                if i["status"] == "ITEM_STATUS_PURCHASED"), Decimal(0))


async def spent_at_exchange(client: httpx.AsyncClient, exchange: Child) -> Decimal:
    state = await exchange_state(client, exchange)
    return START_BALANCE - Decimal(state["balances"]["ramp-broker"]["USD"])


# --- a: a dead broker's reservations are refunded by another broker -----------------------------


async def test_killed_brokers_holds_are_rolled_forward_by_another_broker(
    tmp_path: Path, redis: RedisServer
) -> None:
    """A broker dies while the Exchange is buying: its holds are never refunded blindly. After
    the TTL the other broker's sweeper re-sends each stored request under its key and commits
    what the Exchange answers: what the Exchange charged is what the ledger holds, once."""
    ttl_s, sweep_s, n = 2, 0.2, 3
    scopes = {"user:alice": {"limits": [limit("month", "100.00")]}}
    agents = [{"id": "alice", "key_sha256": sha(ALICE), "account": ACCOUNT,
               "charged_to": ["user:alice"]}]
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        configs = [period_config(exchange, redis, tmp_path / f"journal-{i}.jsonl", scopes=scopes,
                                 agents=agents, ttl_s=ttl_s, sweep_s=sweep_s, execute_timeout_ms=250)
                   for i in (1, 2)]
        async with start_broker(tmp_path, configs[0], name="broker-1", env=ADMIN_ENVIRON) as b1, \
                start_broker(tmp_path, configs[1], name="broker-2", env=ADMIN_ENVIRON) as b2, \
                httpx.AsyncClient(timeout=15.0) as client:
            # Slow enough that broker 1 is still waiting on the Exchange when it dies (its call
            # and retry take up to 1 s; it is killed as soon as all n calls have arrived).
            await set_knobs(client, exchange, execute_latency_ms=(ttl_s + 1) * 1000)
            buys = [asyncio.create_task(connect_call(client, b1, "BrokerService/Transact",
                                                     transact(f"k{i}"), key=ALICE))
                    for i in range(n)]
            try:
                async def all_at_exchange() -> bool:
                    return int((await exchange_state(client, exchange))["execute_calls"]) >= n
                await eventually(all_at_exchange, 10.0, "broker 1's purchases reach the Exchange")
                # Reservations are taken before the Exchange is asked: n x 1.00 held.
                before = await scope_status(client, b2, "user:alice")
                assert amount(before, "reserved") == n, before
                assert amount(before, "spent") == 0, before

                assert await b1.kill() == -9
                loop = asyncio.get_running_loop()
                killed_at = loop.time()
                answers = await asyncio.gather(*buys, return_exceptions=True)
            finally:
                for task in buys:
                    task.cancel()
            assert all(isinstance(a, httpx.TransportError) for a in answers), answers

            # The dead broker cannot settle: the holds stay counted until their TTL...
            right_after = await scope_status(client, b2, "user:alice")
            assert amount(right_after, "reserved") == n, right_after
            await set_knobs(client, exchange, execute_latency_ms=0)

            # ...then broker 2 rolls each one forward with its stored request.
            async def settled() -> bool:
                return amount(await scope_status(client, b2, "user:alice"), "reserved") == 0
            await eventually(settled, ttl_s + 10 * sweep_s + 5.0, "the dead broker's holds are rolled "
                             "forward by broker 2's sweeper")
            took = loop.time() - killed_at
            assert took <= ttl_s + 10 * sweep_s + 5.0, took
            assert REFUNDED.findall(b2.stderr) == [], b2.stderr[-3000:]  # never refunded blindly

            view = await read_store(redis)
            state = await exchange_state(client, exchange)
            assert view.reserved() == 0, view
            # Whatever the Exchange charged (the calls broker 1 made may or may not have gone
            # through before it died; the re-sent ones are answered from the dedupe record or
            # executed now), the ledger holds exactly that, once per key.
            assert view.spent("user:alice") == await spent_at_exchange(client, exchange) == n
            assert int(state["charges"]) == n
            assert sorted(agent_key(e.idempotency_key) for e in view.ledger) == [f"k{i}" for i in range(n)]
            for i in range(n):
                retry = await connect_call(client, b2, "BrokerService/Transact", transact(f"k{i}"),
                                           key=ALICE)
                assert retry.status_code == 200, retry.text
                assert retry.json().get("replayed") is True, retry.json()
            assert int((await exchange_state(client, exchange))["charges"]) == n


# --- b: redis-server killed mid-load; closed and open scopes --------------------------------------


ALLOWANCE = "5.00"


def closed_and_open() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scopes team:closed (fails closed) and team:open (fails open, ALLOWANCE USD), one agent each."""
    scopes = {
        "team:closed": {"limits": [limit("month", "1000.00")], "failure": "closed"},
        "team:open": {"limits": [limit("month", "1000.00")], "failure": "open",
                      "open_allowance": {"amount": ALLOWANCE, "currency": "USD"}},
    }
    agents = [
        {"id": "closer", "key_sha256": sha(CLOSER), "account": ACCOUNT, "charged_to": ["team:closed"]},
        {"id": "opener", "key_sha256": sha(OPENER), "account": ACCOUNT, "charged_to": ["team:open"]},
    ]
    return scopes, agents


@dataclass
class Attempt:
    key: str
    started: float
    seconds: float
    status: int
    body: dict[str, Any]


@dataclass
class Agent:
    key: str
    attempts: list[Attempt] = field(default_factory=list)

    def after(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.started > t]

    def successes(self) -> int:
        return sum(a.status == 200 for a in self.attempts)

    def charged(self) -> Decimal:
        return sum((charged(a.body) for a in self.attempts if a.status == 200), Decimal(0))


async def load(client: httpx.AsyncClient, broker: Child, agent: Agent, name: str,
               stop: Callable[[Agent], bool], *, max_attempts: int = 200, max_seconds: float = 25.0,
               ) -> None:
    """One agent buying A over and over, one purchase at a time, until `stop` says so."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for i in range(max_attempts):
        if stop(agent) or loop.time() - begin > max_seconds:
            return
        key = f"{name}-{i}"
        started = loop.time()
        r = await connect_call(client, broker, "BrokerService/Transact", transact(key), key=agent.key)
        agent.attempts.append(Attempt(key, started, loop.time() - started, r.status_code, r.json()))
        await asyncio.sleep(0.01)


async def test_redis_killed_mid_load_closed_denies_open_spends_allowance_then_replays_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    timeout_ms, ttl_s, sweep_s = 200, 2, 0.2
    allowance = Decimal(ALLOWANCE)
    scopes, agents = closed_and_open()
    journal = tmp_path / "journal.jsonl"
    closer, opener = Agent(CLOSER), Agent(OPENER)
    killed_at: float | None = None

    def down_for(agent: Agent, code: int, times: int) -> bool:
        """`times` answers with `code` in a row since redis-server died."""
        if killed_at is None:
            return False
        tail = agent.after(killed_at)[-times:]
        return len(tail) == times and all(a.status == code for a in tail)

    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, journal, scopes=scopes, agents=agents, ttl_s=ttl_s,
                               sweep_s=sweep_s, timeout_ms=timeout_ms, execute_timeout_ms=250)
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker, \
                httpx.AsyncClient(timeout=15.0) as client:
            loop = asyncio.get_running_loop()
            workers = [
                asyncio.create_task(load(client, broker, closer, "closed",
                                         lambda a: down_for(a, 503, 5))),
                asyncio.create_task(load(client, broker, opener, "open",
                                         lambda a: down_for(a, 429, 3))),
            ]
            try:
                async def loaded() -> bool:
                    assert not any(w.done() for w in workers), [w.result() for w in workers if w.done()]
                    return closer.successes() >= 3 and opener.successes() >= 3
                await eventually(loaded, 15.0, "both agents buy while the store is up")
                await asyncio.to_thread(redis.kill)
                killed_at = loop.time()
                await asyncio.wait_for(asyncio.gather(*workers), 30.0)
            finally:
                for w in workers:
                    w.cancel()

            # Closed: every purchase begun after the kill is UNAVAILABLE, promptly, and never bought.
            denied = closer.after(killed_at)
            assert len(denied) >= 5
            for a in denied:
                assert (a.status, a.body.get("code")) == (503, "unavailable"), a
                assert a.seconds < 2.0, a
            # Open: purchases go on up to the allowance, then RESOURCE_EXHAUSTED naming why. (One whose
            # reservation reached Redis as it died is told outcome_pending instead: see below.)
            tail = [a for a in opener.after(killed_at) if a.status != 409]
            statuses = [a.status for a in tail]
            assert set(statuses) <= {200, 429}, tail
            assert 429 in statuses, tail
            first_429 = statuses.index(429)
            assert first_429 >= 1, statuses  # some of the allowance was left at the kill
            assert all(s == 429 for s in statuses[first_429:]), statuses
            for a in tail[first_429:]:
                assert a.body["code"] == "resource_exhausted", a
                assert exhausted(a.body).reason == "open_allowance_exhausted", exhausted(a.body)
            assert "Traceback" not in broker.stderr, broker.stderr[-3000:]

            # Everything spent on the allowance while the store was down is in the journal: the
            # open scope's share is exactly the allowance. (A purchase in flight at the kill is
            # not journaled: its hold and intent are in the store, and it is rolled forward.)
            entries = [json.loads(line) for line in journal.read_text().splitlines()]
            spends = {e["id"]: e for e in entries if "ack" not in e and "intent" not in e}
            # Every fail-open purchase journaled its intent before asking the Exchange, and its
            # spend settled it: none was cut off.
            intents = {e["id"] for e in entries if "intent" in e}
            assert intents == {e["settles"] for e in spends.values()}
            assert len(intents) == len(spends)
            open_journaled = sum(
                (Decimal(ln["original_amount"]) for e in spends.values() for ln in e["lines"]
                 if e["holds"][ln["hold_index"]]["counter"]["scope"] == "team:open"), Decimal(0))
            assert open_journaled == allowance, spends
            saved = shutil.copy(journal, tmp_path / "journal-before-replay.jsonl")

            await asyncio.to_thread(redis.start)

            async def replayed() -> bool:
                return journal.stat().st_size == 0
            await eventually(replayed, 10.0, "the broker replays its journal once the store is back")

            async def settled() -> bool:
                return (await read_store(redis)).reserved() == 0
            await eventually(settled, ttl_s + 5.0, "holds of purchases cut off by the kill are rolled "
                             "forward")

            # A purchase whose reservation reached Redis as it died was told `outcome_pending` (its
            # hold, restored from the AOF, is rolled forward): its retry, same key, is the purchase.
            later: dict[str, Decimal] = {}
            for agent in (closer, opener):
                for a in agent.attempts:
                    if a.status == 409:
                        assert denial(a.body).reason == "outcome_pending", a
                        retry = await connect_call(client, broker, "BrokerService/Transact", transact(a.key),
                                                   key=agent.key)
                        assert retry.status_code == 200, retry.text
                        later[a.key] = charged(retry.json())
            view = await read_store(redis)
            # Every purchase the Exchange charged is in the ledger exactly once (one item, one
            # scope each), committed, rolled forward or replayed from the journal; nothing else is.
            bought = [a.key for agent in (closer, opener) for a in agent.attempts if a.status == 200]
            in_ledger = sorted(agent_key(e.idempotency_key) for e in view.ledger)
            answers = {a.key: (a.status, a.body.get("code"), a.started - killed_at)
                       for agent in (closer, opener) for a in agent.attempts}
            assert in_ledger == sorted(bought + [k for k, amount in later.items() if amount]), {
                k: answers.get(k) for k in set(in_ledger) ^ set(bought)}
            journaled = {agent_key(e["idempotency_key"]) for e in spends.values()}
            replays = [agent_key(e.idempotency_key) for e in view.ledger if e.kind == "journal"]
            assert set(replays) <= journaled
            # Only a journaled commit that had landed after all (its answer lost) is not replayed.
            assert journaled - set(replays) <= {agent_key(e.idempotency_key) for e in view.ledger
                                                if e.kind == "commit"}
            assert {a.key for a in opener.after(killed_at) if a.status == 200} <= set(replays)
            # The counters hold exactly what the Exchange charged, per agent and in total.
            assert view.spent("team:closed") == closer.charged() + sum(
                (v for k, v in later.items() if k.startswith("closed-")), Decimal(0))
            assert view.spent("team:open") == opener.charged() + sum(
                (v for k, v in later.items() if k.startswith("open-")), Decimal(0))
            assert view.spent("team:closed") + view.spent("team:open") == \
                await spent_at_exchange(client, exchange)
            assert sum(e.amount for e in view.ledger) == sum(s.spent for _, s in view.counters.values())
            await broker.kill()

        # A broker restart re-reads its (now empty) journal: nothing is replayed again.
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker:
            await asyncio.sleep(5 * sweep_s)
            again = await read_store(redis)
            assert (again.counters, again.ledger) == (view.counters, view.ledger)
            await broker.kill()

        # A crash before the acks were written: the whole journal is offered again, and the
        # store records none of it twice.
        shutil.copy(saved, journal)
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker:
            await eventually(replayed, 10.0, "the restored journal is replayed")
            again = await read_store(redis)
            assert (again.counters, again.ledger) == (view.counters, view.ledger)


# --- c: with AOF (appendfsync always) no commit is lost to a redis-server SIGKILL -------------------


async def test_commits_survive_redis_sigkill_with_aof(tmp_path: Path, redis: RedisServer) -> None:
    n = 20
    scopes = {"user:alice": {"limits": [limit("month", "100.00")]},
              "org:acme": {"limits": [limit("month", "1000.00")]}}
    agents = [{"id": "alice", "key_sha256": sha(ALICE), "account": ACCOUNT,
               "charged_to": ["user:alice", "org:acme"]}]
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, tmp_path / "journal.jsonl", scopes=scopes,
                               agents=agents)
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker, \
                httpx.AsyncClient(timeout=15.0) as client:
            for batch in range(n // 4):
                answers = await asyncio.gather(*(
                    connect_call(client, broker, "BrokerService/Transact",
                                 transact(f"k{batch}-{i}"), key=ALICE) for i in range(4)))
                for r in answers:
                    assert r.status_code == 200, r.text
            before = await read_store(redis)
            # Killed at once after the last answer: no clean shutdown, no save.
            await asyncio.to_thread(redis.kill)
            await asyncio.to_thread(redis.start)
            after = await read_store(redis)

            assert after.counters == before.counters
            assert after.ledger == before.ledger
            assert len(after.ledger) == 2 * n
            for scope in ("user:alice", "org:acme"):
                assert after.spent(scope) == n, after
            assert {s.count for _, s in after.counters.values()} == {n}
            assert after.reserved() == 0
            assert await spent_at_exchange(client, exchange) == n
            assert journal_empty(tmp_path / "journal.jsonl")

            # The broker carries on against the restarted server.
            await buy_until_bought(client, broker, ALICE, "k-after")
            await eventually(_journal_empty(tmp_path / "journal.jsonl"), 10.0, "journal replayed")
            assert broker.config_path is not None
            result = await asyncio.to_thread(
                run_cli, ["reconcile", "--config", str(broker.config_path)], tmp_path)
            assert result.returncode == 0, (result.stdout, result.stderr)
            assert "counters match the ledger" in result.stdout
            assert f"against {2 * (n + 1)} ledger" in result.stdout, result.stdout


# --- d: a frozen redis-server (SIGSTOP): the store timeout itself bounds a denial ----------------


async def test_frozen_redis_denies_closed_within_the_store_timeout(
    tmp_path: Path, redis: RedisServer
) -> None:
    """SIGKILL refuses connections at once; a frozen server accepts and never answers. A closed
    scope's purchase is refused within the store timeout, but a reservation sent to the frozen
    server may still be made when it thaws (and its intent rolled forward after the TTL): that
    refusal says `outcome_pending` (retry the same key), and the retry is answered with the one
    purchase; one the broker never sent (it skips the store right after a failure) says
    `store_unavailable`, and is never charged."""
    timeout_ms = 200
    ttl_s = 3
    scopes, agents = closed_and_open()
    journal = tmp_path / "journal.jsonl"
    assert redis.proc is not None
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, journal, scopes=scopes, agents=agents,
                               timeout_ms=timeout_ms, ttl_s=ttl_s, execute_timeout_ms=500)
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker, \
                httpx.AsyncClient(timeout=15.0) as client:
            loop = asyncio.get_running_loop()

            async def buy(agent_key: str, key: str) -> tuple[int, dict[str, Any], float]:
                started = loop.time()
                r = await connect_call(client, broker, "BrokerService/Transact", transact(key),
                                       key=agent_key)
                return r.status_code, r.json(), loop.time() - started

            for agent_key, name in ((CLOSER, "closed"), (OPENER, "open")):
                status, body, _ = await buy(agent_key, f"{name}-warm")
                assert status == 200, body
            redis.proc.send_signal(signal.SIGSTOP)
            pending: list[str] = []
            try:
                for i in range(3):
                    status, body, seconds = await buy(CLOSER, f"closed-frozen-{i}")
                    assert (status, denial(body).reason) in ((409, "outcome_pending"),
                                                             (503, "store_unavailable")), body
                    assert seconds < 2.0, seconds
                    if status == 409:
                        pending.append(f"closed-frozen-{i}")
                assert pending, "the first call reached the frozen server"
                status, body, seconds = await buy(OPENER, "open-frozen")
                assert status == 200, body
                assert seconds < 2.0, seconds
                entries = [json.loads(line) for line in journal.read_text().splitlines()]
                # Its intent first (before the Exchange was asked), then its spend, which settles
                # the intent in the same write.
                intent, spend = entries
                assert (intent["idempotency_key"], spend["idempotency_key"]) == ("opener#open-frozen",) * 2
                assert intent["intent"]
                assert not intent["lines"]
                assert spend["lines"]
                assert spend["settles"] == intent["id"]
            finally:
                redis.proc.send_signal(signal.SIGCONT)

            await eventually(_journal_empty(journal), 10.0, "the journal is replayed once the server thaws")
            await buy_until_bought(client, broker, CLOSER, "closed-thawed")
            # Each purchase that may have been made is one purchase: its retry (same key) is answered
            # with it, at once or once its hold is rolled forward after the TTL.
            for key in pending:
                async def answered(key: str = key) -> bool:
                    status, body, _ = await buy(CLOSER, key)
                    assert status in (200, 409), body
                    return status == 200 and charged(body) == 1
                await eventually(answered, ttl_s + 10.0, f"the retry of {key} is answered")
            view = await read_store(redis)
            assert view.reserved() == 0, view
            assert view.spent("team:closed") == 2 + len(pending)
            assert view.spent("team:open") == 2
            assert [e.kind for e in view.ledger].count("journal") == 1
            assert view.spent("team:closed") + view.spent("team:open") == \
                await spent_at_exchange(client, exchange)


# --- e, f: a spend the Exchange charged once is counted once, however it reached the store ------


async def test_commit_cut_off_by_the_store_timeout_is_counted_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Redis freezes between reserve and commit: the commit times out. The hold and its intent
    are in the store: the commit lands when the server thaws, or the hold is rolled forward;
    either way the Exchange's one charge is counted once, and nothing is journaled."""
    # The Exchange takes 300 ms, time to freeze the store while it is asked; the broker waits
    # 500 ms for it, which a 3 s TTL outlives.
    ttl_s = 3
    scopes, agents = closed_and_open()
    journal = tmp_path / "journal.jsonl"
    assert redis.proc is not None
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, journal, scopes=scopes, agents=agents, ttl_s=ttl_s,
                               timeout_ms=200, execute_timeout_ms=500)
        async with start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker, \
                httpx.AsyncClient(timeout=15.0) as client:
            await set_knobs(client, exchange, execute_latency_ms=300)
            purchase = asyncio.create_task(connect_call(
                client, broker, "BrokerService/Transact", transact("k1"), key=CLOSER))
            try:
                async def at_exchange() -> bool:
                    return int((await exchange_state(client, exchange))["execute_calls"]) >= 1
                await eventually(at_exchange, 10.0, "the purchase reaches the Exchange")
                # Reserved, now buying: the store stops answering before the commit.
                redis.proc.send_signal(signal.SIGSTOP)
                try:
                    r = await asyncio.wait_for(purchase, 10.0)
                finally:
                    redis.proc.send_signal(signal.SIGCONT)
            finally:
                purchase.cancel()
            # Bought: the agent is told so, from the Exchange's answer.
            assert r.status_code == 200, r.text
            assert charged(r.json()) == 1
            assert journal_empty(journal)

            async def settled() -> bool:
                view = await read_store(redis)
                return view.reserved() == 0 and view.spent("team:closed") == 1
            await eventually(settled, ttl_s + 5.0, "the cut-off commit lands or is rolled forward")
            view = await read_store(redis)
            assert view.spent("team:closed") == await spent_at_exchange(client, exchange) == 1
            assert [(e.idempotency_key, e.kind) for e in view.ledger] == [("closer#k1", "commit")]
            assert (await exchange_state(client, exchange))["charges"] == 1


async def test_retry_on_another_broker_during_an_outage_is_counted_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Both brokers journal the same key; the Exchange charged it once; so must the store."""
    scopes, agents = closed_and_open()
    journals = [tmp_path / f"journal-{i}.jsonl" for i in (1, 2)]
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        configs = [period_config(exchange, redis, j, scopes=scopes, agents=agents, timeout_ms=200)
                   for j in journals]
        async with start_broker(tmp_path, configs[0], name="broker-1", env=ADMIN_ENVIRON) as b1, \
                start_broker(tmp_path, configs[1], name="broker-2", env=ADMIN_ENVIRON) as b2, \
                httpx.AsyncClient(timeout=15.0) as client:
            await asyncio.to_thread(redis.kill)
            first = await connect_call(client, b1, "BrokerService/Transact", transact("k1"), key=OPENER)
            assert first.status_code == 200, first.text
            # The agent did not hear back (say), and retries the same key on the other broker.
            retry = await connect_call(client, b2, "BrokerService/Transact", transact("k1"), key=OPENER)
            assert retry.status_code == 200, retry.text
            assert charged(first.json()) == charged(retry.json()) == 1
            assert (await exchange_state(client, exchange))["charges"] == 1
            await asyncio.to_thread(redis.start)

            async def replayed() -> bool:
                return all(journal_empty(j) for j in journals)
            await eventually(replayed, 10.0, "both brokers replay their journals")
            view = await read_store(redis)
            assert view.spent("team:open") == await spent_at_exchange(client, exchange) == 1
            assert [(e.idempotency_key, e.kind) for e in view.ledger] == [("opener#k1", "journal")]

            # Once replayed the key is settled everywhere: a later retry charges nothing more.
            async with start_broker(tmp_path, configs[0], name="broker-3",
                                    env=ADMIN_ENVIRON) as b3:
                again = await connect_call(client, b3, "BrokerService/Transact", transact("k1"),
                                           key=OPENER)
            assert again.status_code == 200, again.text
            assert again.json().get("replayed") is True, again.json()
            assert (await read_store(redis)).spent("team:open") == 1
            assert (await exchange_state(client, exchange))["charges"] == 1


# --- g: a fail-open purchase cut off after its charge is rolled forward from the journal ---------


async def test_fail_open_purchase_the_exchange_did_not_answer_is_rolled_forward_by_its_broker(
    tmp_path: Path, redis: RedisServer
) -> None:
    """The store is down, a scope fails open, and the Exchange executes too slowly to answer in
    time: the purchase ends unanswered. Its journaled intent goes to the same broker's upkeep,
    which rolls it forward (answered from the dedupe record) and, once the store is back, records
    the charge once. No restart needed."""
    scopes, agents = closed_and_open()
    journal = tmp_path / "journal.jsonl"
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            httpx.AsyncClient(timeout=15.0) as client:
        config = period_config(exchange, redis, journal, scopes=scopes, agents=agents, timeout_ms=200,
                               execute_timeout_ms=250, ttl_s=2)
        async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
            await asyncio.to_thread(redis.kill)
            await set_knobs(client, exchange, execute_latency_ms=2000)
            answer = await connect_call(client, b1, "BrokerService/Transact", transact("k2"), key=OPENER)
            await set_knobs(client, exchange, execute_latency_ms=0)
            assert answer.status_code == 200, answer.text
            assert all(i["status"] != "ITEM_STATUS_PURCHASED" for i in answer.json()["items"]), answer.text
            await asyncio.to_thread(redis.start)
            await eventually(_journal_empty(journal), 15.0, "the unanswered purchase is rolled forward")
            view = await read_store(redis)
            assert view.spent("team:open") == await spent_at_exchange(client, exchange) == 1
            assert [(e.idempotency_key, e.kind) for e in view.ledger] == [("opener#k2", "journal")]


async def test_fail_open_purchase_killed_after_the_charge_is_rolled_forward_from_the_journal(
    tmp_path: Path, redis: RedisServer
) -> None:
    """The store is down and a scope fails open: the purchase journals its intent before the
    Exchange is asked. The broker dies after the Exchange charged and before the spend was
    journaled; restarted, it re-sends the journaled request (answered from the Exchange's dedupe
    record) and records exactly what was charged, once."""
    scopes, agents = closed_and_open()
    journal = tmp_path / "journal.jsonl"
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, journal, scopes=scopes, agents=agents, timeout_ms=200)
        async with httpx.AsyncClient(timeout=15.0) as client:
            async with start_broker(tmp_path, config, name="broker-1", env=ADMIN_ENVIRON) as b1:
                await asyncio.to_thread(redis.kill)
                await set_knobs(client, exchange, answer_latency_ms=30_000)
                purchase = asyncio.create_task(connect_call(
                    client, b1, "BrokerService/Transact", transact("k1"), key=OPENER))
                try:
                    async def charged_at_exchange() -> bool:
                        return int((await exchange_state(client, exchange))["charges"]) >= 1
                    await eventually(charged_at_exchange, 10.0, "the Exchange charges the purchase")
                    (entry,) = [json.loads(line) for line in journal.read_text().splitlines()]
                    assert entry["idempotency_key"] == "opener#k1", entry
                    assert entry["intent"], entry
                    assert await b1.kill() == -9
                finally:
                    purchase.cancel()
            await set_knobs(client, exchange, answer_latency_ms=0)
            await asyncio.to_thread(redis.start)
            async with start_broker(tmp_path, config, name="broker-2", env=ADMIN_ENVIRON) as b2:
                await eventually(_journal_empty(journal), 10.0, "the cut-off purchase is rolled forward")
                view = await read_store(redis)
                assert view.spent("team:open") == await spent_at_exchange(client, exchange) == 1
                assert [(e.idempotency_key, e.kind) for e in view.ledger] == [("opener#k1", "journal")]
                state = await exchange_state(client, exchange)
                assert (int(state["charges"]), int(state["execute_calls"])) == (1, 2)  # one re-send
                retry = await connect_call(client, b2, "BrokerService/Transact", transact("k1"), key=OPENER)
                assert retry.status_code == 200, retry.text
                assert retry.json().get("replayed") is True, retry.json()
                assert int((await exchange_state(client, exchange))["charges"]) == 1


# --- h: a paused store in lease mode: refusals within the store timeout, whatever the queue --------


async def test_paused_store_refuses_lease_purchases_within_the_store_timeout(
    tmp_path: Path, redis: RedisServer
) -> None:
    """CLIENT PAUSE WRITE holds every lease refresh. Concurrent purchases that need one must not
    queue behind each other's store timeout: each is answered within about the timeout, bought
    from the lease this broker still holds (200) or refused (503 store_unavailable), and nothing
    refused is bought later (a reservation that lands after the pause would be rolled forward)."""
    timeout_ms, pause_ms = 500, 4000
    scopes = {"team:lease": {"limits": [limit("month", "1000.00")], "failure": "closed", "mode": "lease"}}
    agents = [{"id": "leaser", "key_sha256": sha(LEASER), "account": ACCOUNT, "charged_to": ["team:lease"]}]
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = period_config(exchange, redis, tmp_path / "journal.jsonl", scopes=scopes, agents=agents,
                               timeout_ms=timeout_ms, ttl_s=3, execute_timeout_ms=500)
        # Leases may be spent for 1 s after the last refresh: later in the pause, every purchase
        # needs a refresh.
        config["period_budgets"]["leases"] = {"refresh_seconds": 0.3, "ttl_seconds": 2,
                                              "journal_path": str(tmp_path / "leases.jsonl")}
        async with httpx.AsyncClient(timeout=30.0) as client, \
                start_broker(tmp_path, config, env=ADMIN_ENVIRON) as broker, \
                Redis.from_url(redis.url) as pauser:
            loop = asyncio.get_running_loop()

            async def buy(key: str) -> tuple[str, int, dict[str, Any], float]:
                started = loop.time()
                r = await connect_call(client, broker, "BrokerService/Transact", transact(key), key=LEASER)
                return key, r.status_code, r.json(), loop.time() - started

            for i in range(3):
                _, status, body, _ = await buy(f"warm-{i}")
                assert status == 200, body
            await pauser.client_pause(pause_ms, all=False)
            paused = loop.time()
            waves = [await asyncio.gather(*(buy(f"w1-{i}") for i in range(10)))]
            await asyncio.sleep(max(0.0, paused + 1.5 - loop.time()))  # the lease is no longer usable
            waves.append(await asyncio.gather(*(buy(f"w2-{i}") for i in range(10))))
            answers = waves[0] + waves[1]
            bound = 2 * timeout_ms / 1000 + 0.5
            timings = [(key, status, round(seconds, 2)) for key, status, _, seconds in answers]
            assert all(seconds <= bound for *_, seconds in timings), f"{timings}"
            refused = []
            for key, status, body, _ in answers:
                if status == 200:
                    assert charged(body) == 1, body
                    continue
                assert (status, body.get("code"), denial(body).reason) == (503, "unavailable",
                                                                            "store_unavailable"), body
                refused.append(key)
            assert any(status == 200 for _, status, *_ in waves[0])  # on the lease it still held
            assert {key for key, *_ in waves[1]} <= set(refused)  # no lease was usable any more
            await asyncio.sleep(max(0.0, paused + pause_ms / 1000 - loop.time()))
            await buy_until_bought(client, broker, LEASER, "after")
            # Past the reservation TTL (3 s) and a sweep: a hold that landed unseen is rolled
            # forward by then; none of the refused keys may reach the Exchange.
            await asyncio.sleep(4.0)
            statement = (await client.get(f"{exchange.url}/admin/statement")).json()["charges"]
            bought_keys = {c["idempotency_key"] for c in statement}
            assert not bought_keys & {exchange_key(Caller("leaser"), key) for key in refused}
            await broker.stop()  # a clean stop reports every lease spend and gives the leases back
            view = await read_store(redis)
            ledger = sorted(exchange_key(Caller("leaser"), agent_key(e.idempotency_key)) for e in view.ledger)
            assert ledger == sorted(c["idempotency_key"] for c in statement)
            assert view.spent("team:lease") == await spent_at_exchange(client, exchange)
            assert view.reserved() == 0
