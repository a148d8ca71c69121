"""The caller a purchase belongs to, and the scopes it is charged to.

An agent is identified by broker.rpc.auth from its API key (or is the anonymous caller); it owns
everything it creates (sessions, idempotency keys and their replays). Its purchases are charged to
its mandatory scopes and to the one it names or its billing scope; naming any scope it was not
granted is refused before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.purchase.validation import Constraints
from broker.refusals import InvalidField, PermissionDenied
from budget.period import Charge
from budget.scopes import check_scope


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    account: str | None = None
    billing_scope: str | None = None
    charged_to: tuple[str, ...] = ()
    may_name: frozenset[str] = frozenset()

    def may_charge(self, scope: str) -> bool:
        return scope in self.may_name or scope in self.charged_to or scope == self.billing_scope


ANONYMOUS = Agent("anonymous")


def charge_for(agent: Agent, c: Constraints, prefix: str = "constraints.") -> Charge | None:
    """The scopes a purchase is charged to; None when the caller has no period scopes."""
    named = c.budget_scope
    if named:
        check_scope(named, f"{prefix}budget_scope")
        if agent.account is None or not agent.may_charge(named):
            raise PermissionDenied(f"{prefix}budget_scope",
                                   f"this API key may not charge scope {named!r}", scope=named)
    target = named or agent.billing_scope
    if c.budget_period is not None and c.period_budget is None:
        raise InvalidField(f"{prefix}period_budget", "is required when budget_period is given")
    if c.period_budget is not None and (agent.account is None or target is None):
        raise PermissionDenied(f"{prefix}period_budget",
                               "this requester has no scope to apply a period budget to")
    if agent.account is None:
        return None
    scopes = tuple(dict.fromkeys([*agent.charged_to, *([target] if target else [])]))
    return Charge(agent.account, scopes, target, c.period_budget, c.budget_period)
