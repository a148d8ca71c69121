import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ramp.v1 import ramp_pb2 as _ramp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetLayer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_LAYER_UNSPECIFIED: _ClassVar[BudgetLayer]
    BUDGET_LAYER_TRANSACTION: _ClassVar[BudgetLayer]
    BUDGET_LAYER_SESSION: _ClassVar[BudgetLayer]
    BUDGET_LAYER_PERIOD: _ClassVar[BudgetLayer]

class EnforcementMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENFORCEMENT_MODE_UNSPECIFIED: _ClassVar[EnforcementMode]
    ENFORCEMENT_MODE_STRICT: _ClassVar[EnforcementMode]
    ENFORCEMENT_MODE_LEASE: _ClassVar[EnforcementMode]

class DenialLayer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENIAL_LAYER_UNSPECIFIED: _ClassVar[DenialLayer]
    DENIAL_LAYER_TRANSACTION: _ClassVar[DenialLayer]
    DENIAL_LAYER_SESSION: _ClassVar[DenialLayer]
    DENIAL_LAYER_PERIOD: _ClassVar[DenialLayer]
    DENIAL_LAYER_AUTHORIZATION: _ClassVar[DenialLayer]
    DENIAL_LAYER_STORE: _ClassVar[DenialLayer]
    DENIAL_LAYER_EXCHANGE: _ClassVar[DenialLayer]
    DENIAL_LAYER_CURRENCY: _ClassVar[DenialLayer]

class DropReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DROP_REASON_UNSPECIFIED: _ClassVar[DropReason]
    DROP_REASON_NO_OFFERS: _ClassVar[DropReason]
    DROP_REASON_FILTERED: _ClassVar[DropReason]
    DROP_REASON_BUDGET: _ClassVar[DropReason]
    DROP_REASON_DUPLICATE: _ClassVar[DropReason]

class ItemStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATUS_UNSPECIFIED: _ClassVar[ItemStatus]
    ITEM_STATUS_PURCHASED: _ClassVar[ItemStatus]
    ITEM_STATUS_DENIED: _ClassVar[ItemStatus]
    ITEM_STATUS_FAILED: _ClassVar[ItemStatus]
    ITEM_STATUS_UNKNOWN: _ClassVar[ItemStatus]

class SettleAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLE_ACTION_UNSPECIFIED: _ClassVar[SettleAction]
    SETTLE_ACTION_RETRY: _ClassVar[SettleAction]
    SETTLE_ACTION_CHARGED: _ClassVar[SettleAction]
    SETTLE_ACTION_REFUNDED: _ClassVar[SettleAction]

class SettleOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLE_OUTCOME_UNSPECIFIED: _ClassVar[SettleOutcome]
    SETTLE_OUTCOME_SETTLED: _ClassVar[SettleOutcome]
    SETTLE_OUTCOME_UNSETTLED: _ClassVar[SettleOutcome]
    SETTLE_OUTCOME_NOT_FOUND: _ClassVar[SettleOutcome]
BUDGET_LAYER_UNSPECIFIED: BudgetLayer
BUDGET_LAYER_TRANSACTION: BudgetLayer
BUDGET_LAYER_SESSION: BudgetLayer
BUDGET_LAYER_PERIOD: BudgetLayer
ENFORCEMENT_MODE_UNSPECIFIED: EnforcementMode
ENFORCEMENT_MODE_STRICT: EnforcementMode
ENFORCEMENT_MODE_LEASE: EnforcementMode
DENIAL_LAYER_UNSPECIFIED: DenialLayer
DENIAL_LAYER_TRANSACTION: DenialLayer
DENIAL_LAYER_SESSION: DenialLayer
DENIAL_LAYER_PERIOD: DenialLayer
DENIAL_LAYER_AUTHORIZATION: DenialLayer
DENIAL_LAYER_STORE: DenialLayer
DENIAL_LAYER_EXCHANGE: DenialLayer
DENIAL_LAYER_CURRENCY: DenialLayer
DROP_REASON_UNSPECIFIED: DropReason
DROP_REASON_NO_OFFERS: DropReason
DROP_REASON_FILTERED: DropReason
DROP_REASON_BUDGET: DropReason
DROP_REASON_DUPLICATE: DropReason
ITEM_STATUS_UNSPECIFIED: ItemStatus
ITEM_STATUS_PURCHASED: ItemStatus
ITEM_STATUS_DENIED: ItemStatus
ITEM_STATUS_FAILED: ItemStatus
ITEM_STATUS_UNKNOWN: ItemStatus
SETTLE_ACTION_UNSPECIFIED: SettleAction
SETTLE_ACTION_RETRY: SettleAction
SETTLE_ACTION_CHARGED: SettleAction
SETTLE_ACTION_REFUNDED: SettleAction
SETTLE_OUTCOME_UNSPECIFIED: SettleOutcome
SETTLE_OUTCOME_SETTLED: SettleOutcome
SETTLE_OUTCOME_UNSETTLED: SettleOutcome
SETTLE_OUTCOME_NOT_FOUND: SettleOutcome

