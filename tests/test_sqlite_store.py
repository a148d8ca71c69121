"""What only the SQLite store has to prove: the file, its modes, and several processes sharing it.

Generic Store behaviour is in test_store_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from budget.stores.contract import (
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    LeaseAsk,
    Leased,
    Limits,
    Line,
    Reserved,
    Settled,
    Store,
    StoreIdentity,
    StoreUnavailable,
    Swept,
    UnsettledHold,
)
from budget.stores.sqlite import SqliteStore, default_path

ACCOUNT = "acme"
USER = CounterRef(scope="user:alice", period="month", window="2026-01", currency="USD",
                  start_ms=0, end_ms=1_000_000)
TEAM = CounterRef(scope="team:eng", period="month", window="2026-01", currency="USD",
                  start_ms=0, end_ms=1_000_000)
TABLES = {"counters", "reservations", "idempotency", "ledger", "limits", "limits_version", "blobs"}
SCHEMA_VERSION = 3


def holds(amount: int, user_limit: int = 1_000, team_limit: int = 10_000) -> list[Hold]:
    return [Hold(USER, amount, user_limit, 2_000_000), Hold(TEAM, amount, team_limit, 2_000_000)]


def line(hold_index: int, amount: int, offer: str = "o1") -> Line:
    return Line(hold_index=hold_index, amount=amount, original_amount="0.000000100", original_currency="USD",
                exchange="ex", offer_id=offer, uri=f"ramp://ex/{offer}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ramp-broker" / "budget.sqlite3"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(db)
    yield s
    await s.close()


async def test_satisfies_the_store_protocol(store: SqliteStore) -> None:
    as_protocol: Store = store  # mypy checks the structure; this checks it is one object
    assert await as_protocol.read(ACCOUNT, [USER]) == [CounterState()]


async def test_open_creates_directory_schema_and_wal(db: Path, store: SqliteStore) -> None:
    with sqlite3.connect(db) as raw:  # would create an empty file if open() had not
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert tables >= TABLES | {"claims", "identity", "leases", "lease_brokers"}
    # synchronous is per connection: ask the store's own.
    settings = await store._run(
        lambda c: (c.execute("PRAGMA synchronous").fetchone()[0],
                   c.execute("PRAGMA busy_timeout").fetchone()[0]),
        write=False,
    )
    assert settings == (2, 1000)  # FULL, and the default timeout_ms


async def test_reopening_an_existing_file_keeps_schema_and_data(db: Path) -> None:
    first = await SqliteStore.open(db)
    await first.set_limit(ACCOUNT, "user:alice", "month", ("USD", 500))
    await first.close()
    second = await SqliteStore.open(db, timeout_ms=200)
    assert (await second.limits(ACCOUNT)).values == {("user:alice", "month"): ("USD", 500)}
    await second.close()


async def test_amount_columns_refuse_anything_but_integers(db: Path, store: SqliteStore) -> None:
    raw = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute(
            "INSERT INTO counters VALUES ('a', 'k', 's', 'p', 'w', 'USD', 0, 1, 1.5, 0, 0, 0, 1, 0, 0)"
        )
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute("INSERT INTO limits VALUES ('a', 'user:x', 'day', 'USD', 2.5)")
    raw.close()


async def test_lease_columns_refuse_anything_but_integers(db: Path, store: SqliteStore) -> None:
    # `leased` is an amount like reserved (its part), and reclaim_until a time: integers only, as
    # the module promises for amounts (leases.granted and lease_brokers already check theirs).
    raw = sqlite3.connect(db)
    for key, leased, reclaim_until in (("k1", 1.5, 0), ("k2", 0, 2.5)):
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("INSERT INTO counters VALUES ('a', ?, 's', 'p', 'w', 'USD', 0, 1, 0, 0, 0, 0, 1, "
                        "?, ?)", (key, leased, reclaim_until))
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute("INSERT INTO leases VALUES ('a', 'k', 'b', 1.5)")
    raw.close()


async def test_everything_survives_close_and_reopen(db: Path) -> None:
    s = await SqliteStore.open(db)
    version = await s.set_limit(ACCOUNT, "team:eng", "month", None)
    await s.add_credit(ACCOUNT, USER, 50, expire_at_ms=2_000_000)
    open_res = await s.reserve(ACCOUNT, holds(100), ttl_ms=60_000, idempotency_key="open",
                               now_ms=1_000, limits_version=version)
    done = await s.reserve(ACCOUNT, holds(200), ttl_ms=60_000, idempotency_key="done",
                           now_ms=1_000, limits_version=version)
    assert isinstance(open_res, Reserved)
    assert isinstance(done, Reserved)
    await s.commit(ACCOUNT, done.reservation_id, holds(200), [line(0, 150), line(1, 150)],
                   idempotency_key="done", result=b"receipt", now_ms=2_000)
    await s.put_blob("ecb", b"<rates/>", ttl_ms=10_000, now_ms=2_000)
    await s.close()

    s = await SqliteStore.open(db)
    assert await s.read(ACCOUNT, [USER, TEAM]) == [
        CounterState(spent=150, reserved=100, credit=50, count=1),
        CounterState(spent=150, reserved=100, credit=0, count=1),
    ]
    assert await s.limits(ACCOUNT) == Limits(version=1, values={("team:eng", "month"): None})
    assert [(e.scope, e.amount, e.idempotency_key) async for e in s.ledger(ACCOUNT)] == [
        ("user:alice", 150, "done"), ("team:eng", 150, "done"),
    ]
    assert await s.get_blob("ecb", now_ms=3_000) == b"<rates/>"
    for key, expected in (("done", Settled(b"receipt")), ("open", InFlight(open_res.reservation_id))):
        again = await s.reserve(ACCOUNT, holds(1), ttl_ms=60_000, idempotency_key=key, now_ms=3_000,
                                limits_version=1)
        assert again == expected
    assert await s.release(ACCOUNT, open_res.reservation_id, now_ms=3_000)
    assert [ref async for ref, _ in s.counters(ACCOUNT)] == [TEAM, USER]
    await s.close()


async def test_ledger_pages_past_one_read(store: SqliteStore) -> None:
    many = [line(i % 2, 1, offer=f"o{i}") for i in range(1_203)]
    assert await store.record_spend(ACCOUNT, holds(0), many, idempotency_key="bulk", now_ms=5, kind="journal")
    entries = [e async for e in store.ledger(ACCOUNT)]
    assert [e.offer_id for e in entries] == [f"o{i}" for i in range(1_203)]
    ids = [e.id for e in entries]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {e.kind for e in entries} == {"journal"}
    assert len([e async for e in store.ledger(ACCOUNT, scope="team:eng")]) == 601


async def test_sweep_drops_expired_counters_that_hold_nothing(store: SqliteStore) -> None:
    short = CounterRef(scope="user:bob", period="day", window="2026-01-01", currency="USD", start_ms=0,
                       end_ms=100)
    await store.add_credit(ACCOUNT, short, 5, expire_at_ms=200)
    held = await store.reserve(ACCOUNT, [Hold(USER, 10, 1_000, 200)], ttl_ms=1_000_000,
                               idempotency_key="k", now_ms=0, limits_version=0)
    assert isinstance(held, Reserved)
    assert (await store.sweep(ACCOUNT, now_ms=200)).refunded == 0
    assert {ref.scope async for ref, _ in store.counters(ACCOUNT)} == {"user:bob", "user:alice"}
    assert (await store.sweep(ACCOUNT, now_ms=201)).refunded == 0
    # user:alice still holds a reservation, so it stays however old it is.
    assert {ref.scope async for ref, _ in store.counters(ACCOUNT)} == {"user:alice"}


async def _reserve_many(s: SqliteStore, prefix: str, n: int, amount: int) -> int:
    got = 0
    for i in range(n):
        out = await s.reserve(ACCOUNT, holds(amount, user_limit=1_000, team_limit=700), ttl_ms=60_000,
                              idempotency_key=f"{prefix}-{i}", now_ms=1, limits_version=0)
        if isinstance(out, Reserved):
            got += 1
        else:
            assert isinstance(out, Denied)
    return got


async def test_two_stores_on_one_file_never_overspend(db: Path) -> None:
    a = await SqliteStore.open(db, timeout_ms=5_000)
    b = await SqliteStore.open(db, timeout_ms=5_000)
    try:
        # Each store has its own connection and thread, so the two really race for the file.
        got = await asyncio.gather(
            *(_reserve_many(s, f"{name}{k}", 10, 30) for k in range(3) for name, s in (("a", a), ("b", b)))
        )
        # team:eng's 700 is the tighter limit: exactly 23 holds of 30 fit, whatever the interleaving.
        assert sum(got) == 23
        assert await a.read(ACCOUNT, [USER, TEAM]) == [CounterState(reserved=690), CounterState(reserved=690)]
    finally:
        await a.close()
        await b.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from budget.stores.sqlite import SqliteStore
    from tests.test_sqlite_store import _reserve_many

    async def main() -> None:
        s = await SqliteStore.open(Path(sys.argv[1]), timeout_ms=5_000)
        print(await _reserve_many(s, sys.argv[2], 40, 30))
        await s.close()

    asyncio.run(main())
    """
)


