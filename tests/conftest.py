from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.harness import Exchange, RunningBroker, broker_config, catalog, running_broker, running_exchange
from tests.redis_server import redis_server


@pytest.fixture
async def exchange() -> AsyncIterator[Exchange]:
    async with running_exchange(catalog()) as ex:
        yield ex


@pytest.fixture
async def broker(exchange: Exchange) -> AsyncIterator[RunningBroker]:
    async with running_broker(broker_config([exchange])) as b:
        yield b


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One redis-server for the session's tests; each test uses its own account names or flushes."""
    with redis_server() as server:
        yield server.url
