"""A purchase's answer: what was bought and charged, what was left out and why, every budget after.

The same answer is stored with the purchase's last commit, and replayed to every retry of its key
from any broker.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker import wire
from broker.purchase.execute import Outcome
from broker.purchase.order import Order, dedupe
from broker.purchase.reserve import Held
from budget.layers import Snapshot
from currency.money import total
from ramp.broker.v1 import broker_pb2 as bpb


def begin(order: Order) -> tuple[bpb.TransactResponse, list[str]]:
    """The answer's start, its URIs listed twice dropped; and the URIs to buy, in priority order."""
    response = bpb.TransactResponse(idempotency_key=order.key)
    unique, dupes = dedupe(order.uris)
    for uri in dupes:
        response.dropped.add(uri=uri, reason=bpb.DROP_REASON_DUPLICATE,
                             detail="listed earlier in the request")
    return response, unique


def add_left_out(response: bpb.TransactResponse, held: Held) -> None:
    """The URIs the reservation left out: no offer fits (or passes the constraints), or pruned to fit."""
    for ch in held.unfit:
        response.dropped.add(uri=ch.uri, reason=ch.reason, detail=ch.detail)
    for cand in held.pruned:
        response.dropped.add(
            uri=cand.uri, reason=bpb.DROP_REASON_BUDGET, cost=wire.cost(cand.price),
            detail=f"batch pruned to fit the remaining budget {held.room}",
        )


def add_items(response: bpb.TransactResponse, outcomes: Sequence[Outcome], currency: str) -> None:
    """Every item's result, and the total the Exchanges said they charged (in `currency`)."""
    response.items.extend(o.item for o in outcomes)
    charged = total((o.actual for o in outcomes if o.actual is not None), currency)
    response.total_cost.CopyFrom(wire.cost(charged))


def add_budgets(response: bpb.TransactResponse, snapshots: Sequence[Snapshot]) -> None:
    for s in snapshots:
        wire.budget_state(s, response.budgets.add())


def outcome(answer: bpb.TransactResponse) -> str:
    """The purchase's outcome as counted and logged: every item bought, some, or none."""
    bought = sum(i.status == bpb.ITEM_STATUS_PURCHASED for i in answer.items)
    if bought and bought == len(answer.items):
        return "purchased"
    return "partial" if bought else "failed"
