"""Periods, scope names, the fail-open journal and reconcile, without a broker."""

from __future__ import annotations

import asyncio
import json
import string
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.operator.cli import main
from budget.durability.journal import Journal, _hold_record, _line_record
from budget.periods import Period, PeriodError, time_zone, to_ms
from budget.reconcile import reconcile
from budget.scopes import ScopeError, check_scope
from budget.stores.contract import CounterRef, Hold, Line, Reserved
from budget.stores.sqlite import SqliteStore
from common.ids import new_id

UTC_TZ = time_zone("UTC", "tz")
BERLIN = time_zone("Europe/Berlin", "tz")
NEW_YORK = time_zone("America/New_York", "tz")


# --- periods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "spec"), [
    ("720h", "30d"), ("30d", "30d"), ("90m", "90m"), ("3600s", "1h"), ("61s", "61s"),
    ("month", "month"), ("week", "week"), ("day", "day"), ("hour", "hour"),
])
def test_period_specs_are_canonical(text: str, spec: str) -> None:
    assert Period.parse(text, "period").spec == spec


@pytest.mark.parametrize("text", ["", "0h", "59s", "367d", "1.5h", "-1h", "1y", "Month", "1 h", "08h"])
def test_bad_periods_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(PeriodError) as err:
        Period.parse(text, "limits.0.period")
    assert err.value.field == "limits.0.period"


def test_windows_split_at_midnight_to_the_millisecond() -> None:
    before = datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=UTC)
    after = before + timedelta(milliseconds=1)
    for spec, old, new in [("day", "2026-11-30", "2026-12-01"), ("month", "2026-11", "2026-12"),
                           ("hour", "2026-11-30T23Z", "2026-12-01T00Z")]:
        p = Period.parse(spec, "p")
        assert (p.window(before, UTC_TZ).id, p.window(after, UTC_TZ).id) == (old, new)
        assert p.window(before, UTC_TZ).end == p.window(after, UTC_TZ).start == after


def test_calendar_windows_follow_the_configured_time_zone() -> None:
    # 23:30 UTC on 23 Nov is already 24 Nov in Berlin.
    at = datetime(2026, 11, 23, 23, 30, tzinfo=UTC)
    w = Period.parse("day", "p").window(at, BERLIN)
    assert w.id == "2026-11-24"
    assert w.start == datetime(2026, 11, 23, 23, 0, tzinfo=UTC)
    week = Period.parse("week", "p").window(at, BERLIN)
    assert week.id == "2026-W48"
    assert week.start == datetime(2026, 11, 22, 23, 0, tzinfo=UTC)  # Monday 00:00 Berlin


def test_a_day_with_a_dst_change_is_23_or_25_hours() -> None:
    spring = Period.parse("day", "p").window(datetime(2026, 3, 8, 12, tzinfo=UTC), NEW_YORK)
    assert spring.end - spring.start == timedelta(hours=23)
    autumn = Period.parse("day", "p").window(datetime(2026, 11, 1, 12, tzinfo=UTC), NEW_YORK)
    assert autumn.end - autumn.start == timedelta(hours=25)
    # The repeated 01:00 hour of the autumn change is two distinct windows.
    hour = Period.parse("hour", "p")
    first = hour.window(datetime(2026, 11, 1, 5, 30, tzinfo=UTC), NEW_YORK)
    second = hour.window(datetime(2026, 11, 1, 6, 30, tzinfo=UTC), NEW_YORK)
    assert first.id != second.id


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(["hour", "day", "week", "month", "720h", "90m", "7d"]),
    st.sampled_from([UTC_TZ, BERLIN, NEW_YORK]),
)
def test_every_instant_is_in_exactly_its_window(at: datetime, spec: str, tz: object) -> None:
    from zoneinfo import ZoneInfo

    assert isinstance(tz, ZoneInfo)
    w = Period.parse(spec, "p").window(at, tz)
    assert w.start <= at < w.end
    assert to_ms(w.start) == w.start_ms
    # The instant just before the window belongs to the previous one.
    assert Period.parse(spec, "p").window(w.start - timedelta(milliseconds=1), tz).id != w.id