async def test_two_processes_on_one_file_never_overspend(db: Path) -> None:
    await (await SqliteStore.open(db)).close()  # the file and schema exist before the race
    root = Path(__file__).parent.parent.absolute()
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, str(db), name, cwd=root,
                                             stdout=asyncio.subprocess.PIPE)
        for name in ("p", "q")
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(int(out.decode()) for out, _ in outs) == 23
    s = await SqliteStore.open(db)
    assert await s.read(ACCOUNT, [TEAM]) == [CounterState(reserved=690)]
    await s.close()


async def test_locked_database_fails_fast_as_store_unavailable(db: Path) -> None:
    s = await SqliteStore.open(db, timeout_ms=50)
    res = await s.reserve(ACCOUNT, holds(10), ttl_ms=1_000, idempotency_key="k", now_ms=0, limits_version=0)
    assert isinstance(res, Reserved)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing and does not let go
    try:
        writes = {
            "reserve": s.reserve(ACCOUNT, holds(10), ttl_ms=1_000, idempotency_key="k2", now_ms=0,
                                 limits_version=0),
            "commit": s.commit(ACCOUNT, res.reservation_id, holds(10), [line(0, 10)],
                               idempotency_key="k", result=b"", now_ms=1),
            "release": s.release(ACCOUNT, res.reservation_id, now_ms=1),
            "sweep": s.sweep(ACCOUNT, now_ms=1),
            "set_limit": s.set_limit(ACCOUNT, "user:alice", "month", ("USD", 1)),
        }
        for name, call in writes.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                await call
            assert time.monotonic() - started < 1.0, name
        # WAL: readers are not blocked by a writer.
        assert await s.read(ACCOUNT, [USER]) == [CounterState(reserved=10)]
    finally:
        other.execute("ROLLBACK")
        other.close()
    # Nothing was left half-done: the store carries on.
    assert await s.release(ACCOUNT, res.reservation_id, now_ms=1)
    await s.close()


