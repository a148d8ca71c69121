"""End-to-end purchase throughput: agent -> broker -> reference Exchange, per protocol.

    python -m bench.purchases [--seconds N] [--concurrency C] [--requests MAX]

The reference Exchange and the broker run as separate OS processes (``python -m
broker.operator.cli exchange`` / ``serve``) on free loopback ports, so the load generator
here never shares the broker's event loop. Each protocol phase runs C concurrent
workers for at most N seconds or MAX requests, whichever comes first, after a
short warm-up that is not counted:

  * baseline: ``GET /healthz`` over httpx (the broker's trivial JSON route: the
    server's own ceiling for one request/response on this machine). httpx costs
    the client more CPU per request than the broker spends answering, so a second
    baseline row drives the same route with pyqwest (the Rust HTTP client under
    the generated Connect client), which comes closer to the broker's ceiling;
  * Connect JSON: ``POST /ramp.broker.v1.BrokerService/Transact`` over one shared
    httpx.AsyncClient;
  * Connect protobuf: the generated ``BrokerServiceClient`` over pyqwest;
  * gRPC: the generated grpcio stub over one ``grpc.aio`` channel.

The Connect protobuf rows (the plain broker, and with the period layer) run in --rounds
interleaved rounds, pooled per row, so that their ratios do not hang on one noisy phase.

Every purchase buys one flat-priced item with its own idempotency key; each
worker uses its own session (created on first use with the broker's default
limit, which is set far above anything the run can spend). A purchase counts as
an error unless the RPC succeeds and its one item comes back PURCHASED. No
protocol compresses on the agent's hop (the Connect clients would ask for gzip by
default; grpcio does not).

Nothing here asserts on timings: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from pyqwest import Client, HTTPTransport

from bench.common import (
    AGENT_KEY,
    ITEM_URI,
    MACHINE,
    PERIOD_BROKERS,
    PHASE_GRACE_S,
    PLAIN,
    REQUEST_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Call,
    Child,
    PhaseResult,
    PurchaseFailed,
    Settings,
    bench_catalog,
    broker_config,
    check_purchase,
    connect_client,
    exchange_charges,
    free_port,
    listen_port,
    percent,
    period_stores,
    redis_server,
    run_phase,
    start_child,
    stop_child,
    text_table,
    transact_request,
    wait_healthy,
)
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.broker.v1 import broker_pb2_grpc
from ramp.broker.v1.broker_connect import BrokerServiceClient

TRANSACT_PATH = "/ramp.broker.v1.BrokerService/Transact"
BASELINE_HTTPX = "baseline: GET /healthz (httpx)"
BASELINE_PYQWEST = "baseline: GET /healthz (pyqwest)"
CONNECT_PROTO = "Connect protobuf (connectrpc)"
# No compression on the agent's hop for any protocol: httpx and the generated Connect
# client would otherwise ask for gzip, and the broker gzips every answer they accept it
# for, while grpcio asks for identity first. Uncompressed keeps the protocols comparable.
CONNECT_JSON = {"content-type": "application/json", "accept-encoding": "identity"}


# --- the servers ------------------------------------------------------------------


ROW_LABELS = {"embedded": "period layer: embedded store, 3 scopes",
              "redis-strict": "period layer: Redis strict, 3 scopes",
              "redis-lease": "period layer: Redis lease, 3 scopes"}


@dataclass
class Servers:
    exchange: Child
    brokers: dict[str, Child]  # PLAIN, and with --period every PERIOD_BROKERS name
    redis_pid: int | None


@contextlib.contextmanager
def running_servers(period: bool, event_loop: str = "asyncio", quote_reuse: bool = True) -> Iterator[Servers]:
    """The reference Exchange and the brokers, each in its own process (and with `period`, a private
    redis-server), stopped on exit."""
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        xport = free_port()
        (workdir / "catalog.yaml").write_text(yaml.safe_dump(bench_catalog(xport)), encoding="utf-8")
        configs = {PLAIN: broker_config(workdir, xport, PLAIN, None, event_loop=event_loop,
                                        quote_reuse=quote_reuse)}
        redis_pid = None
        if period:
            redis = stack.enter_context(redis_server())
            redis_pid = redis.proc.pid
            stores = period_stores(workdir, redis.url)
            for name, (kind, mode) in PERIOD_BROKERS.items():
                configs[name] = broker_config(workdir, xport, name, stores[kind], mode, event_loop,
                                              quote_reuse)
        try:
            exchange = start_child("exchange", ["exchange", "--catalog", str(workdir / "catalog.yaml")],
                                   workdir, xport)
            children.append(exchange)
            wait_healthy(exchange)
            brokers = {}
            for name, config in configs.items():
                (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
                brokers[name] = start_child(f"broker-{name}",
                                            ["serve", "--config", str(workdir / f"{name}.yaml")],
                                            workdir, listen_port(config))
                children.append(brokers[name])
            for child in brokers.values():
                wait_healthy(child)
            yield Servers(exchange, brokers, redis_pid)
        finally:
            for child in reversed(children):
                stop_child(child)


# --- load ------------------------------------------------------------------------


async def measure(
    name: str, make_call: Callable[[str], Call], s: Settings, *, baseline: bool = False, round_: int = 0,
) -> PhaseResult:
    """A warm-up (not counted; the first round only), then the measured phase; keys never repeat
    across the two, nor across rounds."""
    warm = PhaseResult(name, s.concurrency, 0.0)
    if round_ == 0:
        print(f"  {name}: warm-up ...", file=sys.stderr, flush=True)
        warm = await run_phase(name, make_call("warm"), s.concurrency, s.warmup_seconds,
                               s.warmup_requests)
    print(f"  {name}: measuring{f' (round {round_ + 1})' if round_ else ''} (warm-up: {warm.ok} ok, "
          f"{warm.error_count} errors) ...", file=sys.stderr, flush=True)
    # py-spy samples the first round (a later one would overwrite its file).
    with profiled(name, s.pids.get("broker"), None if baseline or round_ else s.profile_dir):
        result = await run_phase(name, make_call(f"run{round_}"), s.concurrency, s.seconds, s.max_requests,
                                 s.pids)
    result.warmup_ok, result.warmup_errors = warm.ok, warm.errors
    result.baseline = baseline
    return result


PROFILE_RATE = 200  # samples a second: enough for the top entries, little load on the broker


def profile_file(profile_dir: Path, row: str) -> Path:
    return profile_dir / (re.sub(r"[^A-Za-z0-9]+", "-", row).strip("-").lower() + ".txt")


@contextlib.contextmanager
def profiled(row: str, pid: int | None, profile_dir: Path | None) -> Iterator[None]:
    """py-spy recording `pid` (collapsed stacks, one line per stack and its sample count) into
    profile_dir while the block runs; nothing without a directory."""
    if profile_dir is None or pid is None:
        yield
        return
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy; make setup installs it)")
    out = profile_file(profile_dir, row)
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(PROFILE_RATE),
                             "--nonblocking", "--output", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        try:
            _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            said = err.decode(errors="replace")[-300:]
            print(f"  py-spy wrote no profile for {row}: {said}", file=sys.stderr)


def profile_top(path: Path, n: int = 15) -> list[str]:
    """The functions of a collapsed-stack profile that took most samples: their own (self) and with
    what they called (total), in % of all samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not per line
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not samples:
        return [f"{path.name}: no samples"]
    def rows(top: list[tuple[str, int]]) -> list[str]:
        return [f"  {100 * own[f] / samples:5.1f} {100 * inclusive[f] / samples:6.1f}  {f}" for f, _ in top]

    return [f"{path.name}: {samples} samples. Most time in the function itself (self %, total %, function):",
            *rows(own.most_common(n)), "Most time in the function and what it calls:",
            *rows(inclusive.most_common(n))]


