"""Every exception leaves the broker as a well-formed Connect error, and none leaks internals."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from broker.refusals import InvalidField
from broker.rpc.errors import ErrorMapping, to_connect_error
from budget.layers import BudgetExhausted, Layer
from currency.money import Money
from ramp.broker.v1 import broker_pb2 as bpb


def test_unexpected_exception_is_internal_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        err = to_connect_error(RuntimeError("password=hunter2 at /srv/secret.py"))
    assert err.code == Code.INTERNAL
    assert "hunter2" not in err.message
    assert "secret" not in err.message
    ref = err.message.split("ref ")[1].rstrip(")")
    # The operator can find the full story in the log under the same reference.
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


def test_invalid_field_names_the_field_in_message_and_detail() -> None:
    err = to_connect_error(InvalidField("constraints.max_price.amount", "is not a decimal"))
    assert err.code == Code.INVALID_ARGUMENT
    assert err.message == "constraints.max_price.amount: is not a decimal"
    (detail,) = err.details
    violation = bpb.FieldViolation.FromString(detail.message_bytes)
    assert violation.field == "constraints.max_price.amount"


def test_budget_exhausted_carries_every_number() -> None:
    usd = "USD"
    exc = BudgetExhausted(
        layer=Layer.SESSION, scope="s1", limit=Money.parse("10", usd, "l"),
        spent=Money.parse("9.5", usd, "s"), reserved=Money.parse("0.25", usd, "r"),
        cost=Money.parse("1", usd, "c"), reason="session_budget_exhausted", next_action="raise it",
    )
    err = to_connect_error(exc)
    assert err.code == Code.RESOURCE_EXHAUSTED
    detail, denial = err.details
    assert detail.type_name == "ramp.broker.v1.BudgetExhausted"
    assert denial.type_name == "ramp.broker.v1.Denial"
    info = bpb.BudgetExhausted.FromString(detail.message_bytes)
    assert (info.limit.amount, info.spent.amount, info.reserved.amount, info.remaining.amount,
            info.estimated_cost.amount) == ("10.00", "9.50", "0.25", "0.25", "1.00")
    assert info.layer == bpb.BUDGET_LAYER_SESSION
    assert info.mode == bpb.ENFORCEMENT_MODE_STRICT
    for text in ("9.50", "10.00", "0.25", "1.00", "session"):
        assert text in err.message


async def test_interceptor_maps_what_a_handler_raises() -> None:
    async def handler(request: Any, ctx: Any) -> Any:
        raise KeyError("internal-detail")

    with pytest.raises(ConnectError) as caught:
        await ErrorMapping().intercept_unary(handler, object(), object())  # type: ignore[arg-type]
    assert caught.value.code == Code.INTERNAL
    assert "internal-detail" not in caught.value.message


def test_a_store_failure_reaching_a_handler_is_unavailable_with_a_denial() -> None:
    from budget.stores.contract import StoreUnavailable

    err = to_connect_error(StoreUnavailable("redis timed out after 250 ms"))
    assert err.code == Code.UNAVAILABLE
    (detail,) = err.details
    denial = bpb.Denial.FromString(detail.message_bytes)
    assert (denial.reason, denial.layer) == ("store_unavailable", bpb.DENIAL_LAYER_STORE)
