"""The fail-open journal: spends made while the store was unreachable.

An append-only file of JSON lines, fsynced before the purchase's answer is
sent. Each spend has an id; once the store has recorded it (idempotently, under
the purchase's own idempotency key), an ack line follows. A crash between the two
only means the spend is offered to the store again, which records it once. When
everything is acknowledged the file is truncated.

A purchase on the fail-open allowance journals its *intent* first (the requests it
is about to send, budget.durability.intents), fsynced before any Exchange is called, and
acknowledges it once its spend is journaled. An intent still pending at start was
cut off (a crash between the Exchange's charge and the spend entry): it is rolled
forward (re-sent under its key, answered from the Exchange's dedupe record) and
its spend recorded, so the allowance never loses count of a charge.

The purchase's key, not the entry's id: the Exchange charges a key once, so the
store must count it once too, whether this broker's commit landed after all
(its answer lost to a timeout), another broker journaled a retry of the same key
during the outage, or committed one after it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from budget.durability import jsonl
from budget.durability.durable import sync_data, sync_directory
from budget.stores.contract import CounterRef, Hold, Line, counter_record
from common.ids import new_id

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: str
    account: str
    idempotency_key: str
    holds: tuple[Hold, ...]
    lines: tuple[Line, ...]
    at_ms: int
    intent: bytes = b""  # an intent entry (no lines yet): roll it forward if it is still pending
    result: bytes = b""  # the purchase's stored answer (a retry of its key is shown it), if known

    @property
    def store_key(self) -> str:
        """The key the store records this spend under, once: the purchase's idempotency key."""
        return self.idempotency_key


def _hold_record(h: Hold) -> dict[str, Any]:
    """dataclasses.asdict(h), built directly: asdict deep-copies field by field, on every purchase."""
    return {"counter": counter_record(h.counter),
            "amount": h.amount, "limit": h.limit, "expire_at_ms": h.expire_at_ms, "floor": h.floor}


def _line_record(ln: Line) -> dict[str, Any]:
    """dataclasses.asdict(ln), built directly."""
    return {"hold_index": ln.hold_index, "amount": ln.amount, "original_amount": ln.original_amount,
            "original_currency": ln.original_currency, "exchange": ln.exchange, "offer_id": ln.offer_id,
            "uri": ln.uri}


def _hold(d: dict[str, Any]) -> Hold:
    return Hold(counter=CounterRef(**d["counter"]), amount=d["amount"], limit=d["limit"],
                expire_at_ms=d["expire_at_ms"])


# Writes go out on the event loop itself while they take less than this on average (an fsync on
# an SSD: a hop to a thread and back cost the broker more CPU than the write, and the purchase
# waiting on it milliseconds, the thread waiting for the GIL behind the busy loop); on a slower
# disk they go to a thread, so the loop does not wait on the disk.
INLINE_BELOW_S = 0.002
INLINE_RETRY_S = 10.0
# How long a record nobody waits for (durable=False) may stay queued when no write comes to take
# it along: under load the next purchase's intent carries it out within milliseconds.
LAZY_FLUSH_S = 0.05


