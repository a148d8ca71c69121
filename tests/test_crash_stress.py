"""Brokers SIGKILLed at random under load never lose, double or leak a charge.

One redis-server (AOF, appendfsync always), one reference Exchange whose answers take a small
random time (it charges first, then answers: the crash window), and three `ramp-broker serve`
processes on one period budget. AGENT_TASKS asyncio tasks buy through random brokers (fresh
random keys, and ~10% retries of earlier requests, on any broker) while a chaos task SIGKILLs a
random broker every few seconds and restarts it with the same config (same port, so the same
memory file: it reclaims its own holds at once). A sampler on its own thread reads every counter
straight from Redis every ~50 ms and checks spent + reserved <= limit + credit.

After a quiet period longer than the TTL (every hold rolled forward by a sweeper, a restarted
broker, or a retry): nothing is reserved and no hold is open; the Exchange's statement equals the
ledger per key and per currency, and its charges in total; every counter equals its ledger;
`ramp-broker reconcile` exits 0; no counter is over its limit; no key was charged twice.

The same run in lease mode (every scope spent from pre-debited leases) has four brokers and 64
agents, and the redis-server itself is SIGKILLed and restarted (AOF) once mid-run: a killed
broker's leases stay counted until it comes back and reports its journal; at the end, with every
broker stopped, every lease is accounted for (nothing leased or reserved is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.purchase.agents import Agent
from broker.purchase.order import exchange_key
from budget.stores.contract import CounterRef, CounterState, LedgerEntry, StoreUnavailable
from budget.stores.redis import RedisStore
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from tests.harness import CONNECT_JSON, agent_key, exhausted, lasting_port
from tests.processes import (
    Child,
    broker_tree,
    exchange_state,
    run_cli,
    set_knobs,
    start_broker,
    start_exchange,
)
from tests.redis_server import RedisServer

SEED = 20261124
N_BROKERS = 3
AGENT_TASKS = 32
RUN_SECONDS = 24.0
RETRY_SHARE = 0.10
# Chaos: a kill every KILL_EVERY seconds (uniform), at least MIN_KILLS in the run.
KILL_EVERY = (1.5, 2.5)
MIN_KILLS = 4
# The shortest TTL execute_timeout_ms 250 allows; sweeps every 0.2 s.
TTL_S = 2
EXECUTE_TIMEOUT_MS = 250
SWEEP_S = 0.2
# The Exchange's knobs are re-drawn every KNOB_EVERY seconds from these (ms).
KNOB_EVERY = 0.4
ANSWER_LATENCY_MS = (0, 0, 10, 30, 60, 100, 150)
EXECUTE_LATENCY_MS = (0, 0, 0, 10, 30, 60)
REQUEST_TIMEOUT_S = 15.0
SETTLE_SECONDS = 20.0
SAMPLE_INTERVAL_S = 0.05
MAX_SAMPLES = 3000

ACCOUNT = "acme"
EXCHANGE = "ref.chaos"
REQUESTER = "ramp-broker"  # the broker's default requester id: the Exchange's billing account
OPENING_BALANCE = Decimal("100000")
ROLLING = "rolling forward hold"  # a sweeper (or a restarted broker) rolling a hold forward
ROLLED = "rolled forward:"  # any roll-forward finishing (sweeper, restart or retry)

# (price, currency) of https://chaos.test/r/<i>, flat: the Exchange charges exactly this.
PRICES: tuple[tuple[str, str], ...] = (
    ("0.05", "USD"), ("0.09", "USD"), ("0.13", "USD"), ("0.2", "USD"), ("0.25", "USD"),
    ("0.37", "USD"), ("0.41", "USD"), ("0.5", "USD"), ("0.66", "USD"), ("0.73", "USD"),
    ("0.99", "USD"), ("1.1", "USD"), ("1.23", "USD"), ("1.5", "USD"),
    ("0.03", "EUR"), ("0.11", "EUR"), ("0.29", "EUR"), ("0.47", "EUR"), ("0.89", "EUR"),
    ("1.31", "EUR"),
)
URIS = tuple(f"https://chaos.test/r/{i}" for i in range(len(PRICES)))

# scope -> (period, amount, currency). Users run dry first, then the teams; the org comes close.
LIMITS: dict[str, tuple[str, str, str]] = {
    "org:acme": ("month", "900.00", "USD"),
    "team:eng": ("day", "520.00", "USD"),
    "team:ops": ("day", "300.00", "EUR"),
    "user:u0": ("month", "120.00", "USD"),
    "user:u1": ("month", "190.37", "USD"),
    "user:u2": ("month", "260.00", "USD"),
    "user:u3": ("month", "95.00", "USD"),
    "user:u4": ("month", "150.00", "USD"),
    "user:u5": ("month", "170.50", "USD"),
}
AGENT_SCOPES: tuple[tuple[str, ...], ...] = tuple(
    (f"user:u{i}", "team:eng" if i < 3 else "team:ops", "org:acme") for i in range(6))


def api_key(agent: int) -> str:
    return f"chaos-agent-{agent}-key"


def catalog() -> dict[str, Any]:
    return {
        "exchange": EXCHANGE,
        "accounts": {REQUESTER: {"USD": str(OPENING_BALANCE), "EUR": str(OPENING_BALANCE)}},
        "offers": [{"uri": uri, "offer_id": f"o{i}", "rate": price, "currency": cur}
                   for i, (uri, (price, cur)) in enumerate(zip(URIS, PRICES, strict=True))],
    }


@dataclass(frozen=True, slots=True)
class Shape:
    mode: str
    brokers: int
    agents: int


SHAPES = {"strict": Shape("strict", N_BROKERS, AGENT_TASKS), "lease": Shape("lease", 4, 64)}


def broker_config(exchange: Child, redis: RedisServer, mode: str = "strict") -> dict[str, Any]:
    """Fixed ports (the same broker comes back on the same port, with the same memory file)."""
    return broker_tree(
        exchange,
        listen=f"127.0.0.1:{lasting_port()}",
        metrics={"listen": f"127.0.0.1:{lasting_port()}"},
        fanout={"discover_timeout_ms": 2000, "overall_timeout_ms": 4000,
                "execute_timeout_ms": EXECUTE_TIMEOUT_MS},
        rates={"EUR": {"USD": "1.10"}},
        session={"default_limit": {"amount": "1000000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis.url, "timeout_ms": 2000},
            "reservation_ttl_seconds": TTL_S,
            "sweep_interval_seconds": SWEEP_S,
            "leases": {"refresh_seconds": 0.2, "ttl_seconds": 10},
            "accounts": {ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": p, "amount": a, "currency": c}], "mode": mode}
                for scope, (p, a, c) in LIMITS.items()}}},
        },
        agents=[{"id": f"agent-{i}", "key_sha256": hashlib.sha256(api_key(i).encode()).hexdigest(),
                 "account": ACCOUNT, "charged_to": list(scopes)}
                for i, scopes in enumerate(AGENT_SCOPES)],
    )


def limit_units() -> dict[str, tuple[str, int]]:
    """scope -> (currency, nano-units)."""
    return {scope: (c, Money.parse(a, c, "limit").units()) for scope, (_, a, c) in LIMITS.items()}


# --- brokers that die and come back -------------------------------------------------------------------------


@dataclass
class Slot:
    """One broker: the same config (port, memory file) through every incarnation."""

    index: int
    config: dict[str, Any]
    directory: Path
    child: Child | None = None
    _cm: AbstractAsyncContextManager[Child] | None = None
    earlier: list[str] = field(default_factory=list)  # stderr of the incarnations killed

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}"

    @property
    def name(self) -> str:
        return f"broker-{self.index}"

    async def start(self) -> None:
        self._cm = start_broker(self.directory, self.config, name=self.name)
        self.child = await self._cm.__aenter__()

    async def kill(self) -> None:
        assert self.child is not None
        assert self._cm is not None
        code = await self.child.kill()
        assert code == -9, f"{self.name} had exited with {code} before the kill:\n{self.child.stderr[-3000:]}"
        await self._cm.__aexit__(None, None, None)
        self.earlier.append(self.child.stderr)
        self.child, self._cm = None, None

    async def stop(self) -> None:
        if self._cm is not None and self.child is not None:
            await self._cm.__aexit__(None, None, None)
            self.earlier.append(self.child.stderr)
        self.child, self._cm = None, None

    def stderr(self) -> str:
        return "".join(self.earlier) + (self.child.stderr if self.child else "")


# --- the load -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purchase:
    agent: int
    key: str
    uris: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"sessionId": f"chaos-{self.agent}", "idempotencyKey": self.key, "uris": list(self.uris)}

    @property
    def store_key(self) -> str:
        return f"agent-{self.agent}#{self.key}"


@dataclass(frozen=True, slots=True)
class Attempt:
    purchase: Purchase
    broker: int
    retry: bool
    started: float
    status: int  # HTTP status, 0 when the request failed (a killed broker)
    body: dict[str, Any]


@dataclass
class Load:
    deadline: float
    history: list[Purchase] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    kills: list[tuple[float, int]] = field(default_factory=list)
    seq: int = 0
    redis_restarts: int = 0


async def shopper(load: Load, client: httpx.AsyncClient, slots: list[Slot], rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < load.deadline:
        retry = bool(load.history) and rng.random() < RETRY_SHARE
        if retry:
            purchase = rng.choice(load.history)
        else:
            load.seq += 1
            purchase = Purchase(rng.randrange(len(AGENT_SCOPES)), f"c{load.seq}-{rng.getrandbits(40):010x}",
                                tuple(rng.sample(URIS, rng.randint(1, 3))))
            load.history.append(purchase)
        # An agent sends to a broker that is up (as far as it knows): a kill cuts off what is in flight.
        up = [slot.index for slot in slots if slot.child is not None] or [slot.index for slot in slots]
        b = rng.choice(up)
        started = loop.time()
        try:
            headers = {**CONNECT_JSON, "authorization": f"Bearer {api_key(purchase.agent)}"}
            r = await client.post(f"{slots[b].url}/ramp.broker.v1.BrokerService/Transact",
                                  json=purchase.body(), headers=headers)
            status, body = r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, body = 0, {"error": f"{type(exc).__name__}: {exc}"}
            await asyncio.sleep(0.05)  # its broker is down: do not spin on it
        load.attempts.append(Attempt(purchase, b, retry, started, status, body))


async def chaos(load: Load, slots: list[Slot], rng: random.Random) -> None:
    """SIGKILL a random running broker every few seconds; each comes back (same config) on its own
    time, so the kills keep their pace however long a start takes."""
    loop = asyncio.get_running_loop()
    restarts: set[asyncio.Task[None]] = set()
    down: set[int] = set()

    async def restart(slot: Slot) -> None:
        await slot.start()
        down.discard(slot.index)

    try:
        while True:
            await asyncio.sleep(rng.uniform(*KILL_EVERY))
            if loop.time() > load.deadline - 1.0:
                return
            up = [slot for slot in slots if slot.index not in down]
            if not up:
                continue
            slot = rng.choice(up)
            down.add(slot.index)
            load.kills.append((loop.time(), slot.index))
            await slot.kill()
            restarts.add(asyncio.create_task(restart(slot)))
    finally:
        await asyncio.gather(*restarts)


async def knobs(load: Load, client: httpx.AsyncClient, exchange: Child, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < load.deadline:
        await set_knobs(client, exchange, answer_latency_ms=rng.choice(ANSWER_LATENCY_MS),
                        execute_latency_ms=rng.choice(EXECUTE_LATENCY_MS))
        await asyncio.sleep(KNOB_EVERY)
    await set_knobs(client, exchange, answer_latency_ms=0, execute_latency_ms=0)


# --- watching the counters ----------------------------------------------------------------------------------


@dataclass
class Samples:
    taken: int = 0
    missed: int = 0  # samples that found Redis down
    violations: list[str] = field(default_factory=list)
    peak: dict[str, int] = field(default_factory=dict)  # counter key -> highest spent + reserved
    seconds: float = 0.0


def check_counter(ref: CounterRef, st: CounterState) -> str | None:
    currency, limit = limit_units()[ref.scope]
    if ref.currency != currency:
        return f"{ref.key}: counter in {ref.currency}, its limit is in {currency}"
    if st.spent < 0 or st.reserved < 0:
        return f"{ref.key}: spent {st.spent}, reserved {st.reserved} (nano-units)"
    if st.spent + st.reserved > limit + st.credit:
        return (f"{ref.key}: spent {Money.from_units(st.spent, currency)} + reserved "
                f"{Money.from_units(st.reserved, currency)} > limit {Money.from_units(limit, currency)} "
                f"+ credit {Money.from_units(st.credit, currency)}")
    return None


def lease_holders_logs(slots: list[Slot], brokers: set[str]) -> str:
    """The last lease and shutdown lines of the slots whose instance id (memory file) holds a lease."""
    out = []
    for slot in slots:
        port = str(slot.config["listen"]).rsplit(":", 1)[1]
        memory = Path(os.environ["XDG_STATE_HOME"]) / "ramp-broker" / f"memory-{port}.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(memory.read_text(encoding="utf-8"))["instance"] in brokers:
                words = ("lease", "settle", "stopp", "starting", "Traceback", "rolled")
                lines = [ln for ln in slot.stderr().splitlines() if any(w in ln for w in words)]
                out.append(f"{slot.name}:\n" + "\n".join(lines[-40:]))
    return "\n".join(out)


def sample_in_thread(redis_url: str, stop: threading.Event, out: Samples) -> None:
    asyncio.run(_sample(redis_url, stop, out))


async def _sample(redis_url: str, stop: threading.Event, out: Samples) -> None:
    store = await RedisStore.open(redis_url, timeout_ms=2000)
    try:
        t0 = time.monotonic()
        while not stop.is_set() and out.taken + out.missed < MAX_SAMPLES:
            started = time.monotonic()
            try:
                async for ref, st in store.counters(ACCOUNT):
                    problem = check_counter(ref, st)
                    if problem is not None and len(out.violations) < 50:
                        out.violations.append(f"sample {out.taken} at +{started - t0:.2f}s: {problem}")
                    out.peak[ref.key] = max(out.peak.get(ref.key, 0), st.spent + st.reserved)
            except StoreUnavailable:
                # The lease variant kills Redis mid-run; the sampler waits it out like the brokers do.
                out.missed += 1
            else:
                out.taken += 1
            await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - started)))
        out.seconds = time.monotonic() - t0
    finally:
        await store.close()


# --- the test -----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path, shape: Shape) -> AsyncIterator[tuple[RedisServer, Child, list[Slot]]]:
    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisServer(directory, appendonly=True)
    await asyncio.to_thread(redis.start)
    slots: list[Slot] = []
    try:
        async with start_exchange(tmp_path, catalog()) as exchange:
            slots = [Slot(i, broker_config(exchange, redis, shape.mode), tmp_path)
                     for i in range(shape.brokers)]
            try:
                await asyncio.gather(*(slot.start() for slot in slots))
                yield redis, exchange, slots
            finally:
                for slot in slots:
                    await slot.stop()
    finally:
        await asyncio.to_thread(redis.stop)


Line = tuple[str, Decimal, str]  # offer id, amount, currency


def to_exchange_key(store_key: str) -> str:
    agent_id, _, key = store_key.partition("#")
    return exchange_key(Agent(agent_id), key)


def purchased(body: dict[str, Any]) -> list[Line]:
    return [(i["offer"]["offerId"], Decimal(i["result"]["cost"]["amount"]), i["result"]["cost"]["currency"])
            for i in body.get("items", []) if i.get("status") == "ITEM_STATUS_PURCHASED"]


def period_exhausted(body: dict[str, Any]) -> bool:
    try:
        return body.get("code") == "resource_exhausted" and exhausted(body).layer == bpb.BUDGET_LAYER_PERIOD
    except (AssertionError, KeyError, TypeError, ValueError):
        return False


@pytest.mark.parametrize("mode", ["strict", "lease"])
async def test_brokers_killed_at_random_under_load_lose_no_charge(tmp_path: Path, mode: str) -> None:
    shape = SHAPES[mode]
    started = time.monotonic()
    async with deployment(tmp_path, shape) as (redis, exchange, slots):
        setup_s = time.monotonic() - started
        store = await RedisStore.open(redis.url, timeout_ms=2000)
        try:
            await _run_and_check(tmp_path, redis, store, exchange, slots, setup_s, started, shape)
        finally:
            await store.close()


async def redis_restart(load: Load, redis: RedisServer) -> None:
    """SIGKILL the redis-server once mid-run and start it again (AOF: nothing committed is lost)."""
    await asyncio.sleep(RUN_SECONDS / 2)
    await asyncio.to_thread(redis.kill)
    load.redis_restarts += 1
    await asyncio.sleep(0.5)
    await asyncio.to_thread(redis.start)


async def _run_and_check(
    tmp_path: Path, redis: RedisServer, store: RedisStore, exchange: Child, slots: list[Slot],
    setup_s: float, started: float, shape: Shape,
) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(SEED)
    load = Load(deadline=loop.time() + RUN_SECONDS)
    samples = Samples()
    stop = threading.Event()
    sampler = asyncio.create_task(asyncio.to_thread(sample_in_thread, redis.url, stop, samples))
    limits = httpx.Limits(max_connections=shape.agents * 2, max_keepalive_connections=shape.agents)
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client, \
                asyncio.timeout(RUN_SECONDS + 2 * REQUEST_TIMEOUT_S + 30):
            await asyncio.gather(
                chaos(load, slots, random.Random(rng.random())),
                knobs(load, client, exchange, random.Random(rng.random())),
                *(shopper(load, client, slots, random.Random(rng.random())) for _ in range(shape.agents)),
                *([redis_restart(load, redis)] if shape.mode == "lease" else []),
            )
        load_s = time.monotonic() - started - setup_s
        if shape.mode == "lease":
            # Leases are held by live brokers by design: stop every one (a clean shutdown reports
            # its spend and gives its leases back), then nothing may stay leased or reserved.
            for slot in slots:
                await slot.stop()
        # Quiet: longer than the TTL, so every hold left by a kill or a lost answer is rolled forward.
        await asyncio.sleep(TTL_S + 1.0)
        quiet_started = loop.time()
        while True:
            counters = {ref.key: (ref, st) async for ref, st in store.counters(ACCOUNT)}
            held = {k: st.reserved for k, (_, st) in counters.items() if st.reserved}
            holds = await store.holds(ACCOUNT)
            if not held and not holds:
                break
            if loop.time() - quiet_started >= SETTLE_SECONDS:
                leases = await store.leases(ACCOUNT)
                pytest.fail(
                    f"still reserved {SETTLE_SECONDS}s after a quiet period of {TTL_S + 1}s: {held}; "
                    f"open holds {[(h.idempotency_key, h.owner, h.attempts) for h in holds]}; "
                    f"leases {leases}\n"
                    + lease_holders_logs(slots, {lease.broker for lease in leases}))
            await asyncio.sleep(0.2)
        settle_s = TTL_S + 1.0 + loop.time() - quiet_started
    finally:
        stop.set()
        await asyncio.wait_for(sampler, 15)
    ledger = [e async for e in store.ledger(ACCOUNT)]
    async with httpx.AsyncClient(timeout=10) as client:
        books = await exchange_state(client, exchange)
        r = await client.get(f"{exchange.url}/admin/statement")
        assert r.status_code == 200, r.text
        statement: list[dict[str, str]] = r.json()["charges"]
    reconcile = await asyncio.to_thread(
        run_cli, ["reconcile", "--config", str(tmp_path / f"{slots[0].name}.yaml")], tmp_path)

    attempts = load.attempts
    statuses = Counter(a.status for a in attempts)
    logs = {slot.name: slot.stderr() for slot in slots}
    rolled_by_sweepers = sum(text.count(ROLLING) for text in logs.values())
    rolled = sum(text.count(ROLLED) for text in logs.values())
    limit_of = limit_units()
    utilization = {k: peak / limit_of[k.split("|")[0]][1] for k, peak in samples.peak.items()}
    max_util = max(utilization.values(), default=0.0)
    bought_keys = {agent_key(e.idempotency_key) for e in ledger}
    tracebacks = sum(text.count("Traceback") for text in logs.values())
    summary = (
        f"{shape.mode} mode, {shape.brokers} brokers, {shape.agents} agents, {load.redis_restarts} redis "
        f"restart(s); seed {SEED}: {len(attempts)} requests in {load_s:.1f}s "
        f"({sum(a.retry for a in attempts)} retries "
        f"of a key) after {setup_s:.1f}s setup; {len(bought_keys)} purchases in the ledger; "
        f"{len(load.kills)} kills; {rolled_by_sweepers} holds rolled forward by sweepers/restarts "
        f"('{ROLLING}'), {rolled} roll-forwards finished in all; {statuses.get(429, 0)} denials; status "
        f"{dict(sorted(statuses.items()))}; max utilization {max_util:.4f}; {samples.taken} samples in "
        f"{samples.seconds:.1f}s; {len(ledger)} ledger entries; exchange charges {books['charges']}, "
        f"execute_calls {books['execute_calls']}; settled {settle_s:.1f}s after the load; total "
        f"{time.monotonic() - started:.1f}s; {tracebacks} tracebacks in the brokers' logs"
    )
    print(summary)

    # 0. The chaos happened, and nobody hid an error.
    assert len(load.kills) >= MIN_KILLS, summary
    if shape.mode == "strict":
        assert rolled_by_sweepers >= 1, f"no kill left a hold to roll forward: {summary}"
    assert exchange.alive, exchange.stderr[-3000:]
    assert len(bought_keys) >= 100, f"too few purchases to mean anything: {summary}"
    assert statuses.get(429, 0) > 0, f"the budgets never ran dry: {summary}"
    for name, text in logs.items():
        assert "different transaction" not in text, f"{name}:\n{text[-4000:]}\n{summary}"

    # 1. Never over a limit: at every sample, and at the end.
    assert samples.taken >= 20, f"the sampler hardly ran: {summary}"
    assert not samples.violations, "\n".join([summary, *samples.violations])
    final = [p for ref, st in counters.values() if (p := check_counter(ref, st))]
    assert not final, "\n".join([summary, *final])

    # 3. Counters == their ledgers (spent and purchase count); reconcile agrees.
    by_counter: dict[str, list[LedgerEntry]] = defaultdict(list)
    for e in ledger:
        by_counter[e.counter_key].append(e)
    assert set(by_counter) <= set(counters), (sorted(by_counter), sorted(counters))
    for k, (ref, st) in counters.items():
        entries = by_counter.get(k, [])
        assert st.spent == sum(e.amount for e in entries), (
            f"{k}: counter spent {Money.from_units(st.spent, ref.currency)}, ledger "
            f"{Money.from_units(sum(e.amount for e in entries), ref.currency)}\n{summary}")
        assert st.count == len({e.idempotency_key for e in entries}), (k, st, summary)
    assert reconcile.returncode == 0, f"reconcile: {reconcile.stdout}{reconcile.stderr}\n{summary}"
    assert "counters match the ledger" in reconcile.stdout, reconcile.stdout

    # 4. The Exchange's books == the ledger: per key (statement lines against org:acme's entries,
    #    which every purchase touches; every scope of the agent has the same lines), per currency,
    #    and in total. No key was charged twice.
    charged: dict[str, list[Line]] = defaultdict(list)
    for c in statement:
        charged[c["idempotency_key"]].append((c["offer_id"], Decimal(c["amount"]), c["currency"]))
    twice = {k: lines for k, lines in charged.items() if len({o for o, _, _ in lines}) != len(lines)}
    assert not twice, f"keys charged twice at the Exchange: {list(twice.items())[:5]}\n{summary}"
    assert books["charges"] == len(statement), summary
    by_scope: dict[str, dict[str, list[Line]]] = defaultdict(lambda: defaultdict(list))
    for e in ledger:
        by_scope[e.scope][to_exchange_key(e.idempotency_key)].append(
            (e.offer_id, Decimal(e.original_amount), e.original_currency))
    want = {k: sorted(v) for k, v in charged.items()}
    org = {k: sorted(v) for k, v in by_scope["org:acme"].items()}
    missing = {k: v for k, v in want.items() if org.get(k) != v}
    extra = {k: v for k, v in org.items() if k not in want}
    assert not missing, (
        f"Exchange charges not in the ledger (or differently): {list(missing.items())[:5]}\n{summary}")
    assert not extra, f"ledger lines the Exchange never charged: {list(extra.items())[:5]}\n{summary}"
    for scope, keys in by_scope.items():
        for k, lines in keys.items():
            assert sorted(lines) == want.get(k), (scope, k, lines, want.get(k), summary)
    balances = books["balances"][REQUESTER]
    for cur in ("USD", "EUR"):
        spent_at_exchange = OPENING_BALANCE - Decimal(balances[cur])
        in_statement = sum((amount for lines in charged.values() for _, amount, c in lines if c == cur),
                           Decimal(0))
        in_ledger = sum((Decimal(e.original_amount) for e in ledger
                         if e.scope == "org:acme" and e.original_currency == cur), Decimal(0))
        assert spent_at_exchange == in_statement == in_ledger, (
            cur, spent_at_exchange, in_statement, in_ledger, summary)

    # 5. What the agents were told they bought is what the ledger holds for their key.
    ledger_by_key: dict[str, list[Line]] = defaultdict(list)
    for e in ledger:
        if e.scope == "org:acme":
            ledger_by_key[e.idempotency_key].append(
                (e.offer_id, Decimal(e.original_amount), e.original_currency))
    told = [(a, purchased(a.body)) for a in attempts if a.status == 200]
    wrong = [(a.purchase.key, lines, ledger_by_key.get(a.purchase.store_key)) for a, lines in told
             if lines and sorted(lines) != sorted(ledger_by_key.get(a.purchase.store_key, []))
             and not any(i.get("status") == "ITEM_STATUS_UNKNOWN" for i in a.body.get("items", []))]
    assert not wrong, f"200 answers that differ from the ledger: {wrong[:5]}\n{summary}"

    # 6. Every answer is one a broker may give: bought (or replayed), period-denied, in flight;
    #    0 is a request to a broker that was killed or not yet back.
    odd = [a for a in attempts
           if not (a.status in (0, 200) or (a.status == 429 and period_exhausted(a.body))
                   or (a.status == 409 and a.body.get("code") == "aborted")
                   # while the redis-server is down: closed scopes past their leases
                   or (a.status == 503 and bool(load.redis_restarts)
                       and a.body.get("code") == "unavailable"))]
    assert not odd, f"{len(odd)} unexpected answers, e.g. " + "; ".join(
        f"{a.purchase.key} on broker-{a.broker}: {a.status} {a.body}" for a in odd[:5]) + f"\n{summary}"

    # 7. No broker hit an error it did not expect (a roll-forward that failed, a purchase that
    #    crashed after the Exchange charged).
    for name, text in logs.items():
        at = text.find("Traceback")
        assert at < 0, (f"{name} logged {text.count('Traceback')} traceback(s), the first:\n"
                        f"{text[max(0, at - 600):at + 3000]}\n{summary}")
