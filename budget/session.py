"""Per-session budgets, declared by the agent and held in broker memory.

Lost on restart by design (the agent re-declares). Every check-and-hold runs
without an await between reading and writing, so concurrent purchases of one
session on the event loop can never both take the last of the budget.

A session belongs to the caller that created it (its owner: an agent id, or the
anonymous identity). Sessions are looked up by (owner, session id), so another
caller's session of the same id does not exist for anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from budget.layers import BudgetExhausted, Layer, Snapshot
from common.clock import Clock
from currency.money import Money


class SessionError(Exception):
    """A session request that cannot be met as asked (maps to FAILED_PRECONDITION)."""

    def __init__(self, message: str, *, reason: str, session_id: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.scope = session_id


@dataclass
class _SessionHold:
    account: SessionAccount
    amount: Money
    settled: bool = False

    async def commit(self, actual: Money) -> None:
        self.account.settle(self, actual)

    async def release(self) -> None:
        self.account.settle(self, None)


@dataclass
class SessionAccount:
    session_id: str
    limit: Money
    clock: Clock
    spent: Money = field(init=False)
    reserved: Money = field(init=False)
    transaction_count: int = 0
    last_used: float = 0.0

    def __post_init__(self) -> None:
        self.spent = Money.zero(self.limit.currency)
        self.reserved = Money.zero(self.limit.currency)
        self.last_used = self.clock.monotonic()

    @property
    def currency(self) -> str:
        return self.limit.currency

    def snap(self) -> Snapshot:
        return Snapshot(
            layer=Layer.SESSION, scope=self.session_id, limit=self.limit, spent=self.spent,
            reserved=self.reserved, transaction_count=self.transaction_count,
            as_of=self.clock.now(),
        )

    async def snapshot(self) -> Snapshot:
        return self.snap()

    async def reserve(self, amount: Money) -> _SessionHold:
        return self.hold(amount)

    def hold(self, amount: Money) -> _SessionHold:
        # Not a coroutine: nothing can run between the check and the hold.
        self.last_used = self.clock.monotonic()
        if self.spent + self.reserved + amount > self.limit:
            raise BudgetExhausted.from_snapshot(
                self.snap(), amount, reason="session_budget_exhausted",
                next_action="raise the session budget with DeclareSessionBudget, "
                "or buy fewer or cheaper resources",
            )
        self.reserved = self.reserved + amount
        return _SessionHold(self, amount)

    def settle(self, hold: _SessionHold, actual: Money | None) -> None:
        if hold.settled:
            raise RuntimeError("reservation settled twice")
        hold.settled = True
        self.reserved = self.reserved - hold.amount
        if actual is not None:
            # An actual cost above the hold is still recorded: spend is never dropped.
            self.spent = self.spent + actual
            self.transaction_count += 1
        self.last_used = self.clock.monotonic()


class SessionBudgets:
    """All live sessions. Idle sessions with nothing held are forgotten after `idle_seconds`."""

    def __init__(
        self, clock: Clock, default_limit: Money | None, *, idle_seconds: float = 86400.0
    ) -> None:
        self._clock = clock
        self._default = default_limit
        self._idle = idle_seconds
        self._sessions: dict[tuple[str, str], SessionAccount] = {}
        self._next_sweep = clock.monotonic() + min(idle_seconds, 60.0)

    def declare(self, owner: str, session_id: str, limit: Money) -> SessionAccount:
        account = self._sessions.get((owner, session_id))
        if account is None:
            account = SessionAccount(session_id, limit, self._clock)
            self._sessions[(owner, session_id)] = account
            self._evict_idle()
            return account
        if account.currency != limit.currency and not (
            account.spent.is_zero() and account.reserved.is_zero()
        ):
            raise SessionError(
                f"session {session_id!r} has money spent or reserved in {account.currency}; "
                f"re-declare it in {account.currency} or use a new session id",
                reason="session_currency_locked", session_id=session_id,
            )
        if account.currency != limit.currency:
            account.spent = Money.zero(limit.currency)
            account.reserved = Money.zero(limit.currency)
        account.limit = limit
        account.last_used = self._clock.monotonic()
        return account

    def get(self, owner: str, session_id: str) -> SessionAccount:
        """The session's account, created with the default limit on first use."""
        account = self._sessions.get((owner, session_id))
        if account is not None:
            return account
        return self.declare(owner, session_id, self._default_for(session_id))

    def view(self, owner: str, session_id: str) -> SessionAccount:
        """The session's account, or (without creating it) what a new one would be."""
        account = self._sessions.get((owner, session_id))
        if account is not None:
            return account
        return SessionAccount(session_id, self._default_for(session_id), self._clock)

    def hold(self, owner: str, account: SessionAccount, amount: Money) -> tuple[SessionAccount, _SessionHold]:
        """Hold `amount` on the owner's session, registering `account` (from `view`) if the session
        does not exist yet: a session comes into being only with a purchase's first hold."""
        registered = self._sessions.get((owner, account.session_id))
        target = registered or account
        held = target.hold(amount)  # BudgetExhausted leaves nothing behind
        if registered is None:
            self._sessions[(owner, account.session_id)] = target
            self._evict_idle()
        return target, held

    def forget_unused(self, owner: str, account: SessionAccount) -> None:
        """Forget a session that never spent or held anything (its first purchase was refused
        after the session hold: by a period budget, say)."""
        key = (owner, account.session_id)
        if (self._sessions.get(key) is account and account.spent.is_zero() and account.reserved.is_zero()
                and account.transaction_count == 0):
            del self._sessions[key]

    def _default_for(self, session_id: str) -> Money:
        if self._default is None:
            raise SessionError(
                f"session {session_id!r} has no budget: declare one with DeclareSessionBudget "
                "(this broker has no default session limit)",
                reason="session_has_no_budget", session_id=session_id,
            )
        return self._default

    def peek(self, owner: str, session_id: str) -> SessionAccount | None:
        return self._sessions.get((owner, session_id))

    def __len__(self) -> int:
        return len(self._sessions)

    def _evict_idle(self) -> None:
        # A full scan at most once a minute keeps declaring a new session O(1) amortized.
        now = self._clock.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self._idle, 60.0)
        cutoff = now - self._idle
        for key in [
            key for key, a in self._sessions.items()
            if a.last_used < cutoff and a.reserved.is_zero()
        ]:
            del self._sessions[key]
