"""`ramp-broker mcp`: a Model Context Protocol server through which LLM agents find and buy
resources within their budgets.

It is a client of a running broker (Connect JSON over HTTP, like `ramp-broker budget`), calling
the agent API with the agent's key, so every budget and authorization rule of the broker applies
unchanged: this module decides nothing about money, it only asks and reports. Four tools:

    find_offers             BrokerService.Resolve          free: buys nothing
    buy                     BrokerService.Transact         spends money
    get_budget_status       BudgetService.GetBudgetStatus  free, read-only
    declare_session_budget  BudgetService.DeclareSessionBudget  free: sets a session's cap

Every result carries structured content (amounts as decimal strings, never floats) and a short
text summary. A refusal is an error result (`isError`) whose structured content is `{"error":
...}`: the broker's `Denial` (reason, layer, scope, the numbers, what to do next, when a retry can
succeed) with the broker's RPC names replaced by this server's tool names; any other failure (the
broker down, a wrong key, bad arguments: one sentence naming the argument) is an error result of
the same shape with one clear message, never a traceback. Each tool's output schema admits that
`error` besides the result's own fields: MCP requires structured content to match the declared
schema, and the TypeScript SDK's client (1.32) checks error results too, throwing on a mismatch.

`buy` derives the idempotency key itself from what identifies the purchase: the session, the set
of URIs bought (given as `uris` or as chosen `offers`) and an optional `purchase_id`. An agent that
retries a tool call gets the first call's answer (`replayed`), never a second charge; to buy the
same resources again on purpose it passes a new `purchase_id`.

Over streamable HTTP a client may send its own agent key (`authorization: Bearer <key>`): it is
passed to the broker (which checks it) instead of the key from the environment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC
from importlib.metadata import version
from typing import Annotated, Any, TypeVar

import httpx
from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from broker.mcp.arguments import argument_problem
from broker.wire import offer_price
from currency.money import MoneyError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

log = logging.getLogger("ramp_broker.mcp")

M = TypeVar("M", bound=Message)

SERVER_NAME = "ramp-broker"
# What a session id, an idempotency key and a purchase id may hold (the broker's own check).
ID_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,128}$"
PURCHASE_ID_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,64}$"
AMOUNT_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
MAX_URIS = 256
# Offers per URI spelled out in a text summary (the structured content has them all).
_SUMMARY_OFFERS = 3


@dataclass(frozen=True, slots=True)
class Settings:
    broker: str  # http(s)://host:port of a running `ramp-broker serve`
    key: str | None  # the agent's API key; None: key-less calls
    key_env: str  # where it was read from, to name in messages
    timeout: float  # seconds for one broker call


class ListenFailed(Exception):
    """The HTTP transport's address cannot be listened on."""


# --- calling the broker -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a broker call gave no answer: the broker's refusal or a transport problem."""

    code: str  # the Connect code ("resource_exhausted", ...), or "unavailable" / "deadline_exceeded"
    message: str
    denial: bpb.Denial | None = None
    field: str = ""  # INVALID_ARGUMENT: the request field at fault
    next_action: str = ""  # when there is no Denial: what to do, in words


class BrokerFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class BrokerClient:
    """Connect JSON calls to the broker's agent API with the agent's key."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self._http = http

    async def call(self, method: str, request: Message, response: type[M], key: str | None,
                   client_key: bool = False) -> M:
        """POST `request` to /ramp.broker.v1.<method>: the answer, or BrokerFailed saying why.

        `client_key`: `key` is the one the MCP client sent, not this server's own.
        """
        url = self.settings.broker
        headers = {"content-type": "application/json", "connect-protocol-version": "1",
                   "user-agent": "ramp-broker-mcp"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            r = await self._http.post(f"{url}/ramp.broker.v1.{method}", headers=headers,
                                      content=json.dumps(MessageToDict(request)).encode())
        except httpx.TimeoutException:
            raise BrokerFailed(Failure(
                "deadline_exceeded", f"the broker at {url} did not answer within "
                f"{self.settings.timeout:g} s", next_action=_TIMEOUT_NEXT.get(method, "try again"),
            )) from None
        except httpx.TransportError as exc:
            raise BrokerFailed(Failure(
                "unavailable", f"cannot reach the broker at {url} ({_reason(exc)})",
                next_action="try again in a moment; if it persists, whoever runs this MCP server "
                            "should check that `ramp-broker serve` is running at that address "
                            "(--broker / $RAMP_MCP_BROKER_URL)",
            )) from None
        if r.status_code != 200:
            raise BrokerFailed(self._refusal(r, key, client_key))
        try:
            body = r.json()
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            return ParseDict(body, response(), ignore_unknown_fields=True)
        except (ValueError, ParseError) as exc:
            raise BrokerFailed(Failure(
                "internal", f"the broker at {url} sent an answer this server cannot read "
                f"({str(exc)[:200]})")) from None

    def _refusal(self, r: httpx.Response, key: str | None, client_key: bool) -> Failure:
        url = self.settings.broker
        try:
            body = r.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("code"), str)):
            return Failure("unavailable", f"{url} answered HTTP {r.status_code} without a broker "
                           f"error ({r.text.strip()[:120]!r}); is it a ramp-broker?",
                           next_action="whoever runs this MCP server should point --broker / "
                                       "$RAMP_MCP_BROKER_URL at a running `ramp-broker serve`")
        code = str(body["code"])
        message = str(body.get("message") or code)
        denial, violation = _details(body.get("details"))
        if code == "unauthenticated":
            if client_key:
                return Failure(code, f"the broker refused the agent key this MCP client sent "
                               f"(authorization header): {message}", denial,
                               next_action="this cannot be fixed by changing the tool call: "
                               "configure the MCP client to send an API key the broker knows "
                               "('authorization: Bearer <key>')")
            whose = (f"the agent key in ${self.settings.key_env}" if key
                     else f"calls without an agent key (${self.settings.key_env} is not set)")
            return Failure(code, f"the broker refused {whose}: {message}", denial,
                           next_action=f"this cannot be fixed by changing the tool call: whoever "
                           f"configures this MCP server must set ${self.settings.key_env} in its "
                           "environment to an API key the broker knows, and restart it")
        return Failure(code, message, denial, violation.field if violation else "")


def _details(details: Any) -> tuple[bpb.Denial | None, bpb.FieldViolation | None]:
    """The Denial and FieldViolation of a Connect JSON error's details, when it carries them."""
    denial = violation = None
    for d in details if isinstance(details, list) else []:
        if not isinstance(d, dict):
            continue
        try:
            raw = base64.b64decode(str(d.get("value", "")) + "==")
            if d.get("type") == "ramp.broker.v1.Denial":
                denial = bpb.Denial.FromString(raw)
            elif d.get("type") == "ramp.broker.v1.FieldViolation":
                violation = bpb.FieldViolation.FromString(raw)
        except (binascii.Error, DecodeError, ValueError):
            continue
    return denial, violation


def _reason(exc: httpx.TransportError) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip()
    return (text[:1].lower() + text[1:]) if text else type(exc).__name__


_TIMEOUT_NEXT = {
    "BrokerService/Transact": "call buy again with exactly the same arguments: if the purchase "
                              "went through you get its result, and it is never charged twice",
}

# The broker speaks of its RPCs and request fields; an agent here knows the tools.
_TOOL_WORDS = [
    ("retry the same request with the same idempotency key in a moment",
     "call buy again with exactly the same arguments in a moment (it is never charged twice)"),
    ("DeclareSessionBudget", "the declare_session_budget tool"),
    ("call Resolve again", "call find_offers again"),
    ("constraints.max_price", "max_price"),
    ("constraints.max_unit_cost", "max_unit_cost"),
    ("constraints.", ""),
    ("Resolve", "find_offers"),
]


def for_tools(text: str) -> str:
    """The broker's words with its RPC and field names replaced by this server's tools and arguments."""
    for old, new in _TOOL_WORDS:
        text = text.replace(old, new)
    return text


# --- what the tools take ----------------------------------------------------------------------------


class Price(BaseModel):
    """An amount of money: a decimal string and its currency."""

    amount: str = Field(pattern=AMOUNT_PATTERN, description='a decimal string such as "2.50" '
                        "(never a number)")
    currency: str = Field(pattern=CURRENCY_PATTERN, description='ISO 4217 code, e.g. "USD"')


class ChosenOffer(BaseModel):
    """An offer picked from find_offers: which Exchange, which offer, for which URI."""

    uri: str = Field(min_length=1, description="the URI the offer was for")
    exchange: str = Field(min_length=1, description="the offer's exchange, as find_offers gave it")
    offer_id: str = Field(min_length=1, description="the offer's offer_id, as find_offers gave it")


SessionId = Annotated[str, Field(pattern=ID_PATTERN, description=(
    "your session's id (1-128 letters, digits and . _ : @ / + = -); a session's budget is "
    "declared with declare_session_budget"))]
Uris = Annotated[list[str], Field(min_length=1, max_length=MAX_URIS, description=(
    "resource URIs, most important first (when not all fit the budget, the last ones are "
    "dropped)"))]
MaxPrice = Annotated[Price | None, Field(description=(
    "optional: never pay more than this for any one resource"))]
BudgetScope = Annotated[str | None, Field(description=(
    "optional: an operator budget scope your key may name (e.g. project:q4) to charge as well"))]

