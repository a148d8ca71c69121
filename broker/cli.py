"""`ramp-broker`: the daemon, the reference Exchange, and tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from broker.config import load_broker_config
from broker.configfile import ConfigError

log = logging.getLogger("ramp_broker")


async def _serve(config_path: str | None) -> None:
    from broker.app import build_broker
    from exchange_client.serving import serve_until_signalled

    config = load_broker_config(config_path)
    broker = build_broker(config)
    log.info("starting broker on %s (Connect, gRPC-Web, gRPC); exchanges: %s",
             config.listen, ", ".join(broker.exchanges) or "none")
    try:
        await serve_until_signalled(broker.app, config.listen, config.shutdown_grace_seconds)
    finally:
        await broker.close()
        log.info("broker stopped")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ramp-broker", description=__doc__)
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker daemon")
    serve.add_argument("--config", help="broker.yaml (defaults apply when omitted)")
    exchange = sub.add_parser("exchange", help="run the reference RAMP Exchange")
    exchange.add_argument("--catalog", help="catalog.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            asyncio.run(_serve(args.config))
        else:
            asyncio.run(_exchange(args.catalog))
    except ConfigError as exc:
        print(f"ramp-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ramp-broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
