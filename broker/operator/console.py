"""`ramp-broker budget ...` and `holds ...`: a running broker's per-period budgets and unsettled
holds, from a terminal.

The commands call the broker's admin API (BudgetAdminService) as Connect JSON over
HTTP, with the admin token read from an environment variable (never from the
command line, where other users could read it in the process list). Tables are
drawn with rich on stdout; errors are one or two lines on stderr. Exit codes:

    0  done
    1  the broker refused or failed the call (its message is printed)
    2  usage or local setup: a bad option or value, the token variable unset
    3  the broker could not be reached: down, wrong address, or no answer in time

The broker's address is `--broker`, else $RAMP_ADMIN_URL, else
http://127.0.0.1:9090 (the broker's default `listen`). The variable is not
RAMP_BROKER_URL: every RAMP_BROKER_* variable is a config override to
`ramp-broker serve`, which would refuse an unknown `url` setting.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.arguments import http_url, seconds_argument
from currency.money import MoneyError, parse_amount
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

DEFAULT_URL = "http://127.0.0.1:9090"
URL_ENV = "RAMP_ADMIN_URL"
DEFAULT_TOKEN_ENV = "RAMP_ADMIN_TOKEN"
SERVICE = "ramp.broker.v1.BudgetAdminService"

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
_INT32_MAX = 2**31 - 1
# Width of tables when stdout is not a terminal (a pipe, a file, a test).
_PIPE_WIDTH = 200

M = TypeVar("M", bound=Message)


class CliError(Exception):
    """Something to tell the user on stderr, and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- the admin API client -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful call: the response message and the JSON body it was read from."""

    message: Message
    body: dict[str, Any]


def broker_url(given: str | None) -> str:
    """`--broker`, else $RAMP_ADMIN_URL, else the default."""
    try:
        return http_url(given, URL_ENV, DEFAULT_URL)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def admin_token(env_name: str) -> str:
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise CliError(
            f"environment variable {env_name} is not set: put the broker's admin token in it "
            "(the value of the variable its admin.token_env names), or name another variable "
            "with --token-env", EXIT_USAGE)
    return token


class AdminClient:
    def __init__(self, url: str, token: str, token_env: str, timeout: float) -> None:
        self.url = url
        self.token_env = token_env
        self.timeout = timeout
        self._headers = {
            "content-type": "application/json",
            "connect-protocol-version": "1",
            "connect-timeout-ms": str(max(1, int(timeout * 1000))),
            "authorization": f"Bearer {token}",
        }

    def call(self, method: str, request: Message, response: type[M]) -> tuple[M, dict[str, Any]]:
        endpoint = f"{self.url}/{SERVICE}/{method}"
        try:
            with httpx.Client(timeout=self.timeout) as client:
                r = client.post(endpoint, json=MessageToDict(request), headers=self._headers)
        except httpx.TimeoutException:
            raise CliError(f"the broker at {self.url} did not answer within {self.timeout:g} s "
                           "(--timeout)", EXIT_UNREACHABLE) from None
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the broker at {self.url} ({_reason(exc)}); is `ramp-broker serve` "
                f"running? (--broker / {URL_ENV})", EXIT_UNREACHABLE) from None
        except httpx.TransportError as exc:
            raise CliError(f"lost the connection to the broker at {self.url} ({_reason(exc)})",
                           EXIT_UNREACHABLE) from None
        if r.status_code != 200:
            raise self._refusal(r)
        try:
            body = r.json()
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            return ParseDict(body, response(), ignore_unknown_fields=True), body
        except (ValueError, ParseError) as exc:
            raise CliError(f"the broker at {self.url} sent an answer this command cannot read "
                           f"({str(exc)[:200]})", EXIT_REFUSED) from None

    def _refusal(self, r: httpx.Response) -> CliError:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("code"), str)):
            if r.status_code == 404:
                return CliError(
                    f"{self.url} does not serve the admin API ({SERVICE}); a ramp-broker serves it "
                    "only when period budgets are configured", EXIT_REFUSED)
            return CliError(f"the broker at {self.url} answered HTTP {r.status_code}: "
                            f"{r.text.strip()[:200]!r}", EXIT_REFUSED)
        code: str = body["code"]
        if code == "unauthenticated":
            return CliError(
                f"the broker refused the admin token in ${self.token_env} (unauthenticated)\n"
                "  put the token the broker reads from its admin.token_env variable in "
                f"${self.token_env}, or name another variable with --token-env", EXIT_REFUSED)
        message = str(body.get("message") or "no message")
        hint = _next_action(body.get("details"))
        return CliError(f"{message} ({code})" + (f"\n  {hint}" if hint else ""), EXIT_REFUSED)


def _reason(exc: httpx.TransportError) -> str:
    """The error's words, e.g. "connection refused" (from "[Errno 111] Connection refused")."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip()
    return (text[:1].lower() + text[1:]) if text else type(exc).__name__