# What each argument must be, in an invalid argument's sentence (broker.mcp.arguments); a list's
# items by the list's name and "[]".
_ID_CHARS = "letters, digits and . _ : @ / + = -"
ARGUMENT_FORMS = {
    "session_id": f"1-128 {_ID_CHARS}",
    "purchase_id": f"1-64 {_ID_CHARS}",
    "uris": f"a list of 1 to {MAX_URIS} resource URIs (strings)",
    "uris[]": "a resource URI (a string)",
    "offers": f"a list of up to {MAX_URIS} offers chosen from find_offers",
    "offers[]": 'an offer chosen from find_offers: {"uri": ..., "exchange": ..., "offer_id": ...}',
    "uri": "the URI the offer was for (a non-empty string)",
    "exchange": "the offer's exchange as find_offers gave it (a non-empty string)",
    "offer_id": "the offer's offer_id as find_offers gave it (a non-empty string)",
    "max_price": 'an amount such as {"amount": "2.50", "currency": "USD"}',
    "limit": 'an amount such as {"amount": "20.00", "currency": "USD"}',
    "amount": 'a decimal string such as "2.50", in quotes, with at most 9 digits before and '
              "after the point",
    "currency": 'a three-letter ISO 4217 code in capitals, such as "USD"',
    "budget_scope": "the name of a budget scope your key may charge, such as project:q4",
}


# --- what the tools return --------------------------------------------------------------------------


class Money(BaseModel):
    amount: str = Field(description="decimal string")
    currency: str


class BudgetOut(BaseModel):
    """One budget: the session's, or an operator's period budget for a scope."""

    layer: str = Field(description='"session" (yours, declared with declare_session_budget) or '
                                   '"period" (an operator\'s limit for a scope)')
    scope: str = Field(description="the session id, or the scope (e.g. team:research)")
    period: str | None = Field(None, description='period layer: "day", "month", ...')
    limit: Money | None = None
    spent: Money | None = None
    reserved: Money | None = Field(None, description="held by purchases in flight")
    remaining: Money | None = None
    period_end: str | None = Field(None, description="when the period resets (RFC 3339)")
    transaction_count: int = 0
    spend_rate_per_hour: Money | None = None
    projected_exhaustion: str | None = Field(None, description="when it runs out at this rate")
    as_of: str | None = None


class OfferOut(BaseModel):
    exchange: str
    offer_id: str
    title: str | None = None
    price: Money | None = Field(None, description="what buying it is expected to cost (rate x "
                                                  "estimated quantity)")
    pricing_model: str = Field(description='"flat", "per_unit" or "free"')
    rate: str | None = None
    unit: str | None = None
    estimated_quantity: int | None = None
    unit_cost: str | None = None
    delivery: str | None = None
    expires_at: str | None = None


class DroppedOut(BaseModel):
    uri: str
    reason: str = Field(description='"no_offers", "filtered" (by max_price or other constraints), '
                                    '"budget" (did not fit) or "duplicate"')
    detail: str = ""
    cost: Money | None = Field(None, description="budget drops: the best offer's price")


class UriOffersOut(BaseModel):
    uri: str
    offers: list[OfferOut] = Field(description="best first")
    dropped: DroppedOut | None = Field(None, description="set when there is no offer to buy")


class ExchangeCallOut(BaseModel):
    exchange: str
    outcome: str = Field(description='"ok", "timeout" or "error"')
    detail: str | None = None
    latency_ms: int | None = None


class BudgetNumbers(BaseModel):
    """The numbers of a budget refusal: which budget, what did not fit and what is left."""

    layer: str = Field(description='"session" or "period"')
    scope: str
    needed: Money | None = Field(default=None, description="the cost that did not fit")
    spent: Money | None = Field(default=None)
    reserved: Money | None = Field(default=None, description="held by purchases in flight")
    limit: Money | None = Field(default=None)
    remaining: Money | None = Field(default=None)
    period_end: str | None = Field(default=None, description="when the period resets (RFC 3339)")


class Refusal(BaseModel):
    """Why a tool call was refused: the `error` of an error result (`isError`)."""

    code: str = Field(description=(
        'the broker\'s error code: "resource_exhausted" (a budget), "invalid_argument", '
        '"unauthenticated", "permission_denied", "failed_precondition", "not_found", '
        '"unavailable", "deadline_exceeded", ...'))
    message: str = Field(description="what went wrong, in one sentence")
    field: str | None = Field(default=None, description=(
        'invalid_argument: the argument at fault, e.g. "max_price.amount"'))
    reason: str | None = Field(default=None, description=(
        'the broker\'s machine-readable reason, e.g. "session_budget_exhausted", '
        '"period_budget_exhausted", "unauthenticated"'))
    layer: str | None = Field(default=None, description=(
        'what refused: "transaction", "session", "period", "authorization", "store", '
        '"exchange", ...'))
    scope: str | None = Field(default=None, description=(
        "the session, budget scope, exchange or argument the refusal is about"))
    retry_at: str | None = Field(default=None, description=(
        "the earliest time a retry can succeed (RFC 3339), when known (a period's reset)"))
    budget: BudgetNumbers | None = Field(default=None, description="a budget refusal's numbers")
    exchanges: list[ExchangeCallOut] | None = Field(default=None, description=(
        "an Exchange refusal: what each Exchange answered"))
    next_action: str | None = Field(default=None, description="what to do about it, in words")


