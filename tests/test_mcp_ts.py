"""`ramp-broker mcp` as a host built on the official TypeScript SDK sees it (tests/mcp_ts).

The TypeScript SDK's client checks every tool result that carries structured content against
the tool's output schema, error results included, and throws (McpError -32602) on a mismatch:
a refusal that does not match the schema never reaches the agent. tests/mcp_ts/client.mjs runs
a host's calls over stdio (spawning `ramp-broker mcp` as a host does) and over streamable HTTP,
against the reference Exchange and a broker running as their own processes, and prints what
the SDK handed back. `make test` installs its node_modules (npm ci); without node or them the
tests fail saying so, they are never skipped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.processes import command
from tests.test_mcp import AGENT_KEY, TOOLS, A, C, charges, exchange_and_broker, http_mcp_server, usd

CLIENT_DIR = Path(__file__).with_name("mcp_ts")
# Seconds for one run of the client: connecting, listing and every call (each call waits 30 s
# at most).
RUN_TIMEOUT = 100.0


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node (Node.js 20+) is not on PATH: these tests drive the MCP server with the "
                    "TypeScript SDK's client; install Node.js and npm, then run `make test`")
    if not (CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        pytest.fail(f"{CLIENT_DIR}/node_modules is not installed: run `make ts-client` (make test "
                    "does), which runs npm ci there")
    return found


async def run_client(sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run tests/mcp_ts/client.mjs with these sessions; what it printed for each."""
    proc = await asyncio.create_subprocess_exec(
        node(), str(CLIENT_DIR / "client.mjs"), cwd=CLIENT_DIR, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(json.dumps({"sessions": sessions}).encode()), RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    found: list[dict[str, Any]] = json.loads(out)["sessions"]
    return found


def stdio(broker_url: str, key: str, cwd: Path) -> dict[str, Any]:
    exe, *args = command()
    return {"stdio": {"command": exe, "args": [*args, "mcp"], "cwd": str(cwd),
                      "env": {"RAMP_MCP_BROKER_URL": broker_url, "RAMP_MCP_API_KEY": key}}}


def http(url: str, key: str | None = None) -> dict[str, Any]:
    return {"http": {"url": url, "headers": {"authorization": f"Bearer {key}"} if key else {}}}


# What a host asks, in order; c costs 3.00, and the session has 2.00 left after buying a.
BUY_A = {"session_id": "s1", "uris": [A]}
CALLS = [
    {"tool": "declare_session_budget", "arguments": {"session_id": "s1", "limit": usd("3.00")}},
    {"tool": "buy", "arguments": BUY_A},
    {"tool": "buy", "arguments": BUY_A},  # the host retries: replayed
    {"tool": "buy", "arguments": {"session_id": "s1", "uris": [C]}},  # exhausts the session
    {"tool": "buy", "arguments": {**BUY_A, "max_price": {"amount": 2.5, "currency": "USD"}}},
    {"tool": "get_budget_status", "arguments": {"session_id": "s1"}},
]
WRONG_KEY_CALLS = [{"tool": "buy", "arguments": BUY_A},
                   {"tool": "get_budget_status", "arguments": {"session_id": "s1"}}]


def answered(call: dict[str, Any], *, error: bool) -> dict[str, Any]:
    """A call's structured content, checked: the SDK did not throw, isError as expected."""
    assert "thrown" not in call, call  # the TypeScript SDK refused the result
    assert call["isError"] is error, call
    assert "Traceback" not in call["text"]
    body: dict[str, Any] = call["structuredContent"]
    assert isinstance(body, dict), call
    return body


def refusal(call: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = answered(call, error=True)["error"]
    return found


def check_session(session: dict[str, Any]) -> None:
    """The main session's answers, as the TypeScript SDK handed them to the host."""
    tools = {t["name"]: t for t in session["tools"]}
    assert set(tools) == TOOLS
    assert all(t["outputSchema"]["type"] == "object" for t in tools.values())
    declared, bought, again, exhausted, bad, status = session["calls"]

    assert answered(declared, error=False)["budget"]["limit"] == usd("3.00")
    first = answered(bought, error=False)
    assert (first["replayed"], first["total_cost"]) == (False, usd("1.00"))
    assert first["items"][0]["status"] == "purchased"
    replay = answered(again, error=False)
    assert replay["replayed"] is True
    assert replay["items"][0]["transaction_id"] == first["items"][0]["transaction_id"]

    denial = refusal(exhausted)
    assert (denial["code"], denial["reason"], denial["layer"], denial["scope"]) == (
        "resource_exhausted", "session_budget_exhausted", "session", "s1")
    assert (denial["budget"]["needed"], denial["budget"]["remaining"]) == (usd("3.00"), usd("2.00"))
    assert "declare_session_budget tool" in denial["next_action"]
    assert "Nothing was bought or charged." in exhausted["text"]

    wrong = refusal(bad)
    assert (wrong["code"], wrong["field"]) == ("invalid_argument", "max_price.amount")
    assert wrong["message"].startswith('max_price.amount must be a decimal string such as "2.50"')
    assert "(got 2.5)" in wrong["message"]
    assert "\n" not in wrong["message"]
    assert "pydantic" not in bad["text"]

    assert answered(status, error=False)["budgets"][0]["spent"] == usd("1.00")
    assert session["server"] == {"name": "ramp-broker", "version": version("ramp-broker")}


def check_wrong_key(session: dict[str, Any], refused: str, fix: str) -> None:
    """Each call with a wrong key: unauthenticated, saying which key and how to fix it."""
    for call in session["calls"]:
        error = refusal(call)
        assert (error["code"], error["reason"]) == ("unauthenticated", "unauthenticated")
        assert f"the broker refused {refused}" in error["message"]
        assert fix in error["next_action"]


async def test_typescript_host_over_stdio(tmp_path: Path) -> None:
    async with exchange_and_broker(tmp_path) as (exchange, broker):
        session, wrong_key = await run_client([
            {"connect": stdio(broker.url, AGENT_KEY, tmp_path), "calls": CALLS},
            {"connect": stdio(broker.url, "not-a-key", tmp_path), "calls": WRONG_KEY_CALLS}])
        check_session(session)
        check_wrong_key(wrong_key, "the agent key in $RAMP_MCP_API_KEY", "set $RAMP_MCP_API_KEY")
        assert "Traceback" not in session["stderr"] + wrong_key["stderr"]
        assert await charges(exchange) == 1


async def test_typescript_host_over_streamable_http(tmp_path: Path) -> None:
    async with exchange_and_broker(tmp_path) as (exchange, broker), \
            http_mcp_server(broker, tmp_path, AGENT_KEY) as url:
        session, wrong_key = await run_client([
            {"connect": http(url), "calls": CALLS},
            # A client's own key is what the broker checks (here a wrong one).
            {"connect": http(url, "not-a-key"), "calls": WRONG_KEY_CALLS}])
        check_session(session)
        check_wrong_key(wrong_key, "the agent key this MCP client sent", "configure the MCP client")
        assert await charges(exchange) == 1
