"""The shared per-period store on Redis (budget.stores.contract.Store), for several brokers of one deployment.

Key layout, for prefix `ramp` and account `acme` (the `{acme}` hash tag keeps every key of an
account in one Redis Cluster slot, so each multi-key script stays in one slot):

    ramp:{acme}:c:<scope>|<period>|<window>  hash: spent reserved credit count + scope period window
                 |<currency>                 currency start_ms end_ms (to rebuild the CounterRef)
                                             + leased (the part of reserved leased to brokers) and
                                             reclaim_until (lease holders asked to give back until)
    ramp:{acme}:r:<reservation id>           hash: ik created expires holds ("<counter> <amount> ..."),
                                             intent owner attempts done ("<part> ...") d:<part>
    ramp:{acme}:id                           hash: id gen (the account's identity; never expires)
    ramp:{acme}:exp                          zset: reservation id by expires_ms, for sweep
    ramp:{acme}:i:<idempotency key>          hash: state (open|committed) rid result
    ramp:{acme}:ledger                       stream: one entry per committed line
    ramp:{acme}:limits                       hash: "<scope>|<period>" -> "CUR units" or "-" (removed)
    ramp:{acme}:limits:v                     string: limits version (missing = 0)
    ramp:{acme}:counters                     zset: counter key by expire_at_ms, for counters()
    ramp:{acme}:k:<name>                     hash: expire_at (a claim: Store.claim)
    ramp:{acme}:lh:<counter key>             hash: broker -> its lease on the counter (> 0 only; the
                                             field count is the counter's lease holders)
    ramp:{acme}:lb:<broker>                  hash: seq expires (the broker's last lease refresh)
    ramp:{acme}:lc:<broker>                  set: counter keys the broker holds a lease on
    ramp:blob:<name>                         hash: data expires_ms (not per account)

Every change runs as one Lua script (budget/stores/lua/, each prefixed with _lib.lua), called with
EVALSHA and reloaded on NOSCRIPT, e.g. after a Redis restart. Scripts take every input as
KEYS/ARGV; the few keys they can only learn inside Redis (a reservation's counters, the
idempotency record it points back to, a broker's leased counters, a lease holder's record) are
built from the account prefix and so share its slot.

Time. Semantics use only the callers' now_ms. Key lifetimes are cleanup, and are set relative
(PEXPIRE expire_at_ms - now_ms, never shortened) rather than PEXPIREAT: with an injected clock
behind Redis's own, an absolute time in Redis's past would delete a live counter at once.

Money. Values travel as decimal strings and HINCRBY does the arithmetic, so any signed 64-bit
amount is exact (the scripts compare by splitting values, never through Lua's doubles).
Inputs outside 64 bits raise ValueError before anything is sent. A counter that a commit would
push past 2^63 - 1 fails in Redis, mid-script; at nano-units that is 9.2e9 currency units.

Failures. Every call runs under socket timeouts of timeout_ms and an asyncio deadline just
above it; a connection error, a timeout or a server that is loading/read-only/out of memory
raises StoreUnavailable. redis-py's own retries are off. Reads retry once on a connection error
(a pooled connection that a restart closed). `reserve` retries once too: its reservation id is
generated here, so if the first attempt did land, the second finds the key open under our own
id and reports it as Reserved. Other writes are never retried.

Durability. With wait_replicas > 0, every write script is followed on its connection by
`WAIT wait_replicas <timeout_ms / 2>`, and a write that fewer replicas acknowledged in time raises
StoreUnavailable (it may still have landed: what a lost reply means already, see Failures). Without
it a primary that dies may take its last writes with it (replication is asynchronous); brokers
that saw them notice (their floors) and refuse the account until an operator adopts the store.

Coalescing. Concurrent `reserve` (and `commit`) calls for one account are sent as one EVALSHA
that processes them in arrival order, each exactly as if alone: up to MAX_IN_FLIGHT batches of
at most MAX_BATCH go out at once, and callers arriving meanwhile form the next ones.

Leases. `lease`, `leases` and `release_leases` are one script each (lease.lua, leases.lua,
release_leases.lua). A lease counts in its counter's reserved and leased. An lh hash lives as long
as its counter, a broker's lb and lc at least as long as the counters it asked for and at least a
day (like idempotency records; TTLs relative and only ever extended): the store never expires a
lease (sweep does not touch them), it is only given back by its broker or released by an operator.
`leases` walks the account's counter index.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Self, TypeVar, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from budget.stores.contract import (
    LEASE_DOUBLINGS,
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
)
from common.ids import new_id

MAX_BATCH: Final = 16
MAX_IN_FLIGHT: Final = 4
_INT64_MAX: Final = 2**63 - 1
_HOUR_MS: Final = 3_600_000
_DAY_MS: Final = 86_400_000
# A counter written after its expire_at_ms (a late commit) still lives this long.
_MIN_COUNTER_TTL_MS: Final = _HOUR_MS
# Idempotency results outlive the counters they charged by at least this.
_MIN_IDEMPOTENCY_TTL_MS: Final = _DAY_MS
# Reservations and their open records carry a safety TTL well past any sweep.
_RESERVATION_SLACK_MS: Final = _DAY_MS
# A claim's key outlives its expire_at (by the caller's clock) by this much, so a broker whose
# clock lags still finds it.
_CLAIM_SLACK_MS: Final = _HOUR_MS
# overwrite_spent creates a counter that lives this long past its window's end.
_REPAIR_GRACE_MS: Final = 7 * _DAY_MS
_LEDGER_PAGE: Final = 500
_COUNTERS_PAGE: Final = 200
# The asyncio deadline sits a little above the socket timeouts so theirs is the error we see.
_DEADLINE_SLACK_S: Final = 0.05
# Redis refusals that mean "not now" rather than "wrong request".
_UNAVAILABLE_REPLIES: Final = ("LOADING", "BUSY", "OOM", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN",
                               "CLUSTERDOWN", "READONLY")

_SCRIPTS: Final = ("reserve", "commit", "release", "sweep", "record_spend", "set_limit", "add_credit",
                   "overwrite_spent", "prune_counters", "claim", "set_identity", "lease", "leases",
                   "release_leases", "read", "limits")
# Scripts that change nothing: no WAIT after them.
_READ_ONLY: Final = frozenset({"leases", "read", "limits"})
# Redis Cluster client errors that mean "no node answers for that slot now", not a wrong request.
_CLUSTER_UNREACHABLE: Final = ("Redis Cluster cannot be connected", "All slots are not covered")
# Fields of a LeaseGrant in lease.lua's reply: granted, spent, reserved, credit, count, leased,
# holders, reclaim.
_GRANT_FIELDS: Final = 8
# Fields of one lease in leases.lua's reply.
_LEASE_FIELDS: Final = 10

T = TypeVar("T")
Req = TypeVar("Req")
Out = TypeVar("Out")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Script:
    name: str
    text: bytes
    sha: str = ""


def _load_scripts() -> dict[str, _Script]:
    folder = importlib.resources.files("budget.stores").joinpath("lua")
    lib = folder.joinpath("_lib.lua").read_bytes()
    return {name: _Script(name, lib + b"\n" + folder.joinpath(f"{name}.lua").read_bytes())
            for name in _SCRIPTS}


def _int64(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise ValueError(f"{what} {value} does not fit in 64 bits")
    return str(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | TimeoutError | OSError | ReadOnlyError
                  | ClusterError | SlotNotCoveredError):
        return True
    if isinstance(exc, RedisClusterException) and str(exc).startswith(_CLUSTER_UNREACHABLE):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


def _never_sent(exc: BaseException) -> bool:
    """The command never left this client: no connection could be made or had (redis-py's own
    messages for a refused or timed-out connect and an exhausted pool). Anything later (a timeout
    reading the reply, a connection dropped, a WAIT short of replicas) may have run on the server."""
    text = str(exc)
    if isinstance(exc, RedisTimeoutError):
        return text.startswith("Timeout connecting")
    return isinstance(exc, RedisConnectionError) and (" connecting to " in text or text.startswith(
        ("Error connecting to", "No connection available")))


class _HiredisConnection(Connection):
    """Packs commands with hiredis (C) instead of redis-py's pure-Python packer.

    A batch of 64 reservations is a few thousand arguments; packing them in Python was about
    half of the client's CPU per reservation in bench/budget.py.
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) and " " in head:  # "SCRIPT LOAD" and the like: separate words
            args = (*head.split(), *args[1:])
        # hiredis encodes str as UTF-8, redis-py's default encoding here. (Its stub types the
        # argument as a 1-tuple; any length is accepted.)
        packed: bytes = hiredis.pack_command(cast(Any, args))
        return [packed]


