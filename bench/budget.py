"""What the per-period budget layer costs: the Redis store alone, and purchases through the broker.

    python -m bench.budget [--ops N] [--seconds T] [--rb-requests N] [--purchases N] [--rate R] ...

Everything runs on 127.0.0.1: a private redis-server (free port, temporary directory,
no persistence), the reference Exchange and two brokers as separate processes.

1. The store. 64 asyncio tasks share one RedisStore (as a broker's purchases would); each
   operation reserves on 3 counters (user / team / org, limits far above anything spent) and
   commits 1 ledger line per counter. Bounded by --ops operations or --seconds, whichever comes
   first, after a warm-up. A second phase only reserves; a third splits the same tasks over 2
   accounts (RedisStore coalesces concurrent calls per account into batches of up to 16, up to
   4 batches in flight).
2. redis-benchmark (the C client) on the same server runs the same reserve script, by EVALSHA
   of the SHA the store loaded, with the keys and arguments RedisStore sent for one real
   reservation (captured from the call, under another account; the idempotency key and
   reservation id become `__rand_int__`, redrawn per call). Then the commit script the same way.
   Its reservations are checked afterwards on the counters, so error replies cannot pass for
   throughput.
   The figure of merit compares like with like (target >= 0.5): store reserves/s against
   redis-benchmark's reserve calls/s, and store reserve+commit pairs/s against redis-benchmark
   running the same two scripts one after the other. Pairs/s against reserve calls/s alone is
   printed too, as the strictest reading.
3. Purchases: one broker whose agent has no period scopes, one whose agent is charged to 3
   period scopes on this Redis; both behind the same Exchange, both requiring the same bearer
   key. Closed loop (--purchase-concurrency workers, at most --purchases requests or
   --purchase-seconds per broker) and open loop (each --rate purchases/s for --rate-seconds,
   started on schedule whatever is outstanding). The added p50 / p99 is the period layer's cost.

Redis-side numbers come from INFO commandstats, reset before each phase: EVALSHA calls per
operation (so the mean coalesced batch) and the server's microseconds per call.
Nothing here asserts on timings: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pyqwest import Client, HTTPTransport
from redis.asyncio import Redis

from bench.common import (
    AGENT_KEY,
    AMOUNT,
    MACHINE,
    PHASE_GRACE_S,
    REQUEST_TIMEOUT_S,
    RESERVATION_TTL_MS,
    RESULT,
    SCOPES,
    STORE_PREFIX,
    BenchFailed,
    Call,
    Child,
    CommandStats,
    PhaseResult,
    RedisProc,
    Settings,
    StorePhase,
    bench_catalog,
    broker_config,
    check_purchase,
    command_stats,
    counters,
    cpu_seconds,
    free_port,
    lines_for,
    listen_port,
    percent,
    quantile_ms,
    redis_server,
    reset_stats,
    run_open_loop,
    run_phase,
    start_child,
    stop_child,
    store_phase,
    text_table,
    transact_request,
    wait_healthy,
    wall_ms,
)
from broker.config import StoreSetting
from budget.stores.contract import Committed, Reserved, StoreUnavailable
from budget.stores.redis import RedisStore
from ramp.broker.v1.broker_connect import BrokerServiceClient

REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
RB_ACCOUNT = "bench-rb"  # section 2: its own keys, never the store's
RAND = "__rand_int__"  # redis-benchmark replaces it with a random 12-digit number (-r)
RB_KEYSPACE = 1_000_000_000
RB_TIMEOUT_S = 120.0


T = TypeVar("T")


# --- 1. the store: bench.common.store_phase (store_sections, below) ----------------------------


# --- 2. redis-benchmark ---------------------------------------------------------------------------


async def captured(
    store: RedisStore, script: str, call: Callable[[], Awaitable[T]],
) -> tuple[T, list[str], list[str]]:
    """Make one RedisStore call; return its outcome with the KEYS and ARGV it sent to `script`.

    redis-benchmark then repeats exactly those arguments, so it runs the store's own argument
    layout whatever it is today (the scripts' arguments change with the store; a copy kept here
    would drift from them)."""
    seen: list[tuple[list[str], list[str]]] = []
    real = store._eval

    async def spy(name: str, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        if name == script:
            seen.append((list(keys), [a.decode() if isinstance(a, bytes) else a for a in args]))
        return await real(name, keys, args)

    store._eval = spy  # type: ignore[method-assign]
    try:
        outcome = await call()
    finally:
        del store._eval  # the class's method again
    if len(seen) != 1:
        raise BenchFailed(f"expected one {script} script call from RedisStore, saw {len(seen)}")
    return outcome, *seen[0]


def randomized(values: list[str], ids: Sequence[str]) -> list[str]:
    """`values` with each of `ids` (a reservation id, an idempotency key) replaced by one that
    redis-benchmark redraws for every call."""
    out = []
    for value in values:
        for old in ids:
            value = value.replace(old, f"rb-{RAND}")
        out.append(value)
    return out


@dataclass
class RbResult:
    name: str
    requests: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    elapsed: float = 0.0
    stats: CommandStats = field(default_factory=CommandStats)
    cpu: dict[str, float | None] = field(default_factory=dict)
    landed: int | None = None  # operations whose effect was found on the counters afterwards
    error: str = ""


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def run_redis_benchmark(
    name: str, port: int, command: list[str], clients: int, requests: int, redis_pid: int
) -> RbResult:
    out = RbResult(name, requests)
    argv = [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests),
            "-r", str(RB_KEYSPACE), "-q", "--csv", *command]
    server_before = cpu_seconds(redis_pid)
    machine_before = cpu_seconds(MACHINE)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=RB_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        out.error = f"redis-benchmark did not finish in {RB_TIMEOUT_S:g} s (killed)"
        return out
    out.elapsed = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_after, machine_after = cpu_seconds(redis_pid), cpu_seconds(MACHINE)
    client_cpu = (children.ru_utime + children.ru_stime
                  - children_before.ru_utime - children_before.ru_stime)
    out.cpu = {
        "redis": None if server_before is None or server_after is None
        else 100 * (server_after - server_before) / out.elapsed,
        "client": 100 * client_cpu / out.elapsed,
        "machine": None if machine_before is None or machine_after is None
        else 100 * (machine_after - machine_before) / out.elapsed,
    }
    if done.returncode != 0:
        out.error = f"redis-benchmark exited {done.returncode}: {done.stderr.decode(errors='replace')[:300]}"
        return out
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode(errors="replace"))))
    if not rows:
        out.error = f"no CSV from redis-benchmark: {done.stdout[:200]!r} {done.stderr[:200]!r}"
        return out
    row = rows[-1]
    out.rps = _float(row.get("rps"))
    out.p50_ms = _float(row.get("p50_latency_ms"))
    out.p99_ms = _float(row.get("p99_latency_ms"))
    return out


async def redis_benchmark_phases(
    store: RedisStore, admin: Redis, redis: RedisProc, clients: int, requests: int,
) -> tuple[list[RbResult], list[str]]:
    """redis-benchmark EVALSHA of the store's own reserve and commit scripts."""
    notes: list[str] = []
    holds = counters(datetime.now(UTC))
    lines = lines_for(holds)
    prefix = store.account_prefix(RB_ACCOUNT)
    now_ms = wall_ms()  # fixed for the whole run, as a caller's clock within one request
    # One reservation and its commit through RedisStore itself: the arguments redis-benchmark repeats.
    ik = f"probe-{uuid.uuid4().hex}"
    reserved, reserve_keys, reserve_args = await captured(store, "reserve", lambda: store.reserve(
        RB_ACCOUNT, holds, ttl_ms=RESERVATION_TTL_MS, idempotency_key=ik, now_ms=now_ms, limits_version=0))
    if not isinstance(reserved, Reserved):
        raise BenchFailed(f"reserve probe: {reserved!r}"[:300])
    rid = reserved.reservation_id
    done, commit_keys, commit_args = await captured(store, "commit", lambda: store.commit(
        RB_ACCOUNT, rid, holds, lines, idempotency_key=ik, result=RESULT, now_ms=now_ms))
    if done != Committed(overage=(0, 0, 0)):
        raise BenchFailed(f"commit probe: {done!r}"[:300])
    calls = {"reserve": (reserve_keys, reserve_args), "commit": (commit_keys, commit_args)}
    results: list[RbResult] = []
    for name in ("reserve", "commit"):
        sha = store._scripts[name].sha
        if not sha or not (await admin.script_exists(sha))[0]:
            raise BenchFailed(f"{name}.lua: RedisStore's script is not loaded in redis-server")
        notes.append(f"{name}.lua: EVALSHA {sha[:12]}, the script RedisStore ran, with the arguments it sent "
                     "for one purchase (reservation id and idempotency key redrawn per call)")
        keys, args = (randomized(values, (rid, ik)) for values in calls[name])
        command = ["EVALSHA", sha, str(len(keys)), *keys, *args]
        before = await admin.hmget(f"{prefix}c:{holds[0].counter.key}", ["reserved", "count"])
        await reset_stats(admin)
        print(f"  redis-benchmark: EVALSHA {name} x {requests}, -c {clients} ...", file=sys.stderr,
              flush=True)
        rb = await asyncio.to_thread(run_redis_benchmark, f"redis-benchmark EVALSHA {name}", redis.port,
                                     command, clients, requests, redis.proc.pid)
        rb.stats = await command_stats(admin)
        after = await admin.hmget(f"{prefix}c:{holds[0].counter.key}", ["reserved", "count"])
        # Reserve: each landed call adds AMOUNT to `reserved`; commit: each adds 1 to `count`.
        if name == "reserve":
            rb.landed = (int(after[0] or 0) - int(before[0] or 0)) // AMOUNT
        else:
            rb.landed = int(after[1] or 0) - int(before[1] or 0)
        results.append(rb)
    notes.append("redis-benchmark's commit finds no reservation under its random id, so it takes the "
                 "late-commit path (no refund of a hold); the store's commits settle real reservations.")
    return results, notes