def _next_action(details: Any) -> str:
    """The Denial detail's advice, when the error carries one."""
    if not isinstance(details, list):
        return ""
    for d in details:
        if isinstance(d, dict) and d.get("type") == "ramp.broker.v1.Denial":
            try:
                raw = base64.b64decode(str(d.get("value", "")) + "==")
                return bpb.Denial.FromString(raw).next_action
            except (binascii.Error, DecodeError, ValueError):
                return ""
    return ""


# --- rendering ------------------------------------------------------------------------------------


def stdout_console() -> Console:
    """Tables on stdout: the terminal's width and colours, or wide and plain into a pipe."""
    tty = sys.stdout.isatty()
    return Console(width=None if tty else _PIPE_WIDTH, highlight=False, emoji=False,
                   no_color=not tty)


def _dash(console: Console) -> str:
    return "—" if console.encoding.lower().replace("-", "").startswith("utf") else "-"


def _when(ts: Timestamp, *, seconds: bool = False) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def _decimal(cost: rpb.Cost) -> Decimal | None:
    try:
        value = Decimal(cost.amount)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def used_percent(state: bpb.BudgetState) -> Decimal | None:
    """(spent + reserved) / limit in percent, one decimal, rounded down (so 100.0 means used up);
    None when the limit is zero or a number is unreadable."""
    limit, spent, reserved = _decimal(state.limit), _decimal(state.spent), _decimal(state.reserved)
    if limit is None or spent is None or reserved is None or limit <= 0:
        return None
    return ((spent + reserved) * 100 / limit).quantize(Decimal("0.1"), rounding=ROUND_FLOOR)


def _rate(cost: rpb.Cost) -> str:
    """An estimate: cents are plenty (the broker sends up to nine decimals)."""
    value = _decimal(cost)
    if value is None or abs(value) < Decimal("0.01"):
        return cost.amount
    return format(value.quantize(Decimal("0.01")), "f")


def _style(pct: Decimal | None) -> str:
    if pct is None:
        return ""
    return "bold red" if pct >= 90 else "yellow" if pct >= 75 else ""


def _mode(mode: int) -> str:
    try:
        return bpb.EnforcementMode.Name(mode).removeprefix("ENFORCEMENT_MODE_").lower()
    except ValueError:
        return str(mode)