class ToolOutput(BaseModel):
    """A tool's structured result. Its output schema also admits `{"error": Refusal}`, the
    structured content of an error result: a result must conform to the declared schema, and
    MCP clients (the TypeScript SDK's, for one) check error results too."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        schema["properties"]["error"] = {
            **handler(Refusal.__pydantic_core_schema__),
            "description": "set instead of the result when the call was refused (isError): why, "
                           "and what to do next"}
        # Either the result's own fields or the error; "type": "object" stays at the top, as
        # MCP requires of an output schema.
        schema["anyOf"] = [{"required": schema.pop("required", [])}, {"required": ["error"]}]
        return schema


class FindOffersResult(ToolOutput):
    results: list[UriOffersOut] = Field(description="one entry per distinct URI, in request order")
    budgets: list[BudgetOut]
    exchanges: list[ExchangeCallOut]


class ItemOut(BaseModel):
    uri: str
    status: str = Field(description='"purchased" (charged: cost), "denied" or "failed" (nothing '
                                    'charged), "unknown" (the Exchange may have charged; it stays '
                                    "counted against the budget)")
    exchange: str
    offer_id: str
    quoted: Money | None = Field(None, description="the offer's price when it was chosen")
    cost: Money | None = Field(None, description="what the Exchange charged")
    transaction_id: str | None = None
    retrieval_endpoint: str | None = Field(None, description="where to fetch what was bought")
    denial_reason: str | None = None
    detail: str | None = None


class BuyResult(ToolOutput):
    idempotency_key: str = Field(description="derived from session_id, the URIs and purchase_id")
    purchase_id: str | None = None
    replayed: bool = Field(description="true: the stored answer of an earlier identical call; "
                                       "nothing new was charged")
    items: list[ItemOut]
    total_cost: Money | None = Field(None, description="the sum charged, in the session's currency")
    dropped: list[DroppedOut] = Field(description="URIs not bought, with the reason")
    budgets: list[BudgetOut] = Field(description="after the purchase")
    exchanges: list[ExchangeCallOut]


class BudgetStatusResult(ToolOutput):
    budgets: list[BudgetOut]


class DeclareResult(ToolOutput):
    budget: BudgetOut


# --- from the broker's messages ---------------------------------------------------------------------


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _time(msg: Message, name: str) -> str | None:
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _money(msg: Message, name: str) -> Money | None:
    if not msg.HasField(name):
        return None
    cost: rpb.Cost = getattr(msg, name)
    return Money(amount=cost.amount, currency=cost.currency)


def _ms(d: Duration) -> int:
    return d.seconds * 1000 + d.nanos // 1_000_000


def budget_out(b: bpb.BudgetState) -> BudgetOut:
    return BudgetOut(
        layer=_enum(bpb.BudgetLayer, b.layer, "BUDGET_LAYER_"), scope=b.scope,
        period=b.period or None, limit=_money(b, "limit"), spent=_money(b, "spent"),
        reserved=_money(b, "reserved"), remaining=_money(b, "remaining"),
        period_end=_time(b, "period_end"), transaction_count=b.transaction_count,
        spend_rate_per_hour=_money(b, "spend_rate_per_hour"),
        projected_exhaustion=_time(b, "projected_exhaustion"), as_of=_time(b, "as_of"))


def _price(offer: rpb.Offer) -> Money | None:
    try:
        price, _ = offer_price(offer)
    except MoneyError:
        return None
    return Money(amount=str(price.amount), currency=price.currency)


def offer_out(o: rpb.Offer) -> OfferOut:
    p = o.pricing
    return OfferOut(
        exchange=o.exchange, offer_id=o.offer_id, title=o.title or None, price=_price(o),
        pricing_model=_enum(rpb.PricingModel, p.model, "PRICING_MODEL_"), rate=p.rate or None,
        unit=p.unit if p.HasField("unit") else None,
        estimated_quantity=p.estimated_quantity if p.HasField("estimated_quantity") else None,
        unit_cost=p.unit_cost if p.HasField("unit_cost") else None,
        delivery=(_enum(rpb.DeliveryMethod, o.delivery_method, "DELIVERY_METHOD_")
                  if o.delivery_method else None),
        expires_at=_time(o, "expires_at"))


def dropped_out(d: bpb.DroppedUri) -> DroppedOut:
    return DroppedOut(uri=d.uri, reason=_enum(bpb.DropReason, d.reason, "DROP_REASON_"),
                      detail=d.detail, cost=_money(d, "cost"))


def exchange_out(c: bpb.ExchangeCall) -> ExchangeCallOut:
    return ExchangeCallOut(
        exchange=c.exchange, outcome=_enum(bpb.ExchangeCall.Outcome, c.outcome, "OUTCOME_"),
        detail=c.detail or None, latency_ms=_ms(c.latency) if c.HasField("latency") else None)


def item_out(i: bpb.ItemResult) -> ItemOut:
    r = i.result
    return ItemOut(
        uri=i.uri, status=_enum(bpb.ItemStatus, i.status, "ITEM_STATUS_"),
        exchange=i.offer.exchange, offer_id=i.offer.offer_id, quoted=_price(i.offer),
        cost=_money(r, "cost"), transaction_id=r.transaction_id or None,
        retrieval_endpoint=r.retrieval_endpoint or None,
        denial_reason=(_enum(rpb.DenialReason, r.denial_reason, "DENIAL_REASON_")
                       if r.denial_reason else None),
        detail=i.detail or None)


def _cost(m: Money | None) -> str:
    return f"{m.amount} {m.currency}" if m else "?"


def budgets_text(budgets: Iterable[BudgetOut]) -> str:
    parts = []
    for b in budgets:
        which = f"session {b.scope}" if b.layer == "session" else (
            f"{b.scope} ({b.period})" if b.period else b.scope)
        if b.remaining and b.limit:
            parts.append(f"{which} {b.remaining.amount} of {b.limit.amount} {b.limit.currency} left")
    return "Budgets: " + "; ".join(parts) + "." if parts else "No budget applies."


# --- the tools' results -----------------------------------------------------------------------------


def _result(model: BaseModel, text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=model.model_dump(mode="json"))


def find_offers_result(resp: bpb.ResolveResponse) -> CallToolResult:
    out = FindOffersResult(
        results=[UriOffersOut(uri=r.uri, offers=[offer_out(o) for o in r.offers],
                              dropped=dropped_out(r.dropped) if r.HasField("dropped") else None)
                 for r in resp.results],
        budgets=[budget_out(b) for b in resp.budgets],
        exchanges=[exchange_out(c) for c in resp.exchanges])
    lines = []
    for r in out.results:
        if not r.offers:
            why = f"{r.dropped.reason}: {r.dropped.detail}" if r.dropped else "no offer"
            lines.append(f"- {r.uri}: nothing to buy ({why})")
            continue
        shown = ", ".join(f"{_cost(o.price)} ({o.exchange} offer {o.offer_id})"
                          for o in r.offers[:_SUMMARY_OFFERS])
        more = f" and {len(r.offers) - _SUMMARY_OFFERS} more" if len(r.offers) > _SUMMARY_OFFERS else ""
        lines.append(f"- {r.uri}: {len(r.offers)} offer{'s' if len(r.offers) != 1 else ''}, best "
                     f"first: {shown}{more}")
    text = "\n".join(["Offers (nothing was bought or charged):", *lines, budgets_text(out.budgets)])
    return _result(out, text)


def buy_result(resp: bpb.TransactResponse, purchase_id: str | None) -> CallToolResult:
    out = BuyResult(
        idempotency_key=resp.idempotency_key, purchase_id=purchase_id, replayed=resp.replayed,
        items=[item_out(i) for i in resp.items], total_cost=_money(resp, "total_cost"),
        dropped=[dropped_out(d) for d in resp.dropped],
        budgets=[budget_out(b) for b in resp.budgets],
        exchanges=[exchange_out(c) for c in resp.exchanges])
    bought = [i for i in out.items if i.status == "purchased"]
    head = (f"Bought {len(bought)} of {len(out.items) + len(out.dropped)} resource(s), total charged "
            f"{_cost(out.total_cost)}.")
    if out.replayed:
        head = ("This call was already made: this is its stored result, and nothing new was "
                "charged (pass a new purchase_id to buy the same resources again). " + head)
    lines = [head]
    for i in out.items:
        if i.status == "purchased":
            where = f", retrieve at {i.retrieval_endpoint}" if i.retrieval_endpoint else ""
            lines.append(f"- {i.uri}: purchased for {_cost(i.cost)} from {i.exchange} "
                         f"(transaction {i.transaction_id}{where})")
        elif i.status == "unknown":
            lines.append(f"- {i.uri}: outcome unknown: {i.exchange} may have charged it; its quoted "
                         f"price stays counted against the budget until the broker settles it; do "
                         f"not buy it again yet{_detail(i.detail)}")
        else:
            reason = i.denial_reason or i.detail or "no reason given"
            lines.append(f"- {i.uri}: {i.status} by {i.exchange}, nothing charged ({reason}); to "
                         "try again call buy with a new purchase_id")
    for d in out.dropped:
        lines.append(f"- {d.uri}: not bought ({d.reason}: {d.detail})")
    lines.append(budgets_text(out.budgets))
    return _result(out, "\n".join(lines))


def _detail(detail: str | None) -> str:
    return f" ({detail})" if detail else ""


def status_result(resp: bpb.GetBudgetStatusResponse) -> CallToolResult:
    out = BudgetStatusResult(budgets=[budget_out(b) for b in resp.budgets])
    lines = []
    for b in out.budgets:
        which = f"session {b.scope}" if b.layer == "session" else f"{b.scope} {b.period or ''}".strip()
        resets = f", resets {b.period_end}" if b.period_end else ""
        lines.append(f"- {which}: spent {_cost(b.spent)}, reserved {_cost(b.reserved)}, limit "
                     f"{_cost(b.limit)}, remaining {_cost(b.remaining)}{resets}")
    return _result(out, "\n".join(["Budgets:", *lines]) if lines else "No budget applies.")


def declare_result(resp: bpb.DeclareSessionBudgetResponse) -> CallToolResult:
    b = budget_out(resp.budget)
    return _result(DeclareResult(budget=b),
                   f"Session {b.scope} may now spend up to {_cost(b.limit)} (spent {_cost(b.spent)}, "
                   f"remaining {_cost(b.remaining)}). Nothing was charged.")


# Refusals that come before anything is bought: a buy refused with one of these bought nothing.
_NOTHING_BOUGHT = {"resource_exhausted", "invalid_argument", "unauthenticated", "permission_denied",
                   "failed_precondition", "not_found"}


def error_result(failure: Failure, tool: str) -> CallToolResult:
    """An error result: the refusal's words, reason, numbers and next action, for an LLM to act on."""
    d = failure.denial
    next_action = failure.next_action or (for_tools(d.next_action) if d else "")
    message, field = for_tools(failure.message), failure.field.removeprefix("constraints.")
    if failure.code == "invalid_argument" and field == "idempotency_key" and tool == "buy":
        # The key is this server's, derived from the session, the URIs and purchase_id.
        message = ("these URIs were already bought in this session under this purchase_id, by a "
                   "call with other arguments (offers instead of uris, their order, max_price or "
                   "budget_scope)")
        next_action = ("to see that purchase's result, call buy again exactly as then; to buy "
                       "these resources again on purpose, pass a new purchase_id")
        field = "purchase_id"
    error = Refusal(code=failure.code, message=message, field=field or None,
                    next_action=next_action or None)
    if d is not None:
        # Any reason the broker gives passes through as it is: agents branch on it.
        error.reason = d.reason
        error.layer = _enum(bpb.DenialLayer, d.layer, "DENIAL_LAYER_")
        error.scope = d.scope or None
        error.retry_at = _time(d, "retry_at")
        if d.HasField("budget"):
            n = d.budget
            error.budget = BudgetNumbers(
                layer=_enum(bpb.BudgetLayer, n.layer, "BUDGET_LAYER_"), scope=n.scope,
                needed=_money(n, "estimated_cost"), spent=_money(n, "spent"),
                reserved=_money(n, "reserved"), limit=_money(n, "limit"),
                remaining=_money(n, "remaining"), period_end=_time(n, "period_end"))
        error.exchanges = [exchange_out(c) for c in d.exchanges] or None
    lines = [f"{tool} refused ({error.reason or failure.code}): {error.message}"]
    if (b := error.budget) is not None:
        numbers = ", ".join(f"{k} {m.amount}" for k in ("needed", "spent", "reserved", "limit",
                                                        "remaining") if (m := getattr(b, k)))
        cur = (b.limit or b.needed or Money(amount="", currency="")).currency
        lines.append(f"Budget {b.scope} ({b.layer}): {numbers} {cur}.")
    if next_action:
        lines.append(f"Next: {next_action}.")
    if error.retry_at:
        lines.append(f"A retry can succeed from {error.retry_at}.")
    if tool == "buy" and failure.code in _NOTHING_BOUGHT:
        lines.append("Nothing was bought or charged.")
    return CallToolResult(content=[TextContent(type="text", text="\n".join(lines))],
                          structured_content={"error": error.model_dump(mode="json",
                                                                         exclude_none=True)},
                          is_error=True)


