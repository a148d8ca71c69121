"""Assembling a running broker from its configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec

from broker.config import BrokerConfig
from broker.errors import ErrorMapping
from broker.purchase import Purchaser
from broker.selection import Exchange
from broker.service import BrokerHandlers, BudgetHandlers
from budget.clock import Clock, SystemClock
from budget.session import SessionBudgets
from currency.convert import Converter, FixedRates, NoConverter
from exchange_client.connect_adapter import ConnectExchange
from exchange_client.serving import Router
from ramp.broker.v1.broker_connect import BrokerServiceASGIApplication, BudgetServiceASGIApplication


@dataclass
class Broker:
    config: BrokerConfig
    app: Router
    exchanges: dict[str, Exchange]
    sessions: SessionBudgets

    async def close(self) -> None:
        for ex in self.exchanges.values():
            await ex.adapter.close()


def build_broker(config: BrokerConfig, clock: Clock | None = None) -> Broker:
    clock = clock or SystemClock()
    converter: Converter = FixedRates(config.decimal_rates()) if config.rates else NoConverter()
    default = config.session.default_limit.money() if config.session.default_limit else None
    sessions = SessionBudgets(clock, default, idle_seconds=config.session.idle_seconds)
    exchanges = {
        e.name: Exchange(e, ConnectExchange(e.name, e.endpoint)) for e in config.exchanges
    }
    purchaser = Purchaser(config, exchanges, sessions, converter, clock)
    interceptors = [ErrorMapping()]
    # Unknown JSON fields are refused, not skipped: a misspelled "maxPrize" must
    # not quietly buy without the cap the agent meant to set.
    codecs = [google_protobuf_binary_codec(), google_protobuf_json_codec(ignore_unknown_fields=False)]
    broker_app = BrokerServiceASGIApplication(
        BrokerHandlers(purchaser), interceptors=interceptors, codecs=codecs)
    budget_app = BudgetServiceASGIApplication(
        BudgetHandlers(sessions), interceptors=interceptors, codecs=codecs)

    async def healthz(method: str, body: Any) -> tuple[int, Any]:
        return 200, {"status": "ok", "exchanges": sorted(exchanges), "sessions": len(sessions)}

    router = Router(
        {broker_app.path: broker_app, budget_app.path: budget_app}, {"/healthz": healthz}
    )
    return Broker(config, router, exchanges, sessions)