# --- scope names -------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40))
def test_a_scope_is_accepted_only_from_the_safe_alphabet(text: str) -> None:
    safe = set(string.ascii_letters + string.digits + "._@+-")
    kind, sep, ident = text.partition(":")
    ok = (
        bool(sep) and 1 <= len(kind) <= 32 and kind[0] in string.ascii_lowercase
        and set(kind) <= set(string.ascii_lowercase + string.digits + "_-")
        and 1 <= len(ident) <= 128 and ident[0] in string.ascii_letters + string.digits
        and set(ident) <= safe
    )
    if ok:
        assert check_scope(text, "s") == text
    else:
        with pytest.raises(ScopeError):
            check_scope(text, "s")


# --- the journal -------------------------------------------------------------------------------------

REF = CounterRef("user:alice", "month", "2026-11", "USD", 0, 1)
HOLD = Hold(REF, 5, 100, 2)
LINE = Line(0, 5, "0.000000005", "USD", "ex", "offer", "https://x.test/a")


async def test_journal_survives_a_restart_and_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    e1 = await j.append("acme", "k1", (HOLD,), (LINE,), 10)
    e2 = await j.append("acme", "k2", (HOLD,), (LINE,), 11)
    await j.ack(e1.id)
    with path.open("a") as f:
        f.write('{"id": "torn", "acc')  # a crash mid-write
    again = Journal(path)
    assert [e.id for e in again.pending()] == [e2.id]
    assert again.pending()[0].holds == (HOLD,)
    assert again.pending()[0].lines == (LINE,)
    await again.ack(e2.id)
    assert path.read_text() == ""  # everything acknowledged: truncated
    assert Journal(path).pending() == []


async def test_a_record_nobody_waits_for_goes_out_with_the_next_write_in_its_place(tmp_path: Path) -> None:
    """durable=False (a lease spend whose intent is on disk, an ack): the caller goes on at once,
    and the record reaches the disk with the next write, before anything queued after it."""
    path = tmp_path / "j.jsonl"
    j = Journal(path, lazy_flush_s=3600)  # only another write takes it out
    intent = await j.append("acme", "k1", (HOLD,), (), 10, intent=b"i")
    spend = await j.append("acme", "k1", (HOLD,), (LINE,), 11, settles=intent.id, durable=False)
    assert [e.id for e in j.pending()] == [spend.id]  # what the broker counts changes at once
    assert [e.id for e in Journal(path).pending()] == [intent.id]  # a crash now: rolled forward
    second = await j.append("acme", "k2", (HOLD,), (), 12, intent=b"i")
    assert [e.id for e in Journal(path).pending()] == [spend.id, second.id]
    await j.ack(spend.id, durable=False)
    j.close()  # a clean stop writes what is queued
    assert [e.id for e in Journal(path).pending()] == [second.id]


