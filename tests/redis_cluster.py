"""A real Redis Cluster for tests: 3 primaries + 3 replicas of redis-server on loopback.

Each node is its own process in a temporary directory, on a port whose cluster bus (port + 10000)
is free too. Both sit below Linux's ephemeral range (32768-60999), so a node that is killed and
started again finds its ports still free. A short cluster-node-timeout keeps failover to a few
seconds; `cluster-require-full-coverage no` lets the shards that still have a primary serve while
one has none (what the broker's "other accounts keep buying" rests on).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import redis

from tests.redis_server import RedisServer

PRIMARIES = 3
START_TIMEOUT_S = 20.0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """`count` ports p with p and p + 10000 (the cluster bus) free, all below the ephemeral range."""
    rng = random.SystemRandom()  # not the seeded generator of the tests
    ports: list[int] = []
    for _ in range(2000):
        port = rng.randrange(20000, 22768)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free port pairs (p, p + 10000) on 127.0.0.1")


def _cli(*args: str, port: int, timeout: float = 10.0) -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed (make tools installs it)")
    done = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                          timeout=timeout, check=False)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


class ClusterNode(RedisServer):
    def __init__(self, directory: Path, port: int, *, node_timeout_ms: int, appendfsync: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, appendonly=True, port=port, appendfsync=appendfsync, extra=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
            # A node back after a failover syncs from its new primary at once (the default waits 5 s).
            "--repl-diskless-sync-delay", "0"))

    def client(self) -> redis.Redis:
        """A plain (not cluster-aware) client of this node alone, for probes and admin commands."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def info(self, section: str) -> dict[str, str]:
        with self.client() as c:
            if section == "cluster":
                return {str(k): str(v) for k, v in c.cluster("INFO").items()}
            return {k: str(v) for k, v in c.info(section).items()}

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung primary)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process would not see SIGTERM
        super().stop()


class RedisCluster:
    """The nodes, in `redis-cli --cluster create` order: primaries first, then their replicas."""

    def __init__(
        self, directory: Path, *, node_timeout_ms: int = 1000, appendfsync: str = "everysec",
    ) -> None:
        self.dir = directory
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [ClusterNode(directory / f"node-{port}", port, node_timeout_ms=node_timeout_ms,
                                  appendfsync=appendfsync)
                      for port in cluster_ports(2 * PRIMARIES)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        nodes = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = _cli("--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes",
                   port=self.nodes[0].port, timeout=START_TIMEOUT_S)
        if "[OK] All 16384 slots covered" not in out:
            raise RuntimeError(f"redis-cli --cluster create failed: {out[-2000:]}")
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok and each shard has its primary and a replica that
        is in sync (after a failover or a restart)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.alive()]
            with contextlib.suppress(redis.RedisError):
                ok = all(n.info("cluster").get("cluster_state") == "ok" for n in live)
                if ok and self._replicated(live):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster was not healthy within {timeout_s:g} s")

    def _replicated(self, live: list[ClusterNode]) -> bool:
        primaries = [n for n in live if n.info("replication").get("role") == "master"]
        if len(primaries) != PRIMARIES:
            return False
        replicas = [n for n in live if n.info("replication").get("role") == "slave"]
        if not all(r.info("replication").get("master_link_status") == "up" for r in replicas):
            return False
        # What a broker with wait_replicas: 1 needs: WAIT counts a replica on every primary with one.
        want = {p.port: int(p.info("replication").get("connected_slaves", "0")) for p in primaries}
        for p in primaries:
            with p.client() as c:
                if want[p.port] and int(c.execute_command("WAIT", "1", "1000")) < 1:
                    return False
        return True

    def primary_of(self, slot: int) -> ClusterNode:
        """The node that serves `slot` now, as a live node's CLUSTER NODES says."""
        for asked in (n for n in self.nodes if n.alive()):
            with contextlib.suppress(redis.RedisError), asked.client() as c:
                table: dict[str, dict[str, object]] = c.cluster("NODES")
                for address, row in table.items():
                    flags = str(row["flags"])
                    if "master" not in flags or "fail" in flags:
                        continue
                    ranges = cast(list[list[str]], row["slots"])
                    if any(int(lo) <= slot <= int(hi) for lo, hi in ranges):
                        port = int(address.rsplit(":", 1)[1])
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def redis_cluster(*, node_timeout_ms: int = 1000, appendfsync: str = "everysec") -> Iterator[RedisCluster]:
    with tempfile.TemporaryDirectory(prefix="ramp-cluster-") as d:
        cluster = RedisCluster(Path(d), node_timeout_ms=node_timeout_ms, appendfsync=appendfsync)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
