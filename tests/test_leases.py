"""Lease mode through the broker: budget spent from pre-debited leases, reported in batches.

Brokers run in-process on the embedded store (the Redis store passes the same store
conformance cases; kill -9 under load, with Redis restarted, is test_crash_stress.py[lease]). The
money must add up exactly as in strict mode: what the Exchange charged is the ledger,
once per key, and no counter ever shows spent + reserved above its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.app import build_broker, open_store
from broker.config import BrokerConfig, StoreSetting
from budget import leases as leases_module
from budget.durability.journal import Journal
from budget.leases import TIERS, LeaseBook, Phase, Rate, lease_size, phase_of
from budget.periods import to_ms
from budget.stores.contract import CounterRef, Hold, Line, Reserved, Store, StoreUnavailable
from common.clock import ManualClock
from tests.harness import (
    Exchange,
    RunningBroker,
    agent_key,
    broker_config,
    catalog,
    denial,
    free_port,
    running_broker,
    running_exchange,
    serving,
)

A = "https://x.test/a"
KEY = "lease-agent"
ACCOUNT = "acme"
NANO = 10**9


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def lease_config(exchange: Exchange, state: Path, *, limit: str = "100000.00", name: str = "1",
                 pacing: str = "off", refresh_s: float = 0.2, **scope: Any) -> BrokerConfig:
    return broker_config(
        [exchange],
        listen=f"127.0.0.1:{free_port()}",
        session={"default_limit": {"amount": "10000000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "embedded", "path": str(state / "budget.sqlite3")},
            "journal_path": str(state / f"journal-{name}.jsonl"),
            "memory_path": str(state / f"memory-{name}.json"),
            "leases": {"refresh_seconds": refresh_s, "ttl_seconds": 30,
                       "journal_path": str(state / f"leases-{name}.jsonl")},
            "accounts": {ACCOUNT: {"scopes": {"user:lee": {
                "limits": [{"period": "month", "amount": limit, "currency": "USD"}], "mode": "lease",
                "pacing": pacing, **scope}}}},
        },
        agents=[{"id": "lee", "key_sha256": sha(KEY), "account": ACCOUNT, "charged_to": ["user:lee"]}],
    )


async def buy(b: RunningBroker, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    r = await b.post("BrokerService/Transact", {"sessionId": "s", "idempotencyKey": key, "uris": [A]}, KEY)
    return r.status_code, r.json(), dict(r.headers)


@contextlib.asynccontextmanager
async def opened(state: Path) -> AsyncIterator[Store]:
    store = await open_store(StoreSetting(kind="embedded", path=str(state / "budget.sqlite3")))
    try:
        yield store
    finally:
        await store.close()


async def books(state: Path) -> tuple[int, int, int, list[str]]:
    """(spent, reserved, leased, ledger keys) of user:lee, straight from the store."""
    async with opened(state) as store:
        counters = [(ref, st) async for ref, st in store.counters(ACCOUNT) if ref.scope == "user:lee"]
        ledger = [e async for e in store.ledger(ACCOUNT, scope="user:lee")]
    (_, st), = counters
    assert st.spent == sum(e.amount for e in ledger)  # counters are derived from the ledger
    return st.spent, st.reserved, st.leased, [agent_key(e.idempotency_key) for e in ledger]


async def _no_identity(account: str) -> None:
    return None


def bare_book(
    store: Store, journal: Journal | None = None, clock: ManualClock | None = None,
    store_timeout_s: float = 1.0,
) -> LeaseBook:
    """A LeaseBook on `store` alone, no broker around it, on 23 November 2026 (unless `clock`)."""
    return LeaseBook(store, clock=clock or ManualClock(datetime(2026, 11, 23, tzinfo=UTC)), broker="b1",
                     journal=journal, identity=_no_identity, floor=lambda account, counter: 0,
                     store_timeout_s=store_timeout_s)


def november_hold(amount: int = NANO, limit: int = 10**6 * NANO) -> Hold:
    """One purchase's hold (1.00) on user:lee's November 2026 counter (limit 1,000,000)."""
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    ref = CounterRef("user:lee", "month", "2026-11", "USD", to_ms(start), to_ms(end))
    return Hold(ref, amount, limit, to_ms(end + timedelta(days=7)))


def spend(hold_index: int, amount: int) -> Line:
    """A line of a purchase that spent `amount` on its hold_index-th counter."""
    return Line(hold_index, amount, str(Decimal(amount) / NANO), "USD", "ex", "o", A)


async def charged(exchange: Exchange) -> Decimal:
    state = await exchange.state()
    return Decimal(1000) - Decimal(state["balances"]["ramp-broker"]["USD"])


@pytest.fixture
async def ex() -> AsyncIterator[Exchange]:
    async with running_exchange(catalog()) as e:
        yield e


# --- the purchase path ------------------------------------------------------------------------------


async def test_purchases_spend_leases_and_are_reported_in_batches(ex: Exchange, tmp_path: Path) -> None:
    async with running_broker(lease_config(ex, tmp_path)) as b:
        book = b.broker.period.leases if b.broker.period else None
        assert book is not None

        async def agent(n: int) -> None:
            for i in range(10):
                status, body, headers = await buy(b, f"a{n}-{i}")
                assert status == 200, body
                assert headers["x-budget-mode"].startswith("lease")
                (state,) = [s for s in body["budgets"] if s["layer"] == "BUDGET_LAYER_PERIOD"]
                assert state["mode"] == "ENFORCEMENT_MODE_LEASE"

        await asyncio.gather(*(agent(n) for n in range(8)))
        # 80 purchases; the store was asked a fraction of that (refreshes, not one call each).
        assert book.store_calls <= 30, book.store_calls
    # Closed: every lease was reported and given back.
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased) == (80 * NANO, 0, 0)
    assert sorted(keys) == sorted(f"a{n}-{i}" for n in range(8) for i in range(10))
    assert await charged(ex) == 80


@pytest.mark.parametrize("mode", ["lease", "strict"])
async def test_a_period_state_reads_the_same_in_either_mode(ex: Exchange, tmp_path: Path, mode: str) -> None:
    """Every field of the scope's state in each answer, purchase after purchase: on leases, the
    purchases this broker has not reported yet count (transactionCount included), and once a
    refresh has reported them they are not counted twice."""
    async with running_broker(lease_config(ex, tmp_path, refresh_s=300, mode=mode)) as b:
        book = b.broker.period.leases if b.broker.period else None
        assert (book is not None) == (mode == "lease")
        for n in range(1, 5):
            if n == 3 and book is not None:
                assert await book.refresh(ACCOUNT)
            status, body, _ = await buy(b, f"s{n}")
            assert status == 200, body
            (state,) = [s for s in body["budgets"] if s["layer"] == "BUDGET_LAYER_PERIOD"]
            now = datetime.now(UTC)
            start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=32)).replace(day=1)
            reserved = state.pop("reserved")["amount"]
            assert Decimal(reserved) >= 0 if mode == "lease" else reserved == "0.00"  # a lease is held
            remaining = Decimal(state.pop("remaining")["amount"])
            assert remaining == Decimal(100000) - n - Decimal(reserved)
            assert state.pop("asOf")
            state.pop("spendRatePerHour", None)  # a forecast, once two readings make one
            state.pop("projectedExhaustion", None)
            assert state == {
                "layer": "BUDGET_LAYER_PERIOD", "scope": "user:lee", "period": "month",
                "limit": {"amount": "100000.00", "currency": "USD"},
                "spent": {"amount": f"{n}.00", "currency": "USD"},
                "transactionCount": str(n),
                "periodStart": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "periodEnd": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "failurePolicy": "closed",
                "mode": f"ENFORCEMENT_MODE_{mode.upper()}",
                **({"phase": "generous"} if mode == "lease" else {}),
            }, n


@pytest.mark.parametrize("mode", ["lease", "strict"])
async def test_the_mode_and_phase_are_reported_to_the_end_and_on_the_denial(
    ex: Exchange, tmp_path: Path, mode: str,
) -> None:
    """x-budget-mode and x-budget-remaining on every Transact, denials included, and the denial's
    own mode. Near its end a lease scope is synchronous (every purchase reserves in the store): it
    still says lease, with that phase."""
    async with running_broker(lease_config(ex, tmp_path, limit="5.00", mode=mode)) as b:
        phases = []
        for n in range(1, 6):
            status, body, headers = await buy(b, f"e{n}")
            assert status == 200, body
            (state,) = [s for s in body["budgets"] if s["layer"] == "BUDGET_LAYER_PERIOD"]
            left = Decimal(5 - n) - Decimal(state["reserved"]["amount"])  # a lease held is not left
            assert headers["x-budget-remaining"] == f"{left} USD; scope=user:lee"
            expected = "lease; phase=" + state["phase"] if mode == "lease" else "strict"
            assert headers["x-budget-mode"] == expected
            phases.append(state.get("phase", ""))
        status, body, headers = await buy(b, "e6")
        assert status == 429, body
        assert headers["x-budget-remaining"] == "0.00 USD; scope=user:lee"
        (exhausted,) = [d["debug"] for d in body["details"] if d["type"] == "ramp.broker.v1.BudgetExhausted"]
        assert exhausted["mode"] == f"ENFORCEMENT_MODE_{mode.upper()}"
        if mode == "lease":
            assert headers["x-budget-mode"] in ("lease; phase=synchronous", "lease; phase=exhausted")
            assert phases[-1] == "synchronous"  # the last dollar was bought in the store
        else:
            assert headers["x-budget-mode"] == "strict"
            assert phases == [""] * 5


async def test_a_retry_on_lease_is_replayed_without_the_store_or_the_exchange(
    ex: Exchange, tmp_path: Path,
) -> None:
    # No periodic refresh between the two purchases (one every 0.2 s made this count racy).
    async with running_broker(lease_config(ex, tmp_path, refresh_s=60)) as b:
        book = b.broker.period.leases if b.broker.period else None
        assert book is not None
        status, first, _ = await buy(b, "r1")
        assert status == 200, first
        calls, executed = book.store_calls, (await ex.state())["execute_calls"]
        status, again, _ = await buy(b, "r1")
        assert status == 200, again
        assert again.get("replayed") is True, again
        assert again["items"] == first["items"]
        assert (book.store_calls, (await ex.state())["execute_calls"]) == (calls, executed)
        # The same key for a different request is refused, not replayed.
        r = await b.post("BrokerService/Transact",
                         {"sessionId": "s", "idempotencyKey": "r1", "uris": ["https://x.test/b"]}, KEY)
        assert r.status_code == 400, r.text
        assert "idempotency_key" in r.json()["message"], r.text
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased, keys) == (NANO, 0, 0, ["r1"])
    assert await charged(ex) == 1


async def test_two_brokers_spend_one_budget_to_the_last_cent_and_never_over(
    ex: Exchange, tmp_path: Path,
) -> None:
    limit = 40
    async with running_broker(lease_config(ex, tmp_path, limit=f"{limit}.00", name="1")) as b1, \
            running_broker(lease_config(ex, tmp_path, limit=f"{limit}.00", name="2")) as b2:
        violations: list[str] = []
        stop = asyncio.Event()

        async def sample() -> None:
            async with opened(tmp_path) as store:
                while not stop.is_set():
                    async for ref, st in store.counters(ACCOUNT):
                        if ref.scope == "user:lee" and st.spent + st.reserved > limit * NANO:
                            violations.append(f"{st}")
                    await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        bought = 0

        async def agent(n: int) -> None:
            nonlocal bought
            denied = 0
            for i in range(200):
                status, body, _ = await buy((b1, b2)[n % 2], f"b{n}-{i}")
                if status == 200:
                    bought += 1
                    continue
                assert status == 429, body
                denied += 1
                if denied >= 8:  # a few retries after refreshes: leases come back, then it is gone
                    return
                await asyncio.sleep(0.15)

        await asyncio.gather(*(agent(n) for n in range(8)))
        stop.set()
        await sampler
        assert violations == []
    spent, reserved, leased, keys = await books(tmp_path)
    assert bought == limit
    assert (spent, reserved, leased) == (limit * NANO, 0, 0)  # nothing stranded, nothing over
    assert len(keys) == len(set(keys)) == limit
    assert await charged(ex) == limit


async def buy_then_die(
    config: BrokerConfig, keys: list[str], *, reported: bool = False, lose_unwritten: bool = False,
) -> None:
    """A broker that buys `keys` (then, if `reported`, refreshes its leases), then crashes: no
    clean shutdown (leases not returned, spends since the last refresh not reported). With
    `lose_unwritten`, the power goes too: journal records not yet on disk are lost."""
    port = int(config.listen.rsplit(":", 1)[1])
    dead = await build_broker(config)
    dead.start()
    async with serving(dead.app, port):
        b = RunningBroker(dead, f"http://127.0.0.1:{port}", port)
        for key in keys:
            assert (await buy(b, key))[0] == 200
    if reported:
        assert dead.period is not None
        assert dead.period.leases is not None
        await dead.period.leases.refresh(ACCOUNT)
    if lose_unwritten:
        assert dead.period is not None
        assert dead.period.leases is not None
        journal = dead.period.leases._journal
        assert journal is not None
        assert journal._lines, "the last purchase's spend should still be on its way to the disk"
        journal._lines.clear()
        if journal._lazy is not None:
            journal._lazy.cancel()
    for task in dead._tasks:
        task.cancel()
    for ex_ in dead.exchanges.values():
        await ex_.adapter.close()
    assert dead.period is not None
    await dead.period.store.close()


async def test_a_broker_that_died_reports_its_journal_when_it_comes_back(
    ex: Exchange, tmp_path: Path,
) -> None:
    config = lease_config(ex, tmp_path, refresh_s=60)  # no background refresh: the journal holds it
    await buy_then_die(config, [f"d{i}" for i in range(5)])
    spent, reserved, leased, _ = await books(tmp_path)
    assert spent == 0  # not reported: the whole lease stays counted (fail closed)
    assert reserved == leased >= 5 * NANO
    async with running_broker(config) as again:  # same port: the same memory and journal
        book = again.broker.period.leases if again.broker.period else None
        assert book is not None
        await book.refresh(ACCOUNT)
        spent, _, _, keys = await books(tmp_path)
        assert spent == 5 * NANO
        assert sorted(keys) == [f"d{i}" for i in range(5)]
        # A retry of a key bought before the crash is shown its answer (journaled with the spend),
        # and nothing is bought again.
        status, body, _ = await buy(again, "d0")
        assert status == 200, body
        assert body.get("replayed") is True, body
        assert [(i["uri"], i["status"]) for i in body["items"]] == [(A, "ITEM_STATUS_PURCHASED")], body
        await book.refresh(ACCOUNT)
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased) == (5 * NANO, 0, 0)
    assert sorted(keys) == [f"d{i}" for i in range(5)]
    assert await charged(ex) == 5


async def test_a_spend_not_on_disk_when_the_power_went_is_rolled_forward_from_its_intent(
    ex: Exchange, tmp_path: Path,
) -> None:
    """A lease purchase is answered before its spend record is fsynced (the next write takes it
    along): only its intent is sure to be on disk. A power cut in between loses the spend record;
    the restarted broker rolls the intent forward (the Exchange answers from its dedupe record),
    so the money still adds up and a retry of the key is shown its answer."""
    config = lease_config(ex, tmp_path, refresh_s=60)
    await buy_then_die(config, ["p0", "p1", "p2"], lose_unwritten=True)
    async with running_broker(config) as again:
        book = again.broker.period.leases if again.broker.period else None
        assert book is not None
        for _ in range(500):  # bounded: upkeep rolls cut-off intents forward at start
            if not book.cut_off(ACCOUNT, "lee#p2") and not book.pending_intents():
                break
            await asyncio.sleep(0.01)
        assert not book.pending_intents()
        status, body, _ = await buy(again, "p2")
        assert status == 200, body
        assert body.get("replayed") is True, body
        await book.refresh(ACCOUNT)
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased) == (3 * NANO, 0, 0)
    assert sorted(keys) == ["p0", "p1", "p2"]
    assert await charged(ex) == 3


async def test_a_broker_back_from_a_crash_gives_its_old_leases_back_without_a_purchase(
    ex: Exchange, tmp_path: Path,
) -> None:
    # Its spend reported, its journal empty; restarted, it serves nothing before it is stopped:
    # its clean shutdown still gives back what its previous incarnation leased.
    config = lease_config(ex, tmp_path, refresh_s=60)
    await buy_then_die(config, ["r1", "r2"], reported=True)
    spent, reserved, leased, _ = await books(tmp_path)
    assert spent == 2 * NANO
    assert reserved == leased > 0
    async with running_broker(config):
        pass
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased) == (2 * NANO, 0, 0)
    assert sorted(keys) == ["r1", "r2"]
    assert await charged(ex) == 2


class AnswerLost:
    """The real store, except that the answer of the next lease refresh is lost after the store
    applied it (a connection cut on the way back). `reported`: the spends each refresh sent."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.drop_next = False
        self.reported: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        self.reported.append([spend.idempotency_key for spend in args[4]])
        outcome = await self._store.lease(*args, **kwargs)
        if self.drop_next:
            self.drop_next = False
            raise StoreUnavailable("connection lost reading the answer (test)")
        return outcome


