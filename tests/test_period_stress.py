"""Four broker processes sharing one Redis never overspend a period budget, under load.

One real redis-server, one reference Exchange process (40 URIs, USD and EUR, odd prices) and
four `ramp-broker serve` processes with the same period budgets. 4 x 64 asyncio tasks buy at
random through Connect JSON (random agent, 1-3 URIs, fresh idempotency keys and retries of
earlier requests, on any broker) until MAX_PURCHASES requests or RUN_SECONDS, and the budgets
run dry early in the run. Meanwhile a sampler, on its own thread, reads every counter straight
from Redis every ~50 ms and checks spent + reserved <= limit + credit each time.

Afterwards, with nothing held any more: every counter equals its ledger, `ramp-broker
reconcile` agrees, and the Exchange's books (balances, charges, execute calls) match what the
ledger and the agents' 200 answers say was bought, with no idempotency key bought twice. Last,
a retry of a key that was already bought must be answered with that purchase, never denied."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from budget.stores.contract import CounterRef, CounterState, LedgerEntry
from budget.stores.redis import RedisStore
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from tests.harness import agent_key, exhausted
from tests.processes import (
    Child,
    broker_tree,
    connect_call,
    exchange_state,
    run_cli,
    start_broker,
    start_exchange,
)
from tests.redis_server import redis_server

SEED = 20261123
N_BROKERS = 4
TASKS_PER_BROKER = 64
MAX_PURCHASES = 1500
RUN_SECONDS = 30.0
# Every request, retries included, and the final settling are bounded by these.
REQUEST_TIMEOUT_S = 30.0
SETTLE_SECONDS = 15.0
SAMPLE_INTERVAL_S = 0.05
MAX_SAMPLES = 4000
# Share of requests that repeat an earlier request (same agent, body and key), on any broker.
RETRY_SHARE = 0.12

ACCOUNT = "acme"
EXCHANGE = "ref.stress"
REQUESTER = "ramp-broker"  # the broker's default requester id: the Exchange's billing account
OPENING_BALANCE = Decimal("100000")
EUR_USD = Fraction(11, 10)

# (price, currency) of https://stress.test/r/<i>: flat, so the Exchange charges exactly this.
PRICES: tuple[tuple[str, str], ...] = (
    ("0.01", "USD"), ("0.02", "USD"), ("0.05", "USD"), ("0.09", "USD"), ("0.13", "USD"),
    ("0.2", "USD"), ("0.25", "USD"), ("0.37", "USD"), ("0.41", "USD"), ("0.5", "USD"),
    ("0.66", "USD"), ("0.73", "USD"), ("0.8", "USD"), ("0.99", "USD"), ("1.1", "USD"),
    ("1.05", "USD"), ("1.23", "USD"), ("1.37", "USD"), ("1.5", "USD"), ("1.77", "USD"),
    ("1.999", "USD"), ("2.01", "USD"), ("2.2", "USD"), ("2.45", "USD"), ("2.5", "USD"),
    ("2.718", "USD"), ("2.9", "USD"), ("3.00", "USD"),
    ("0.03", "EUR"), ("0.11", "EUR"), ("0.29", "EUR"), ("0.333", "EUR"), ("0.47", "EUR"),
    ("0.6", "EUR"), ("0.89", "EUR"), ("1.01", "EUR"), ("1.31", "EUR"), ("1.7", "EUR"),
    ("2.07", "EUR"), ("2.6", "EUR"),
)
URIS = tuple(f"https://stress.test/r/{i}" for i in range(len(PRICES)))

# scope -> [(period, amount, currency)]. The layers overlap, and different ones run dry at
# different times: with every agent spending at about the same rate, user:u0 and user:u3 first,
# then team:ops (in EUR), user:u1, and org:acme last (team:eng and the rest come close). Left
# unchecked, the users of a team could spend more than the team, both teams more than the org.
LIMITS: dict[str, list[tuple[str, str, str]]] = {
    "org:acme": [("month", "1250.00", "USD")],
    "team:eng": [("day", "800.00", "USD")],
    "team:ops": [("day", "450.00", "EUR")],  # 495.00 USD
    "user:u0": [("month", "150.00", "USD")],
    "user:u1": [("month", "260.37", "USD")],
    "user:u2": [("month", "600.00", "USD")],
    "user:u3": [("month", "130.00", "USD")],
    "user:u4": [("month", "400.00", "USD")],
    "user:u5": [("month", "420.50", "USD")],
}
# agent index -> the scopes it is charged to (every purchase touches all three).
AGENT_SCOPES: tuple[tuple[str, ...], ...] = tuple(
    (f"user:u{i}", "team:eng" if i < 3 else "team:ops", "org:acme") for i in range(6)
)


def api_key(agent: int) -> str:
    return f"stress-agent-{agent}-key"


def catalog() -> dict[str, Any]:
    return {
        "exchange": EXCHANGE,
        "accounts": {REQUESTER: {"USD": str(OPENING_BALANCE), "EUR": str(OPENING_BALANCE)}},
        "offers": [
            {"uri": uri, "offer_id": f"o{i}", "title": f"resource {i}", "rate": price,
             "currency": cur}
            for i, (uri, (price, cur)) in enumerate(zip(URIS, PRICES, strict=True))
        ],
    }


def broker_config(exchange: Child, redis_url: str, journal: Path) -> dict[str, Any]:
    return broker_tree(
        exchange,
        # execute_timeout_ms 14000: the 60 s reservation TTL must outlive two calls twice over.
        fanout={"discover_timeout_ms": 15000, "overall_timeout_ms": 20000, "execute_timeout_ms": 14000},
        rates={"EUR": {"USD": "1.10"}},
        session={"default_limit": {"amount": "1000000.00", "currency": "USD"}},
        period_budgets={
            "store": {"kind": "redis", "url": redis_url, "timeout_ms": 2000},
            "reservation_ttl_seconds": 60,
            "sweep_interval_seconds": 1.0,
            "journal_path": str(journal),
            "accounts": {ACCOUNT: {"scopes": {
                scope: {"limits": [{"period": p, "amount": a, "currency": c} for p, a, c in limits]}
                for scope, limits in LIMITS.items()
            }}},
        },
        agents=[
            {"id": f"agent-{i}", "key_sha256": hashlib.sha256(api_key(i).encode()).hexdigest(),
             "account": ACCOUNT, "billing_ref": f"a{i}", "charged_to": list(scopes)}
            for i, scopes in enumerate(AGENT_SCOPES)
        ],
    )


def limit_units() -> dict[tuple[str, str], tuple[str, int]]:
    """(scope, period) -> (currency, nano-units), as configured."""
    return {(scope, p): (c, Money.parse(a, c, "limit").units())
            for scope, limits in LIMITS.items() for p, a, c in limits}


def money(units: int, currency: str) -> str:
    return str(Money.from_units(units, currency))


def convert_up(amount: Decimal, source: str, target: str) -> int:
    """What the broker charges a counter in `target` for `amount` of `source`: nano-units, rounded up."""
    units = Fraction(amount) * 10**9
    if source != target:
        units *= EUR_USD if (source, target) == ("EUR", "USD") else 1 / EUR_USD
    return -(-units.numerator // units.denominator)


# --- the load ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purchase:
    agent: int
    key: str
    uris: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"sessionId": f"stress-{self.agent}", "idempotencyKey": self.key, "uris": list(self.uris)}


@dataclass(frozen=True, slots=True)
class Attempt:
    purchase: Purchase
    broker: int
    retry: bool
    started: float
    ended: float
    status: int  # HTTP status, or 0 when the request itself failed
    body: dict[str, Any]

    def code(self) -> str:
        return str(self.body.get("code", ""))


@dataclass
class Load:
    deadline: float
    sent: int = 0
    history: list[Purchase] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    seq: int = 0


async def shopper(
    load: Load, client: httpx.AsyncClient, brokers: Sequence[Child], index: int, rng: random.Random
) -> None:
    loop = asyncio.get_running_loop()
    while load.sent < MAX_PURCHASES and loop.time() < load.deadline:
        load.sent += 1
        retry = bool(load.history) and rng.random() < RETRY_SHARE
        if retry:
            purchase = rng.choice(load.history)
        else:
            load.seq += 1
            purchase = Purchase(rng.randrange(len(AGENT_SCOPES)), f"k{load.seq}-{rng.getrandbits(48):012x}",
                                tuple(rng.sample(URIS, rng.randint(1, 3))))
            load.history.append(purchase)
        started = loop.time()
        try:
            r = await connect_call(client, brokers[index], "BrokerService/Transact", purchase.body(),
                                   key=api_key(purchase.agent))
            status, body = r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, body = 0, {"error": f"{type(exc).__name__}: {exc}"}
        load.attempts.append(Attempt(purchase, index, retry, started, loop.time(), status, body))


# --- watching the counters ------------------------------------------------------------------------------


@dataclass
class Samples:
    taken: int = 0
    counters_seen: int = 0
    violations: list[str] = field(default_factory=list)
    # (scope, period, window) -> highest (spent + reserved) seen
    peak: dict[tuple[str, str, str], int] = field(default_factory=dict)
    longest_gap: float = 0.0  # seconds one sample took
    seconds: float = 0.0


def check_counter(ref: CounterRef, st: CounterState, limits: dict[tuple[str, str], tuple[str, int]]
                  ) -> str | None:
    """What is wrong with one counter's numbers, if anything."""
    configured = limits.get((ref.scope, ref.period))
    if configured is None:
        return f"{ref.key}: a counter no limit was configured for"
    currency, limit = configured
    if ref.currency != currency:
        return f"{ref.key}: counter in {ref.currency}, its limit is in {currency}"
    if st.spent < 0 or st.reserved < 0 or st.credit != 0:
        return f"{ref.key}: spent {st.spent}, reserved {st.reserved}, credit {st.credit} (nano-units)"
    if st.spent + st.reserved > limit + st.credit:
        return (f"{ref.key}: spent {money(st.spent, currency)} + reserved {money(st.reserved, currency)}"
                f" = {money(st.spent + st.reserved, currency)} > limit {money(limit, currency)}"
                f" + credit {money(st.credit, currency)}")
    return None


