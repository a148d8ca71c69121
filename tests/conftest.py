from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness import Exchange, RunningBroker, broker_config, catalog, running_broker, running_exchange


@pytest.fixture
async def exchange() -> AsyncIterator[Exchange]:
    async with running_exchange(catalog()) as ex:
        yield ex


@pytest.fixture
async def broker(exchange: Exchange) -> AsyncIterator[RunningBroker]:
    async with running_broker(broker_config([exchange])) as b:
        yield b
