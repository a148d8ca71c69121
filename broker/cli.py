"""`ramp-broker`: the daemon, the reference Exchange, and tools."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator

from broker import console
from broker.config import load_broker_config
from broker.configfile import ConfigError
from broker.logs import configure
from budget.store import StoreUnavailable

log = logging.getLogger("ramp_broker")


async def _serve(config_path: str | None, log_format: str | None, log_level: str | None) -> None:
    from broker.app import build_broker
    from exchange_client.serving import serve_until_signalled

    config = load_broker_config(config_path)
    # The command line wins over the config file.
    configure(log_format or config.logging.format, log_level or config.logging.level)
    broker = await build_broker(config)
    broker.start()
    log.info("starting broker on %s (Connect, gRPC-Web, gRPC); exchanges: %s",
             config.listen, ", ".join(broker.exchanges) or "none")
    stop = asyncio.Event()
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


async def _listening(setting: str, address: str, server: Awaitable[None], stop: asyncio.Event) -> None:
    """One server; failing to bind names its setting (one line from main(), not a traceback)."""
    try:
        await server
    except OSError as exc:
        stop.set()  # the other server shuts down too
        raise OSError(f"{setting} {address}: cannot listen ({exc.strerror or exc})") from None


async def _exchange(catalog_path: str | None) -> None:
    from exchange_client.catalog import load_catalog
    from exchange_client.reference import ReferenceExchange, reference_app
    from exchange_client.serving import serve_until_signalled

    catalog = load_catalog(catalog_path)
    exchange = ReferenceExchange(catalog)
    log.info("starting reference exchange %s on %s with %d offers",
             catalog.exchange, catalog.listen, len(catalog.offers))
    await serve_until_signalled(reference_app(exchange), catalog.listen, 5.0)
    log.info("reference exchange stopped")


async def _reconcile(config_path: str | None, repair: bool) -> int:
    from broker.app import open_store, scope_owners
    from budget.reconcile import reconcile
    from currency.money import Money

    config = load_broker_config(config_path)
    accounts = sorted(set(scope_owners(config).values()))
    if not accounts:
        print("no period scopes are configured: nothing to reconcile")
        return 0
    store = await open_store(config.period_budgets.store)
    try:
        with _progress("reconciling accounts") as progress:
            report = await reconcile(store, accounts, repair=repair, progress=progress)
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
        return 0
    return 1


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
    rec = sub.add_parser("reconcile", help="rebuild period counters from the ledger and compare")
    rec.add_argument("--config", help="broker.yaml (its period_budgets.store is checked)")
    rec.add_argument("--repair", action="store_true", help="set mismatching counters from the ledger")
    console.add_commands(sub)
    args = parser.parse_args(argv)
    configure(args.log_format or "text", args.log_level or "INFO")
    try:
        if args.command == "serve":
            asyncio.run(_serve(args.config, args.log_format, args.log_level))
        elif args.command == "reconcile":
            return asyncio.run(_reconcile(args.config, args.repair))
        elif args.command == "budget":
            return console.run(args)
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