async def run_all(servers: Servers, s: Settings) -> list[PhaseResult]:
    """The plain broker per protocol, against its /healthz; then each period-layer broker over
    Connect protobuf. Each phase samples the CPU of the broker it loads."""
    run_id = uuid.uuid4().hex[:10]
    results: list[PhaseResult] = []
    auth = {"authorization": f"Bearer {AGENT_KEY}"}
    plain = servers.brokers[PLAIN]
    broker_url = plain.url
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)

    def loading(who: str) -> Settings:
        return replace(s, pids={"broker": servers.brokers[who].proc.pid, **s.pids})

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as http:
        # Baseline: the broker's trivial JSON route.
        def healthz(tag: str) -> Call:
            async def call(w: int, seq: int) -> None:
                r = await http.get(f"{broker_url}/healthz")
                if r.status_code != 200:
                    raise PurchaseFailed(f"HTTP {r.status_code}: {r.text[:120]}")
            return call

        results.append(await measure(BASELINE_HTTPX, healthz, loading(PLAIN), baseline=True))

        # Connect JSON over the same shared httpx client.
        def connect_json(tag: str) -> Call:
            prefix = f"json-{tag}"

            async def call(w: int, seq: int) -> None:
                body = {"sessionId": f"{run_id}-{prefix}-w{w}",
                        "idempotencyKey": f"{run_id}-{prefix}-{seq}", "uris": [ITEM_URI]}
                r = await http.post(f"{broker_url}{TRANSACT_PATH}", json=body,
                                    headers={**CONNECT_JSON, **auth})
                if r.status_code != 200:
                    raise PurchaseFailed(f"HTTP {r.status_code}: {r.text[:120]}")
                items: list[dict[str, Any]] = r.json().get("items", [])
                if len(items) != 1 or items[0].get("status") != "ITEM_STATUS_PURCHASED":
                    raise PurchaseFailed(f"items={items!r}"[:160])
            return call

        results.append(await measure("Connect JSON (httpx)", connect_json, loading(PLAIN)))

    # pyqwest: a second baseline (a Rust HTTP client, far cheaper per request than
    # httpx), and under the generated Connect client. Each on its own transport,
    # closed explicitly: the shared default one was seen to abort the process at exit.
    transport = HTTPTransport(timeout=REQUEST_TIMEOUT_S)
    try:
        raw = Client(transport)

        def healthz_pyqwest(tag: str) -> Call:
            async def call(w: int, seq: int) -> None:
                r = await raw.get(f"{broker_url}/healthz")
                if r.status != 200:
                    raise PurchaseFailed(f"HTTP {r.status}")
            return call

        results.append(await measure(BASELINE_PYQWEST, healthz_pyqwest, loading(PLAIN), baseline=True))
    finally:
        await transport.aclose()

    # The plain broker and each period-layer broker over Connect protobuf, in interleaved rounds
    # (plain, embedded, strict, lease, plain, ...) pooled per row: a ratio between rows is not at
    # the mercy of whatever else the machine did during one of them.
    pooled: dict[str, PhaseResult] = {}
    for round_ in range(s.rounds):
        for who, child in servers.brokers.items():
            label = CONNECT_PROTO if who == PLAIN else f"{CONNECT_PROTO}, {ROW_LABELS[who]}"
            async with connect_client(child.url) as client:
                def connect_proto(tag: str, client: BrokerServiceClient = client, who: str = who) -> Call:
                    async def call(w: int, seq: int) -> None:
                        request = transact_request(run_id, f"{who}-{tag}", w, seq)
                        check_purchase(await client.transact(request, headers=auth))
                    return call

                result = await measure(label, connect_proto, loading(who), round_=round_)
                pooled[label] = pooled[label].pooled(result) if label in pooled else result
    results.extend(pooled.values())

    # gRPC: the generated grpcio stub over one grpc.aio channel (HTTP/2).
    broker_port = int(broker_url.rsplit(":", 1)[1])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker_port}") as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        transact: grpc.aio.UnaryUnaryMultiCallable[bpb.TransactRequest, bpb.TransactResponse]
        transact = stub.Transact
        metadata = tuple(auth.items())

        def grpc_call(tag: str) -> Call:
            prefix = f"grpc-{tag}"

            async def call(w: int, seq: int) -> None:
                check_purchase(await transact(transact_request(run_id, prefix, w, seq),
                                              timeout=REQUEST_TIMEOUT_S, metadata=metadata))
            return call

        results.append(await measure("gRPC (grpc.aio)", grpc_call, loading(PLAIN)))
    # Baselines first, then the purchases, in the order they ran.
    return [r for r in results if r.baseline] + [r for r in results if not r.baseline]


