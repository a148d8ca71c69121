"""Budget alerts from real `ramp-broker serve` processes to a webhook server on loopback.

Brokers share the session's redis-server (each test under its own key prefix) and a reference
Exchange process; the webhook is tests.test_alerts.WebhookServer, served in this test's event
loop. "No duplicates" is shown by causality, not by waiting: afterwards each broker fires a
*marker* alert in a scope of its own, and since a broker claims crossings and delivers to a
webhook in order, anything it could still have sent for the shared scope arrives before its
marker does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import Child, broker_tree, catalog_tree, connect_call, start_broker, start_exchange
from tests.test_alerts import Received, webhook_server

ACCOUNT = "acme"
SCOPE = "team:x"
A, C = "https://x.test/a", "https://x.test/c"  # 1.00 and 3.00 USD flat in catalog_tree()
SECRET_ENV, SECRET = "RAMP_ALERTS_PROC_SECRET", "proc-webhook-secret"
WAIT = 15.0  # bound on any one wait for something that must happen


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(exchange: Child, redis_url: str, prefix: str, journal: Path, hook: str, *,
           limit: str, markers: tuple[str, ...] = (), **alerts: Any) -> dict[str, Any]:
    """One broker on the shared Redis; agent `agent` is charged to SCOPE (a 366d limit of `limit`:
    one window for a year, so a run hardly ever straddles a boundary), agent `mark-<i>` to the
    marker scope `markers[i]` (2.00 each)."""
    scopes: dict[str, Any] = {SCOPE: {"limits": [{"period": "366d", "amount": limit, "currency": "USD"}]}}
    agents = [{"id": "agent", "key_sha256": sha("agent-key"), "account": ACCOUNT, "charged_to": [SCOPE]}]
    for i, scope in enumerate(markers):
        scopes[scope] = {"limits": [{"period": "366d", "amount": "2.00", "currency": "USD"}]}
        agents.append({"id": f"mark-{i}", "key_sha256": sha(f"mark-{i}-key"), "account": ACCOUNT,
                       "charged_to": [scope]})
    return broker_tree(
        exchange,
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis_url, "key_prefix": prefix, "timeout_ms": 2000},
            "journal_path": str(journal),
            "accounts": {ACCOUNT: {"scopes": scopes}},
        },
        agents=agents,
        alerts={"webhooks": [{"url": hook, "secret_env": SECRET_ENV}],
                "backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2, **alerts},
        logging={"format": "json"},
    )


async def buy(client: httpx.AsyncClient, broker: Child, key: str, uri: str = A,
              api_key: str = "agent-key") -> httpx.Response:
    body = {"sessionId": f"s-{key}", "idempotencyKey": key, "uris": [uri]}
    return await connect_call(client, broker, "BrokerService/Transact", body, key=api_key)


def alert_events(broker: Child) -> list[dict[str, Any]]:
    """The broker's structured budget_alert log events (its stderr is JSON lines)."""
    events = []
    for line in broker.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "budget_alert":
                events.append(record)
    return events


def signed(got: Received) -> bool:
    digest = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(got.headers.get("x-ramp-signature", ""), f"sha256={digest}")


async def metric(client: httpx.AsyncClient, broker: Child, name: str, **labels: str) -> float:
    """One sample from the broker's /metrics (its address is in the config file it was started from)."""
    assert broker.config_path is not None
    listen = yaml.safe_load(broker.config_path.read_text(encoding="utf-8"))["metrics"]["listen"]
    r = await client.get(f"http://{listen}/metrics")
    assert r.status_code == 200, r.text
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


