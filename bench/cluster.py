"""The Redis store on one server against a Redis Cluster, and what waiting for a replica costs.

    python -m bench.cluster [--ops N] [--seconds T] [--accounts N] [--concurrency N] [--json]

Everything runs on 127.0.0.1 in temporary directories: one redis-server (bench.common's: no
persistence), then a cluster of 3 primaries and 3 replicas (tests/redis_cluster.py: AOF with
appendfsync everysec, one replica per primary). One process drives each: `--concurrency` asyncio
tasks share one store (as a broker's purchases would), task w on account w % --accounts; each
operation reserves on 3 counters (user / team / org) and commits 1 ledger line per counter
(bench.common.store_phase, as in bench.budget). Rows:

1. one server, RedisStore;
2. the cluster, RedisClusterStore, the same account names: they hash to slots of all 3 primaries
   (the row says how many on each);
3. the same with wait_replicas: 1, the durability option (each write is followed by WAIT 1 on its
   connection: it counts once the primary's replica has it);
4. the cluster with every account on one primary (what the cluster gives accounts that share a
   primary: the same as one server, plus the cluster client's routing).

Each row: a warm-up (not counted), then at most --ops operations or --seconds. CPU is % of one
core (redis: the server, or all 6 cluster nodes; bench: this process; other: the rest of the
machine). Nothing asserts on timings: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

from bench.common import (
    MACHINE,
    PHASE_GRACE_S,
    STORE_PREFIX,
    BenchFailed,
    StorePhase,
    account_names,
    percent,
    redis_server,
    store_phase,
    text_table,
)
from budget.stores.contract import StoreUnavailable
from budget.stores.redis import RedisStore
from budget.stores.redis_cluster import RedisClusterStore
from tests.redis_cluster import RedisCluster, redis_cluster

WARMUP_S = 1.0
PLAIN = "cluster, 3 primaries"
DURABLE = "cluster, 3 primaries, wait_replicas 1"
TIMEOUT_MS = 2000  # generous: the tasks queue behind each other on a small machine


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    accounts: str  # how the accounts spread over the primaries
    phase: StorePhase

    def as_dict(self) -> dict[str, Any]:
        r = self.phase.result
        cpu = {k: None if v is None else round(v, 1) for k, v in r.cpu.items()}
        return {"row": self.name, "accounts": self.accounts, "ops_per_s": round(r.rate, 1),
                "p50_ms": _ms(r.latencies, 50), "p99_ms": _ms(r.latencies, 99), "ops": r.ok,
                "errors": r.error_count, "top_errors": dict(r.errors.most_common(3)), "cpu_pct": cpu}


def _ms(latencies: list[float], p: int) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return round(1000 * ordered[min(len(ordered) - 1, len(ordered) * p // 100)], 2)


def slot(account: str) -> int:
    return int(key_slot(f"{STORE_PREFIX}:{{{account}}}:id".encode()))


def spread(cluster: RedisCluster, names: list[str]) -> str:
    """How many of `names` each primary serves, e.g. "3+3+2"."""
    per: dict[int, int] = {}
    for name in names:
        port = cluster.primary_of(slot(name)).port
        per[port] = per.get(port, 0) + 1
    return "+".join(str(n) for n in sorted(per.values(), reverse=True))


def on_one_primary(cluster: RedisCluster, count: int) -> list[str]:
    """`count` account names served by one primary (the first name's)."""
    home = cluster.primary_of(slot(account_names(2)[0])).port
    names = [n for n in (f"one-{i}" for i in range(50 * count)) if cluster.primary_of(slot(n)).port == home]
    if len(names) < count:
        raise BenchFailed(f"found {len(names)} account names on one primary, not {count}")
    return names[:count]


async def measure(
    name: str, open_store: Callable[[], Awaitable[RedisStore]], names: list[str], spread_text: str,
    a: argparse.Namespace, pids: dict[str, int | None],
) -> Row:
    print(f"  {name} ...", file=sys.stderr, flush=True)
    store = await open_store()
    try:
        await store_phase(store, None, "warm", commit=True, concurrency=a.concurrency, ops=a.ops,
                          seconds=WARMUP_S, pids={}, warm=True, names=names)
        phase = await store_phase(store, None, name, commit=True, concurrency=a.concurrency, ops=a.ops,
                                  seconds=a.seconds, pids=pids, names=names)
    finally:
        await store.close()
    return Row(name, spread_text, phase)


async def single_rows(url: str, pid: int, a: argparse.Namespace) -> list[Row]:
    names = account_names(a.accounts)
    pids: dict[str, int | None] = {"redis": pid, "bench": None, "machine": MACHINE}
    def opener() -> Awaitable[RedisStore]:
        return RedisStore.open(url, timeout_ms=TIMEOUT_MS, prefix=STORE_PREFIX)

    return [await measure("one server", opener, names, "all on 1", a, pids)]


async def cluster_rows(cluster: RedisCluster, a: argparse.Namespace) -> list[Row]:
    pids: dict[str, int | None] = {f"redis {n.port}": n.proc.pid if n.proc else None for n in cluster.nodes}
    pids.update({"bench": None, "machine": MACHINE})
    names, one = account_names(a.accounts), on_one_primary(cluster, a.accounts)

    def opener(wait: int) -> Callable[[], Awaitable[RedisStore]]:
        return lambda: RedisClusterStore.open_cluster(
            cluster.urls, timeout_ms=TIMEOUT_MS, prefix=STORE_PREFIX, wait_replicas=wait)

    spread_text = spread(cluster, names)
    return [
        await measure(PLAIN, opener(0), names, spread_text, a, pids),
        await measure(DURABLE, opener(1), names, spread_text, a, pids),
        await measure("cluster, accounts on one primary", opener(0), one, f"{len(one)} on 1", a, pids),
    ]


def report(rows: list[Row], a: argparse.Namespace) -> list[str]:
    header = ("store", "accounts per primary", "ops/s", "p50 ms", "p99 ms", "ops", "errors", "redis CPU",
              "bench CPU", "other CPU")
    lines: list[tuple[str, ...]] = []
    for row in rows:
        r, d = row.phase.result, row.as_dict()
        redis_cpu = [v for k, v in r.cpu.items() if k.startswith("redis") and v is not None]
        other = None
        if r.cpu.get("machine") is not None and r.cpu.get("bench") is not None:
            other = max(0.0, (r.cpu["machine"] or 0) - sum(redis_cpu) - (r.cpu["bench"] or 0))
        lines.append((row.name, row.accounts, f"{r.rate:.0f}", str(d["p50_ms"]), str(d["p99_ms"]),
                      str(r.ok), str(r.error_count), percent(sum(redis_cpu) if redis_cpu else None),
                      percent(r.cpu.get("bench")), percent(other)))
    out = text_table(header, lines)
    by = {row.name: row.phase.result.rate for row in rows}
    base, plain, durable = by.get("one server"), by.get(PLAIN), by.get(DURABLE)
    out += ["", f"ops: reserve (3 counters) + commit (3 ledger lines), {a.concurrency} tasks, "
            f"{a.accounts} accounts; at most {a.ops} ops or {a.seconds:g} s per row"]
    if base and plain:
        out.append(f"cluster / one server: {plain / base:.2f}")
    if plain and durable:
        out.append(f"wait_replicas 1 / cluster: {durable / plain:.2f} (the durability option's cost: "
                   f"{100 * (1 - durable / plain):.0f}% of the throughput)")
    for row in rows:
        if row.phase.result.errors:
            out.append(f"{row.name}: errors {dict(row.phase.result.errors.most_common(3))}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64, help="store tasks (64)")
    parser.add_argument("--accounts", type=int, default=9, help="accounts the tasks spread over (9)")
    parser.add_argument("--ops", type=int, default=20000, help="operations per row at most (20000)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time limit per row (8)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    a = parser.parse_args(argv)
    if min(a.concurrency, a.accounts, a.ops) < 1 or a.seconds <= 0:
        parser.error("counts must be at least 1 and --seconds positive")
    rows: list[Row] = []
    try:
        print("one redis-server ...", file=sys.stderr, flush=True)
        with redis_server() as server:
            rows += asyncio.run(single_rows(server.url, server.proc.pid, a))
        print("a cluster of 3 primaries + 3 replicas ...", file=sys.stderr, flush=True)
        with redis_cluster() as cluster:
            rows += asyncio.run(cluster_rows(cluster, a))
    except TimeoutError:
        print(f"bench: a row ran {PHASE_GRACE_S:g} s past its time limit and was abandoned", file=sys.stderr)
        return 1
    except (RuntimeError, BenchFailed, StoreUnavailable) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if a.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
        return 0
    print(f"ramp-broker store on Redis Cluster: python {platform.python_version()}, {os.cpu_count()} CPUs "
          "shared by everything below\n")
    print("\n".join(report(rows, a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