# --- report ----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _other_cpu(r: PhaseResult, ours: list[str]) -> float | None:
    machine = r.cpu.get("machine")
    mine = [r.cpu.get(who) for who in ours]
    if machine is None or any(v is None for v in mine):
        return None
    return max(0.0, machine - sum(v for v in mine if v is not None))


def report(results: list[PhaseResult], s: Settings, exchange_charges: int | None) -> str:
    cpu_of = [who for who in s.pids if who != "machine"]
    machine = "machine" in s.pids
    header = ("row", "purchases/s", "p50 ms", "p99 ms", "requests", "errors", "broker CPU ms/req",
              *(f"{who} CPU" for who in cpu_of), *(["other CPU"] if machine else []))
    rows = [
        (r.name, f"{r.rate:.0f}", _ms(r.percentile_ms(50)), _ms(r.percentile_ms(99)),
         str(r.requests), str(r.error_count), _ms2(r.cpu_ms_per_request()),
         *(percent(r.cpu.get(who)) for who in cpu_of), *([percent(_other_cpu(r, cpu_of))] if machine else []))
        for r in results
    ]
    out = [
        f"ramp-broker purchases: concurrency {s.concurrency}, at most {s.seconds:g} s or "
        f"{s.max_requests} requests per protocol (after a {s.warmup_seconds:g} s / "
        f"{s.warmup_requests}-request warm-up)",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared by the load generator, the broker and the Exchange",
        "",
        *text_table(header, rows),
        "",
        "purchases/s counts successful purchases (baseline rows: /healthz answers) per second;",
        "latency percentiles are over successful calls; broker CPU ms/req is the CPU time of the",
        "broker the row loads, per successful request.",
    ]
    if cpu_of:
        out += textwrap.wrap(
            f"CPU columns: CPU time used during the measured phase, in % of one core of "
            f"{os.cpu_count()} (bench = this load generator, all its threads; other = everything "
            "else on the machine).", 100)
    baselines = [r for r in results if r.baseline and r.rate > 0]
    for base in baselines:
        bench_cpu = base.cpu.get("bench")
        if bench_cpu is not None and bench_cpu >= 85:
            out += ["", *textwrap.wrap(
                f"note: during '{base.name}' this load generator used {bench_cpu:.0f}% of a core "
                "(its event loop can use at most one): that row shows what the client can drive, "
                "a floor under the broker's ceiling rather than the ceiling itself.", 100)]
    protocols = [r for r in results if not r.baseline]
    if baselines and protocols:
        out += ["", "purchases/s relative to each baseline:", ""]
        out += text_table(
            ("protocol", *(f"vs {b.name.removeprefix('baseline: ')}" for b in baselines)),
            [(r.name, *(f"{r.rate / b.rate:.3f}x" for b in baselines)) for r in protocols],
        )
    ratios = summary(results)
    if ratios["rows"]:
        out += ["", "per purchase row: broker CPU per purchase / per /healthz request (target <= 3), and "
                "purchases/s / the plain broker's over Connect protobuf (target >= 0.8):", ""]
        out += text_table(("row", "CPU vs /healthz (pyqwest)", "CPU vs /healthz (httpx)", "rate vs plain"),
                          [(name, _x(v["cpu_vs_healthz"]), _x(v["cpu_vs_healthz_httpx"]),
                        _x(v["rate_vs_plain"])) for name, v in ratios["rows"].items()])
    errors = [(r.name, "", k, v) for r in results for k, v in r.errors.most_common(3)]
    errors += [(r.name, " (warm-up)", k, v)
               for r in results for k, v in r.warmup_errors.most_common(3)]
    if errors:
        out += ["", "errors (most common per row):"]
        out += [f"  {name}{when}: {count} x {kind}" for name, when, kind, count in errors]
    if exchange_charges is not None:
        bought = sum(r.ok + r.warmup_ok for r in protocols)
        out += ["", f"the Exchange recorded {exchange_charges} charges; the bench counted {bought} "
                    "successful purchases (warm-ups included)"]
    return "\n".join(out)


