"""Predictive pacing from outside: how closely paced budgets follow their even curve.

    python -m bench.pacing [--json] [--multiples 2 4 10] [--rate 0.05] [--half-life 3]

The reference Exchange and two brokers (`ramp-broker serve`, one embedded SQLite store shared by
both) run as processes on free loopback ports. Every scope has a limit per 60 s window (windows
are aligned to the Unix epoch), --rate USD a second of it: one paced scope (`pacing: even`,
strict mode, on the first broker) per demand multiple, an unpaced `control` at the first
multiple, and a paced `lease` scope (`mode: lease`, twice the limit) at 4x shared by both brokers
(each offered half). The run waits for the next window and offers each scope purchases of 0.01 USD, open loop
(on schedule, whatever is outstanding, at most MAX_IN_FLIGHT at once), at its multiple of the
even rate (limit / window), until the window ends; it scrapes every broker's
`broker_pacing_admission_probability` every SCRAPE_EVERY_S. forecast.half_life_seconds is
--half-life: the pacer's band G is that many seconds of the even rate, at most 2% of the limit.

A row per scope:

  multiple        offered spend / the even rate, as measured (attempts sent x price)
  exhausted_at    when the first purchase was refused for want of budget
                  (`period_budget_exhausted`), as a share of the run; null: never
  max_deviation   the largest |spent - the even line from (start, 0) to (window end, limit)|,
                  at every answer, as a share of the limit (and `max_deviation_usd`)
  gauge_error     the largest |mean scraped gauge - the share admitted| / the share admitted,
                  over each 10 s of steady demand (from 10 s on, until the budget ran out), per
                  broker (null for the control and where no 10 s qualified)

Nothing here asserts: it measures and prints. tests/test_pacing_processes.py drives the same
loads (drive(), below) and checks the targets of issue 23.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from connectrpc.errors import ConnectError

from bench.common import (
    ITEM_PRICE,
    ITEM_URI,
    Child,
    bench_broker,
    bench_catalog,
    connect_client,
    cpu_seconds,
    free_port,
    listen_port,
    start_child,
    stop_child,
    wait_healthy,
)
from ramp.broker.v1 import broker_pb2 as bpb

PERIOD_S = 60
MAX_IN_FLIGHT = 256
SCRAPE_EVERY_S = 0.25
REQUEST_TIMEOUT_S = 10.0
LATE_S = 0.05  # a purchase due this close to the window's end and not yet sent is dropped
ACCOUNT = "pacing"
GAUGE = re.compile(r'^broker_pacing_admission_probability\{([^}]*)\} (\S+)$', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def agent_key(scope: str) -> str:
    return f"pacing-agent-{scope}"


def scopes_config(limits: dict[str, Decimal], scopes: dict[str, dict[str, Any]], state: Path, name: str,
                  half_life_s: float) -> dict[str, Any]:
    """A broker's config for paced loads: each scope its limit (USD) per PERIOD_S window and its own
    rule (pacing, mode), an agent per scope (key agent_key(scope)), the store in `state`, shared by
    every broker given the same `state`; `name` keeps each broker's own files apart."""
    return {
        "forecast": {"half_life_seconds": half_life_s},
        "metrics": {"export_scopes": list(scopes)},
        "agents": [{"id": f"agent-{scope.replace(':', '-')}",
                    "key_sha256": hashlib.sha256(agent_key(scope).encode()).hexdigest(),
                    "account": ACCOUNT, "charged_to": [scope]} for scope in scopes],
        "period_budgets": {
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / f"journal-{name}.jsonl"),
            "memory_path": str(state / f"memory-{name}.json"),
            "leases": {"refresh_seconds": 1, "journal_path": str(state / f"leases-{name}.jsonl")},
            "accounts": {ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": f"{PERIOD_S}s", "amount": str(limits[scope]),
                                    "currency": "USD"}], **rule} for scope, rule in scopes.items()}}},
        },
    }