class Journal:
    """The journal file. Writes are group-committed: every append or ack made while a write is
    under way goes out in the next one, with a single fsync, and each returns once its own
    record is on disk. What `pending()` shows is updated at once (a record may be in it shortly
    before it is durable: a crash then only means the spend is offered to the store again, or
    an ack written again).

    `durable=False`: the record is queued behind every record before it and the caller goes on;
    it reaches the disk with the next write (at most LAZY_FLUSH_S later). Only for records whose
    loss in a crash is already recovered: a lease spend whose intent is on disk (the intent is
    rolled forward: the Exchange answers from its dedupe record) and acks (the spend is reported
    again; the store counts its key once)."""

    def __init__(
        self, path: Path, lazy_flush_s: float = LAZY_FLUSH_S, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._monotonic = monotonic
        self._lazy_flush_s = lazy_flush_s
        self._lazy: asyncio.TimerHandle | None = None
        self._write_s = 0.0  # how long a write on the loop takes (with its fsync): see _timed
        self._inline_again_at = 0.0  # monotonic: while writes are slow, when to try the loop again
        self._pending: dict[str, JournalEntry] = {}
        self._lines: list[bytes] = []  # for the next write
        self._truncate = False  # the next write starts the file afresh (everything was acked)
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._file: BinaryIO | None = None  # kept open between writes (only the writer task uses it)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for raw in self.path.read_bytes().splitlines():
            try:
                d = jsonl.loads(raw)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash mid-write: that spend was never answered
            if "ack" in d:
                self._pending.pop(d["ack"], None)
                continue
            if "settles" in d:
                self._pending.pop(d["settles"], None)
            self._pending[d["id"]] = JournalEntry(
                id=d["id"], account=d["account"], idempotency_key=d["idempotency_key"],
                holds=tuple(_hold(h) for h in d["holds"]),
                lines=tuple(Line(**ln) for ln in d["lines"]), at_ms=d["at_ms"],
                intent=base64.b64decode(d.get("intent", "")), result=base64.b64decode(d.get("result", "")),
            )

    def pending(self) -> list[JournalEntry]:
        return list(self._pending.values())

    async def append(
        self, account: str, idempotency_key: str, holds: tuple[Hold, ...], lines: tuple[Line, ...],
        at_ms: int, intent: bytes = b"", result: bytes = b"", settles: str | None = None,
        durable: bool = True,
    ) -> JournalEntry:
        """Journal a spend (or, with `intent`, a purchase about to be sent). `settles`: the intent
        this spend ends, acknowledged in the same write. `durable=False`: see the class."""
        entry = JournalEntry(new_id(), account, idempotency_key, holds, lines, at_ms, intent, result)
        record = {"id": entry.id, "account": account, "idempotency_key": idempotency_key,
                  "holds": [_hold_record(h) for h in holds], "lines": [_line_record(ln) for ln in lines],
                  "at_ms": at_ms, **({"intent": base64.b64encode(intent).decode()} if intent else {}),
                  **({"result": base64.b64encode(result).decode()} if result else {}),
                  **({"settles": settles} if settles else {})}
        self._pending[entry.id] = entry
        if settles:
            self._pending.pop(settles, None)
        await self._persist([jsonl.dumps(record)], durable)
        return entry

    async def ack(self, *entry_ids: str, durable: bool = True) -> None:
        """The entries are recorded elsewhere (or came to nothing): one write for all of them."""
        if not entry_ids:
            return
        for entry_id in entry_ids:
            self._pending.pop(entry_id, None)
        await self._persist([jsonl.dumps({"ack": e}) for e in entry_ids], durable)

    async def flush(self) -> None:
        """Every record queued so far is on disk when this returns."""
        if self._lines or self._truncate or self._writer is not None:
            await self._persist([], True)

    async def _persist(self, lines: list[bytes], durable: bool = True) -> None:
        """Queue `lines` (or, with nothing pending any more, a fresh start) for the next write,
        and wait until it is on disk (durable), or have it written soon (not durable)."""
        if self._pending:
            self._lines += lines
        else:
            self._lines, self._truncate = [], True
        if not durable:
            if self._writer is None and self._lazy is None:
                self._lazy = asyncio.get_running_loop().call_later(self._lazy_flush_s, self._start_writer)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._start_writer()
        await waiter

    def _start_writer(self) -> None:
        self._cancel_lazy()
        if self._writer is None and (self._waiters or self._lines or self._truncate):
            self._writer = asyncio.create_task(self._write_queued())

    def _cancel_lazy(self) -> None:
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None

    def _take_queued(self) -> tuple[list[bytes], bool]:
        """What the next write writes (lines, and whether it starts the file afresh); the queue
        starts empty again."""
        lines, truncate = self._lines, self._truncate
        self._lines, self._truncate = [], False
        return lines, truncate

    async def _write_queued(self) -> None:
        try:
            while self._waiters or self._lines or self._truncate:
                waiters, self._waiters = self._waiters, []
                lines, truncate = self._take_queued()
                try:
                    if self._write_s < INLINE_BELOW_S or self._monotonic() >= self._inline_again_at:
                        started = time.perf_counter()
                        try:
                            self._write(lines, truncate)
                        finally:
                            self._timed(time.perf_counter() - started)
                    else:
                        await asyncio.to_thread(self._write, lines, truncate)
                except Exception as exc:  # the disk refused: every caller of this write hears of it
                    if not waiters:  # only records nobody waits for: a crash would lose them too
                        log.warning("journal %s: a write failed (%s); its records are recovered as after "
                                    "a crash", self.path, exc)
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                except BaseException:
                    for w in waiters:
                        w.cancel()
                    raise
                else:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            self._writer = None

    def _timed(self, took: float) -> None:
        """A write on the loop took `took` seconds: into the moving average; while that is slow,
        writes go to a thread, and one is tried on the loop again every INLINE_RETRY_S. (Only
        writes on the loop are timed: on a thread, the time includes waiting for the GIL behind
        the loop.)"""
        if self._write_s >= INLINE_BELOW_S:
            self._write_s = took  # a try after a spell on the thread starts afresh
        else:
            self._write_s += (took - self._write_s) / 8
        if self._write_s >= INLINE_BELOW_S:
            self._inline_again_at = self._monotonic() + INLINE_RETRY_S

    def _write(self, lines: list[bytes], truncate: bool) -> None:
        if self._file is None or truncate:
            self._close_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._file = self.path.open("wb" if truncate else "ab")
            if created:
                sync_directory(self.path.parent)  # the file's name must survive a power cut too
        f = self._file
        try:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            sync_data(f.fileno())
        except BaseException:
            self._close_file()  # the next write reopens: nothing half-known is kept
            raise

    def close(self) -> None:
        """Close the file between writes (a later write opens it again); a write under way keeps it.
        Records not yet written (durable=False) are written first."""
        if self._writer is None:
            if self._lines or self._truncate:
                self._cancel_lazy()
                self._write(*self._take_queued())
            self._close_file()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
