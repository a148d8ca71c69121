"""What each budget layer costs the broker per purchase, without the HTTP server around it.

    python -m bench.layers [--purchases N] [--rounds R] [--no-sync] [--json]

The brokers of bench.purchases (plain; the period layer's 3 scopes on the embedded store, on
Redis strict and on Redis lease), built in this process with build_broker and driven through
Purchaser.transact by C concurrent tasks: no agent hop, no Connect or HTTP/1.1 on the broker's
side, so the one number left, the event loop thread's CPU time per purchase (user + system:
the journal's fsync included), moves only with the purchase path itself. The reference
Exchange is a separate process on a loopback port and Redis a private redis-server, as in
bench.purchases; both are asked exactly as a served broker asks them.

Rounds are interleaved (plain, embedded, strict, lease, plain, ...); each row prints its
lowest and median round and the median's difference from plain: what the layer adds. Run to
run, the lease row moved by about ±30 µs with its fsyncs; `--no-sync` turns the journals'
fdatasync into a no-op (measuring code, not the disk: never a setting of the broker).

Nothing here asserts on timings: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import budget.durability.journal
from bench.common import (
    AGENT_KEY,
    PERIOD_BROKERS,
    PLAIN,
    bench_catalog,
    broker_config,
    check_purchase,
    free_port,
    period_stores,
    redis_server,
    start_child,
    stop_child,
    transact_request,
    wait_healthy,
)
from broker.app import Broker, build_broker
from broker.config import load_broker_config
from broker.operator.cli import _settle_heap
from broker.purchase.agents import Agent
from broker.rpc.auth import Authenticator

WARMUP = 300
ROWS = (PLAIN, *PERIOD_BROKERS)


@dataclass
class Row:
    name: str
    cpu_us: list[float]  # per round: the loop thread's CPU per purchase
    wall_us: list[float]
    journal_writes: float  # per purchase, over every round
    errors: Counter[str] = field(default_factory=Counter)

    def line(self, plain: float | None) -> dict[str, Any]:
        med = statistics.median(self.cpu_us)
        return {"row": self.name, "cpu_us_min": round(min(self.cpu_us), 1), "cpu_us_median": round(med, 1),
                "wall_us_median": round(statistics.median(self.wall_us), 1),
                "adds_us": None if plain is None else round(med - plain, 1),
                "journal_writes_per_purchase": round(self.journal_writes, 3),
                "errors": sum(self.errors.values()), "top_errors": dict(self.errors.most_common(3))}


class _Writes:
    """Counts the journals' writes (one fsync each)."""

    def __init__(self) -> None:
        self.count = 0
        original = budget.durability.journal.Journal._write

        def counted(journal: budget.durability.journal.Journal, lines: list[bytes], truncate: bool) -> None:
            self.count += 1
            original(journal, lines, truncate)

        budget.durability.journal.Journal._write = counted  # type: ignore[method-assign,assignment]


async def _drive(
    broker: Broker, agent: Agent, tag: str, n: int, concurrency: int, errors: Counter[str],
) -> tuple[float, float]:
    """n purchases by `concurrency` tasks: (CPU µs, wall µs) per purchase; failures into `errors`."""
    purchaser = broker.purchaser
    assert purchaser is not None
    started = [0]

    async def worker(w: int) -> None:
        while started[0] < n:
            started[0] += 1
            try:
                answer = await purchaser.transact(transact_request("layers", tag, w, started[0]), agent)
                check_purchase(answer)
            except Exception as exc:  # counted and shown, as bench.purchases does
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

    gc.collect()
    cpu, wall = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return (time.thread_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def _run(workdir: Path, xport: int, redis_url: str, args: argparse.Namespace) -> list[Row]:
    stores = period_stores(workdir, redis_url)
    brokers: dict[str, tuple[Broker, Agent]] = {}
    writes = _Writes()
    try:
        for name in ROWS:
            kind, mode = PERIOD_BROKERS.get(name, (None, "strict"))
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(broker_config(
                workdir, xport, name, stores[kind] if kind else None, mode)), encoding="utf-8")
            config = load_broker_config(path)
            broker = await build_broker(config)
            agent = Authenticator(config.agents).identify({"authorization": f"Bearer {AGENT_KEY}"})
            brokers[name] = broker, agent
            broker.start()
        _settle_heap()  # as a served broker does: a full collection walks only what came since
        rows = {name: Row(name, [], [], 0.0) for name in ROWS}
        for name, (broker, agent) in brokers.items():
            await _drive(broker, agent, f"warm-{name}", WARMUP, args.concurrency, Counter())
        for r in range(args.rounds):
            for name, (broker, agent) in brokers.items():
                before = writes.count
                cpu, wall = await _drive(broker, agent, f"r{r}-{name}", args.purchases, args.concurrency,
                                         rows[name].errors)
                rows[name].cpu_us.append(cpu)
                rows[name].wall_us.append(wall)
                rows[name].journal_writes += (writes.count - before) / (args.purchases * args.rounds)
        return list(rows.values())
    finally:
        for broker, _ in brokers.values():
            await broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=2000, help="per row and round (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--concurrency", type=int, default=16, help="purchases in flight (16)")
    parser.add_argument("--no-sync", action="store_true", help="the journals' fdatasync a no-op")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    if args.no_sync:
        budget.durability.journal.sync_data = lambda fd: None  # type: ignore[attr-defined]  # code, not the disk
    with tempfile.TemporaryDirectory(prefix="ramp-bench-layers-") as tmp, redis_server() as redis:
        workdir = Path(tmp)
        xport = free_port()
        catalog = workdir / "catalog.yaml"
        catalog.write_text(yaml.safe_dump(bench_catalog(xport)), encoding="utf-8")
        exchange = start_child("exchange", ["exchange", "--catalog", str(catalog)], workdir, xport)
        try:
            wait_healthy(exchange)
            rows = asyncio.run(_run(workdir, xport, redis.url, args))
        finally:
            stop_child(exchange)
    plain = statistics.median(rows[0].cpu_us)
    lines = [r.line(None if r.name == PLAIN else plain) for r in rows]
    if args.json:
        for line in lines:
            print(json.dumps(line))
        return 0
    print(f"broker CPU per purchase in process (no HTTP server), {args.rounds} rounds of {args.purchases}, "
          f"{args.concurrency} in flight{', fsync off' if args.no_sync else ''}:")
    print(f"{'row':14s} {'min µs':>8s} {'median µs':>10s} {'adds µs':>8s} {'wall µs':>8s} "
          f"{'fsyncs/purchase':>16s} {'errors':>7s}")
    for line in lines:
        adds = "-" if line["adds_us"] is None else f"{line['adds_us']:.1f}"
        print(f"{line['row']:14s} {line['cpu_us_min']:8.1f} {line['cpu_us_median']:10.1f} {adds:>8s} "
              f"{line['wall_us_median']:8.1f} {line['journal_writes_per_purchase']:16.3f} "
              f"{line['errors']:7d}")
    for line in lines:
        for text, count in line["top_errors"].items():
            print(f"  {line['row']}: {count} x {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