def usage_error(tool: str, message: str) -> CallToolResult:
    return error_result(Failure("invalid_argument", message), tool)


# --- the idempotency key ----------------------------------------------------------------------------


def purchase_key(session_id: str, uris: Iterable[str], purchase_id: str | None) -> str:
    """The idempotency key of a purchase: what identifies it (the session, the set of URIs bought
    and the caller's purchase_id), not how it was asked for (order, chosen offers, max_price).

    The same purchase asked again is answered from the broker's record; asked again with other
    arguments, the broker refuses the key rather than buying twice.
    """
    content = json.dumps({"v": 1, "session": session_id, "uris": sorted(set(uris)),
                          "purchase": purchase_id or ""}, sort_keys=True, separators=(",", ":"))
    return "mcp-" + hashlib.sha256(content.encode()).hexdigest()[:48]


# --- the server -------------------------------------------------------------------------------------

INSTRUCTIONS = """\
Buy access to resources (articles, datasets, APIs) through a budget broker, within budgets.
find_offers and get_budget_status are free. buy spends money. Typical flow: declare_session_budget \
(once per session: your own spending cap), find_offers to see prices, buy (by URIs, or the offers \
you chose), get_budget_status. A refusal says why (reason, the numbers) and what to do next."""

FIND_OFFERS = """\
FREE: buys nothing and charges nothing. Asks the Exchanges what the given resource URIs cost and \
returns, for each URI, the offers that pass max_price and your budgets, best first (price, \
exchange, offer_id), the URIs no one offers or that do not fit (with the reason), and the budgets \
that apply. With session_id, offers the session cannot afford are left out. Pass a chosen offer's \
uri, exchange and offer_id to buy."""

