"""`ramp-broker mcp`, driven by the `mcp` SDK's own client over stdio and streamable HTTP.

The reference Exchange, the broker and the MCP server each run as their own process on
loopback (the stdio server is spawned by the SDK's client, as an MCP host would). The MCP
server is only a client of the broker, so what is checked here is what an LLM agent sees:
the tools, their structured results (amounts as decimal strings), replays that charge
nothing (the Exchange's own count of charges), denials with their reason and next action,
and clear errors for a wrong key or an unreachable broker. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jsonschema
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from broker.mcp.server import BrokerClient, Settings, build_server, purchase_key
from tests.harness import free_port
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    command,
    exchange_state,
    run_cli,
    spawn,
    start_broker,
    start_exchange,
)

A, B, C = "https://x.test/a", "https://x.test/b", "https://x.test/c"  # 1.00, 2.00, 3.00 USD
NOWHERE = "https://nowhere.test/x"
AGENT_KEY = "mcp-agent-key"
TOOLS = {"find_offers", "buy", "get_budget_status", "declare_session_budget"}
# Seconds the client waits for any one answer from the MCP server.
READ_TIMEOUT = 30.0


def usd(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "USD"}


@contextlib.asynccontextmanager
async def exchange_and_broker(tmp_path: Path, month_limit: str = "10.00"
                              ) -> AsyncIterator[tuple[Child, Child]]:
    """The reference Exchange and a broker with one agent (AGENT_KEY), charged to user:alice
    (`month_limit` USD a month) on the embedded store."""
    sha = hashlib.sha256(AGENT_KEY.encode()).hexdigest()
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        config = broker_tree(
            exchange,
            period_budgets={
                "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
                "journal_path": str(tmp_path / "journal.jsonl"),
                "accounts": {"acme": {"scopes": {"user:alice": {"limits": [
                    {"period": "month", "amount": month_limit, "currency": "USD"}]}}}},
            },
            agents=[{"id": "alice-bot", "key_sha256": sha, "account": "acme",
                     "charged_to": ["user:alice"]}],
        )
        async with start_broker(tmp_path, config) as broker:
            yield exchange, broker


def stdio_params(broker_url: str, key: str | None, cwd: Path) -> StdioServerParameters:
    """`ramp-broker mcp` as an MCP host would start it: the broker and key in its environment."""
    exe, *args = command()
    env = {"RAMP_MCP_BROKER_URL": broker_url}
    if key is not None:
        env["RAMP_MCP_API_KEY"] = key
    return StdioServerParameters(command=exe, args=[*args, "mcp"], env=env, cwd=str(cwd))


@contextlib.asynccontextmanager
async def stdio_mcp(broker_url: str, key: str | None, tmp_path: Path) -> AsyncIterator[Client]:
    """An SDK client connected to a spawned `ramp-broker mcp` (its stderr in tmp_path/mcp.log)."""
    with (tmp_path / "mcp.log").open("w", encoding="utf-8") as errlog:
        transport = stdio_client(stdio_params(broker_url, key, tmp_path), errlog=errlog)
        async with Client(transport, read_timeout_seconds=READ_TIMEOUT) as client:
            yield client


def structured(result: CallToolResult) -> dict[str, Any]:
    body = result.structured_content
    assert isinstance(body, dict), result
    found: dict[str, Any] = body
    return found


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def assert_no_floats(value: Any, where: str = "$") -> None:
    """Amounts are decimal strings: no float anywhere in a structured result."""
    assert not isinstance(value, float), f"{where} is a float: {value!r}"
    if isinstance(value, dict):
        for k, v in value.items():
            assert_no_floats(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_floats(v, f"{where}[{i}]")


async def conforms(client: Client, tool: str, body: dict[str, Any]) -> None:
    """A result, a refusal's too, matches the tool's declared output schema: MCP requires it, and
    the TypeScript SDK's client throws on a mismatch even for an error result (the Python SDK's
    checks successes only)."""
    (schema,) = [t.output_schema for t in (await client.list_tools()).tools if t.name == tool]
    assert schema is not None, tool
    jsonschema.validate(body, schema)


async def call(client: Client, tool: str, arguments: dict[str, Any], *,
               error: bool = False) -> dict[str, Any]:
    """Call a tool; its structured content, checked for floats, against the tool's output schema
    and for the expected isError."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error is error, text(result)
    body = structured(result)
    assert_no_floats(body)
    await conforms(client, tool, body)
    assert "Traceback" not in text(result)
    return body


