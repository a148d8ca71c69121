"""What the broker needs from an Exchange, whatever protocol it speaks."""

from __future__ import annotations

from typing import Protocol

from ramp.v1 import ramp_pb2 as rpb


class ExchangeError(Exception):
    """A call to an Exchange that did not produce an answer.

    `ambiguous` is True when the Exchange may have acted on the request anyway
    (timeout, dropped connection): for a purchase, money may have moved.
    """

    def __init__(self, exchange: str, kind: str, detail: str, *, ambiguous: bool) -> None:
        super().__init__(f"{exchange}: {kind}: {detail}")
        self.exchange = exchange
        self.kind = kind
        self.detail = detail
        self.ambiguous = ambiguous


class ExchangeAdapter(Protocol):
    @property
    def name(self) -> str: ...

    async def discover(self, query: rpb.ResourceQuery, timeout_s: float) -> rpb.ResourceResponse:
        """Offers for the query's URIs; raises ExchangeError."""
        ...

    async def execute(
        self, request: rpb.TransactionRequest, timeout_s: float
    ) -> rpb.TransactionResponse:
        """Buy; raises ExchangeError. Safe to retry with the same idempotency key."""
        ...

    async def close(self) -> None: ...
