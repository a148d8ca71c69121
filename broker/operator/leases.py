"""`ramp-broker leases ...`: brokers' pre-debited leases, straight from the store.

A broker that dies leaves its leases counted (fail closed): they come back when it
restarts and reports its journal. One that will not come back is released by an
operator: given back (`release`), or, when its journal is lost and it may have
spent from them, counted as spent (`release --as-spent`, ledger kind
"lease-expired"). Exit codes: 0 done, 1 nothing to release, 2 a usage or
configuration problem.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from broker.config import load_broker_config
from budget.periods import to_ms
from currency.money import Money


def add_command(sub: Any) -> None:
    leases = sub.add_parser(
        "leases", help="brokers' pre-debited leases: list them, or release a dead broker's",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    commands = leases.add_subparsers(dest="leases_command", required=True, metavar="COMMAND")
    ls = commands.add_parser("list", help="every broker's leases, per account")
    ls.add_argument("--config", help="broker.yaml (its period_budgets.store is the store)")
    rel = commands.add_parser("release", help="end a broker's leases: give them back, or count them spent")
    rel.add_argument("--config", help="broker.yaml (its period_budgets.store is the store)")
    rel.add_argument("--account", required=True)
    rel.add_argument("--broker", required=True, help="the broker's instance id (from `leases list`)")
    rel.add_argument("--as-spent", action="store_true",
                     help="count the leases as spent (the broker's journal is lost; it may have spent them)")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from broker.app import open_store, scope_owners

    config = load_broker_config(args.config)
    accounts = sorted(set(scope_owners(config).values()))
    store = await open_store(config.period_budgets.store)
    now = datetime.now(UTC)
    try:
        if args.leases_command == "release":
            if args.account not in accounts:
                print(f"ramp-broker: account {args.account!r} is not in the configuration", file=sys.stderr)
                return 2
            released = await store.release_leases(args.account, args.broker, as_spent=args.as_spent,
                                                  now_ms=to_ms(now))
            if not released:
                print(f"broker {args.broker} holds no lease in account {args.account}")
                return 1
            how = "counted as spent (ledger kind lease-expired)" if args.as_spent else "given back"
            print(f"released broker {args.broker}'s leases in account {args.account}: {how}")
            return 0
        for account in accounts:
            leases = await store.leases(account)
            print(f"account {account}: {len(leases)} lease(s)")
            for lease in leases:
                expires = datetime.fromtimestamp(lease.expires_ms / 1000, UTC)
                state = "EXPIRED" if expires <= now else "live"
                print(f"  {lease.broker} {lease.counter.key}: "
                      f"{Money.from_units(lease.granted, lease.counter.currency)} "
                      f"(refresh {lease.seq}, {state}, due by {expires.isoformat(timespec='seconds')})")
        return 0
    finally:
        await store.close()
