"""The `ramp-broker` command line, run as real processes on loopback.

The reference Exchange and the broker each run as their own process on a free
127.0.0.1 port; the test talks to them over HTTP only. Every wait is bounded,
and every child is killed on the way out whatever happened.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import CONNECT_JSON, free_port
from tests.processes import Child, run_cli, spawn, write_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_BROKER = ROOT / "examples" / "broker.yaml"
EXAMPLE_CATALOG = ROOT / "examples" / "catalog.yaml"
ARTICLE_1 = "https://news.example/articles/1"  # 0.50 USD in examples/catalog.yaml
ARTICLE_2 = "https://news.example/articles/2"  # 0.75 USD


def _example(path: Path) -> dict[str, Any]:
    tree: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return tree


@pytest.fixture
async def exchange(tmp_path: Path) -> AsyncIterator[Child]:
    """The reference Exchange from a copy of the example catalog, its port rewritten."""
    port = free_port()
    tree = _example(EXAMPLE_CATALOG)
    tree["listen"] = f"127.0.0.1:{port}"
    catalog = write_yaml(tmp_path / "catalog.yaml", tree)
    async with spawn("exchange", ["exchange", "--catalog", str(catalog)], port, tmp_path) as child:
        yield child


@pytest.fixture
async def broker(exchange: Child, tmp_path: Path) -> AsyncIterator[Child]:
    """The broker from the example config itself, pointed by environment overrides."""
    port = free_port()
    env = {
        "RAMP_BROKER_LISTEN": f"127.0.0.1:{port}",
        "RAMP_BROKER_METRICS__LISTEN": f"127.0.0.1:{free_port()}",
        "RAMP_BROKER_EXCHANGES__0__ENDPOINT": exchange.url,
    }
    async with spawn("broker", ["serve", "--config", str(EXAMPLE_BROKER)], port, tmp_path,
                     env) as child:
        yield child


async def call(client: httpx.AsyncClient, broker: Child, method: str,
               body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"{broker.url}/ramp.broker.v1.{method}", json=body,
                             headers=CONNECT_JSON)


async def exchange_state(client: httpx.AsyncClient, exchange: Child) -> dict[str, Any]:
    r = await client.get(f"{exchange.url}/admin/state")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()
    return state


# --- serving --------------------------------------------------------------


async def test_purchase_then_budget_exhausted(broker: Child, exchange: Child) -> None:
    health = await broker.wait_healthy()
    assert health["exchanges"] == ["ref.exchange.local"]
    async with httpx.AsyncClient(timeout=15.0) as client:
        r = await call(client, broker, "BudgetService/DeclareSessionBudget",
                       {"sessionId": "s1", "limit": {"amount": "1.00", "currency": "USD"}})
        assert r.status_code == 200, r.text

        r = await call(client, broker, "BrokerService/Transact",
                       {"sessionId": "s1", "idempotencyKey": "k1", "uris": [ARTICLE_1]})
        assert r.status_code == 200, r.text
        (item,) = r.json()["items"]
        assert item["status"] == "ITEM_STATUS_PURCHASED"
        assert item["result"]["cost"] == {"amount": "0.50", "currency": "USD"}

        # 0.75 does not fit in the 0.50 left: refused before the Exchange is asked.
        r = await call(client, broker, "BrokerService/Transact",
                       {"sessionId": "s1", "idempotencyKey": "k2", "uris": [ARTICLE_2]})
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "resource_exhausted"

        state = await exchange_state(client, exchange)
        assert state["charges"] == 1
        assert state["balances"]["ramp-broker"]["USD"] == "99.50"

    # SIGINT stops the Exchange as cleanly as SIGTERM stops the broker.
    exchange.proc.send_signal(signal.SIGINT)
    assert await exchange.wait_exit() == 0, exchange.stderr
    assert "reference exchange stopped" in exchange.stderr
    assert "Traceback" not in exchange.stderr


async def test_sigterm_lets_in_flight_purchase_finish(broker: Child, exchange: Child) -> None:
    async with httpx.AsyncClient(timeout=15.0) as client:
        r = await client.post(f"{exchange.url}/admin/knobs", json={"execute_latency_ms": 1000})
        assert r.status_code == 200, r.text
        # No declared budget: the example's session.default_limit (2.00 USD) applies.
        purchase = asyncio.create_task(call(
            client, broker, "BrokerService/Transact",
            {"sessionId": "s-term", "idempotencyKey": "k1", "uris": [ARTICLE_1]}))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            # The Exchange counts the call before sleeping: the purchase is in flight.
            while (await exchange_state(client, exchange))["execute_calls"] < 1:
                assert not purchase.done(), purchase.result().text
                assert loop.time() < deadline, "the purchase never reached the Exchange"
                await asyncio.sleep(0.02)
            broker.proc.send_signal(signal.SIGTERM)

            r = await asyncio.wait_for(purchase, 10.0)
        finally:
            purchase.cancel()
        assert r.status_code == 200, r.text
        (item,) = r.json()["items"]
        assert item["status"] == "ITEM_STATUS_PURCHASED"
        assert (await exchange_state(client, exchange))["charges"] == 1

    assert await broker.wait_exit() == 0, broker.stderr
    assert "broker stopped" in broker.stderr
    assert "Traceback" not in broker.stderr


# --- configuration errors -------------------------------------------------


def _valid_broker() -> dict[str, Any]:
    tree = _example(EXAMPLE_BROKER)
    tree["listen"] = f"127.0.0.1:{free_port()}"
    return tree


def _with(**changes: Any) -> dict[str, Any]:
    tree = _valid_broker()
    tree.update(changes)
    return tree


_EXCHANGE = {"name": "ref.exchange.local", "endpoint": "http://127.0.0.1:9191"}

# id -> (broker.yaml contents, environment, text stderr must hold)
BROKER_ERRORS: dict[str, tuple[Any, dict[str, str], str]] = {
    "bad listen": (_with(listen="localhost"), {}, " listen: "),
    "listen port out of range": (_with(listen="127.0.0.1:70000"), {}, " listen: "),
    "unknown key": (_with(listne="127.0.0.1:9090"), {}, " listne: "),
    "unknown nested key": (
        _with(fanout={"overall_timout_ms": 100}), {}, " fanout.overall_timout_ms: "),
    "bad endpoint": (
        _with(exchanges=[{**_EXCHANGE, "endpoint": "127.0.0.1:9191"}]), {},
        " exchanges.0.endpoint: "),
    "default limit with exponent": (
        _with(session={"default_limit": {"amount": "1e3", "currency": "USD"}}), {},
        " session.default_limit.amount: "),
    "default limit bad currency": (
        _with(session={"default_limit": {"amount": "1.00", "currency": "XYZ"}}), {},
        " session.default_limit.currency: "),
    "duplicate exchange": (_with(exchanges=[_EXCHANGE, _EXCHANGE]), {}, " exchanges: "),
    "bad rate": (_with(rates={"EUR": {"USD": "-1"}}), {}, " rates: "),
    "env override not an integer": (
        _valid_broker(), {"RAMP_BROKER_FANOUT__OVERALL_TIMEOUT_MS": "abc"},
        " fanout.overall_timeout_ms: "),
    "env override bad listen": (
        _valid_broker(), {"RAMP_BROKER_LISTEN": "127.0.0.1"}, " listen: "),
    "env override missing list item": (
        _valid_broker(), {"RAMP_BROKER_EXCHANGES__7__ENDPOINT": "http://127.0.0.1:1"},
        "RAMP_BROKER_EXCHANGES__7__ENDPOINT"),
    "top level not a mapping": (["listen", "127.0.0.1:9090"], {}, "top level must be a mapping"),
}


def _assert_config_error(result: subprocess.CompletedProcess[str], expect: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "ramp-broker: configuration error: " in result.stderr
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # Refused before serving anything.
    assert "listening" not in result.stderr, result.stderr


@pytest.mark.parametrize("case", list(BROKER_ERRORS))
def test_broker_config_error(case: str, tmp_path: Path) -> None:
    tree, env, expect = BROKER_ERRORS[case]
    config = write_yaml(tmp_path / "broker.yaml", tree)
    result = run_cli(["serve", "--config", str(config)], tmp_path, env)
    _assert_config_error(result, expect)
    assert str(config) in result.stderr or "RAMP_BROKER_" in expect


def test_broker_config_error_from_env_without_file(tmp_path: Path) -> None:
    result = run_cli(["serve"], tmp_path, {"RAMP_BROKER_FANOUT__OVERALL_TIMEOUT_MS": "abc"})
    _assert_config_error(result, " fanout.overall_timeout_ms: ")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "broker.yaml"
    result = run_cli(["serve", "--config", str(missing)], tmp_path)
    _assert_config_error(result, f"{missing}: cannot read")


def test_config_file_not_yaml(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("listen: [127.0.0.1:9090\n", encoding="utf-8")
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    _assert_config_error(result, f"{config}: not valid YAML")


def test_config_file_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_bytes(b"listen: \"127.0.0.1:\xff\"\n")
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    _assert_config_error(result, str(config))


def _valid_catalog() -> dict[str, Any]:
    tree = _example(EXAMPLE_CATALOG)
    tree["listen"] = f"127.0.0.1:{free_port()}"
    return tree


def _catalog_with_offer(**changes: Any) -> dict[str, Any]:
    tree = _valid_catalog()
    tree["offers"][0].update(changes)
    return tree


# id -> (catalog.yaml contents, environment, text stderr must hold, and one more)
CATALOG_ERRORS: dict[str, tuple[Any, dict[str, str], str, str]] = {
    "bad rate": (_catalog_with_offer(rate="abc"), {}, " offers.0.rate: ", "'abc'"),
    "bad currency": (_catalog_with_offer(currency="usd"), {}, " offers.0.currency: ", "'usd'"),
    "unknown offer key": (_catalog_with_offer(prize="1.00"), {}, " offers.0.prize: ", "prize"),
    "bad knob": (_valid_catalog() | {"knobs": {"execute_latency_ms": -1}}, {},
                 " knobs.execute_latency_ms: ", "greater than or equal to 0"),
    "env override bad listen": (
        _valid_catalog(), {"RAMP_EXCHANGE_LISTEN": "nope"}, " listen: ", "'nope'"),
}


@pytest.mark.parametrize("case", list(CATALOG_ERRORS))
def test_catalog_config_error(case: str, tmp_path: Path) -> None:
    tree, env, expect, also = CATALOG_ERRORS[case]
    catalog = write_yaml(tmp_path / "catalog.yaml", tree)
    result = run_cli(["exchange", "--catalog", str(catalog)], tmp_path, env)
    _assert_config_error(result, expect)
    assert also in result.stderr, result.stderr


# --- usage ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["exchange", "--help"]])
def test_help(args: list[str], tmp_path: Path) -> None:
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ramp-broker"), result.stdout
    assert "Traceback" not in result.stderr


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli([], tmp_path)
    assert result.returncode == 2
    assert "usage: ramp-broker" in result.stderr


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    # The listen address is bad too, so a fixed build exits either way instead of serving.
    result = run_cli(["--log-level", "LOUD", "serve"], tmp_path, {"RAMP_BROKER_LISTEN": "nope"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