def sample_in_thread(redis_url: str, stop: threading.Event, out: Samples) -> None:
    """The sampler, on its own thread and event loop: the shoppers' loop is too busy to keep time."""
    asyncio.run(_sample(redis_url, stop, out))


async def _sample(redis_url: str, stop: threading.Event, out: Samples) -> None:
    limits = limit_units()
    store = await RedisStore.open(redis_url, timeout_ms=2000)
    try:
        t0 = time.monotonic()
        while not stop.is_set() and out.taken < MAX_SAMPLES:
            started = time.monotonic()
            async for ref, st in store.counters(ACCOUNT):
                out.counters_seen += 1
                problem = check_counter(ref, st, limits)
                if problem is not None and len(out.violations) < 50:
                    out.violations.append(f"sample {out.taken} at +{started - t0:.3f}s: {problem}")
                k = (ref.scope, ref.period, ref.window)
                out.peak[k] = max(out.peak.get(k, 0), st.spent + st.reserved)
            out.taken += 1
            out.longest_gap = max(out.longest_gap, time.monotonic() - started)
            await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - started)))
        out.seconds = time.monotonic() - t0
    finally:
        await store.close()


async def all_counters(store: RedisStore) -> dict[str, tuple[CounterRef, CounterState]]:
    return {ref.key: (ref, st) async for ref, st in store.counters(ACCOUNT)}