class Unanswered:
    """The real store, except that lease refreshes get no answer until `gate` is set (a paused
    store), then raise what `failures` has for their number, if anything (StoreUnavailable: as an
    unreachable one does). `calls`: refreshes sent (`sent` is set at each)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.sent = asyncio.Event()
        self.failures: dict[int, Exception] = {}
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        number = self.calls
        self.sent.set()
        await self.gate.wait()
        if number in self.failures:
            raise self.failures[number]
        return await self._store.lease(*args, **kwargs)


@pytest.mark.parametrize("fails", ["", "unreachable", "raises"])
async def test_purchases_that_need_room_share_one_refresh_and_hear_its_failure_at_once(
    tmp_path: Path, fails: str,
) -> None:
    """Ten purchases that need room while a refresh is under way do not each refresh in turn (each
    then waited out its own store timeout): when it fails they all hear so at once, with no store
    call of their own; when it is answered, one more refresh asks for all of their room, and if
    that one raises, all of them hear it."""
    small, large = november_hold(NANO, 1000 * NANO), november_hold(20 * NANO, 1000 * NANO)
    tier = TIERS["standard"]
    async with opened(tmp_path) as raw:
        store = Unanswered(raw)
        store.gate.set()
        book = bare_book(store, store_timeout_s=30)  # far longer than this test: no one times out
        first = await book.grow(ACCOUNT, [small], [tier])  # a first lease: about ten purchases
        assert first is not None
        book.release(first)
        store.gate.clear()
        store.sent.clear()
        if fails == "unreachable":  # the refresh under way
            store.failures[2] = StoreUnavailable("redis: no answer in time (test)")
        elif fails == "raises":  # the purchases' own
            store.failures[3] = ValueError("lease want out of range (test)")
        background = asyncio.create_task(book.refresh(ACCOUNT))
        await asyncio.wait_for(store.sent.wait(), 5)
        purchases = [asyncio.create_task(book.grow(ACCOUNT, [large], [tier])) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert not any(p.done() for p in purchases)  # waiting for the refresh under way
        store.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*purchases, return_exceptions=True), 5)
        assert await background is (fails != "unreachable")
        if fails:
            error = StoreUnavailable if fails == "unreachable" else ValueError
            assert all(isinstance(a, error) for a in answers), answers
            assert store.calls == (2 if fails == "unreachable" else 3)
        else:
            assert all(a is not None and not isinstance(a, BaseException) for a in answers), answers
            assert store.calls == 3
        (lease,) = book.leases(ACCOUNT)
        assert lease.held == (0 if fails else 10 * 20 * NANO)
        lease.held = 0  # the test's holds, never spent


async def test_spends_are_reported_a_few_to_a_store_step_and_a_refresh_is_due_once_that_many_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store step's cost grows with the spends it reports, all built at once on the broker's
    loop: at most REPORT_AT_ONCE go in one. A refresh reports every spend waiting, in as many
    steps as that takes, each once; and one is due as soon as half that many wait (not only when
    a lease is half used, or the interval is up)."""
    monkeypatch.setattr(leases_module, "REPORT_AT_ONCE", 4)
    hold = november_hold()
    async with opened(tmp_path) as raw:
        store = AnswerLost(raw)
        book = bare_book(store)
        tier = TIERS["standard"]
        keys = [f"lee#s{i}" for i in range(7)]  # as the broker keys them: <agent>#<key>
        for n, key in enumerate(keys, 1):
            held = book.try_hold(ACCOUNT, [hold], [tier]) or await book.grow(ACCOUNT, [hold], [tier])
            assert held is not None
            book._due.clear()
            await book.commit(held, key, (hold,), (Line(0, NANO, "1", "USD", "ex", "o", A),), b"answer")
            assert book._due.is_set() == (n >= 2), n  # the lease is far from half used
        assert store.reported == [[]]  # the grow's step: nothing spent yet
        assert await book.refresh(ACCOUNT) is True
        assert store.reported[1:] == [keys[0:4], keys[4:7]]
        assert book._account(ACCOUNT).pending == []
    spent, reserved, leased, ledger = await books(tmp_path)
    assert spent == 7 * NANO
    assert reserved == leased > 0  # the lease it still holds
    assert sorted(ledger) == [agent_key(k) for k in keys]


