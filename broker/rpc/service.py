"""The Connect handlers: thin adapters from RPCs to the purchase flow and budgets."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from broker import wire
from broker.observe.watch import BudgetWatch
from broker.purchase.flow import Purchaser
from broker.purchase.holds import ACTIONS, HoldDesk
from broker.purchase.recovery import Recovery
from broker.purchase.validation import Constraints, check_id
from broker.refusals import InvalidField
from broker.rpc.auth import caller
from budget.layers import BudgetExhausted, Layer, Snapshot
from budget.period import Charge, PeriodLayer, StoreDown
from budget.periods import Period, from_ms
from budget.scopes import check_account, check_scope
from budget.session import SessionBudgets
from budget.stores.contract import LedgerEntry, StoreUnavailable
from common.clock import Clock, SystemClock
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

Ctx = RequestContext[Any, Any]
log = logging.getLogger(__name__)

# GetScopeHistory: entries returned when the request does not say, and at most.
HISTORY_DEFAULT = 50
HISTORY_MAX = 1000


class BrokerHandlers:
    def __init__(self, purchaser: Purchaser) -> None:
        self._purchaser = purchaser

    async def resolve(self, request: bpb.ResolveRequest, ctx: Ctx) -> bpb.ResolveResponse:
        return await self._purchaser.resolve(request, caller())

    async def transact(self, request: bpb.TransactRequest, ctx: Ctx) -> bpb.TransactResponse:
        # How the tightest budget is enforced, and what it has left: clients can react to a
        # scope near its end (synchronous mode, small remaining) without parsing the body. A
        # budget denial says it of the budget that denied.
        try:
            answer = await self._purchaser.transact(request, caller())
        except BudgetExhausted as exc:
            if exc.layer in (Layer.SESSION, Layer.PERIOD):
                left = exc.remaining
                _budget_headers(ctx, exc.mode, exc.phase, left.text(), left.currency, exc.scope)
            raise
        tightest = self._purchaser.tightest(answer.budgets)
        if tightest is not None:
            _budget_headers(ctx, "lease" if tightest.mode == bpb.ENFORCEMENT_MODE_LEASE else "strict",
                            tightest.phase, tightest.remaining.amount, tightest.remaining.currency,
                            tightest.scope)
        return answer


def _budget_headers(ctx: Ctx, mode: str, phase: str, remaining: str, currency: str, scope: str) -> None:
    ctx.response_headers["x-budget-mode"] = f"{mode}; phase={phase}" if phase else mode
    ctx.response_headers["x-budget-remaining"] = f"{remaining} {currency}; scope={scope}"


class BudgetHandlers:
    """Session budgets belong to the caller that declared them: another caller's session id is
    simply not found."""

    def __init__(self, sessions: SessionBudgets, purchaser: Purchaser) -> None:
        self._sessions = sessions
        self._purchaser = purchaser

    async def declare_session_budget(
        self, request: bpb.DeclareSessionBudgetRequest, ctx: Ctx
    ) -> bpb.DeclareSessionBudgetResponse:
        session_id = check_id(request.session_id, "session_id")
        if not request.HasField("limit"):
            raise InvalidField("limit", "is required (amount and currency)")
        limit = Money.parse(request.limit.amount, request.limit.currency, "limit")
        account = self._sessions.declare(caller().id, session_id, limit)
        return bpb.DeclareSessionBudgetResponse(budget=wire.budget_state(account.snap()))

    async def get_budget_status(
        self, request: bpb.GetBudgetStatusRequest, ctx: Ctx
    ) -> bpb.GetBudgetStatusResponse:
        agent = caller()
        account = None
        if request.session_id or agent.account is None:
            session_id = check_id(request.session_id, "session_id")
            account = self._sessions.peek(agent.id, session_id)
            if account is None:
                raise ConnectError(
                    Code.NOT_FOUND,
                    f"session {session_id!r} is not known to this broker (sessions are kept in "
                    "memory: declare it with DeclareSessionBudget)",
                )
        c = Constraints(frozenset(), None, None, frozenset(), False, (), request.budget_scope)
        plan = await self._purchaser.plan(agent, c, "")
        snaps = await self._purchaser.snapshots(account, plan)
        return bpb.GetBudgetStatusResponse(budgets=[wire.budget_state(s) for s in snaps])


class AdminHandlers:
    """Operators' per-period limits, behind the admin token (checked by RequireAdmin)."""

    def __init__(
        self, period: PeriodLayer, owners: Mapping[str, str], watch: BudgetWatch,
        recovery: Recovery | None = None, clock: Clock | None = None,
    ) -> None:
        self._period = period
        self._owners = owners
        self._watch = watch
        self._holds = HoldDesk(period, recovery, clock or SystemClock()) if recovery is not None else None

    def _account(self, scope: str, ctx: Ctx) -> str:
        check_scope(scope, "scope")
        account = self._owners.get(scope)
        if account is None:
            raise ConnectError(Code.NOT_FOUND, f"scope {scope!r} is not in any configured account "
                               "(list it under period_budgets.accounts or an agent)")
        return account

    async def set_period_limit(
        self, request: bpb.SetPeriodLimitRequest, ctx: Ctx
    ) -> bpb.ScopeStatusResponse:
        account = self._account(request.scope, ctx)
        period = Period.parse(request.period, "period")
        limit = None
        if not request.clear:
            if not request.HasField("limit"):
                raise InvalidField("limit", "is required (amount and currency), or set clear")
            limit = Money.parse(request.limit.amount, request.limit.currency, "limit")
        await self._period.set_limit(account, request.scope, period, limit)
        log.info("admin: %s %s limit set to %s", request.scope, period.spec, limit or "none")
        return await self._status(account, request.scope)

    async def add_credit(self, request: bpb.AddCreditRequest, ctx: Ctx) -> bpb.ScopeStatusResponse:
        account = self._account(request.scope, ctx)
        period = Period.parse(request.period, "period")
        if not request.HasField("amount"):
            raise InvalidField("amount", "is required (amount and currency)")
        amount = Money.parse(request.amount.amount, request.amount.currency, "amount")
        await self._period.add_credit(account, request.scope, period, amount)
        log.info("admin: %s %s credited %s", request.scope, period.spec, amount)
        return await self._status(account, request.scope)

    async def get_scope_status(
        self, request: bpb.GetScopeStatusRequest, ctx: Ctx
    ) -> bpb.ScopeStatusResponse:
        if not request.scope:
            return await self._status_all()
        account = self._account(request.scope, ctx)
        return await self._status(account, request.scope)

    async def _status(self, account: str, scope: str) -> bpb.ScopeStatusResponse:
        plan = await self._period.plan(Charge(account, (scope,)))
        snaps = self._watch.seen(await self._period.snapshots(plan))
        return bpb.ScopeStatusResponse(budgets=[wire.budget_state(s) for s in snaps])

    async def _status_all(self) -> bpb.ScopeStatusResponse:
        """Every configured scope, sorted by name; each scope's limits by period, as planned."""
        by_account: dict[str, list[str]] = {}
        for scope in sorted(self._owners):
            by_account.setdefault(self._owners[scope], []).append(scope)
        read: list[Snapshot] = []
        for account, scopes in by_account.items():
            plan = await self._period.plan(Charge(account, tuple(scopes)))
            read.extend(await self._period.snapshots(plan))
        snaps = sorted(self._watch.seen(read), key=lambda s: s.scope)  # stable: periods keep their order
        return bpb.ScopeStatusResponse(budgets=[wire.budget_state(s) for s in snaps])

    async def get_scope_history(
        self, request: bpb.GetScopeHistoryRequest, ctx: Ctx
    ) -> bpb.GetScopeHistoryResponse:
        account = self._account(request.scope, ctx)
        if not 0 <= request.limit <= HISTORY_MAX:
            raise InvalidField("limit", f"{request.limit} is out of range: give 1 to {HISTORY_MAX} "
                               f"entries, or 0 for the default ({HISTORY_DEFAULT})")
        period = Period.parse(request.period, "period").spec if request.period else None
        newest: deque[LedgerEntry] = deque(maxlen=request.limit or HISTORY_DEFAULT)
        total = 0
        try:
            # The store yields oldest first: keep the newest `limit` while counting them all.
            async for entry in self._period.store.ledger(account, scope=request.scope):
                if period is None or entry.period == period:
                    total += 1
                    newest.append(entry)
        except StoreUnavailable:
            raise StoreDown("the budget store cannot be reached: the ledger cannot be read now",
                            [request.scope]) from None
        return bpb.GetScopeHistoryResponse(entries=[_ledger_entry(e) for e in newest], total=total)


    # --- holds that may have reached an Exchange ------------------------------------------------

    def _desk(self) -> HoldDesk:
        if self._holds is None:
            raise ConnectError(Code.UNIMPLEMENTED, "this broker cannot reach Exchanges to settle holds")
        return self._holds

    def _known_account(self, account: str, field: str) -> str:
        check_account(account, field)
        if account not in self._period.accounts:
            raise ConnectError(Code.NOT_FOUND, f"{field}: account {account!r} is not configured "
                               "(period_budgets.accounts, or an agent's account)")
        return account

    async def list_holds(self, request: bpb.ListHoldsRequest, ctx: Ctx) -> bpb.ListHoldsResponse:
        if request.scope:
            account = self._account(request.scope, ctx)
            if request.account and request.account != account:
                raise InvalidField("scope", f"{request.scope} is in account {account}, not {request.account}")
            accounts = [account]
        elif request.account:
            accounts = [self._known_account(request.account, "account")]
        else:
            accounts = sorted(self._period.accounts)
        holds = await self._desk().listing(accounts, request.scope)
        return bpb.ListHoldsResponse(holds=holds)

    async def settle_hold(self, request: bpb.SettleHoldRequest, ctx: Ctx) -> bpb.SettleHoldResponse:
        account = self._known_account(request.account, "account")
        if not request.reservation_id or len(request.reservation_id) > 128 \
                or not request.reservation_id.isprintable():
            raise InvalidField("reservation_id", "is required (as ListHolds shows it)")
        if request.action not in ACTIONS:
            raise InvalidField("action", "is required: SETTLE_ACTION_RETRY, SETTLE_ACTION_CHARGED or "
                               "SETTLE_ACTION_REFUNDED")
        return await self._desk().settle(account, request.reservation_id, request.action)


def _ledger_entry(e: LedgerEntry) -> bpb.LedgerEntry:
    msg = bpb.LedgerEntry(
        scope=e.scope, period=e.period, window=e.window,
        amount=wire.cost(Money.from_units(e.amount, e.currency)),
        original=rpb.Cost(amount=e.original_amount, currency=e.original_currency),
        idempotency_key=e.idempotency_key, exchange=e.exchange, offer_id=e.offer_id, uri=e.uri,
        kind=e.kind,
    )
    msg.committed_at.CopyFrom(wire.timestamp(from_ms(e.committed_at_ms)))
    return msg