# --- 3. purchases through the broker ------------------------------------------------------------


@contextlib.contextmanager
def purchase_servers(workdir: Path, redis_url: str) -> Iterator[tuple[Child, Child, Child]]:
    """The reference Exchange and two brokers on it: (exchange, without period layer, with it)."""
    xport = free_port()
    catalog = bench_catalog(xport)
    # Same key, same authentication work; only the second broker's agent is charged to scopes.
    plain_config = broker_config(workdir, xport, "plain", None)
    period_config = broker_config(workdir, xport, "period", {"kind": "redis", "url": redis_url})
    (workdir / "catalog.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
    (workdir / "plain.yaml").write_text(yaml.safe_dump(plain_config), encoding="utf-8")
    (workdir / "period.yaml").write_text(yaml.safe_dump(period_config), encoding="utf-8")
    children: list[Child] = []
    try:
        exchange = start_child("exchange", ["exchange", "--catalog", str(workdir / "catalog.yaml")],
                               workdir, xport)
        children.append(exchange)
        wait_healthy(exchange)
        plain = start_child("broker-plain", ["serve", "--config", str(workdir / "plain.yaml")],
                            workdir, listen_port(plain_config))
        children.append(plain)
        period = start_child("broker-period", ["serve", "--config", str(workdir / "period.yaml")],
                             workdir, listen_port(period_config))
        children.append(period)
        wait_healthy(plain)
        wait_healthy(period)
        yield exchange, plain, period
    finally:
        for child in reversed(children):
            stop_child(child)


@dataclass
class BrokerRun:
    result: PhaseResult
    stats: CommandStats
    lags: list[float] = field(default_factory=list)
    group: str = ""  # the rows compared with each other: "closed loop", "open loop 200/s"


async def closed_loop(name: str, make_call: Callable[[str], Call], s: Settings, admin: Redis) -> BrokerRun:
    """bench.purchases.measure, with Redis's counters reset between the warm-up and the measured phase."""
    print(f"  {name}: warm-up ...", file=sys.stderr, flush=True)
    warm = await run_phase(name, make_call("warm"), s.concurrency, s.warmup_seconds, s.warmup_requests)
    print(f"  {name}: measuring (warm-up: {warm.ok} ok, {warm.error_count} errors) ...", file=sys.stderr,
          flush=True)
    await reset_stats(admin)
    result = await run_phase(name, make_call("run"), s.concurrency, s.seconds, s.max_requests, s.pids)
    stats = await command_stats(admin)
    result.warmup_ok, result.warmup_errors = warm.ok, warm.errors
    return BrokerRun(result, stats)


async def broker_phases(
    plain: Child, period: Child, admin: Redis, a: argparse.Namespace, pids: dict[str, int | None]
) -> list[BrokerRun]:
    run_id = uuid.uuid4().hex[:10]
    headers = {"authorization": f"Bearer {AGENT_KEY}"}
    runs: list[BrokerRun] = []
    brokers = {"plain": plain, "period": period}

    def settings(who: str) -> Settings:
        # Each phase samples the CPU of the broker it loads.
        return Settings(seconds=a.purchase_seconds, concurrency=a.purchase_concurrency,
                        max_requests=a.purchases, warmup_seconds=2.0, warmup_requests=min(a.purchases, 500),
                        pids={"broker": brokers[who].proc.pid, **pids})
    clients: dict[str, tuple[HTTPTransport, BrokerServiceClient]] = {}
    try:
        for who, child in brokers.items():
            transport = HTTPTransport(timeout=REQUEST_TIMEOUT_S)
            clients[who] = (transport, BrokerServiceClient(
                child.url, http_client=Client(transport), send_compression=None, accept_compression=(),
                timeout_ms=int(REQUEST_TIMEOUT_S * 1000)))

        def maker(who: str, mode: str) -> Callable[[str], Call]:
            client = clients[who][1]

            def make(tag: str) -> Call:
                prefix = f"{who}-{mode}-{tag}"

                async def call(w: int, seq: int) -> None:
                    answer = await client.transact(transact_request(run_id, prefix, w, seq), headers=headers)
                    check_purchase(answer)
                return call
            return make

        labels = {"plain": "no period layer", "period": "period layer (3 scopes, redis)"}
        for who in ("plain", "period"):
            run = await closed_loop(f"closed loop: {labels[who]}", maker(who, "closed"), settings(who), admin)
            run.group = "closed loop"
            runs.append(run)
        for rate in a.rate:
            for who in ("plain", "period"):
                group = f"open loop {rate:g}/s"
                name = f"{group}: {labels[who]}"
                print(f"  {name}: {a.rate_seconds:g} s ...", file=sys.stderr, flush=True)
                await reset_stats(admin)
                call = maker(who, f"open{rate:g}")("run")
                result, lags = await run_open_loop(name, call, rate, a.rate_seconds, settings(who).pids,
                                                   a.purchase_concurrency,
                                                   max_outstanding=4 * a.purchase_concurrency)
                runs.append(BrokerRun(result, await command_stats(admin), lags, group))
    finally:
        for transport, client in clients.values():
            await client.close()
            await transport.aclose()
    return runs


# --- report ---------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _cpu_ms(r: PhaseResult, who: str) -> str:
    """CPU milliseconds `who` spent per successful call."""
    pct = r.cpu.get(who)
    return "-" if pct is None or not r.ok else f"{pct / 100 * r.elapsed * 1000 / r.ok:.2f}"


def _per(count: float, ops: int, digits: int = 2) -> str:
    return "-" if not ops else f"{count / ops:.{digits}f}"


def _other(cpu: dict[str, float | None], ours: Sequence[str]) -> float | None:
    machine = cpu.get("machine")
    mine = [cpu.get(who) for who in ours]
    if machine is None or any(v is None for v in mine):
        return None
    return max(0.0, machine - sum(v for v in mine if v is not None))


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b - a:+.2f}"


