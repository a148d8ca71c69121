"""Budget threshold alerts (broker.observe.alerts): claims in a real store, POSTs to a real webhook server.

Every test runs against both stores (SQLite in tmp_path, Redis on the session's redis-server
under its own prefix) unless it says otherwise. The webhook is a tiny ASGI app behind hypercorn
on a free loopback port, in the test's own event loop: it records every request and can hold
its answers (`gate`) or answer with given statuses first.

"No more deliveries" is shown by causality, never by waiting: a *marker* crossing (another
scope) is checked afterwards, and since claims and each webhook's deliveries are both handled in
order, anything the earlier checks could still have sent arrives before the marker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker.config import AlertsSetting
from broker.observe.alerts import Alerter
from broker.observe.instrument import TimedStore
from broker.observe.metrics import Metrics
from budget.layers import OPEN_ALLOWANCE, Layer, Snapshot
from budget.periods import Period
from budget.stores.contract import Store
from budget.stores.redis import RedisStore
from budget.stores.sqlite import SqliteStore
from common.clock import ManualClock
from common.configfile import ConfigError
from currency.money import Money
from rpc_server.serving import not_a_request, read_body
from tests.harness import Exchange, broker_config, free_port, running_broker, serving
from tests.redis_server import RedisServer

ACCOUNT = "acme"
SCOPE = "team:x"
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
WAIT = 10.0  # upper bound on any single wait for something that must happen
SECRET_ENV = "RAMP_ALERTS_TEST_SECRET"


# --- the webhook server -------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int = 0  # what the server answered (0 until it has)

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    @property
    def scope(self) -> str:
        return str(self.json["scope"])

    @property
    def threshold(self) -> str:
        return str(self.json["threshold"])


@dataclass(eq=False)
class WebhookServer:
    """An ASGI app recording POSTs. `statuses` are answered first, in order, then 200.
    While `gate` is clear, every request is recorded (and queued on `arrivals`) at once but
    answered only once it is set."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Received] = field(default_factory=list)
    arrivals: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.gate.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if await not_a_request(scope, receive, send):
            return
        body = await read_body(receive)
        got = Received({k.decode().lower(): v.decode() for k, v in scope["headers"]}, body)
        self.requests.append(got)
        self.arrivals.put_nowait(got)
        await self.gate.wait()
        # Chosen once the gate opens, so a held request can be answered with a failure.
        status = got.status = self.statuses.pop(0) if self.statuses else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def next(self) -> Received:
        return await asyncio.wait_for(self.arrivals.get(), WAIT)

    async def until(self, scope: str, count: int = 1) -> list[Received]:
        """Every request up to and including the `count`-th one for `scope`."""
        out: list[Received] = []
        seen = 0
        for _ in range(1000):
            got = await self.next()
            out.append(got)
            if got.scope == scope:
                seen += 1
                if seen == count:
                    return out
        pytest.fail(f"more than 1000 requests before {count} for {scope}")


@contextlib.asynccontextmanager
async def webhook_server() -> AsyncIterator[WebhookServer]:
    server = WebhookServer()
    port = free_port()
    try:
        async with serving(server, port):
            server.url = f"http://127.0.0.1:{port}/hooks/budget"
            yield server
            server.gate.set()  # never leave a request hanging at shutdown
    finally:
        server.gate.set()


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookServer]:
    async with webhook_server() as server:
        yield server


# --- stores, snapshots, alerters ----------------------------------------------------------------

StoreOpener = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreOpener]:
    """Opens stores on one shared backing store (one file, or one Redis prefix), as brokers do."""
    url: str = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    opened: list[Store] = []

    async def open_one() -> Store:
        store: Store
        if request.param == "sqlite":
            store = await SqliteStore.open(tmp_path / "budget.sqlite3", timeout_ms=5000)
        else:
            store = await RedisStore.open(url, timeout_ms=5000, prefix=prefix)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(stores: StoreOpener) -> Store:
    return await stores()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def snap(clock: ManualClock, spent: str, *, limit: str = "10.00", reserved: str = "0.00",
         scope: str = SCOPE, period: str = "day", layer: Layer = Layer.PERIOD) -> Snapshot:
    window = Period.parse(period, "period").window(clock.now(), ZoneInfo("UTC"))
    return Snapshot(
        layer=layer, scope=scope, limit=Money.parse(limit, "USD", "limit"),
        spent=Money.parse(spent, "USD", "spent"), reserved=Money.parse(reserved, "USD", "reserved"),
        transaction_count=1, as_of=clock.now(), period_start=window.start, period_end=window.end,
        period=period, failure_policy="closed", account=ACCOUNT,
    )