class _Batcher(Generic[Req, Out]):
    """Runs submitted requests in batches, up to MAX_IN_FLIGHT batches at a time.

    A request starts a drain task at once while fewer than MAX_IN_FLIGHT run (it runs on the
    next loop turn, so requests submitted in the same turn share its batch); otherwise it waits
    for the next batch of a running drain. Several batches in flight keep both Python and Redis
    busy (one at a time left each idle while the other worked); each batch's script is still
    atomic per request, so their order does not matter. The drains run in their own tasks so a
    cancelled caller cannot strand the others; a caller that gave up before its batch was
    formed is skipped.
    """

    def __init__(
        self, run: Callable[[list[Req]], Awaitable[list[Out]]], on_idle: Callable[[], object]
    ) -> None:
        self._run = run
        self._on_idle = on_idle
        self._pending: deque[tuple[Req, asyncio.Future[Out]]] = deque()
        self.tasks: set[asyncio.Task[None]] = set()

    def submit(self, request: Req) -> asyncio.Future[Out]:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if len(self.tasks) < MAX_IN_FLIGHT:
            self._start_drain()
        return future

    def _start_drain(self) -> None:
        task = asyncio.create_task(self._drain())
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._pending and not task.cancelled():
            # Submitted after the drain's last look but before this callback, while the drain still
            # counted as running: no drain was started for it, and none would come back for it.
            self._start_drain()
        elif not self.tasks:
            self._on_idle()

    async def _drain(self) -> None:
        batch: list[tuple[Req, asyncio.Future[Out]]] = []
        try:
            while self._pending:
                batch = []
                while self._pending and len(batch) < MAX_BATCH:
                    request, future = self._pending.popleft()
                    if not future.done():
                        batch.append((request, future))
                if not batch:
                    continue
                try:
                    outcomes = await self._run([request for request, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(_copy(exc))
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        except asyncio.CancelledError:
            # The store is closing: nobody will answer these callers.
            for _, future in (*batch, *self._pending):
                if not future.done():
                    future.set_exception(StoreUnavailable("redis: the store was closed"))
            self._pending.clear()
            raise


def _copy(exc: Exception) -> Exception:
    """One exception per waiting caller (each raise extends the object's traceback)."""
    if isinstance(exc, StoreUnavailable):
        fresh = StoreUnavailable(*exc.args, not_sent=exc.not_sent)
        fresh.__cause__ = exc.__cause__
        return fresh
    return exc


@dataclass(frozen=True, slots=True)
class _ReserveRequest:
    rid: str
    holds: Sequence[Hold]
    ttl_ms: int
    idempotency_key: str
    now_ms: int
    limits_version: int
    intent: bytes
    owner: str
    identity: StoreIdentity | None


@dataclass(frozen=True, slots=True)
class _CommitRequest:
    rid: str
    holds: Sequence[Hold]
    lines: Sequence[Line]
    idempotency_key: str
    result: bytes
    now_ms: int
    part: int
    release: Sequence[int]
    final: bool
    identity: StoreIdentity | None
    parts: int
    nothing_charged: tuple[int, ...]


def _identity_args(identity: StoreIdentity | None) -> list[str]:
    return ["", "0"] if identity is None else [identity.id, str(identity.generation)]


def _unsettled(reply: Sequence[Any]) -> UnsettledHold:
    """An <unsettled_reply> of the scripts (see _lib.lua)."""
    done: dict[int, bytes] = {}
    for i in range(int(reply[7])):
        done[int(reply[8 + 2 * i])] = bytes(reply[9 + 2 * i])
    return UnsettledHold(
        reservation_id=_text(reply[0]), idempotency_key=_text(reply[1]), intent=bytes(reply[2]),
        created_ms=int(reply[3]), expires_ms=int(reply[4]), owner=_text(reply[5]),
        attempts=int(reply[6]), done=done)


class RedisStore:
    """budget.stores.contract.Store on one Redis server (or Cluster-ready keys; see the module docstring)."""

    def __init__(
        self, client: Redis | RedisCluster, *, timeout_ms: int = 250, prefix: str = "ramp",
        wait_replicas: int = 0,
    ) -> None:
        """Prefer `open`. A client given here must return bytes (decode_responses off) and should
        have socket timeouts of timeout_ms and no retries of its own, as `open` sets up."""
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        if not prefix or any(c in prefix for c in "{} "):
            raise ValueError("prefix must be non-empty, without braces or spaces")
        if wait_replicas < 0:
            raise ValueError("wait_replicas must not be negative")
        self._client = client
        self._prefix = prefix
        self._wait_replicas = wait_replicas
        # WAIT gives up within half the store timeout, so its own answer (too few replicas) is what a
        # slow replica shows, not a socket timeout.
        self._wait_ms = str(max(timeout_ms // 2, 1))
        self._deadline_s = timeout_ms / 1000 + _DEADLINE_SLACK_S
        self._scripts = _load_scripts()
        self._reserve_batchers: dict[str, _Batcher[_ReserveRequest, ReserveOutcome]] = {}
        self._commit_batchers: dict[str, _Batcher[_CommitRequest, Committed | StoreLost]] = {}

    @classmethod
    async def open(
        cls, url: str, *, timeout_ms: int = 250, prefix: str = "ramp", max_connections: int = 64,
        lazy: bool = False, wait_replicas: int = 0,
    ) -> RedisStore:
        """Connect and load the scripts; StoreUnavailable if Redis does not answer in time.

        With `lazy`, an unreachable Redis is only logged: a broker must start during an outage
        (closed scopes deny, open ones spend their allowance) and scripts load on first use.
        """
        timeout_s = timeout_ms / 1000
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), client_name="ramp-broker",
            # rediss:// keeps redis-py's TLS connection class.
            **({"connection_class": _HiredisConnection} if url.startswith("redis://") else {}),
        )
        store = cls(Redis.from_pool(pool), timeout_ms=timeout_ms, prefix=prefix, wait_replicas=wait_replicas)
        return await store._started(lazy=lazy)

    async def _started(self, *, lazy: bool) -> Self:
        """Load the scripts; with `lazy`, a store that does not answer is only logged."""
        try:
            await self.load_scripts()
        except StoreUnavailable as exc:
            if not lazy:
                await self.close()
                raise
            log.warning("redis store not reachable at start (%s); carrying on", exc)
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def client(self) -> Redis | RedisCluster:
        """The underlying client (tests and admin tools)."""
        return self._client

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (done by `open`; EVALSHA reloads by itself after a restart)."""

        async def load() -> None:
            for script in self._scripts.values():
                script.sha = await self._client.script_load(script.text)

        await self._call(load, retry=True)

    async def close(self) -> None:
        batchers: list[_Batcher[Any, Any]] = [*self._reserve_batchers.values(),
                                              *self._commit_batchers.values()]
        tasks = [t for b in batchers for t in b.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    # --- keys -------------------------------------------------------------------------------

    def account_prefix(self, account: str) -> str:
        """`<prefix>:{<account>}:`: every key of the account starts with it."""
        return f"{self._prefix}:{{{account}}}:"

    def counter_key(self, account: str, counter: CounterRef) -> str:
        return f"{self.account_prefix(account)}c:{counter.key}"

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, operation: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        """Run `operation` within the deadline; StoreUnavailable on any sign Redis is not there.

        It is `not_sent` only if no attempt can have reached Redis: a first attempt that was sent
        and lost its connection may have run, whatever its retry then met (a refused connect)."""
        sent = False
        try:
            async with asyncio.timeout(self._deadline_s):
                try:
                    return await operation()
                except RedisConnectionError as first:
                    if not retry:
                        raise
                    sent = not _never_sent(first)
                    return await operation()
        except Exception as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}",
                                       not_sent=not sent and _never_sent(exc)) from exc
            raise

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        script = self._scripts[name]
        if self._wait_replicas and name not in _READ_ONLY:
            return await self._eval_durable(script, keys, args)
        if script.sha:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # a restarted or flushed server: nothing ran; load and run once
        return await self._load_and_eval(script, keys, args)

    async def _load_and_eval(self, script: _Script, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        script.sha = await self._client.script_load(script.text)
        return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def _eval_durable(self, script: _Script, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        """The script, then WAIT on the same connection (WAIT counts that connection's writes)."""
        call: list[str | bytes] = [str(len(keys)), *keys, *args]
        reply, acked = await self._then_wait(["EVALSHA", script.sha, *call] if script.sha else
                                             ["EVAL", script.text, *call], keys[0])
        if isinstance(reply, NoScriptError):  # nothing ran: send the text (Redis caches it)
            reply, acked = await self._then_wait(["EVAL", script.text, *call], keys[0])
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self._wait_replicas:
            raise StoreUnavailable(f"redis: the write reached {int(acked)} of {self._wait_replicas} replicas "
                                   f"in {self._wait_ms} ms")
        return reply

    async def _then_wait(self, command: list[str | bytes], key: str) -> tuple[Any, Any]:
        """`command` and WAIT, pipelined on one connection; each reply or its error."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.execute_command("WAIT", str(self._wait_replicas), self._wait_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
        return reply, acked

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence[str | bytes], *, retry: bool
    ) -> Any:
        return await self._call(lambda: self._eval(name, keys, args), retry=retry)

    async def _wait(self, future: asyncio.Future[T]) -> T:
        """A batched call's result, or StoreUnavailable once this caller's deadline has passed."""
        try:
            async with asyncio.timeout(self._deadline_s):
                return await future
        except TimeoutError as exc:
            raise StoreUnavailable("redis: no answer in time") from exc

    def _counter_args(self, counter: CounterRef, expire_at_ms: int, now_ms: int) -> list[str]:
        ttl = max(expire_at_ms - now_ms, _MIN_COUNTER_TTL_MS)
        return [counter.key, str(ttl), str(expire_at_ms), counter.scope, counter.period, counter.window,
                counter.currency, str(counter.start_ms), str(counter.end_ms)]

    def _line_args(self, holds: Sequence[Hold], lines: Sequence[Line]) -> list[str]:
        args: list[str] = []
        for line in lines:
            if not 0 <= line.hold_index < len(holds):
                raise ValueError(f"line hold_index {line.hold_index} is not one of {len(holds)} holds")
            counter = holds[line.hold_index].counter
            args += [counter.scope, counter.period, counter.window, counter.currency,
                     _int64(line.amount, "line amount"), line.original_amount, line.original_currency,
                     line.exchange, line.offer_id, line.uri]
        return args

    def _spend_args(self, holds: Sequence[Hold], lines: Sequence[Line], now_ms: int) -> list[str]:
        """Per hold: counter arguments and the sum of its lines."""
        sums = [0] * len(holds)
        for line in lines:
            if 0 <= line.hold_index < len(holds):
                sums[line.hold_index] += line.amount
        args: list[str] = []
        for hold, total in zip(holds, sums, strict=True):
            args += self._counter_args(hold.counter, hold.expire_at_ms, now_ms)
            args.append(_int64(total, "spend on one counter"))
        return args

    @staticmethod
    def _idempotency_ttl(holds: Sequence[Hold], now_ms: int) -> str:
        return str(max([h.expire_at_ms - now_ms for h in holds] + [_MIN_IDEMPOTENCY_TTL_MS]))

    # --- reserve ----------------------------------------------------------------------------

    async def reserve(
        self, account: str, holds: Sequence[Hold], *, ttl_ms: int, idempotency_key: str,
        now_ms: int, limits_version: int, intent: bytes = b"", owner: str = "",
        identity: StoreIdentity | None = None,
    ) -> ReserveOutcome:
        for hold in holds:
            _int64(hold.amount, "hold amount")
            _int64(hold.limit, "hold limit")
            _int64(hold.floor, "hold floor")
        _int64(now_ms + ttl_ms, "expiry")
        request = _ReserveRequest(new_id(), tuple(holds), ttl_ms, idempotency_key, now_ms,
                                  limits_version, bytes(intent), owner, identity)
        batcher = self._reserve_batchers.get(account)
        if batcher is None:
            batcher = _Batcher(lambda batch: self._reserve_batch(account, batch),
                               lambda: self._reserve_batchers.pop(account, None))
            self._reserve_batchers[account] = batcher
        return await self._wait(batcher.submit(request))

    async def _reserve_batch(self, account: str, batch: list[_ReserveRequest]) -> list[ReserveOutcome]:
        p = self.account_prefix(account)
        keys = [f"{p}limits:v", f"{p}exp", f"{p}counters"]
        args: list[str | bytes] = [p, str(len(batch))]
        for r in batch:
            keys += [f"{p}i:{r.idempotency_key}", f"{p}r:{r.rid}"]
            keys += [f"{p}c:{h.counter.key}" for h in r.holds]
            rttl = max([h.expire_at_ms - r.now_ms for h in r.holds] + [r.ttl_ms]) + _RESERVATION_SLACK_MS
            args += [r.rid, r.idempotency_key, str(r.limits_version), str(r.now_ms), str(r.now_ms + r.ttl_ms),
                     str(rttl), str(len(r.holds)), r.intent, r.owner, *_identity_args(r.identity),
                     str(r.now_ms + RECLAIM_MS)]
            for h in r.holds:
                args += self._counter_args(h.counter, h.expire_at_ms, r.now_ms)
                args += [str(h.amount), str(h.limit), str(h.floor)]
        # Safe to retry once: a first attempt that landed shows up as InFlight under our own id.
        replies = await self._script("reserve", keys, args, retry=True)
        return [self._reserve_outcome(r, reply) for r, reply in zip(batch, replies, strict=True)]

    @staticmethod
    def _reserve_outcome(request: _ReserveRequest, reply: list[bytes]) -> ReserveOutcome:
        kind = reply[0]
        if kind == b"ok":
            return Reserved(_text(reply[1]), int(reply[2]))
        if kind == b"inflight":
            rid = _text(reply[1])
            if rid == request.rid:
                return Reserved(rid, int(reply[2]))
            return InFlight(rid)
        if kind == b"stale":
            return StaleLimits(int(reply[1]))
        if kind == b"settled":
            return Settled(bytes(reply[1]))
        if kind == b"denied":
            return Denied(int(reply[1]), CounterState(*(int(v) for v in reply[2:7])))
        if kind == b"unsettled":
            return Unsettled(_unsettled(reply[1:]))
        if kind == b"lost":
            return Lost(_text(reply[1]))
        raise RuntimeError(f"reserve script replied {reply!r}")

    # --- commit -----------------------------------------------------------------------------

    async def commit(
        self, account: str, reservation_id: str, holds: Sequence[Hold], lines: Sequence[Line], *,
        idempotency_key: str, result: bytes, now_ms: int, part: int = 0, release: Sequence[int] = (),
        final: bool = True, identity: StoreIdentity | None = None, parts: int = 1,
        nothing_charged: Sequence[int] = (),
    ) -> Committed:
        if release and len(release) != len(holds):
            raise ValueError(f"release has {len(release)} amounts for {len(holds)} holds")
        request = _CommitRequest(reservation_id, tuple(holds), tuple(lines), idempotency_key, bytes(result),
                                 now_ms, part, tuple(release), final, identity, parts, tuple(nothing_charged))
        # Build (and so validate) the arguments now, so a bad request fails alone, not its batch.
        self._commit_args(request)
        batcher = self._commit_batchers.get(account)
        if batcher is None:
            batcher = _Batcher(lambda batch: self._commit_batch(account, batch),
                               lambda: self._commit_batchers.pop(account, None))
            self._commit_batchers[account] = batcher
        outcome = await self._wait(batcher.submit(request))
        if isinstance(outcome, StoreLost):
            raise outcome  # this request's own: the rest of its batch went on
        return outcome

    async def _commit_batch(self, account: str, batch: list[_CommitRequest]) -> list[Committed | StoreLost]:
        p = self.account_prefix(account)
        keys = [f"{p}exp", f"{p}ledger", f"{p}counters"]
        args: list[str | bytes] = [p, str(len(batch))]
        for r in batch:
            keys += [f"{p}i:{r.idempotency_key}", f"{p}r:{r.rid}"]
            keys += [f"{p}c:{h.counter.key}" for h in r.holds]
            args += self._commit_args(r)
        # Not retried: a second attempt would only report the first as a duplicate.
        replies = await self._script("commit", keys, args, retry=False)
        return [self._committed(r, reply) for r, reply in zip(batch, replies, strict=True)]

    def _commit_args(self, r: _CommitRequest) -> list[str | bytes]:
        args: list[str | bytes] = [
            r.rid, r.idempotency_key, r.result, str(r.now_ms), self._idempotency_ttl(r.holds, r.now_ms),
            str(len(r.holds)), str(len(r.lines)), str(r.part), "1" if r.final else "0",
            "1" if r.release else "0", *_identity_args(r.identity), str(r.parts),
            " ".join(str(p) for p in r.nothing_charged)]
        sums = [0] * len(r.holds)
        for line in r.lines:
            if 0 <= line.hold_index < len(r.holds):
                sums[line.hold_index] += line.amount
        for i, (hold, total) in enumerate(zip(r.holds, sums, strict=True)):
            args += self._counter_args(hold.counter, hold.expire_at_ms, r.now_ms)
            args += [_int64(total, "spend on one counter"),
                     _int64(r.release[i] if r.release else 0, "release"), _int64(hold.floor, "hold floor")]
        args += self._line_args(r.holds, r.lines)
        return args

    @staticmethod
    def _committed(request: _CommitRequest, reply: list[bytes]) -> Committed | StoreLost:
        if reply[0] == b"dup":
            return Committed(overage=(0,) * len(request.holds), duplicate=True)
        if reply[0] == b"lost":
            return StoreLost(f"redis: {_text(reply[1])}")
        if reply[0] == b"open":
            return Committed(overage=(0,) * len(request.holds),
                             unsettled_parts=tuple(int(p) for p in _text(reply[1]).split()))
        late = reply[1] == b"1"
        held: dict[str, int] = {}
        words = _text(reply[2]).split()
        for key, amount in zip(words[::2], words[1::2], strict=True):
            held[key] = held.get(key, 0) + int(amount)
        spent = [0] * len(request.holds)
        if reply[3] != b"1":  # a part committed before adds nothing now
            for line in request.lines:
                spent[line.hold_index] += line.amount
        # A late commit's hold was refunded already; its overage is still measured against what
        # the caller had reserved, so `late` alone tells that the window was not held.
        overage = tuple(
            max(0, total - (hold.amount if late else held.get(hold.counter.key, 0)))
            for hold, total in zip(request.holds, spent, strict=True)
        )
        states = tuple(
            CounterState(*(int(v) for v in reply[4 + 5 * i: 9 + 5 * i])) for i in range(len(request.holds)))
        return Committed(overage=overage, late=late, states=states)

    # --- other writes -----------------------------------------------------------------------

    async def release(self, account: str, reservation_id: str, *, now_ms: int) -> bool:
        p = self.account_prefix(account)
        reply = await self._script("release", [f"{p}r:{reservation_id}", f"{p}exp"], [p, reservation_id],
                                   retry=False)
        return int(reply) == 1

    async def sweep(
        self, account: str, *, now_ms: int, batch: int = 100, lease_ms: int = 0, taker: str = "",
        reclaim: bool = False,
    ) -> Swept:
        if batch <= 0:
            return Swept(0)
        p = self.account_prefix(account)
        reply = await self._script(
            "sweep", [f"{p}exp"],
            [p, str(now_ms), str(batch), _int64(lease_ms, "lease"), taker, "1" if reclaim else "0",
             str(LEASE_DOUBLINGS)],
            retry=False)
        unsettled: list[UnsettledHold] = []
        at = 2
        for _ in range(int(reply[1])):
            size = int(reply[at])
            unsettled.append(_unsettled(reply[at + 1: at + 1 + size]))
            at += 1 + size
        return Swept(int(reply[0]), tuple(unsettled))

    async def holds(self, account: str) -> list[UnsettledHold]:
        p = self.account_prefix(account)
        rids = [_text(m) for m in await self._call(
            functools.partial(self._client.zrange, f"{p}exp", 0, -1), retry=True)]
        if not rids:
            return []

        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for rid in rids:
                    pipe.hgetall(f"{p}r:{rid}")
                return await pipe.execute()

        out: list[UnsettledHold] = []
        for rid, raw in zip(rids, await self._call(run, retry=True), strict=True):
            f = {_text(k): v for k, v in (raw or {}).items()}
            if not f.get("intent"):
                continue
            parts = _text(f.get("done", b"")).split()
            out.append(UnsettledHold(
                reservation_id=rid, idempotency_key=_text(f["ik"]), intent=bytes(f["intent"]),
                created_ms=int(f["created"]), expires_ms=int(f["expires"]), owner=_text(f.get("owner", b"")),
                attempts=int(f.get("attempts", 0)),
                done={int(part): bytes(f.get(f"d:{part}", b"")) for part in parts}))
        return sorted(out, key=lambda h: (h.created_ms, h.reservation_id))

    async def identity(self, account: str) -> StoreIdentity | None:
        key = f"{self.account_prefix(account)}id"
        found, gen = await self._call(lambda: self._client.hmget(key, ["id", "gen"]), retry=True)
        return None if found is None else StoreIdentity(_text(found), int(gen or 1))

    async def set_identity(
        self, account: str, identity: StoreIdentity, *, replace: bool = False
    ) -> StoreIdentity:
        p = self.account_prefix(account)
        args = [identity.id, str(identity.generation), "1" if replace else "0"]
        reply = await self._script("set_identity", [f"{p}id"], args, retry=False)
        return StoreIdentity(_text(reply[0]), int(reply[1]))

    async def add_credit(self, account: str, counter: CounterRef, amount: int, *, expire_at_ms: int) -> None:
        p = self.account_prefix(account)
        # No caller clock here: the wall clock stands in for now_ms (the TTL only ever grows).
        args = [p, *self._counter_args(counter, expire_at_ms, _wall_ms()), _int64(amount, "credit")]
        await self._script("add_credit", [f"{p}c:{counter.key}", f"{p}counters"], args, retry=False)

    async def set_limit(self, account: str, scope: str, period: str, value: tuple[str, int] | None) -> int:
        p = self.account_prefix(account)
        encoded = "-" if value is None else f"{value[0]} {_int64(value[1], 'limit')}"
        reply = await self._script("set_limit", [f"{p}limits", f"{p}limits:v"],
                                   [p, f"{scope}|{period}", encoded], retry=False)
        return int(reply)

    async def record_spend(
        self, account: str, holds: Sequence[Hold], lines: Sequence[Line], *, idempotency_key: str,
        now_ms: int, kind: str, identity: StoreIdentity | None = None, result: bytes = b"",
    ) -> bool:
        p = self.account_prefix(account)
        keys = [f"{p}i:{idempotency_key}", f"{p}ledger", f"{p}counters"]
        keys += [f"{p}c:{h.counter.key}" for h in holds]
        args: list[str | bytes] = [
            p, idempotency_key, str(now_ms), kind, self._idempotency_ttl(holds, now_ms), str(len(holds)),
            str(len(lines)), *_identity_args(identity), bytes(result),
            *self._spend_args(holds, lines, now_ms), *self._line_args(holds, lines)]
        reply = await self._script("record_spend", keys, args, retry=False)
        if isinstance(reply, list):
            raise StoreLost(f"redis: {_text(reply[1])}")
        return int(reply) == 1

    async def overwrite_spent(self, account: str, counter: CounterRef, spent: int, count: int) -> None:
        p = self.account_prefix(account)
        args = [p, *self._counter_args(counter, counter.end_ms + _REPAIR_GRACE_MS, _wall_ms()),
                _int64(spent, "spent"), _int64(count, "count")]
        await self._script("overwrite_spent", [f"{p}c:{counter.key}", f"{p}counters"], args, retry=False)

    async def claim(self, account: str, name: str, *, expire_at_ms: int, now_ms: int) -> bool:
        p = self.account_prefix(account)
        ttl = max(expire_at_ms - now_ms, 0) + _CLAIM_SLACK_MS
        args = [p, _int64(now_ms, "now_ms"), _int64(expire_at_ms, "expire_at_ms"),
                _int64(ttl, "claim ttl")]
        # Not retried (a write): a claim that landed unseen only means nobody fires this time.
        reply = await self._script("claim", [f"{p}k:{name}"], args, retry=False)
        return int(reply) == 1

    # --- leases -----------------------------------------------------------------------------

    async def lease(
        self, account: str, broker: str, seq: int, asks: Sequence[LeaseAsk], spends: Sequence[LeaseSpend], *,
        ttl_ms: int, now_ms: int, limits_version: int, identity: StoreIdentity | None = None,
    ) -> LeaseOutcome:
        holds = tuple(a.hold for a in asks)
        p = self.account_prefix(account)
        record_ttl = self._idempotency_ttl(holds, now_ms)  # the broker's records and its spends' keys
        keys = [f"{p}limits:v", f"{p}counters", f"{p}ledger", f"{p}lb:{broker}", f"{p}lc:{broker}"]
        args: list[str | bytes] = [
            p, broker, _int64(seq, "lease seq"), str(now_ms), _int64(now_ms + ttl_ms, "lease expiry"),
            record_ttl, str(now_ms + RECLAIM_MS), str(limits_version), *_identity_args(identity), record_ttl,
            str(len(asks)), str(len(spends))]
        for i, ask in enumerate(asks):
            if ask.want < 0:
                raise ValueError(f"asks[{i}].want is negative ({ask.want})")
            h = ask.hold
            keys += [f"{p}c:{h.counter.key}", f"{p}lh:{h.counter.key}"]
            args += self._counter_args(h.counter, h.expire_at_ms, now_ms)
            args += [_int64(ask.want, "lease want"), _int64(h.limit, "hold limit"),
                     _int64(h.floor, "hold floor")]
        for spend in spends:
            keys.append(f"{p}i:{spend.idempotency_key}")
            args += [spend.idempotency_key, bytes(spend.result), str(len(spend.lines))]
            for line in spend.lines:
                args += [str(line.hold_index), *self._line_args(holds, [line])]
        # Not retried, like other writes. Sending it again is safe: the same seq answers with the current
        # grants, a later one finds its spends recorded (duplicates).
        reply = await self._script("lease", keys, args, retry=False)
        kind = reply[0]
        if kind == b"lost":
            return Lost(_text(reply[1]))
        if kind == b"stale":
            return StaleLimits(int(reply[1]))
        if kind not in (b"ok", b"replay"):
            raise RuntimeError(f"lease script replied {reply!r}")
        at = 3 + int(reply[2])
        duplicates = tuple(_text(k) for k in reply[3:at])
        grants: list[LeaseGrant] = []
        for _ in asks:
            v = reply[at: at + _GRANT_FIELDS]
            grants.append(LeaseGrant(granted=int(v[0]), state=CounterState(*(int(x) for x in v[1:6])),
                                     holders=int(v[6]), reclaim=v[7] == b"1"))
            at += _GRANT_FIELDS
        return Leased(tuple(grants), duplicates, int(reply[1]), applied=kind == b"ok")

    async def leases(self, account: str) -> list[BrokerLease]:
        p = self.account_prefix(account)
        reply = await self._script("leases", [f"{p}counters"], [p], retry=True)
        out: list[BrokerLease] = []
        for at in range(0, len(reply), _LEASE_FIELDS):
            v = [_text(x) for x in reply[at: at + _LEASE_FIELDS]]
            ref = CounterRef(v[4], v[5], v[6], v[7], int(v[8]), int(v[9]))
            out.append(BrokerLease(v[0], ref, int(v[1]), int(v[2]), int(v[3])))
        return sorted(out, key=lambda x: (x.broker, x.counter.key))

    async def release_leases(self, account: str, broker: str, *, as_spent: bool, now_ms: int) -> int:
        p = self.account_prefix(account)
        reply = await self._script("release_leases", [f"{p}lb:{broker}", f"{p}lc:{broker}", f"{p}ledger"],
                                   [p, broker, "1" if as_spent else "0", str(now_ms)], retry=False)
        return int(reply)

    # --- reads ------------------------------------------------------------------------------

    async def read(self, account: str, counters: Sequence[CounterRef]) -> list[CounterState]:
        if not counters:
            return []
        rows = await self._read_rows([self.counter_key(account, c) for c in counters])
        return [CounterState(*(int(v) if v is not None else 0 for v in row)) for row in rows]

    async def _read_rows(self, keys: list[str]) -> list[Any]:
        """spent, reserved, credit, count, leased of each counter key (None when missing)."""

        async def run() -> list[Any]:
            # MULTI/EXEC: one consistent snapshot of all the counters.
            async with self._client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hmget(key, ["spent", "reserved", "credit", "count", "leased"])
                return await pipe.execute()

        return await self._call(run, retry=True)

    async def limits(self, account: str) -> Limits:
        raw, version = await self._limits_raw(self.account_prefix(account))
        values: dict[tuple[str, str], tuple[str, int] | None] = {}
        for field_, value in raw.items():
            scope, period = _text(field_).split("|", 1)
            text = _text(value)
            if text == "-":
                values[(scope, period)] = None
            else:
                currency, units = text.split(" ", 1)
                values[(scope, period)] = (currency, int(units))
        return Limits(int(version) if version is not None else 0, values)

    async def _limits_raw(self, p: str) -> tuple[dict[Any, Any], Any]:
        """The account's limits hash and its version (None if never set), one snapshot."""

        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(f"{p}limits")
                pipe.get(f"{p}limits:v")
                return await pipe.execute()

        raw, version = await self._call(run, retry=True)
        return raw, version

    async def ledger(self, account: str, *, scope: str | None = None) -> AsyncIterator[LedgerEntry]:
        key = f"{self.account_prefix(account)}ledger"
        start = "-"
        while True:
            fetch = functools.partial(self._client.xrange, key, start, "+", count=_LEDGER_PAGE)
            page = await self._call(fetch, retry=True)
            if not page:
                return
            for entry_id, fields in page:
                entry = _ledger_entry(account, _text(entry_id), fields or {})
                if scope is None or entry.scope == scope:
                    yield entry
            if len(page) < _LEDGER_PAGE:
                return
            start = f"({_text(page[-1][0])}"  # exclusive (Redis >= 6.2)

    async def counters(self, account: str) -> AsyncIterator[tuple[CounterRef, CounterState]]:
        p = self.account_prefix(account)
        index = f"{p}counters"
        seen: set[str] = set()  # ZSCAN may return a member twice
        cursor = 0
        while True:
            cursor, members = await self._call(
                functools.partial(self._client.zscan, index, cursor, count=_COUNTERS_PAGE), retry=True)
            names = [n for n in (_text(m[0]) for m in members) if n not in seen]
            seen.update(names)
            if names:
                rows = await self._call(functools.partial(self._hgetall_counters, p, names), retry=True)
                gone: list[str] = []
                for name, row in zip(names, rows, strict=True):
                    if not row:
                        gone.append(name)
                        continue
                    yield _counter_row(row)
                if gone:
                    await self._script("prune_counters", [index], [p, *gone], retry=False)
            if cursor == 0:
                return

    async def _hgetall_counters(self, p: str, names: list[str]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(f"{p}c:{name}")
            return await pipe.execute()

    # --- blobs ------------------------------------------------------------------------------

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        key = f"{self._prefix}:blob:{name}"

        async def run() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"data": data, "expires_ms": str(now_ms + ttl_ms)})
                # Expiry is judged by expires_ms against the caller's clock; this TTL only cleans up.
                pipe.pexpire(key, max(ttl_ms, 1))
                await pipe.execute()

        await self._call(run, retry=False)

    async def settled(self, account: str, idempotency_key: str) -> bytes | None:
        key = f"{self.account_prefix(account)}i:{idempotency_key}"
        state, result = await self._call(lambda: self._client.hmget(key, ["state", "result"]), retry=True)
        if state is None or _text(state) != "committed":
            return None
        return b"" if result is None else (bytes(result) if isinstance(result, bytes) else result.encode())

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        key = f"{self._prefix}:blob:{name}"
        data, expires = await self._call(lambda: self._client.hmget(key, ["data", "expires_ms"]), retry=True)
        if data is None or expires is None or now_ms >= int(expires):
            return None
        return bytes(data) if isinstance(data, bytes) else data.encode()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _ledger_entry(account: str, entry_id: str, raw: dict[Any, Any]) -> LedgerEntry:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return LedgerEntry(
        id=entry_id, account=account, scope=f["scope"], period=f["period"], window=f["window"],
        amount=int(f["amount"]), currency=f["currency"], original_amount=f["original_amount"],
        original_currency=f["original_currency"], idempotency_key=f["idempotency_key"],
        reservation_id=f["reservation_id"], exchange=f["exchange"], offer_id=f["offer_id"], uri=f["uri"],
        reserved_at_ms=int(f["reserved_at_ms"]), committed_at_ms=int(f["committed_at_ms"]), kind=f["kind"],
    )


def _counter_row(raw: dict[Any, Any]) -> tuple[CounterRef, CounterState]:
    f = {_text(k): _text(v) for k, v in raw.items()}
    ref = CounterRef(f["scope"], f["period"], f["window"], f["currency"], int(f["start_ms"]),
                     int(f["end_ms"]))
    state = CounterState(int(f.get("spent", 0)), int(f.get("reserved", 0)), int(f.get("credit", 0)),
                         int(f.get("count", 0)), int(f.get("leased", 0)))
    return ref, state
