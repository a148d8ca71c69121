"""Prometheus metrics: real broker processes scripted through purchases and denials, then scraped.

Every broker runs as its own process on loopback with its metrics on a free port of their own;
the scrape is parsed with prometheus_client's parser and every series the script touched is
checked for its exact value, then linted by `promtool check metrics` (Debian's prometheus
package; `tools/ensure-tools.sh` installs it, and `make test` runs that first). The period
layer's events (expired reservations refunded, late commits, overages) and the conversion-rate
age are driven in-process with a ManualClock instead, so no test waits on a TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.app import build_broker
from broker.config import BrokerConfig
from broker.observe.metrics import Metrics
from budget.period import Charge, ItemSpend
from common.clock import ManualClock
from currency.money import Money
from tests.harness import free_port
from tests.processes import (
    Child,
    broker_tree,
    catalog_tree,
    connect_call,
    exchange_state,
    run_cli,
    set_knobs,
    start_broker,
    start_exchange,
    write_yaml,
)
from tests.redis_server import RedisServer

A, B, C = (f"https://x.test/{k}" for k in "abc")  # 1.00, 2.00, 3.00 USD in catalog_tree()
EXCHANGE = "ref.test"
ACCOUNT = "acme"
RESEARCH, OPS = "team:research", "team:ops"  # only RESEARCH is in metrics.export_scopes
# A 366-day window aligned to the Unix epoch: no test run crosses into a new one in practice.
PERIOD = "366d"
ALICE, BOB = "alice-metrics-key", "bob-metrics-key"
UTILIZATION_LE = ("0.0", "0.1", "0.25", "0.5", "0.75", "0.9", "1.0", "+Inf")
NOV_23 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ECB_FILE = Path(__file__).parent / "data" / "eurofxref-daily.xml"  # rates of 2026-11-20


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def limit(amount: str) -> dict[str, str]:
    return {"period": PERIOD, "amount": amount, "currency": "USD"}


def usd(amount: str) -> Money:
    return Money.parse(amount, "USD", "amount")


# --- reading a scrape ----------------------------------------------------------------------------


Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    """One /metrics answer: its text and every sample, by sample name and label set."""

    text: str
    samples: dict[str, dict[Labels, float]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; fails the test when there is none."""
        series = self.samples.get(name, {})
        key = frozenset(labels.items())
        if key not in series:
            pytest.fail(f"no sample {name}{labels} in the scrape; {name} has "
                        f"{[dict(k) for k in series]}")
        return series[key]

    def by(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Every sample of `name`, keyed by the values of `label_names` (its only labels)."""
        out: dict[tuple[str, ...], float] = {}
        for key, value in self.samples.get(name, {}).items():
            labels = dict(key)
            assert set(labels) == set(label_names), (name, labels)
            out[tuple(labels[n] for n in label_names)] = value
        return out

    def buckets(self, name: str, **labels: str) -> dict[str, float]:
        """A histogram's cumulative bucket counts by `le`."""
        return {dict(k)["le"]: v for k, v in self.samples.get(f"{name}_bucket", {}).items()
                if {n: dict(k).get(n) for n in labels} == labels}

    def label_values(self) -> set[str]:
        return {v for series in self.samples.values() for key in series for _, v in key}


def cumulative(*counts: int) -> dict[str, float]:
    """Expected utilization bucket counts, in UTILIZATION_LE order."""
    return dict(zip(UTILIZATION_LE, map(float, counts), strict=True))


async def scrape(client: httpx.AsyncClient, listen: str) -> Scrape:
    r = await client.get(f"http://{listen}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape.parse(r.text)


def promtool() -> str:
    # tools/ensure-tools.sh puts it beside the venv's python when the system has none.
    path = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("promtool is not installed: run tools/ensure-tools.sh (make test runs it; on "
                    "Debian/Ubuntu it installs the prometheus package, which ships promtool)")
    return path


async def promtool_check(text: str) -> None:
    """`promtool check metrics` reads the exposition on stdin: exit 0 and not a word of lint."""
    result = await asyncio.to_thread(
        subprocess.run, [promtool(), "check", "metrics"], input=text, capture_output=True,
        text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), \
        f"promtool check metrics:\n{result.stdout}{result.stderr}\n--- the scrape:\n{text}"


# --- a scripted run on the embedded store --------------------------------------------------------


def scripted_config(exchange: Child, tmp_path: Path, metrics_listen: str) -> dict[str, Any]:
    return broker_tree(
        exchange,
        session={"default_limit": {"amount": "100.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
            "journal_path": str(tmp_path / "journal.jsonl"),
            "accounts": {ACCOUNT: {"scopes": {
                RESEARCH: {"limits": [limit("10.00")]},
                OPS: {"limits": [limit("2.00")]},
            }}},
        },
        agents=[
            {"id": "alice", "key_sha256": sha(ALICE), "account": ACCOUNT, "charged_to": [RESEARCH]},
            {"id": "bob", "key_sha256": sha(BOB), "account": ACCOUNT, "charged_to": [OPS]},
        ],
        metrics={"listen": metrics_listen, "export_scopes": [RESEARCH]},
    )


def transact(session: str, key: str, uris: list[str], **constraints: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"sessionId": session, "idempotencyKey": key, "uris": uris}
    if constraints:
        body["constraints"] = constraints
    return body


async def test_scrape_after_a_scripted_run(tmp_path: Path) -> None:
    metrics_listen = f"127.0.0.1:{free_port()}"
    async with start_exchange(tmp_path, catalog_tree(EXCHANGE)) as exchange, \
            start_broker(tmp_path, scripted_config(exchange, tmp_path, metrics_listen)) as broker, \
            httpx.AsyncClient(timeout=15.0) as client:

        async def buy(api_key: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            r = await connect_call(client, broker, "BrokerService/Transact", body, key=api_key)
            return r.status_code, r.json()

        async def reason(api_key: str | None, body: dict[str, Any]) -> str:
            status, answer = await buy(api_key, body)
            assert status != 200, answer
            return str(answer["message"])

        r = await connect_call(client, broker, "BudgetService/DeclareSessionBudget",
                               {"sessionId": "s1", "limit": {"amount": "4.00", "currency": "USD"}},
                               key=ALICE)
        assert r.status_code == 200, r.text

        # alice, session s1 (4.00) and team:research (10.00): 1.00, then 2.00.
        for key, uri in (("k1", A), ("k2", B)):
            status, answer = await buy(ALICE, transact("s1", key, [uri]))
            assert status == 200, answer
            assert not answer.get("replayed"), answer
        # 3.00 does not fit in the session's 1.00 left: a session denial.
        assert "session budget" in await reason(ALICE, transact("s1", "k3", [C]))
        # The same request under k1 again: answered from the first purchase.
        status, answer = await buy(ALICE, transact("s1", "k1", [A]))
        assert status == 200, answer
        assert answer["replayed"] is True, answer
        # bob, team:ops (2.00): 2.00 bought, then 1.00 more is a period denial.
        status, answer = await buy(BOB, transact("s-bob", "kb1", [B]))
        assert status == 200, answer
        assert "period budget" in await reason(BOB, transact("s-bob", "kb2", [A]))
        # A 3.00 article under max_price 2.50: a transaction denial.
        assert "transaction budget" in await reason(
            ALICE, transact("s2", "k4", [C], maxPrice={"amount": "2.50", "currency": "USD"}))
        # No API key at all.
        r = await connect_call(client, broker, "BrokerService/Transact", transact("s3", "k5", [A]))
        assert (r.status_code, r.json()["code"]) == (401, "unauthenticated"), r.text

        state = await exchange_state(client, exchange)
        # Each URI discovered once: later purchases of it are priced from the still-valid quote.
        assert (state["discover_calls"], state["execute_calls"]) == (3, 3), state
        m = await scrape(client, metrics_listen)
        assert (await client.get(f"http://{metrics_listen}/")).status_code == 404

    assert m.by("broker_purchases_total", "outcome") == {
        ("purchased",): 3, ("replayed",): 1, ("denied",): 3}
    assert m.by("broker_denials_total", "layer", "reason") == {
        ("session", "session_budget_exhausted"): 1,
        ("period", "period_budget_exhausted"): 1,
        ("transaction", "transaction_cap_exceeded"): 1,
        ("authorization", "unauthenticated"): 1,
    }
    assert m.by("broker_budget_exhausted_total", "layer") == {
        ("transaction",): 1, ("session",): 1, ("period",): 1}

    # Utilization after each commit: session 1/4, 3/4 (alice) and 2/100 (bob's default);
    # period 1/10, 3/10 (team:research) and 2/2 (team:ops).
    hist = "broker_budget_utilization_ratio"
    assert m.buckets(hist, layer="session") == cumulative(0, 1, 2, 2, 3, 3, 3, 3)
    assert m.value(f"{hist}_count", layer="session") == 3
    assert m.value(f"{hist}_sum", layer="session") == pytest.approx(0.25 + 0.75 + 0.02)
    assert m.buckets(hist, layer="period") == cumulative(0, 1, 1, 2, 2, 2, 3, 3)
    assert m.value(f"{hist}_count", layer="period") == 3
    assert m.value(f"{hist}_sum", layer="period") == pytest.approx(0.1 + 0.3 + 1.0)
    assert m.buckets(hist, layer="transaction") == dict.fromkeys(UTILIZATION_LE, 0)

    # Held three times (the denials never got as far as a reservation).
    assert m.value("broker_reservation_duration_seconds_count") == 3
    store_ops = m.by("broker_store_operation_duration_seconds_count", "operation")
    # bob's second purchase reached the store, which refused it: 4 reservations, 3 commits.
    assert (store_ops[("reserve",)], store_ops[("commit",)]) == (4, 3), store_ops
    assert m.by("broker_store_errors_total", "operation") == {}
    assert m.value("broker_fail_open_spends_total") == 0
    assert m.by("broker_exchange_request_duration_seconds_count", "exchange", "method") == {
        (EXCHANGE, "discover"): 3, (EXCHANGE, "execute"): 3}
    assert m.by("broker_exchange_errors_total", "exchange", "method", "kind") == {}
    assert m.value("broker_reservations_expired_total") == 0
    assert m.value("broker_overages_total") == 0

    # Only the exported scope has gauges: 10.00 - 3.00 left.
    assert m.by("broker_budget_remaining", "scope", "period", "currency") == {
        (RESEARCH, PERIOD, "USD"): 7.0}
    assert m.by("broker_budget_limit", "scope", "period", "currency") == {
        (RESEARCH, PERIOD, "USD"): 10.0}
    # Bounded labels: no session id, idempotency key, agent or unexported scope anywhere.
    unbounded = {"s1", "s2", "s3", "s-bob", "k1", "k2", "k3", "k4", "k5", "kb1", "kb2", "alice",
                 "bob", OPS, ACCOUNT}
    assert not unbounded & m.label_values()

    await promtool_check(m.text)
    # The metrics server answers hypercorn's lifespan events (no "Lifespan error" warning).
    assert "Traceback" not in broker.stderr, broker.stderr
    assert "Lifespan" not in broker.stderr, broker.stderr


# --- Exchanges that fail ---------------------------------------------------------------------------


async def test_exchange_errors_are_counted_by_exchange_and_method(tmp_path: Path) -> None:
    down = ("down.test", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    metrics_listen = f"127.0.0.1:{free_port()}"
    config = broker_tree(
        down, session={"default_limit": {"amount": "100.00", "currency": "USD"}},
        metrics={"listen": metrics_listen})
    async with start_exchange(tmp_path, catalog_tree(EXCHANGE)) as exchange:
        config["exchanges"].append(
            {"name": EXCHANGE, "endpoint": exchange.url, "trust": 50, "priority": 1})
        async with start_broker(tmp_path, config) as broker, \
                httpx.AsyncClient(timeout=15.0) as client:
            # The purchase call fails once without charging; the broker retries it (same key).
            await set_knobs(client, exchange, fail_execute=1)
            r = await connect_call(client, broker, "BrokerService/Transact",
                                   transact("s1", "k1", [A]))
            assert r.status_code == 200, r.text
            (item,) = r.json()["items"]
            assert item["status"] == "ITEM_STATUS_PURCHASED", item
            state = await exchange_state(client, exchange)
            assert (state["charges"], state["execute_calls"]) == (1, 2), state
            m = await scrape(client, metrics_listen)

    assert m.by("broker_exchange_errors_total", "exchange", "method", "kind") == {
        ("down.test", "discover", "unavailable"): 1, (EXCHANGE, "execute", "unavailable"): 1}
    assert m.by("broker_exchange_request_duration_seconds_count", "exchange", "method") == {
        ("down.test", "discover"): 1, (EXCHANGE, "discover"): 1, (EXCHANGE, "execute"): 2}
    assert m.by("broker_purchases_total", "outcome") == {("purchased",): 1}
    # Without period budgets there is no store to time.
    assert "broker_store_operation_duration_seconds_count" not in m.samples
    await promtool_check(m.text)


# --- the store goes away ---------------------------------------------------------------------------


async def test_store_errors_and_fail_open_spends(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisServer(directory)
    await asyncio.to_thread(redis.start)
    try:
        metrics_listen = f"127.0.0.1:{free_port()}"
        async with start_exchange(tmp_path, catalog_tree(EXCHANGE)) as exchange:
            config = broker_tree(
                exchange,
                session={"default_limit": {"amount": "100.00", "currency": "USD"}},
                period_budgets={
                    "store": {"kind": "redis", "url": redis.url, "timeout_ms": 1000},
                    # Upkeep once at start only: after the kill, every store call is a purchase's.
                    "sweep_interval_seconds": 3600,
                    "journal_path": str(tmp_path / "journal.jsonl"),
                    "accounts": {ACCOUNT: {"scopes": {RESEARCH: {
                        "limits": [limit("10.00")], "failure": "open",
                        "open_allowance": {"amount": "5.00", "currency": "USD"}}}}},
                },
                agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": ACCOUNT,
                         "charged_to": [RESEARCH]}],
                metrics={"listen": metrics_listen, "export_scopes": [RESEARCH]},
            )
            async with start_broker(tmp_path, config) as broker, \
                    httpx.AsyncClient(timeout=15.0) as client:
                r = await connect_call(client, broker, "BrokerService/Transact",
                                       transact("s1", "k1", [A]), key=ALICE)
                assert r.status_code == 200, r.text
                before = await scrape(client, metrics_listen)
                await asyncio.to_thread(redis.kill)
                # The store refuses the reservation; the scope fails open and spends locally.
                r = await connect_call(client, broker, "BrokerService/Transact",
                                       transact("s1", "k2", [A]), key=ALICE)
                assert r.status_code == 200, r.text
                assert (await exchange_state(client, exchange))["charges"] == 2
                m = await scrape(client, metrics_listen)
    finally:
        await asyncio.to_thread(redis.stop)

    assert before.by("broker_store_errors_total", "operation") == {}
    assert before.value("broker_fail_open_spends_total") == 0
    assert before.value("broker_budget_remaining", scope=RESEARCH, period=PERIOD,
                        currency="USD") == 9.0
    assert m.value("broker_store_errors_total", operation="reserve") == 1
    assert m.value("broker_fail_open_spends_total") == 1
    assert m.by("broker_purchases_total", "outcome") == {("purchased",): 2}
    assert m.value("broker_store_operation_duration_seconds_count", operation="reserve") == 2
    await promtool_check(m.text)


# --- the period layer's events, and rate age, in-process ---------------------------------------


def inprocess_config(tmp_path: Path, **overrides: Any) -> BrokerConfig:
    tree: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "period_budgets": {
            "store": {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")},
            "journal_path": str(tmp_path / "journal.jsonl"),
            "reservation_ttl_seconds": 60,
            "sweep_interval_seconds": 3600,
            "accounts": {ACCOUNT: {"scopes": {RESEARCH: {"limits": [limit("10.00")]}}}},
        },
        "metrics": {"export_scopes": [RESEARCH]},
    }
    tree.update(overrides)
    return BrokerConfig.model_validate(tree)


def registry_scrape(metrics: Metrics) -> Scrape:
    return Scrape.parse(generate_latest(metrics.registry).decode())


async def test_expired_refunds_late_commits_and_overages_are_counted(tmp_path: Path) -> None:
    clock = ManualClock(NOV_23)
    broker = await build_broker(inprocess_config(tmp_path), clock)
    try:
        period = broker.period
        assert period is not None
        await period.upkeep()
        charge = Charge(ACCOUNT, (RESEARCH,))

        def spend(amount: str) -> list[ItemSpend]:
            return [ItemSpend(EXCHANGE, "a", A, usd(amount), usd(amount))]

        expiring = await period.reserve(charge, await period.plan(charge), usd("1.00"), "k-late")
        over = await period.reserve(charge, await period.plan(charge), usd("1.00"), "k-over")
        assert expiring is not None
        assert over is not None
        assert await period.commit(over, spend("1.50"), b"") is not None  # charged above the hold
        clock.advance(61)
        await period.upkeep()  # the sweeper refunds k-late's expired reservation
        m = registry_scrape(broker.metrics)
        assert m.value("broker_reservations_expired_total") == 1
        assert m.value("broker_overages_total") == 1
        assert m.value("broker_late_commits_total") == 0

        await period.commit(expiring, spend("1.00"), b"")  # after its reservation expired
        m = registry_scrape(broker.metrics)
        assert m.value("broker_late_commits_total") == 1
        assert m.value("broker_reservations_expired_total") == 1
        assert m.value("broker_overages_total") == 1
        assert m.value("broker_store_operation_duration_seconds_count", operation="sweep") == 2
        assert m.value("broker_store_operation_duration_seconds_count", operation="commit") == 2
        await promtool_check(m.text)
    finally:
        await broker.close()


async def test_conversion_rate_age(tmp_path: Path) -> None:
    clock = ManualClock(NOV_23)
    config = inprocess_config(tmp_path, ecb_rates={"source": str(ECB_FILE)})
    broker = await build_broker(config, clock)
    try:
        published = datetime(2026, 11, 20, tzinfo=UTC)
        m = registry_scrape(broker.metrics)
        assert m.value("broker_conversion_rate_age_seconds") == (NOV_23 - published).total_seconds()
        clock.advance(3600)
        m = registry_scrape(broker.metrics)
        assert m.value("broker_conversion_rate_age_seconds") == (
            NOV_23 - published).total_seconds() + 3600
        await promtool_check(m.text)
    finally:
        await broker.close()


def test_budget_exhausted_counts_only_budgets_that_could_not_cover_a_cost() -> None:
    metrics = Metrics()
    for layer, reason in [
        ("session", "session_budget_exhausted"), ("period", "period_budget_exhausted"),
        ("period", "open_allowance_exhausted"), ("transaction", "transaction_cap_exceeded"),
        # Refusals on the same layers that are not about money running out:
        ("session", "session_has_no_budget"), ("session", "session_currency_locked"),
        ("period", "limit_change_refused"), ("transaction", "idempotency_key_in_flight"),
        ("transaction", "no_offer_meets_constraints"), ("store", "store_unavailable"),
    ]:
        metrics.denied(layer, reason)
    m = registry_scrape(metrics)
    assert m.by("broker_budget_exhausted_total", "layer") == {
        ("transaction",): 1, ("session",): 1, ("period",): 2}
    assert sum(m.by("broker_denials_total", "layer", "reason").values()) == 10


# --- the metrics address -------------------------------------------------------------------------


def test_metrics_address_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_yaml(tmp_path / "broker.yaml", {
            "listen": f"127.0.0.1:{free_port()}", "metrics": {"listen": f"127.0.0.1:{port}"}})
        result = run_cli(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr  # a bind failure is a configuration error
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ramp-broker:")]
    assert len(lines) == 1, result.stderr
    assert "metrics.listen" in lines[0], result.stderr
    assert f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
