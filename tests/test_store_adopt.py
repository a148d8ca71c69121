"""`ramp-broker store adopt|status`: a store that lost its memory is refused, then adopted from the
brokers' memory files, after which the brokers resume with the restored numbers.

SQLite: broker and Exchange as processes, the store file deleted while the broker is down.
Redis: an in-process broker on its own redis-server, FLUSHALLed under it. The CLI always runs
as its own process.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from budget.durability.adopt import Remembered, adopt, compare
from budget.durability.memory import StoreMemory, read_memory
from budget.reconcile import reconcile
from budget.stores.contract import CounterRef, StoreIdentity
from budget.stores.sqlite import SqliteStore
from common.statedir import state_dir
from tests.harness import RunningBroker, broker_config, catalog, free_port, running_broker, running_exchange
from tests.processes import (
    broker_tree,
    catalog_tree,
    connect_call,
    run_cli,
    start_broker,
    start_exchange,
    write_yaml,
)
from tests.redis_server import redis_server

A, B, C = "https://x.test/a", "https://x.test/b", "https://x.test/c"  # 1.00, 2.00, 3.00 USD
ALICE = "alice-key"
TOKEN_ENV, TOKEN = "RAMP_ADOPT_TEST_ADMIN_TOKEN", "adopt-admin-token"
NANO = 10**9


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def period_budgets(store: dict[str, Any], tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {
        "store": store, "journal_path": str(tmp_path / "journal.jsonl"), "sweep_interval_seconds": 0.2,
        "accounts": {"acme": {"scopes": {
            "user:alice": {"limits": [{"period": "month", "amount": "100.00", "currency": "USD"}]}}}},
        **more,
    }


AGENTS = [{"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "charged_to": ["user:alice"]}]


def transact(key: str, uri: str) -> dict[str, Any]:
    return {"sessionId": "s1", "idempotencyKey": key, "uris": [uri]}


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


def remembered_spent(path: Path) -> int:
    """The highest user:alice spend a broker's memory file holds (nano-units), 0 if none."""
    if not path.is_file():
        return 0
    memory = read_memory(path)
    marks = memory.accounts["acme"].counters.values() if "acme" in memory.accounts else []
    return max((m.spent for m in marks if m.counter.scope == "user:alice"), default=0)


