"""Logs: JSON lines (or text) carrying the request id and idempotency key; no float amounts."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.observe.logs import IDEMPOTENCY_KEY, REQUEST_ID, configure
from tests.harness import CONNECT_JSON
from tests.processes import broker_tree, start_broker, start_exchange
from tests.processes import catalog_tree as exchange_catalog


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    logging.getLogger("httpx").setLevel(httpx_level)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_carry_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    configure("text", "INFO")
    logging.getLogger("t").info("no request")
    tokens = REQUEST_ID.set("r-1"), IDEMPOTENCY_KEY.set("k-1")
    logging.getLogger("t").info("bought %s", "1.00 USD")
    REQUEST_ID.reset(tokens[0])
    IDEMPOTENCY_KEY.reset(tokens[1])
    first, second = out.getvalue().splitlines()
    assert first.endswith("t: no request")
    assert second.endswith("t: bought 1.00 USD [request_id=r-1 idempotency_key=k-1]")


@pytest.mark.usefixtures("restore_logging")
def test_httpx_request_lines_show_only_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readiness probes ask every Exchange every few seconds: at INFO that is not news."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    configure("text", "INFO")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:9191/healthz")
    logging.getLogger("httpx").warning("something httpx warns about")
    assert out.getvalue().count("\n") == 1
    assert "warns about" in out.getvalue()
    configure("text", "DEBUG")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:9191/healthz")
    assert "HTTP Request" in out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_are_objects_with_the_ids_and_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    configure("json", "INFO")
    token = REQUEST_ID.set("r-2")
    logging.getLogger("t").warning("alert", extra={"event": "budget_alert", "spent": "4.00"})
    REQUEST_ID.reset(token)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "alert"
    assert (record["level"], record["logger"], record["request_id"]) == ("WARNING", "t", "r-2")
    assert (record["event"], record["spent"]) == ("budget_alert", "4.00")
    assert "time" in record


async def test_a_broker_logs_json_with_request_and_idempotency_ids(tmp_path: Path) -> None:
    async with start_exchange(tmp_path, exchange_catalog()) as exchange:
        tree = broker_tree(exchange, logging={"format": "json"},
                           session={"default_limit": {"amount": "10.00", "currency": "USD"}})
        async with start_broker(tmp_path, tree) as broker, httpx.AsyncClient() as client:
            r = await client.post(
                f"{broker.url}/ramp.broker.v1.BrokerService/Transact",
                json={"sessionId": "s1", "idempotencyKey": "key-42", "uris": ["https://x.test/b"]},
                headers={**CONNECT_JSON, "x-request-id": "req-7"})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "req-7"
            r = await client.post(
                f"{broker.url}/ramp.broker.v1.BrokerService/Transact",
                json={"sessionId": "s1", "idempotencyKey": "key-43", "uris": ["https://x.test/a"]},
                headers=CONNECT_JSON)
            generated = r.headers["x-request-id"]
            assert len(generated) == 32
            for _ in range(100):  # the log line is written just before the answer; let it drain
                if "key-43" in broker.stderr:
                    break
                await asyncio.sleep(0.02)
            text = broker.stderr
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records, text
    (bought,) = [r for r in records if r.get("idempotency_key") == "key-42"]
    assert bought["request_id"] == "req-7"
    assert bought["message"] == "transact purchased: 1 item(s), total 2.00 USD"
    assert any(r.get("request_id") == generated and r.get("idempotency_key") == "key-43" for r in records)
    assert _floats(records) == []
