"""The Connect handlers: thin adapters from RPCs to the purchase flow and budgets."""

from __future__ import annotations

from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from broker import wire
from broker.errors import InvalidField
from broker.purchase import Purchaser
from broker.validation import check_id
from budget.session import SessionBudgets
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb

Ctx = RequestContext[Any, Any]


class BrokerHandlers:
    def __init__(self, purchaser: Purchaser) -> None:
        self._purchaser = purchaser

    async def resolve(self, request: bpb.ResolveRequest, ctx: Ctx) -> bpb.ResolveResponse:
        return await self._purchaser.resolve(request)

    async def transact(self, request: bpb.TransactRequest, ctx: Ctx) -> bpb.TransactResponse:
        return await self._purchaser.transact(request)


class BudgetHandlers:
    def __init__(self, sessions: SessionBudgets) -> None:
        self._sessions = sessions

    async def declare_session_budget(
        self, request: bpb.DeclareSessionBudgetRequest, ctx: Ctx
    ) -> bpb.DeclareSessionBudgetResponse:
        session_id = check_id(request.session_id, "session_id")
        if not request.HasField("limit"):
            raise InvalidField("limit", "is required (amount and currency)")
        limit = Money.parse(request.limit.amount, request.limit.currency, "limit")
        account = self._sessions.declare(session_id, limit)
        return bpb.DeclareSessionBudgetResponse(budget=wire.budget_state(account.snap()))

    async def get_budget_status(
        self, request: bpb.GetBudgetStatusRequest, ctx: Ctx
    ) -> bpb.GetBudgetStatusResponse:
        session_id = check_id(request.session_id, "session_id")
        account = self._sessions.peek(session_id)
        if account is None:
            raise ConnectError(
                Code.NOT_FOUND,
                f"session {session_id!r} is not known to this broker (sessions are kept in "
                "memory: declare it with DeclareSessionBudget)",
            )
        return bpb.GetBudgetStatusResponse(budgets=[wire.budget_state(account.snap())])