async def cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = await asyncio.to_thread(run_cli, args, Path.cwd(), env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


# --- SQLite: the store file deleted --------------------------------------------------------------


async def test_sqlite_store_deleted_is_refused_then_adopted(tmp_path: Path) -> None:
    db = tmp_path / "budget.sqlite3"
    async with start_exchange(tmp_path, catalog_tree()) as exchange:
        port = free_port()
        tree = broker_tree(
            exchange, listen=f"127.0.0.1:{port}", metrics={"listen": f"127.0.0.1:{free_port()}"},
            session={"default_limit": {"amount": "1000.00", "currency": "USD"}},
            period_budgets=period_budgets({"kind": "embedded", "path": str(db)}, tmp_path),
            agents=AGENTS, admin={"token_env": TOKEN_ENV})
        memory = state_dir() / f"memory-{port}.json"
        env = {TOKEN_ENV: TOKEN}
        async with httpx.AsyncClient(timeout=15.0) as client:
            async with start_broker(tmp_path, tree, env=env) as broker:
                for key, uri in (("k1", A), ("k2", B)):
                    r = await connect_call(client, broker, "BrokerService/Transact", transact(key, uri),
                                           key=ALICE)
                    assert r.status_code == 200, r.text
                r = await connect_call(client, broker, "BudgetAdminService/SetPeriodLimit",
                                       {"scope": "user:alice", "period": "month",
                                        "limit": {"amount": "50.00", "currency": "USD"}}, token=TOKEN)
                assert r.status_code == 200, r.text

                async def remembered() -> bool:
                    return remembered_spent(memory) == 3 * NANO and \
                        read_memory(memory).accounts["acme"].limits_version >= 1
                await eventually(remembered, 10.0, "the broker remembers 3.00 spent and the limit")
            assert broker.config_path is not None
            config = str(broker.config_path)

            code, out, _ = await cli(["store", "status", "--config", config])
            assert code == 0, out
            assert f"{memory}: same:" in out

            for suffix in ("", "-wal", "-shm"):  # the store's memory is gone
                await asyncio.to_thread(Path(f"{db}{suffix}").unlink, missing_ok=True)

            async with start_broker(tmp_path, tree, env=env) as broker:
                r = await connect_call(client, broker, "BrokerService/Transact", transact("k3", C), key=ALICE)
                assert r.status_code == 503, r.text
                assert "lost data" in r.json()["message"], r.text

                code, out, _ = await cli(["store", "status", "--config", config])
                assert code == 1, out
                assert "account acme: store identity none" in out
                assert f"{memory}: lost: the store has no identity" in out

                code, out, err = await cli(["store", "adopt", "--config", config])
                assert code == 0, (out, err)
                assert "account acme: adopted as " in out
                assert "generation 2 (the store had no identity)" in out
                assert "restored user:alice|month|" in out
                assert "spent 0.00 USD -> 3.00 USD" in out
                assert "re-applied 1 operator limit(s)" in out
                assert "user:alice month: 50.00 USD" in out

                async def resumed() -> bool:
                    r = await connect_call(client, broker, "BrokerService/Transact", transact("k3", C),
                                           key=ALICE)
                    return r.status_code == 200
                await eventually(resumed, 10.0, "purchases resume after the adoption")

                r = await connect_call(client, broker, "BudgetAdminService/GetScopeStatus",
                                       {"scope": "user:alice"}, token=TOKEN)
                (state,) = r.json()["budgets"]
                assert (state["spent"]["amount"], state["limit"]["amount"]) == ("6.00", "50.00"), state

                code, out, _ = await cli(["store", "status", "--config", config])
                assert code == 0, out
                assert f"{memory}: same:" in out or f"{memory}: adopted:" in out, out

                # Counters match the ledger again (the restored spend has its own line); the
                # Exchange's statement shows the two purchases whose ledger lines were lost.
                code, out, _ = await cli(["reconcile", "--config", config])
                assert "counters match the ledger" in out, out
                assert code == 1, out
                assert out.count("(not in the ledger): the Exchange charged") == 2, out

                r = await connect_call(client, broker, "BudgetAdminService/GetScopeHistory",
                                       {"scope": "user:alice"}, token=TOKEN)
                kinds = [(e["kind"], e["amount"]["amount"]) for e in r.json()["entries"]]
                assert kinds == [("adopt", "3.00"), ("commit", "3.00")], kinds


async def test_adopt_refuses_without_memory_unless_empty(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "broker.yaml", {
        "period_budgets": period_budgets({"kind": "embedded", "path": str(tmp_path / "b.sqlite3")},
                                         tmp_path),
        "agents": AGENTS})
    nowhere = {"XDG_STATE_HOME": str(tmp_path / "empty-state")}
    code, out, err = await cli(["store", "adopt", "--config", str(config)], nowhere)
    assert code == 1, (out, err)
    assert "no broker memory file found" in err
    assert "--empty" in err

    code, out, err = await cli(["store", "adopt", "--config", str(config), "--empty"], nowhere)
    assert code == 0, (out, err)
    assert "generation 1 (the store had no identity)" in out

    code, _, err = await cli(["store", "adopt", "--config", str(config), "--memory",
                              str(tmp_path / "missing.json")])
    assert code == 2, err
    assert "--memory: no such file" in err
    bad = write_yaml(tmp_path / "bad.yaml", {"period_budgets": {"stor": {}}})
    code, _, err = await cli(["store", "adopt", "--config", str(bad)])
    assert code == 2, err
    assert "configuration error" in err


# --- Redis: FLUSHALL under a running broker --------------------------------------------------------


async def test_redis_flushall_is_refused_then_adopted(tmp_path: Path) -> None:
    memory = tmp_path / "memory.json"
    with redis_server() as server:
        tree: dict[str, Any] = {
            "session": {"default_limit": {"amount": "1000.00", "currency": "USD"}},
            "period_budgets": period_budgets({"kind": "redis", "url": server.url, "timeout_ms": 1000},
                                             tmp_path, memory_path=str(memory)),
            "agents": AGENTS,
        }
        async with running_exchange(catalog()) as exchange:
            config = broker_config([exchange], **tree)
            config_file = write_yaml(tmp_path / "broker.yaml",
                                     config.model_dump(mode="json", exclude_unset=True))
            async with running_broker(config) as broker:
                await _buy(broker, "k1", A, 200)
                await _buy(broker, "k2", B, 200)

                async def remembered() -> bool:
                    return remembered_spent(memory) == 3 * NANO
                await eventually(remembered, 10.0, "the broker remembers 3.00 spent")

                redis = Redis.from_url(server.url)
                try:
                    await redis.flushall()
                finally:
                    await redis.aclose()
                body = await _buy(broker, "k3", C, 503)
                assert "lost data" in body["message"], body

                code, out, err = await cli(["store", "adopt", "--config", str(config_file), "--memory",
                                            str(memory)])
                assert code == 0, (out, err)
                assert "spent 0.00 USD -> 3.00 USD" in out, out

                async def resumed() -> bool:
                    r = await broker.post("BrokerService/Transact", transact("k3", C), key=ALICE)
                    return r.status_code == 200
                await eventually(resumed, 10.0, "purchases resume after the adoption")
                r = await broker.post("BudgetService/GetBudgetStatus", {}, key=ALICE)
                (state,) = [b for b in r.json()["budgets"] if b.get("scope") == "user:alice"]
                assert Decimal(state["spent"]["amount"]) == 6, state


async def _buy(broker: RunningBroker, key: str, uri: str, status: int) -> dict[str, Any]:
    r = await broker.post("BrokerService/Transact", transact(key, uri), key=ALICE)
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    return body


# --- the adoption itself, on a store without a broker ---------------------------------------------


async def test_adopt_takes_the_highest_marks_the_newest_limits_and_identity(tmp_path: Path) -> None:
    ref = CounterRef("user:alice", "month", "2999-01", "USD", 0, 2**41)
    store = await SqliteStore.open(tmp_path / "s.sqlite3")
    try:
        await store.set_identity("acme", StoreIdentity("old", 1))
        files = []
        for name, generation, spent, version, value in (
                ("memory-1.json", 1, 5 * NANO, 2, ("USD", 7 * NANO)),
                ("memory-2.json", 3, 8 * NANO, 1, None)):
            memory = StoreMemory(tmp_path / name)
            memory.saw_identity("acme", StoreIdentity("old", generation))
            memory.saw_spent("acme", ref, spent, 2**41)
            memory.saw_limits("acme", version, {("user:alice", "month"): value})
            await memory.save()
            files.append(Remembered(tmp_path / name, read_memory(tmp_path / name)))

        _, before = await compare(store, "acme", files, now_ms=0)
        assert [c.verdict for c in before] == ["older", "older"]  # limits version 0 < 2; generation 1 < 3

        done = await adopt(store, "acme", files, now_ms=0)
        assert done.after == StoreIdentity("old", 4)
        (restored,) = done.restored
        assert (restored.before, restored.after, restored.source.name) == (0, 8 * NANO, "memory-2.json")
        assert done.limits == [("user:alice", "month", ("USD", 7 * NANO))]  # version 2 beats version 1
        (state,) = await store.read("acme", [ref])
        assert state.spent == 8 * NANO
        assert (await store.limits("acme")).values == {("user:alice", "month"): ("USD", 7 * NANO)}
        assert (await reconcile(store, ["acme"])).ok  # the restored spend has its ledger line
        assert [e.kind for e in [e async for e in store.ledger("acme")]] == ["adopt"]

        again = await adopt(store, "acme", files, now_ms=0)  # nothing left to restore
        assert again.after == StoreIdentity("old", 5)
        assert (again.restored, again.limits) == ([], [])
        _, after = await compare(store, "acme", files, now_ms=0)
        assert [c.verdict for c in after] == ["adopted", "adopted"]
    finally:
        await store.close()