async def test_a_refresh_whose_answer_was_lost_loses_no_spend_and_lends_nothing_twice(
    ex: Exchange, tmp_path: Path,
) -> None:
    async with running_broker(lease_config(ex, tmp_path, refresh_s=60)) as b:
        book = b.broker.period.leases if b.broker.period else None
        assert book is not None
        lossy = AnswerLost(book._store)
        book._store = lossy
        for key in ("l1", "l2"):
            assert (await buy(b, key))[0] == 200
        # A refresh reports l1 and l2; its answer is lost. l3 is then bought on the lease, and the
        # next refresh (the same sequence number, found already applied) must not take l3 as reported.
        lossy.drop_next = True
        assert await book.refresh(ACCOUNT) is False
        calls = book.store_calls
        assert (await buy(b, "l3"))[0] == 200
        assert book.store_calls == calls  # bought on the lease
        assert await book.refresh(ACCOUNT) is True
        spent, _, _, keys = await books(tmp_path)
        assert (spent, sorted(keys)) == (3 * NANO, ["l1", "l2", "l3"])

        # A refresh that gives the whole lease back, its answer lost: nothing of the old lease is
        # spent here meanwhile (the store may have lent it to another broker already).
        (lease,) = book.leases(ACCOUNT)
        lease.phase = Phase.EXHAUSTED
        lossy.drop_next = True
        assert await book.refresh(ACCOUNT) is False
        async with opened(tmp_path) as store:
            assert [x for x in await store.leases(ACCOUNT) if x.broker == book.broker] == []
        assert lease.available == 0
        assert (await buy(b, "l4"))[0] == 200  # the lease grows again: the store lends anew
    spent, reserved, leased, keys = await books(tmp_path)
    assert (spent, reserved, leased) == (4 * NANO, 0, 0)
    assert sorted(keys) == ["l1", "l2", "l3", "l4"]
    assert await charged(ex) == 4