def report_store(
    phases: list[StorePhase], rbs: list[RbResult], notes: list[str], a: argparse.Namespace
) -> list[str]:
    header = ("operation", "ops/s", "p50 ms", "p99 ms", "ops", "errors", "EVALSHA/op", "redis us/EVALSHA",
              "redis CPU", "client CPU", "other CPU")
    rows: list[tuple[str, ...]] = []
    for ph in phases:
        r = ph.result
        per = ph.evalsha_per_op
        label = f"RedisStore {ph.script}" + (f", {ph.accounts} accounts" if ph.accounts > 1 else "")
        rows.append((label, _rate(r.rate), _ms(r.percentile_ms(50)),
                     _ms(r.percentile_ms(99)), str(r.requests), str(r.error_count),
                     "-" if per is None else f"{per:.3f}", _rate(ph.stats.usec_per_call("evalsha")),
                     percent(r.cpu.get("redis")), percent(r.cpu.get("bench")),
                     percent(_other(r.cpu, ["redis", "bench"]))))
        if ph.script == "reserve+commit" and ph.accounts == 1:
            rows.append(("  of which the reserve", "", _ms(quantile_ms(ph.reserve_latencies, 50)),
                         _ms(quantile_ms(ph.reserve_latencies, 99)), "", "", "", "", "", "", ""))
    for rb in rbs:
        rows.append((rb.name, _rate(rb.rps), _ms(rb.p50_ms), _ms(rb.p99_ms), str(rb.requests),
                     str(rb.stats.failed) if not rb.error else "run failed",
                     _ratio(rb.stats.calls.get("evalsha", 0), rb.requests),
                     _rate(rb.stats.usec_per_call("evalsha")), percent(rb.cpu.get("redis")),
                     percent(rb.cpu.get("client")), percent(_other(rb.cpu, ["redis", "client"]))))
    out = [
        f"1-2. Redis store: {a.concurrency} concurrent tasks, {len(SCOPES)} holds per reservation, "
        f"1 line per hold; at most {a.ops} ops or {a.seconds:g} s per RedisStore phase; "
        f"redis-benchmark -c {a.concurrency} -n {a.rb_requests}",
        "",
        *text_table(header, rows),
        "",
        "ops/s: RedisStore operations (reserve+commit pairs, or reserves) per second, or redis-benchmark",
        "calls per second; latencies of successful ones (redis-benchmark: its own percentiles).",
        "errors: failed operations (redis-benchmark: failed script calls by INFO commandstats).",
        "EVALSHA/op: script calls the server saw per operation (< 1: coalesced into batches).",
        f"2 accounts: the same {a.concurrency} tasks, half on each of 2 accounts (RedisStore coalesces per "
        "account,",
        "batches of up to 16, 4 in flight, per account and operation): what one account limits.",
        "CPU: % of one core; client = this process (RedisStore rows) or redis-benchmark; other = the rest",
        "of the machine (anything else running skews every number here).",
    ]
    out += [f"note: {n}" for n in notes]
    for rb in rbs:
        if rb.error:
            out.append(f"{rb.name}: {rb.error}")
        elif rb.landed is not None:
            out.append(f"{rb.name}: {rb.landed} of {rb.requests} calls found on the counters afterwards "
                       "(a few random ids may collide)")
    pair = next((ph.result.rate for ph in phases if ph.script == "reserve+commit" and ph.accounts == 1), None)
    only = next((ph.result.rate for ph in phases if ph.script == "reserve" and ph.accounts == 1), None)
    split = next((ph for ph in phases if ph.accounts > 1), None)
    rb_reserve = next((rb.rps for rb in rbs if rb.name.endswith("reserve")), None)
    rb_commit = next((rb.rps for rb in rbs if rb.name.endswith("commit")), None)
    unbatched = 1 / (1 / rb_reserve + 1 / rb_commit) if rb_reserve and rb_commit else None
    ratio_rows: list[tuple[str, ...]] = [
        ("RedisStore reserves/s / redis-benchmark reserve calls/s (target >= 0.5)", _ratio(only, rb_reserve)),
        ("RedisStore reserve+commit pairs/s / redis-benchmark reserve-then-commit pairs/s "
         f"({_rate(unbatched)}/s) (target >= 0.5)", _ratio(pair, unbatched)),
        ("RedisStore reserve+commit pairs/s / redis-benchmark reserve calls/s (strictest)",
         _ratio(pair, rb_reserve)),
        *([(f"RedisStore reserve+commit pairs/s, {split.accounts} accounts / redis-benchmark reserve calls/s",
            _ratio(split.result.rate, rb_reserve))] if split else []),
    ]
    out += ["", *text_table(("ratio", "value"), ratio_rows)]
    for ph in phases:
        errs = ph.result.errors.most_common(3)
        out += [f"{ph.script} errors: {n} x {kind}" for kind, n in errs]
    return out


