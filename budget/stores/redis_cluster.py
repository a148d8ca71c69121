"""The Redis store on a Redis Cluster (budget.stores.contract.Store): RedisStore over redis-py's RedisCluster.

Every key of an account carries the account as its hash tag (`ramp:{acme}:...`, see
budget.stores.redis), so each script, read and pipeline of one account goes to one slot, served by
one primary; accounts spread over the primaries. `open_cluster` checks that for every account it
is given (the broker gives every configured one).

What differs from one server:
- Scripts are loaded on every primary at start (and on the replicas the slot map lists: Redis
  does not replicate SCRIPT LOAD). A node that answers NOSCRIPT later (restarted, or a replica
  promoted without them) gets the script's text by EVAL, routed like the EVALSHA it replaces, and
  keeps it. SHAs are computed here, so a store started while part of the cluster is down still
  sends EVALSHA.
- MULTI/EXEC snapshots (`read`, `limits`) are read-only scripts instead: atomic, and routed and
  redirected like every other call. `put_blob` pipelines its two commands (one key, one node).
- With wait_replicas, the write and its WAIT are pipelined to the slot's primary, on one
  connection (WAIT counts that connection's writes).

Failover. The client follows MOVED/ASK (and TRYAGAIN) by itself. It is given no retries of its own:
a connection error or timeout fails the call at once, as on one server (StoreUnavailable, the
scope's failure policy applies), and the slot map is read again (CLUSTER SLOTS, from the other
nodes first), so after a replica's promotion calls go to it. Until then the calls of the accounts
on the dead primary's slots fail within timeout_ms; the other primaries' accounts are not
affected, provided the servers run with `cluster-require-full-coverage no` (otherwise, once the
primary is marked failed, every node refuses every slot until a replica takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budget.stores.contract import StoreUnavailable
from budget.stores.redis import RedisStore, _HiredisConnection, _Script, _text, log

T = TypeVar("T")

# One key of each kind an account has (budget.stores.redis's key layout): all must share a slot.
_KEY_KINDS: Final = ("c:s|p|w|C", "r:x", "id", "exp", "i:x", "ledger", "limits", "limits:v", "counters",
                     "k:x", "lh:s|p|w|C", "lb:b", "lc:b")


class RedisClusterStore(RedisStore):
    """budget.stores.contract.Store on a Redis Cluster (see the module docstring)."""

    _client: _Client

    @classmethod
    async def open_cluster(
        cls, urls: Sequence[str], *, timeout_ms: int = 250, prefix: str = "ramp", max_connections: int = 64,
        lazy: bool = False, wait_replicas: int = 0, accounts: Iterable[str] = (),
    ) -> RedisClusterStore:
        """Connect through any of `urls` (startup nodes; the rest are discovered), check that every key of
        each of `accounts` hashes to one slot, and load the scripts on every node."""
        if not urls:
            raise ValueError("a Redis Cluster needs at least one node URL")
        parts = [urlsplit(u) for u in urls]
        if len({p.scheme for p in parts}) != 1 or parts[0].scheme not in ("redis", "rediss"):
            raise ValueError("cluster node URLs must all be redis:// or all rediss://")
        first = parts[0]
        timeout_s = timeout_ms / 1000
        client = _Client(
            startup_nodes=[ClusterNode(p.hostname or "127.0.0.1", p.port or 6379) for p in parts],
            # A slot whose primary is gone must not stop the client from serving the others.
            require_full_coverage=False,
            # No retries here: a write is never sent twice (see budget.stores.redis, Failures); the next
            # call re-reads the slot map after a connection error.
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            client_name="ramp-broker", username=first.username or None, password=first.password or None,
            ssl=first.scheme == "rediss",
        )
        if first.scheme == "redis":
            # Every node the client discovers is built from these kwargs.
            client.get_connection_kwargs()["connection_class"] = _HiredisConnection
        client.commands_parser = _CommandTableOnce()
        store = cls(client, timeout_ms=timeout_ms, prefix=prefix, wait_replicas=wait_replicas)
        store.check_slots(accounts)
        return await store._started(lazy=lazy)

    def __init__(self, client: _Client, *, timeout_ms: int = 250, prefix: str = "ramp",
                 wait_replicas: int = 0) -> None:
        super().__init__(client, timeout_ms=timeout_ms, prefix=prefix, wait_replicas=wait_replicas)
        self._refresh: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, url: str, *, timeout_ms: int = 250, prefix: str = "ramp", max_connections: int = 64,
        lazy: bool = False, wait_replicas: int = 0,
    ) -> RedisClusterStore:
        """RedisStore.open's signature: the cluster found through one node."""
        return await cls.open_cluster([url], timeout_ms=timeout_ms, prefix=prefix,
                                      max_connections=max_connections, lazy=lazy, wait_replicas=wait_replicas)

    @property
    def client(self) -> RedisCluster:
        return self._client

    async def _call(self, operation: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        try:
            return await super()._call(operation, retry=retry)
        except StoreUnavailable as exc:
            failed = _node_name(exc.__cause__)
            if failed is not None:
                self._client.avoid = failed
            # redis-py re-reads the slot map after a failed command, not after a failed pipeline (reads
            # of many keys, writes followed by WAIT): have it done now, in the background.
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._refresh_slots(failed))
            raise

    async def _refresh_slots(self, failed: str | None) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.nodes_manager.initialize(last_failed_node_name=failed)
        except Exception as exc:  # the next failure tries again
            log.debug("redis cluster: slot map not refreshed (%s)", exc)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await super().close()

    def check_slots(self, accounts: Iterable[str]) -> None:
        """ValueError unless every key kind of each account hashes to one slot (the hash tag)."""
        for account in accounts:
            p = self.account_prefix(account)
            slots = {self._client.keyslot(p + kind) for kind in _KEY_KINDS}
            if len(slots) != 1:
                raise ValueError(f"account {account!r}: its keys ({p}...) hash to {len(slots)} Redis Cluster "
                                 "slots, not one (the account between the braces is their hash tag)")

    def slot_of(self, account: str) -> int:
        return int(self._client.keyslot(self.account_prefix(account) + "id"))

    def failure_domain(self, account: str) -> str:
        """The primary serving the account now: the accounts that fail together (the period layer skips
        a failed one's calls for a moment, not the others'). After a failover it is the new primary."""
        try:
            node = self._client.get_node_from_key(self.account_prefix(account) + "id")
        except SlotNotCoveredError:  # no slot map yet
            node = None
        return node.name if node is not None else f"slot {self.slot_of(account)}"

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script on every node the client knows; StoreUnavailable if a primary did not
        take them."""
        for script in self._scripts.values():
            script.sha = hashlib.sha1(script.text).hexdigest()

        async def load() -> None:
            await self._client.initialize()
            nodes = self._client.get_nodes()
            results = await asyncio.gather(*(self._load_on(node) for node in nodes), return_exceptions=True)
            failed = [(n, r) for n, r in zip(nodes, results, strict=True) if isinstance(r, BaseException)]
            for node, exc in failed:
                log.warning("redis cluster: scripts not loaded on %s (%s)", node.name, exc)
            primaries = {node.name for node in self._client.get_primaries()}
            down = [exc for node, exc in failed if node.name in primaries]
            if down:
                raise down[0]

        await self._call(load, retry=True)

    async def _load_on(self, node: ClusterNode) -> None:
        for script in self._scripts.values():
            sha = _text(await self._client.execute_command("SCRIPT LOAD", script.text, target_nodes=node))
            if sha != script.sha:
                raise RuntimeError(f"{node.name} loaded {script.name} as {sha}, not {script.sha}")

    async def _load_and_eval(self, script: _Script, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        # EVAL is routed (and redirected) by its keys like EVALSHA; SCRIPT LOAD would go to every primary.
        return await self._client.eval(script.text, len(keys), *keys, *args)  # type: ignore[arg-type]

    async def _then_wait(self, command: list[str | bytes], key: str) -> tuple[Any, Any]:
        for attempt in range(2):
            node = self._client.get_node_from_key(key)
            if node is None:  # not for a primary (SlotNotCoveredError), but typed so
                raise StoreUnavailable(f"redis: no node serves {key}", not_sent=True)
            pipe = self._client.pipeline()
            pipe.execute_command(*command, target_nodes=node)
            pipe.execute_command("WAIT", str(self._wait_replicas), self._wait_ms, target_nodes=node)
            try:
                reply, acked = await pipe.execute(raise_on_error=False, allow_redirections=False)
            except (RedisConnectionError, RedisTimeoutError):
                self._client.avoid = node.name  # what redis-py notes of a failed command, not of a pipeline
                raise
            if not isinstance(reply, MovedError | AskError | TryAgainError) or attempt:
                return reply, acked
            # Redirected: nothing ran. A routed read learns the slot's new home, then send it there.
            await self._client.exists(key)
        raise AssertionError("unreachable")

    async def _read_rows(self, keys: list[str]) -> list[Any]:
        rows: list[Any] = await self._script("read", keys, [], retry=True)
        return rows

    async def _limits_raw(self, p: str) -> tuple[dict[Any, Any], Any]:
        version, flat = await self._script("limits", [f"{p}limits", f"{p}limits:v"], [], retry=True)
        return dict(zip(flat[::2], flat[1::2], strict=True)), version

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        key = f"{self._prefix}:blob:{name}"

        async def run() -> None:
            # One key, so one node and one connection; not atomic, but the TTL is only cleanup (expiry is
            # judged by expires_ms).
            async with self._client.pipeline() as pipe:
                pipe.hset(key, mapping={"data": data, "expires_ms": str(now_ms + ttl_ms)})
                pipe.pexpire(key, max(ttl_ms, 1))
                await pipe.execute()

        await self._call(run, retry=False)


class _Client(RedisCluster):
    """RedisCluster that re-reads the slot map from the other nodes first after one failed. redis-py
    does so only when it retries a command itself, and ours retries nothing: a hung primary (it takes
    connections, answers nothing) asked first would hold every account's calls for a socket timeout."""

    avoid: str | None = None

    async def initialize(
        self, additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        failed, self.avoid = last_failed_node_name or self.avoid, None
        return await super().initialize(additional_startup_nodes_info, failed)


def _node_name(exc: BaseException | None) -> str | None:
    """The node a redis-py error came from, when it says."""
    name = getattr(exc, "last_failed_node_name", None)
    if isinstance(name, str):
        return name
    node = getattr(exc, "connection", None)
    host, port = getattr(node, "host", None), getattr(node, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else None


class _CommandTableOnce(AsyncCommandsParser):
    """Fetches COMMAND once. redis-py runs it again on the cluster's default node at every re-read of the
    slot map (the topology changes, the command table does not); when that node is the dead primary,
    the re-read fails and takes every account down with it."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if not self.commands:
            await super().initialize(node)
