"""`ramp-broker budget ...` and `reconcile` against a running broker, as real processes.

The reference Exchange and the broker run as their own processes on free 127.0.0.1
ports (the embedded store in the test's tmp_path); each CLI run is one more process,
whose stdout (tables, or JSON) and stderr (errors) are checked. Every child is
stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import pty
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker.operator.console import history_table, status_table, used_percent
from budget.reconcile import reconcile
from budget.stores.sqlite import SqliteStore
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb
from tests.harness import free_port
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    clean_env,
    command,
    connect_call,
    run_cli,
    start_broker,
    start_exchange,
)

A, B = "https://x.test/a", "https://x.test/b"  # 1.00 and 2.00 USD in catalog_tree()
ALICE = "alice-key"
TOKEN_ENV, TOKEN = "RAMP_CLI_TEST_ADMIN_TOKEN", "cli-admin-token"
UNSET_ENV = "RAMP_CLI_TEST_NEVER_SET"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def limit(period: str, amount: str) -> dict[str, str]:
    return {"period": period, "amount": amount, "currency": "USD"}


def config(exchange: Child, state: Path) -> dict[str, Any]:
    return broker_tree(
        exchange,
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / "journal.jsonl"),
            "accounts": {"acme": {"scopes": {
                "org:acme": {"limits": [limit("month", "100.00")]},
                "team:eng": {"limits": [limit("day", "10.00")]},
                "user:alice": {"limits": [limit("month", "6.00")], "failure": "closed"},
            }}},
        },
        agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": "acme",
                 "charged_to": ["user:alice", "team:eng", "org:acme"]}],
        admin={"token_env": TOKEN_ENV},
    )


@pytest.fixture
async def exchange(tmp_path: Path) -> AsyncIterator[Child]:
    async with start_exchange(tmp_path, catalog_tree()) as child:
        yield child


@pytest.fixture
async def broker(exchange: Child, tmp_path: Path) -> AsyncIterator[Child]:
    """A broker with the admin API on, after alice bought A (k1) then B (k2): 3.00 USD."""
    async with start_broker(tmp_path, config(exchange, tmp_path), env={TOKEN_ENV: TOKEN}) as child:
        async with httpx.AsyncClient(timeout=15.0) as client:
            for key, uri in (("k1", A), ("k2", B)):
                r = await connect_call(client, child, "BrokerService/Transact",
                                       {"sessionId": "s1", "idempotencyKey": key, "uris": [uri]},
                                       key=ALICE)
                assert r.status_code == 200, r.text
        yield child


@dataclass
class Run:
    code: int
    out: str
    err: str


async def budget(broker: Child | str, *args: str, token: str | None = TOKEN,
                 token_env: str = TOKEN_ENV, env: dict[str, str] | None = None) -> Run:
    """`ramp-broker budget ARGS --broker URL --token-env VAR`, with VAR=token unless None."""
    url = broker if isinstance(broker, str) else broker.url
    extra = {**({token_env: token} if token is not None else {}), **(env or {})}
    result = await asyncio.to_thread(
        run_cli, ["budget", *args, "--broker", url, "--token-env", token_env], Path.cwd(), extra)
    assert "Traceback" not in result.stderr, result.stderr
    return Run(result.returncode, result.stdout, result.stderr)


def rows(out: str) -> list[dict[str, str]]:
    """The body rows of the rich table in `out`, as {column header: cell text}."""
    lines = [line for line in out.splitlines() if line.count("│") + line.count("┃") >= 4]
    assert lines, out
    split = [[cell.strip() for cell in line.replace("┃", "│").strip().strip("│").split("│")]
             for line in lines]
    header, body = split[0], split[1:]
    return [dict(zip(header, cells, strict=True)) for cells in body]


def row(out: str, scope: str, period: str) -> dict[str, str]:
    (found,) = [r for r in rows(out) if r["scope"] == scope and r["period"] == period]
    return found


# --- status, set, history ------------------------------------------------------------------------


async def test_status_shows_every_scope_with_its_numbers(broker: Child) -> None:
    run = await budget(broker, "status")
    assert (run.code, run.err) == (0, ""), run
    table = rows(run.out)
    assert [(r["scope"], r["period"]) for r in table] == [
        ("org:acme", "month"), ("team:eng", "day"), ("user:alice", "month")]
    alice = row(run.out, "user:alice", "month")
    assert (alice["limit"], alice["spent"], alice["reserved"], alice["remaining"], alice["used %"]) == (
        "6.00 USD", "3.00", "0.00", "3.00", "50.0%")
    assert (alice["mode"], alice["policy"]) == ("strict", "closed")
    org = row(run.out, "org:acme", "month")
    assert (org["limit"], org["remaining"], org["used %"]) == ("100.00 USD", "97.00", "3.0%")
    assert row(run.out, "team:eng", "day")["used %"] == "30.0%"
    # The reset is the end of this month's / day's window, in UTC.
    now = datetime.now(UTC)
    assert alice["resets"].endswith("-01 00:00 UTC"), alice
    assert alice["resets"] > now.strftime("%Y-%m-%d %H:%M UTC")
    assert {"projected exhaustion", "rate/h"} <= alice.keys()
    assert "as of " in run.out
    assert " UTC" in run.out.split("as of ", 1)[1]
    assert "\x1b[" not in run.out  # no colour codes into a pipe

    one = await budget(broker, "status", "--scope", "user:alice")
    assert one.code == 0, one
    assert [r["scope"] for r in rows(one.out)] == ["user:alice"]


async def test_set_changes_a_limit_and_status_shows_it(broker: Child) -> None:
    run = await budget(broker, "set", "user:alice", "--limit", "12.50", "--currency", "usd",
                       "--period", "month")
    assert (run.code, run.err) == (0, ""), run
    alice = row(run.out, "user:alice", "month")
    assert (alice["limit"], alice["spent"], alice["remaining"], alice["used %"]) == (
        "12.50 USD", "3.00", "9.50", "24.0%")

    # A second period for the scope: a new row, nothing spent in it yet.
    run = await budget(broker, "set", "user:alice", "--limit", "2", "--currency", "USD",
                       "--period", "day")
    assert run.code == 0, run
    status = await budget(broker, "status", "--scope", "user:alice")
    assert status.code == 0, status
    day = row(status.out, "user:alice", "day")
    assert (day["limit"], day["spent"], day["used %"]) == ("2.00 USD", "0.00", "0.0%")
    assert row(status.out, "user:alice", "month")["limit"] == "12.50 USD"

    cleared = await budget(broker, "set", "user:alice", "--clear", "--period", "day")
    assert cleared.code == 0, cleared
    assert [r["period"] for r in rows(cleared.out)] == ["month"]
    cleared = await budget(broker, "set", "user:alice", "--clear", "--period", "month")
    assert cleared.code == 0, cleared
    assert "user:alice has no period limits now" in cleared.out


async def test_history_lists_the_ledger_lines(broker: Child) -> None:
    run = await budget(broker, "history", "user:alice")
    assert (run.code, run.err) == (0, ""), run
    entries = rows(run.out)
    assert [(e["uri"], e["amount"], e["key"], e["offer"]) for e in entries] == [
        # Oldest first; keys are the caller's.
        (A, "1.00 USD", "alice#k1", "a"), (B, "2.00 USD", "alice#k2", "b")]
    for e in entries:
        assert (e["period"], e["exchange"], e["kind"], e["original"]) == ("month", "ref.test", "commit", "")
        assert e["window"] == e["time"][:7]  # the month the entry was committed in (UTC)
    assert "showing 2 of 2 ledger entries of user:alice" in run.out

    newest = await budget(broker, "history", "user:alice", "--limit", "1")
    assert newest.code == 0, newest
    assert [e["uri"] for e in rows(newest.out)] == [B]
    assert "showing 1 of 2" in newest.out
    assert "--limit N for more" in newest.out

    # team:eng has a day limit only: its month history is empty.
    none = await budget(broker, "history", "team:eng", "--period", "month")
    assert none.code == 0, none
    assert "showing 0 of 0 month ledger entries of team:eng" in none.out
    day = await budget(broker, "history", "team:eng", "--period", "day")
    assert "showing 2 of 2 day ledger entries" in day.out, day


async def test_json_output_parses(broker: Child) -> None:
    status = await budget(broker, "status", "--json")
    assert status.code == 0, status
    body = json.loads(status.out)
    states = {(b["scope"], b["period"]): b for b in body["budgets"]}
    assert states[("user:alice", "month")]["spent"] == {"amount": "3.00", "currency": "USD"}
    assert states[("user:alice", "month")]["mode"] == "ENFORCEMENT_MODE_STRICT"

    history = await budget(broker, "history", "user:alice", "--json")
    assert history.code == 0, history
    body = json.loads(history.out)
    assert int(body["total"]) == 2
    assert [e["amount"]["amount"] for e in body["entries"]] == ["1.00", "2.00"]

    changed = await budget(broker, "set", "org:acme", "--limit", "150.00", "--currency", "USD",
                           "--period", "month", "--json")
    assert changed.code == 0, changed
    (state,) = json.loads(changed.out)["budgets"]
    assert state["limit"] == {"amount": "150.00", "currency": "USD"}


# --- errors --------------------------------------------------------------------------------------


async def test_errors_from_the_broker_are_one_clear_line(broker: Child) -> None:
    wrong = await budget(broker, "status", token="not-the-token")
    assert wrong.code == 1, wrong
    assert f"the broker refused the admin token in ${TOKEN_ENV} (unauthenticated)" in wrong.err
    assert wrong.out == ""

    unknown = await budget(broker, "status", "--scope", "user:nobody")
    assert unknown.code == 1, unknown
    assert "'user:nobody' is not in any configured account" in unknown.err
    assert "(not_found)" in unknown.err

    for args, expect in [
        (["set", "user:alice", "--limit", "5.00", "--currency", "XYZ", "--period", "month"],
         "limit.currency: 'XYZ' is not an ISO 4217 currency code (invalid_argument)"),
        (["set", "user:alice", "--limit", "5.00", "--currency", "USD", "--period", "fortnight"],
         "period: 'fortnight' is not hour, day, week, month"),
        (["history", "user:alice", "--limit", "5000"], "limit: 5000 is out of range"),
        (["history", "user:alice", "--limit", "-1"], "limit: -1 is out of range"),
        (["history", "user:alice", "--period", "fortnight"], "period: 'fortnight'"),
        (["status", "--scope", "no colon"], "(invalid_argument)"),
    ]:
        run = await budget(broker, *args)
        assert run.code == 1, (args, run)
        assert expect in run.err, (args, run.err)
        assert len(run.err.strip().splitlines()) <= 2, run.err

    # Nothing above changed the limit.
    status = await budget(broker, "status", "--scope", "user:alice")
    assert row(status.out, "user:alice", "month")["limit"] == "6.00 USD"


async def test_bad_values_are_refused_before_calling(broker: Child) -> None:
    for args, expect in [
        (["set", "user:alice", "--limit", "1e3", "--currency", "USD", "--period", "month"],
         "--limit: '1e3' is not a plain non-negative decimal"),
        (["set", "user:alice", "--limit", "-5", "--currency", "USD", "--period", "month"],
         "--limit: '-5'"),
        (["set", "user:alice", "--limit", "5.00", "--period", "month"], "--currency is required"),
        (["set", "user:alice", "--limit", "5.00", "--currency", "dollars", "--period", "month"],
         "--currency: 'dollars' is not a three-letter"),
        (["set", "user:alice", "--clear", "--currency", "USD", "--period", "month"],
         "--currency goes with --limit"),
        (["history", "user:alice", "--limit", "99999999999"], "--limit: 99999999999 is out of range"),
    ]:
        run = await budget(broker, *args)
        assert run.code == 2, (args, run)
        assert expect in run.err, (args, run.err)
        assert run.out == ""
    # argparse's own usage errors: exit 2 as well.
    for args in (["set", "user:alice", "--period", "month"],
                 ["set", "user:alice", "--limit", "1", "--clear", "--period", "month"],
                 ["history", "user:alice", "--limit", "ten"],
                 ["status", "--timeout", "0"]):
        run = await budget(broker, *args)
        assert run.code == 2, (args, run)
        assert "usage: ramp-broker budget" in run.err, run.err
    status = await budget(broker, "status", "--scope", "user:alice")
    assert row(status.out, "user:alice", "month")["limit"] == "6.00 USD"


async def test_broker_down_token_unset_and_not_a_broker(exchange: Child) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    run = await budget(down, "status")
    assert run.code == 3, run
    assert (f"ramp-broker: cannot reach the broker at {down} (connection refused); "
            "is `ramp-broker serve` running?") in run.err
    assert run.out == ""

    # The address may come from $RAMP_ADMIN_URL instead of --broker.
    result = await asyncio.to_thread(
        run_cli, ["budget", "history", "user:alice", "--token-env", TOKEN_ENV], Path.cwd(),
        {TOKEN_ENV: TOKEN, "RAMP_ADMIN_URL": down})
    assert result.returncode == 3, result
    assert f"cannot reach the broker at {down}" in result.stderr

    unset = await budget(down, "status", token=None, token_env=UNSET_ENV)
    assert unset.code == 2, unset
    assert f"environment variable {UNSET_ENV} is not set" in unset.err

    bad_url = await budget("localhost:9090", "status")
    assert bad_url.code == 2, bad_url
    assert "--broker: 'localhost:9090' is not an http:// or https:// URL" in bad_url.err

    # Something else listens there: no admin API.
    other = await budget(exchange, "status")
    assert other.code == 1, other
    assert "does not serve the admin API" in other.err


async def test_a_broker_that_does_not_answer_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run = await budget(url, "status", "--timeout", "0.5")
    assert run.code == 3, run
    assert f"the broker at {url} did not answer within 0.5 s (--timeout)" in run.err


async def test_admin_api_disabled_says_so(exchange: Child, tmp_path: Path) -> None:
    # The broker's token variable is not set: its admin API is off.
    async with start_broker(tmp_path, config(exchange, tmp_path)) as child:
        run = await budget(child, "status")
    assert run.code == 1, run
    assert f"the admin API is disabled: environment variable {TOKEN_ENV}" in run.err
    assert "(permission_denied)" in run.err
    assert "restart the broker" in run.err  # the Denial's next action, on a second line
    assert len(run.err.strip().splitlines()) == 2, run.err


# --- reconcile -------------------------------------------------------------------------------------


async def test_reconcile_still_prints_its_lines(broker: Child, tmp_path: Path) -> None:
    assert broker.config_path is not None
    result = await asyncio.to_thread(
        run_cli, ["reconcile", "--config", str(broker.config_path)], tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        "checked 3 counter(s) against 6 ledger entr(y/ies) in 1 account(s)",
        "counters match the ledger",
        "no open holds",
        "exchange ref.test: its statement matches the ledger (2 key(s))",
    ]
    assert "Traceback" not in result.stderr, result.stderr


@contextlib.contextmanager
def _pty() -> Iterator[tuple[int, int]]:
    controller, terminal = pty.openpty()
    try:
        yield controller, terminal
    finally:
        for fd in (controller, terminal):
            with contextlib.suppress(OSError):
                os.close(fd)


def _run_with_tty_stderr(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`ramp-broker ARGS` with stderr on a pseudo-terminal (so the progress bar is drawn)."""
    with _pty() as (controller, terminal):
        proc = subprocess.Popen([*command(), *args], cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=terminal, text=True)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


