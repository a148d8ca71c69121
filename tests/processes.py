"""`ramp-broker` processes for tests: spawn, watch, stop and kill them on loopback.

Every child runs the installed `ramp-broker` console script (or `python -m
broker.operator.cli`) in its own process on a free 127.0.0.1 port; tests talk to it over
HTTP only. Every wait is bounded (START_TIMEOUT, EXIT_TIMEOUT), and a child
started with `spawn` (or `start_exchange` / `start_broker`) is stopped on the way
out of its context whatever happened.

Typical use::

    async with start_exchange(tmp_path, catalog_tree()) as exchange, \\
               start_broker(tmp_path, broker_tree(exchange)) as broker:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await connect_call(client, broker, "BrokerService/Transact", {...}, key="k")
            state = await exchange_state(client, exchange)
        await broker.kill()        # SIGKILL, as a crash
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import CONNECT_JSON, free_port

# Seconds a child has to answer /healthz after it is started.
START_TIMEOUT = 20.0
# Seconds a child has to exit once asked to (or killed), and its stderr to close.
EXIT_TIMEOUT = 10.0


def command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).with_name("ramp-broker")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "broker.operator.cli"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without stray RAMP_BROKER_/RAMP_EXCHANGE_ overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAMP_BROKER_", "RAMP_EXCHANGE_"))}
    env.update(extra or {})
    return env


def write_yaml(path: Path, tree: Any) -> Path:
    """Write `tree` as YAML (keys in the given order) to `path`; returns `path`."""
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def run_cli(args: list[str], cwd: Path, env: Mapping[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `ramp-broker ARGS` to completion (within `timeout` s); stdout and stderr as text."""
    return subprocess.run(
        [*command(), *args], cwd=cwd, env=clean_env(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@dataclass
class Child:
    """One `ramp-broker` process; its stderr is collected as it runs.

    `url` is its http://127.0.0.1:PORT base; `config_path` the YAML file it was
    started from, when a helper here wrote one.
    """

    name: str
    proc: asyncio.subprocess.Process
    url: str
    config_path: Path | None = None
    _err: bytearray = field(default_factory=bytearray)
    _drain: asyncio.Task[None] | None = None

    def start_draining(self) -> None:
        self._drain = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self._err.extend(chunk)

    @property
    def stderr(self) -> str:
        """Everything the child has written to stderr so far."""
        return self._err.decode("utf-8", "replace")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def wait_exit(self) -> int:
        """The exit code, within EXIT_TIMEOUT; stderr is complete afterwards."""
        code = await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        if self._drain is not None:
            await asyncio.wait_for(self._drain, EXIT_TIMEOUT)
        return code

    async def kill(self) -> int:
        """SIGKILL, as a crash: no shutdown, no cleanup. Returns the exit code (-9).

        Never raises for a child that is already dead (returns its code).
        """
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        return await self.wait_exit()

    async def stop(self) -> None:
        """Terminate, then kill if it will not go; never raises for a dead child."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    async def wait_healthy(self) -> dict[str, Any]:
        """Poll /healthz until 200 (its JSON body), failing the test after START_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.proc.returncode is not None:
                    pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr}")
                try:
                    r = await client.get(f"{self.url}/healthz")
                    if r.status_code == 200:
                        body: dict[str, Any] = r.json()
                        return body
                except httpx.TransportError:
                    pass
                if loop.time() > deadline:
                    pytest.fail(f"{self.name} not healthy after {START_TIMEOUT}s:\n{self.stderr}")
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def spawn(name: str, args: list[str], port: int, cwd: Path,
                env: Mapping[str, str] | None = None,
                config_path: Path | None = None) -> AsyncIterator[Child]:
    """Start `ramp-broker ARGS` listening on `port`, wait until healthy, stop it on exit.

    `env` is added to the cleaned environment (see `clean_env`).
    """
    proc = await asyncio.create_subprocess_exec(
        *command(), *args, cwd=cwd, env=clean_env(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    child = Child(name, proc, f"http://127.0.0.1:{port}", config_path)
    child.start_draining()
    try:
        await child.wait_healthy()
        yield child
    finally:
        await child.stop()


def _listen_port(tree: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`tree` with a `listen` address: its own when it has one, else a free loopback port."""
    listen = tree.get("listen")
    if listen is None:
        port = free_port()
        return {**tree, "listen": f"127.0.0.1:{port}"}, port
    return tree, int(str(listen).rsplit(":", 1)[1])


# --- the reference Exchange -------------------------------------------------


def catalog_tree(exchange: str = "ref.test", **overrides: Any) -> dict[str, Any]:
    """A reference Exchange catalog as a dict (no `listen`: `start_exchange` picks a port).

    Account `ramp-broker` holds 1000.00 USD; offers a/b/c at https://x.test/{a,b,c}
    cost 1.00/2.00/3.00 USD flat. Top-level keys in `overrides` replace the defaults.
    """
    tree: dict[str, Any] = {
        "exchange": exchange,
        "accounts": {"ramp-broker": {"USD": "1000.00"}},
        "offers": [
            {"uri": f"https://x.test/{k}", "offer_id": k, "rate": rate, "currency": "USD"}
            for k, rate in (("a", "1.00"), ("b", "2.00"), ("c", "3.00"))
        ],
    }
    tree.update(overrides)
    return tree


@contextlib.asynccontextmanager
async def start_exchange(directory: Path, catalog: dict[str, Any], *, name: str = "exchange",
                         env: Mapping[str, str] | None = None) -> AsyncIterator[Child]:
    """Run `ramp-broker exchange` from `catalog` (written to DIRECTORY/NAME.yaml).

    A free loopback port is chosen unless the catalog has `listen`. The child's
    `.exchange` name is `catalog["exchange"]`; see `exchange_state`, `set_knobs`.
    """
    tree, port = _listen_port(catalog)
    path = write_yaml(directory / f"{name}.yaml", tree)
    async with spawn(name, ["exchange", "--catalog", str(path)], port, directory, env,
                     path) as child:
        yield child


async def exchange_state(client: httpx.AsyncClient, exchange: Child) -> dict[str, Any]:
    """The reference Exchange's /admin/state: balances, charges, execute_calls, knobs."""
    r = await client.get(f"{exchange.url}/admin/state")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()
    return state


async def set_knobs(client: httpx.AsyncClient, exchange: Child, **knobs: Any) -> dict[str, Any]:
    """POST /admin/knobs (e.g. execute_latency_ms=500, fail_execute=2); returns the state."""
    r = await client.post(f"{exchange.url}/admin/knobs", json=knobs)
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()
    return state


# --- the broker ---------------------------------------------------------------


def broker_tree(*exchanges: Child | tuple[str, str], **overrides: Any) -> dict[str, Any]:
    """A broker config dict calling `exchanges` (no `listen`: `start_broker` picks a port).

    Each exchange is a Child started by `start_exchange` (its name read from its
    catalog file) or a (name, url) pair. Top-level keys in `overrides` replace
    the defaults (e.g. period_budgets=..., agents=..., admin=...).
    """
    entries = []
    for i, ex in enumerate(exchanges):
        if isinstance(ex, Child):
            assert ex.config_path is not None, f"{ex.name}: not started by start_exchange"
            name = str(yaml.safe_load(ex.config_path.read_text(encoding="utf-8"))["exchange"])
            url = ex.url
        else:
            name, url = ex
        entries.append({"name": name, "endpoint": url, "trust": 50, "priority": i})
    tree: dict[str, Any] = {
        "exchanges": entries,
        "fanout": {"discover_timeout_ms": 2000, "overall_timeout_ms": 4000,
                   "execute_timeout_ms": 5000},
    }
    tree.update(overrides)
    return tree


@contextlib.asynccontextmanager
async def start_broker(directory: Path, config: dict[str, Any], *, name: str = "broker",
                       env: Mapping[str, str] | None = None) -> AsyncIterator[Child]:
    """Run `ramp-broker serve` from `config` (written to DIRECTORY/NAME.yaml).

    A free loopback port is chosen unless the config has `listen`; `env` is for
    e.g. the admin token variable. The written file is `child.config_path`, so
    the same broker can be started again (after `kill()`) from it, or checked
    with `run_cli(["reconcile", "--config", str(child.config_path)], ...)`.
    """
    tree, port = _listen_port(config)
    # Metrics on a free port too (unless the config says), never the shared default 9091.
    tree.setdefault("metrics", {"listen": f"127.0.0.1:{free_port()}"})
    path = write_yaml(directory / f"{name}.yaml", tree)
    async with spawn(name, ["serve", "--config", str(path)], port, directory, env, path) as child:
        yield child


async def connect_call(client: httpx.AsyncClient, broker: Child, method: str,
                       body: dict[str, Any], *, key: str | None = None,
                       token: str | None = None) -> httpx.Response:
    """One Connect JSON call, e.g. ("BrokerService/Transact", {...}).

    `key` is an agent's API key, `token` the admin token; either is sent as
    `authorization: Bearer ...`.
    """
    headers = dict(CONNECT_JSON)
    bearer = key if key is not None else token
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    return await client.post(f"{broker.url}/ramp.broker.v1.{method}", json=body, headers=headers)
