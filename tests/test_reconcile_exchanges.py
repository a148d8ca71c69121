"""`ramp-broker reconcile` against the Exchanges: open holds re-asked, and each Exchange's statement
of charges compared with the ledger per idempotency key. Real processes on loopback; the store is
the embedded SQLite file.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.operator.statement import NoStatement, StatementUnavailable, fetch_statement
from broker.purchase.agents import Agent
from broker.purchase.order import exchange_key
from budget.reconcile import Charged, KeyCharges, compare_statement
from tests.harness import free_port, serving
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

A, B, C = "https://x.test/a", "https://x.test/b", "https://x.test/c"  # 1.00, 2.00, 3.00 USD
ALICE = "alice-key"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(exchange: Child, state: Path, **period: Any) -> dict[str, Any]:
    return broker_tree(
        exchange,
        session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / "journal.jsonl"),
            "accounts": {"acme": {"scopes": {
                "user:alice": {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}]}}}},
            **period,
        },
        agents=[{"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "charged_to": ["user:alice"]}],
    )


def transact(key: str, uri: str) -> dict[str, Any]:
    return {"sessionId": "s1", "idempotencyKey": key, "uris": [uri]}


async def reconcile(config_path: Path) -> tuple[int, str]:
    result = await asyncio.to_thread(run_cli, ["reconcile", "--config", str(config_path)], Path.cwd())
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


@pytest.fixture
async def bought(tmp_path: Path) -> AsyncIterator[tuple[Child, Child]]:
    """(exchange, broker) after alice bought A (k1) and B (k2)."""
    async with start_exchange(tmp_path, catalog_tree()) as exchange, \
            start_broker(tmp_path, config(exchange, tmp_path)) as broker, \
            httpx.AsyncClient(timeout=15.0) as client:
        for key, uri in (("k1", A), ("k2", B)):
            r = await connect_call(client, broker, "BrokerService/Transact", transact(key, uri), key=ALICE)
            assert r.status_code == 200, r.text
        yield exchange, broker


async def test_statement_that_matches_the_ledger(bought: tuple[Child, Child], tmp_path: Path) -> None:
    exchange, broker = bought
    assert broker.config_path is not None
    # A second Exchange that publishes no statement (the broker itself answers 404 there).
    tree = yaml.safe_load(broker.config_path.read_text(encoding="utf-8"))
    tree["exchanges"].append({"name": "silent.test", "endpoint": broker.url})
    path = write_yaml(tmp_path / "with-silent.yaml", tree)
    code, out = await reconcile(path)
    assert code == 0, out
    assert "counters match the ledger" in out
    assert "no open holds" in out
    assert "exchange ref.test: its statement matches the ledger (2 key(s))" in out
    assert "exchange silent.test: publishes no statement of charges" in out

    async with httpx.AsyncClient() as client:
        r = await client.get(f"{exchange.url}/admin/statement")
    charges = r.json()["charges"]
    assert [(c["idempotency_key"], c["offer_id"], c["amount"], c["currency"]) for c in charges] == [
        (exchange_key(Agent("alice"), "k1"), "a", "1.00", "USD"),
        (exchange_key(Agent("alice"), "k2"), "b", "2.00", "USD")]


async def test_a_charge_the_ledger_does_not_have(bought: tuple[Child, Child]) -> None:
    exchange, broker = bought
    assert broker.config_path is not None
    # Someone buys under the broker's billing account, bypassing it.
    async with httpx.AsyncClient(timeout=10.0) as client:
        r = await client.post(
            f"{exchange.url}/ramp.v1.ExchangeService/ExecuteTransaction",
            json={"ver": "1", "idempotencyKey": "rb-bypass-1", "requester": {"id": "ramp-broker"},
                  "items": [{"offer": {"offerId": "c", "exchange": "ref.test"}}]},
            headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert (await exchange_state(client, exchange))["charges"] == 3
    code, out = await reconcile(broker.config_path)
    assert code == 1, out
    assert "counters match the ledger" in out
    assert ("MISMATCH exchange ref.test key rb-bypass-1 (not in the ledger): the Exchange charged "
            "c 3.00 USD; the ledger records nothing") in out
    assert "exchange ref.test: 1 of 3 key(s) differ from the ledger" in out


async def test_a_ledger_entry_removed_from_a_copy(bought: tuple[Child, Child], tmp_path: Path) -> None:
    _, broker = bought
    assert broker.config_path is not None
    copy = tmp_path / "copy.sqlite3"
    # A consistent copy of the live WAL database, then one purchase's ledger lines removed.
    with sqlite3.connect(tmp_path / "budget.sqlite3") as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with sqlite3.connect(copy) as db:
        assert db.execute("DELETE FROM ledger WHERE idempotency_key = 'alice#k1'").rowcount == 1
    db.close()
    tree = yaml.safe_load(broker.config_path.read_text(encoding="utf-8"))
    tree["period_budgets"]["store"]["path"] = str(copy)
    code, out = await reconcile(write_yaml(tmp_path / "copy.yaml", tree))
    assert code == 1, out
    assert "MISMATCH acme user:alice|month|" in out  # the counter no longer matches either
    k1 = exchange_key(Agent("alice"), "k1")
    assert (f"MISMATCH exchange ref.test key {k1} (not in the ledger): the Exchange charged a 1.00 USD; "
            "the ledger records nothing") in out


async def test_open_holds_are_re_asked_and_doubtful_ones_fail(tmp_path: Path) -> None:
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        try:
            tree = config(exchange, tmp_path, reservation_ttl_seconds=300)
            async with httpx.AsyncClient(timeout=15.0) as client:
                await set_knobs(client, exchange, execute_latency_ms=120_000)
                async with start_broker(tmp_path, tree) as broker:
                    buy = asyncio.create_task(connect_call(client, broker, "BrokerService/Transact",
                                                           transact("k1", B), key=ALICE))
                    try:
                        for _ in range(300):
                            if (await exchange_state(client, exchange))["execute_calls"] >= 1:
                                break
                            await asyncio.sleep(0.05)
                        assert await broker.kill() == -9
                        await asyncio.gather(buy, return_exceptions=True)
                    finally:
                        buy.cancel()
                assert broker.config_path is not None
                # The Exchange fails both tries: the hold stays, doubtful.
                await set_knobs(client, exchange, execute_latency_ms=0, fail_execute=2)
                code, out = await reconcile(broker.config_path)
                assert code == 1, out
                assert "DOUBTFUL hold " in out
                assert "(acme, key alice#k1): an Exchange did not answer" in out
                # Nothing charged yet anywhere: the statement has nothing to disagree about.
                assert "exchange ref.test: its statement matches the ledger (0 key(s))" in out

                # Answered now: rolled forward, committed as the Exchange says, and it matches.
                code, out = await reconcile(broker.config_path)
                assert code == 0, out
                assert "(acme, key alice#k1): settled with its Exchanges" in out
                assert "exchange ref.test: its statement matches the ledger (1 key(s))" in out
                assert (await exchange_state(client, exchange))["charges"] == 1
        finally:
            await exchange.kill()  # a purchase still sleeps in it


# --- the pieces, without processes ---------------------------------------------------------------


async def test_a_statement_that_is_not_json_or_fails() -> None:
    answers = {"/html/admin/statement": (200, b"<html>hello</html>", b"text/html"),
               "/other/admin/statement": (200, b'{"balance": 1}', b"application/json"),
               "/broken/admin/statement": (500, b'{"error": "down"}', b"application/json"),
               "/bad/admin/statement": (200, b'{"charges": [{"idempotency_key": "k"}]}', b"application/json")}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, body, kind = answers.get(scope["path"], (404, b"", b"text/plain"))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    async with serving(app, port):
        base = f"http://127.0.0.1:{port}"
        for path in ("/html", "/other", "/missing"):
            with pytest.raises(NoStatement):
                await fetch_statement(base + path, 5.0)
        for path in ("/broken", "/bad"):
            with pytest.raises(StatementUnavailable):
                await fetch_statement(base + path, 5.0)
    with pytest.raises(StatementUnavailable):
        await fetch_statement(f"http://127.0.0.1:{free_port()}", 5.0)


def test_compare_statement_per_key() -> None:
    one, two = Charged("a", Decimal("1.00"), "USD"), Charged("b", Decimal("2.0"), "USD")
    ledger = {"k1": KeyCharges({"alice#k1"}, {("alice#k1", "a", "u"): Charged("a", Decimal("1"), "USD")}),
              "k2": KeyCharges({"alice#k2"}, {("alice#k2", "b", "u"): two}, newest_ms=50),
              "k3": KeyCharges({"alice#k3"}, {("alice#k3", "a", "u"): one})}
    statement = [("k1", one), ("k2", Charged("b", Decimal("2.00"), "USD")), ("k3", one), ("k3", one),
                 ("k4", Charged("a", Decimal("0"), "USD"))]
    report = compare_statement("ex", statement, ledger, read_at_ms=100)
    assert (report.keys, report.skipped) == (3, 0)  # k4 charged nothing: nothing to compare
    (diff,) = report.differences  # 1.00 == 1 and 2.0 == 2.00; k3 was charged twice
    assert (diff.key, diff.ledger_keys) == ("k3", ("alice#k3",))
    assert (len(diff.exchange_says), len(diff.ledger_says)) == (2, 1)
    # An open hold's key and a key newer than the statement are not compared.
    report = compare_statement("ex", statement, ledger, open_keys={"k3"}, read_at_ms=10)
    assert (report.keys, report.skipped, report.ok) == (1, 2, True)