class BudgetState(_message.Message):
    __slots__ = ("layer", "scope", "limit", "spent", "reserved", "remaining", "period_start", "period_end", "mode", "transaction_count", "as_of", "period", "failure_policy", "projected_exhaustion", "spend_rate_per_hour", "phase")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    FAILURE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_EXHAUSTION_FIELD_NUMBER: _ClassVar[int]
    SPEND_RATE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    layer: BudgetLayer
    scope: str
    limit: _ramp_pb2.Cost
    spent: _ramp_pb2.Cost
    reserved: _ramp_pb2.Cost
    remaining: _ramp_pb2.Cost
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    mode: EnforcementMode
    transaction_count: int
    as_of: _timestamp_pb2.Timestamp
    period: str
    failure_policy: str
    projected_exhaustion: _timestamp_pb2.Timestamp
    spend_rate_per_hour: _ramp_pb2.Cost
    phase: str
    def __init__(self, layer: _Optional[_Union[BudgetLayer, str]] = ..., scope: _Optional[str] = ..., limit: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., spent: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., reserved: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., remaining: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mode: _Optional[_Union[EnforcementMode, str]] = ..., transaction_count: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period: _Optional[str] = ..., failure_policy: _Optional[str] = ..., projected_exhaustion: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spend_rate_per_hour: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., phase: _Optional[str] = ...) -> None: ...

class Denial(_message.Message):
    __slots__ = ("reason", "layer", "scope", "next_action", "retry_at", "budget", "exchanges")
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ACTION_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    reason: str
    layer: DenialLayer
    scope: str
    next_action: str
    retry_at: _timestamp_pb2.Timestamp
    budget: BudgetExhausted
    exchanges: _containers.RepeatedCompositeFieldContainer[ExchangeCall]
    def __init__(self, reason: _Optional[str] = ..., layer: _Optional[_Union[DenialLayer, str]] = ..., scope: _Optional[str] = ..., next_action: _Optional[str] = ..., retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budget: _Optional[_Union[BudgetExhausted, _Mapping]] = ..., exchanges: _Optional[_Iterable[_Union[ExchangeCall, _Mapping]]] = ...) -> None: ...

