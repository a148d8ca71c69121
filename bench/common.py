"""What the benches share: their servers as child processes, the bench Exchange's catalog and the
brokers' configs, a private redis-server, closed- and open-loop load phases with CPU accounting,
the store's own reserve+commit phase, and the tables they print.

Every server runs on a free 127.0.0.1 port in its own process, with its files in the bench's
temporary directory. Nothing here asserts on timings: it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pyqwest import Client, HTTPTransport
from redis.asyncio import Redis

from budget.periods import Period, time_zone
from budget.stores.contract import Committed, CounterRef, Hold, Line, Reserved
from budget.stores.redis import RedisStore
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.broker.v1.broker_connect import BrokerServiceClient

REPO = Path(__file__).resolve().parents[1]
EXCHANGE_NAME = "bench.exchange.local"
ITEM_URI = "https://bench.example/item"
ITEM_PRICE = "0.01"
HUGE = "900000000.00"  # just under the broker's MAX_AMOUNT (10**9)
REQUEST_TIMEOUT_S = 10.0  # one call; a timed-out call counts as an error
STARTUP_TIMEOUT_S = 20.0  # waiting for /healthz of a freshly started process
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL
PHASE_GRACE_S = 2 * REQUEST_TIMEOUT_S + 5.0  # past --seconds, the whole phase is abandoned
# (worker index, request sequence number) -> None; raises when the call did not succeed.
Call = Callable[[int, int], Awaitable[None]]


# --- the bench Exchange and brokers, as child processes -------------------------------------------


def bench_catalog(port: int) -> dict[str, Any]:
    """The reference Exchange's catalog for benches: one flat-priced item, a bottomless account."""
    return {
        "exchange": EXCHANGE_NAME,
        "listen": f"127.0.0.1:{port}",
        "accounts": {"ramp-broker": {"USD": HUGE}},
        "offers": [{"uri": ITEM_URI, "offer_id": "bench-item", "title": "Bench item",
                    "model": "flat", "rate": ITEM_PRICE, "currency": "USD"}],
    }