BUY = """\
COSTS MONEY: buys the resources and charges them to your session's budget and to the operator's \
budgets. Give either uris (the broker picks the best offer for each) or offers chosen from \
find_offers (uri, exchange, offer_id), not both. Every budget (max_price, the session's, the \
operator's) is checked before anything is bought: a purchase that does not fit is refused with \
the reason, the numbers and what to do next, and nothing is charged. When not all URIs fit, the \
last ones are dropped. Safe to retry: calling buy again for the same session_id, URIs and \
purchase_id returns the first call's result (replayed) and is never charged twice; to buy the \
same resources again on purpose, pass a new purchase_id. Returns each item's status, what it \
cost, its transaction id and where to retrieve it, the total charged and the budgets after."""

STATUS = """\
FREE, read-only: the budgets that apply to you (a session's, and the operator's period budgets \
for your key), each with limit, spent, reserved (held by purchases in flight) and remaining, \
when a period resets, and the spend rate. Amounts are decimal strings."""

DECLARE = """\
FREE (charges nothing): sets or changes the spending cap of a session, which buy then never \
exceeds. Declare it before buying in a new session. Re-declaring changes the limit and keeps what \
the session already spent (its currency cannot change once money was spent). The operator's \
period budgets still apply and cannot be raised here."""


def _key_for(ctx: Context, settings: Settings) -> tuple[str | None, bool]:
    """The agent key for this call and where it came from: a bearer key the MCP client sent over
    HTTP, else the server's own from the environment."""
    try:
        headers = ctx.headers
    except ValueError:  # not within a request (a direct call)
        headers = None
    given = (headers or {}).get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), True
    return settings.key, False


