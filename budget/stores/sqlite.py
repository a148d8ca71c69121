"""The embedded budget store: one SQLite file shared by the broker processes of one host.

Every operation is a single plain function run inside a transaction on the store's own worker
thread. Nothing awaits inside a transaction, so a caller cancelled by its timeout can never leave
a transaction (and with it the file's write lock) open: the function finishes, committing or
rolling back, and the next operation queues behind it. Write operations are group-committed:
those queued while a transaction runs go together in the next one, each in its own savepoint
(one that fails is rolled back alone), with one COMMIT, so one fsync, for all of them; each
caller hears its outcome once that COMMIT is done.

Writes start with BEGIN IMMEDIATE, which takes the file's single write lock before reading, so
check-then-hold is atomic across processes. Reads use a deferred BEGIN: in WAL mode that is a
snapshot that never blocks, nor is blocked by, the writer. All arithmetic on amounts happens in
Python on values read inside the write transaction (SQLite would turn an overflowing INTEGER sum
into a REAL); CHECK constraints refuse anything but integers in amount columns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from budget.stores.contract import (
    RECLAIM_MS,
    BrokerLease,
    Committed,
    CounterRef,
    CounterState,
    Denied,
    Hold,
    InFlight,
    LeaseAsk,
    Leased,
    LeaseGrant,
    LeaseOutcome,
    LeaseSpend,
    LedgerEntry,
    Limits,
    Line,
    Lost,
    Reserved,
    ReserveOutcome,
    Settled,
    StaleLimits,
    StoreIdentity,
    StoreLost,
    StoreUnavailable,
    Swept,
    Unsettled,
    UnsettledHold,
    lease_for,
)
from common.ids import new_id
from common.statedir import state_dir
from currency.money import Money

T = TypeVar("T")

SCHEMA_VERSION = 3
# Columns version 2 added to a version 1 file (intents, and the account's identity table).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE reservations ADD COLUMN intent BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE reservations ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE reservations ADD COLUMN done TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE reservations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
)
# Version 3: leases (the leased part of a counter's reserved, and a reclaim flag; tables below).
_MIGRATE_2_TO_3 = (
    "ALTER TABLE counters ADD COLUMN leased INTEGER NOT NULL DEFAULT 0 "
    "CHECK (typeof(leased) = 'integer' AND leased >= 0)",
    "ALTER TABLE counters ADD COLUMN reclaim_until INTEGER NOT NULL DEFAULT 0 "
    "CHECK (typeof(reclaim_until) = 'integer')",
)
_PAGE = 500  # ledger rows fetched per read transaction

_SCHEMA = (
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
        -- the part of reserved leased to brokers, and until when lease holders are asked to give back
        leased       INTEGER NOT NULL DEFAULT 0 CHECK (typeof(leased) = 'integer' AND leased >= 0),
        reclaim_until INTEGER NOT NULL DEFAULT 0 CHECK (typeof(reclaim_until) = 'integer'),
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
        intent          BLOB NOT NULL DEFAULT x'',  -- the requests it may have sent: roll forward
        owner           TEXT NOT NULL DEFAULT '',   -- the broker instance that made it
        done            TEXT NOT NULL DEFAULT '{}', -- JSON {part: base64 answer} of committed parts
        attempts        INTEGER NOT NULL DEFAULT 0, -- times handed over to be rolled forward
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
    # AUTOINCREMENT: ids are never reused, so they only ever increase.
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
    # currency and units both NULL: the operator removed this limit.
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
    # Once-only markers (an alert that fired): held until expire_at_ms, then claimable again.
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
    CREATE TABLE IF NOT EXISTS leases (
        account TEXT NOT NULL,
        "key"   TEXT NOT NULL,  -- the counter
        broker  TEXT NOT NULL,
        granted INTEGER NOT NULL CHECK (typeof(granted) = 'integer' AND granted >= 0),
        PRIMARY KEY (account, "key", broker)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS lease_brokers (
        account    TEXT NOT NULL,
        broker     TEXT NOT NULL,
        seq        INTEGER NOT NULL CHECK (typeof(seq) = 'integer'),
        expires_ms INTEGER NOT NULL CHECK (typeof(expires_ms) = 'integer'),
        PRIMARY KEY (account, broker)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS identity (
        account    TEXT PRIMARY KEY,
        id         TEXT NOT NULL,
        generation INTEGER NOT NULL CHECK (typeof(generation) = 'integer')
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS blobs (
        name       TEXT PRIMARY KEY,
        data       BLOB NOT NULL,
        expires_ms INTEGER NOT NULL CHECK (typeof(expires_ms) = 'integer')
    )
    """,
)

# Primary result codes that mean "the file cannot be used right now", as opposed to a bug
# (constraint, SQL or misuse errors), which should surface as itself.
_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB,
})


def default_path() -> Path:
    """`budget.sqlite3` in the user's state directory (common.statedir)."""
    return state_dir() / "budget.sqlite3"