class PurchaseFailed(Exception):
    """The RPC answered, but not with one purchased item."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def child_env(state: Path | None = None) -> dict[str, str]:
    # RAMP_BROKER_* / RAMP_EXCHANGE_* overrides in the caller's environment would
    # silently change the listen ports or limits written below: leave them out.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAMP_BROKER_", "RAMP_EXCHANGE_"))}
    if state is not None:
        # A broker's default files (journals, store memory, named after its port) go to the
        # bench's temporary directory, never the user's ~/.local/state/ramp-broker.
        env["XDG_STATE_HOME"] = str(state)
    return env


def bench_broker(exchange_port: int) -> dict[str, Any]:
    """What every bench broker's config has: everything it listens on, each on its own free loopback
    port (`listen` and `metrics.listen`: never the shared default 9091, so brokers can run side by
    side); the bench Exchange; sessions far above anything a run spends; a short shutdown grace."""
    return {
        "listen": f"127.0.0.1:{free_port()}", "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "default_currency": "USD",
        "exchanges": [{"name": EXCHANGE_NAME, "endpoint": f"http://127.0.0.1:{exchange_port}",
                       "trust": 80, "priority": 10}],
        "session": {"default_limit": {"amount": HUGE, "currency": "USD"}},
        "shutdown_grace_seconds": 2,
    }


def listen_port(config: dict[str, Any]) -> int:
    address: str = config["listen"]
    return int(address.rsplit(":", 1)[1])


def start_child(name: str, args: list[str], workdir: Path, port: int) -> Child:
    log_path = workdir / f"{name}.log"
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.operator.cli", "--log-level", "WARNING", *args],
            cwd=REPO, env=child_env(state), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Child(name, proc, log_path, f"http://127.0.0.1:{port}")


def wait_healthy(child: Child) -> None:
    end = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode} before it was healthy:\n"
                    f"{child.log_tail()}"
                )
            try:
                if client.get(f"{child.url}/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(
                    f"{child.name} not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{child.log_tail()}"
                )
            time.sleep(0.05)


def stop_child(child: Child) -> None:
    if child.proc.poll() is not None:
        return
    child.proc.terminate()
    try:
        child.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait(timeout=STOP_TIMEOUT_S)


# --- brokers with and without the period layer ----------------------------------------------------


AGENT_KEY = "bench-agent-key"
BROKER_ACCOUNT = "bench-broker"
SCOPES = ("user:bench", "team:bench", "org:bench")
PERIODS = ("month", "day", "month")  # one limit per scope, as a deployment might set them
PLAIN = "plain"
# The brokers with the period layer, by the store and mode their 3 scopes use.
PERIOD_BROKERS = {"embedded": ("embedded", "strict"), "redis-strict": ("redis", "strict"),
                  "redis-lease": ("redis", "lease")}


def broker_config(workdir: Path, xport: int, name: str, store: dict[str, Any] | None,
                  mode: str = "strict", event_loop: str = "asyncio",
                  quote_reuse: bool = True) -> dict[str, Any]:
    """A bench broker on its own free ports, in front of the bench Exchange. Every broker requires
    the same bearer key (the same authentication work); with `store`, the agent is charged to
    SCOPES (limits far above anything a run spends) kept in that store, in `mode`."""
    digest = hashlib.sha256(AGENT_KEY.encode()).hexdigest()
    agent: dict[str, Any] = {"id": "bench-agent", "key_sha256": digest, "account": BROKER_ACCOUNT}
    config: dict[str, Any] = {
        **bench_broker(xport),
        "agents": [{**agent, "charged_to": list(SCOPES)} if store is not None else agent],
        "event_loop": event_loop,
        "quotes": {"reuse": quote_reuse},
    }
    if store is not None:
        config["period_budgets"] = {
            "store": store,
            "journal_path": str(workdir / f"{name}-journal.jsonl"),
            "memory_path": str(workdir / f"{name}-memory.json"),
            "accounts": {BROKER_ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": period, "amount": HUGE, "currency": "USD"}], "mode": mode}
                for scope, period in zip(SCOPES, PERIODS, strict=True)
            }}},
        }
        if mode == "lease":
            config["period_budgets"]["leases"] = {"journal_path": str(workdir / f"{name}-leases.jsonl")}
    return config


def period_stores(workdir: Path, redis_url: str) -> dict[str, dict[str, Any]]:
    """The stores of the PERIOD_BROKERS, by kind: the embedded one in `workdir`, and Redis."""
    return {"embedded": {"kind": "embedded", "path": str(workdir / "store.sqlite3")},
            "redis": {"kind": "redis", "url": redis_url}}


# --- load phases, and the CPU they cost -----------------------------------------------------------


def quantile_ms(values: list[float], p: int) -> float | None:
    """The p-th percentile of `values` (seconds) in ms; None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls only
    errors: Counter[str] = field(default_factory=Counter)
    warmup_ok: int = 0
    warmup_errors: Counter[str] = field(default_factory=Counter)
    # CPU used during the measured phase, in % of one core, per process ("bench" is this one).
    cpu: dict[str, float | None] = field(default_factory=dict)
    baseline: bool = False  # a /healthz row, not purchases

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def requests(self) -> int:
        return self.ok + self.error_count

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def cpu_ms_per_request(self, who: str = "broker") -> float | None:
        """CPU time `who` used per successful request of the measured phase, in ms."""
        pct = self.cpu.get(who)
        if pct is None or not self.ok:
            return None
        return 10 * pct * self.elapsed / self.ok

    def percentile_ms(self, p: int) -> float | None:
        return quantile_ms(self.latencies, p)

    def pooled(self, other: PhaseResult) -> PhaseResult:
        """This round and another of the same row as one measurement: requests, errors and time
        added up, latencies together, CPU per process weighted by each round's time."""
        elapsed = self.elapsed + other.elapsed
        cpu: dict[str, float | None] = {}
        for who in self.cpu.keys() | other.cpu.keys():
            a, b = self.cpu.get(who), other.cpu.get(who)
            cpu[who] = None if a is None or b is None or not elapsed else (
                (a * self.elapsed + b * other.elapsed) / elapsed)
        return PhaseResult(self.name, self.concurrency, elapsed, self.latencies + other.latencies,
                           self.errors + other.errors, self.warmup_ok + other.warmup_ok,
                           self.warmup_errors + other.warmup_errors, cpu, self.baseline)


MACHINE = -1  # pseudo-pid: every process on the machine (busy time of all CPUs)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (None: this one, all threads); None if unknown."""
    if pid is None:
        return time.process_time()
    if pid == MACHINE:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(t) for t in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal ...: busy = all but idle, iowait
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        fields = stat.rsplit(")", 1)[1].split()  # from field 3 ("state") on
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None  # not Linux, or the process is gone


async def run_phase(
    name: str, call: Call, concurrency: int, seconds: float, max_requests: int,
    pids: dict[str, int | None] | None = None,
) -> PhaseResult:
    result = PhaseResult(name, concurrency, 0.0)
    issued = 0
    pids = pids or {}
    cpu_before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(w: int) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            seq = issued
            t0 = time.perf_counter()
            try:
                await call(w, seq)
            except Exception as exc:
                result.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
            else:
                result.latencies.append(time.perf_counter() - t0)

    async with asyncio.timeout(seconds + PHASE_GRACE_S):
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    for who, pid in pids.items():
        before, after = cpu_before[who], cpu_seconds(pid)
        result.cpu[who] = (
            None if before is None or after is None else 100 * (after - before) / result.elapsed
        )
    return result


