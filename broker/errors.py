"""One place that turns exceptions into Connect errors.

Anything that is not a known domain error reaches the client as INTERNAL with a
reference id, never with its own text (which could leak internals); the full
traceback goes to the log under the same id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf.message import Message
from protobuf.wkt import Any as AnyDetail

from broker import wire
from budget.layers import BudgetExhausted
from budget.period import KeyInFlight, LimitChangeRefused, StoreDown
from budget.periods import PeriodError
from budget.scopes import ScopeError
from budget.session import SessionError
from currency.convert import ConversionError
from currency.money import MoneyError
from ramp.broker.v1 import broker_pb2 as bpb

log = logging.getLogger(__name__)
REQ = TypeVar("REQ")
RES = TypeVar("RES")


class InvalidField(MoneyError):
    """A request field that cannot be accepted (INVALID_ARGUMENT naming the field)."""


class Unauthenticated(Exception):
    """No credential, or one this broker does not know (UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """The caller may not do this (PERMISSION_DENIED); `field` names what it asked for."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NothingToBuy(Exception):
    """No URI has an offer to buy, for reasons other than budget."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


def detail(message: Message) -> ErrorDetail:
    # The library's ErrorDetail wants its own runtime's Any; a Google message
    # passed directly arrives as `unknown`, so pack the bytes by hand.
    return ErrorDetail(AnyDetail(
        type_url=f"type.googleapis.com/{message.DESCRIPTOR.full_name}",
        value=message.SerializeToString(),
    ))


def exhausted_detail(exc: BudgetExhausted) -> bpb.BudgetExhausted:
    msg = bpb.BudgetExhausted(
        layer=wire.LAYERS[exc.layer], scope=exc.scope, spent=wire.cost(exc.spent),
        limit=wire.cost(exc.limit), remaining=wire.cost(exc.remaining),
        estimated_cost=wire.cost(exc.cost), reserved=wire.cost(exc.reserved),
        mode=bpb.ENFORCEMENT_MODE_STRICT, reason=exc.reason, next_action=exc.next_action,
    )
    if exc.period_end is not None:
        msg.period_end.CopyFrom(wire.timestamp(exc.period_end))
    return msg


# Domain errors whose own message is what the client should read.
_PLAIN: dict[type[Exception], Code] = {
    SessionError: Code.FAILED_PRECONDITION,
    LimitChangeRefused: Code.FAILED_PRECONDITION,
    Unauthenticated: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
    StoreDown: Code.UNAVAILABLE,
    KeyInFlight: Code.ABORTED,
}


def to_connect_error(exc: BaseException) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, BudgetExhausted):
        return ConnectError(Code.RESOURCE_EXHAUSTED, str(exc), [detail(exhausted_detail(exc))])
    if isinstance(exc, ConversionError):
        return ConnectError(Code.FAILED_PRECONDITION, exc.problem)
    if isinstance(exc, MoneyError | ScopeError | PeriodError):
        violation = bpb.FieldViolation(field=exc.field, description=exc.problem)
        return ConnectError(Code.INVALID_ARGUMENT, str(exc), [detail(violation)])
    if isinstance(exc, NothingToBuy):
        return ConnectError(exc.code, str(exc))
    for kind, code in _PLAIN.items():
        if isinstance(exc, kind):
            return ConnectError(code, str(exc))
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s", ref, exc_info=exc)
    return ConnectError(Code.INTERNAL, f"internal error (ref {ref})")


class ErrorMapping:
    """Unary interceptor: every exception leaves as a well-formed ConnectError."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[REQ, RES]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[REQ, RES],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise to_connect_error(exc) from None


