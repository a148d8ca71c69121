import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PricingModel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRICING_MODEL_UNSPECIFIED: _ClassVar[PricingModel]
    PRICING_MODEL_FREE: _ClassVar[PricingModel]
    PRICING_MODEL_PER_UNIT: _ClassVar[PricingModel]
    PRICING_MODEL_FLAT: _ClassVar[PricingModel]

class DeliveryMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_METHOD_UNSPECIFIED: _ClassVar[DeliveryMethod]
    DELIVERY_METHOD_INLINE: _ClassVar[DeliveryMethod]
    DELIVERY_METHOD_URL: _ClassVar[DeliveryMethod]
    DELIVERY_METHOD_API: _ClassVar[DeliveryMethod]

class DenialReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENIAL_REASON_UNSPECIFIED: _ClassVar[DenialReason]
    DENIAL_REASON_INSUFFICIENT_BALANCE: _ClassVar[DenialReason]
    DENIAL_REASON_RATE_LIMITED: _ClassVar[DenialReason]
    DENIAL_REASON_CONTENT_UNAVAILABLE: _ClassVar[DenialReason]
    DENIAL_REASON_OFFER_EXPIRED: _ClassVar[DenialReason]
    DENIAL_REASON_QUOTA_EXCEEDED: _ClassVar[DenialReason]

class AbsenceReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABSENCE_REASON_UNSPECIFIED: _ClassVar[AbsenceReason]
    ABSENCE_REASON_NOT_FOUND: _ClassVar[AbsenceReason]
    ABSENCE_REASON_ACCESS_DENIED: _ClassVar[AbsenceReason]
    ABSENCE_REASON_UNAVAILABLE: _ClassVar[AbsenceReason]
    ABSENCE_REASON_RATE_LIMITED: _ClassVar[AbsenceReason]
    ABSENCE_REASON_BUDGET_EXCEEDED: _ClassVar[AbsenceReason]
PRICING_MODEL_UNSPECIFIED: PricingModel
PRICING_MODEL_FREE: PricingModel
PRICING_MODEL_PER_UNIT: PricingModel
PRICING_MODEL_FLAT: PricingModel
DELIVERY_METHOD_UNSPECIFIED: DeliveryMethod
DELIVERY_METHOD_INLINE: DeliveryMethod
DELIVERY_METHOD_URL: DeliveryMethod
DELIVERY_METHOD_API: DeliveryMethod
DENIAL_REASON_UNSPECIFIED: DenialReason
DENIAL_REASON_INSUFFICIENT_BALANCE: DenialReason
DENIAL_REASON_RATE_LIMITED: DenialReason
DENIAL_REASON_CONTENT_UNAVAILABLE: DenialReason
DENIAL_REASON_OFFER_EXPIRED: DenialReason
DENIAL_REASON_QUOTA_EXCEEDED: DenialReason
ABSENCE_REASON_UNSPECIFIED: AbsenceReason
ABSENCE_REASON_NOT_FOUND: AbsenceReason
ABSENCE_REASON_ACCESS_DENIED: AbsenceReason
ABSENCE_REASON_UNAVAILABLE: AbsenceReason
ABSENCE_REASON_RATE_LIMITED: AbsenceReason
ABSENCE_REASON_BUDGET_EXCEEDED: AbsenceReason

class Cost(_message.Message):
    __slots__ = ("amount", "currency", "unit_cost")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    amount: str
    currency: str
    unit_cost: str
    def __init__(self, amount: _Optional[str] = ..., currency: _Optional[str] = ..., unit_cost: _Optional[str] = ...) -> None: ...