@dataclass
class Settings:
    seconds: float
    concurrency: int
    max_requests: int
    warmup_seconds: float
    warmup_requests: int
    # Processes whose CPU use is sampled per phase: {"broker": pid, "exchange": pid, "bench": None}.
    pids: dict[str, int | None] = field(default_factory=dict)
    # With --profile: py-spy samples the loaded broker during each measured purchase phase.
    profile_dir: Path | None = None
    rounds: int = 1  # of the Connect protobuf rows, interleaved and pooled


# --- purchases ------------------------------------------------------------------------------------


def transact_request(run_id: str, tag: str, w: int, seq: int) -> bpb.TransactRequest:
    return bpb.TransactRequest(
        session_id=f"{run_id}-{tag}-w{w}", idempotency_key=f"{run_id}-{tag}-{seq}", uris=[ITEM_URI]
    )


def check_purchase(answer: bpb.TransactResponse) -> None:
    if len(answer.items) != 1 or answer.items[0].status != bpb.ITEM_STATUS_PURCHASED:
        states = [bpb.ItemStatus.Name(i.status) for i in answer.items]
        detail = answer.items[0].detail if answer.items else f"dropped={list(answer.dropped)}"
        raise PurchaseFailed(f"items={states} {detail}"[:160])


@contextlib.asynccontextmanager
async def connect_client(url: str) -> AsyncIterator[BrokerServiceClient]:
    """The generated Connect client over its own pyqwest transport, closed explicitly."""
    transport = HTTPTransport(timeout=REQUEST_TIMEOUT_S)
    try:
        client = BrokerServiceClient(url, http_client=Client(transport), send_compression=None,
                                     accept_compression=(), timeout_ms=int(REQUEST_TIMEOUT_S * 1000))
        try:
            yield client
        finally:
            await client.close()
    finally:
        await transport.aclose()


# --- report ---------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(row) for row in rows)]


def exchange_charges(exchange_url: str) -> int | None:
    try:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            r = client.get(f"{exchange_url}/admin/state")
            r.raise_for_status()
            charges: int = r.json()["charges"]
            return charges
    except (httpx.HTTPError, KeyError, ValueError):
        return None


# --- a private redis-server, and the store under load ---------------------------------------------


STORE_ACCOUNT = "bench-store"  # the store phases' account (or its numbered ones)
STORE_PREFIX = "ramp"
AMOUNT = 10_000_000  # 0.01 USD in nano-units: the bench item's price
LIMIT = 10**18  # nano-units (1e9 USD): nothing is ever denied
RESERVATION_TTL_MS = 120_000  # the broker's default reservation_ttl_seconds
GRACE_MS = 7 * 86_400_000  # the broker's default grace_seconds
RESULT = b"x" * 256  # a stored answer of about the size the broker stores


class BenchFailed(Exception):
    """An operation did not have the outcome the bench needs (the run would measure the wrong path)."""


@dataclass
class RedisProc:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def redis_server() -> Iterator[RedisProc]:
    """A private redis-server as in tests/redis_server.py: no persistence, loopback, temporary dir."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="ramp-bench-redis-") as d:
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", d, "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(Path(d) / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = RedisProc(proc, port, Path(d))
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING within 10 s")
                time.sleep(0.02)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@dataclass
class CommandStats:
    """INFO commandstats since the last reset: calls and server-side microseconds per command."""

    calls: dict[str, int] = field(default_factory=dict)
    usec: dict[str, int] = field(default_factory=dict)
    failed: int = 0

    def usec_per_call(self, command: str) -> float | None:
        calls = self.calls.get(command, 0)
        return self.usec.get(command, 0) / calls if calls else None


async def reset_stats(admin: Redis) -> None:
    await admin.config_resetstat()


async def command_stats(admin: Redis) -> CommandStats:
    raw: dict[str, Any] = await admin.info("commandstats")
    out = CommandStats()
    for name, row in raw.items():
        command = name.removeprefix("cmdstat_")
        if command in ("info", "config|resetstat"):
            continue
        out.calls[command] = int(row.get("calls", 0))
        out.usec[command] = int(row.get("usec", 0))
        out.failed += int(row.get("failed_calls", 0)) + int(row.get("rejected_calls", 0))
    return out


def counters(now: datetime) -> tuple[Hold, ...]:
    """The 3 holds of one purchase, with the windows the period layer would compute now."""
    tz = time_zone("UTC", "time_zone")
    holds = []
    for scope, spec in zip(SCOPES, PERIODS, strict=True):
        window = Period.parse(spec, "period").window(now, tz)
        ref = CounterRef(scope, spec, window.id, "USD", window.start_ms, window.end_ms)
        holds.append(Hold(ref, AMOUNT, LIMIT, window.end_ms + GRACE_MS))
    return tuple(holds)


def account_names(count: int) -> list[str]:
    """The store phases' accounts: one, or `count` numbered ones."""
    return [STORE_ACCOUNT] if count == 1 else [f"{STORE_ACCOUNT}-{i}" for i in range(count)]


