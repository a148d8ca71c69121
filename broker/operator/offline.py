"""The parts of a broker that local commands (`ramp-broker reconcile`) need, without serving.

Reconcile rolls unsettled holds forward like any broker would: it needs the
period layer on the configured store and the configured Exchanges, nothing
else (no sessions, no metrics, no journal or memory file of its own: those
belong to the brokers, which may be running).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from broker.app import load_converter, scope_owners, scope_rules
from broker.config import BrokerConfig
from broker.purchase.agents import Agent
from broker.purchase.execute import Buyer
from broker.purchase.order import exchange_key
from broker.purchase.recovery import Recovery
from broker.purchase.selection import Exchange
from budget.period import PeriodLayer
from budget.periods import time_zone
from budget.stores.contract import Store
from common.clock import SystemClock
from exchange_client.ramp import ConnectExchange
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def exchange_recovery(config: BrokerConfig, store: Store) -> AsyncIterator[Recovery]:
    """A Recovery reaching the config's Exchanges, committing into `store`; adapters closed on exit."""
    clock = SystemClock()
    converter, _ = await load_converter(config, clock, store)
    pb = config.period_budgets
    period = PeriodLayer(
        store, scope_rules(config, scope_owners(config)), clock=clock,
        tz=time_zone(pb.time_zone, "period_budgets.time_zone"), converter=converter,
        ttl_s=pb.reservation_ttl_seconds, grace_s=pb.grace_seconds, journal=None)
    exchanges = {e.name: Exchange(e, ConnectExchange(e.name, e.endpoint)) for e in config.exchanges}
    requester = rpb.Requester(id=config.requester.id, domain=config.requester.domain,
                              name=config.requester.name, type="broker")

    def overcharged(name: str) -> None:
        log.warning("exchange %s charged above its quote", name)

    buyer = Buyer(requester, config.fanout.execute_timeout_ms / 1000, converter, overcharged)
    try:
        yield Recovery(period, exchanges, buyer)
    finally:
        for ex in exchanges.values():
            await ex.adapter.close()


def ledger_to_exchange_key(key: str) -> str:
    """The key an Exchange was sent for a ledger key `<caller>#<key>` (or `...#<part>`)."""
    caller, _, rest = key.partition("#")
    return exchange_key(Agent(caller), rest.partition("#")[0])