def budget(body: dict[str, Any], layer: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [b for b in body["budgets"] if b["layer"] == layer]
    assert len(found) == 1, body
    return found[0]


async def charges(exchange: Child) -> int:
    async with httpx.AsyncClient(timeout=10.0) as http:
        return int((await exchange_state(http, exchange))["charges"])


# --- stdio --------------------------------------------------------------------------------------------


async def test_stdio_declare_find_buy_replay_deny_status(tmp_path: Path) -> None:
    async with exchange_and_broker(tmp_path) as (exchange, broker), \
            stdio_mcp(broker.url, AGENT_KEY, tmp_path) as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert set(tools) == TOOLS
        assert "COSTS MONEY" in (tools["buy"].description or "")
        for free in ("find_offers", "get_budget_status", "declare_session_budget"):
            assert "FREE" in (tools[free].description or ""), free
        assert tools["find_offers"].annotations
        assert tools["find_offers"].annotations.read_only_hint
        assert tools["buy"].annotations
        assert tools["buy"].annotations.idempotent_hint
        assert all(t.output_schema for t in tools.values())
        assert tools["buy"].input_schema["required"] == ["session_id"]

        declared = await call(mcp, "declare_session_budget", {"session_id": "s1", "limit": usd("3.00")})
        assert declared["budget"]["limit"] == usd("3.00")
        assert declared["budget"]["remaining"] == usd("3.00")

        found = await call(mcp, "find_offers", {"uris": [A, NOWHERE], "session_id": "s1"})
        by_uri = {r["uri"]: r for r in found["results"]}
        (offer,) = by_uri[A]["offers"]
        assert (offer["exchange"], offer["offer_id"], offer["price"]) == ("ref.test", "a", usd("1.00"))
        assert by_uri[NOWHERE]["offers"] == []
        assert by_uri[NOWHERE]["dropped"]["reason"] == "no_offers"
        assert budget(found, "session")["remaining"] == usd("3.00")
        assert await charges(exchange) == 0  # finding offers buys nothing

        # Buy the offer chosen from find_offers.
        chosen = {"uri": A, "exchange": offer["exchange"], "offer_id": offer["offer_id"]}
        arguments = {"session_id": "s1", "offers": [chosen]}
        bought = await call(mcp, "buy", arguments)
        (item,) = bought["items"]
        assert item["status"] == "purchased"
        assert item["cost"] == usd("1.00")
        assert item["transaction_id"]
        assert bought["total_cost"] == usd("1.00")
        assert bought["replayed"] is False
        assert budget(bought, "session")["remaining"] == usd("2.00")
        assert await charges(exchange) == 1

        # The agent retries the same tool call: the stored answer, no second charge.
        again = await call(mcp, "buy", arguments)
        assert again["replayed"] is True
        assert again["idempotency_key"] == bought["idempotency_key"]
        assert again["items"][0]["transaction_id"] == item["transaction_id"]
        assert await charges(exchange) == 1

        # Asked for the same URI with other arguments: refused, not bought twice.
        result = await mcp.call_tool("buy", {"session_id": "s1", "uris": [A],
                                             "max_price": usd("5.00")})
        assert result.is_error, text(result)
        assert structured(result)["error"]["field"] == "purchase_id"
        assert "new purchase_id" in structured(result)["error"]["next_action"]
        assert await charges(exchange) == 1

        # c costs 3.00; the session has 2.00 left: a denial the agent can act on.
        denied = await call(mcp, "buy", {"session_id": "s1", "uris": [C]}, error=True)
        error = denied["error"]
        assert error["code"] == "resource_exhausted"
        assert error["reason"] == "session_budget_exhausted"
        assert error["layer"] == "session"
        assert error["budget"]["needed"] == usd("3.00")
        assert error["budget"]["remaining"] == usd("2.00")
        assert "declare_session_budget tool" in error["next_action"]
        assert "DeclareSessionBudget" not in error["next_action"]
        assert await charges(exchange) == 1

        status = await call(mcp, "get_budget_status", {"session_id": "s1"})
        session = budget(status, "session")
        assert (session["spent"], session["remaining"], session["limit"]) == (
            usd("1.00"), usd("2.00"), usd("3.00"))
        period = budget(status, "period")
        assert (period["scope"], period["period"], period["spent"]) == ("user:alice", "month", usd("1.00"))

        # Raising the session budget as told; the same buy call then goes through.
        await call(mcp, "declare_session_budget", {"session_id": "s1", "limit": usd("5.00")})
        bought_c = await call(mcp, "buy", {"session_id": "s1", "uris": [C]})
        assert bought_c["items"][0]["status"] == "purchased"
        assert await charges(exchange) == 2

        # A new purchase_id buys the same resource again, on purpose.
        once_more = await call(mcp, "buy", {**arguments, "purchase_id": "second-copy"})
        assert once_more["replayed"] is False
        assert once_more["idempotency_key"] != bought["idempotency_key"]
        assert await charges(exchange) == 3


async def test_stdio_wrong_key_and_unreachable_broker_are_clear_errors(tmp_path: Path) -> None:
    async with exchange_and_broker(tmp_path) as (exchange, broker):
        async with stdio_mcp(broker.url, "not-a-key", tmp_path) as mcp:
            for tool, arguments in (("get_budget_status", {"session_id": "s1"}),
                                    ("buy", {"session_id": "s1", "uris": [A]})):
                result = await mcp.call_tool(tool, arguments)
                assert result.is_error, text(result)
                error = structured(result)["error"]
                assert (error["code"], error["reason"]) == ("unauthenticated", "unauthenticated")
                assert "RAMP_MCP_API_KEY" in error["message"]
                assert "RAMP_MCP_API_KEY" in error["next_action"]
                assert "Traceback" not in text(result)
        assert await charges(exchange) == 0

    dead = f"http://127.0.0.1:{free_port()}"
    async with stdio_mcp(dead, AGENT_KEY, tmp_path) as mcp:
        result = await mcp.call_tool("find_offers", {"uris": [A]})
        assert result.is_error, text(result)
        error = structured(result)["error"]
        assert error["code"] == "unavailable"
        assert f"cannot reach the broker at {dead}" in error["message"]
        assert "Traceback" not in text(result)
        # Bad arguments are the tool's error too, never a crash.
        error = (await call(mcp, "buy", {"session_id": "s1", "uris": [A], "max_price": {
            "amount": 2.5, "currency": "USD"}}, error=True))["error"]
        assert (error["code"], error["field"]) == ("invalid_argument", "max_price.amount")
        assert error["message"].startswith('max_price.amount must be a decimal string such as "2.50"')
    assert "Traceback" not in (tmp_path / "mcp.log").read_text(encoding="utf-8")


# --- bad arguments, in process (refused before the broker is called) ------------------------------


@contextlib.asynccontextmanager
async def in_process() -> AsyncIterator[Client]:
    """An SDK client of the server in this process; its broker is never reached."""
    settings = Settings(broker=f"http://127.0.0.1:{free_port()}", key=None,
                        key_env="RAMP_MCP_API_KEY", timeout=5.0)
    async with httpx.AsyncClient(timeout=5.0) as http, \
            Client(build_server(BrokerClient(settings, http))) as client:
        yield client


@pytest.mark.parametrize(("tool", "arguments", "field", "message"), [
    ("buy", {"session_id": "s1", "uris": [A], "max_price": {"amount": 2.5, "currency": "USD"}},
     "max_price.amount", 'max_price.amount must be a decimal string such as "2.50", in quotes, with '
                         "at most 9 digits before and after the point (got 2.5)"),
    ("buy", {"uris": [A]}, "session_id",
     "session_id is missing: it must be 1-128 letters, digits and . _ : @ / + = -"),
    ("buy", {"session_id": "a b", "uris": [A]}, "session_id",
     'session_id must be 1-128 letters, digits and . _ : @ / + = - (got "a b")'),
    ("find_offers", {"uris": [A, 7]}, "uris[1]", "uris[1] must be a resource URI (a string) (got 7)"),
    ("find_offers", {"uris": []}, "uris",
     "uris must be a list of 1 to 256 resource URIs (strings) (got a list of 0)"),
    ("buy", {"session_id": "s1", "offers": [{"uri": A}]}, "offers[0].exchange",
     "offers[0].exchange is missing: it must be the offer's exchange as find_offers gave it (a "
     "non-empty string); also wrong: offers[0].offer_id"),
    ("declare_session_budget", {"session_id": "s1", "limit": {"amount": "5", "currency": "usd"}},
     "limit.currency", 'limit.currency must be a three-letter ISO 4217 code in capitals, such as '
                       '"USD" (got "usd")'),
    ("get_budget_status", {"budget_scope": ["a"]}, "budget_scope",
     "budget_scope must be the name of a budget scope your key may charge, such as project:q4 (got "
     "a list of 1)"),
])
async def test_bad_arguments_are_one_sentence_naming_the_argument(
        tool: str, arguments: dict[str, Any], field: str, message: str) -> None:
    async with in_process() as mcp:
        result = await mcp.call_tool(tool, arguments)
        assert result.is_error
        await conforms(mcp, tool, structured(result))
    error = structured(result)["error"]
    assert error == {"code": "invalid_argument", "message": message, "field": field,
                     "next_action": f"correct {field} and call {tool} again"}
    assert text(result).startswith(f"{tool} refused (invalid_argument): {message}\n")
    assert "pydantic" not in text(result)


async def test_server_info_names_the_package_version() -> None:
    async with in_process() as mcp:
        assert mcp.server_info is not None
        assert (mcp.server_info.name, mcp.server_info.version) == ("ramp-broker", version("ramp-broker"))


# --- streamable HTTP ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_mcp_server(broker: Child, tmp_path: Path, key: str | None) -> AsyncIterator[str]:
    """`ramp-broker mcp --transport http` on a free loopback port; yields its /mcp URL."""
    port = free_port()
    env = {"RAMP_MCP_BROKER_URL": broker.url, **({"RAMP_MCP_API_KEY": key} if key else {})}
    async with spawn("mcp", ["mcp", "--transport", "http", "--listen", f"127.0.0.1:{port}"],
                     port, tmp_path, env):
        yield f"http://127.0.0.1:{port}/mcp"


async def test_http_buy_replay_period_denial_status(tmp_path: Path) -> None:
    async with exchange_and_broker(tmp_path, month_limit="4.00") as (exchange, broker), \
            http_mcp_server(broker, tmp_path, AGENT_KEY) as url, \
            Client(url, read_timeout_seconds=READ_TIMEOUT) as mcp:
        assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
        await call(mcp, "declare_session_budget", {"session_id": "h1", "limit": usd("10.00")})

        arguments = {"session_id": "h1", "uris": [B]}
        bought = await call(mcp, "buy", arguments)
        assert bought["items"][0]["status"] == "purchased"
        assert bought["total_cost"] == usd("2.00")
        again = await call(mcp, "buy", arguments)
        assert again["replayed"] is True
        assert await charges(exchange) == 1

        # user:alice has 2.00 of 4.00 left this month; c costs 3.00.
        result = await mcp.call_tool("buy", {"session_id": "h1", "uris": [C]})
        assert result.is_error, text(result)
        error = structured(result)["error"]
        assert (error["reason"], error["layer"], error["scope"]) == (
            "period_budget_exhausted", "period", "user:alice")
        assert error["budget"]["remaining"] == usd("2.00")
        assert error["retry_at"]  # the month's end
        assert "wait for the month period to reset" in error["next_action"]
        assert "Next: wait for the month period to reset" in text(result)
        assert "Nothing was bought or charged." in text(result)
        assert await charges(exchange) == 1

        status = await call(mcp, "get_budget_status", {"session_id": "h1"})
        assert budget(status, "period")["remaining"] == usd("2.00")
        assert budget(status, "session")["spent"] == usd("2.00")


async def test_http_client_key_is_passed_to_the_broker(tmp_path: Path) -> None:
    """Over HTTP a client's own bearer key is what the broker checks, not the server's."""
    async with exchange_and_broker(tmp_path) as (_, broker), \
            http_mcp_server(broker, tmp_path, None) as url:
        for key, ok in (("wrong-key", False), (AGENT_KEY, True)):
            http = httpx2.AsyncClient(headers={"authorization": f"Bearer {key}"},
                                      timeout=httpx2.Timeout(30.0, read=READ_TIMEOUT))
            async with http, Client(streamable_http_client(url, http_client=http),
                                    read_timeout_seconds=READ_TIMEOUT) as mcp:
                result = await mcp.call_tool("declare_session_budget",
                                             {"session_id": "k1", "limit": usd("1.00")})
                assert result.is_error is not ok, text(result)
                if not ok:
                    error = structured(result)["error"]
                    assert error["code"] == "unauthenticated"
                    assert "MCP client" in error["message"]


async def test_http_refuses_non_loopback_and_taken_ports(tmp_path: Path) -> None:
    refused = run_cli(["mcp", "--transport", "http", "--listen", "0.0.0.0:8765"], tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "not a loopback address" in refused.stderr
    assert "--allow-remote" in refused.stderr

    bad = run_cli(["mcp", "--transport", "http", "--listen", "localhost"], tmp_path)
    assert bad.returncode == 2
    assert "is not HOST:PORT" in bad.stderr

    async with exchange_and_broker(tmp_path) as (_, broker):
        taken = int(broker.url.rsplit(":", 1)[1])
        busy = run_cli(["mcp", "--transport", "http", "--listen", f"127.0.0.1:{taken}"], tmp_path)
        assert busy.returncode == 2, busy.stderr
        assert "cannot listen" in busy.stderr
        assert "Traceback" not in busy.stderr

    url = run_cli(["mcp", "--broker", "ftp://x"], tmp_path)
    assert url.returncode == 2
    assert "not an http:// or https:// URL" in url.stderr


# --- the idempotency key ------------------------------------------------------------------------------


def test_purchase_key_identifies_the_purchase_not_the_wording() -> None:
    key = purchase_key("s", [A, B], None)
    assert key == purchase_key("s", [B, A, A], None)  # order and repeats: the same purchase
    assert key != purchase_key("s", [A], None)
    assert key != purchase_key("t", [A, B], None)
    assert key != purchase_key("s", [A, B], "2")
    assert len(key) <= 128
    assert key.startswith("mcp-")


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0", "localhost:0"])
def test_loopback_addresses_are_accepted(listen: str) -> None:
    from broker.mcp.cli import listen_address

    host, port = listen_address(listen, allow_remote=False)
    assert port == 0
    assert host in ("127.0.0.1", "::1", "localhost")