class Pricing(_message.Message):
    __slots__ = ("model", "rate", "currency", "unit_cost", "estimated_quantity", "unit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    model: PricingModel
    rate: str
    currency: str
    unit_cost: str
    estimated_quantity: int
    unit: str
    def __init__(self, model: _Optional[_Union[PricingModel, str]] = ..., rate: _Optional[str] = ..., currency: _Optional[str] = ..., unit_cost: _Optional[str] = ..., estimated_quantity: _Optional[int] = ..., unit: _Optional[str] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("offer_id", "title", "pricing", "delivery_method", "expires_at", "exchange")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_METHOD_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    title: str
    pricing: Pricing
    delivery_method: DeliveryMethod
    expires_at: _timestamp_pb2.Timestamp
    exchange: str
    def __init__(self, offer_id: _Optional[str] = ..., title: _Optional[str] = ..., pricing: _Optional[_Union[Pricing, _Mapping]] = ..., delivery_method: _Optional[_Union[DeliveryMethod, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exchange: _Optional[str] = ...) -> None: ...

class RequestConstraints(_message.Message):
    __slots__ = ("exchanges", "max_price", "max_unit_cost", "delivery_preference", "reporting_capable", "preferred_exchanges", "budget_scope", "period_budget", "budget_period")
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    REPORTING_CAPABLE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    exchanges: _containers.RepeatedScalarFieldContainer[str]
    max_price: Cost
    max_unit_cost: str
    delivery_preference: _containers.RepeatedScalarFieldContainer[DeliveryMethod]
    reporting_capable: bool
    preferred_exchanges: _containers.RepeatedScalarFieldContainer[str]
    budget_scope: str
    period_budget: Cost
    budget_period: _duration_pb2.Duration
    def __init__(self, exchanges: _Optional[_Iterable[str]] = ..., max_price: _Optional[_Union[Cost, _Mapping]] = ..., max_unit_cost: _Optional[str] = ..., delivery_preference: _Optional[_Iterable[_Union[DeliveryMethod, str]]] = ..., reporting_capable: _Optional[bool] = ..., preferred_exchanges: _Optional[_Iterable[str]] = ..., budget_scope: _Optional[str] = ..., period_budget: _Optional[_Union[Cost, _Mapping]] = ..., budget_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Requester(_message.Message):
    __slots__ = ("id", "domain", "type", "name", "scopes")
    ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    id: str
    domain: str
    type: str
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., domain: _Optional[str] = ..., type: _Optional[str] = ..., name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class TransactionItem(_message.Message):
    __slots__ = ("offer",)
    OFFER_FIELD_NUMBER: _ClassVar[int]
    offer: Offer
    def __init__(self, offer: _Optional[_Union[Offer, _Mapping]] = ...) -> None: ...

class TransactionRequest(_message.Message):
    __slots__ = ("ver", "idempotency_key", "requester", "items")
    VER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ver: str
    idempotency_key: str
    requester: Requester
    items: _containers.RepeatedCompositeFieldContainer[TransactionItem]
    def __init__(self, ver: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., requester: _Optional[_Union[Requester, _Mapping]] = ..., items: _Optional[_Iterable[_Union[TransactionItem, _Mapping]]] = ...) -> None: ...

class TransactionResultItem(_message.Message):
    __slots__ = ("offer_id", "transaction_id", "billing_id", "cost", "denial_reason", "retrieval_endpoint")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BILLING_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DENIAL_REASON_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    transaction_id: str
    billing_id: str
    cost: Cost
    denial_reason: DenialReason
    retrieval_endpoint: str
    def __init__(self, offer_id: _Optional[str] = ..., transaction_id: _Optional[str] = ..., billing_id: _Optional[str] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., denial_reason: _Optional[_Union[DenialReason, str]] = ..., retrieval_endpoint: _Optional[str] = ...) -> None: ...

class TransactionResponse(_message.Message):
    __slots__ = ("ver", "items", "total_cost")
    VER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    ver: str
    items: _containers.RepeatedCompositeFieldContainer[TransactionResultItem]
    total_cost: Cost
    def __init__(self, ver: _Optional[str] = ..., items: _Optional[_Iterable[_Union[TransactionResultItem, _Mapping]]] = ..., total_cost: _Optional[_Union[Cost, _Mapping]] = ...) -> None: ...

class ResourceQuery(_message.Message):
    __slots__ = ("ver", "requester", "deadline", "uris")
    VER_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    ver: str
    requester: Requester
    deadline: _duration_pb2.Duration
    uris: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ver: _Optional[str] = ..., requester: _Optional[_Union[Requester, _Mapping]] = ..., deadline: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., uris: _Optional[_Iterable[str]] = ...) -> None: ...

class OfferGroup(_message.Message):
    __slots__ = ("uri", "offers", "absence_reason")
    URI_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    ABSENCE_REASON_FIELD_NUMBER: _ClassVar[int]
    uri: str
    offers: _containers.RepeatedCompositeFieldContainer[Offer]
    absence_reason: AbsenceReason
    def __init__(self, uri: _Optional[str] = ..., offers: _Optional[_Iterable[_Union[Offer, _Mapping]]] = ..., absence_reason: _Optional[_Union[AbsenceReason, str]] = ...) -> None: ...

class ResourceResponse(_message.Message):
    __slots__ = ("ver", "exchange", "offer_groups")
    VER_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    OFFER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    ver: str
    exchange: str
    offer_groups: _containers.RepeatedCompositeFieldContainer[OfferGroup]
    def __init__(self, ver: _Optional[str] = ..., exchange: _Optional[str] = ..., offer_groups: _Optional[_Iterable[_Union[OfferGroup, _Mapping]]] = ...) -> None: ...