def _ms2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summary(results: list[PhaseResult]) -> dict[str, Any]:
    """Every ratio the issue's targets name, from this run's rows: broker CPU per purchase against
    its CPU per /healthz request, and each period-layer row's purchases/s against the plain broker's
    over the same protocol (Connect protobuf)."""
    by_name = {r.name: r for r in results}
    base = by_name.get(BASELINE_PYQWEST)
    base_httpx = by_name.get(BASELINE_HTTPX)
    plain = by_name.get(CONNECT_PROTO)
    rows = {}
    for r in results:
        if r.baseline:
            continue
        cpu = r.cpu_ms_per_request()
        rows[r.name] = {
            "cpu_vs_healthz": _ratio(cpu, base.cpu_ms_per_request() if base else None),
            "cpu_vs_healthz_httpx": _ratio(cpu, base_httpx.cpu_ms_per_request() if base_httpx else None),
            "rate_vs_plain": (_ratio(r.rate, plain.rate)
                              if plain and r.name.startswith(CONNECT_PROTO) else None),
        }
    return {"row": "summary", "rows": rows}


def json_rows(results: list[PhaseResult]) -> list[dict[str, Any]]:
    """One object per measured row, then the summary (bench/README.md documents the fields)."""
    out: list[dict[str, Any]] = [{
        "row": r.name,
        "baseline": r.baseline,
        "purchases_per_s": round(r.rate, 1),
        "p50_ms": _rounded(r.percentile_ms(50), 2),
        "p99_ms": _rounded(r.percentile_ms(99), 2),
        "broker_cpu_ms_per_request": _rounded(r.cpu_ms_per_request()),
        "requests": r.requests,
        "errors": r.error_count,
        "cpu_pct": {who: _rounded(v, 1) for who, v in r.cpu.items()},
        "top_errors": dict(r.errors.most_common(3)),
    } for r in results]
    return [*out, summary(results)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.purchases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="time limit per protocol (default 5)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="concurrent workers (default 16)")
    parser.add_argument("--requests", type=int, default=20000,
                        help="request limit per protocol (default 20000)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per row on stdout, then a summary")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy each purchase row's broker into DIR/<row>.txt (collapsed stacks) and "
                             "print the top functions of each")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="asyncio",
                        help="the brokers' event_loop setting (asyncio, the broker's default)")
    parser.add_argument("--no-quote-reuse", action="store_true",
                        help="the brokers' quotes.reuse off: every purchase discovers first")
    parser.add_argument("--skip-period", action="store_true",
                        help="only the plain broker (no redis-server, no period-layer rows)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the Connect protobuf rows (plain and period layer), interleaved and "
                             "pooled per row (default 3; each round --seconds per row)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.requests < 1 or args.rounds < 1:
        parser.error("--seconds must be positive, --concurrency, --requests and --rounds at least 1")
    s = Settings(
        seconds=args.seconds, concurrency=args.concurrency, max_requests=args.requests,
        warmup_seconds=min(1.0, args.seconds / 5),
        warmup_requests=min(args.requests, 10 * args.concurrency), profile_dir=args.profile,
        rounds=args.rounds,
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    # Loopback only: never through a proxy from the environment (httpx, pyqwest, grpcio
    # and the broker's own Exchange client all honour NO_PROXY).
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))
    print("starting the reference Exchange and the broker ...", file=sys.stderr, flush=True)
    try:
        with running_servers(not args.skip_period, args.event_loop, not args.no_quote_reuse) as servers:
            s.pids = {"exchange": servers.exchange.proc.pid, "bench": None, "machine": MACHINE,
                      **({"redis": servers.redis_pid} if servers.redis_pid is not None else {})}
            results = asyncio.run(run_all(servers, s))
            charges = exchange_charges(servers.exchange.url)
    except TimeoutError:
        print(f"bench: a phase ran {PHASE_GRACE_S:g} s past --seconds and was abandoned",
              file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for row in json_rows(results):
            print(json.dumps(row))
    else:
        print(report(results, s, charges))
    if args.profile is not None:
        tops = [line for r in results if not r.baseline and profile_file(args.profile, r.name).exists()
                for line in ["", *profile_top(profile_file(args.profile, r.name))]]
        print("\n".join(tops), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