async def settled_counters(store: RedisStore) -> dict[str, tuple[CounterRef, CounterState]]:
    """The counters once nothing is reserved any more (within SETTLE_SECONDS)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        counters = await all_counters(store)
        held = {k: st.reserved for k, (_, st) in counters.items() if st.reserved}
        if not held:
            return counters
        assert loop.time() < deadline, f"still reserved {SETTLE_SECONDS}s after the last request: {held}"
        await asyncio.sleep(0.2)


# --- the test ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path) -> AsyncIterator[tuple[str, Child, list[Child]]]:
    with redis_server() as redis:
        async with contextlib.AsyncExitStack() as stack:
            exchange = await stack.enter_async_context(start_exchange(tmp_path, catalog()))
            brokers = [
                await stack.enter_async_context(start_broker(
                    tmp_path, broker_config(exchange, redis.url, tmp_path / f"journal-{i}.jsonl"),
                    name=f"broker-{i}"))
                for i in range(N_BROKERS)
            ]
            yield redis.url, exchange, brokers


def period_exhausted(body: dict[str, Any]) -> bool:
    """A RESOURCE_EXHAUSTED answer from the period layer."""
    try:
        return body.get("code") == "resource_exhausted" and exhausted(body).layer == bpb.BUDGET_LAYER_PERIOD
    except (AssertionError, KeyError, TypeError, ValueError):
        return False


def item_costs(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(offer id, amount, currency) of every item of a 200 answer, as the Exchange charged it."""
    return [(i["offer"]["offerId"], i["result"]["cost"]["amount"], i["result"]["cost"]["currency"])
            for i in body.get("items", [])]


