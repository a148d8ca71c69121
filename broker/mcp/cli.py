"""`ramp-broker mcp`: the command line of the Model Context Protocol server.

Kept apart from `broker.mcp.server` (which imports the `mcp` SDK, Starlette and
uvicorn) so that every other `ramp-broker` command starts without loading them.

The server is a client of a running broker. Its address is `--broker`, else
$RAMP_MCP_BROKER_URL, else http://127.0.0.1:9090; the agent's API key is read
from $RAMP_MCP_API_KEY (or the variable named by `--key-env`), never from the
command line, where other users could read it in the process list. Neither
variable is a RAMP_BROKER_* one: those are config overrides to `ramp-broker serve`.

Exit codes: 0 stopped, 2 a usage or setup problem (a bad URL or address, a
non-loopback address without --allow-remote, a port that cannot be listened on).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from common.arguments import http_url, seconds_argument

DEFAULT_URL = "http://127.0.0.1:9090"
URL_ENV = "RAMP_MCP_BROKER_URL"
DEFAULT_KEY_ENV = "RAMP_MCP_API_KEY"
DEFAULT_LISTEN = "127.0.0.1:8765"
EXIT_OK, EXIT_USAGE = 0, 2


class UsageError(Exception):
    """A flag or variable that cannot be used: one line on stderr, exit 2."""


def broker_url(given: str | None) -> str:
    """`--broker`, else $RAMP_MCP_BROKER_URL, else the default."""
    try:
        return http_url(given, URL_ENV, DEFAULT_URL)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def api_key(env_name: str) -> str | None:
    """The agent key from the environment; None (key-less calls) when the variable is unset."""
    if not env_name or not env_name.replace("_", "").isalnum():
        raise UsageError(f"--key-env: {env_name[:100]!r} is not an environment variable name")
    key = os.environ.get(env_name, "").strip()
    if key and not key.isprintable():
        raise UsageError(f"${env_name} holds characters that cannot be sent in a header")
    return key or None


def listen_address(text: str, allow_remote: bool) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) to listen on; anything but loopback only with --allow-remote."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen: {text[:100]!r} is not HOST:PORT (such as {DEFAULT_LISTEN})")
    if not allow_remote and not is_loopback(host):
        raise UsageError(
            f"--listen: {host!r} is not a loopback address; the MCP server spends the agent's "
            "budget for whoever can reach it, so it listens on 127.0.0.1 / ::1 / localhost only, "
            "unless --allow-remote is given")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback
                               for i in infos)


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `mcp` command, added to the `ramp-broker` parser."""
    mcp = sub.add_parser(
        "mcp", help="serve the Model Context Protocol to LLM agents (a client of a running broker)",
        description="A Model Context Protocol server whose tools find offers, buy, read budget "
                    "status and declare session budgets through a running broker, with the agent "
                    f"key from ${DEFAULT_KEY_ENV}: every budget and authorization rule of the "
                    "broker applies. stdio by default (for an MCP client that starts it), or "
                    "streamable HTTP on a loopback port.")
    mcp.add_argument("--broker", metavar="URL",
                     help=f"the broker's address (default: ${URL_ENV}, else {DEFAULT_URL})")
    mcp.add_argument("--key-env", metavar="NAME", default=DEFAULT_KEY_ENV,
                     help=f"the environment variable holding the agent's API key (default: "
                          f"{DEFAULT_KEY_ENV}; unset: key-less calls)")
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                     help="stdio (default), or streamable HTTP at http://LISTEN/mcp")
    mcp.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN,
                     help=f"with --transport http: where to listen (default: {DEFAULT_LISTEN}; "
                          "loopback only unless --allow-remote)")
    mcp.add_argument("--allow-remote", action="store_true",
                     help="allow --listen on a non-loopback address (anyone who reaches it spends "
                          "the agent's budget)")
    mcp.add_argument("--timeout", metavar="SECONDS", type=seconds_argument, default=30.0,
                     help="give up on one broker call after this long (default: 30)")


def run(args: argparse.Namespace) -> int:
    """Run `ramp-broker mcp` until stdin closes (stdio) or a signal (http)."""
    try:
        url = broker_url(args.broker)
        key = api_key(args.key_env)
        listen = listen_address(args.listen, args.allow_remote) if args.transport == "http" else None
    except UsageError as exc:
        print(f"ramp-broker mcp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from broker.mcp import server

    settings = server.Settings(broker=url, key=key, key_env=args.key_env, timeout=args.timeout)
    try:
        if listen is None:
            server.run_stdio(settings)
        else:
            host, port = listen
            server.run_http(settings, host, port, remote=not is_loopback(host))
    except server.ListenFailed as exc:
        print(f"ramp-broker mcp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return EXIT_OK