async def test_nothing_reported_is_spent_again_while_a_refresh_is_being_applied(
    ex: Exchange, tmp_path: Path,
) -> None:
    """A refresh reports spends and shrinks the lease. Between the store's answer and the journal
    acknowledging those spends (a journal write), purchases keep arriving: they may use only the
    new grant, never the old one less the spend just reported."""
    async with running_broker(lease_config(ex, tmp_path, refresh_s=60)) as b:
        book = b.broker.period.leases if b.broker.period else None
        assert book is not None
        assert book._journal is not None
        for i in range(6):
            assert (await buy(b, f"n{i}"))[0] == 200
        (lease,) = book.leases(ACCOUNT)
        lease.phase = Phase.EXHAUSTED  # the refresh below gives back all that is not in use
        gate, acking = asyncio.Event(), asyncio.Event()
        journal_ack = book._journal.ack

        async def slow_ack(*ids: str, durable: bool = True) -> None:
            acking.set()
            await gate.wait()
            await journal_ack(*ids, durable=durable)

        book._journal.ack = slow_ack  # type: ignore[method-assign]
        refreshing = asyncio.create_task(book.refresh(ACCOUNT))
        await asyncio.wait_for(acking.wait(), 5)
        async with opened(tmp_path) as store:
            granted = sum(x.granted for x in await store.leases(ACCOUNT) if x.broker == book.broker)
        assert lease.limit is not None
        hold = Hold(lease.counter, NANO, lease.limit, lease.expire_at_ms)
        taken = 0
        while book.try_hold(ACCOUNT, [hold], [TIERS["standard"]]) is not None and taken <= 20:
            taken += 1
        gate.set()
        assert await refreshing is True
        assert taken * NANO <= granted, (taken, granted)
        assert lease.held == taken * NANO
        lease.held = 0  # the test's holds, never sent