def test_the_counter_check_sees_an_overspend_of_one_nano_unit() -> None:
    """The sampler's check is not vacuous: one nano-unit over, a wrong currency, a stray counter."""
    limits = limit_units()
    ops = CounterRef("team:ops", "day", "2026-11-23", "EUR", 0, 86_400_000)
    full = Money.parse("450.00", "EUR", "limit").units()
    assert check_counter(ops, CounterState(spent=full - 5, reserved=5), limits) is None
    assert "> limit 450.00 EUR" in str(check_counter(ops, CounterState(spent=full - 5, reserved=6), limits))
    assert check_counter(ops, CounterState(spent=full + 1, credit=1), limits) is not None  # no credit given
    assert check_counter(CounterRef("team:ops", "day", "2026-11-23", "USD", 0, 1), CounterState(), limits)
    assert check_counter(CounterRef("team:ops", "month", "2026-11", "EUR", 0, 1), CounterState(), limits)


async def test_four_brokers_on_one_redis_never_overspend(tmp_path: Path) -> None:
    started = time.monotonic()
    async with deployment(tmp_path) as (redis_url, exchange, brokers):
        setup_s = time.monotonic() - started
        store = await RedisStore.open(redis_url, timeout_ms=2000)
        try:
            await _run_and_check(tmp_path, redis_url, store, exchange, brokers, setup_s, started)
        finally:
            await store.close()