def next_window(now: float, min_left_s: float) -> tuple[float, float]:
    """(start, end) in Unix seconds: from `now` to the end of its window if at least `min_left_s`
    are left of it, else the whole next window."""
    end = (int(now) // PERIOD_S + 1) * PERIOD_S
    if end - now >= min_left_s:
        return now, float(end)
    return float(end), float(end + PERIOD_S)


# --- the load and what came of it -------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """Purchases offered to one scope: (from second, multiple of the even rate) pieces, sent to the
    brokers in turn."""

    scope: str
    brokers: tuple[str, ...]
    pieces: tuple[tuple[float, float], ...]


@dataclass
class Attempt:
    sent: float  # seconds into the run
    done: float
    broker: int
    status: str  # "ok", a Denial reason, or "error: ..."
    retry_at: float | None = None  # seconds into the run
    message: str = ""


@dataclass
class Run:
    start: float  # Unix seconds
    end: float  # seconds into the run: the window's end
    limits: dict[str, Decimal]  # per scope
    price: Decimal
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    gauges: list[tuple[float, int, str, float]] = field(default_factory=list)  # t, broker, scope, value

    def even(self, scope: str) -> Decimal:
        """USD a second: the scope's limit spread evenly over the run."""
        return self.limits[scope] / Decimal(str(self.end))

    def spend(self, scope: str) -> list[tuple[float, Decimal]]:
        """(t, spent) at every answer, in the order answered: spent counts the purchases answered by t."""
        spent, out = Decimal(0), []
        for a in sorted(self.attempts[scope], key=lambda a: a.done):
            spent += self.price if a.status == "ok" else 0
            out.append((a.done, spent))
        return out

    def deviation(self, scope: str, until: float | None = None) -> Decimal:
        """The largest |spent - the even line from (0, 0) to (end, limit)| at any answer until `until`."""
        even = self.even(scope)
        return max((abs(s - even * Decimal(str(min(t, self.end)))) for t, s in self.spend(scope)
                    if until is None or t <= until), default=Decimal(0))

    def multiple(self, scope: str, since: float = 0, until: float | None = None) -> float:
        """Offered spend a second over the even rate, as sent."""
        until = self.end if until is None else until
        sent = sum(1 for a in self.attempts[scope] if since <= a.sent < until)
        return float(sent * self.price / Decimal(str(until - since)) / self.even(scope))

    def exhausted_at(self, scope: str) -> float | None:
        """When the first purchase was refused for want of budget, as a share of the run."""
        times = [a.sent for a in self.attempts[scope] if a.status == "period_budget_exhausted"]
        return min(times) / self.end if times else None

    def gauge_errors(self, scope: str, broker: int, every: float = 10.0) -> list[tuple[float, float, float]]:
        """(from, mean scraped gauge, share admitted) per `every` seconds at steady demand: from
        `every` on (the first seconds spend the window's allowance), until the budget ran out."""
        exhausted = self.exhausted_at(scope)
        stop = self.end if exhausted is None else exhausted * self.end
        out = []
        start = every
        while start + every <= stop:
            until = start + every
            sent = [a for a in self.attempts[scope] if a.broker == broker and start <= a.sent < until]
            shown = [v for t, b, s, v in self.gauges if b == broker and s == scope and start <= t < until]
            if sent and shown:
                share = sum(a.status == "ok" for a in sent) / len(sent)
                out.append((start, sum(shown) / len(shown), share))
            start += every
        return out


async def drive(loads: Sequence[Load], run: Run, metrics: Sequence[str]) -> None:
    """Offer every load's purchases on schedule from run.start to the window's end (Connect protobuf,
    the generated client over pyqwest: the load generator's CPU per call is a fraction of httpx's),
    recording each answer in `run`, and scrape the gauge of every broker (`metrics`: /metrics URLs)."""
    loop = asyncio.get_running_loop()
    mono0 = loop.time() + (run.start - time.time())
    schedule = sorted((t, load.scope, n, load) for load in loads for n, t in enumerate(
        offer_times(load.pieces, run.even(load.scope), run.price, run.end)))
    for load in loads:
        run.attempts.setdefault(load.scope, [])
    tag = uuid.uuid4().hex[:8]
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    done = asyncio.Event()
    urls = sorted({url for load in loads for url in load.brokers})
    async with contextlib.AsyncExitStack() as stack:
        clients = {url: await stack.enter_async_context(connect_client(url)) for url in urls}
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False))

        async def buy(load: Load, n: int) -> None:
            which = n % len(load.brokers)
            sent = loop.time() - mono0
            try:
                if sent >= run.end - LATE_S:
                    return  # too late for this window (an overloaded machine): not sent
                request = bpb.TransactRequest(session_id=f"s-{load.scope}", uris=[ITEM_URI],
                                              idempotency_key=f"{tag}-{load.scope}-{n}")
                headers = {"authorization": f"Bearer {agent_key(load.scope)}"}
                try:
                    answer = await clients[load.brokers[which]].transact(request, headers=headers)
                    attempt = bought(answer, load.scope, sent, loop.time() - mono0, which, run)
                except ConnectError as exc:
                    attempt = refused(exc, sent, loop.time() - mono0, which, run)
            finally:
                gate.release()
            run.attempts[load.scope].append(attempt)

        async def scrape() -> None:
            while not done.is_set():
                for i, url in enumerate(metrics):
                    with contextlib.suppress(httpx.HTTPError):
                        text = (await http.get(url)).text
                        t = loop.time() - mono0
                        for labels, value in GAUGE.findall(text):
                            run.gauges.append((t, i, dict(LABEL.findall(labels))["scope"], float(value)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), SCRAPE_EVERY_S)

        await asyncio.sleep(max(0.0, mono0 - loop.time()))
        scraper = asyncio.create_task(scrape())
        tasks: list[asyncio.Task[None]] = []
        for t, _, n, load in schedule:
            await asyncio.sleep(max(0.0, mono0 + t - loop.time()))
            await gate.acquire()
            tasks.append(asyncio.create_task(buy(load, n)))
        await asyncio.gather(*tasks)
        done.set()
        await scraper


