"""One place that turns exceptions into Connect errors.

Anything that is not a known domain error reaches the client as INTERNAL with a
reference id, never with its own text (which could leak internals); the full
traceback goes to the log under the same id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf import json_format
from google.protobuf.message import Message
from protobuf.wkt import Any as AnyDetail

from broker import wire
from broker.observe.metrics import Metrics
from broker.refusals import NothingToBuy, PermissionDenied, Unauthenticated
from budget.layers import BudgetExhausted, Layer
from budget.period import KeyInFlight, LimitChangeRefused, OutcomePending, StoreDown
from budget.periods import PeriodError
from budget.scopes import ScopeError
from budget.session import SessionError
from budget.stores.contract import StoreUnavailable
from currency.convert import ConversionError
from currency.money import MoneyError
from ramp.broker.v1 import broker_pb2 as bpb

log = logging.getLogger(__name__)
REQ = TypeVar("REQ")
RES = TypeVar("RES")


class _Detail(ErrorDetail):
    """An error detail whose Connect JSON form also has a readable `debug` copy.

    connectrpc renders `debug` from `value()` through `_to_json_value` (its own runtime's
    message method), so a small stand-in gives it the Google message's ProtoJSON. Pinned to
    connectrpc 0.13; tests read `debug` from real error bodies.
    """

    def __init__(self, message: Message) -> None:
        # The library wants its own runtime's Any; a Google message passed directly
        # arrives as `unknown`, so pack the bytes by hand.
        super().__init__(AnyDetail(
            type_url=f"type.googleapis.com/{message.DESCRIPTOR.full_name}",
            value=message.SerializeToString(),
        ))
        self._google = message

    def value(self, *_: object) -> Any:
        return _JsonForm(self._google)


class _JsonForm:
    def __init__(self, message: Message) -> None:
        self._message = message

    def _to_json_value(self, **_: object) -> Any:
        return json_format.MessageToDict(self._message)


def detail(message: Message) -> ErrorDetail:
    return _Detail(message)


def exhausted_detail(exc: BudgetExhausted) -> bpb.BudgetExhausted:
    msg = bpb.BudgetExhausted(
        layer=wire.LAYERS[exc.layer], scope=exc.scope, spent=wire.cost(exc.spent),
        limit=wire.cost(exc.limit), remaining=wire.cost(exc.remaining),
        estimated_cost=wire.cost(exc.cost), reserved=wire.cost(exc.reserved),
        mode=wire.MODES.get(exc.mode, bpb.ENFORCEMENT_MODE_STRICT), reason=exc.reason,
        next_action=exc.next_action,
    )
    if exc.period_end is not None:
        msg.period_end.CopyFrom(wire.timestamp(exc.period_end))
    return msg


@dataclass(frozen=True, slots=True)
class _Kind:
    code: Code
    layer: bpb.DenialLayer
    reason: str  # unless the exception carries its own
    next_action: str


_STORE_DOWN = _Kind(
    Code.UNAVAILABLE, bpb.DENIAL_LAYER_STORE, "store_unavailable",
    "nothing was charged: retry in a few seconds (a new idempotency key is safe); if it persists, an "
    "operator should check the budget store")
# Domain errors whose own message is what the client should read, with their Denial.
_DENIALS: dict[type[Exception], _Kind] = {
    SessionError: _Kind(
        Code.FAILED_PRECONDITION, bpb.DENIAL_LAYER_SESSION, "session_has_no_budget",
        "declare a session budget with DeclareSessionBudget (in the session's currency once "
        "money is spent), or use a new session id"),
    LimitChangeRefused: _Kind(
        Code.FAILED_PRECONDITION, bpb.DENIAL_LAYER_PERIOD, "limit_change_refused",
        "keep the limit's currency until the current window ends, then change it"),
    Unauthenticated: _Kind(
        Code.UNAUTHENTICATED, bpb.DENIAL_LAYER_AUTHORIZATION, "unauthenticated",
        "send a key this broker knows as 'authorization: Bearer <key>' (the admin API takes the "
        "token from the variable named by admin.token_env)"),
    PermissionDenied: _Kind(
        Code.PERMISSION_DENIED, bpb.DENIAL_LAYER_AUTHORIZATION, "scope_not_granted",
        "name a scope this key may charge (its may_name list), or leave budget_scope empty"),
    StoreDown: _STORE_DOWN,
    # Reached the handler directly (admin calls): nothing is known to have changed.
    StoreUnavailable: _STORE_DOWN,
    KeyInFlight: _Kind(
        Code.ABORTED, bpb.DENIAL_LAYER_TRANSACTION, "idempotency_key_in_flight",
        "retry the same request with the same idempotency key in a moment; this purchase may already "
        "be charged, and the retry is answered with what happened (never bought twice): do not retry "
        "with a new key"),
    OutcomePending: _Kind(
        Code.ABORTED, bpb.DENIAL_LAYER_EXCHANGE, "outcome_pending",
        "retry the same request with the same idempotency key (after retryAt, when given); this "
        "purchase may already be charged, and the retry is answered with what happened (never bought "
        "twice): do not retry with a new key"),
    ConversionError: _Kind(
        Code.FAILED_PRECONDITION, bpb.DENIAL_LAYER_CURRENCY, "conversion_rate_unavailable",
        "use a budget in the offer's currency, or retry once the broker has fresh reference rates"),
}
_NEXT = {
    "admin_api_disabled": "set the environment variable named by admin.token_env and restart the broker",
    "exchange_unavailable": "retry later, or allow a longer deadline",
    "no_offers": "check the URIs, or configure an Exchange that sells them",
    "no_offer_meets_constraints": "relax the constraints (max_price, max_unit_cost, exchanges, delivery)",
    "limits_kept_changing": "retry: operators were changing this scope's limits",
    "offer_not_quoted": "call Resolve again and choose from its answer, or buy by URI",
}
_NOTHING_LAYER = {
    "exchange_unavailable": bpb.DENIAL_LAYER_EXCHANGE,
    "no_offers": bpb.DENIAL_LAYER_EXCHANGE,
    "no_offer_meets_constraints": bpb.DENIAL_LAYER_TRANSACTION,
    "offer_not_quoted": bpb.DENIAL_LAYER_EXCHANGE,
}
_OUTCOME_LAYER = {"store": bpb.DENIAL_LAYER_STORE, "exchange": bpb.DENIAL_LAYER_EXCHANGE}
_BUDGET_LAYER = {
    Layer.TRANSACTION: bpb.DENIAL_LAYER_TRANSACTION,
    Layer.SESSION: bpb.DENIAL_LAYER_SESSION,
    Layer.PERIOD: bpb.DENIAL_LAYER_PERIOD,
}


def denial_of(exc: BaseException) -> bpb.Denial | None:
    """The Denial detail of a refusal; None for errors that are not one (bad input, bugs)."""
    if isinstance(exc, BudgetExhausted):
        d = bpb.Denial(reason=exc.reason, layer=_BUDGET_LAYER[exc.layer], scope=exc.scope,
                       next_action=exc.next_action, budget=exhausted_detail(exc))
        if exc.retry_at is not None:
            d.retry_at.CopyFrom(wire.timestamp(exc.retry_at))
        return d
    if isinstance(exc, NothingToBuy):
        return bpb.Denial(reason=exc.reason, layer=_NOTHING_LAYER[exc.reason],
                          scope=",".join(sorted({c.exchange for c in exc.calls})),
                          next_action=_NEXT[exc.reason], exchanges=exc.calls)
    if isinstance(exc, OutcomePending):
        k = _DENIALS[OutcomePending]
        d = bpb.Denial(reason=exc.reason, layer=_OUTCOME_LAYER[exc.layer], scope=exc.scope,
                       next_action=k.next_action)
        if exc.retry_at is not None:
            d.retry_at.CopyFrom(wire.timestamp(exc.retry_at))
        return d
    for kind, k in _DENIALS.items():
        if isinstance(exc, kind):
            reason = getattr(exc, "reason", k.reason)
            scope = getattr(exc, "scope", "") or getattr(exc, "field", "")
            return bpb.Denial(reason=reason, layer=k.layer, scope=scope,
                              next_action=_NEXT.get(reason, k.next_action))
    return None


def to_connect_error(exc: BaseException) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    denial = denial_of(exc)
    if isinstance(exc, BudgetExhausted):
        assert denial is not None
        # BudgetExhausted first, as before Denial existed; Denial carries the same numbers.
        return ConnectError(Code.RESOURCE_EXHAUSTED, str(exc),
                            [detail(exhausted_detail(exc)), detail(denial)])
    if isinstance(exc, ConversionError):
        assert denial is not None
        denial.scope = exc.field
        return ConnectError(Code.FAILED_PRECONDITION, exc.problem, [detail(denial)])
    if isinstance(exc, MoneyError | ScopeError | PeriodError):
        violation = bpb.FieldViolation(field=exc.field, description=exc.problem)
        return ConnectError(Code.INVALID_ARGUMENT, str(exc), [detail(violation)])
    if isinstance(exc, NothingToBuy):
        assert denial is not None
        return ConnectError(exc.code, str(exc), [detail(denial)])
    for kind, k in _DENIALS.items():
        if isinstance(exc, kind):
            assert denial is not None
            return ConnectError(k.code, str(exc), [detail(denial)])
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s", ref, exc_info=exc)
    return ConnectError(Code.INTERNAL, f"internal error (ref {ref})")


class ErrorMapping:
    """Unary interceptor: every exception leaves as a well-formed ConnectError; denials are counted."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    def connect_error(self, exc: Exception) -> ConnectError:
        """`exc` as the client should see it, its denial counted (also for metadata interceptors,
        which run before the unary chain and so outside intercept_unary)."""
        try:
            error = to_connect_error(exc)
            denial = denial_of(exc)
        except Exception as bug:
            # Mapping must never fail: anything it raised would reach the client with its text.
            return to_connect_error(bug)
        if denial is not None and self._metrics is not None:
            self._metrics.denied(bpb.DenialLayer.Name(denial.layer).removeprefix(
                "DENIAL_LAYER_").lower(), denial.reason)
        return error

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[REQ, RES]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[REQ, RES],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise self.connect_error(exc) from None