def lines_for(holds: Sequence[Hold]) -> tuple[Line, ...]:
    return tuple(Line(i, AMOUNT, ITEM_PRICE, "USD", EXCHANGE_NAME, "bench-item", ITEM_URI)
                 for i in range(len(holds)))


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class StorePhase:
    result: PhaseResult
    reserve_latencies: list[float]
    stats: CommandStats
    script: str  # "reserve+commit" or "reserve"
    accounts: int = 1

    @property
    def evalsha_per_op(self) -> float | None:
        calls = self.stats.calls.get("evalsha", 0)
        return calls / self.result.ok if self.result.ok else None


async def store_phase(
    store: RedisStore, admin: Redis | None, name: str, *, commit: bool, concurrency: int, ops: int,
    seconds: float, pids: dict[str, int | None], warm: bool = False, accounts: int = 1,
    names: Sequence[str] = (),
) -> StorePhase:
    """Worker w uses account w % accounts (each account has its own coalescing batchers), or
    names[w % len(names)]. Without `admin` (a Redis Cluster: commandstats per node), no server
    statistics."""
    names = names or account_names(accounts)
    holds = counters(datetime.now(UTC))
    lines = lines_for(holds)
    run = uuid.uuid4().hex[:10]
    reserve_latencies: list[float] = []

    async def call(w: int, seq: int) -> None:
        key = f"{run}-{seq}"
        account = names[w % len(names)]
        t0 = time.perf_counter()
        out = await store.reserve(account, holds, ttl_ms=RESERVATION_TTL_MS, idempotency_key=key,
                                  now_ms=wall_ms(), limits_version=0)
        if not isinstance(out, Reserved):
            raise BenchFailed(f"reserve: {out!r}"[:160])
        reserve_latencies.append(time.perf_counter() - t0)
        if commit:
            done = await store.commit(account, out.reservation_id, holds, lines, idempotency_key=key,
                                      result=RESULT, now_ms=wall_ms())
            if done != Committed(overage=(0, 0, 0)):
                raise BenchFailed(f"commit: {done!r}"[:160])

    if admin is not None and not warm:
        await reset_stats(admin)
    result = await run_phase(name, call, concurrency, seconds, ops, pids)
    stats = await command_stats(admin) if admin is not None and not warm else CommandStats()
    return StorePhase(result, reserve_latencies, stats, "reserve+commit" if commit else "reserve", len(names))


# --- open loop ------------------------------------------------------------------------------------


async def run_open_loop(
    name: str, call: Call, rate: float, seconds: float, pids: dict[str, int | None], concurrency: int,
    max_outstanding: int,
) -> tuple[PhaseResult, list[float]]:
    """`rate` calls a second for `seconds` (rate * seconds calls at most), each started on schedule
    whatever the earlier ones are doing; returns the result and how late each call started (s)."""
    result = PhaseResult(name, concurrency, 0.0)
    total = int(rate * seconds)
    lags: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    cpu_before = {who: cpu_seconds(pid) for who, pid in pids.items()}

    async def one(seq: int) -> None:
        t0 = time.perf_counter()
        try:
            await call(seq % concurrency, seq)
        except Exception as exc:
            result.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
        else:
            result.latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    async with asyncio.timeout(seconds + PHASE_GRACE_S):
        for seq in range(total):
            due = start + seq / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() > start + seconds + REQUEST_TIMEOUT_S:
                result.errors["client: fell too far behind schedule"] += total - seq
                break
            if len(tasks) >= max_outstanding:
                result.errors[f"client: {max_outstanding} calls outstanding, call skipped"] += 1
                continue
            lags.append(time.perf_counter() - due)
            task = asyncio.create_task(one(seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    result.elapsed = time.perf_counter() - start
    for who, pid in pids.items():
        before, after = cpu_before[who], cpu_seconds(pid)
        result.cpu[who] = None if before is None or after is None else 100 * (after - before) / result.elapsed
    return result, lags