def offer_times(pieces: Sequence[tuple[float, float]], even: Decimal, price: Decimal,
                end: float) -> list[float]:
    """Seconds into the run at which a load offers its purchases, evenly spaced per piece, in whole
    microseconds (a clock's resolution: a simulated clock set to them does not drift)."""
    out: list[float] = []
    us = 0
    for i, (start, multiple) in enumerate(pieces):
        stop = (pieces[i + 1][0] if i + 1 < len(pieces) else end) * 1_000_000
        gap = int(price / (even * Decimal(str(multiple))) * 1_000_000)
        us = max(us, int(start * 1_000_000))
        while (us := us + gap) < stop:
            out.append(us / 1_000_000)
    return out


def bought(answer: bpb.TransactResponse, scope: str, sent: float, done: float, broker: int,
           run: Run) -> Attempt:
    """"ok": bought in the run's window ("late": the broker bought in the next one)."""
    ends = [b.period_end.ToDatetime(tzinfo=UTC).timestamp() - run.start for b in answer.budgets
            if b.scope == scope and b.HasField("period_end")]
    late = not any(abs(end - run.end) < 0.001 for end in ends)
    return Attempt(sent, done, broker, "late" if late else "ok")


def refused(exc: ConnectError, sent: float, done: float, broker: int, run: Run) -> Attempt:
    """The Denial's reason, retryAt and the message; "error: CODE" for anything but a denial."""
    for detail in exc.details:
        if detail.type_name == "ramp.broker.v1.Denial":
            denial = bpb.Denial.FromString(detail.message_bytes)
            retry_at = (denial.retry_at.ToDatetime(tzinfo=UTC).timestamp() - run.start
                        if denial.HasField("retry_at") else None)
            return Attempt(sent, done, broker, denial.reason, retry_at, exc.message)
    return Attempt(sent, done, broker, f"error: {exc.code.name}")


# --- the bench ----------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(workdir: Path, limits: dict[str, Decimal], scopes: dict[str, dict[str, Any]], half_life_s: float,
            brokers: int = 2) -> Iterator[tuple[Child, list[Child], list[str]]]:
    """The Exchange and `brokers` brokers on one store; yields them and the brokers' /metrics URLs."""
    xport = free_port()
    catalog = bench_catalog(xport)
    (workdir / "exchange.json").write_text(json.dumps(catalog))
    exchange = start_child("exchange", ["exchange", "--catalog", str(workdir / "exchange.json")], workdir,
                           xport)
    started: list[Child] = []
    try:
        wait_healthy(exchange)
        urls = []
        for i in range(brokers):
            base, paced = bench_broker(xport), scopes_config(limits, scopes, workdir, str(i + 1), half_life_s)
            config = {**base, **paced, "metrics": {**base["metrics"], **paced["metrics"]}}
            path = workdir / f"broker-{i + 1}.json"
            path.write_text(json.dumps(config))
            child = start_child(f"broker-{i + 1}", ["serve", "--config", str(path)], workdir,
                                listen_port(config))
            started.append(child)
            wait_healthy(child)
            urls.append(f"http://{config['metrics']['listen']}/metrics")
        yield exchange, started, urls
    finally:
        for child in [*started, exchange]:
            stop_child(child)


