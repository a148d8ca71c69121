"""`ramp-broker`: the daemon, the reference Exchange, and tools."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from broker.config import BrokerConfig, load_broker_config
from broker.mcp import cli as mcp_cli
from broker.observe.logs import configure
from broker.operator import console, leases
from budget.stores.contract import StoreUnavailable
from common.configfile import ConfigError

if TYPE_CHECKING:
    from broker.operator.statement import StatementLine
    from budget.reconcile import KeyCharges

log = logging.getLogger("ramp_broker")
T = TypeVar("T")
# How long reconcile waits for one Exchange's statement.
_STATEMENT_TIMEOUT_S = 10.0


def _run_in(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run a server's main coroutine on the configured event loop."""
    if loop == "asyncio":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _serve(config: BrokerConfig, log_format: str | None, log_level: str | None) -> None:
    from broker.app import build_broker
    from rpc_server.serving import serve_until_signalled

    # The command line wins over the config file.
    configure(log_format or config.logging.format, log_level or config.logging.level)
    broker = await build_broker(config)
    broker.start()
    _settle_heap()
    log.info("starting broker on %s (Connect, gRPC-Web, gRPC); exchanges: %s",
             config.listen, ", ".join(broker.exchanges) or "none")
    # SIGTERM/SIGINT set it: readiness turns NOT_SERVING and health Watch streams end while
    # in-flight requests finish.
    stop = broker.draining
    servers = [_listening("listen", config.listen, serve_until_signalled(
        broker.app, config.listen, config.shutdown_grace_seconds, stop), stop)]
    if config.metrics.enabled:
        log.info("Prometheus metrics on http://%s/metrics", config.metrics.listen)
        servers.append(_listening("metrics.listen", config.metrics.listen, serve_until_signalled(
            broker.metrics.asgi_app(), config.metrics.listen, 1.0, stop), stop))
    try:
        for result in await asyncio.gather(*servers, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
    finally:
        await broker.close()
        log.info("broker stopped")


def _settle_heap() -> None:
    """What starting allocated (modules, protobuf descriptors, config, clients) lives as long as
    the process: frozen out of the garbage collector's way, so a full collection walks only what
    has been allocated since. Before, each one walked the whole heap: 35-60 ms with the loop
    stopped, a few times a minute under load, which was the p99 of every bench row."""
    gc.collect()
    gc.freeze()


class ListenError(ConfigError):
    """A configured address cannot be listened on (taken, not local...): exit 2, as for any
    setting that cannot be used."""


async def _listening(setting: str, address: str, server: Awaitable[None], stop: asyncio.Event) -> None:
    """One server; failing to bind names its setting (one line from main(), not a traceback)."""
    try:
        await server
    except OSError as exc:
        stop.set()  # the other server shuts down too
        raise ListenError(f"{setting} {address}: cannot listen ({exc.strerror or exc})") from None


async def _exchange(catalog_path: str | None) -> None:
    from reference_exchange.catalog import load_catalog
    from reference_exchange.service import ReferenceExchange, reference_app
    from rpc_server.serving import serve_until_signalled

    catalog = load_catalog(catalog_path)
    exchange = ReferenceExchange(catalog)
    log.info("starting reference exchange %s on %s with %d offers",
             catalog.exchange, catalog.listen, len(catalog.offers))
    stop = asyncio.Event()
    await _listening("listen", catalog.listen, serve_until_signalled(
        reference_app(exchange), catalog.listen, 5.0, stop), stop)
    log.info("reference exchange stopped")


async def _reconcile(config_path: str | None, repair: bool) -> int:
    from broker.app import open_store, scope_owners
    from broker.operator.offline import exchange_recovery, ledger_to_exchange_key
    from budget.reconcile import ledger_charges, reconcile, settle_holds
    from currency.money import Money

    config = load_broker_config(config_path)
    accounts = sorted(set(scope_owners(config).values()))
    if not accounts:
        print("no period scopes are configured: nothing to reconcile")
        return 0
    store = await open_store(config.period_budgets.store)
    try:
        # Holds first: whatever they settle is in the ledger before it is compared with anything.
        holds = []
        if any([await store.holds(account) for account in accounts]):
            async with exchange_recovery(config, store) as recovery:
                holds = await settle_holds(store, accounts, recovery.roll_forward)
        with _progress("reconciling accounts") as progress:
            report = await reconcile(store, accounts, repair=repair, progress=progress)
        statements = await _statements(config)
        # Read after the statements: a purchase still holding (or finishing) now is not compared.
        open_keys = {ledger_to_exchange_key(h.idempotency_key)
                     for account in accounts for h in await store.holds(account)}
        ledger = await ledger_charges(store, accounts, ledger_to_exchange_key) if statements else {}
    finally:
        await store.close()
    print(f"checked {report.counters} counter(s) against {report.entries} ledger entr(y/ies) "
          f"in {len(accounts)} account(s)")
    if report.orphaned_entries:
        print(f"{report.orphaned_entries} ledger entr(y/ies) belong to counters that have expired")
    for d in report.differences:
        cur = d.counter.currency
        print(f"MISMATCH {d.account} {d.counter.key}: counter spent "
              f"{Money.from_units(d.counter_spent, cur)}, ledger says "
              f"{Money.from_units(d.ledger_spent, cur)} ({d.ledger_entries} entries)"
              + (" -> repaired from the ledger" if repair else ""))
    if report.ok:
        print("counters match the ledger")
    ok = report.ok
    for h in holds:
        if h.settled:
            print(f"hold {h.reservation_id} ({h.account}, key {h.key}): settled with its "
                  "Exchanges")
        else:
            ok = False
            print(f"DOUBTFUL hold {h.reservation_id} ({h.account}, key {h.key}): {h.problem}; "
                  "it stays counted (see `ramp-broker holds list`)")
    if not holds:
        print("no open holds")
    for name, outcome in statements.items():
        if isinstance(outcome, str):
            print(f"exchange {name}: {outcome}")
            continue
        lines, read_at_ms = outcome
        ok = _print_statement(name, lines, read_at_ms, ledger.get(name, {}), open_keys, config) and ok
    return 0 if ok else 1


# exchange name -> (its statement, when it was read) or a sentence saying why there is none
Statements = dict[str, "tuple[list[StatementLine], int] | str"]


async def _statements(config: BrokerConfig) -> Statements:
    from broker.operator.statement import NoStatement, StatementUnavailable, fetch_statement
    from budget.periods import to_ms

    out: Statements = {}
    for ex in config.exchanges:
        try:
            lines = await fetch_statement(ex.endpoint, _STATEMENT_TIMEOUT_S)
        except NoStatement as exc:
            out[ex.name] = f"publishes no statement of charges ({exc}): not compared"
        except StatementUnavailable as exc:
            # Not proof of a difference: said, and left to the next run.
            out[ex.name] = f"its statement could not be read ({exc}): not compared"
        else:
            out[ex.name] = (lines, to_ms(datetime.now(UTC)))
    return out


def _print_statement(
    name: str, lines: list[StatementLine], read_at_ms: int, ledger: dict[str, KeyCharges],
    open_keys: set[str], config: BrokerConfig,
) -> bool:
    from budget.reconcile import Charged, compare_statement

    # Charges to other billing accounts are another buyer's business.
    ours = [(ln.key, Charged(ln.offer_id, ln.amount, ln.currency)) for ln in lines
            if ln.account in ("", config.requester.id)]
    result = compare_statement(name, ours, ledger, open_keys=open_keys, read_at_ms=read_at_ms)
    skipped = f"; {result.skipped} key(s) still settling, not compared" if result.skipped else ""
    if result.ok:
        print(f"exchange {name}: its statement matches the ledger ({result.keys} key(s){skipped})")
        return True
    for d in result.differences:
        says = ", ".join(map(str, d.exchange_says)) or "nothing"
        has = ", ".join(map(str, d.ledger_says)) or "nothing"
        which = f"ledger key {', '.join(d.ledger_keys)}" if d.ledger_keys else "not in the ledger"
        print(f"MISMATCH exchange {name} key {d.key} ({which}): the Exchange charged {says}; the "
              f"ledger records {has}")
    print(f"exchange {name}: {len(result.differences)} of {result.keys} key(s) differ from the "
          f"ledger{skipped}")
    return False


def _memory_files(config: BrokerConfig, given: list[str] | None) -> list[Path]:
    """--memory files (each must exist), else every broker memory file in the state directory
    (and the config's own memory_path)."""
    from common.statedir import state_dir

    if given:
        paths = [Path(p).expanduser() for p in given]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"--memory: no such file: {', '.join(missing)}")
        return paths
    found = set(state_dir().glob("memory-*.json"))
    if config.period_budgets.memory_path:
        own = Path(config.period_budgets.memory_path).expanduser()
        if own.is_file():
            found.add(own)
    return sorted(found)