def report_broker(runs: list[BrokerRun], a: argparse.Namespace) -> list[str]:
    cpu_of = ["broker", "exchange", "redis", "bench"]
    header = ("purchases", "purchases/s", "p50 ms", "p99 ms", "requests", "errors", "EVALSHA/p", "MULTI/p",
              "redis us/p", "broker CPU ms/p", *(f"{who} CPU" for who in cpu_of), "other CPU")
    rows = []
    for run in runs:
        r = run.result
        st = run.stats
        # EXEC's time includes the commands it runs; EVALSHA's the commands its script calls.
        usec = sum(st.usec.get(c, 0) for c in ("evalsha", "exec", "multi"))
        rows.append((r.name, _rate(r.rate), _ms(r.percentile_ms(50)), _ms(r.percentile_ms(99)),
                     str(r.requests), str(r.error_count), _per(st.calls.get("evalsha", 0), r.ok),
                     _per(st.calls.get("multi", 0), r.ok), _per(usec, r.ok, 0), _cpu_ms(r, "broker"),
                     *(percent(r.cpu.get(who)) for who in cpu_of), percent(_other(r.cpu, cpu_of))))
    out = [
        f"3. Purchases through the broker (Connect protobuf over pyqwest, bearer key): closed loop "
        f"{a.purchase_concurrency} workers, at most {a.purchases} requests or {a.purchase_seconds:g} s "
        f"(after a warm-up); open loop {' and '.join(f'{r:g}/s' for r in a.rate)}, {a.rate_seconds:g} s each",
        "",
        *text_table(header, rows),
        "",
        "EVALSHA/p, MULTI/p: script calls and MULTI/EXEC reads Redis saw per purchase; redis us/p: its time",
        "in them. broker CPU ms/p: the broker's CPU time per purchase.",
        "CPU: % of one core; broker = the broker under load in that row; other = the rest of",
        "the machine (anything else running skews every number here).",
    ]
    added: list[tuple[str, ...]] = []
    for i in range(0, len(runs) - 1, 2):
        if runs[i].group == runs[i + 1].group:
            base, layered = runs[i].result, runs[i + 1].result
            added.append((runs[i].group, _delta(base.percentile_ms(50), layered.percentile_ms(50)),
                          _delta(base.percentile_ms(99), layered.percentile_ms(99)),
                          _ratio(layered.rate, base.rate)))
    out += ["", *text_table(("period layer adds", "p50 ms", "p99 ms", "purchases/s ratio"), added)]
    for run in runs:
        if run.lags:
            out.append(f"{run.result.name}: start lag p50 {_ms(quantile_ms(run.lags, 50))} ms, "
                       f"p99 {_ms(quantile_ms(run.lags, 99))} ms behind schedule")
        if run.result.ok and run.stats.calls:
            ok, st = run.result.ok, run.stats
            parts = [f"{cmd} {st.usec.get(cmd, 0) / ok:.0f} us ({st.calls.get(cmd, 0) / ok:.2f} calls)"
                     for cmd in ("evalsha", "exec")]
            out.append(f"{run.result.name}: redis time per purchase: {', '.join(parts)}")
        for kind, n in run.result.errors.most_common(3):
            out.append(f"{run.result.name}: {n} x {kind}")
    return out