async def test_an_operator_releases_a_dead_brokers_leases(ex: Exchange, tmp_path: Path) -> None:
    from tests.processes import run_cli, write_yaml

    config = lease_config(ex, tmp_path, refresh_s=60)
    async with running_broker(config) as b:
        assert (await buy(b, "o1"))[0] == 200
        book = b.broker.period.leases if b.broker.period else None
        assert book is not None
        await book.refresh(ACCOUNT)
        broker_id = book.broker
        # Stop the broker from giving its lease back at close: it "died".
        book.close = _noop  # type: ignore[method-assign]
    _, reserved, leased, _ = await books(tmp_path)
    assert reserved == leased > 0
    path = write_yaml(tmp_path / "broker.yaml", config.model_dump(mode="json", exclude_unset=True))
    listed = await asyncio.to_thread(run_cli, ["leases", "list", "--config", str(path)], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert broker_id in listed.stdout
    released = await asyncio.to_thread(
        run_cli, ["leases", "release", "--config", str(path), "--account", ACCOUNT, "--broker", broker_id],
        tmp_path)
    assert released.returncode == 0, released.stdout + released.stderr
    spent, reserved, leased, _ = await books(tmp_path)
    assert (spent, reserved, leased) == (NANO, 0, 0)
    again = await asyncio.to_thread(
        run_cli, ["leases", "release", "--config", str(path), "--account", ACCOUNT, "--broker", broker_id],
        tmp_path)
    assert again.returncode == 1


async def _noop() -> None:
    pass


# --- sizing and phases ----------------------------------------------------------------------------


def test_the_spend_rate_is_the_rate_seen_within_seconds_and_a_first_burst_is_damped() -> None:
    half_life = Decimal(60)
    steady = Rate(half_life)
    for second in range(11):  # 10 USD a second, refreshed every second, for 10 s
        steady.observe(10 * NANO if second else 0, float(second))
    assert abs(steady.per_s - 10 * NANO) < NANO // 10  # not a sixth of it (an EWMA from zero)
    burst = Rate(half_life)
    burst.observe(0, 0.0)
    burst.observe(100 * NANO, 0.01)  # 100 USD in the first 10 ms
    assert burst.per_s < 25 * NANO  # about as if spread over 5 s, not 10,000 USD a second


def test_phases_follow_remaining_over_rate() -> None:
    std = TIERS["standard"]
    per_s = Decimal(NANO)  # 1.00 a second
    assert phase_of(10_000 * NANO, per_s, 1, NANO, 100_000 * NANO, std) == Phase.GENEROUS  # ~2.8 h
    assert phase_of(1_000 * NANO, per_s, 1, NANO, 100_000 * NANO, std) == Phase.TIGHTENING  # ~17 min
    assert phase_of(100 * NANO, per_s, 1, NANO, 100_000 * NANO, std) == Phase.STRICT
    assert phase_of(20 * NANO, per_s, 1, NANO, 100_000 * NANO, std) == Phase.SYNCHRONOUS
    assert phase_of(3 * NANO, Decimal(0), 2, 1 * NANO, 100_000 * NANO, std) == Phase.SYNCHRONOUS  # < 2x2x1
    assert phase_of(0, per_s, 1, NANO, 100_000 * NANO, std) == Phase.EXHAUSTED
    # Prepaid goes synchronous with 5% of its limit left, however slowly it is spent.
    assert phase_of(4_000 * NANO, Decimal(1), 1, NANO, 100_000 * NANO, TIERS["prepaid"]) == Phase.SYNCHRONOUS


def test_lease_size_is_bounded_by_remaining_per_broker_and_the_largest_purchase() -> None:
    std = TIERS["standard"]
    # 1.00/s for 60 s of headroom: 60.00, within remaining / (2 x 4 brokers) = 125.00.
    assert lease_size(Phase.GENEROUS, Decimal(NANO), 1_000 * NANO, 4, NANO, std) == 60 * NANO
    assert lease_size(Phase.GENEROUS, Decimal(NANO), 200 * NANO, 4, NANO, std) == 25 * NANO  # L_max
    assert lease_size(Phase.GENEROUS, Decimal(0), 200 * NANO, 4, 3 * NANO, std) == 3 * NANO  # L_min
    assert lease_size(Phase.TIGHTENING, Decimal(NANO), 1_000 * NANO, 1, NANO, std) == 10 * NANO
    assert lease_size(Phase.GENEROUS, Decimal(NANO), 1_000 * NANO, 4, NANO, TIERS["postpaid"]) == 120 * NANO
    assert lease_size(Phase.SYNCHRONOUS, Decimal(NANO), 1_000 * NANO, 1, NANO, std) == 0


# --- pacing --------------------------------------------------------------------------------------


async def test_a_paced_refusal_says_when_to_retry(ex: Exchange, tmp_path: Path) -> None:
    clock = ManualClock(datetime(2026, 11, 30, 23, 0, tzinfo=UTC))  # one hour of the month left
    # Untouched all month, the budget's curve is lowered to spread its 100.00 over the last hour (1.67
    # a minute): a purchase of 1.00 a second is paced from the second on (tests/test_pacing.py has the
    # controller itself). Seeded, as admission is a draw.
    config = lease_config(ex, tmp_path, limit="100.00", pacing="even")
    async with running_broker(config, clock, rng=random.Random(20261130)) as b:
        refused: dict[str, Any] | None = None
        for i in range(95):
            status, body, _ = await buy(b, f"p{i}")
            if status == 429:
                refused = body
                break
            clock.advance(1)
        assert refused is not None, "a burst this fast must be paced before the month ends"
        d = denial(refused)
        assert d.reason == "budget_paced"
        assert d.retry_at.ToDatetime(tzinfo=UTC) > clock.now()
        assert "paced to last until" in d.next_action


async def test_a_journal_that_cannot_be_written_at_shutdown_does_not_stop_the_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Records still queued at a clean stop are flushed; a disk that refuses them then is logged
    (they are recovered at the next start, as after a crash), and the stop goes on."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    journal = Journal(blocked / "leases.jsonl", lazy_flush_s=3600)
    async with opened(tmp_path) as store:
        book = bare_book(store, journal)
        await journal.ack("an-entry", durable=False)  # queued, not written
        await book.close()
    assert "could not be written at shutdown" in caplog.text


async def test_reading_a_phase_starts_no_book_for_the_account(tmp_path: Path) -> None:
    """A status read of a lease scope asks the book for its phase: an account this broker never
    leased on must not join the book (the refresh loop would then call the store for it)."""
    hold = november_hold()
    async with opened(tmp_path) as store:
        book = bare_book(store)
        assert book.phase(ACCOUNT, hold.counter) == ""
        assert book._accounts == {}
        assert await book.grow(ACCOUNT, [hold], [TIERS["standard"]]) is not None
        assert book.phase(ACCOUNT, hold.counter) == "generous"


async def test_a_restarted_broker_leases_nothing_it_does_not_need_and_phases_with_its_journal(
    tmp_path: Path,
) -> None:
    """A broker that died comes back knowing its counters from its journal (spends not reported) and
    from its leases in the store, not their numbers nor its rates. It asks for no lease where no
    purchase of this run asks for one (not one nano-unit on every counter, however little is left
    there), and the largest purchase in its journal counts as L_min: 4.00 left of a counter bought 3.00
    at a time is synchronous, not generous."""
    clock = ManualClock(datetime(2026, 11, 23, tzinfo=UTC))
    month = november_hold(3 * NANO, 13 * NANO)
    day_ref = CounterRef("user:lee", "day", "2026-11-23", "USD", month.counter.start_ms, month.counter.end_ms)
    day = Hold(day_ref, 3 * NANO, 1000 * NANO, month.expire_at_ms)
    tier = TIERS["standard"]
    async with opened(tmp_path) as store:
        journal = Journal(tmp_path / "leases.jsonl")
        first = bare_book(store, journal, clock)
        for key, holds in (("k0", (month, day)), ("k1", (month,)), ("k2", (month,))):
            held = first.try_hold(ACCOUNT, holds, [tier] * len(holds)) or await first.grow(
                ACCOUNT, holds, [tier] * len(holds))
            assert held is not None
            lines = tuple(spend(i, 3 * NANO) for i in range(len(holds)))
            await first.commit(held, f"lee#{key}", holds, lines, b"answer")
            if key == "k0":
                assert await first.refresh(ACCOUNT)  # k0 reported: the day counter is not in the journal
        await journal.flush()  # k1 and k2 on disk, not reported; then the broker dies
        assert {lease.counter.period for lease in await store.leases(ACCOUNT)} == {"month", "day"}

        again = bare_book(store, Journal(tmp_path / "leases.jsonl"), clock)
        for _ in range(4):  # refreshes, minutes apart: rates decay to nothing
            assert await again.refresh(ACCOUNT)
            clock.advance(600)
        assert await store.leases(ACCOUNT) == []
        assert again.phase(ACCOUNT, month.counter) == "synchronous"  # 4.00 left
        assert again.phase(ACCOUNT, day_ref) == ""  # its limit is not known: no phase to tell
        # A purchase on the day counter leases again, on demand.
        assert await again.grow(ACCOUNT, [day], [tier]) is not None
        assert again.phase(ACCOUNT, day_ref) == "generous"
        ledger = sorted([(e.period, e.idempotency_key, e.amount) async for e in store.ledger(ACCOUNT)])
    assert ledger == [("day", "lee#k0", 3 * NANO)] + [("month", f"lee#k{i}", 3 * NANO) for i in range(3)]


async def test_a_purchase_larger_than_what_is_left_makes_the_counter_synchronous(tmp_path: Path) -> None:
    """The purchase asking counts in L_min from the refresh it asks for: with 5.00 left, a purchase of
    3.00 is too large for leases (5.00 < 2 x 3.00: the synchronous phase, not generous), so it reserves
    in the store; what that refresh lent is given back before it does, so its own lease does not deny it."""
    hold = november_hold(3 * NANO, 10 * NANO)
    tier = TIERS["standard"]
    async with opened(tmp_path) as store:
        other = LeaseBook(store, clock=ManualClock(datetime(2026, 11, 23, tzinfo=UTC)), broker="b2",
                          journal=None, identity=_no_identity, floor=lambda account, counter: 0)
        held = await other.grow(ACCOUNT, [november_hold(5 * NANO, 10 * NANO)], [tier])
        assert held is not None
        await other.commit(held, "lee#o", (hold,), (spend(0, 5 * NANO),), b"answer")
        await other.close()  # 5.00 spent, reported, its lease given back
        book = bare_book(store)
        assert book.try_hold(ACCOUNT, [hold], [tier]) is None
        assert await book.grow(ACCOUNT, [hold], [tier]) is None
        assert book.phase(ACCOUNT, hold.counter) == "synchronous"
        assert await store.leases(ACCOUNT) == []
        reserved = await store.reserve(ACCOUNT, [hold], ttl_ms=60_000, idempotency_key="lee#k",
                                       now_ms=to_ms(datetime(2026, 11, 23, tzinfo=UTC)),
                                       limits_version=0)
        assert isinstance(reserved, Reserved), reserved