async def _run_and_check(
    tmp_path: Path, redis_url: str, store: RedisStore, exchange: Child, brokers: list[Child],
    setup_s: float, started: float,
) -> None:
    loop = asyncio.get_running_loop()
    load = Load(deadline=loop.time() + RUN_SECONDS)
    samples = Samples()
    stop = threading.Event()
    sampler = asyncio.create_task(asyncio.to_thread(sample_in_thread, redis_url, stop, samples))
    limits = httpx.Limits(max_connections=TASKS_PER_BROKER, max_keepalive_connections=TASKS_PER_BROKER)
    load_started = time.monotonic()
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(
                httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits)) for _ in brokers]
            async with asyncio.timeout(RUN_SECONDS + 2 * REQUEST_TIMEOUT_S):
                await asyncio.gather(*(
                    shopper(load, clients[b], brokers, b, random.Random(SEED * 1000 + b * 100 + t))
                    for b in range(N_BROKERS) for t in range(TASKS_PER_BROKER)
                ))
        load_s = time.monotonic() - load_started
        counters = await settled_counters(store)
    finally:
        stop.set()
        await asyncio.wait_for(sampler, 15)
    ledger = [e async for e in store.ledger(ACCOUNT)]
    async with httpx.AsyncClient(timeout=10) as client:
        books = await exchange_state(client, exchange)
    reconcile = await asyncio.to_thread(
        run_cli, ["reconcile", "--config", str(brokers[0].config_path)], tmp_path)

    attempts = load.attempts
    statuses = Counter(a.status for a in attempts)
    originals: dict[str, Attempt] = {}
    twice: list[str] = []
    for a in sorted(attempts, key=lambda a: a.ended):
        if a.status == 200 and not a.body.get("replayed", False):
            if a.purchase.key in originals:
                twice.append(a.purchase.key)
            originals.setdefault(a.purchase.key, a)
    spent_by_scope = {
        f"{ref.scope}/{ref.period}": f"{money(st.spent, ref.currency)} of "
        f"{money(limit_units()[(ref.scope, ref.period)][1], ref.currency)} ({st.count} purchases)"
        for ref, st in counters.values()
    }
    peaks = {f"{scope}/{period}": f"{100 * peak / limit_units()[(scope, period)][1]:.3f}%"
             for (scope, period, _), peak in sorted(samples.peak.items())}
    overages = sum(b.stderr.count("overage on ") for b in brokers)
    summary = (
        f"seed {SEED}; {len(attempts)} requests ({sum(a.retry for a in attempts)} retries of a key) "
        f"in {load_s:.1f}s after {setup_s:.1f}s setup; status {dict(sorted(statuses.items()))}; "
        f"{len(originals)} purchases bought; {samples.taken} samples in {samples.seconds:.1f}s "
        f"(slowest {samples.longest_gap * 1000:.0f} ms) of {samples.counters_seen} counters; "
        f"{len(ledger)} ledger entries; exchange charges {books['charges']} execute_calls "
        f"{books['execute_calls']}; {overages} overage warnings; peak spent+reserved seen by the "
        f"sampler {peaks}; final spent {spent_by_scope}"
    )
    print(summary)

    # 0. Nobody crashed or hid an error.
    for child in [exchange, *brokers]:
        assert child.alive, f"{child.name} exited:\n{child.stderr[-4000:]}"
        assert "Traceback" not in child.stderr, f"{child.name}:\n{child.stderr[-4000:]}"
        assert "internal error" not in child.stderr, f"{child.name}:\n{child.stderr[-4000:]}"

    # 1. Never over a limit, at any sample, nor at the end.
    assert samples.taken >= 20, f"the sampler hardly ran: {summary}"
    assert not samples.violations, "\n".join([summary, *samples.violations])
    final = [p for ref, st in counters.values() if (p := check_counter(ref, st, limit_units()))]
    assert not final, "\n".join([summary, *final])

    # 2. Every request got an answer a well-behaved broker may give under load.
    odd = [a for a in attempts
           if not (a.status == 200
                   or (a.status == 429 and period_exhausted(a.body))
                   or (a.status == 409 and a.code() == "aborted"))]
    assert not odd, f"{len(odd)} unexpected answers, e.g. " + "; ".join(
        f"{a.purchase.key} on broker-{a.broker}: {a.status} {a.body}" for a in odd[:5]) + f"\n{summary}"
    assert not twice, f"keys bought twice (two non-replayed 200s): {twice[:10]}\n{summary}"
    not_bought = [(k, i) for k, a in originals.items() for i in a.body.get("items", [])
                  if i.get("status") != "ITEM_STATUS_PURCHASED"]
    assert not not_bought, f"items not bought in a 200: {not_bought[:5]}\n{summary}"

    # 3. The budgets ran out during the run: most of the later requests were denied.
    assert len(attempts) >= 600, f"too little load to mean anything: {summary}"
    late = sorted(attempts, key=lambda a: a.started)[len(attempts) // 2:]
    late_denied = sum(a.status == 429 for a in late)
    assert late_denied > len(late) / 2, f"{late_denied} of the last {len(late)} requests denied: {summary}"
    assert len(originals) >= 100, f"too few purchases went through: {summary}"

    # 4. A replayed answer is the original one.
    replays = [a for a in attempts if a.status == 200 and a.body.get("replayed", False)]
    for a in replays:
        first = originals.get(a.purchase.key)
        assert first is not None, f"{a.purchase.key} replayed but never answered 200 first\n{summary}"
        assert item_costs(a.body) == item_costs(first.body), (a.body, first.body)

    # 5. The counters are exactly their ledgers; `ramp-broker reconcile` agrees.
    by_counter: dict[str, list[LedgerEntry]] = defaultdict(list)
    for e in ledger:
        by_counter[e.counter_key].append(e)
    assert set(by_counter) == set(counters), (sorted(by_counter), sorted(counters))
    for k, (ref, st) in counters.items():
        entries = by_counter[k]
        assert st.spent == sum(e.amount for e in entries), (
            f"{k}: counter spent {money(st.spent, ref.currency)}, ledger "
            f"{money(sum(e.amount for e in entries), ref.currency)}\n{summary}")
        assert st.count == len({e.idempotency_key for e in entries}), (k, st, summary)
        # One purchase's lines on a counter add up to its cost in the purchase currency (USD,
        # each item rounded up), converted into the counter's currency and rounded up once:
        # exactly what was held for it.
        by_key: dict[str, list[LedgerEntry]] = defaultdict(list)
        for e in entries:
            assert e.currency == ref.currency, e
            by_key[e.idempotency_key].append(e)
        for key, lines in by_key.items():
            usd_nanos = sum(convert_up(Decimal(e.original_amount), e.original_currency, "USD")
                            for e in lines)
            expected = convert_up(Decimal(usd_nanos) / 10**9, "USD", ref.currency)
            assert sum(e.amount for e in lines) == expected, (k, key, lines)
    assert reconcile.returncode == 0, f"reconcile: {reconcile.stdout}{reconcile.stderr}\n{summary}"
    assert "counters match the ledger" in reconcile.stdout, reconcile.stdout

    # 6. Every purchase is charged to each of its agent's scopes, line for line.
    keys_by_scope: dict[str, Counter[str]] = defaultdict(Counter)
    for e in ledger:
        keys_by_scope[e.scope][agent_key(e.idempotency_key)] += 1
    for key, a in originals.items():
        n = len(a.body["items"])
        for scope in AGENT_SCOPES[a.purchase.agent]:
            assert keys_by_scope[scope][key] == n, (key, scope, keys_by_scope[scope][key], n)
    assert sum(sum(c.values()) for c in keys_by_scope.values()) == len(ledger)

    # 7. The Exchange's books: what it charged is what org:acme (touched by every purchase) recorded.
    org = [e for e in ledger if e.scope == "org:acme"]
    ledger_by_cur: dict[str, Decimal] = defaultdict(Decimal)
    for e in org:
        ledger_by_cur[e.original_currency] += Decimal(e.original_amount)
    answered_by_cur: dict[str, Decimal] = defaultdict(Decimal)
    for a in originals.values():
        for _, amount, cur in item_costs(a.body):
            answered_by_cur[cur] += Decimal(amount)
    balances = books["balances"][REQUESTER]
    charged_by_cur = {cur: OPENING_BALANCE - Decimal(balances[cur]) for cur in ("USD", "EUR")}
    for cur in ("USD", "EUR"):
        assert charged_by_cur[cur] == ledger_by_cur[cur] == answered_by_cur[cur], (
            f"{cur}: exchange charged {charged_by_cur[cur]}, org:acme ledger {ledger_by_cur[cur]}, "
            f"200 answers {answered_by_cur[cur]}\n{summary}")
    assert books["charges"] == len(org) == sum(len(a.body["items"]) for a in originals.values()), summary
    org_keys = Counter(agent_key(e.idempotency_key) for e in org)
    assert set(org_keys) == set(originals), (
        f"keys in the ledger and not answered 200: {sorted(set(org_keys) - set(originals))[:5]}; "
        f"answered 200 and not in the ledger: {sorted(set(originals) - set(org_keys))[:5]}\n{summary}")
    # One ExecuteTransaction per bought key: no key reached the Exchange twice.
    assert books["execute_calls"] == len(originals), summary

    # 8. A retry of a key that was bought (on any broker) is answered with the purchase, never denied.
    denied_after_bought = [
        f"{a.purchase.key}: bought on broker-{originals[a.purchase.key].broker} "
        f"(ended +{originals[a.purchase.key].ended - load.deadline + RUN_SECONDS:.2f}s), retry on "
        f"broker-{a.broker} (started +{a.started - load.deadline + RUN_SECONDS:.2f}s) got 429: "
        f"{a.body.get('message', '')}"
        for a in attempts
        if a.status == 429 and a.purchase.key in originals
        and a.started > originals[a.purchase.key].ended
    ]
    same_broker = sum(f"bought on broker-{b} " in d and f"retry on broker-{b} " in d
                      for d in denied_after_bought for b in range(N_BROKERS))
    assert not denied_after_bought, (
        f"{len(denied_after_bought)} retries of already-bought keys ({same_broker} on the broker that "
        f"bought them) were denied instead of replayed, e.g.\n" + "\n".join(denied_after_bought[:5])
        + f"\n{summary}")

    assert time.monotonic() - started < 90, f"took {time.monotonic() - started:.1f}s: {summary}"