async def test_reconcile_with_a_terminal_draws_progress_and_keeps_its_output(
    broker: Child, tmp_path: Path
) -> None:
    assert broker.config_path is not None
    code, out, err = await asyncio.to_thread(
        _run_with_tty_stderr, ["reconcile", "--config", str(broker.config_path)], tmp_path)
    assert code == 0, (out, err)
    assert "Traceback" not in err, err
    assert "reconciling accounts" in err, err  # the bar, drawn at least when it stops
    assert out.splitlines()[:2] == [
        "checked 3 counter(s) against 6 ledger entr(y/ies) in 1 account(s)",
        "counters match the ledger",
    ]


async def test_reconcile_reports_progress_per_account(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "s.sqlite3", timeout_ms=2000)
    seen: list[tuple[int, int]] = []
    try:
        report = await reconcile(store, ["a", "b", "c"], progress=lambda d, t: seen.append((d, t)))
    finally:
        await store.close()
    assert report.ok
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


# --- rendering, without a broker -------------------------------------------------------------------


def _ts(text: str) -> Timestamp:
    ts = Timestamp()
    ts.FromJsonString(text)
    return ts


def _render(table: Any) -> str:
    from rich.console import Console

    console = Console(width=200, no_color=True, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_status_table_without_a_forecast_shows_dashes() -> None:
    state = bpb.BudgetState(
        scope="user:bob", period="30d", limit=rpb.Cost(amount="3.00", currency="EUR"),
        spent=rpb.Cost(amount="1.999", currency="EUR"), reserved=rpb.Cost(amount="0.00", currency="EUR"),
        remaining=rpb.Cost(amount="1.001", currency="EUR"), mode=bpb.ENFORCEMENT_MODE_STRICT,
        failure_policy="open", period_end=_ts("2026-12-01T00:00:00Z"), as_of=_ts("2026-11-23T12:00:05Z"),
    )
    out = _render(status_table(bpb.ScopeStatusResponse(budgets=[state]), "—"))
    r = row(out, "user:bob", "30d")
    assert r["used %"] == "66.6%"  # 66.63..., rounded down
    assert (r["projected exhaustion"], r["rate/h"], r["policy"]) == ("—", "—", "open")
    assert r["resets"] == "2026-12-01 00:00 UTC"
    assert "as of 2026-11-23 12:00:05 UTC" in out

    state.projected_exhaustion.CopyFrom(_ts("2026-11-25T08:30:00Z"))
    state.spend_rate_per_hour.CopyFrom(rpb.Cost(amount="0.05", currency="EUR"))
    state.limit.amount = "0"
    r = row(_render(status_table(bpb.ScopeStatusResponse(budgets=[state]), "—")), "user:bob", "30d")
    assert (r["projected exhaustion"], r["rate/h"], r["used %"]) == ("2026-11-25 08:30 UTC", "0.05", "—")


def test_used_percent_is_exact_decimal() -> None:
    def pct(limit_: str, spent: str, reserved: str = "0") -> Decimal | None:
        return used_percent(bpb.BudgetState(limit=rpb.Cost(amount=limit_), spent=rpb.Cost(amount=spent),
                                            reserved=rpb.Cost(amount=reserved)))
    assert pct("100.00", "99.999999999") == Decimal("99.9")  # not 100.0 until it is used up
    assert pct("100.00", "60", "40") == Decimal("100.0")
    assert pct("0.30", "0.10") == Decimal("33.3")
    assert pct("10", "12.5") == Decimal("125.0")  # an overage
    assert pct("", "1") is None


def test_history_table_shows_the_original_only_in_another_currency() -> None:
    entry = bpb.LedgerEntry(
        committed_at=_ts("2026-11-23T12:00:05Z"), scope="user:alice", period="month", window="2026-11",
        amount=rpb.Cost(amount="1.10", currency="USD"), original=rpb.Cost(amount="1.00", currency="EUR"),
        idempotency_key="k[bold]1", exchange="ref.test", offer_id="eur", uri="https://x.test/eur",
        kind="commit")
    out = _render(history_table("user:alice", bpb.GetScopeHistoryResponse(entries=[entry], total=1), "—"))
    (r,) = rows(out)
    assert (r["time"], r["amount"], r["original"], r["key"]) == (
        "2026-11-23 12:00:05 UTC", "1.10 USD", "1.00 EUR", "k[bold]1")  # no markup from data