def _unavailable(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _UNAVAILABLE_CODES
    # Errors raised by the sqlite3 module itself carry no code; judge by the message.
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _connect(path: Path, timeout_ms: int) -> sqlite3.Connection:
    """Open (creating if needed) the file and its schema. Runs on the store's worker thread."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # isolation_level=None: the module never opens transactions behind our back.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # First, so every later statement (including the switch to WAL) waits at most this long.
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"budget store {path}: cannot use WAL journal mode (got {mode!r})")
        # FULL: a commit is fsynced before it returns, so a spend recorded (and a reservation
        # made) survives power loss too; NORMAL in WAL could lose the last commits.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"budget store {path} has schema version {version}, newer than this broker "
                    f"understands ({SCHEMA_VERSION}); upgrade ramp-broker"
                )
            if version == 1:
                for statement in _MIGRATE_1_TO_2:
                    conn.execute(statement)
            if 1 <= version <= 2:
                for statement in _MIGRATE_2_TO_3:
                    conn.execute(statement)
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(slots=True)
class _Counter:
    ref: CounterRef
    spent: int
    reserved: int
    credit: int
    count: int
    expire_at_ms: int
    leased: int = 0
    reclaim_until: int = 0

    def state(self) -> CounterState:
        return CounterState(spent=self.spent, reserved=self.reserved, credit=self.credit, count=self.count,
                            leased=self.leased)


_LEDGER_COLUMNS = (
    'account, scope, period, "window", amount, currency, original_amount, original_currency, '
    "idempotency_key, reservation_id, exchange, offer_id, uri, reserved_at_ms, committed_at_ms, kind"
)
_COUNTER_COLUMNS = (
    'scope, period, "window", currency, start_ms, end_ms, spent, reserved, credit, count, expire_at_ms, '
    "leased, reclaim_until"
)


def _counter_from_row(row: Sequence[Any]) -> _Counter:
    ref = CounterRef(scope=row[0], period=row[1], window=row[2], currency=row[3],
                     start_ms=row[4], end_ms=row[5])
    return _Counter(ref, spent=row[6], reserved=row[7], credit=row[8], count=row[9], expire_at_ms=row[10],
                    leased=row[11], reclaim_until=row[12])


class _Counters:
    """The counters one transaction touches: read once, changed in Python, written back by save()."""

    def __init__(self, conn: sqlite3.Connection, account: str) -> None:
        self._conn = conn
        self._account = account
        self._rows: dict[str, _Counter | None] = {}

    def find(self, key: str) -> _Counter | None:
        if key not in self._rows:
            row = self._conn.execute(
                f'SELECT {_COUNTER_COLUMNS} FROM counters WHERE account = ? AND "key" = ?',
                (self._account, key),
            ).fetchone()
            self._rows[key] = None if row is None else _counter_from_row(row)
        return self._rows[key]

    def get(self, ref: CounterRef, expire_at_ms: int) -> _Counter:
        counter = self.find(ref.key)
        if counter is None:
            counter = _Counter(ref, spent=0, reserved=0, credit=0, count=0, expire_at_ms=expire_at_ms)
            self._rows[ref.key] = counter
        # The latest caller's grace can only extend the counter's life, never cut it short.
        counter.expire_at_ms = max(counter.expire_at_ms, expire_at_ms)
        return counter

    def save(self) -> None:
        self._conn.executemany(
            f"""INSERT INTO counters (account, "key", {_COUNTER_COLUMNS})
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (account, "key") DO UPDATE SET
                    spent = excluded.spent, reserved = excluded.reserved, credit = excluded.credit,
                    count = excluded.count, expire_at_ms = excluded.expire_at_ms,
                    leased = excluded.leased, reclaim_until = excluded.reclaim_until""",
            [
                (self._account, key, c.ref.scope, c.ref.period, c.ref.window, c.ref.currency,
                 c.ref.start_ms, c.ref.end_ms, c.spent, c.reserved, c.credit, c.count, c.expire_at_ms,
                 c.leased, c.reclaim_until)
                for key, c in self._rows.items() if c is not None
            ],
        )


@dataclass(frozen=True, slots=True)
class _Reservation:
    id: str
    idempotency_key: str
    created_ms: int
    expires_ms: int
    holds: tuple[tuple[str, int], ...]  # what it still holds, per hold
    intent: bytes
    owner: str
    done: dict[int, bytes]
    attempts: int

    def unsettled(self, expires_ms: int | None = None, attempts: int | None = None) -> UnsettledHold:
        return UnsettledHold(
            self.id, self.idempotency_key, self.intent, self.created_ms,
            self.expires_ms if expires_ms is None else expires_ms, self.owner,
            self.attempts if attempts is None else attempts, dict(self.done))


_RESERVATION_COLUMNS = "id, idempotency_key, created_ms, expires_ms, holds, intent, owner, done, attempts"


def _load_reservation(conn: sqlite3.Connection, account: str, reservation_id: str) -> _Reservation | None:
    row = conn.execute(
        f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE account = ? AND id = ?",
        (account, reservation_id),
    ).fetchone()
    return None if row is None else _reservation_from_row(row)


def _reservation_from_row(row: Sequence[Any]) -> _Reservation:
    holds: list[tuple[str, int]] = []
    for item in json.loads(row[4]):
        key, amount = item
        if not isinstance(key, str) or type(amount) is not int:
            raise ValueError(f"reservation {row[0]}: malformed hold {item!r}")
        holds.append((key, amount))
    done = {int(part): base64.b64decode(answer) for part, answer in json.loads(row[7]).items()}
    return _Reservation(id=row[0], idempotency_key=row[1], created_ms=row[2], expires_ms=row[3],
                        holds=tuple(holds), intent=bytes(row[5]), owner=row[6], done=done, attempts=row[8])


def _hand_over(
    conn: sqlite3.Connection, account: str, res: _Reservation, expires_ms: int, taker: str,
) -> UnsettledHold:
    """Give an unsettled reservation to the caller to roll forward, with a lease on it. The taker
    owns it from now on: a restart of the broker that made it must not reclaim it any more."""
    owner = taker or res.owner
    conn.execute(
        "UPDATE reservations SET expires_ms = ?, attempts = attempts + 1, owner = ? "
        "WHERE account = ? AND id = ?", (expires_ms, owner, account, res.id))
    return replace(res, owner=owner).unsettled(expires_ms, res.attempts + 1)


def _identity_problem(conn: sqlite3.Connection, account: str, expected: StoreIdentity | None) -> str | None:
    """Why the account's data is not what the caller has seen of it, if it is not."""
    if expected is None:
        return None
    found = _identity(conn, account)
    if found is None:
        return "the store has no identity for this account (emptied, or a new store)"
    if found.id != expected.id:
        return f"the store's identity is {found.id}, not {expected.id} (another store)"
    if found.generation < expected.generation:
        return (f"the store is at generation {found.generation}, older than generation "
                f"{expected.generation} seen before (restored from an older copy)")
    return None


def _identity(conn: sqlite3.Connection, account: str) -> StoreIdentity | None:
    row = conn.execute("SELECT id, generation FROM identity WHERE account = ?", (account,)).fetchone()
    return None if row is None else StoreIdentity(row[0], row[1])


def _below_floor(counters: _Counters, holds: Sequence[Hold]) -> str | None:
    for hold in holds:
        counter = counters.find(hold.counter.key)
        spent = 0 if counter is None else counter.spent
        if spent < hold.floor:
            return (f"counter {hold.counter.key} shows {spent} spent, below the {hold.floor} "
                    "seen before")
    return None


def _refund(conn: sqlite3.Connection, account: str, counters: _Counters, res: _Reservation) -> None:
    """Give back every amount the reservation holds and forget it (and its key, if still open)."""
    for key, amount in res.holds:
        counter = counters.find(key)
        # A counter is only dropped at reserved == 0, so it is missing only for a 0 hold.
        if counter is not None:
            counter.reserved = max(0, counter.reserved - amount)
    conn.execute("DELETE FROM reservations WHERE account = ? AND id = ?", (account, res.id))
    # Only the key's *open* record for this very reservation: a committed record must stay.
    conn.execute(
        "DELETE FROM idempotency WHERE account = ? AND \"key\" = ? AND state = 'open' AND reservation_id = ?",
        (account, res.idempotency_key, res.id),
    )


def _limits_version(conn: sqlite3.Connection, account: str) -> int:
    row = conn.execute("SELECT version FROM limits_version WHERE account = ?", (account,)).fetchone()
    return 0 if row is None else int(row[0])


def _refused(
    conn: sqlite3.Connection, account: str, identity: StoreIdentity | None, limits_version: int,
) -> Lost | StaleLimits | None:
    """A write checked against what the broker has seen: the store's identity, then the limits."""
    lost = _identity_problem(conn, account, identity)
    if lost is not None:
        return Lost(lost)
    version = _limits_version(conn, account)
    return StaleLimits(version) if version != limits_version else None


def _idempotency(conn: sqlite3.Connection, account: str, key: str) -> tuple[str, str, bytes | None] | None:
    row = conn.execute(
        'SELECT state, reservation_id, result FROM idempotency WHERE account = ? AND "key" = ?',
        (account, key),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _settle_key(conn: sqlite3.Connection, account: str, key: str, reservation_id: str, result: bytes) -> None:
    conn.execute(
        "INSERT INTO idempotency (account, \"key\", state, reservation_id, result) "
        "VALUES (?, ?, 'committed', ?, ?) "
        "ON CONFLICT (account, \"key\") DO UPDATE SET state = 'committed', "
        "reservation_id = excluded.reservation_id, result = excluded.result",
        (account, key, reservation_id, result),
    )


def _spend(
    conn: sqlite3.Connection, account: str, counters: _Counters, holds: Sequence[Hold], lines: Sequence[Line],
    *, idempotency_key: str, reservation_id: str, reserved_at_ms: int, now_ms: int, kind: str,
    count: bool = True,
) -> list[int]:
    """spent += the lines on each hold's counter (count += 1 with `count`), ledger rows; returns
    spend per hold."""
    per_hold = [0] * len(holds)
    for line in lines:
        per_hold[line.hold_index] += line.amount
    for hold, amount in zip(holds, per_hold, strict=True):
        counter = counters.get(hold.counter, hold.expire_at_ms)
        counter.spent += amount
        counter.count += int(count)
    rows = []
    for line in lines:
        ref = holds[line.hold_index].counter
        rows.append((account, ref.scope, ref.period, ref.window, line.amount, ref.currency,
                     line.original_amount, line.original_currency, idempotency_key, reservation_id,
                     line.exchange, line.offer_id, line.uri, reserved_at_ms, now_ms, kind))
    conn.executemany(
        f"INSERT INTO ledger ({_LEDGER_COLUMNS}) VALUES ({', '.join('?' * 16)})", rows
    )
    return per_hold


def _granted(conn: sqlite3.Connection, account: str, key: str, broker: str) -> int:
    row = conn.execute('SELECT granted FROM leases WHERE account = ? AND "key" = ? AND broker = ?',
                       (account, key, broker)).fetchone()
    return 0 if row is None else int(row[0])


def _grants(
    conn: sqlite3.Connection, account: str, broker: str, counters: _Counters, asks: Sequence[LeaseAsk],
    now_ms: int,
) -> tuple[LeaseGrant, ...]:
    out = []
    for ask in asks:
        key = ask.hold.counter.key
        counter = counters.find(key)
        holders = conn.execute('SELECT COUNT(*) FROM leases WHERE account = ? AND "key" = ? AND granted > 0',
                               (account, key)).fetchone()[0]
        out.append(LeaseGrant(
            granted=_granted(conn, account, key, broker),
            state=CounterState() if counter is None else counter.state(), holders=int(holders),
            reclaim=counter is not None and counter.reclaim_until > now_ms))
    return tuple(out)


def _check_holds(holds: Sequence[Hold]) -> None:
    for i, hold in enumerate(holds):
        if hold.amount < 0:
            raise ValueError(f"holds[{i}].amount is negative ({hold.amount})")


def _check_lines(holds: Sequence[Hold], lines: Sequence[Line]) -> None:
    for i, line in enumerate(lines):
        if not 0 <= line.hold_index < len(holds):
            raise ValueError(f"lines[{i}].hold_index {line.hold_index} names no hold (have {len(holds)})")


def _ledger_entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(
        # Zero-padded so that the ids sort as strings in the order they were assigned.
        id=f"{row[0]:019d}", account=row[1], scope=row[2], period=row[3], window=row[4], amount=row[5],
        currency=row[6], original_amount=row[7], original_currency=row[8], idempotency_key=row[9],
        reservation_id=row[10], exchange=row[11], offer_id=row[12], uri=row[13], reserved_at_ms=row[14],
        committed_at_ms=row[15], kind=row[16],
    )


@dataclass(frozen=True, slots=True)
class _Failed:
    """A write operation of a group commit that raised: its error, for its caller alone."""

    error: Exception


class SqliteStore:
    """budget.stores.contract.Store on one SQLite file. Open with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._conn = conn
        # One worker: the connection lives on it, and it runs transactions one after another.
        self._executor = executor
        self._closed = False
        # Write operations waiting for the next group commit, and the task that runs them.
        self._writes: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._drain: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, timeout_ms: int = 1000) -> SqliteStore:
        """Open or create the store at `path` (and its directory). Raises StoreUnavailable."""
        if timeout_ms < 0:
            raise ValueError(f"timeout_ms must be >= 0, got {timeout_ms}")
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramp-budget-sqlite")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, _connect, path, timeout_ms)
        except StoreUnavailable:
            executor.shutdown(wait=False)
            raise
        except (OSError, sqlite3.Error) as e:
            executor.shutdown(wait=False)
            raise StoreUnavailable(f"cannot open budget store {path}: {e}") from e
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, conn, executor)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            out = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # The original error is what matters; a failed rollback ends with the connection.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return out

    def _group(self, fns: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """Group commit: write operations queued together run in one transaction, each inside its
        own savepoint (one that raises is rolled back alone: the others stand), with one COMMIT
        and so one fsync for all. Each one's outcome (or _Failed) is known only after the COMMIT.
        If the transaction itself fails, nothing of it was written and every operation fails."""
        if len(fns) == 1:
            try:
                return [self._transaction(fns[0], True)]
            except Exception as exc:
                return [_Failed(exc)]

        def each_in_a_savepoint(conn: sqlite3.Connection) -> list[Any]:
            outcomes: list[Any] = []
            for fn in fns:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append(fn(conn))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append(_Failed(exc))
                conn.execute("RELEASE op")
            return outcomes

        try:
            return self._transaction(each_in_a_savepoint, True)
        except Exception as exc:  # the transaction itself failed (rolled back): so did every operation
            return [_Failed(exc)] * len(fns)

    async def _drain_writes(self) -> None:
        """Run the queued write operations, a group commit at a time, until none is left: those
        queued while one runs go together in the next (on a busy broker, one fsync for many
        purchases instead of one each: the store's ceiling was one fsync per operation)."""
        loop = asyncio.get_running_loop()
        try:
            while self._writes:
                batch = [(fn, done) for fn, done in self._writes if not done.done()]  # gone: skipped
                self._writes = []
                if not batch:
                    continue
                fns = [fn for fn, _ in batch]
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._group, fns)
                except asyncio.CancelledError:
                    for _, done in batch:
                        done.cancel()
                    raise
                except Exception as exc:  # not run at all (the worker is gone): all hear it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(StoreUnavailable(f"budget store {self.path}: {exc}"))
                    continue  # and the writes queued meanwhile are tried (and told) too
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue  # its caller stopped waiting (the operation stands, as before)
                    if isinstance(outcome, _Failed):
                        done.set_exception(outcome.error)
                    else:
                        done.set_result(outcome)
        finally:
            self._drain = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self._closed:
            raise StoreUnavailable(f"budget store {self.path} is closed", not_sent=True)
        loop = asyncio.get_running_loop()
        try:
            if not write:
                return await loop.run_in_executor(self._executor, self._transaction, fn, write)
            done: asyncio.Future[T] = loop.create_future()
            self._writes.append((fn, done))
            if self._drain is None:
                self._drain = asyncio.create_task(self._drain_writes())
            return await done
        except sqlite3.Error as e:
            if _unavailable(e):
                # Busy or locked: the transaction was rolled back, so nothing of it happened.
                raise StoreUnavailable(f"budget store {self.path}: {e}", not_sent=True) from e
            raise

    # --- reservations -----------------------------------------------------------------

    async def reserve(
        self, account: str, holds: Sequence[Hold], *, ttl_ms: int, idempotency_key: str,
        now_ms: int, limits_version: int, intent: bytes = b"", owner: str = "",
        identity: StoreIdentity | None = None,
    ) -> ReserveOutcome:
        _check_holds(holds)
        holds = tuple(holds)
        intent = bytes(intent)

        def run(conn: sqlite3.Connection) -> ReserveOutcome:
            refused = _refused(conn, account, identity, limits_version)
            if refused is not None:
                return refused
            counters = _Counters(conn, account)
            known = _idempotency(conn, account, idempotency_key)
            if known is not None:
                state, reservation_id, result = known
                if state == "committed":
                    return Settled(bytes(result or b""))
                previous = _load_reservation(conn, account, reservation_id)
                if previous is not None and previous.expires_ms > now_ms:
                    return InFlight(reservation_id)
                if previous is not None and previous.intent:
                    # It may have reached an Exchange: never refunded, never re-planned.
                    return Unsettled(_hand_over(conn, account, previous, now_ms + ttl_ms, owner))
                if previous is not None:
                    _refund(conn, account, counters, previous)
                # (An open record without its reservation is overwritten below.)
            lost = _below_floor(counters, holds)
            if lost is not None:
                counters.save()  # a refund above was due whatever happens next
                return Lost(lost)
            # Two holds on one counter must fit together, so check against what is already asked.
            asked: dict[str, int] = {}
            for i, hold in enumerate(holds):
                key = hold.counter.key
                current = counters.find(key)
                state_now = CounterState() if current is None else current.state()
                wanted = asked.get(key, 0) + hold.amount
                if state_now.spent + state_now.reserved + wanted > hold.limit + state_now.credit:
                    if current is not None and current.leased:
                        # Budget sits in brokers' leases while a purchase is denied: ask them back.
                        current.reclaim_until = max(current.reclaim_until, now_ms + RECLAIM_MS)
                    # Any refund above is kept: it was due whatever this purchase does.
                    counters.save()
                    return Denied(i, state_now)
                asked[key] = wanted
            for hold in holds:
                counters.get(hold.counter, hold.expire_at_ms).reserved += hold.amount
            counters.save()
            reservation_id = new_id()
            expires = now_ms + ttl_ms
            conn.execute(
                "INSERT INTO reservations (account, id, idempotency_key, created_ms, expires_ms, holds, "
                "intent, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (account, reservation_id, idempotency_key, now_ms, expires,
                 json.dumps([[h.counter.key, h.amount] for h in holds], separators=(",", ":")),
                 intent, owner),
            )
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (account, \"key\", state, reservation_id, result) "
                "VALUES (?, ?, 'open', ?, NULL)",
                (account, idempotency_key, reservation_id),
            )
            return Reserved(reservation_id, expires)

        return await self._run(run, write=True)

    async def commit(
        self, account: str, reservation_id: str, holds: Sequence[Hold], lines: Sequence[Line], *,
        idempotency_key: str, result: bytes, now_ms: int, part: int = 0, release: Sequence[int] = (),
        final: bool = True, identity: StoreIdentity | None = None, parts: int = 1,
        nothing_charged: Sequence[int] = (),
    ) -> Committed:
        _check_lines(holds, lines)
        holds, lines, release = tuple(holds), tuple(lines), tuple(release)
        if release and len(release) != len(holds):
            raise ValueError(f"release has {len(release)} amounts for {len(holds)} holds")

        def run(conn: sqlite3.Connection) -> Committed:
            lost = _identity_problem(conn, account, identity)
            known = _idempotency(conn, account, idempotency_key)
            counters = _Counters(conn, account)
            if lost is None and known is not None and known[0] == "committed":
                # Counted already (by another broker rolling it forward): what is still held goes back.
                stale = _load_reservation(conn, account, reservation_id)
                if stale is not None:
                    _refund(conn, account, counters, stale)
                    counters.save()
                return Committed(overage=(0,) * len(holds), duplicate=True)
            lost = lost or _below_floor(counters, holds)
            if lost is not None:
                raise StoreLost(f"budget store {self.path}: {lost}")
            res = _load_reservation(conn, account, reservation_id)
            if final and res is not None:
                # A final commit settles only the parts it is told about (see Store.commit).
                settled = {part, *res.done, *nothing_charged}
                unsettled = tuple(p for p in range(parts) if p not in settled)
                if unsettled:
                    return Committed(overage=(0,) * len(holds), unsettled_parts=unsettled)
            spent = [0] * len(holds)
            # A part committed before (by another broker rolling it forward) adds, gives back and
            # records nothing again; only a final commit still ends the reservation.
            done_before = res is not None and part in res.done
            if not done_before:
                spent = _spend(conn, account, counters, holds, lines, idempotency_key=idempotency_key,
                               reservation_id=reservation_id,
                               reserved_at_ms=res.created_ms if res is not None else now_ms,
                               now_ms=now_ms, kind="commit", count=False)
            if res is None:
                # Refunded already: nothing is held any more; overage still compares with the quote.
                held = [h.amount for h in holds]
            else:
                # What this part gives back on each hold's counter (same order as reserved).
                remaining = list(res.holds)
                held = []
                for i, h in enumerate(holds):
                    has = remaining[i][1] if i < len(remaining) and remaining[i][0] == h.counter.key else 0
                    give = has if final or not release else min(has, release[i])
                    if done_before and not final:
                        give = 0
                    held.append(give)
                    if give:
                        counter = counters.find(h.counter.key)
                        if counter is not None:
                            counter.reserved = max(0, counter.reserved - give)
                        remaining[i] = (remaining[i][0], has - give)
                if final:
                    _refund(conn, account, counters, replace(res, holds=tuple(remaining)))
                elif not done_before:
                    done = {str(p): base64.b64encode(a).decode() for p, a in res.done.items()}
                    done[str(part)] = base64.b64encode(bytes(result)).decode()
                    conn.execute(
                        "UPDATE reservations SET holds = ?, done = ? WHERE account = ? AND id = ?",
                        (json.dumps([list(r) for r in remaining], separators=(",", ":")),
                         json.dumps(done, separators=(",", ":")), account, reservation_id))
            if final:
                for h in holds:
                    counters.get(h.counter, h.expire_at_ms).count += 1
                _settle_key(conn, account, idempotency_key, reservation_id, bytes(result))
            counters.save()
            after = [counters.find(h.counter.key) for h in holds]
            return Committed(
                overage=tuple(max(0, s - h) for s, h in zip(spent, held, strict=True)),
                late=res is None,
                states=tuple(c.state() if c else CounterState()
                             for c in after),
            )

        return await self._run(run, write=True)

    async def release(self, account: str, reservation_id: str, *, now_ms: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            res = _load_reservation(conn, account, reservation_id)
            if res is None:
                return False
            counters = _Counters(conn, account)
            _refund(conn, account, counters, res)
            counters.save()
            return True

        return await self._run(run, write=True)

    async def sweep(
        self, account: str, *, now_ms: int, batch: int = 100, lease_ms: int = 0, taker: str = "",
        reclaim: bool = False,
    ) -> Swept:
        def run(conn: sqlite3.Connection) -> Swept:
            rows = conn.execute(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations "
                "WHERE account = ? AND expires_ms <= ? AND intent = x'' ORDER BY expires_ms, id LIMIT ?",
                (account, now_ms, batch),
            ).fetchall()
            counters = _Counters(conn, account)
            for row in rows:
                _refund(conn, account, counters, _reservation_from_row(row))
            counters.save()
            # Holds that may have reached an Exchange: handed over to be rolled forward.
            owned = " OR owner = ?" if reclaim else ""
            taken = conn.execute(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE account = ? AND intent != x'' "
                f"AND (expires_ms <= ?{owned}) ORDER BY expires_ms, id LIMIT ?",
                (account, now_ms, *([taker] if reclaim else []), batch),
            ).fetchall()
            unsettled = []
            for row in taken:
                res = _reservation_from_row(row)
                unsettled.append(_hand_over(conn, account, res, now_ms + lease_for(lease_ms, res.attempts),
                                            taker))
            # Past their period's grace and holding nothing: reports no longer need them.
            conn.execute(
                'DELETE FROM counters WHERE account = ? AND "key" IN ('
                '  SELECT "key" FROM counters WHERE account = ? AND expire_at_ms < ? AND reserved = 0'
                "  LIMIT ?)",
                (account, account, now_ms, batch),
            )
            conn.execute(
                "DELETE FROM claims WHERE account = ? AND name IN ("
                "  SELECT name FROM claims WHERE account = ? AND expire_at_ms <= ? LIMIT ?)",
                (account, account, now_ms, batch),
            )
            conn.execute("DELETE FROM blobs WHERE expires_ms <= ?", (now_ms,))
            return Swept(len(rows), tuple(unsettled))

        return await self._run(run, write=True)

    async def holds(self, account: str) -> list[UnsettledHold]:
        def run(conn: sqlite3.Connection) -> list[UnsettledHold]:
            rows = conn.execute(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE account = ? AND intent != x'' "
                "ORDER BY created_ms, id", (account,)).fetchall()
            return [_reservation_from_row(row).unsettled() for row in rows]

        return await self._run(run, write=False)

    async def identity(self, account: str) -> StoreIdentity | None:
        return await self._run(lambda conn: _identity(conn, account), write=False)

    async def set_identity(
        self, account: str, identity: StoreIdentity, *, replace: bool = False
    ) -> StoreIdentity:
        def run(conn: sqlite3.Connection) -> StoreIdentity:
            conn.execute(
                f"INSERT {'OR REPLACE ' if replace else 'OR IGNORE '}INTO identity (account, id, generation) "
                "VALUES (?, ?, ?)", (account, identity.id, identity.generation))
            found = _identity(conn, account)
            assert found is not None
            return found

        return await self._run(run, write=True)

    async def record_spend(
        self, account: str, holds: Sequence[Hold], lines: Sequence[Line], *, idempotency_key: str,
        now_ms: int, kind: str, identity: StoreIdentity | None = None, result: bytes = b"",
    ) -> bool:
        _check_lines(holds, lines)
        holds, lines = tuple(holds), tuple(lines)

        def run(conn: sqlite3.Connection) -> bool:
            lost = _identity_problem(conn, account, identity)
            if lost is not None:
                raise StoreLost(f"budget store {self.path}: {lost}")
            known = _idempotency(conn, account, idempotency_key)
            if known is not None and known[0] == "committed":
                return False
            counters = _Counters(conn, account)
            reservation_id, reserved_at = "", now_ms
            if known is not None:
                # The key's own reservation, if still open, is settled by this spend.
                res = _load_reservation(conn, account, known[1])
                if res is not None:
                    _refund(conn, account, counters, res)
                    reservation_id, reserved_at = res.id, res.created_ms
            _spend(conn, account, counters, holds, lines, idempotency_key=idempotency_key,
                   reservation_id=reservation_id, reserved_at_ms=reserved_at, now_ms=now_ms, kind=kind)
            counters.save()
            _settle_key(conn, account, idempotency_key, reservation_id, bytes(result))
            return True

        return await self._run(run, write=True)

    # --- leases ---------------------------------------------------------------------------

    async def lease(
        self, account: str, broker: str, seq: int, asks: Sequence[LeaseAsk],
        spends: Sequence[LeaseSpend], *, ttl_ms: int, now_ms: int, limits_version: int,
        identity: StoreIdentity | None = None,
    ) -> LeaseOutcome:
        holds = tuple(a.hold for a in asks)
        for spend in spends:
            _check_lines(holds, spend.lines)
        for i, ask in enumerate(asks):
            if ask.want < 0:
                raise ValueError(f"asks[{i}].want is negative ({ask.want})")

        def run(conn: sqlite3.Connection) -> LeaseOutcome:
            refused = _refused(conn, account, identity, limits_version)
            if refused is not None:
                return refused
            counters = _Counters(conn, account)
            lost = _below_floor(counters, holds)
            if lost is not None:
                return Lost(lost)
            row = conn.execute("SELECT seq FROM lease_brokers WHERE account = ? AND broker = ?",
                               (account, broker)).fetchone()
            if row is not None and seq <= row[0]:
                grants = _grants(conn, account, broker, counters, asks, now_ms)
                return Leased(grants, (), row[0], applied=False)
            duplicates: list[str] = []
            for spend in spends:
                known = _idempotency(conn, account, spend.idempotency_key)
                if known is not None and known[0] == "committed":
                    duplicates.append(spend.idempotency_key)
                    continue
                _spend(conn, account, counters, holds, spend.lines, idempotency_key=spend.idempotency_key,
                       reservation_id="", reserved_at_ms=now_ms, now_ms=now_ms, kind="lease", count=False)
                for i in {line.hold_index for line in spend.lines}:
                    counters.get(holds[i].counter, holds[i].expire_at_ms).count += 1
                _settle_key(conn, account, spend.idempotency_key, "", bytes(spend.result))
            for ask in asks:
                counter = counters.get(ask.hold.counter, ask.hold.expire_at_ms)
                old = _granted(conn, account, ask.hold.counter.key, broker)
                counter.reserved -= old
                counter.leased -= old
                room = ask.hold.limit + counter.credit - counter.spent - counter.reserved
                grant = max(0, min(ask.want, room))
                counter.reserved += grant
                counter.leased += grant
                if grant < ask.want and counter.leased > grant:
                    counter.reclaim_until = max(counter.reclaim_until, now_ms + RECLAIM_MS)
                if counter.leased == 0:
                    counter.reclaim_until = 0
                conn.execute(
                    'INSERT OR REPLACE INTO leases (account, "key", broker, granted) VALUES (?, ?, ?, ?)',
                    (account, ask.hold.counter.key, broker, grant))
            conn.execute("DELETE FROM leases WHERE account = ? AND broker = ? AND granted = 0",
                         (account, broker))
            counters.save()
            conn.execute(
                "INSERT OR REPLACE INTO lease_brokers (account, broker, seq, expires_ms) VALUES (?, ?, ?, ?)",
                (account, broker, seq, now_ms + ttl_ms))
            return Leased(_grants(conn, account, broker, counters, asks, now_ms), tuple(duplicates), seq)

        return await self._run(run, write=True)

    async def leases(self, account: str) -> list[BrokerLease]:
        def run(conn: sqlite3.Connection) -> list[BrokerLease]:
            rows = conn.execute(
                'SELECT l.broker, l.granted, b.seq, b.expires_ms, c.scope, c.period, c."window", c.currency, '
                "c.start_ms, c.end_ms FROM leases l "
                "JOIN lease_brokers b ON b.account = l.account AND b.broker = l.broker "
                'JOIN counters c ON c.account = l.account AND c."key" = l."key" '
                'WHERE l.account = ? ORDER BY l.broker, l."key"', (account,)).fetchall()
            return [BrokerLease(r[0], CounterRef(*r[4:10]), r[1], r[2], r[3]) for r in rows]

        return await self._run(run, write=False)

    async def release_leases(self, account: str, broker: str, *, as_spent: bool, now_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            counters = _Counters(conn, account)
            released = 0
            rows = conn.execute('SELECT "key", granted FROM leases WHERE account = ? AND broker = ?',
                                (account, broker)).fetchall()
            for key, granted in rows:
                counter = counters.find(key)
                if counter is None:
                    continue
                counter.reserved -= granted
                counter.leased -= granted
                if counter.leased == 0:
                    counter.reclaim_until = 0  # nobody holds a lease to give back any more
                if as_spent and granted:
                    # One line standing for the whole lease: what the broker may have spent from it.
                    ref = counter.ref
                    counter.spent += granted
                    counter.count += 1
                    conn.execute(
                        f"INSERT INTO ledger ({_LEDGER_COLUMNS}) VALUES ({', '.join('?' * 16)})",
                        (account, ref.scope, ref.period, ref.window, granted, ref.currency,
                         Money.from_units(granted, ref.currency).text(), ref.currency, f"lease:{broker}", "",
                         "", "", "", now_ms, now_ms, "lease-expired"))
                released += granted
            conn.execute("DELETE FROM leases WHERE account = ? AND broker = ?", (account, broker))
            conn.execute("DELETE FROM lease_brokers WHERE account = ? AND broker = ?", (account, broker))
            counters.save()
            return released

        return await self._run(run, write=True)

    async def claim(self, account: str, name: str, *, expire_at_ms: int, now_ms: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT expire_at_ms FROM claims WHERE account = ? AND name = ?", (account, name)
            ).fetchone()
            if row is not None and row[0] > now_ms:
                return False
            # New, or the previous claim has expired (sweep may not have removed it yet).
            conn.execute(
                "INSERT OR REPLACE INTO claims (account, name, expire_at_ms) VALUES (?, ?, ?)",
                (account, name, expire_at_ms),
            )
            return True

        return await self._run(run, write=True)

    # --- counters -------------------------------------------------------------------------

    async def read(self, account: str, counters: Sequence[CounterRef]) -> list[CounterState]:
        keys = [ref.key for ref in counters]

        def run(conn: sqlite3.Connection) -> list[CounterState]:
            out: list[CounterState] = []
            for key in keys:
                row = conn.execute(
                    'SELECT spent, reserved, credit, count, leased FROM counters '
                    'WHERE account = ? AND "key" = ?',
                    (account, key),
                ).fetchone()
                out.append(CounterState() if row is None else CounterState(*row))
            return out

        return await self._run(run, write=False)

    async def add_credit(self, account: str, counter: CounterRef, amount: int, *, expire_at_ms: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            counters = _Counters(conn, account)
            counters.get(counter, expire_at_ms).credit += amount
            counters.save()

        await self._run(run, write=True)

    async def overwrite_spent(self, account: str, counter: CounterRef, spent: int, count: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            counters = _Counters(conn, account)
            # No grace is known here; a new row lives at least to its period's end.
            row = counters.get(counter, counter.end_ms)
            row.spent, row.count = spent, count
            counters.save()

        await self._run(run, write=True)

    async def counters(self, account: str) -> AsyncIterator[tuple[CounterRef, CounterState]]:
        def run(conn: sqlite3.Connection) -> list[_Counter]:
            rows = conn.execute(
                f'SELECT {_COUNTER_COLUMNS} FROM counters WHERE account = ? ORDER BY "key"', (account,)
            ).fetchall()
            return [_counter_from_row(row) for row in rows]

        # An account has few counters: one snapshot, so the numbers are mutually consistent.
        for counter in await self._run(run, write=False):
            yield counter.ref, counter.state()

    # --- limits -----------------------------------------------------------------------------

    async def limits(self, account: str) -> Limits:
        def run(conn: sqlite3.Connection) -> Limits:
            values: dict[tuple[str, str], tuple[str, int] | None] = {}
            for scope, period, currency, units in conn.execute(
                "SELECT scope, period, currency, units FROM limits WHERE account = ?", (account,)
            ):
                values[(scope, period)] = None if currency is None else (currency, units)
            return Limits(version=_limits_version(conn, account), values=values)

        return await self._run(run, write=False)

    async def set_limit(
        self, account: str, scope: str, period: str, value: tuple[str, int] | None
    ) -> int:
        currency, units = value if value is not None else (None, None)

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT OR REPLACE INTO limits (account, scope, period, currency, units) "
                "VALUES (?, ?, ?, ?, ?)",
                (account, scope, period, currency, units),
            )
            version = _limits_version(conn, account) + 1
            conn.execute(
                "INSERT OR REPLACE INTO limits_version (account, version) VALUES (?, ?)", (account, version)
            )
            return version

        return await self._run(run, write=True)

    # --- ledger -----------------------------------------------------------------------------

    def _ledger_page(
        self, account: str, scope: str | None, after: int, conn: sqlite3.Connection
    ) -> list[LedgerEntry]:
        if scope is None:
            query = (
                f"SELECT id, {_LEDGER_COLUMNS} FROM ledger WHERE account = ? AND id > ? ORDER BY id LIMIT ?"
            )
            params: tuple[object, ...] = (account, after, _PAGE)
        else:
            query = (
                f"SELECT id, {_LEDGER_COLUMNS} FROM ledger "
                "WHERE account = ? AND scope = ? AND id > ? ORDER BY id LIMIT ?"
            )
            params = (account, scope, after, _PAGE)
        return [_ledger_entry(row) for row in conn.execute(query, params)]

    async def ledger(self, account: str, *, scope: str | None = None) -> AsyncIterator[LedgerEntry]:
        # Page by id, one short read each: the ledger may be long, and the caller may use the store
        # between entries. Rows are append-only with increasing ids, so no entry is missed or repeated.
        after = 0
        while True:
            page = await self._run(functools.partial(self._ledger_page, account, scope, after), write=False)
            for entry in page:
                yield entry
            if len(page) < _PAGE:
                return
            after = int(page[-1].id)

    # --- blobs ------------------------------------------------------------------------------

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO blobs (name, data, expires_ms) VALUES (?, ?, ?)",
                (name, bytes(data), now_ms + ttl_ms),
            )

        await self._run(run, write=True)

    async def settled(self, account: str, idempotency_key: str) -> bytes | None:
        def run(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT result FROM idempotency WHERE account = ? AND \"key\" = ? AND state = 'committed'",
                (account, idempotency_key),
            ).fetchone()
            return None if row is None else bytes(row[0] or b"")

        return await self._run(run, write=False)

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        def run(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data, expires_ms FROM blobs WHERE name = ?", (name,)).fetchone()
            return None if row is None or row[1] <= now_ms else bytes(row[0])

        return await self._run(run, write=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Queued behind any transaction still running, so those finish first.
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._drain)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=False)
