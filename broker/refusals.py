"""What the broker refuses a caller with: a bad field, no credential, no permission, nothing to buy.

Raised wherever the refusal is found (checking a request, identifying its caller, the purchase
flow); broker.rpc.errors turns each into its Connect code and Denial detail.
"""

from __future__ import annotations

from collections.abc import Sequence

from connectrpc.code import Code

from currency.money import MoneyError
from ramp.broker.v1 import broker_pb2 as bpb


class InvalidField(MoneyError):
    """A request field that cannot be accepted (INVALID_ARGUMENT naming the field)."""


class Unauthenticated(Exception):
    """No credential, or one this broker does not know (UNAUTHENTICATED)."""

    def __init__(self, message: str, reason: str = "unauthenticated") -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(Exception):
    """The caller may not do this (PERMISSION_DENIED); `field` names what it asked for."""

    def __init__(self, field: str, problem: str, *, reason: str = "scope_not_granted",
                 scope: str = "") -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.reason = reason
        self.scope = scope or field


class NothingToBuy(Exception):
    """No URI has an offer to buy, for reasons other than budget."""

    def __init__(self, code: Code, message: str, reason: str,
                 calls: Sequence[bpb.ExchangeCall] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.calls = list(calls)
