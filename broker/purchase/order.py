"""A Transact request, checked field by field before anything is touched.

Every field an agent sends is validated here, before a session, a cache entry or a
store record can exist: a refused request leaves no state behind. What the fields
mean depends on who sent them: the idempotency key belongs to the caller (two
callers' "k1" are two purchases), and a chosen offer is only an identification
(exchange, offer id, URI), never a price.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from broker.purchase.agents import Agent, charge_for
from broker.purchase.validation import (
    Constraints,
    check_constraints,
    check_deadline_ms,
    check_id,
    check_uris,
)
from broker.refusals import InvalidField
from broker.wire import offer_price
from budget.period import Charge
from currency.money import Money, MoneyError
from ramp.broker.v1 import broker_pb2 as bpb
from ramp.v1 import ramp_pb2 as rpb

# The separator of a caller-scoped key: neither agent ids nor idempotency keys may contain it
# (broker.purchase.validation's id alphabet, broker.config's agent id pattern), so the pair is unambiguous.
_OWNER_SEPARATOR = "#"
# Exchanges name their offers; the broker only needs to recognise them in a quote.
MAX_OFFER_ID = 256


@dataclass(frozen=True, slots=True)
class ChosenOffer:
    """An offer an agent picked: which one it is. Its price is the Exchange's, from a quote."""

    index: int  # position in the request, for error messages
    uri: str
    exchange: str
    offer_id: str
    # (price, unit cost, model) the agent sent, if it sent pricing: compared with the quote.
    claimed: tuple[Money, Money, int] | None

    @property
    def field(self) -> str:
        return f"offers[{self.index}]"


@dataclass(frozen=True, slots=True)
class Order:
    caller: Agent
    session_id: str
    key: str  # as the agent sent it; answers carry it back
    constraints: Constraints
    deadline_ms: int
    charge: Charge | None
    uris: tuple[str, ...]  # in priority order, duplicates included
    chosen: tuple[ChosenOffer, ...]  # empty when buying by URI
    fingerprint: str  # of the request: a key reused for another request is refused

    @property
    def store_key(self) -> str:
        """The key under which the store records this purchase: scoped to its caller."""
        return owned_key(self.caller, self.key)

    @property
    def exchange_key(self) -> str:
        """The key sent to Exchanges: unique per caller and key, without naming the caller."""
        return exchange_key(self.caller, self.key)


def owned_key(caller: Agent, key: str) -> str:
    return f"{caller.id}{_OWNER_SEPARATOR}{key}"


def exchange_key(caller: Agent, key: str) -> str:
    digest = hashlib.sha256(f"{caller.id}\0{key}".encode()).hexdigest()
    return f"rb-{digest[:40]}"


def check_order(
    req: bpb.TransactRequest, caller: Agent, exchanges: Collection[str], default_deadline_ms: int,
) -> Order:
    """Every field of a Transact request, or InvalidField / PermissionDenied naming the first bad one."""
    session_id = check_id(req.session_id, "session_id")
    key = check_id(req.idempotency_key, "idempotency_key")
    c = check_constraints(req.constraints, exchanges)
    deadline_ms = check_deadline_ms(req.deadline.seconds, req.deadline.nanos, "deadline",
                                    default_deadline_ms)
    if req.uris and req.offers:
        raise InvalidField("offers", "give either uris or offers, not both")
    if req.offers:
        chosen = tuple(_chosen(i, ch, exchanges) for i, ch in enumerate(req.offers))
        uris = check_uris([ch.uri for ch in chosen], "offers")
    else:
        chosen = ()
        uris = check_uris(req.uris)
    charge = charge_for(caller, c)
    fingerprint = hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()
    return Order(caller, session_id, key, c, deadline_ms, charge, tuple(uris), chosen, fingerprint)


def _chosen(i: int, ch: bpb.ChosenOffer, exchanges: Collection[str]) -> ChosenOffer:
    field = f"offers[{i}]"
    check_uris([ch.uri], f"{field}.uri")
    offer = ch.offer
    if not offer.offer_id:
        raise InvalidField(f"{field}.offer.offer_id", "is required")
    if len(offer.offer_id) > MAX_OFFER_ID or not offer.offer_id.isprintable():
        raise InvalidField(f"{field}.offer.offer_id",
                           f"must be at most {MAX_OFFER_ID} printable characters")
    if offer.exchange not in exchanges:
        raise InvalidField(f"{field}.offer.exchange",
                           f"{offer.exchange[:64]!r} is not a configured exchange")
    return ChosenOffer(i, ch.uri, offer.exchange, offer.offer_id, _claimed(offer, f"{field}.offer"))


def _claimed(offer: rpb.Offer, field: str) -> tuple[Money, Money, int] | None:
    if not offer.HasField("pricing"):
        return None
    try:
        price, unit = offer_price(offer)
    except MoneyError as exc:
        raise InvalidField(f"{field}.{exc.field}", exc.problem) from None
    return price, unit, offer.pricing.model


def dedupe(uris: Sequence[str]) -> tuple[list[str], list[str]]:
    """(first occurrences in order, later repeats)."""
    seen: set[str] = set()
    unique: list[str] = []
    dupes: list[str] = []
    for uri in uris:
        (dupes if uri in seen else unique).append(uri)
        seen.add(uri)
    return unique, dupes