class _Server(MCPServer):
    """MCPServer whose tools' bad arguments are refusals like the broker's: one sentence naming
    the argument, in the same structured `error` (the SDK's own is pydantic's text only)."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Context[Any, Any] | None = None,
                        ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            # The SDK's ToolError caused by a ValidationError is its check of the arguments; a
            # tool body's exceptions arrive as UnexpectedToolError.
            if isinstance(exc, UnexpectedToolError) or not isinstance(exc.__cause__,
                                                                      ValidationError):
                raise
            field, message = argument_problem(exc.__cause__, ARGUMENT_FORMS)
            return error_result(Failure("invalid_argument", message, field=field,
                                        next_action=f"correct {field or 'the arguments'} and "
                                                    f"call {name} again"), name)


def build_server(broker: BrokerClient) -> MCPServer:
    """The MCP server with its four tools, each a call to `broker`."""
    server = _Server(SERVER_NAME, version=version("ramp-broker"), instructions=INSTRUCTIONS,
                     log_level="WARNING")
    settings = broker.settings

    async def ask(ctx: Context, method: str, request: Message, response: type[M]) -> M:
        key, from_client = _key_for(ctx, settings)
        return await broker.call(method, request, response, key, from_client)

    @server.tool(name="find_offers", title="Find offers (free)", description=FIND_OFFERS,
                 annotations=ToolAnnotations(read_only_hint=True, open_world_hint=True))
    async def find_offers(
        uris: Uris, ctx: Context, session_id: Annotated[str | None, Field(
            pattern=ID_PATTERN, description="optional: leave out offers this session cannot "
                                            "afford")] = None,
        max_price: MaxPrice = None, budget_scope: BudgetScope = None,
    ) -> Annotated[CallToolResult, FindOffersResult]:
        request = bpb.ResolveRequest(uris=uris, session_id=session_id or "")
        _constraints(request.constraints, max_price, budget_scope)
        try:
            resp = await ask(ctx, "BrokerService/Resolve", request, bpb.ResolveResponse)
        except BrokerFailed as exc:
            return error_result(exc.failure, "find_offers")
        return find_offers_result(resp)

    @server.tool(name="buy", title="Buy (costs money)", description=BUY,
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=True))
    async def buy(
        session_id: SessionId, ctx: Context,
        uris: Annotated[list[str] | None, Field(max_length=MAX_URIS, description=(
            "resource URIs to buy, most important first; the broker picks the best offer for "
            "each (give this or offers)"))] = None,
        offers: Annotated[list[ChosenOffer] | None, Field(max_length=MAX_URIS, description=(
            "offers chosen from find_offers, most important first (give this or uris)"))] = None,
        max_price: MaxPrice = None, budget_scope: BudgetScope = None,
        purchase_id: Annotated[str | None, Field(pattern=PURCHASE_ID_PATTERN, description=(
            "optional: your own name for this purchase. The same session_id, URIs and purchase_id "
            "are one purchase, bought at most once; a new purchase_id buys the same resources "
            "again"))] = None,
    ) -> Annotated[CallToolResult, BuyResult]:
        if bool(uris) == bool(offers):
            return usage_error("buy", "give either uris or offers (chosen from find_offers), "
                                      "not both and not neither")
        request = bpb.TransactRequest(session_id=session_id)
        if uris:
            request.uris.extend(uris)
        for o in offers or []:
            request.offers.add(uri=o.uri, offer=rpb.Offer(exchange=o.exchange, offer_id=o.offer_id))
        bought = list(request.uris) or [o.uri for o in request.offers]
        request.idempotency_key = purchase_key(session_id, bought, purchase_id)
        _constraints(request.constraints, max_price, budget_scope)
        try:
            resp = await ask(ctx, "BrokerService/Transact", request, bpb.TransactResponse)
        except BrokerFailed as exc:
            return error_result(exc.failure, "buy")
        return buy_result(resp, purchase_id)

    @server.tool(name="get_budget_status", title="Budget status (free)", description=STATUS,
                 annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def get_budget_status(
        ctx: Context, session_id: Annotated[str | None, Field(pattern=ID_PATTERN, description=(
            "the session to report on (optional when your key has operator budgets)"))] = None,
        budget_scope: Annotated[str | None, Field(description=(
            "optional: also report this scope (one your key may name)"))] = None,
    ) -> Annotated[CallToolResult, BudgetStatusResult]:
        request = bpb.GetBudgetStatusRequest(session_id=session_id or "",
                                             budget_scope=budget_scope or "")
        try:
            resp = await ask(ctx, "BudgetService/GetBudgetStatus", request,
                             bpb.GetBudgetStatusResponse)
        except BrokerFailed as exc:
            return error_result(exc.failure, "get_budget_status")
        return status_result(resp)

    @server.tool(name="declare_session_budget", title="Declare a session budget (free)",
                 description=DECLARE,
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=False))
    async def declare_session_budget(
        session_id: SessionId, ctx: Context,
        limit: Annotated[Price, Field(description="the most the session may spend in all")],
    ) -> Annotated[CallToolResult, DeclareResult]:
        request = bpb.DeclareSessionBudgetRequest(
            session_id=session_id, limit=rpb.Cost(amount=limit.amount, currency=limit.currency))
        try:
            resp = await ask(ctx, "BudgetService/DeclareSessionBudget",
                             request, bpb.DeclareSessionBudgetResponse)
        except BrokerFailed as exc:
            return error_result(exc.failure, "declare_session_budget")
        return declare_result(resp)

    return server


def _constraints(c: rpb.RequestConstraints, max_price: Price | None, scope: str | None) -> None:
    if max_price is not None:
        c.max_price.CopyFrom(rpb.Cost(amount=max_price.amount, currency=max_price.currency))
    if scope:
        c.budget_scope = scope


# --- running it -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_client(settings: Settings) -> AsyncIterator[BrokerClient]:
    async with httpx.AsyncClient(timeout=settings.timeout) as http:
        yield BrokerClient(settings, http)


def _quiet() -> None:
    """No INFO line per broker call or MCP request, unless debugging."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "mcp", "uvicorn", "uvicorn.error", "sse_starlette"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _key_said(settings: Settings) -> str:
    return (f"the agent key from ${settings.key_env}" if settings.key
            else f"no agent key (${settings.key_env} is not set)")


