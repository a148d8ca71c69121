"""A remote RAMP Exchange reached over Connect (binary protobuf)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from exchange_client.adapter import ExchangeError
from ramp.v1 import ramp_pb2 as rpb
from ramp.v1.ramp_connect import ExchangeServiceClient

Q = TypeVar("Q")
R = TypeVar("R")

# The Exchange answered and did not act: safe to treat as "nothing charged".
_DEFINITE = {
    Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE,
    Code.UNIMPLEMENTED, Code.UNAUTHENTICATED,
}


def _key_already_used(exc: ConnectError) -> bool:
    """The Exchange says this idempotency key was used before: it charged something under it once,
    so this is not a refusal but an unknown outcome (ALREADY_EXISTS, or RAMP's reference wording)."""
    text = exc.message
    return exc.code == Code.ALREADY_EXISTS or (
        exc.code == Code.INVALID_ARGUMENT and "idempotency_key" in text and "already used" in text)
# Grace over the RPC deadline before the local guard fires.
_GUARD_S = 0.25


class ConnectExchange:
    def __init__(self, name: str, endpoint: str) -> None:
        self._name = name
        # An explicitly owned transport, closed in close(): the shared default
        # one was seen to abort the interpreter at exit.
        self._transport = HTTPTransport(pool_idle_timeout=30.0)
        self._client = ExchangeServiceClient(
            endpoint.rstrip("/"), http_client=Client(self._transport), send_compression=None
        )

    @property
    def name(self) -> str:
        return self._name

    async def discover(self, query: rpb.ResourceQuery, timeout_s: float) -> rpb.ResourceResponse:
        return await self._call("discover", self._client.discover_resources, query, timeout_s)

    async def execute(
        self, request: rpb.TransactionRequest, timeout_s: float
    ) -> rpb.TransactionResponse:
        return await self._call("execute", self._client.execute_transaction, request, timeout_s)

    async def _call(
        self, what: str, method: Callable[..., Awaitable[R]], message: Q, timeout_s: float
    ) -> R:
        timeout_ms = max(1, int(timeout_s * 1000))
        try:
            async with asyncio.timeout(timeout_s + _GUARD_S):
                return await method(message, timeout_ms=timeout_ms)
        except TimeoutError:
            raise ExchangeError(self._name, "timeout", f"{what} took over {timeout_ms} ms",
                                ambiguous=True) from None
        except ConnectError as exc:
            if exc.code == Code.DEADLINE_EXCEEDED:
                raise ExchangeError(self._name, "timeout", f"{what} took over {timeout_ms} ms",
                                    ambiguous=True) from None
            raise ExchangeError(
                self._name, exc.code.value, exc.message[:200],
                ambiguous=exc.code not in _DEFINITE or _key_already_used(exc)
            ) from None
        except OSError as exc:
            raise ExchangeError(self._name, "unavailable", str(exc)[:200], ambiguous=True) from None

    async def close(self) -> None:
        await self._client.close()
        await self._transport.aclose()