async def test_a_record_nobody_waits_for_is_written_soon_without_another_write(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal(path, lazy_flush_s=0.0)
    intent = await j.append("acme", "k1", (HOLD,), (), 10, intent=b"i")
    spend = await j.append("acme", "k1", (HOLD,), (LINE,), 11, settles=intent.id, durable=False)
    for _ in range(200):  # bounded: the flush is scheduled for the next loop iteration
        if [e.id for e in Journal(path).pending()] == [spend.id]:
            break
        await asyncio.sleep(0.01)
    assert [e.id for e in Journal(path).pending()] == [spend.id]
    await j.ack(spend.id, durable=False)
    await j.flush()
    assert path.read_text() == ""  # everything acknowledged: truncated


async def test_journal_writes_go_to_a_thread_while_the_disk_is_slow_and_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fast disk a write (and its fsync) runs on the loop: a thread hop cost more. Once writes
    are slow they go to a thread, so the loop does not wait on the disk; the loop is tried again
    after INLINE_RETRY_S."""
    import threading
    import time

    from budget.durability import journal as journal_module

    # The disk's speed is the test's: a real fsync on a busy machine can take longer than
    # INLINE_BELOW_S by itself, and the "fast again" writes then went to the thread.
    monkeypatch.setattr(journal_module, "sync_data", lambda fd: None)

    now = [0.0]
    j = Journal(tmp_path / "j.jsonl", monotonic=lambda: now[0])
    where: list[bool] = []  # each write: on the loop's thread?
    slow = [False]
    write = j._write

    def observed(lines: list[bytes], truncate: bool) -> None:
        where.append(threading.current_thread() is threading.main_thread())
        if slow[0]:
            time.sleep(journal_module.INLINE_BELOW_S * 10)  # a disk that stalls
        write(lines, truncate)

    j._write = observed  # type: ignore[method-assign]
    await j.append("acme", "k1", (HOLD,), (), 1, intent=b"i")
    slow[0] = True
    await j.append("acme", "k2", (HOLD,), (), 2, intent=b"i")  # on the loop, and slow
    await j.append("acme", "k3", (HOLD,), (), 3, intent=b"i")
    await j.append("acme", "k4", (HOLD,), (), 4, intent=b"i")
    assert where == [True, True, False, False]
    slow[0] = False
    now[0] += journal_module.INLINE_RETRY_S
    await j.append("acme", "k5", (HOLD,), (), 5, intent=b"i")  # tried on the loop: fast again
    await j.append("acme", "k6", (HOLD,), (), 6, intent=b"i")
    assert where[4:] == [True, True]
    assert [e.idempotency_key for e in Journal(tmp_path / "j.jsonl").pending()] == [
        f"k{i}" for i in range(1, 7)]


def test_ids_never_repeat_in_a_process_nor_across_processes() -> None:
    """Reservation and journal ids are unique without a system call each: a random half per
    process (another broker, or this one after a restart), a counter in the other."""
    import subprocess
    import sys

    ours = [new_id() for _ in range(50_000)]
    assert len(set(ours)) == len(ours)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ours[:10])
    other = subprocess.run([sys.executable, "-c", "from common.ids import new_id; print(new_id())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other[:16] != ours[0][:16]
    assert other not in set(ours)


async def test_journal_records_orjson_cannot_write_are_written_and_read_back(tmp_path: Path) -> None:
    """Records go out through orjson (budget.durability.jsonl), which refuses integers beyond 64 bits and lone
    surrogates: those are written by the standard library instead, never dropped."""
    path = tmp_path / "j.jsonl"
    big = Hold(REF, 2**70, 2**64, 2)
    odd = Line(0, 5, "0.000000005", "USD", "ex", "offer-\udc80", "https://x.test/a")
    entry = await Journal(path).append("acme", "k\ud800", (big,), (odd,), 10)
    (again,) = Journal(path).pending()
    assert (again.id, again.idempotency_key) == (entry.id, "k\ud800")
    assert (again.holds, again.lines) == ((big,), (odd,))


def test_a_journal_written_before_orjson_reads_back(tmp_path: Path) -> None:
    """Journals on disk from earlier versions (json.dumps lines; acks with a space after the colon)
    are read as they were: the format did not change, only the encoder."""
    path = tmp_path / "j.jsonl"
    record = {"id": "a1", "account": "acme", "idempotency_key": "k\u00e9", "holds": [_hold_record(HOLD)],
              "lines": [_line_record(LINE)], "at_ms": 10}
    gone = {**record, "id": "a2"}
    lines = [json.dumps(record, separators=(",", ":")), json.dumps(gone, separators=(",", ":")),
             json.dumps({"ack": "a2"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (entry,) = Journal(path).pending()
    assert (entry.id, entry.idempotency_key, entry.holds, entry.lines) == ("a1", "k\u00e9", (HOLD,), (LINE,))


@given(st.text(max_size=8), st.integers(0, 2**62), st.integers(0, 2**62), st.text(max_size=8))
def test_journal_records_are_the_dataclasses_every_field(scope: str, amount: int, floor: int,
                                                         uri: str) -> None:
    """The journal builds its records by hand (asdict is slow): a field added to Hold, CounterRef or
    Line and not written would be lost at a restart."""
    ref = CounterRef(scope, "month", "2026-11", "USD", amount, floor)
    hold = Hold(ref, amount, floor, amount, floor)
    line = Line(1, amount, "1.5", "EUR", "ex", scope, uri)
    assert _hold_record(hold) == asdict(hold)
    assert _line_record(line) == asdict(line)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "intent", "settle", "ack"]), st.integers(0, 30)),
                min_size=1, max_size=40))
def test_journal_writes_together_what_comes_together_and_reloads_as_it_was(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]],
) -> None:
    """Appends and acks made at once are group-committed (fewer writes than calls), and each
    returns only once its record is on disk: the file always reloads to what the journal had."""
    path = tmp_path_factory.mktemp("journal") / "j.jsonl"

    async def run() -> None:
        j = Journal(path)
        writes = 0
        write = j._write

        def counted(lines: list[bytes], truncate: bool) -> None:
            nonlocal writes
            writes += 1
            write(lines, truncate)

        j._write = counted  # type: ignore[method-assign]
        made: list[str] = []

        async def op(kind: str, n: int) -> None:
            pick = made[n % len(made)] if made else None
            if kind == "append":
                made.append((await j.append("acme", f"k{n}", (HOLD,), (LINE,), n)).id)
            elif kind == "intent":
                made.append((await j.append("acme", f"k{n}", (HOLD,), (), n, intent=b"i")).id)
            elif kind == "settle":
                made.append((await j.append("acme", f"k{n}", (HOLD,), (LINE,), n, settles=pick)).id)
            elif pick is not None:
                await j.ack(pick)

        for batch in (ops[i:i + 8] for i in range(0, len(ops), 8)):
            await asyncio.gather(*(op(kind, n) for kind, n in batch))
            assert [e.id for e in Journal(path).pending()] == [e.id for e in j.pending()]
        assert writes <= len(ops)
        if len(ops) >= 8 and all(kind in ("append", "intent") for kind, _ in ops[:8]):
            assert writes < len(ops)  # eight appends at once: fewer than eight writes

    asyncio.run(run())


# --- reconcile -------------------------------------------------------------------------------------


async def test_reconcile_finds_a_tampered_counter_and_repairs_it(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    store = await SqliteStore.open(db)
    try:
        out = await store.reserve("acme", [HOLD], ttl_ms=1000, idempotency_key="k", now_ms=0,
                                  limits_version=0)
        assert isinstance(out, Reserved)
        await store.commit("acme", out.reservation_id, [HOLD], [LINE], idempotency_key="k",
                           result=b"", now_ms=1)
        assert (await reconcile(store, ["acme"])).ok
        await store.overwrite_spent("acme", REF, 7, 1)  # written outside the ledger
        report = await reconcile(store, ["acme"])
        assert not report.ok
        (d,) = report.differences
        assert (d.counter_spent, d.ledger_spent) == (7, 5)
    finally:
        await store.close()
    config = tmp_path / "broker.yaml"
    config.write_text(
        "period_budgets:\n"
        f"  store: {{kind: embedded, path: '{db}'}}\n"
        "  accounts: {acme: {scopes: {'user:alice':\n"
        "    {limits: [{period: month, amount: '1', currency: USD}]}}}}\n"
    )
    assert await asyncio.to_thread(main, ["reconcile", "--config", str(config)]) == 1
    assert await asyncio.to_thread(main, ["reconcile", "--config", str(config), "--repair"]) == 1
    assert await asyncio.to_thread(main, ["reconcile", "--config", str(config)]) == 0


# --- fail-open allowance -------------------------------------------------------------------------


async def test_fail_open_allowance_counts_every_item_of_a_journaled_purchase(tmp_path: Path) -> None:
    from budget.layers import BudgetExhausted
    from budget.period import Charge, ItemSpend, PeriodLayer, ScopeRule
    from budget.stores.redis import RedisStore
    from common.clock import ManualClock
    from currency.convert import NoConverter
    from currency.money import Money
    from tests.harness import free_port

    def usd(text: str) -> Money:
        return Money.parse(text, "USD", "amount")

    # A real store that cannot be reached: nothing listens on this loopback port.
    store = await RedisStore.open(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100, lazy=True)
    rule = ScopeRule(limits={"month": (Period.parse("month", "p"), usd("100"))}, failure="open",
                     open_allowance=usd("5.00"))
    layer = PeriodLayer(store, {"acme": {"user:alice": rule}}, clock=ManualClock(), tz=UTC_TZ,
                        converter=NoConverter(), ttl_s=60, grace_s=0, journal=Journal(tmp_path / "j"))
    charge = Charge("acme", ("user:alice",))
    try:
        plan = await layer.plan(charge)
        hold = await layer.reserve(charge, plan, usd("3.00"), "k1")
        assert hold is not None
        assert hold.local
        await layer.commit(hold, [ItemSpend("ex", "o1", "u:1", usd("1.50"), usd("1.50")),
                                  ItemSpend("ex", "o2", "u:2", usd("1.50"), usd("1.50"))], b"")
        (snap,) = await layer.snapshots(plan)
        assert (snap.limit, snap.spent) == (usd("5.00"), usd("3.00"))
        with pytest.raises(BudgetExhausted) as denied:
            await layer.reserve(charge, plan, usd("2.50"), "k2")
        assert denied.value.reason == "open_allowance_exhausted"
        assert await layer.reserve(charge, plan, usd("2.00"), "k3") is not None
    finally:
        await store.close()


async def test_a_plan_is_made_again_when_a_window_ends_or_the_limits_change(tmp_path: Path) -> None:
    """Plans are reused (planning every purchase afresh cost a tenth of a lease purchase), but
    never past the end of one of their windows, nor under limits an operator has changed."""
    from budget.period import Charge, PeriodLayer, ScopeRule
    from common.clock import ManualClock
    from currency.convert import NoConverter
    from currency.money import Money

    usd = Money.parse("100", "USD", "amount")
    clock = ManualClock(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))
    store = await SqliteStore.open(tmp_path / "b.sqlite3")
    rule = ScopeRule(limits={"month": (Period.parse("month", "p"), usd),
                             "day": (Period.parse("day", "p"), usd)})
    layer = PeriodLayer(store, {"acme": {"user:alice": rule}}, clock=clock, tz=UTC_TZ,
                        converter=NoConverter(), ttl_s=60, grace_s=0, journal=None)
    charge = Charge("acme", ("user:alice",))
    try:
        first = await layer.plan(charge)
        assert await layer.plan(Charge("acme", ("user:alice",))) is first
        assert {c.ref.window for c in first.counters} == {"2026-11", "2026-11-30"}
        clock.advance(1)  # midnight: a new day and a new month
        after = await layer.plan(charge)
        assert {c.ref.window for c in after.counters} == {"2026-12", "2026-12-01"}
        await layer.set_limit("acme", "user:alice", Period.parse("day", "p"), None)
        changed = await layer.plan(charge)
        assert [c.ref.period for c in changed.counters] == ["month"]
        assert changed.version > after.version
    finally:
        await store.close()


# --- after a store failure ---------------------------------------------------------------------


async def test_after_a_store_failure_one_call_probes_and_its_success_ends_the_skip(tmp_path: Path) -> None:
    """A store that failed moments ago is skipped (purchases fail at once, not each after its own
    timeout), but one call at a time still goes through: one slow answer must not refuse purchases
    for the whole skip window. The clock never moves here, so only a probe can end the skip."""
    from redis.asyncio import Redis

    from budget.period import Charge, PeriodLayer, ScopeRule, StoreDown
    from budget.stores.redis import RedisStore
    from common.clock import ManualClock
    from currency.convert import NoConverter
    from currency.money import Money
    from tests.redis_server import RedisServer

    usd = Money.parse("1.00", "USD", "amount")
    redis = RedisServer(tmp_path)
    await asyncio.to_thread(redis.start)
    store = await RedisStore.open(redis.url, timeout_ms=400)
    admin = Redis.from_url(redis.url)
    rule = ScopeRule(limits={"month": (Period.parse("month", "p"), Money.parse("100", "USD", "l"))})
    layer = PeriodLayer(store, {"acme": {"user:alice": rule}}, clock=ManualClock(), tz=UTC_TZ,
                        converter=NoConverter(), ttl_s=60, grace_s=0, journal=None)
    charge = Charge("acme", ("user:alice",))
    try:
        plan = await layer.plan(charge)
        assert await layer.reserve(charge, plan, usd, "k1") is not None
        await admin.client_pause(800, all=False)  # CLIENT PAUSE 800 WRITE: the next reserve times out
        with pytest.raises(StoreDown):
            await layer.reserve(charge, plan, usd, "k2")
        await asyncio.sleep(0.8)  # the store answers again

        # While a probe is under way the others are refused without a store call (k4 would have
        # waited out the short pause and succeeded); the probe's success ends the skip.
        await admin.client_pause(150, all=False)
        probe = asyncio.create_task(layer.reserve(charge, plan, usd, "k3"))
        await asyncio.sleep(0.02)
        with pytest.raises(StoreDown):
            await layer.reserve(charge, plan, usd, "k4")
        assert not probe.done()
        assert await probe is not None
        assert await layer.reserve(charge, plan, usd, "k5") is not None
    finally:
        await admin.aclose()
        await store.close()
        await asyncio.to_thread(redis.stop)