def run_stdio(settings: Settings) -> None:
    """Serve MCP on stdin/stdout until stdin closes. Logs go to stderr only."""
    _quiet()

    async def main() -> None:
        async with broker_client(settings) as broker:
            log.info("MCP server on stdio, calling the broker at %s with %s", settings.broker,
                     _key_said(settings))
            await build_server(broker).run_stdio_async()

    asyncio.run(main())


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket for `host`:`port`; ListenFailed (with the reason) when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenFailed(f"--listen {host}:{port}: cannot resolve {host!r} ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenFailed(f"--listen {host}:{port}: cannot listen "
                           f"({exc.strerror or exc})") from None
    return sock


def _security(host: str, remote: bool) -> TransportSecuritySettings:
    """Host/Origin checks against DNS rebinding on loopback; none when listening for others."""
    if remote:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in sorted(hosts)] + sorted(hosts),
        allowed_origins=[f"http://{h}:*" for h in sorted(hosts)])


def run_http(settings: Settings, host: str, port: int, *, remote: bool = False) -> None:
    """Serve MCP over streamable HTTP at http://host:port/mcp (and GET /healthz) until SIGINT or
    SIGTERM."""
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    _quiet()
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host

    async def healthz(_: Request) -> Response:
        # Liveness of this server; the broker's own health is the broker's /healthz.
        return JSONResponse({"status": "ok"})

    async def main() -> None:
        async with broker_client(settings) as broker:
            server = build_server(broker)
            server.custom_route("/healthz", methods=["GET"])(healthz)
            app = server.streamable_http_app(host=host, transport_security=_security(host, remote))
            config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=5)
            log.info("MCP server (streamable HTTP) on http://%s:%d/mcp, calling the broker at %s "
                     "with %s", shown, bound, settings.broker, _key_said(settings))
            await uvicorn.Server(config).serve(sockets=[sock])

    try:
        asyncio.run(main())
    finally:
        sock.close()
