"""Many brokers, one budget: `strict` against `lease` mode, spent to exhaustion and in steady state.

    python -m bench.scaleout [--quick] [--json] [--brokers 1 2 4] [--modes strict lease] ...

Everything runs on 127.0.0.1, each server its own OS process on free ports: a private
redis-server (temporary directory, no persistence), one reference Exchange (one flat-priced
item, 0.01 USD, a bottomless account) and, per run, 1, 2 or 4 brokers (`ramp-broker serve`, each
with free ports for the RPCs and for /metrics, and its journals and store memory in the run's
directory) on that Redis.

Scale-out runs to exhaustion, one per (brokers, mode) (unless --skip-exhaustion). Every purchase
is charged to 3 period scopes of one account (fresh per run; --scopes 1: the budget's scope
alone): `team:scaleout` is the budget (--budget-purchases x 0.01 USD a month), `user:scaleout`
has 2x and `org:scaleout` 4x that limit, all three in the run's `mode` (`strict`: every purchase
reserves and commits in the store; `lease`: spent from the brokers' pre-debited leases,
budget/leases.py; --tier, --refresh-seconds and --rate-half-life-seconds set the lease
settings). A closed loop of --agents concurrent agents
(agent i buys through broker i mod brokers: Connect protobuf, bearer key, one item per request)
spends the budget: an agent answered 429 (RESOURCE_EXHAUSTED) waits --retry-wait seconds (the
lease refresh interval) and tries again, and gives up when --retries retries in a row are denied
too; the run is over when every agent has given up (`"exhausted": true`), or at --seconds, or at
a request cap. Each call times out after 10 s. Before the run, each broker makes a few purchases
for a second agent key that is charged to no period scope (warm-up, spends no budget).

These budgets are sized to be spent within the run: they hold a few seconds of spend at the rates
measured here. Lease mode's phases go by seconds of spend left (remaining / the smoothed spend
rate; budget/leases.py): generous > 1 h, tightening > 5 min, strict > 30 s, and below 30 s
`synchronous`, by design: no leases, every purchase reserves in the store as in strict mode. So
in these runs lease mode is synchronous nearly throughout, and its store calls per purchase "to
exhaustion" are strict mode's; they show overspend and stranding at the end of a budget.

Steady-state runs, one per (brokers, mode) (unless --skip-steady): the same brokers and scopes on
a fresh account whose budget lasts hours at the measured rate (--steady-budget-purchases,
10,000,000 purchases, 100,000 USD; the lease phase `generous`), never near exhaustion. The same
closed loop of --agents agents runs for --steady-warm-seconds (2; not measured: the first lease
refresh sizes its lease from demand and the spend rate gathers) and then --steady-seconds (10;
--quick 3), the measured window, bounded by STEADY_MAX_RATE requests a second in all. Store calls
per purchase are counted as in the runs to exhaustion, over the measured window (metrics scraped
when the warm-up ends and after the last agent stopped); after the brokers stopped, every scope's
spend must equal the purchases x price and the Exchange's charges x price, with spent + reserved
at or under its limit (and at every sample of the budget counter). This is where the lease
layer's store-call reduction is read (strict / lease, target >= 10).

Definitions (bench/README.md lists every field of the JSON rows):

  store_calls_per_purchase
      calls the brokers made to the budget store, from every broker's own /metrics
      (`broker_store_operation_duration_seconds_count`, summed over operations and brokers,
      scraped just before the agents start and after the last one gave up), divided by the
      successful purchases. Every operation counts except the background ones in BACKGROUND_OPS
      (the sweeper's `sweep`, the upkeep's and readiness probe's `identity` and `limits`, alert
      `claim`s, ...): `reserve`, `commit`, `read`, `settled`, `release`, `record_spend`, `leases`
      and `lease` (every lease refresh, periodic ones included). Denied attempts' calls count too.
  store_calls_per_purchase_above_25pct
      the same from the start until the successful purchases reached 75% of the budget (metrics
      scraped at that moment), over the purchases until then: while more than 25% remained.
  overspend
      max(0, spent - limit) of the budget counter, read from the store after the brokers were
      stopped (a clean stop reports every lease's spend and gives the leases back), as a decimal
      string: "0" when none.
  stranded_ratio
      (limit - spent) / limit of the budget counter, read from the store after every agent gave
      up and the brokers stopped: the share of the budget that no agent could buy although each
      retried --retries times, --retry-wait apart (no purchase succeeds after the last one gave
      up, so this is also what was left then). 0 is ideal; one purchase is 1 / --budget-purchases.
  remaining_at_first_denial_ratio
      1 - (successful purchases when the first 429 reached any agent x price) / limit.
  p99_ms
      latency of successful purchases (denials excluded), all agents of the run (steady state: those
      started in the measured window). Closed-loop: mostly queueing behind the --agents in flight;
      what the period layer itself adds is the latency section's figure.

The period layer's latency (unless --skip-latency): three single brokers on the same Exchange
and Redis, `none` (the agent is charged to no period scope), `lease` and `strict` (the 3 scopes
in that mode, limits far above anything spent). A closed loop of --latency-concurrency workers
for --latency-seconds measures each one's ceiling; then each gets the same open-loop loads
(purchases started on schedule whatever is outstanding), --load-fractions x the `none` broker's
ceiling, and the p99 each period layer adds over `none` is reported.

`--quick`: a smaller budget and shorter phases, the whole bench in about 2 minutes (2 cores).
With --json, stdout is one JSON object per line, each with a `row` field: `scaleout` (one per
(brokers, mode), to exhaustion), `steady` (one per (brokers, mode)), `latency` (one per measured
phase), then one `summary` (the ratios). Without it, tables. Nothing here asserts on timings: it
measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport
from redis.asyncio import Redis

from bench.common import (
    HUGE,
    ITEM_PRICE,
    MACHINE,
    PHASE_GRACE_S,
    REQUEST_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchFailed,
    Call,
    Child,
    CommandStats,
    PhaseResult,
    RedisProc,
    bench_broker,
    bench_catalog,
    check_purchase,
    command_stats,
    cpu_seconds,
    exchange_charges,
    free_port,
    listen_port,
    percent,
    quantile_ms,
    redis_server,
    reset_stats,
    run_open_loop,
    run_phase,
    start_child,
    text_table,
    transact_request,
    wait_healthy,
)
from budget.periods import Period, time_zone
from budget.stores.contract import CounterRef, CounterState, StoreUnavailable
from budget.stores.redis import RedisStore
from ramp.broker.v1.broker_connect import BrokerServiceClient

NANO = 10**9  # money units per currency unit
PRICE = int(Decimal(ITEM_PRICE) * NANO)
STORE_PREFIX = "ramp"  # the broker's default period_budgets.store.key_prefix
AGENT_KEY = "scaleout-agent-key"
WARM_KEY = "scaleout-warm-key"  # charged to no period scope: warms the brokers, spends no budget
BUDGET_SCOPE = "team:scaleout"
# Every purchase is charged to all three; the budget scope's limit is the one spent to exhaustion.
SCOPES = {"user:scaleout": 2, BUDGET_SCOPE: 1, "org:scaleout": 4}  # scope: limit in budgets
PERIOD = "month"


def scopes_of(o: Options) -> dict[str, int]:
    """The scopes each purchase is charged to, with their limits in budgets."""
    return dict(SCOPES) if o.scopes == 3 else {BUDGET_SCOPE: 1}

# Store operations of background work, not of purchases (budget.period.PeriodLayer.upkeep, the
# readiness probe, alerts, ECB rates). Every other operation counts as a purchase's.
BACKGROUND_OPS = frozenset({"sweep", "identity", "set_identity", "limits", "claim", "holds",
                            "get_blob", "put_blob", "set_limit", "add_credit"})
REDIS_CALLS = ("evalsha", "evalsha_ro", "eval", "exec")  # round trips that do work in Redis
STORE_METRIC = "broker_store_operation_duration_seconds_count"
REFRESH_METRIC = "broker_lease_refreshes_total"
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SAMPLE_S = 0.05  # the budget counter's leases are sampled this often
MAX_ERRORS_IN_A_ROW = 50  # an agent failing this often in a row (not 429) gives up
# Steady state: a budget of this many purchases lasts hours at the rates measured here (> 1 h of
# spend left: the lease phase `generous`), and a run sends at most STEADY_MAX_RATE requests a second.
STEADY_BUDGET_PURCHASES = 10_000_000
STEADY_MAX_RATE = 5000


@dataclass(frozen=True)
class Options:
    brokers: tuple[int, ...]
    modes: tuple[str, ...]
    agents: int
    budget_purchases: int
    seconds: float
    retries: int
    retry_wait: float
    refresh_seconds: float
    rate_half_life_seconds: float | None
    tier: str
    scopes: int  # 3: user, team (the budget), org; 1: the budget's scope alone
    warm_purchases: int
    latency: bool
    latency_concurrency: int
    latency_seconds: float
    load_fractions: tuple[float, ...]
    exhaustion: bool
    steady: bool
    steady_seconds: float
    steady_warm_seconds: float
    steady_budget_purchases: int
    as_json: bool
    workdir: Path | None  # kept afterwards (configs, logs, journals); None: a temporary directory


# --- the brokers ----------------------------------------------------------------------------------


def _key_sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _money(units: int) -> str:
    """Nano-units as a plain decimal string ("0", "6.5", "-0.01")."""
    text = format((Decimal(units) / NANO).normalize(), "f")
    return "0" if Decimal(text) == 0 else text


def broker_config(
    directory: Path, exchange_port: int, redis_url: str, account: str, mode: str | None, budget: int,
    o: Options,
) -> dict[str, Any]:
    """One broker: free ports for everything it listens on, its files in `directory`. mode None: the
    agent is charged to no period scope (no period layer)."""
    directory.mkdir(parents=True, exist_ok=True)
    agents: list[dict[str, Any]] = [
        {"id": "warm-agent", "key_sha256": _key_sha(WARM_KEY), "account": account},
        {"id": "scaleout-agent", "key_sha256": _key_sha(AGENT_KEY), "account": account,
         **({"charged_to": list(scopes_of(o))} if mode else {})},
    ]
    config: dict[str, Any] = {**bench_broker(exchange_port), "agents": agents}
    if mode:
        leases: dict[str, Any] = {"refresh_seconds": o.refresh_seconds,
                                  "journal_path": str(directory / "leases.jsonl")}
        if o.rate_half_life_seconds is not None:
            leases["rate_half_life_seconds"] = o.rate_half_life_seconds
        config["period_budgets"] = {
            "store": {"kind": "redis", "url": redis_url},
            "journal_path": str(directory / "journal.jsonl"),
            "memory_path": str(directory / "memory.json"),
            "leases": leases,
            "accounts": {account: {"scopes": {
                scope: {"limits": [{"period": PERIOD, "amount": _money(budget * times * PRICE),
                                    "currency": "USD"}],
                        "mode": mode, **({"tier": o.tier} if mode == "lease" else {})}
                for scope, times in scopes_of(o).items()}}},
        }
    return config


@dataclass
class Broker:
    child: Child
    metrics_url: str


@contextlib.contextmanager
def running_brokers(workdir: Path, name: str, configs: Sequence[dict[str, Any]]) -> Iterator[list[Broker]]:
    """Start every broker at once, wait until each is healthy; SIGTERM them all on the way out (a
    clean stop: leases reported and given back), waiting for each to exit."""
    children: list[Child] = []
    try:
        out = []
        for i, config in enumerate(configs):
            path = workdir / f"{name}-{i}.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            child = start_child(f"{name}-{i}", ["serve", "--config", str(path)], workdir, listen_port(config))
            children.append(child)
            out.append(Broker(child, f"http://{config['metrics']['listen']}/metrics"))
        for child in children:
            wait_healthy(child)
        yield out
    finally:
        stop_all(children)


def stop_all(children: Sequence[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    for child in children:
        try:
            child.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_exchange(workdir: Path) -> Iterator[Child]:
    port = free_port()
    (workdir / "catalog.yaml").write_text(yaml.safe_dump(bench_catalog(port)), encoding="utf-8")
    exchange = start_child("exchange", ["exchange", "--catalog", str(workdir / "catalog.yaml")], workdir,
                           port)
    try:
        wait_healthy(exchange)
        yield exchange
    finally:
        stop_all([exchange])


# --- what the brokers and Redis say ---------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format: (sample name, sorted labels) -> value."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        with contextlib.suppress(ValueError):
            out[(m.group(1), labels)] = float(m.group(3))
    return out


@dataclass
class Snapshot:
    """Every broker's store calls by operation (summed), lease refreshes, and Redis's counts."""

    ops: Counter[str] = field(default_factory=Counter)
    refreshes: Counter[str] = field(default_factory=Counter)
    redis: CommandStats = field(default_factory=CommandStats)
    purchases: int = 0  # successful purchases when it was taken
    # CPU seconds so far: "broker <pid>" each, "exchange", "redis", "bench" (this process), "machine".
    cpu: dict[str, float | None] = field(default_factory=dict)
    at: float = 0.0  # perf_counter

    def minus(self, start: Snapshot) -> Snapshot:
        redis = CommandStats({k: v - start.redis.calls.get(k, 0) for k, v in self.redis.calls.items()})
        return Snapshot(self.ops - start.ops, self.refreshes - start.refreshes, redis,
                        self.purchases - start.purchases)

    def counted(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in BACKGROUND_OPS)

    def background(self) -> int:
        return sum(n for op, n in self.ops.items() if op in BACKGROUND_OPS)

    def redis_calls(self) -> int:
        return sum(self.redis.calls.get(c, 0) for c in REDIS_CALLS)


async def snapshot(
    http: httpx.AsyncClient, brokers: Sequence[Broker], admin: Redis, purchases: int,
    others: dict[str, int | None],
) -> Snapshot:
    async def scrape(b: Broker) -> str:
        r = await http.get(b.metrics_url)
        r.raise_for_status()
        return r.text

    texts, stats = await asyncio.gather(asyncio.gather(*(scrape(b) for b in brokers)), command_stats(admin))
    snap = Snapshot(redis=stats, purchases=purchases)
    for text in texts:
        for (name, labels), value in parse_metrics(text).items():
            label = dict(labels)
            if name == STORE_METRIC:
                snap.ops[label.get("operation", "?")] += int(value)
            elif name == REFRESH_METRIC:
                snap.refreshes[label.get("outcome", "?")] += int(value)
    pids = {**{f"broker {b.child.proc.pid}": b.child.proc.pid for b in brokers}, **others}
    snap.cpu = {who: cpu_seconds(pid) for who, pid in pids.items()}
    snap.at = time.perf_counter()
    return snap


def cpu_used(first: Snapshot, last: Snapshot) -> tuple[float | None, float | None]:
    """(CPU seconds of the brokers, % of one core used by everything else on the machine) between
    the two snapshots: other programs running skew every timing here."""
    used: dict[str, float] = {}
    for who, after in last.cpu.items():
        before = first.cpu.get(who)
        if after is None or before is None:
            return None, None
        used[who] = after - before
    brokers = sum(v for who, v in used.items() if who.startswith("broker "))
    wall = last.at - first.at
    if "machine" not in used or wall <= 0:
        return brokers, None
    ours = sum(v for who, v in used.items() if who != "machine")
    return brokers, max(0.0, 100 * (used["machine"] - ours) / wall)


def counter_refs(now: datetime, scopes: Sequence[str]) -> dict[str, CounterRef]:
    """Each scope's counter for the current window (the brokers' time zone is the default, UTC)."""
    window = Period.parse(PERIOD, "period").window(now, time_zone("UTC", "time_zone"))
    return {scope: CounterRef(scope, PERIOD, window.id, "USD", window.start_ms, window.end_ms)
            for scope in scopes}


async def read_counters(redis_url: str, account: str, refs: dict[str, CounterRef]) -> dict[str, CounterState]:
    store = await RedisStore.open(redis_url, timeout_ms=2000, prefix=STORE_PREFIX)
    try:
        states = await store.read(account, list(refs.values()))
    finally:
        await store.close()
    return dict(zip(refs, states, strict=True))


# --- one scale-out run ----------------------------------------------------------------------------


@dataclass
class Spend:
    """What the agents saw."""

    start: float = 0.0
    purchases: int = 0
    latencies: list[float] = field(default_factory=list)
    last_success: float = 0.0
    denials: int = 0
    first_denial_purchases: int | None = None
    errors: Counter[str] = field(default_factory=Counter)
    gave_up: int = 0  # agents that saw --retries + 1 denials in a row
    failed_out: int = 0  # agents that stopped on errors
    timed_out: int = 0  # agents stopped by --seconds or the request cap
    warm_errors: Counter[str] = field(default_factory=Counter)
    # Lease mode: the budget scope's phase in each successful purchase's answer (as its broker saw it;
    # "store": the answer has none, the purchase was reserved and committed in the store).
    phases: Counter[str] = field(default_factory=Counter)
    phases_above: Counter[str] = field(default_factory=Counter)
    above: Snapshot | None = None  # taken when purchases reached 75% of the budget
    first: Snapshot | None = None
    last: Snapshot | None = None
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """The budget counter in the store, as the sampler saw it (every SAMPLE_S)."""

    purchases: int  # successful purchases the agents had seen by then
    spent: int  # nano-units
    reserved: int  # reservations and leases
    leased: int  # all brokers' leases
    holders: int
    reclaim: bool  # the store was asking lease holders to give back


async def sample_counter(
    admin: Redis, counter_key: str, holders_key: str, s: Spend, stop: asyncio.Event,
) -> None:
    """Watch the budget counter: how much is leased, to how many brokers, and whether the store asks
    holders to give back (plain HMGET / HLEN: not among REDIS_CALLS)."""
    while not stop.is_set():
        spent, reserved, leased, reclaim_until = await admin.hmget(
            counter_key, ["spent", "reserved", "leased", "reclaim_until"])
        holders = await admin.hlen(holders_key)
        now_ms = time.time_ns() // 1_000_000
        s.samples.append(Sample(s.purchases, int(spent or 0), int(reserved or 0), int(leased or 0),
                                int(holders), int(reclaim_until or 0) > now_ms))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


def _clients(brokers: Sequence[Broker]) -> list[tuple[HTTPTransport, BrokerServiceClient]]:
    out = []
    for b in brokers:
        transport = HTTPTransport(timeout=REQUEST_TIMEOUT_S)
        out.append((transport, BrokerServiceClient(
            b.child.url, http_client=Client(transport), send_compression=None, accept_compression=(),
            timeout_ms=int(REQUEST_TIMEOUT_S * 1000))))
    return out


async def warm_up(clients: Sequence[BrokerServiceClient], run_id: str, count: int) -> Counter[str]:
    """`count` unscoped purchases per broker, 4 at a time: connections, sessions, code paths."""
    errors: Counter[str] = Counter()
    headers = {"authorization": f"Bearer {WARM_KEY}"}

    async def one(i: int, client: BrokerServiceClient, seq: int) -> None:
        try:
            request = transact_request(run_id, f"warm{i}", seq % 4, seq)
            check_purchase(await client.transact(request, headers=headers))
        except Exception as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

    for i, client in enumerate(clients):
        for batch in range(0, count, 4):
            await asyncio.gather(*(one(i, client, seq) for seq in range(batch, min(count, batch + 4))))
    return errors


async def spend(
    brokers: Sequence[Broker], admin: Redis, o: Options, budget: int, label: str,
    others: dict[str, int | None], keys: tuple[str, str], mode: str,
) -> Spend:
    run_id = uuid.uuid4().hex[:10]
    s = Spend()
    transports = _clients(brokers)
    clients = [c for _, c in transports]
    headers = {"authorization": f"Bearer {AGENT_KEY}"}
    crossing = math.ceil(0.75 * budget)  # purchases at which 25% of the budget remains
    max_requests = 4 * budget + 20 * o.agents * (o.retries + 1)
    issued = 0
    tasks: list[asyncio.Task[None]] = []
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            s.warm_errors = await warm_up(clients, run_id, o.warm_purchases)
            await reset_stats(admin)
            s.first = await snapshot(http, brokers, admin, 0, others)
            s.start = time.perf_counter()
            deadline = s.start + o.seconds

            async def take_above() -> None:
                s.above = await snapshot(http, brokers, admin, s.purchases, others)

            async def agent(w: int) -> None:
                nonlocal issued
                client = clients[w % len(clients)]
                denied = failed = 0
                while True:
                    if time.perf_counter() >= deadline or issued >= max_requests:
                        s.timed_out += 1
                        return
                    issued += 1
                    seq = issued
                    t0 = time.perf_counter()
                    try:
                        request = transact_request(run_id, label, w, seq)
                        answer = await client.transact(request, headers=headers)
                        check_purchase(answer)
                    except ConnectError as exc:
                        if exc.code == Code.RESOURCE_EXHAUSTED:
                            s.denials += 1
                            if s.first_denial_purchases is None:
                                s.first_denial_purchases = s.purchases
                            denied += 1
                            if denied > o.retries:
                                s.gave_up += 1
                                return
                            await asyncio.sleep(o.retry_wait)
                            continue
                        s.errors[f"{exc.code.name}: {str(exc)[:120]}"] += 1
                    except Exception as exc:
                        s.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                    else:
                        now = time.perf_counter()
                        s.latencies.append(now - t0)
                        s.last_success = now
                        s.purchases += 1
                        denied = failed = 0
                        phase = next((b.phase for b in answer.budgets if b.scope == BUDGET_SCOPE), "")
                        if mode == "lease":
                            phase = phase or "store"  # reserved and committed in the store
                        if phase:
                            s.phases[phase] += 1
                            if s.purchases <= crossing:
                                s.phases_above[phase] += 1
                        if s.purchases == crossing:
                            tasks.append(asyncio.create_task(take_above()))
                        continue
                    failed += 1
                    if failed >= MAX_ERRORS_IN_A_ROW:
                        s.failed_out += 1
                        return
                    await asyncio.sleep(0.1)

            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_counter(admin, *keys, s, stop))
            try:
                async with asyncio.timeout(o.seconds + PHASE_GRACE_S):
                    await asyncio.gather(*(agent(w) for w in range(o.agents)))
                    await asyncio.gather(*tasks)
            finally:
                stop.set()
                await sampler
            s.last = await snapshot(http, brokers, admin, s.purchases, others)
    finally:
        for transport, client in transports:
            await client.close()
            await transport.aclose()
    return s


def _per(count: int, purchases: int) -> float | None:
    return round(count / purchases, 4) if purchases else None


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def scaleout_row(
    n: int, mode: str, budget: int, s: Spend, states: dict[str, CounterState], charges: int | None,
    o: Options,
) -> dict[str, Any]:
    assert s.first is not None
    assert s.last is not None
    whole = s.last.minus(s.first)
    above = s.above.minus(s.first) if s.above is not None else None
    limit = budget * PRICE
    team = states[BUDGET_SCOPE]
    over_any = max(max(0, st.spent - budget * times * PRICE) for st, times in
                   zip(states.values(), scopes_of(o).values(), strict=True))
    elapsed = s.last_success - s.start if s.purchases else 0.0
    cpu_s, other = cpu_used(s.first, s.last)
    crossing = math.ceil(0.75 * budget)
    early = [x for x in s.samples if x.purchases < crossing]
    held = [x for x in early if x.holders]
    return {
        "row": "scaleout",
        "brokers": n,
        "mode": mode,
        "tier": o.tier if mode == "lease" else None,
        "agents": o.agents,
        "scopes_per_purchase": o.scopes,
        "limit": _money(limit),
        "price": ITEM_PRICE,
        "purchases": s.purchases,
        "purchases_per_s": round(s.purchases / elapsed, 1) if elapsed > 0 else None,
        "elapsed_s": round(elapsed, 2),
        "exhausted": s.gave_up == o.agents,
        "store_calls_per_purchase": _per(whole.counted(), s.purchases),
        "store_calls_per_purchase_above_25pct": _per(above.counted(), above.purchases) if above else None,
        "background_store_calls_per_purchase": _per(whole.background(), s.purchases),
        "store_calls": dict(sorted(whole.ops.items())),
        "store_calls_above_25pct": dict(sorted(above.ops.items())) if above else None,
        "purchases_above_25pct": above.purchases if above else None,
        "lease_refreshes": dict(sorted(whole.refreshes.items())),
        # spent + reserved (leases included) over the limit, at the worst sample: must never be above 0.
        "max_store_excess_sampled": _money(max((x.spent + x.reserved - limit for x in s.samples), default=0)),
        "reclaim_share_above_25pct": round(sum(x.reclaim for x in early) / len(early), 3) if early else None,
        "mean_lease_purchases_above_25pct": round(
            statistics.fmean(x.leased / x.holders / PRICE for x in held), 1) if held else None,
        "mean_holders_above_25pct": round(statistics.fmean(x.holders for x in early), 2) if early else None,
        "phases": dict(s.phases),
        "phases_above_25pct": dict(s.phases_above),
        "redis_calls_per_purchase": _per(whole.redis_calls(), s.purchases),
        "redis_calls_per_purchase_above_25pct": _per(above.redis_calls(), above.purchases) if above else None,
        "overspend": _money(max(0, team.spent - limit)),
        "overspend_any_scope": _money(over_any),
        "spent": _money(team.spent),
        "reserved_after_stop": _money(team.reserved),
        "leased_after_stop": _money(team.leased),
        "stranded_ratio": round(max(0, limit - team.spent) / limit, 6),
        "remaining_at_first_denial_ratio": None if s.first_denial_purchases is None else round(
            max(0, limit - s.first_denial_purchases * PRICE) / limit, 6),
        "p50_ms": _rounded(quantile_ms(s.latencies, 50)),
        "p99_ms": _rounded(quantile_ms(s.latencies, 99)),
        "max_ms": _rounded(max(s.latencies) * 1000 if s.latencies else None),
        "broker_cpu_ms_per_purchase": _rounded(1000 * cpu_s / s.purchases if cpu_s is not None and s.purchases
                                               else None),
        "other_cpu_pct": _rounded(other, 0),
        "denials": s.denials,
        "errors": sum(s.errors.values()),
        "agents_gave_up": s.gave_up,
        "agents_stopped_on_errors": s.failed_out,
        "agents_stopped_by_bounds": s.timed_out,
        "spent_matches_purchases": team.spent == s.purchases * PRICE,
        "exchange_charges": charges,
        "top_errors": dict(s.errors.most_common(3)),
        "warm_up_errors": sum(s.warm_errors.values()),
    }


def scaleout_run(
    workdir: Path, exchange: Child, redis: RedisProc, n: int, mode: str, o: Options,
) -> dict[str, Any]:
    budget = o.budget_purchases
    log(f"{n} broker(s), {mode}: starting ...")
    said = f"{n} broker(s), {mode}: {o.agents} agents spending {_money(budget * PRICE)} USD ..."
    s, states, charges = _run_brokers(
        workdir, exchange, redis, n, mode, o, f"scaleout-{n}-{mode}", f"run-{n}-{mode}", budget, said,
        lambda brokers, admin, others, keys: spend(brokers, admin, o, budget, f"{n}{mode}", others, keys,
                                                   mode))
    row = scaleout_row(n, mode, budget, s, states, charges, o)
    log(f"{n} broker(s), {mode}: {row['purchases']} purchases, {row['store_calls_per_purchase']} store "
        f"calls/purchase, overspend {row['overspend']}, stranded {row['stranded_ratio']}")
    return row


S = TypeVar("S", bound=Spend)


def _run_brokers(
    workdir: Path, exchange: Child, redis: RedisProc, n: int, mode: str, o: Options, account_stem: str,
    run_name: str, budget: int, said: str,
    load: Callable[[list[Broker], Redis, dict[str, int | None], tuple[str, str]], Awaitable[S]],
) -> tuple[S, dict[str, Any], int | None]:
    """Start n brokers on one fresh account, run `load` against them, stop them (every lease
    reported and given back), and return what the agents saw, the counters after, and the charges
    the Exchange recorded for the run (warm-up purchases taken out)."""
    account = f"{account_stem}-{uuid.uuid4().hex[:6]}"
    refs = counter_refs(datetime.now(UTC), list(scopes_of(o)))
    run_dir = workdir / run_name
    run_dir.mkdir()
    configs = [broker_config(run_dir / f"broker-{i}", int(exchange.url.rsplit(":", 1)[1]), redis.url, account,
                             mode, budget, o) for i in range(n)]

    async def go(brokers: list[Broker]) -> S:
        admin = Redis.from_url(redis.url)
        try:
            others: dict[str, int | None] = {"exchange": exchange.proc.pid, "redis": redis.proc.pid,
                                             "bench": None, "machine": MACHINE}
            prefix = f"{STORE_PREFIX}:{{{account}}}:"  # budget.stores.redis.RedisStore.account_prefix
            ref = refs[BUDGET_SCOPE]
            return await load(brokers, admin, others, (f"{prefix}c:{ref.key}", f"{prefix}lh:{ref.key}"))
        finally:
            await admin.aclose()

    with running_brokers(run_dir, account_stem, configs) as brokers:
        charges_before = exchange_charges(exchange.url)
        log(said)
        s = asyncio.run(go(brokers))
        charges_after = exchange_charges(exchange.url)
    states = asyncio.run(read_counters(redis.url, account, refs))
    charges = None if charges_before is None or charges_after is None else (
        charges_after - charges_before - n * o.warm_purchases + sum(s.warm_errors.values()))
    return s, states, charges


# --- one steady-state run -------------------------------------------------------------------------


@dataclass
class Steady(Spend):
    """What the agents saw in a steady-state run: `first` is taken when the warm-up ends, `last`
    after the last agent stopped; latencies and `phases` are of purchases started after `first`."""

    measured_from: float = 0.0  # perf_counter when the measured window began (the warm-up ended)
    phases_warm_up: Counter[str] = field(default_factory=Counter)
    capped: bool = False  # the request cap stopped an agent before the time limit


def steady_cap(o: Options) -> int:
    """Requests (warm-up included) a steady-state run may send in all: STEADY_MAX_RATE a second."""
    return math.ceil(STEADY_MAX_RATE * (o.steady_warm_seconds + o.steady_seconds))


async def steady_spend(
    brokers: Sequence[Broker], admin: Redis, o: Options, label: str, others: dict[str, int | None],
    keys: tuple[str, str], mode: str,
) -> Steady:
    """A closed loop of --agents agents for --steady-warm-seconds (not measured) then
    --steady-seconds (measured), bounded by steady_cap(o) requests: a budget that lasts hours."""
    run_id = uuid.uuid4().hex[:10]
    s = Steady()
    transports = _clients(brokers)
    clients = [c for _, c in transports]
    headers = {"authorization": f"Bearer {AGENT_KEY}"}
    max_requests = steady_cap(o)
    issued = 0
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            s.warm_errors = await warm_up(clients, run_id, o.warm_purchases)
            await reset_stats(admin)
            s.start = time.perf_counter()
            s.measured_from = s.start + o.steady_warm_seconds  # mark() sets the exact moment
            deadline = s.measured_from + o.steady_seconds

            async def mark() -> None:
                """The warm-up is over: the measured window starts here."""
                await asyncio.sleep(max(0.0, s.measured_from - time.perf_counter()))
                s.measured_from = time.perf_counter()
                s.first = await snapshot(http, brokers, admin, s.purchases, others)

            async def agent(w: int) -> None:
                nonlocal issued
                client = clients[w % len(clients)]
                denied = failed = 0
                while True:
                    if time.perf_counter() >= deadline:
                        s.timed_out += 1
                        return
                    if issued >= max_requests:
                        s.capped = True
                        s.timed_out += 1
                        return
                    issued += 1
                    seq = issued
                    t0 = time.perf_counter()
                    try:
                        request = transact_request(run_id, label, w, seq)
                        answer = await client.transact(request, headers=headers)
                        check_purchase(answer)
                    except ConnectError as exc:
                        if exc.code == Code.RESOURCE_EXHAUSTED:  # never expected: the budget lasts hours
                            s.denials += 1
                            denied += 1
                            if denied > o.retries:
                                s.gave_up += 1
                                return
                            await asyncio.sleep(o.retry_wait)
                            continue
                        s.errors[f"{exc.code.name}: {str(exc)[:120]}"] += 1
                    except Exception as exc:
                        s.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                    else:
                        now = time.perf_counter()
                        s.purchases += 1
                        s.last_success = now
                        denied = failed = 0
                        phase = next((b.phase for b in answer.budgets if b.scope == BUDGET_SCOPE), "")
                        if mode == "lease":
                            phase = phase or "store"  # reserved and committed in the store
                        measured = t0 >= s.measured_from  # started after the warm-up
                        if measured:
                            s.latencies.append(now - t0)
                        if phase:
                            (s.phases if measured else s.phases_warm_up)[phase] += 1
                        continue
                    failed += 1
                    if failed >= MAX_ERRORS_IN_A_ROW:
                        s.failed_out += 1
                        return
                    await asyncio.sleep(0.1)

            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_counter(admin, *keys, s, stop))
            marker = asyncio.create_task(mark())
            try:
                async with asyncio.timeout(o.steady_warm_seconds + o.steady_seconds + PHASE_GRACE_S):
                    await asyncio.gather(*(agent(w) for w in range(o.agents)))
                    await marker
            finally:
                marker.cancel()
                stop.set()
                await sampler
            s.last = await snapshot(http, brokers, admin, s.purchases, others)
    finally:
        for transport, client in transports:
            await client.close()
            await transport.aclose()
    return s


def steady_row(
    n: int, mode: str, budget: int, s: Steady, states: dict[str, CounterState], charges: int | None,
    o: Options,
) -> dict[str, Any]:
    assert s.first is not None
    assert s.last is not None
    window = s.last.minus(s.first)
    limit = budget * PRICE
    team = states[BUDGET_SCOPE]
    limits = {scope: budget * times * PRICE for scope, times in scopes_of(o).items()}
    over_any = max(max(0, st.spent - limits[scope]) for scope, st in states.items())
    elapsed = s.last_success - s.measured_from if window.purchases else 0.0
    rate = window.purchases / elapsed if elapsed > 0 else None
    cpu_s, other = cpu_used(s.first, s.last)
    # Every scope's counter holds exactly the agents' purchases (warm-up window included; the
    # unscoped warm-up purchases are charged to none), and so does the Exchange.
    every_scope_spent_purchases = all(st.spent == s.purchases * PRICE for st in states.values())
    within_limits = all(st.spent + st.reserved <= limits[scope] for scope, st in states.items())
    excess = max((x.spent + x.reserved - limit for x in s.samples), default=0)
    left = max(0, limit - team.spent) // PRICE  # purchases' worth (an integer: no money as float)
    return {
        "row": "steady",
        "brokers": n,
        "mode": mode,
        "tier": o.tier if mode == "lease" else None,
        "agents": o.agents,
        "scopes_per_purchase": o.scopes,
        "limit": _money(limit),
        "price": ITEM_PRICE,
        "warm_up_s": o.steady_warm_seconds,
        "measured_s": round(s.last.at - s.first.at, 2),
        "warm_up_purchases": s.first.purchases,
        "purchases": window.purchases,
        "purchases_per_s": _rounded(rate, 1),
        "store_calls_per_purchase": _per(window.counted(), window.purchases),
        "background_store_calls_per_purchase": _per(window.background(), window.purchases),
        "store_calls": dict(sorted(window.ops.items())),
        "lease_refreshes": dict(sorted(window.refreshes.items())),
        "redis_calls_per_purchase": _per(window.redis_calls(), window.purchases),
        "phases": dict(s.phases),
        "phases_warm_up": dict(s.phases_warm_up),
        "hours_of_spend_left_at_end": None if not rate else round(left / rate / 3600, 1),
        "mean_lease_purchases": round(statistics.fmean(
            x.leased / x.holders / PRICE for x in s.samples if x.holders), 1)
        if any(x.holders for x in s.samples) else None,
        "p50_ms": _rounded(quantile_ms(s.latencies, 50)),
        "p99_ms": _rounded(quantile_ms(s.latencies, 99)),
        "max_ms": _rounded(max(s.latencies) * 1000 if s.latencies else None),
        "overspend": _money(max(0, team.spent - limit)),
        "overspend_any_scope": _money(over_any),
        "spent": _money(team.spent),
        "reserved_after_stop": _money(team.reserved),
        "leased_after_stop": _money(team.leased),
        "max_store_excess_sampled": _money(max(excess, 0)),
        "spent_matches_purchases": every_scope_spent_purchases,
        "exchange_charges": charges,
        "spent_matches_exchange_charges": charges is not None and team.spent == charges * PRICE,
        "within_limits": within_limits and excess <= 0,
        "broker_cpu_ms_per_purchase": _rounded(1000 * cpu_s / window.purchases
                                               if cpu_s is not None and window.purchases else None),
        "other_cpu_pct": _rounded(other, 0),
        "denials": s.denials,
        "errors": sum(s.errors.values()),
        "capped": s.capped,
        "top_errors": dict(s.errors.most_common(3)),
        "warm_up_errors": sum(s.warm_errors.values()),
    }


def steady_run(
    workdir: Path, exchange: Child, redis: RedisProc, n: int, mode: str, o: Options,
) -> dict[str, Any]:
    budget = o.steady_budget_purchases
    log(f"steady, {n} broker(s), {mode}: starting ...")
    said = (f"steady, {n} broker(s), {mode}: {o.agents} agents, {o.steady_warm_seconds:g} s warm-up + "
            f"{o.steady_seconds:g} s measured, budget {_money(budget * PRICE)} USD ...")
    s, states, charges = _run_brokers(
        workdir, exchange, redis, n, mode, o, f"steady-{n}-{mode}", f"steady-{n}-{mode}", budget, said,
        lambda brokers, admin, others, keys: steady_spend(brokers, admin, o, f"s{n}{mode}", others, keys,
                                                          mode))
    row = steady_row(n, mode, budget, s, states, charges, o)
    log(f"steady, {n} broker(s), {mode}: {row['purchases']} purchases measured, "
        f"{row['store_calls_per_purchase']} store calls/purchase, p99 {row['p99_ms']} ms, "
        f"phases {row['phases']}")
    return row


# --- the period layer's latency -------------------------------------------------------------------


def latency_rows(workdir: Path, exchange: Child, redis: RedisProc, o: Options) -> list[dict[str, Any]]:
    lat_dir = workdir / "latency"
    lat_dir.mkdir()
    xport = int(exchange.url.rsplit(":", 1)[1])
    layers = ("none", "lease", "strict")
    huge_budget = int(Decimal(HUGE) * NANO) // PRICE // max(scopes_of(o).values())
    configs = [broker_config(lat_dir / layer, xport, redis.url, f"latency-{layer}-{uuid.uuid4().hex[:6]}",
                             None if layer == "none" else layer, huge_budget, o) for layer in layers]
    log("latency: starting 3 brokers (no period layer, lease, strict) ...")
    with running_brokers(lat_dir, "latency", configs) as brokers:
        others: dict[str, int | None] = {"exchange": exchange.proc.pid, "redis": redis.proc.pid,
                                         "bench": None, "machine": MACHINE}
        return asyncio.run(_latency(dict(zip(layers, brokers, strict=True)), others, o))


async def _latency(
    brokers: dict[str, Broker], others: dict[str, int | None], o: Options,
) -> list[dict[str, Any]]:
    run_id = uuid.uuid4().hex[:10]
    headers = {"authorization": f"Bearer {AGENT_KEY}"}
    transports = dict(zip(brokers, _clients(list(brokers.values())), strict=True))
    rows: list[dict[str, Any]] = []
    rates_none = 0.0  # the closed-loop rate of the broker without period layer

    def maker(layer: str, tag: str) -> Call:
        client = transports[layer][1]

        async def call(w: int, seq: int) -> None:
            request = transact_request(run_id, f"{layer}-{tag}", w, seq)
            check_purchase(await client.transact(request, headers=headers))
        return call

    def row(layer: str, load: str, r: PhaseResult, offered: float | None) -> dict[str, Any]:
        cpu = r.cpu.get("broker")
        ours = [r.cpu.get(who) for who in ("broker", *others) if who != "machine"]
        machine = r.cpu.get("machine")
        other = None if machine is None or any(v is None for v in ours) else max(
            0.0, machine - sum(v for v in ours if v is not None))
        return {"row": "latency", "layer": layer, "load": load, "offered_per_s": _rounded(offered, 1),
                "load_fraction": None if offered is None else round(offered / rates_none, 2),
                "purchases_per_s": round(r.rate, 1), "p50_ms": _rounded(r.percentile_ms(50)),
                "p99_ms": _rounded(r.percentile_ms(99)), "requests": r.requests, "errors": r.error_count,
                "broker_cpu_ms_per_purchase": _rounded(cpu / 100 * r.elapsed * 1000 / r.ok
                                                       if cpu is not None and r.ok else None),
                "other_cpu_pct": _rounded(other, 0), "top_errors": dict(r.errors.most_common(3))}

    try:
        c = o.latency_concurrency
        for layer in brokers:  # warm every broker (its leases too) before anything is measured
            await run_phase(f"{layer} warm-up", maker(layer, "warm"), c, 1.0, 20 * c)
        closed: dict[str, PhaseResult] = {}
        for layer in brokers:
            log(f"latency: closed loop, {layer}, {c} workers, {o.latency_seconds:g} s ...")
            pids: dict[str, int | None] = {"broker": brokers[layer].child.proc.pid, **others}
            closed[layer] = await run_phase(f"closed {layer}", maker(layer, "closed"), c, o.latency_seconds,
                                            10**7, pids)
            rates_none = closed["none"].rate
            rows.append(row(layer, "closed", closed[layer], None))
        if rates_none <= 0:
            raise BenchFailed(f"the broker without period layer bought nothing: {closed['none'].errors}")
        for fraction in o.load_fractions:
            rate = fraction * rates_none
            for layer in brokers:
                log(f"latency: open loop {rate:.0f}/s, {layer}, {o.latency_seconds:g} s ...")
                pids = {"broker": brokers[layer].child.proc.pid, **others}
                result, _ = await run_open_loop(f"open {layer}", maker(layer, "open"), rate,
                                                o.latency_seconds, pids, c, max_outstanding=4 * c)
                rows.append(row(layer, "open", result, rate))
    finally:
        for transport, client in transports.values():
            await client.close()
            await transport.aclose()
    return rows


# --- report ---------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 1)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scale = {(r["brokers"], r["mode"]): r for r in rows if r["row"] == "scaleout"}
    steady = {(r["brokers"], r["mode"]): r for r in rows if r["row"] == "steady"}
    out: dict[str, Any] = {"row": "summary", "per_brokers": {}}
    for n in sorted({k[0] for k in scale} | {k[0] for k in steady}):
        per: dict[str, Any] = {}
        strict, lease = scale.get((n, "strict")), scale.get((n, "lease"))
        if strict is not None and lease is not None:  # to exhaustion
            per.update({
                "store_call_reduction_above_25pct": _ratio(strict["store_calls_per_purchase_above_25pct"],
                                                           lease["store_calls_per_purchase_above_25pct"]),
                "store_call_reduction": _ratio(strict["store_calls_per_purchase"],
                                               lease["store_calls_per_purchase"]),
                "lease_minus_strict_p99_ms": _minus(lease["p99_ms"], strict["p99_ms"]),
                "lease_over_strict_purchases_per_s": _ratio(lease["purchases_per_s"],
                                                            strict["purchases_per_s"]),
            })
        strict, lease = steady.get((n, "strict")), steady.get((n, "lease"))
        if strict is not None and lease is not None:  # steady state, hours of spend left
            per.update({
                "steady_store_call_reduction": _ratio(strict["store_calls_per_purchase"],
                                                      lease["store_calls_per_purchase"]),
                "steady_lease_minus_strict_p99_ms": _minus(lease["p99_ms"], strict["p99_ms"]),
                "steady_lease_over_strict_purchases_per_s": _ratio(lease["purchases_per_s"],
                                                                   strict["purchases_per_s"]),
                "steady_lease_phases": lease["phases"],
            })
        if per:
            out["per_brokers"][str(n)] = per
    out["period_layer_p99"] = []
    open_rows = [r for r in rows if r["row"] == "latency" and r["load"] == "open"]
    for fraction in sorted({r["load_fraction"] for r in open_rows}):
        opened = {r["layer"]: r for r in open_rows if r["load_fraction"] == fraction}
        base = opened.get("none")
        if base is None:
            continue
        entry: dict[str, Any] = {"load_fraction": fraction, "offered_per_s": base["offered_per_s"]}
        for layer in ("none", "lease", "strict"):
            r = opened.get(layer)
            if r is None:
                continue
            if layer != "none":
                missing = r["p99_ms"] is None or base["p99_ms"] is None
                entry[f"{layer}_adds_p99_ms"] = None if missing else round(r["p99_ms"] - base["p99_ms"], 2)
            # Sustained: every scheduled purchase started and succeeded, at (nearly) the offered rate.
            entry[f"{layer}_sustained"] = (r["errors"] == 0
                                           and r["purchases_per_s"] >= 0.95 * r["offered_per_s"])
        out["period_layer_p99"].append(entry)
    # The highest load the broker without period layer sustained: where the target is read.
    sustained = [e for e in out["period_layer_p99"] if e.get("none_sustained")]
    top = max(sustained, key=lambda e: e["load_fraction"], default=None)
    out["highest_sustained_without_period_layer_per_s"] = top["offered_per_s"] if top else None
    for layer in ("lease", "strict"):
        out[f"{layer}_adds_p99_ms_at_highest_sustained"] = top.get(f"{layer}_adds_p99_ms") if top else None
        out[f"{layer}_sustained_at_highest_sustained"] = top.get(f"{layer}_sustained") if top else None
    out["overspend_all_zero"] = all(r["overspend_any_scope"] == "0"
                                    for r in [*scale.values(), *steady.values()])
    out["steady_accounts_exact"] = all(
        r["spent_matches_purchases"] and r["spent_matches_exchange_charges"] and r["within_limits"]
        for r in steady.values()) if steady else None
    return out


def human(rows: list[dict[str, Any]], o: Options, header: str) -> str:
    scale = [r for r in rows if r["row"] == "scaleout"]
    out = [header, ""]
    if scale:
        out.append(
            f"Scale-out to exhaustion: {o.agents} agents spend one budget of {scale[0]['limit']} USD "
            f"({o.budget_purchases} purchases of {ITEM_PRICE}, {o.scopes} scope(s) charged each; the budget "
            f"is {BUDGET_SCOPE}'s) to exhaustion; {o.retries} retries {o.retry_wait:g} s apart after a 429; "
            f"lease refresh {o.refresh_seconds:g} s, tier {o.tier}")
        out.append("")
        cols = ("brokers", "mode", "purchases", "purch/s", "store calls/p", ">25% left", "bg/p",
                "redis/p", ">25% left", "overspend", "stranded", "left@1st 429", "p50 ms", "p99 ms",
                "CPU ms/p", "other CPU", "errors", "done")
        out += text_table(cols, [
            (str(r["brokers"]), r["mode"], str(r["purchases"]), _f(r["purchases_per_s"], 0),
             _f(r["store_calls_per_purchase"], 3), _f(r["store_calls_per_purchase_above_25pct"], 3),
             _f(r["background_store_calls_per_purchase"], 3), _f(r["redis_calls_per_purchase"], 3),
             _f(r["redis_calls_per_purchase_above_25pct"], 3), r["overspend"], _f(r["stranded_ratio"], 4),
             _f(r["remaining_at_first_denial_ratio"], 4), _f(r["p50_ms"]), _f(r["p99_ms"]),
             _f(r["broker_cpu_ms_per_purchase"]), percent(r["other_cpu_pct"]), str(r["errors"]),
             "exhausted" if r["exhausted"] else "CUT OFF")
            for r in scale])
        out += [
            "",
            "store calls/p: the brokers' own store calls per purchase (/metrics, all but background ops);",
            ">25% left: the same until 75% of the budget was bought; bg/p: sweeper, upkeep and probes;",
            "redis/p: EVALSHA + EXEC Redis saw per purchase (everything, background included);",
            "stranded: (limit - spent) / limit after every agent gave up; left@1st 429: remaining share",
            "when the first denial arrived; CPU ms/p: all the run's brokers' CPU per purchase; other CPU:",
            "% of a core used by programs other than this bench's during the run (they skew the timings).",
        ]
        spans = [o.budget_purchases / r["purchases_per_s"] for r in scale if r["purchases_per_s"]]
        if spans:
            out += textwrap.wrap(
                f"These budgets last {min(spans):.0f}-{max(spans):.0f} s at the rates measured. A budget "
                "with less than 30 s of spend left (at the smoothed rate) is `synchronous` by design "
                "(budget/leases.py): no leases, every purchase reserves in the store, as in strict mode. So "
                "lease mode is synchronous nearly throughout these runs and its store calls per purchase to "
                "exhaustion are strict mode's: these rows show overspend and stranding; the steady-state "
                "rows below show what the leases save.", 96)
        for r in scale:
            checks = []
            if not r["spent_matches_purchases"]:
                checks.append(f"store spent {r['spent']} != purchases x price")
            if r["exchange_charges"] is not None and r["exchange_charges"] != r["purchases"]:
                checks.append(f"the Exchange charged {r['exchange_charges']} times")
            if r["reserved_after_stop"] != "0":
                checks.append(f"{r['reserved_after_stop']} still reserved after the brokers stopped")
            for kind, count in r["top_errors"].items():
                checks.append(f"{count} x {kind}")
            if checks:
                out.append(f"{r['brokers']} broker(s), {r['mode']}: " + "; ".join(checks))
            out.append(f"{r['brokers']} broker(s), {r['mode']}: store calls {r['store_calls']}")
    steady = [r for r in rows if r["row"] == "steady"]
    if steady:
        out += [
            "",
            f"Steady state: {o.agents} agents, closed loop, on a budget of {steady[0]['limit']} USD "
            f"({o.steady_budget_purchases} purchases: hours of spend left, never near exhaustion); "
            f"{o.steady_warm_seconds:g} s warm-up",
            f"(not measured: the first lease refresh sizes from demand, the spend rate gathers), then "
            f"{o.steady_seconds:g} s measured; at most {steady_cap(o)} requests a run",
            "",
        ]
        steady_cols = ("brokers", "mode", "purchases", "purch/s", "store calls/p", "bg/p", "redis/p",
                       "phases seen",
                       "h left", "p50 ms", "p99 ms", "overspend", "exact", "CPU ms/p", "other CPU", "errors")
        out += text_table(steady_cols, [
            (str(r["brokers"]), r["mode"], str(r["purchases"]), _f(r["purchases_per_s"], 0),
             _f(r["store_calls_per_purchase"], 4), _f(r["background_store_calls_per_purchase"], 3),
             _f(r["redis_calls_per_purchase"], 4),
             " ".join(f"{k}:{v}" for k, v in sorted(r["phases"].items())) or "-",
             _f(r["hours_of_spend_left_at_end"], 1), _f(r["p50_ms"]), _f(r["p99_ms"]),
             r["overspend_any_scope"],
             "yes" if r["spent_matches_purchases"] and r["spent_matches_exchange_charges"]
             and r["within_limits"] else "NO",
             _f(r["broker_cpu_ms_per_purchase"]), percent(r["other_cpu_pct"]),
             str(r["errors"] + r["denials"]))
            for r in steady])
        out += [
            "",
            "store calls/p: as above (the brokers' /metrics, all but background ops, lease refreshes",
            "included), measured window only; phases seen: the budget scope's phase in each measured",
            "purchase's answer (lease mode; `store`: reserved in the store); h left: hours of spend left",
            "at the end, at the measured rate (> 1 h: `generous`); overspend: the largest over every scope;",
            "exact: every scope's store spend = purchases x price = the Exchange's charges x price, and",
            "spent + reserved <= limit (after the stop, and at every 50 ms sample of the budget counter);",
            "errors: failures + 429s.",
        ]
        for r in steady:
            checks = [f"{count} x {kind}" for kind, count in r["top_errors"].items()]
            bought = r["warm_up_purchases"] + r["purchases"]
            if r["exchange_charges"] is not None and r["exchange_charges"] != bought:
                checks.append(f"the Exchange charged {r['exchange_charges']} times")
            if r["capped"]:
                checks.append("stopped by the request cap")
            checks.append(f"warm-up: {r['warm_up_purchases']} purchases, phases {r['phases_warm_up']}")
            out.append(f"{r['brokers']} broker(s), {r['mode']}: " + "; ".join(checks)
                       + f"; store calls {r['store_calls']}")
    lat = [r for r in rows if r["row"] == "latency"]
    if lat:
        out += ["", f"Period layer latency: 1 broker each, {o.latency_concurrency} workers closed loop, "
                    f"then the same open-loop loads ({' and '.join(f'{f:g}' for f in o.load_fractions)} x "
                    f"the no-period-layer closed-loop rate), {o.latency_seconds:g} s each", ""]
        out += text_table(("layer", "load", "offered/s", "purchases/s", "p50 ms", "p99 ms", "requests",
                           "errors", "broker CPU ms/p", "other CPU"),
                          [(r["layer"], r["load"], _f(r["offered_per_s"], 0), _f(r["purchases_per_s"], 0),
                            _f(r["p50_ms"]), _f(r["p99_ms"]), str(r["requests"]), str(r["errors"]),
                            _f(r["broker_cpu_ms_per_purchase"]), percent(r["other_cpu_pct"])) for r in lat])
        out += [f"open-loop errors include calls not started because {4 * o.latency_concurrency} were "
                "outstanding (the broker fell behind)."]
    summ = next((r for r in rows if r["row"] == "summary"), None)
    if summ is not None:
        ratio_rows: list[tuple[str, ...]] = []
        for n, v in summ["per_brokers"].items():
            if "steady_store_call_reduction" in v:
                ratio_rows += [
                    (f"{n} broker(s), steady state: strict / lease store calls per purchase (target >= 10)",
                     _f(v["steady_store_call_reduction"], 1)),
                    (f"{n} broker(s), steady state: lease p99 - strict p99 (ms)",
                     _f(v["steady_lease_minus_strict_p99_ms"])),
                    (f"{n} broker(s), steady state: lease / strict purchases per second",
                     _f(v["steady_lease_over_strict_purchases_per_s"], 2)),
                ]
            if "store_call_reduction" in v:
                ratio_rows += [
                    (f"{n} broker(s), to exhaustion: strict / lease store calls per purchase, >25% left "
                     "(< 30 s of spend: synchronous by design)",
                     _f(v["store_call_reduction_above_25pct"], 1)),
                    (f"{n} broker(s), to exhaustion: strict / lease store calls per purchase, whole run",
                     _f(v["store_call_reduction"], 1)),
                    (f"{n} broker(s), to exhaustion: lease p99 - strict p99 (ms)",
                     _f(v["lease_minus_strict_p99_ms"])),
                    (f"{n} broker(s), to exhaustion: lease / strict purchases per second",
                     _f(v["lease_over_strict_purchases_per_s"], 2)),
                ]
        for entry in summ["period_layer_p99"]:
            rate = _f(entry["offered_per_s"], 0)
            for layer in ("lease", "strict"):
                if f"{layer}_adds_p99_ms" in entry:
                    sustained = "" if entry[f"{layer}_sustained"] else ", NOT sustained"
                    share = f"{entry['load_fraction']:g}"
                    ratio_rows.append((f"{layer} period layer adds to p99 at {rate}/s ({share} x the ceiling "
                                       f"without it{sustained}) (ms)"
                                       + (" (target <= 1)" if layer == "lease" else ""),
                                       _f(entry[f"{layer}_adds_p99_ms"])))
        if summ.get("highest_sustained_without_period_layer_per_s") is not None:
            rate = _f(summ["highest_sustained_without_period_layer_per_s"], 0)
            kept = {layer: "" if summ[f"{layer}_sustained_at_highest_sustained"]
                    else f", {layer} NOT sustained" for layer in ("lease", "strict")}
            ratio_rows += [
                (f"highest load sustained without period layer: {rate}/s; lease layer adds to p99 there "
                 f"(ms{kept['lease']}) (target <= 1)", _f(summ["lease_adds_p99_ms_at_highest_sustained"])),
                (f"strict layer adds to p99 at {rate}/s (ms{kept['strict']})",
                 _f(summ["strict_adds_p99_ms_at_highest_sustained"])),
            ]
        ratio_rows.append(("overspend 0 on every scope of every run", str(summ["overspend_all_zero"])))
        if summ["steady_accounts_exact"] is not None:
            ratio_rows.append(("steady state: store spend = purchases = Exchange charges, "
                               "spent + reserved <= limit, every run", str(summ["steady_accounts_exact"])))
        out += ["", *text_table(("ratio", "value"), ratio_rows)]
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------


def options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller budget and shorter phases: the whole bench in about 2 minutes")
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    parser.add_argument("--brokers", type=int, nargs="+", default=[1, 2, 4], help="broker counts (1 2 4)")
    parser.add_argument("--modes", nargs="+", default=["strict", "lease"], choices=["strict", "lease"])
    parser.add_argument("--agents", type=int, help="concurrent agents per run (16; --quick 12)")
    parser.add_argument("--budget-purchases", type=int,
                        help="the budget, in purchases of 0.01 USD (10000; --quick 800)")
    parser.add_argument("--seconds", type=float, help="time limit per run (240; --quick 15)")
    parser.add_argument("--retries", type=int, default=3,
                        help="an agent gives up after this many retries denied in a row (3)")
    parser.add_argument("--retry-wait", type=float, help="seconds between retries (the refresh interval)")
    parser.add_argument("--refresh-seconds", type=float, default=1.0,
                        help="period_budgets.leases.refresh_seconds (1, the default)")
    parser.add_argument("--rate-half-life-seconds", type=float,
                        help="period_budgets.leases.rate_half_life_seconds (the broker's default: 60)")
    parser.add_argument("--tier", default="standard", choices=["standard", "prepaid", "postpaid"],
                        help="the lease scopes' tier (standard)")
    parser.add_argument("--scopes", type=int, default=3, choices=[1, 3],
                        help="scopes charged per purchase: 3 (user, team = the budget, org) or 1 (team)")
    parser.add_argument("--warm-purchases", type=int, default=12,
                        help="unscoped purchases per broker first (12)")
    parser.add_argument("--skip-exhaustion", action="store_true", help="no runs to exhaustion")
    parser.add_argument("--skip-steady", action="store_true", help="no steady-state section")
    parser.add_argument("--steady-seconds", type=float,
                        help="steady state: measured seconds per run (10; --quick 3)")
    parser.add_argument("--steady-warm-seconds", type=float,
                        help="steady state: unmeasured seconds of load first (2; --quick 1)")
    parser.add_argument("--steady-budget-purchases", type=int, default=STEADY_BUDGET_PURCHASES,
                        help=f"steady state: the budget, in purchases of 0.01 USD "
                             f"({STEADY_BUDGET_PURCHASES})")
    parser.add_argument("--skip-latency", action="store_true", help="no period-layer latency section")
    parser.add_argument("--latency-concurrency", type=int, default=16, help="latency section workers (16)")
    parser.add_argument("--latency-seconds", type=float, help="per latency phase (8; --quick 2)")
    parser.add_argument("--workdir", type=Path,
                        help="keep the brokers' configs, logs and journals here (a new directory)")
    parser.add_argument("--load-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.8],
                        help="open-loop loads, shares of the no-period-layer closed-loop rate (0.25 0.5 0.8)")
    a = parser.parse_args(argv)
    agents = a.agents or (12 if a.quick else 16)
    budget = a.budget_purchases or (800 if a.quick else 10000)
    seconds = a.seconds or (15.0 if a.quick else 240.0)
    latency_seconds = a.latency_seconds or (2.0 if a.quick else 8.0)
    steady_seconds = a.steady_seconds or (3.0 if a.quick else 10.0)
    warm = a.steady_warm_seconds
    steady_warm_seconds = (1.0 if a.quick else 2.0) if warm is None else warm
    if min(agents, budget, *a.brokers, a.latency_concurrency) < 1 or a.retries < 0 or a.warm_purchases < 0:
        parser.error("counts must be at least 1 (--retries, --warm-purchases at least 0)")
    times = (seconds, latency_seconds, steady_seconds, a.refresh_seconds)
    if min(times) <= 0 or not all(0 < f <= 2 for f in a.load_fractions):
        parser.error("times must be positive and --load-fractions in (0, 2]")
    if not 0 <= steady_warm_seconds <= 60 or steady_seconds > 600:
        parser.error("--steady-warm-seconds must be in [0, 60] and --steady-seconds at most 600")
    cap = math.ceil(STEADY_MAX_RATE * (steady_warm_seconds + steady_seconds))
    if a.steady_budget_purchases <= 10 * cap:
        parser.error(f"--steady-budget-purchases must be above {10 * cap} (10 x the steady runs' request "
                     "cap): a steady-state budget is never near exhaustion")
    return Options(
        brokers=tuple(a.brokers), modes=tuple(a.modes), agents=agents, budget_purchases=budget,
        seconds=seconds, retries=a.retries, retry_wait=a.retry_wait or a.refresh_seconds,
        refresh_seconds=a.refresh_seconds, rate_half_life_seconds=a.rate_half_life_seconds, tier=a.tier,
        scopes=a.scopes, warm_purchases=a.warm_purchases, latency=not a.skip_latency,
        latency_concurrency=a.latency_concurrency, latency_seconds=latency_seconds,
        load_fractions=tuple(a.load_fractions), exhaustion=not a.skip_exhaustion,
        steady=not a.skip_steady, steady_seconds=steady_seconds,
        steady_warm_seconds=steady_warm_seconds, steady_budget_purchases=a.steady_budget_purchases,
        as_json=a.json, workdir=a.workdir)


@contextlib.contextmanager
def _workdir(o: Options) -> Iterator[Path]:
    if o.workdir is not None:
        o.workdir.mkdir(parents=True)
        yield o.workdir
        return
    with tempfile.TemporaryDirectory(prefix="ramp-bench-scaleout-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    o = options(argv)
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))
    header = (f"ramp-broker scale-out: python {platform.python_version()}, {os.cpu_count()} CPUs shared by "
              "redis-server, the Exchange, every broker and this load generator")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if o.as_json:
            print(json.dumps(row), flush=True)

    try:
        with redis_server() as redis, _workdir(o) as workdir, running_exchange(workdir) as exchange:
            if o.exhaustion:
                for n in o.brokers:
                    for mode in o.modes:
                        emit(scaleout_run(workdir, exchange, redis, n, mode, o))
            if o.steady:
                for n in o.brokers:
                    for mode in o.modes:
                        emit(steady_run(workdir, exchange, redis, n, mode, o))
            if o.latency:
                for row in latency_rows(workdir, exchange, redis, o):
                    emit(row)
    except TimeoutError:
        print(f"bench: a run went {PHASE_GRACE_S:g} s past its time limit and was abandoned", file=sys.stderr)
        return 1
    except (RuntimeError, BenchFailed, StoreUnavailable) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    emit(summary(rows))
    log(f"done in {time.monotonic() - started:.0f} s")
    if not o.as_json:
        print(human(rows, o, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