async def _store_command(args: argparse.Namespace) -> int:
    from broker.app import open_store, scope_owners
    from budget.durability.adopt import Remembered, adopt, compare
    from budget.durability.memory import read_memory
    from budget.periods import to_ms
    from common.statedir import state_dir
    from currency.money import Money

    config = load_broker_config(args.config)
    accounts = sorted(set(scope_owners(config).values()))
    paths = _memory_files(config, args.memory)
    if args.store_command == "adopt" and not paths and not args.empty:
        print(f"ramp-broker: no broker memory file found (memory-*.json in {state_dir()}, or --memory "
              "FILE): nothing says what the store held. Point --memory at the brokers' memory files, "
              "or give --empty to adopt the store as it is", file=sys.stderr)
        return 1
    if not accounts:
        print("no period scopes are configured: no account to look at")
        return 0
    memories = [Remembered(p, read_memory(p)) for p in paths]
    now_ms = to_ms(datetime.now(UTC))
    store = await open_store(config.period_budgets.store)
    refused = False
    try:
        for account in accounts:
            if args.store_command == "status":
                found, comparisons = await compare(store, account, memories, now_ms=now_ms)
                print(f"account {account}: store identity "
                      + (f"{found.id} generation {found.generation}" if found else "none"))
                for c in comparisons:
                    print(f"  {c.path}: {c.verdict}: {c.detail}")
                    refused = refused or c.refused
                if not comparisons:
                    print("  no broker memory file to compare with")
                continue
            done = await adopt(store, account, memories, now_ms=now_ms)
            was = f"{done.before.id} generation {done.before.generation}" if done.before else "no identity"
            print(f"account {account}: adopted as {done.after.id} generation {done.after.generation} "
                  f"(the store had {was})")
            for r in done.restored:
                cur = r.counter.currency
                print(f"  restored {r.counter.key}: spent {Money.from_units(r.before, cur)} -> "
                      f"{Money.from_units(r.after, cur)} (from {r.source.name}; ledger kind adopt)")
            if not done.restored:
                print("  no counter below what the brokers saw")
            if done.limits:
                print(f"  re-applied {len(done.limits)} operator limit(s) of limits version "
                      f"{done.limits_version} (from {done.limits_source})")
                for scope, period, value in done.limits:
                    shown = str(Money.from_units(value[1], value[0])) if value else "removed"
                    print(f"    {scope} {period}: {shown}")
    finally:
        await store.close()
    if args.store_command == "adopt":
        print("brokers take the adopted numbers as their baseline at their next upkeep")
    return 1 if refused else 0


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr while the work runs, when stderr is a terminal (else nothing)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ramp-broker", description=__doc__)
    parser.add_argument("--log-level", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="log lines as text or JSON objects (default: the config's logging.format)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker daemon")
    serve.add_argument("--config", help="broker.yaml (defaults apply when omitted)")
    exchange = sub.add_parser("exchange", help="run the reference RAMP Exchange")
    exchange.add_argument("--catalog", help="catalog.yaml")
    rec = sub.add_parser("reconcile", help="rebuild period counters from the ledger and compare; "
                         "settle open holds with their Exchanges; compare the Exchanges' statements "
                         "of charges with the ledger")
    rec.add_argument("--config", help="broker.yaml (its period_budgets.store is checked)")
    rec.add_argument("--repair", action="store_true", help="set mismatching counters from the ledger")
    store = sub.add_parser(
        "store", help="the budget store's identity: compare it with the brokers' memory, or adopt it",
        description="A store that lost its memory (emptied, replaced, restored from an old copy) is "
                    "refused by brokers that saw more. `status` compares it with the brokers' memory "
                    "files; `adopt` seeds it from them (spent high-water marks, operator limits) and "
                    "raises its generation, after which brokers resume with its numbers.")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    for name, what in (("status", "each account's identity, and how each memory file sees it "
                                  "(exit 1 when a broker refuses it)"),
                       ("adopt", "restore spend and limits from the memory files, then raise the "
                                 "generation")):
        cmd = store_commands.add_parser(name, help=what, description=what)
        cmd.add_argument("--config", help="broker.yaml (its period_budgets.store is the store)")
        cmd.add_argument("--memory", metavar="FILE", action="append",
                         help="a broker's memory file (repeatable; default: every memory-*.json in "
                              "the state directory)")
        if name == "adopt":
            cmd.add_argument("--empty", action="store_true",
                             help="adopt the store as it is when no memory file is found")
    console.add_commands(sub)
    mcp_cli.add_command(sub)
    leases.add_command(sub)
    args = parser.parse_args(argv)
    configure(args.log_format or "text", args.log_level or "INFO")
    try:
        if args.command == "serve":
            config = load_broker_config(args.config)
            _run_in(config.event_loop, _serve(config, args.log_format, args.log_level))
        elif args.command == "reconcile":
            return asyncio.run(_reconcile(args.config, args.repair))
        elif args.command == "store":
            return asyncio.run(_store_command(args))
        elif args.command in ("budget", "holds"):
            return console.run(args)
        elif args.command == "mcp":
            return mcp_cli.run(args)
        elif args.command == "leases":
            return leases.run(args)
        else:
            asyncio.run(_exchange(args.catalog))
    except ConfigError as exc:
        print(f"ramp-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, StoreUnavailable) as exc:
        print(f"ramp-broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