# --- main -----------------------------------------------------------------------------------------


async def store_sections(redis: RedisProc, a: argparse.Namespace) -> list[str]:
    store = await RedisStore.open(redis.url, timeout_ms=a.store_timeout_ms, prefix=STORE_PREFIX)
    admin = Redis.from_url(redis.url)
    try:
        pids: dict[str, int | None] = {"redis": redis.proc.pid, "bench": None, "machine": MACHINE}
        print("  RedisStore: warm-up ...", file=sys.stderr, flush=True)
        warm = await store_phase(store, admin, "warm", commit=True, concurrency=a.concurrency,
                                 ops=min(2000, a.ops), seconds=2.0, pids={}, warm=True)
        if warm.result.errors:
            print(f"  warm-up errors: {dict(warm.result.errors.most_common(3))}", file=sys.stderr)
        phases = []
        # The same load split over 2 accounts: 2 independent batchers per operation instead of 1.
        for commit, accounts in ((True, 1), (False, 1), (True, 2)):
            what = "reserve+commit" if commit else "reserve only"
            print(f"  RedisStore: {what}, {accounts} account(s) ...", file=sys.stderr, flush=True)
            phases.append(await store_phase(store, admin, "store", commit=commit, concurrency=a.concurrency,
                                            ops=a.ops, seconds=a.seconds, pids=pids, accounts=accounts))
        rbs, notes = await redis_benchmark_phases(store, admin, redis, a.concurrency, a.rb_requests)
        return report_store(phases, rbs, notes, a)
    finally:
        await store.close()
        await admin.aclose()