async def test_open_failures_are_store_unavailable(tmp_path: Path, db: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await SqliteStore.open(tmp_path / "file" / "budget.sqlite3")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(StoreUnavailable, match="not a database"):
        await SqliteStore.open(junk)
    await (await SqliteStore.open(db)).close()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await SqliteStore.open(db, timeout_ms=20)
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_cancelled_call_leaves_no_transaction_open(db: Path) -> None:
    a = await SqliteStore.open(db, timeout_ms=5_000)
    b = await SqliteStore.open(db, timeout_ms=200)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    # a's reserve is now waiting for the lock in a's thread; its caller gives up (a store timeout).
    call = asyncio.ensure_future(
        a.reserve(ACCOUNT, holds(10), ttl_ms=1_000, idempotency_key="k", now_ms=0, limits_version=0)
    )
    await asyncio.sleep(0.05)
    call.cancel()
    other.execute("ROLLBACK")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The transaction still ran to its end in a's thread (the outcome is unknown to the caller, as
    # for any failed write) ...
    assert await a.read(ACCOUNT, [USER]) == [CounterState(reserved=10)]
    # ... and let go of the lock: another process writes without waiting out its timeout.
    assert await b.set_limit(ACCOUNT, "user:alice", "month", ("USD", 5)) == 1
    await a.close()
    await b.close()


async def test_closed_store_is_unavailable(db: Path) -> None:
    s = await SqliteStore.open(db)
    await s.close()
    await s.close()  # twice is fine
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.read(ACCOUNT, [USER])


def test_default_path_honours_xdg_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "ramp-broker" / "budget.sqlite3"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_default_path_falls_back_to_local_state(
    xdg: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
    assert default_path() == tmp_path / ".local" / "state" / "ramp-broker" / "budget.sqlite3"


# --- schema version 1 (before intents and identities) ---------------------------------------

# The version-1 schema exactly as the store created it (git history: budget/stores/sqlite.py).
_V1_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS counters (
        account      TEXT NOT NULL,
        "key"        TEXT NOT NULL,
        scope        TEXT NOT NULL,
        period       TEXT NOT NULL,
        "window"     TEXT NOT NULL,
        currency     TEXT NOT NULL,
        start_ms     INTEGER NOT NULL CHECK (typeof(start_ms) = 'integer'),
        end_ms       INTEGER NOT NULL CHECK (typeof(end_ms) = 'integer'),
        spent        INTEGER NOT NULL CHECK (typeof(spent) = 'integer'),
        reserved     INTEGER NOT NULL CHECK (typeof(reserved) = 'integer' AND reserved >= 0),
        credit       INTEGER NOT NULL CHECK (typeof(credit) = 'integer'),
        count        INTEGER NOT NULL CHECK (typeof(count) = 'integer'),
        expire_at_ms INTEGER NOT NULL CHECK (typeof(expire_at_ms) = 'integer'),
        PRIMARY KEY (account, "key")
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS reservations (
        account         TEXT NOT NULL,
        id              TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        created_ms      INTEGER NOT NULL CHECK (typeof(created_ms) = 'integer'),
        expires_ms      INTEGER NOT NULL CHECK (typeof(expires_ms) = 'integer'),
        holds           TEXT NOT NULL,  -- JSON [[counter key, amount], ...], one per Hold, in order
        PRIMARY KEY (account, id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations (account, expires_ms)",
    """
    CREATE TABLE IF NOT EXISTS idempotency (
        account        TEXT NOT NULL,
        "key"          TEXT NOT NULL,
        state          TEXT NOT NULL CHECK (state IN ('open', 'committed')),
        reservation_id TEXT NOT NULL,
        result         BLOB,
        PRIMARY KEY (account, "key")
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS ledger (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        account           TEXT NOT NULL,
        scope             TEXT NOT NULL,
        period            TEXT NOT NULL,
        "window"          TEXT NOT NULL,
        amount            INTEGER NOT NULL CHECK (typeof(amount) = 'integer'),
        currency          TEXT NOT NULL,
        original_amount   TEXT NOT NULL,
        original_currency TEXT NOT NULL,
        idempotency_key   TEXT NOT NULL,
        reservation_id    TEXT NOT NULL,
        exchange          TEXT NOT NULL,
        offer_id          TEXT NOT NULL,
        uri               TEXT NOT NULL,
        reserved_at_ms    INTEGER NOT NULL CHECK (typeof(reserved_at_ms) = 'integer'),
        committed_at_ms   INTEGER NOT NULL CHECK (typeof(committed_at_ms) = 'integer'),
        kind              TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS ledger_by_account ON ledger (account, id)",
    "CREATE INDEX IF NOT EXISTS ledger_by_scope ON ledger (account, scope, id)",
    """
    CREATE TABLE IF NOT EXISTS limits (
        account  TEXT NOT NULL,
        scope    TEXT NOT NULL,
        period   TEXT NOT NULL,
        currency TEXT,
        units    INTEGER CHECK (units IS NULL OR typeof(units) = 'integer'),
        CHECK ((currency IS NULL) = (units IS NULL)),
        PRIMARY KEY (account, scope, period)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS limits_version (
        account TEXT PRIMARY KEY,
        version INTEGER NOT NULL CHECK (typeof(version) = 'integer')
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS claims (
        account      TEXT NOT NULL,
        name         TEXT NOT NULL,
        expire_at_ms INTEGER NOT NULL CHECK (typeof(expire_at_ms) = 'integer'),
        PRIMARY KEY (account, name)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS claims_by_expiry ON claims (account, expire_at_ms)",
    """
    CREATE TABLE IF NOT EXISTS blobs (
        name       TEXT PRIMARY KEY,
        data       BLOB NOT NULL,
        expires_ms INTEGER NOT NULL CHECK (typeof(expires_ms) = 'integer')
    )
    """,
)


def _write_version_1_file(path: Path) -> None:
    """A version-1 store as a broker of that version left it: a counter, two open reservations
    (one about to expire), a committed key with its ledger row, a limit, a claim and a blob."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        assert raw.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        raw.execute("BEGIN")
        for statement in _V1_SCHEMA:
            raw.execute(statement)
        raw.execute("INSERT INTO counters VALUES (?, ?, 'user:alice', 'month', '2026-01', 'USD', 0, 1000000, "
                    "300, 150, 50, 2, 2000000)", (ACCOUNT, USER.key))
        raw.executemany("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?)", [
            (ACCOUNT, "r-open", "k-open", 1_000, 61_000, f'[["{USER.key}",100]]'),
            (ACCOUNT, "r-old", "k-old", 1_000, 1_500, f'[["{USER.key}",50]]'),
        ])
        raw.executemany("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)", [
            (ACCOUNT, "k-open", "open", "r-open", None), (ACCOUNT, "k-old", "open", "r-old", None),
            (ACCOUNT, "k-done", "committed", "r-done", b"receipt\x00"),
        ])
        raw.execute(
            "INSERT INTO ledger (account, scope, period, \"window\", amount, currency, original_amount, "
            "original_currency, idempotency_key, reservation_id, exchange, offer_id, uri, reserved_at_ms, "
            "committed_at_ms, kind) VALUES (?, 'user:alice', 'month', '2026-01', 300, 'USD', '0.000000300', "
            "'USD', 'k-done', 'r-done', 'ex', 'o1', 'ramp://ex/o1', 500, 900, 'commit')", (ACCOUNT,))
        raw.execute("INSERT INTO limits VALUES (?, 'user:alice', 'month', 'USD', 1000)", (ACCOUNT,))
        raw.execute("INSERT INTO limits_version VALUES (?, 3)", (ACCOUNT,))
        raw.execute("INSERT INTO claims VALUES (?, 'alert|a', 5000000)", (ACCOUNT,))
        raw.execute("INSERT INTO blobs VALUES ('ecb', x'3c2f3e', 9000000)")
        raw.execute("PRAGMA user_version = 1")
        raw.execute("COMMIT")
    finally:
        raw.close()


# What version 2 added to version 1 (git history: budget/stores/sqlite.py, _MIGRATE_1_TO_2 and the
# identity table), before leases.
_V1_TO_V2 = (
    "ALTER TABLE reservations ADD COLUMN intent BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE reservations ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE reservations ADD COLUMN done TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE reservations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    """
    CREATE TABLE IF NOT EXISTS identity (
        account    TEXT PRIMARY KEY,
        id         TEXT NOT NULL,
        generation INTEGER NOT NULL CHECK (typeof(generation) = 'integer')
    )
    """,
)


def _write_old_file(path: Path, version: int) -> None:
    """The version-1 data, in a file of schema `version` (1 or 2: the same rows, before leases)."""
    _write_version_1_file(path)
    if version == 2:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
            raw.execute("BEGIN")
            for statement in _V1_TO_V2:
                raw.execute(statement)
            raw.execute("PRAGMA user_version = 2")
            raw.execute("COMMIT")


@pytest.mark.parametrize("old_version", [1, 2])
async def test_an_old_file_is_migrated_and_keeps_its_data(db: Path, old_version: int) -> None:
    _write_old_file(db, old_version)
    s = await SqliteStore.open(db)
    try:
        with contextlib.closing(sqlite3.connect(db)) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            columns = {row[1] for row in raw.execute("PRAGMA table_info(reservations)")}
            assert columns >= {"intent", "owner", "done", "attempts"}
            # Version 3: leases.
            columns = {row[1] for row in raw.execute("PRAGMA table_info(counters)")}
            assert columns >= {"leased", "reclaim_until"}
            assert raw.execute('SELECT leased, reclaim_until FROM counters WHERE "key" = ?',
                               (USER.key,)).fetchall() == [(0, 0)]
            tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert tables >= TABLES | {"claims", "identity", "leases", "lease_brokers"}
        # The data is all there.
        assert await s.read(ACCOUNT, [USER]) == [CounterState(spent=300, reserved=150, credit=50, count=2)]
        assert [(ref, st) async for ref, st in s.counters(ACCOUNT)] == [
            (USER, CounterState(spent=300, reserved=150, credit=50, count=2))]
        entries = [e async for e in s.ledger(ACCOUNT)]
        assert [(e.scope, e.amount, e.idempotency_key, e.reservation_id, e.reserved_at_ms, e.committed_at_ms,
                 e.kind) for e in entries] == [("user:alice", 300, "k-done", "r-done", 500, 900, "commit")]
        assert await s.limits(ACCOUNT) == Limits(3, {("user:alice", "month"): ("USD", 1000)})
        assert await s.get_blob("ecb", now_ms=2_000) == b"</>"
        assert await s.claim(ACCOUNT, "alert|a", expire_at_ms=6_000_000, now_ms=2_000) is False
        assert await s.settled(ACCOUNT, "k-done") == b"receipt\x00"
        # Old reservations have no intent: none is listed, and an expired one is refunded by a sweep.
        assert await s.holds(ACCOUNT) == []
        assert await s.identity(ACCOUNT) is None
        assert await s.reserve(ACCOUNT, holds(1), ttl_ms=60_000, idempotency_key="k-open", now_ms=2_000,
                               limits_version=3) == InFlight("r-open")
        assert await s.reserve(ACCOUNT, holds(1), ttl_ms=60_000, idempotency_key="k-done", now_ms=2_000,
                               limits_version=3) == Settled(b"receipt\x00")
        assert await s.sweep(ACCOUNT, now_ms=2_000) == Swept(1, ())
        assert await s.read(ACCOUNT, [USER]) == [CounterState(spent=300, reserved=100, credit=50, count=2)]
        # An old reservation is committed part by part like a new one.
        one = [Hold(USER, 100, 1_000, 2_000_000)]
        part = await s.commit(ACCOUNT, "r-open", one, [line(0, 30)], idempotency_key="k-open", result=b"p0",
                              now_ms=3_000, part=0, release=[40], final=False)
        assert part.states == (CounterState(spent=330, reserved=60, credit=50, count=2),)
        await s.commit(ACCOUNT, "r-open", one, [line(0, 20)], idempotency_key="k-open", result=b"all",
                       now_ms=4_000, part=1)
        assert await s.read(ACCOUNT, [USER]) == [CounterState(spent=350, reserved=0, credit=50, count=3)]
        assert await s.settled(ACCOUNT, "k-open") == b"all"
        # And the new features work on the migrated file.
        seen = await s.set_identity(ACCOUNT, StoreIdentity("id-1"))
        r = await s.reserve(ACCOUNT, one, ttl_ms=1_000, idempotency_key="k-new", now_ms=5_000,
                            limits_version=3, intent=b"\x00intent", owner="a", identity=seen)
        assert isinstance(r, Reserved)
        assert await s.sweep(ACCOUNT, now_ms=6_000, lease_ms=500, taker="b") == Swept(0, (
            UnsettledHold(r.reservation_id, "k-new", b"\x00intent", 5_000, 6_500, "b", 1, {}),))
        # Leases too: 1000 + 50 credit - 350 spent - 100 held leaves 600 to lease.
        leased = await s.lease(ACCOUNT, "broker-1", 1, [LeaseAsk(one[0], 700)], [], ttl_ms=1_000,
                               now_ms=7_000, limits_version=3, identity=seen)
        assert isinstance(leased, Leased)
        assert [g.granted for g in leased.grants] == [600]
        (after,) = await s.read(ACCOUNT, [USER])
        assert (after.reserved, after.leased) == (700, 600)
    finally:
        await s.close()
    # Opening it again migrates nothing twice.
    s = await SqliteStore.open(db)
    try:
        assert await s.identity(ACCOUNT) == StoreIdentity("id-1")
        (after,) = await s.read(ACCOUNT, [USER])
        assert after == CounterState(spent=350, reserved=700, credit=50, count=3)
        assert after.leased == 600
        assert [(x.broker, x.granted, x.seq) for x in await s.leases(ACCOUNT)] == [("broker-1", 600, 1)]
        assert len([e async for e in s.ledger(ACCOUNT)]) == 3
    finally:
        await s.close()
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# --- group commit -----------------------------------------------------------------------------------


async def test_writes_queued_together_share_one_commit_and_fail_alone(store: SqliteStore, db: Path) -> None:
    """Write operations queued while one runs go out in one transaction (one fsync), each in its
    own savepoint: one that raises is rolled back alone, the others are written, and each caller
    hears only its own outcome."""
    groups: list[int] = []
    group = store._group

    def counted(fns: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        groups.append(len(fns))
        return group(fns)

    store._group = counted  # type: ignore[method-assign]

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO blobs (name, data, expires_ms) VALUES ('half-done', x'00', 9)")
        raise ValueError("a bug half-way through an operation")

    results = await asyncio.gather(
        *(store.reserve(ACCOUNT, holds(10), ttl_ms=60_000, idempotency_key=f"k{i}", now_ms=1,
                        limits_version=0) for i in range(3)),
        store._run(broken, write=True),
        *(store.reserve(ACCOUNT, holds(10), ttl_ms=60_000, idempotency_key=f"k{i}", now_ms=1,
                        limits_version=0) for i in range(3, 6)),
        return_exceptions=True)
    assert sum(groups) == 6 + 1
    assert len(groups) < 7  # shared commits
    assert isinstance(results[3], ValueError)
    assert all(isinstance(r, Reserved) for r in results[:3] + results[4:]), results
    assert await store.read(ACCOUNT, [USER]) == [CounterState(reserved=60)]
    assert await store.get_blob("half-done", now_ms=0) is None  # rolled back with its operation
    # Nothing of it was lost when the file is opened afresh.
    again = await SqliteStore.open(db)
    try:
        assert await again.read(ACCOUNT, [USER]) == [CounterState(reserved=60)]
    finally:
        await again.close()


async def test_a_group_commit_that_cannot_be_written_fails_every_write_in_it(db: Path) -> None:
    """Another process holds the file's write lock past the busy timeout: every write queued
    together fails (StoreUnavailable), nothing of them is written, and the next ones go through."""
    store = await SqliteStore.open(db, timeout_ms=50)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        results = await asyncio.gather(*(
            store.reserve(ACCOUNT, holds(10), ttl_ms=60_000, idempotency_key=f"k{i}", now_ms=1,
                          limits_version=0) for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        other.execute("ROLLBACK")
        assert await store.read(ACCOUNT, [USER]) == [CounterState()]
        again = await store.reserve(ACCOUNT, holds(10), ttl_ms=60_000, idempotency_key="k0", now_ms=1,
                                    limits_version=0)
        assert isinstance(again, Reserved)
    finally:
        other.close()
        await store.close()


async def test_writes_queued_when_the_worker_is_gone_are_told_not_left_waiting(db: Path) -> None:
    store = await SqliteStore.open(db)
    try:
        store._executor.shutdown()  # the worker thread is gone (as at the end of a close)
        results = await asyncio.wait_for(asyncio.gather(*(
            store.reserve(ACCOUNT, holds(10), ttl_ms=60_000, idempotency_key=f"k{i}", now_ms=1,
                          limits_version=0) for i in range(3)), return_exceptions=True), 5)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
    finally:
        store._closed = True  # nothing left to close on the worker