class BudgetExhausted(_message.Message):
    __slots__ = ("layer", "scope", "spent", "limit", "remaining", "estimated_cost", "period_end", "mode", "reason", "next_action", "reserved")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_ACTION_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    layer: BudgetLayer
    scope: str
    spent: _ramp_pb2.Cost
    limit: _ramp_pb2.Cost
    remaining: _ramp_pb2.Cost
    estimated_cost: _ramp_pb2.Cost
    period_end: _timestamp_pb2.Timestamp
    mode: EnforcementMode
    reason: str
    next_action: str
    reserved: _ramp_pb2.Cost
    def __init__(self, layer: _Optional[_Union[BudgetLayer, str]] = ..., scope: _Optional[str] = ..., spent: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., limit: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., remaining: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., estimated_cost: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mode: _Optional[_Union[EnforcementMode, str]] = ..., reason: _Optional[str] = ..., next_action: _Optional[str] = ..., reserved: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ExchangeCall(_message.Message):
    __slots__ = ("exchange", "outcome", "detail", "latency")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[ExchangeCall.Outcome]
        OUTCOME_OK: _ClassVar[ExchangeCall.Outcome]
        OUTCOME_TIMEOUT: _ClassVar[ExchangeCall.Outcome]
        OUTCOME_ERROR: _ClassVar[ExchangeCall.Outcome]
    OUTCOME_UNSPECIFIED: ExchangeCall.Outcome
    OUTCOME_OK: ExchangeCall.Outcome
    OUTCOME_TIMEOUT: ExchangeCall.Outcome
    OUTCOME_ERROR: ExchangeCall.Outcome
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    exchange: str
    outcome: ExchangeCall.Outcome
    detail: str
    latency: _duration_pb2.Duration
    def __init__(self, exchange: _Optional[str] = ..., outcome: _Optional[_Union[ExchangeCall.Outcome, str]] = ..., detail: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DroppedUri(_message.Message):
    __slots__ = ("uri", "reason", "detail", "cost")
    URI_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    uri: str
    reason: DropReason
    detail: str
    cost: _ramp_pb2.Cost
    def __init__(self, uri: _Optional[str] = ..., reason: _Optional[_Union[DropReason, str]] = ..., detail: _Optional[str] = ..., cost: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class UriOffers(_message.Message):
    __slots__ = ("uri", "offers", "dropped")
    URI_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    uri: str
    offers: _containers.RepeatedCompositeFieldContainer[_ramp_pb2.Offer]
    dropped: DroppedUri
    def __init__(self, uri: _Optional[str] = ..., offers: _Optional[_Iterable[_Union[_ramp_pb2.Offer, _Mapping]]] = ..., dropped: _Optional[_Union[DroppedUri, _Mapping]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("uris", "constraints", "session_id", "deadline")
    URIS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    uris: _containers.RepeatedScalarFieldContainer[str]
    constraints: _ramp_pb2.RequestConstraints
    session_id: str
    deadline: _duration_pb2.Duration
    def __init__(self, uris: _Optional[_Iterable[str]] = ..., constraints: _Optional[_Union[_ramp_pb2.RequestConstraints, _Mapping]] = ..., session_id: _Optional[str] = ..., deadline: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("results", "exchanges", "budgets")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UriOffers]
    exchanges: _containers.RepeatedCompositeFieldContainer[ExchangeCall]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetState]
    def __init__(self, results: _Optional[_Iterable[_Union[UriOffers, _Mapping]]] = ..., exchanges: _Optional[_Iterable[_Union[ExchangeCall, _Mapping]]] = ..., budgets: _Optional[_Iterable[_Union[BudgetState, _Mapping]]] = ...) -> None: ...

class ChosenOffer(_message.Message):
    __slots__ = ("uri", "offer")
    URI_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    uri: str
    offer: _ramp_pb2.Offer
    def __init__(self, uri: _Optional[str] = ..., offer: _Optional[_Union[_ramp_pb2.Offer, _Mapping]] = ...) -> None: ...

class TransactRequest(_message.Message):
    __slots__ = ("session_id", "idempotency_key", "uris", "offers", "constraints", "deadline")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idempotency_key: str
    uris: _containers.RepeatedScalarFieldContainer[str]
    offers: _containers.RepeatedCompositeFieldContainer[ChosenOffer]
    constraints: _ramp_pb2.RequestConstraints
    deadline: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., uris: _Optional[_Iterable[str]] = ..., offers: _Optional[_Iterable[_Union[ChosenOffer, _Mapping]]] = ..., constraints: _Optional[_Union[_ramp_pb2.RequestConstraints, _Mapping]] = ..., deadline: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("uri", "offer", "status", "result", "detail")
    URI_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    uri: str
    offer: _ramp_pb2.Offer
    status: ItemStatus
    result: _ramp_pb2.TransactionResultItem
    detail: str
    def __init__(self, uri: _Optional[str] = ..., offer: _Optional[_Union[_ramp_pb2.Offer, _Mapping]] = ..., status: _Optional[_Union[ItemStatus, str]] = ..., result: _Optional[_Union[_ramp_pb2.TransactionResultItem, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class TransactResponse(_message.Message):
    __slots__ = ("idempotency_key", "items", "total_cost", "dropped", "budgets", "exchanges", "replayed")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    items: _containers.RepeatedCompositeFieldContainer[ItemResult]
    total_cost: _ramp_pb2.Cost
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedUri]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetState]
    exchanges: _containers.RepeatedCompositeFieldContainer[ExchangeCall]
    replayed: bool
    def __init__(self, idempotency_key: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., total_cost: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., dropped: _Optional[_Iterable[_Union[DroppedUri, _Mapping]]] = ..., budgets: _Optional[_Iterable[_Union[BudgetState, _Mapping]]] = ..., exchanges: _Optional[_Iterable[_Union[ExchangeCall, _Mapping]]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class DeclareSessionBudgetRequest(_message.Message):
    __slots__ = ("session_id", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    limit: _ramp_pb2.Cost
    def __init__(self, session_id: _Optional[str] = ..., limit: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class DeclareSessionBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetState
    def __init__(self, budget: _Optional[_Union[BudgetState, _Mapping]] = ...) -> None: ...

class GetBudgetStatusRequest(_message.Message):
    __slots__ = ("session_id", "budget_scope")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SCOPE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    budget_scope: str
    def __init__(self, session_id: _Optional[str] = ..., budget_scope: _Optional[str] = ...) -> None: ...

class GetBudgetStatusResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetState]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetState, _Mapping]]] = ...) -> None: ...

class SetPeriodLimitRequest(_message.Message):
    __slots__ = ("scope", "period", "limit", "clear")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    scope: str
    period: str
    limit: _ramp_pb2.Cost
    clear: bool
    def __init__(self, scope: _Optional[str] = ..., period: _Optional[str] = ..., limit: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class AddCreditRequest(_message.Message):
    __slots__ = ("scope", "period", "amount")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    period: str
    amount: _ramp_pb2.Cost
    def __init__(self, scope: _Optional[str] = ..., period: _Optional[str] = ..., amount: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class GetScopeStatusRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    def __init__(self, scope: _Optional[str] = ...) -> None: ...

class GetScopeHistoryRequest(_message.Message):
    __slots__ = ("scope", "period", "limit")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    period: str
    limit: int
    def __init__(self, scope: _Optional[str] = ..., period: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("committed_at", "scope", "period", "window", "amount", "original", "idempotency_key", "exchange", "offer_id", "uri", "kind")
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    committed_at: _timestamp_pb2.Timestamp
    scope: str
    period: str
    window: str
    amount: _ramp_pb2.Cost
    original: _ramp_pb2.Cost
    idempotency_key: str
    exchange: str
    offer_id: str
    uri: str
    kind: str
    def __init__(self, committed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scope: _Optional[str] = ..., period: _Optional[str] = ..., window: _Optional[str] = ..., amount: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., original: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., exchange: _Optional[str] = ..., offer_id: _Optional[str] = ..., uri: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class GetScopeHistoryResponse(_message.Message):
    __slots__ = ("entries", "total")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    total: int
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class ScopeStatusResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetState]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetState, _Mapping]]] = ...) -> None: ...

class ListHoldsRequest(_message.Message):
    __slots__ = ("account", "scope")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    account: str
    scope: str
    def __init__(self, account: _Optional[str] = ..., scope: _Optional[str] = ...) -> None: ...

class HoldItem(_message.Message):
    __slots__ = ("uri", "offer_id", "quoted")
    URI_FIELD_NUMBER: _ClassVar[int]
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    QUOTED_FIELD_NUMBER: _ClassVar[int]
    uri: str
    offer_id: str
    quoted: _ramp_pb2.Cost
    def __init__(self, uri: _Optional[str] = ..., offer_id: _Optional[str] = ..., quoted: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class CounterHold(_message.Message):
    __slots__ = ("scope", "period", "window", "amount")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    period: str
    window: str
    amount: _ramp_pb2.Cost
    def __init__(self, scope: _Optional[str] = ..., period: _Optional[str] = ..., window: _Optional[str] = ..., amount: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...

class HoldPart(_message.Message):
    __slots__ = ("exchange", "exchange_key", "items", "done", "holds")
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    exchange: str
    exchange_key: str
    items: _containers.RepeatedCompositeFieldContainer[HoldItem]
    done: bool
    holds: _containers.RepeatedCompositeFieldContainer[CounterHold]
    def __init__(self, exchange: _Optional[str] = ..., exchange_key: _Optional[str] = ..., items: _Optional[_Iterable[_Union[HoldItem, _Mapping]]] = ..., done: _Optional[bool] = ..., holds: _Optional[_Iterable[_Union[CounterHold, _Mapping]]] = ...) -> None: ...

class PurchaseHold(_message.Message):
    __slots__ = ("account", "reservation_id", "idempotency_key", "created_at", "expires_at", "owner", "attempts", "parts", "problem")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    account: str
    reservation_id: str
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    owner: str
    attempts: int
    parts: _containers.RepeatedCompositeFieldContainer[HoldPart]
    problem: str
    def __init__(self, account: _Optional[str] = ..., reservation_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., attempts: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[HoldPart, _Mapping]]] = ..., problem: _Optional[str] = ...) -> None: ...

class ListHoldsResponse(_message.Message):
    __slots__ = ("holds",)
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[PurchaseHold]
    def __init__(self, holds: _Optional[_Iterable[_Union[PurchaseHold, _Mapping]]] = ...) -> None: ...

class SettleHoldRequest(_message.Message):
    __slots__ = ("account", "reservation_id", "action")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    account: str
    reservation_id: str
    action: SettleAction
    def __init__(self, account: _Optional[str] = ..., reservation_id: _Optional[str] = ..., action: _Optional[_Union[SettleAction, str]] = ...) -> None: ...

class SettleHoldResponse(_message.Message):
    __slots__ = ("outcome", "detail", "items", "total_cost")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    outcome: SettleOutcome
    detail: str
    items: _containers.RepeatedCompositeFieldContainer[ItemResult]
    total_cost: _ramp_pb2.Cost
    def __init__(self, outcome: _Optional[_Union[SettleOutcome, str]] = ..., detail: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., total_cost: _Optional[_Union[_ramp_pb2.Cost, _Mapping]] = ...) -> None: ...