def status_table(resp: bpb.ScopeStatusResponse, dash: str) -> Table:
    as_of = max((b.as_of.ToDatetime(tzinfo=UTC) for b in resp.budgets if b.HasField("as_of")),
                default=None)
    caption = f"as of {as_of:%Y-%m-%d %H:%M:%S} UTC" if as_of is not None else None
    table = Table(title="period budgets", caption=caption, caption_justify="left")
    table.add_column("scope", no_wrap=True)
    table.add_column("period", no_wrap=True)
    for name in ("limit", "spent", "reserved", "remaining", "used %"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("resets", no_wrap=True)
    table.add_column("projected exhaustion", no_wrap=True)
    table.add_column("rate/h", justify="right", no_wrap=True)
    table.add_column("mode")
    table.add_column("policy")
    for b in resp.budgets:
        pct = used_percent(b)
        table.add_row(
            Text(b.scope), Text(b.period or dash),
            Text(f"{b.limit.amount} {b.limit.currency}"), Text(b.spent.amount), Text(b.reserved.amount),
            Text(b.remaining.amount),
            Text(f"{pct}%" if pct is not None else dash, style=_style(pct)),
            Text(_when(b.period_end) if b.HasField("period_end") else dash),
            Text(_when(b.projected_exhaustion) if b.HasField("projected_exhaustion") else dash),
            Text(_rate(b.spend_rate_per_hour) if b.HasField("spend_rate_per_hour") else dash),
            Text(_mode(b.mode)), Text(b.failure_policy or dash),
        )
    return table


def history_table(scope: str, resp: bpb.GetScopeHistoryResponse, dash: str) -> Table:
    table = Table(title=f"ledger of {scope}")
    table.add_column("time", no_wrap=True)
    table.add_column("period", no_wrap=True)
    table.add_column("window", no_wrap=True)
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("original", justify="right", no_wrap=True)
    table.add_column("exchange")
    table.add_column("offer")
    table.add_column("uri", overflow="fold")
    table.add_column("key", overflow="fold")
    table.add_column("kind")
    for e in resp.entries:
        original = (f"{e.original.amount} {e.original.currency}"
                    if e.original.currency and e.original.currency != e.amount.currency else "")
        table.add_row(
            Text(_when(e.committed_at, seconds=True)), Text(e.period), Text(e.window),
            Text(f"{e.amount.amount} {e.amount.currency}"), Text(original), Text(e.exchange),
            Text(e.offer_id), Text(e.uri), Text(e.idempotency_key), Text(e.kind or dash),
        )
    return table


def holds_table(resp: bpb.ListHoldsResponse, dash: str, now: datetime | None = None) -> Table:
    """One row per part of each hold (the hold's own columns on its first part only)."""
    now = now or datetime.now(UTC)
    table = Table(title="holds that may have reached an Exchange", caption="times in UTC",
                  caption_justify="left")
    table.add_column("reservation", no_wrap=True)  # copied into `holds settle`: never wrapped
    table.add_column("account")
    table.add_column("key", overflow="fold")
    table.add_column("created", no_wrap=True)
    table.add_column("expires", no_wrap=True)
    table.add_column("owner", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("exchange")
    table.add_column("items", overflow="fold")
    table.add_column("done")
    table.add_column("holds", overflow="fold")
    for h in resp.holds:
        created, expires = h.created_at.ToDatetime(tzinfo=UTC), h.expires_at.ToDatetime(tzinfo=UTC)
        # The date only when it is not the creation's: the column stays narrow.
        until = f"{expires:%H:%M:%S}" if expires.date() == created.date() else f"{expires:%Y-%m-%d %H:%M:%S}"
        first = [Text(h.reservation_id), Text(h.account), Text(h.idempotency_key),
                 Text(f"{created:%Y-%m-%d %H:%M:%S}"), Text(until + (" expired" if expires <= now else "")),
                 Text(h.owner[:8] or dash), Text(str(h.attempts))]
        parts = [[Text(p.exchange),
                  Text("\n".join(f"{i.offer_id} {i.uri} {i.quoted.amount} {i.quoted.currency}"
                                 for i in p.items)),
                  Text("yes" if p.done else "no"),
                  Text("\n".join(f"{c.scope} {c.period} {c.amount.amount} {c.amount.currency}"
                                 for c in p.holds))]
                 for p in h.parts] or [[Text(dash), Text(f"unreadable intent: {h.problem}"), Text(dash),
                                        Text(dash)]]
        for n, part in enumerate(parts):
            table.add_row(*(first if n == 0 else [Text("")] * len(first)), *part)
    return table


def _print_json(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body, indent=2) + "\n")


def _print_status(console: Console, resp: bpb.ScopeStatusResponse, empty: str) -> None:
    if resp.budgets:
        console.print(status_table(resp, _dash(console)))
    else:
        console.print(Text(empty))


# --- the commands ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AdminClient:
    url = broker_url(args.broker)
    return AdminClient(url, admin_token(args.token_env), args.token_env, args.timeout)


def _status(args: argparse.Namespace) -> None:
    client = _client(args)
    resp, body = client.call("GetScopeStatus", bpb.GetScopeStatusRequest(scope=args.scope),
                             bpb.ScopeStatusResponse)
    if args.json:
        _print_json(body)
        return
    empty = (f"{args.scope} has no period limits (set one with `ramp-broker budget set {args.scope} "
             "--limit AMOUNT --currency CODE --period PERIOD`)" if args.scope
             else "no scope has a period limit")
    _print_status(stdout_console(), resp, empty)


def _set(args: argparse.Namespace) -> None:
    request = bpb.SetPeriodLimitRequest(scope=args.scope, period=args.period)
    if args.clear:
        if args.currency is not None:
            raise CliError("--currency goes with --limit, not --clear", EXIT_USAGE)
        request.clear = True
    else:
        try:
            parse_amount(args.limit, "--limit")
        except MoneyError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if args.currency is None:
            raise CliError("--currency is required with --limit (an ISO 4217 code such as USD)",
                           EXIT_USAGE)
        currency = args.currency.strip().upper()
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise CliError(f"--currency: {args.currency[:16]!r} is not a three-letter ISO 4217 code "
                           "such as USD", EXIT_USAGE)
        request.limit.CopyFrom(rpb.Cost(amount=args.limit, currency=currency))
    client = _client(args)
    resp, body = client.call("SetPeriodLimit", request, bpb.ScopeStatusResponse)
    if args.json:
        _print_json(body)
        return
    _print_status(stdout_console(), resp, f"{args.scope} has no period limits now")


def _history(args: argparse.Namespace) -> None:
    if not -_INT32_MAX <= args.limit <= _INT32_MAX:  # what the field can carry; the broker judges the rest
        raise CliError(f"--limit: {args.limit} is out of range (the broker returns at most 1000)",
                       EXIT_USAGE)
    client = _client(args)
    request = bpb.GetScopeHistoryRequest(scope=args.scope, period=args.period, limit=args.limit)
    resp, body = client.call("GetScopeHistory", request, bpb.GetScopeHistoryResponse)
    if args.json:
        _print_json(body)
        return
    console = stdout_console()
    if resp.entries:
        console.print(history_table(args.scope, resp, _dash(console)))
    which = f" {args.period}" if args.period else ""
    more = " (newest last; --limit N for more)" if len(resp.entries) < resp.total else ""
    console.print(Text(f"showing {len(resp.entries)} of {resp.total}{which} ledger entr"
                       f"{'y' if resp.total == 1 else 'ies'} of {args.scope}{more}"))


def _holds_list(args: argparse.Namespace) -> None:
    client = _client(args)
    request = bpb.ListHoldsRequest(account=args.account, scope=args.scope)
    resp, body = client.call("ListHolds", request, bpb.ListHoldsResponse)
    if args.json:
        _print_json(body)
        return
    console = stdout_console()
    if resp.holds:
        console.print(holds_table(resp, _dash(console)))
    n = len(resp.holds)
    console.print(Text(f"{n} open hold{'' if n == 1 else 's'} with an intent" + (
        " (settle one with `ramp-broker holds settle RESERVATION_ID --account ACCOUNT --retry | "
        "--charged | --refunded`)" if n else "")))


_SETTLE_ACTIONS = {"retry": bpb.SETTLE_ACTION_RETRY, "charged": bpb.SETTLE_ACTION_CHARGED,
                   "refunded": bpb.SETTLE_ACTION_REFUNDED}


def _holds_settle(args: argparse.Namespace) -> None:
    client = _client(args)
    request = bpb.SettleHoldRequest(account=args.account, reservation_id=args.reservation_id,
                                    action=_SETTLE_ACTIONS[args.action])
    resp, body = client.call("SettleHold", request, bpb.SettleHoldResponse)
    if args.json:
        _print_json(body)
    outcome = bpb.SettleOutcome.Name(resp.outcome).removeprefix("SETTLE_OUTCOME_").lower()
    if resp.outcome != bpb.SETTLE_OUTCOME_SETTLED:
        # Not settled (an Exchange still silent, or no such hold): a script must notice.
        raise CliError(f"hold {args.reservation_id}: {outcome.replace('_', ' ')}: {resp.detail}",
                       EXIT_REFUSED)
    if not args.json:
        stdout_console().print(Text(f"hold {args.reservation_id}: {outcome}: {resp.detail}"))


_COMMANDS = {"status": _status, "set": _set, "history": _history}
_HOLDS_COMMANDS = {"list": _holds_list, "settle": _holds_settle}


def run(args: argparse.Namespace) -> int:
    """Run `ramp-broker budget <command>` or `holds <command>`; returns the exit code."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per call otherwise
    try:
        if args.command == "holds":
            _HOLDS_COMMANDS[args.holds_command](args)
        else:
            _COMMANDS[args.budget_command](args)
    except CliError as exc:
        print(f"ramp-broker: {exc}", file=sys.stderr)
        return exc.code
    return EXIT_OK


def _common_options() -> argparse.ArgumentParser:
    """--broker, --token-env, --json, --timeout: shared by every admin API command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", metavar="URL",
                        help=f"the broker's address (default: ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument("--token-env", metavar="NAME", default=DEFAULT_TOKEN_ENV,
                        help=f"the environment variable holding the admin token (default: "
                             f"{DEFAULT_TOKEN_ENV})")
    common.add_argument("--json", action="store_true",
                        help="print the broker's answer as Connect JSON instead of a table")
    common.add_argument("--timeout", metavar="SECONDS", type=seconds_argument, default=10.0,
                        help="give up on the broker after this long (default: 10)")
    return common


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `budget` and `holds` command groups, added to the `ramp-broker` parser."""
    common = _common_options()
    budget = sub.add_parser(
        "budget", help="read and change per-period budgets on a running broker (admin API)",
        description="Per-period budgets of a running broker, through its admin API. Exit codes: "
                    "0 done, 1 the broker refused, 2 usage or local setup, 3 broker unreachable.")
    commands = budget.add_subparsers(dest="budget_command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status", parents=[common], help="limits, spend and forecast of every scope, or of one",
        description="A table of the scopes' period budgets: limit, spent, reserved, remaining, "
                    "used % ((spent + reserved) / limit, rounded down), when the window resets, "
                    "projected exhaustion and spend rate per hour; the caption says when the "
                    "numbers were read.")
    status.add_argument("--scope", default="", help="only this scope, e.g. user:alice")
    set_ = commands.add_parser(
        "set", parents=[common], help="set (or clear) a scope's limit for a period",
        description="Set a scope's limit for one period (effective on the next reservation, on "
                    "every broker), then show the scope's budgets.")
    set_.add_argument("scope", help="e.g. user:alice")
    set_.add_argument("--period", required=True,
                      help="hour, day, week, month, or a duration such as 720h")
    value = set_.add_mutually_exclusive_group(required=True)
    value.add_argument("--limit", metavar="AMOUNT", help="the new limit, a decimal such as 100.00")
    value.add_argument("--clear", action="store_true",
                       help="remove the period's limit (including one from the config file)")
    set_.add_argument("--currency", metavar="CODE", help="the limit's ISO 4217 currency, e.g. USD")
    history = commands.add_parser(
        "history", parents=[common], help="a scope's ledger: what was spent, newest last",
        description="The newest ledger entries of a scope (one line per bought item and period).")
    history.add_argument("scope", help="e.g. user:alice")
    history.add_argument("--period", default="", help="only this period's entries, e.g. month")
    history.add_argument("--limit", metavar="N", type=int, default=0,
                         help="the newest N entries (default 50, at most 1000)")
    _add_holds_commands(sub, common)


def _add_holds_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    holds = sub.add_parser(
        "holds", help="holds that may have reached an Exchange, on a running broker (admin API)",
        description="Open holds whose purchase may have reached an Exchange (a broker died, an "
                    "Exchange never answered), and settling one by hand. Exit codes: 0 done, 1 the "
                    "broker refused or the hold is not settled, 2 usage or local setup, 3 broker "
                    "unreachable.")
    commands = holds.add_subparsers(dest="holds_command", required=True, metavar="COMMAND")
    list_ = commands.add_parser(
        "list", parents=[common], help="every open hold with an intent: what it asked, what it holds",
        description="A table of open holds with an intent, one row per Exchange asked: the items "
                    "and their quotes, whether that part is done, and what it holds on each budget.")
    list_.add_argument("--account", default="", help="only this account's holds")
    list_.add_argument("--scope", default="", help="only holds on this scope, e.g. user:alice")
    settle = commands.add_parser(
        "settle", parents=[common], help="settle one hold now: retry it, or on your word",
        description="Settle one hold: --retry re-sends its stored requests under the same key and "
                    "commits what the Exchanges answer; --charged commits the quoted prices of every "
                    "part not yet done as spent (you checked the Exchange charged them); --refunded "
                    "refunds them (you checked it charged nothing). Exit 1 when the hold stays "
                    "unsettled or is not found.")
    settle.add_argument("reservation_id", metavar="RESERVATION_ID", help="as `holds list` shows it")
    settle.add_argument("--account", required=True, help="the hold's account")
    action = settle.add_mutually_exclusive_group(required=True)
    for name, what in (("retry", "re-send its requests to the Exchanges now"),
                       ("charged", "the Exchanges charged the quotes: commit them as spent"),
                       ("refunded", "the Exchanges charged nothing: refund the hold")):
        action.add_argument(f"--{name}", dest="action", action="store_const", const=name, help=what)