def rows(run: Run, scopes: dict[str, float], brokers: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for scope, nominal in scopes.items():
        errors = [abs(shown - share) / share for b in range(brokers[scope])
                  for _, shown, share in run.gauge_errors(scope, b) if share > 0]
        deviation = run.deviation(scope)
        exhausted = run.exhausted_at(scope)
        out.append({
            "row": f"pacing {scope}", "scope": scope, "nominal_multiple": nominal,
            "multiple": round(run.multiple(scope), 2),
            "exhausted_at": None if exhausted is None else round(exhausted, 3),
            "max_deviation": round(float(deviation / run.limits[scope]), 4),
            "max_deviation_usd": str(deviation.quantize(Decimal("0.01"))),
            "gauge_error": round(max(errors), 3) if errors and scope != "team:control" else None,
            "purchases": sum(a.status == "ok" for a in run.attempts[scope]),
            "attempts": len(run.attempts[scope]),
            "errors": sum(a.status.startswith("error") for a in run.attempts[scope]),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pacing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2.0, 4.0, 10.0],
                        help="demand, as multiples of the even rate: a paced scope each (default 2 4 10)")
    parser.add_argument("--rate", type=Decimal, default=Decimal("0.05"),
                        help="each scope's even rate, USD a second (default 0.05: 5 purchases a second)")
    parser.add_argument("--half-life", type=float, default=3.0,
                        help="forecast.half_life_seconds (default 3)")
    args = parser.parse_args(argv)
    if not args.multiples or min(args.multiples) <= 0 or args.rate <= 0 or args.half_life <= 0:
        parser.error("--multiples, --rate and --half-life must be positive")
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))
    price = Decimal(ITEM_PRICE)
    limit = args.rate * PERIOD_S
    paced = {f"team:x{m:g}": m for m in args.multiples}
    nominal = {**paced, "team:control": args.multiples[0], "team:lease": 4.0}
    rules: dict[str, dict[str, Any]] = {**{s: {"pacing": "even"} for s in paced}, "team:control": {},
                                        "team:lease": {"pacing": "even", "mode": "lease"}}
    # Twice the limit for the scope 2 brokers share: each admits as many purchases as a strict scope.
    limits = {scope: 2 * limit if scope == "team:lease" else limit for scope in nominal}
    with tempfile.TemporaryDirectory(prefix="bench-pacing-") as tmp:
        workdir = Path(tmp)
        print("starting the reference Exchange and 2 brokers ...", file=sys.stderr, flush=True)
        try:
            with servers(workdir, limits, rules, args.half_life) as (exchange, brokers, metrics):
                urls = [c.url for c in brokers]
                start, end = next_window(time.time(), PERIOD_S)
                print(f"waiting {start - time.time():.0f} s for the next {PERIOD_S} s window, then "
                      f"{end - start:.0f} s of load ...", file=sys.stderr, flush=True)
                run = Run(start, end - start, limits, price)
                loads = [Load(scope, tuple(urls) if scope == "team:lease" else (urls[0],), ((0.0, m),))
                         for scope, m in nominal.items()]
                pids = {c.name: c.proc.pid for c in [exchange, *brokers]} | {"bench": None}
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                asyncio.run(drive(loads, run, metrics))
                cpu = {name: _used(before[name], cpu_seconds(pid)) for name, pid in pids.items()}
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    table = rows(run, nominal, {scope: 2 if scope == "team:lease" else 1 for scope in nominal})
    if args.json:
        for row in table:
            print(json.dumps(row))
        print(json.dumps({"row": "cpu", "seconds": run.end, "cpu_s": cpu}))
        return 0
    print(f"pacing: {PERIOD_S} s window, {limit} USD a scope ({args.rate}/s even; team:lease twice that), "
          f"purchases of {price} USD, "
          f"forecast.half_life_seconds {args.half_life:g}")
    header = ("scope", "multiple", "ran out at", "max deviation", "gauge error", "purchases/attempts")
    lines = [(r["scope"], f"{r['multiple']:.2f}x",
              "never" if r["exhausted_at"] is None else f"{r['exhausted_at']:.1%}",
              f"{r['max_deviation']:.1%} ({r['max_deviation_usd']} USD)",
              "-" if r["gauge_error"] is None else f"{r['gauge_error']:.1%}",
              f"{r['purchases']}/{r['attempts']}") for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))
    print("CPU seconds over the run's", f"{run.end:.0f} s:",
          ", ".join(f"{name} {'?' if used is None else f'{used:.1f}'}" for name, used in cpu.items()))
    return 0


def _used(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


if __name__ == "__main__":
    sys.exit(main())