async def test_two_brokers_crossing_thresholds_together_deliver_one_alert_each(
    tmp_path: Path, redis_url: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    marks = ("team:mark-1", "team:mark-2")
    env = {SECRET_ENV: SECRET}
    async with webhook_server() as hook, start_exchange(tmp_path, catalog_tree()) as exchange:
        trees = [config(exchange, redis_url, prefix, tmp_path / f"journal-{i}.jsonl", hook.url,
                        limit="10.00", markers=marks) for i in (1, 2)]
        async with start_broker(tmp_path, trees[0], name="broker-1", env=env) as b1, \
                start_broker(tmp_path, trees[1], name="broker-2", env=env) as b2, \
                httpx.AsyncClient(timeout=20.0) as client:
            brokers = (b1, b2)
            # 7.00 of 10.00, bought through both brokers at once (50% crossed on the way) ...
            first = await asyncio.gather(*(buy(client, brokers[i % 2], f"k{i}") for i in range(7)))
            assert [r.status_code for r in first] == [200] * 7, [r.text for r in first]
            # ... then both brokers together across 80%, 95% and 100%: one of four does not fit.
            second = await asyncio.gather(*(buy(client, brokers[i % 2], f"k{7 + i}") for i in range(4)))
            assert sorted(r.status_code for r in second) == [200, 200, 200, 429], [r.text for r in second]

            # Each broker then fires an alert of its own; once both markers are in, everything
            # either broker could have sent for SCOPE has arrived.
            for i, broker in enumerate(brokers):
                r = await buy(client, broker, f"mark-{i}", api_key=f"mark-{i}-key")
                assert r.status_code == 200, r.text
            got: list[Received] = []
            for _ in range(100):
                got.append(await asyncio.wait_for(hook.arrivals.get(), WAIT))
                if set(marks) <= {g.scope for g in got}:
                    break
            events = {b.name: alert_events(b) for b in brokers}

    ours = [g for g in got if g.scope == SCOPE]
    assert sorted(g.threshold for g in ours) == ["0.5", "0.8", "0.95", "1"], [g.json for g in ours]
    assert sorted(g.scope for g in got if g.scope != SCOPE) == sorted(marks)
    assert all(signed(g) for g in got)
    assert all(g.status == 200 for g in got)
    assert len({g.json["id"] for g in ours}) == 4
    assert {g.json["broker"] for g in ours} <= {b.url.removeprefix("http://") for b in (b1, b2)}
    final = next(g for g in ours if g.threshold == "1")
    assert final.json["spent"] == {"amount": "10.00", "currency": "USD"}
    # The structured log event: once per threshold across both brokers, from the claim's winner.
    logged = Counter(e["threshold"] for evs in events.values() for e in evs if e["scope"] == SCOPE)
    assert logged == Counter({"0.5": 1, "0.8": 1, "0.95": 1, "1": 1})
    ids = {e["alert_id"] for evs in events.values() for e in evs if e["scope"] == SCOPE}
    assert ids == {g.json["id"] for g in ours}


async def test_a_failing_webhook_never_holds_up_a_purchase_and_gets_the_alert_later(
    tmp_path: Path, redis_url: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    async with webhook_server() as hook, start_exchange(tmp_path, catalog_tree()) as exchange:
        tree = config(exchange, redis_url, prefix, tmp_path / "journal.jsonl", hook.url, limit="5.00",
                      max_attempts=6)
        hook.gate.clear()  # the webhook takes requests but does not answer yet
        async with start_broker(tmp_path, tree, env={SECRET_ENV: SECRET}) as broker, \
                httpx.AsyncClient(timeout=20.0) as client:
            r = await buy(client, broker, "k1", C)  # 3.00 of 5.00: 60%
            assert r.status_code == 200, r.text
            held = await asyncio.wait_for(hook.arrivals.get(), WAIT)
            # The 50% alert sits unanswered at the webhook; the next purchase goes through.
            r = await buy(client, broker, "k2", A)  # 4.00 of 5.00: 80%
            assert r.status_code == 200, r.text
            assert not hook.gate.is_set()
            assert hook.requests == [held]
            # The webhook now fails twice (the held request among them), then recovers.
            hook.statuses = [500, 500]
            hook.gate.set()
            got = [held]
            for _ in range(3):
                got.append(await asyncio.wait_for(hook.arrivals.get(), WAIT))
            delivered = 0.0
            for _ in range(int(WAIT / 0.05)):
                delivered = await metric(client, broker, "broker_alert_webhook_deliveries_total",
                                         outcome="delivered")
                if delivered == 2:
                    break
                await asyncio.sleep(0.05)
            retried = await metric(client, broker, "broker_alert_webhook_deliveries_total",
                                   outcome="retried")
            fired = await metric(client, broker, "broker_budget_alerts_total", threshold="0.5")

    assert [(g.threshold, g.status) for g in got] == [("0.5", 500), ("0.5", 500), ("0.5", 200),
                                                     ("0.8", 200)]
    assert got[0].body == got[1].body == got[2].body
    assert all(signed(g) for g in got)
    assert (delivered, retried, fired) == (2, 2, 1)