def marker(clock: ManualClock, scope: str) -> Snapshot:
    """A crossing of the lowest threshold only, in a scope of its own."""
    return snap(clock, "5.00", scope=scope)


def alerts_setting(*hooks: str | dict[str, Any], **overrides: Any) -> AlertsSetting:
    tree: dict[str, Any] = {
        "webhooks": [{"url": h} if isinstance(h, str) else h for h in hooks],
        "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.04,
    }
    tree.update(overrides)
    return AlertsSetting.model_validate(tree)


def alerter(setting: AlertsSetting, store: Store, clock: ManualClock, *, metrics: Metrics | None = None,
            instance: str = "127.0.0.1:9090") -> Alerter:
    return Alerter(setting, store, clock, metrics or Metrics(), grace_ms=3_600_000, instance=instance)


@contextlib.asynccontextmanager
async def running(*alerters: Alerter) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in alerters]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def fired(metrics: Metrics, threshold: str) -> float:
    return sample(metrics, "broker_budget_alerts_total", threshold=threshold)


def deliveries(metrics: Metrics, outcome: str) -> float:
    return sample(metrics, "broker_alert_webhook_deliveries_total", outcome=outcome)


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (every 10 ms, at most WAIT seconds) until it holds."""
    for _ in range(int(WAIT / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


# --- firing -------------------------------------------------------------------------------------


async def test_each_threshold_fires_once_lowest_first(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    claims: list[str] = []
    counted = TimedStore(store, lambda op, _s, _f: claims.append(op))
    metrics = Metrics()
    a = alerter(alerts_setting(webhook.url), counted, clock, metrics=metrics)
    async with running(a):
        a.check([snap(clock, "4.99")])  # below 50%: nothing
        a.check([snap(clock, "5.00")])  # exactly 50%
        a.check([snap(clock, "6.00")])
        a.check([snap(clock, "10.00")])  # 80%, 95% and 100% at once
        a.check([snap(clock, "10.00")])
        a.check([marker(clock, "team:mark-1")])
        got = await webhook.until("team:mark-1")
        assert [(r.scope, r.threshold) for r in got] == [
            (SCOPE, "0.5"), (SCOPE, "0.8"), (SCOPE, "0.95"), (SCOPE, "1"), ("team:mark-1", "0.5")]
        assert claims == ["claim"] * 5
        # Settled names are remembered: more commits in the window do not ask the store again.
        a.check([snap(clock, "12.00")])
        a.check([marker(clock, "team:mark-2")])
        got = await webhook.until("team:mark-2")
        assert [r.scope for r in got] == ["team:mark-2"]
        assert claims == ["claim"] * 6
        await eventually(lambda: deliveries(metrics, "delivered") == 6, "every answer was read")
    assert [fired(metrics, t) for t in ("0.5", "0.8", "0.95", "1")] == [3, 1, 1, 1]
    assert deliveries(metrics, "retried") == deliveries(metrics, "failed") == 0


async def test_one_commit_fires_every_threshold_it_crosses_in_order(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    a = alerter(alerts_setting(webhook.url), store, clock)
    async with running(a):
        a.check([snap(clock, "8.00"), marker(clock, "team:mark")])
        got = await webhook.until("team:mark")
        assert [(r.scope, r.threshold) for r in got] == [(SCOPE, "0.5"), (SCOPE, "0.8"),
                                                         ("team:mark", "0.5")]


async def test_only_period_windows_with_a_limit_are_alerted(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    a = alerter(alerts_setting(webhook.url), store, clock)
    window = snap(clock, "1.00")
    async with running(a):
        a.check([
            snap(clock, "10.00", layer=Layer.SESSION, scope="session:s1"),
            Snapshot(layer=Layer.PERIOD, scope="team:open", limit=Money.parse("1.00", "USD", "l"),
                     spent=Money.parse("1.00", "USD", "s"), reserved=Money.zero("USD"),
                     transaction_count=1, as_of=clock.now(), period=OPEN_ALLOWANCE, account=ACCOUNT),
            snap(clock, "0.00", limit="0.00", scope="team:zero"),
            snap(clock, "3.00", limit="0.00", scope="team:zero-spent"),
            window,
            marker(clock, "team:mark"),
        ])
        assert [r.scope for r in await webhook.until("team:mark")] == ["team:mark"]


async def test_a_new_window_fires_again(store: Store, webhook: WebhookServer, clock: ManualClock) -> None:
    a = alerter(alerts_setting(webhook.url), store, clock)
    async with running(a):
        a.check([snap(clock, "5.00")])
        first = (await webhook.next()).json
        clock.advance(86_400)
        a.check([snap(clock, "5.00")])
        second = (await webhook.next()).json
    assert (first["threshold"], second["threshold"]) == ("0.5", "0.5")
    assert first["window_start"] == "2026-03-10T00:00:00+00:00"
    assert second["window_start"] == "2026-03-11T00:00:00+00:00"
    assert second["window_end"] == "2026-03-12T00:00:00+00:00"
    assert first["id"] != second["id"]


async def test_two_alerters_on_one_store_deliver_each_threshold_once(
    stores: StoreOpener, webhook: WebhookServer, clock: ManualClock
) -> None:
    m1, m2 = Metrics(), Metrics()
    a1 = alerter(alerts_setting(webhook.url), await stores(), clock, metrics=m1, instance="b1")
    a2 = alerter(alerts_setting(webhook.url), await stores(), clock, metrics=m2, instance="b2")
    async with running(a1, a2):
        # Both brokers see every commit's numbers (the store reports the shared counters).
        for spent in ("7.00", "8.50", "9.00"):
            a1.check([snap(clock, spent)])
            a2.check([snap(clock, spent)])
        a1.check([marker(clock, "team:mark-1")])
        a2.check([marker(clock, "team:mark-2")])
        got: list[Received] = []
        for _ in range(100):
            got.append(await webhook.next())
            if {"team:mark-1", "team:mark-2"} <= {r.scope for r in got}:
                break
    ours = [r for r in got if r.scope == SCOPE]
    assert sorted(r.threshold for r in ours) == ["0.5", "0.8"]
    assert {r.json["broker"] for r in ours} <= {"b1", "b2"}
    assert sorted(r.scope for r in got if r.scope != SCOPE) == ["team:mark-1", "team:mark-2"]
    # Each marker came after everything its own alerter could still have sent.
    assert len(webhook.requests) == 4
    assert fired(m1, "0.8") + fired(m2, "0.8") == 1
    assert fired(m1, "0.5") + fired(m2, "0.5") == 3  # one for team:x, and each marker


# --- the payload and its signature --------------------------------------------------------------


async def test_alert_is_logged_and_posted_signed_with_its_numbers(
    store: Store, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret-key")
    async with webhook_server() as signed, webhook_server() as plain:
        setting = alerts_setting({"url": signed.url, "secret_env": SECRET_ENV}, plain.url)
        a = alerter(setting, store, clock, instance="127.0.0.1:7001")
        with caplog.at_level(logging.WARNING, logger="broker.alerts"):
            async with running(a):
                a.check([snap(clock, "6.50", limit="8.00", reserved="0.50")])  # 81.25%
                s = [await signed.next(), await signed.next()]
                p = [await plain.next(), await plain.next()]
    assert [r.threshold for r in s] == [r.threshold for r in p] == ["0.5", "0.8"]
    got = s[1]
    assert got.body == p[1].body
    expected = hmac.new(b"s3cret-key", got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["x-ramp-signature"], f"sha256={expected}")
    assert "x-ramp-signature" not in p[1].headers
    assert got.headers["content-type"] == "application/json"
    body = got.json
    assert got.headers["x-ramp-alert-id"] == body["id"]
    # Serialized once, canonically: sorted keys, no spaces.
    assert json.dumps(body, sort_keys=True, separators=(",", ":")).encode() == got.body
    assert body == {
        "event": "budget_threshold_crossed", "id": body["id"], "account": ACCOUNT, "scope": SCOPE,
        "period": "day", "window_start": "2026-03-10T00:00:00+00:00",
        "window_end": "2026-03-11T00:00:00+00:00", "threshold": "0.8", "utilization": "0.8125",
        "limit": {"amount": "8.00", "currency": "USD"}, "spent": {"amount": "6.50", "currency": "USD"},
        "reserved": {"amount": "0.50", "currency": "USD"},
        "remaining": {"amount": "1.00", "currency": "USD"},
        "as_of": "2026-03-10T12:00:00+00:00", "broker": "127.0.0.1:7001",
    }
    assert len(body["id"]) == 32
    assert body["id"] != s[0].json["id"]
    assert s[0].json["utilization"] == "0.8125"
    records = [r for r in caplog.records if getattr(r, "event", None) == "budget_alert"]
    assert [r.getMessage() for r in records] == [
        "budget alert: team:x day 50% of 8.00 USD spent", "budget alert: team:x day 80% of 8.00 USD spent"]
    assert all(r.levelno == logging.WARNING and r.name == "broker.alerts" for r in records)
    fields = records[1].__dict__
    assert (fields["alert_id"], fields["threshold"], fields["utilization"], fields["limit"],
            fields["spent"], fields["currency"]) == (body["id"], "0.8", "0.8125", "8.00", "6.50", "USD")
    # No float anywhere near an amount: every number travels as a decimal string.
    assert all(isinstance(fields[k], str) for k in ("limit", "spent", "reserved", "remaining",
                                                    "utilization", "threshold"))
    assert Decimal(body["utilization"]) == Decimal("6.50") / Decimal("8.00")


@pytest.mark.parametrize("value", [None, ""])
async def test_a_missing_secret_is_a_config_error_naming_the_setting(
    store: Store, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
    else:
        monkeypatch.setenv(SECRET_ENV, value)
    setting = alerts_setting("http://127.0.0.1:9/a",
                             {"url": "http://127.0.0.1:9/b", "secret_env": SECRET_ENV})
    with pytest.raises(ConfigError, match=rf"alerts\.webhooks\[1\]\.secret_env: .*{SECRET_ENV}"):
        alerter(setting, store, clock)


# --- delivery: retries, give-up, bounded queues, stopping ---------------------------------------


async def test_failing_webhook_is_retried_and_delivered_once(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    webhook.statuses = [500, 503]
    metrics = Metrics()
    a = alerter(alerts_setting(webhook.url, max_attempts=5), store, clock, metrics=metrics)
    async with running(a):
        a.check([snap(clock, "5.00")])
        a.check([marker(clock, "team:mark")])
        got = await webhook.until("team:mark")
        await eventually(lambda: deliveries(metrics, "delivered") == 2, "both answers were read")
    assert [(r.scope, r.status) for r in got] == [(SCOPE, 500), (SCOPE, 503), (SCOPE, 200),
                                                  ("team:mark", 200)]
    assert got[0].body == got[1].body == got[2].body
    assert len({r.headers["x-ramp-alert-id"] for r in got[:3]}) == 1
    assert (deliveries(metrics, "retried"), deliveries(metrics, "delivered"),
            deliveries(metrics, "failed")) == (2, 2, 0)


async def test_delivery_gives_up_after_max_attempts(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    webhook.statuses = [500, 500, 500]
    metrics = Metrics()
    nobody = f"http://127.0.0.1:{free_port()}/closed"  # nothing listens: connection refused
    a = alerter(alerts_setting(webhook.url, nobody, max_attempts=3), store, clock, metrics=metrics)
    async with running(a):
        a.check([snap(clock, "5.00")])
        a.check([marker(clock, "team:mark")])
        got = await webhook.until("team:mark")
        await eventually(lambda: deliveries(metrics, "failed") == 3, "both deliveries to the dead "
                         "webhook and the first to the failing one are given up")
        await eventually(lambda: deliveries(metrics, "delivered") == 1, "the marker's answer was read")
    assert [(r.scope, r.status) for r in got] == [(SCOPE, 500)] * 3 + [("team:mark", 200)]
    assert deliveries(metrics, "retried") == 2 + 2 * 2
    assert deliveries(metrics, "delivered") == 1


async def test_a_full_webhook_queue_drops_and_counts(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    metrics = Metrics()
    a = alerter(alerts_setting(webhook.url, queue_size=1), store, clock, metrics=metrics)
    webhook.gate.clear()
    async with running(a):
        a.check([snap(clock, "10.00")])  # four thresholds at once
        held = await webhook.next()  # the first is at the webhook, unanswered
        await eventually(lambda: sum(fired(metrics, t) for t in ("0.5", "0.8", "0.95", "1")) == 4,
                         "all four thresholds fired")
        # One at the webhook, one queued; the queue was full for the other two.
        assert metrics.registry.get_sample_value("broker_alert_webhook_dropped_total") == 2
        webhook.gate.set()
        queued = await webhook.next()
        a.check([marker(clock, "team:mark")])
        rest = await webhook.until("team:mark")
    assert [r.threshold for r in (held, queued)] == ["0.5", "0.8"]
    assert [r.scope for r in rest] == ["team:mark"]


async def test_check_does_not_wait_while_the_webhook_is_held(
    store: Store, webhook: WebhookServer, clock: ManualClock
) -> None:
    a = alerter(alerts_setting(webhook.url), store, clock)
    webhook.gate.clear()
    async with running(a):
        a.check([snap(clock, "5.00")])
        held = await webhook.next()
        # The webhook has not answered; checks and store writes go on regardless.
        a.check([snap(clock, "9.00"), marker(clock, "team:mark")])
        assert await store.claim(ACCOUNT, "unrelated", expire_at_ms=10**13, now_ms=0) is True
        assert not webhook.gate.is_set()
        assert webhook.requests == [held]
        webhook.gate.set()
        rest = await webhook.until("team:mark")
    assert [(r.scope, r.threshold) for r in [held, *rest]] == [
        (SCOPE, "0.5"), (SCOPE, "0.8"), ("team:mark", "0.5")]


async def test_stop_does_not_wait_out_a_backoff(
    store: Store, webhook: WebhookServer, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.statuses = [500]
    metrics = Metrics()
    setting = alerts_setting(webhook.url, max_attempts=5, backoff_initial_seconds=60,
                             backoff_max_seconds=600)
    a = alerter(setting, store, clock, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    try:
        a.check([snap(clock, "5.00")])
        await webhook.next()
        await eventually(lambda: deliveries(metrics, "retried") == 1, "the first attempt failed")
    finally:
        stop.set()
        with caplog.at_level(logging.WARNING, logger="broker.alerts"):
            # Far less than the 60 s backoff: stopping cancels it.
            await asyncio.wait_for(task, WAIT)
    assert len(webhook.requests) == 1
    assert any("1 webhook delivery(ies) dropped undelivered" in r.getMessage() for r in caplog.records)


# --- the store unreachable ------------------------------------------------------------------------


async def test_a_claim_lost_to_an_outage_is_tried_again_by_a_later_commit(
    tmp_path: Path, webhook: WebhookServer, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)
    await asyncio.to_thread(server.start)
    store = await RedisStore.open(server.url, timeout_ms=500)
    try:
        a = alerter(alerts_setting(webhook.url), store, clock)
        with caplog.at_level(logging.WARNING, logger="broker.alerts"):
            async with running(a):
                await asyncio.to_thread(server.kill)
                a.check([snap(clock, "5.00")])
                await eventually(lambda: any("store is unavailable" in r.getMessage()
                                             for r in caplog.records), "the claim failed")
                await asyncio.to_thread(server.start)
                await store.limits(ACCOUNT)  # a read: reconnects the pool
                a.check([snap(clock, "5.00")])
                got = await webhook.next()
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)
    assert (got.scope, got.threshold) == (SCOPE, "0.5")


# --- through a broker ---------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "redis"])
def store_setting(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return {"kind": "redis", "url": url, "key_prefix": f"t{uuid.uuid4().hex[:10]}"}
    return {"kind": "embedded", "path": str(tmp_path / "budget.sqlite3")}


async def test_a_purchase_completes_while_its_alert_is_held_at_the_webhook(
    exchange: Exchange, webhook: WebhookServer, tmp_path: Path, store_setting: dict[str, Any]
) -> None:
    key = "alerts-agent-key"
    config = broker_config(
        [exchange],
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": store_setting, "journal_path": str(tmp_path / "journal.jsonl"),
            "accounts": {ACCOUNT: {"scopes": {SCOPE: {"limits": [
                {"period": "day", "amount": "2.00", "currency": "USD"}]}}}},
        },
        agents=[{"id": "agent", "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                 "account": ACCOUNT, "charged_to": [SCOPE]}],
        alerts={"webhooks": [{"url": webhook.url}], "backoff_initial_seconds": 0.01},
    )
    webhook.gate.clear()
    clock = ManualClock(T0)
    async with running_broker(config, clock) as b:
        body = {"sessionId": "s1", "idempotencyKey": "k1", "uris": ["https://x.test/a"]}
        first = await b.post("BrokerService/Transact", body, key)
        assert first.status_code == 200, first.text  # 1.00 of 2.00: 50%
        held = await webhook.next()
        # The alert is stuck at the webhook; the next purchase (and its commit) is not.
        second = await b.post("BrokerService/Transact", {**body, "idempotencyKey": "k2"}, key)
        assert second.status_code == 200, second.text  # 2.00 of 2.00
        assert not webhook.gate.is_set()
        assert webhook.requests == [held]
        webhook.gate.set()
        rest = [await webhook.next() for _ in range(3)]
    assert [r.threshold for r in [held, *rest]] == ["0.5", "0.8", "0.95", "1"]
    assert {r.json["broker"] for r in rest} == {config.listen}
    assert rest[-1].json["spent"] == {"amount": "2.00", "currency": "USD"}
    assert datetime.fromisoformat(held.json["window_end"]) - datetime.fromisoformat(
        held.json["window_start"]) == timedelta(days=1)