async def broker_section(redis: RedisProc, plain: Child, period: Child, exchange: Child,
                         a: argparse.Namespace) -> list[str]:
    admin = Redis.from_url(redis.url)
    try:
        pids: dict[str, int | None] = {"exchange": exchange.proc.pid, "redis": redis.proc.pid, "bench": None,
                                       "machine": MACHINE}
        return report_broker(await broker_phases(plain, period, admin, a, pids), a)
    finally:
        await admin.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64, help="store tasks and redis-benchmark -c (64)")
    parser.add_argument("--ops", type=int, default=20000, help="operations per RedisStore phase (20000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time limit per RedisStore phase (15)")
    parser.add_argument("--rb-requests", type=int, default=100000, help="redis-benchmark -n (100000)")
    parser.add_argument("--store-timeout-ms", type=int, default=StoreSetting().timeout_ms,
                        help="RedisStore timeout (the broker's default)")
    parser.add_argument("--purchase-concurrency", type=int, default=16, help="closed-loop workers (16)")
    parser.add_argument("--purchases", type=int, default=4000, help="closed-loop requests per broker (4000)")
    parser.add_argument("--purchase-seconds", type=float, default=15.0,
                        help="closed-loop time limit per broker (15)")
    parser.add_argument("--rate", type=float, nargs="+", default=[100.0, 200.0],
                        help="open-loop purchases per second, one phase pair per rate (100 200)")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="open-loop duration per broker (10)")
    parser.add_argument("--skip-store", action="store_true", help="only section 3")
    parser.add_argument("--skip-broker", action="store_true", help="only sections 1-2")
    a = parser.parse_args(argv)
    if min(a.concurrency, a.ops, a.rb_requests, a.purchase_concurrency, a.purchases) < 1 or min(
            a.seconds, a.purchase_seconds, *a.rate, a.rate_seconds) <= 0:
        parser.error("counts must be at least 1 and times and rates positive")
    if not Path(REDIS_BENCHMARK).exists():
        parser.error(f"{REDIS_BENCHMARK} is not installed")
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))
    out = [
        f"ramp-broker period budgets: python {platform.python_version()}, redis-server + "
        f"redis-benchmark {_redis_version()}, {os.cpu_count()} CPUs shared by everything below",
        "",
    ]
    try:
        with redis_server() as redis:
            if not a.skip_store:
                print("sections 1-2: RedisStore and redis-benchmark ...", file=sys.stderr, flush=True)
                out += asyncio.run(store_sections(redis, a))
                out.append("")
            if not a.skip_broker:
                print("section 3: starting the Exchange and two brokers ...", file=sys.stderr, flush=True)
                with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, \
                        purchase_servers(Path(tmp), redis.url) as (exchange, plain, period):
                    out += asyncio.run(broker_section(redis, plain, period, exchange, a))
    except TimeoutError:
        print(f"bench: a phase ran {PHASE_GRACE_S:g} s past its time limit and was abandoned",
              file=sys.stderr)
        return 1
    except (RuntimeError, BenchFailed, StoreUnavailable) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print("\n".join(out).rstrip())
    return 0


def _redis_version() -> str:
    try:
        text = subprocess.run([REDIS_BENCHMARK, "--version"], capture_output=True, timeout=10,
                              check=False).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return text.split()[1] if len(text.split()) > 1 else text.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
