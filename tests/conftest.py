from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.harness import Exchange, RunningBroker, broker_config, catalog, running_broker, running_exchange
from tests.redis_cluster import RedisCluster
from tests.redis_cluster import redis_cluster as start_cluster
from tests.redis_server import redis_server


@pytest.fixture
async def exchange() -> AsyncIterator[Exchange]:
    async with running_exchange(catalog()) as ex:
        yield ex


@pytest.fixture
async def broker(exchange: Exchange) -> AsyncIterator[RunningBroker]:
    async with running_broker(broker_config([exchange])) as b:
        yield b


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's default files (embedded store, journal) go to a fresh temp dir per test
    (inherited by the processes a test starts), never to $HOME."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One redis-server for the session's tests; each test uses its own account names or flushes."""
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    """One Redis Cluster (3 primaries, 3 replicas) for the session, started by the first test that asks."""
    with start_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session's cluster, healthy once a test that failed a node over has let it recover."""
    redis_cluster_session.wait_healthy()
    return redis_cluster_session
