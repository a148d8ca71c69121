"""Readiness: whether the broker can buy now, for grpc.health.v1.Health and GET /readyz.

A background task probes, every `readiness.interval_seconds`, each probe bounded by
`readiness.timeout_ms`:

- the budget store (when period budgets are configured): one read, the identity record of
  one account (`broker_store_operation_duration_seconds{operation="identity"}` counts it);
- every configured Exchange: `GET <endpoint>/healthz`. Any HTTP answer below 500 means the
  Exchange is up (one without that route answers 404, and that is an answer); no answer in
  time, a refused connection or a 5xx (a proxy in front of a dead Exchange) means down.

`Check`, `Watch` and `/readyz` only read the last probe's result. Each service is NOT_SERVING
while:

- "" (the whole broker, also `/readyz`) and `ramp.broker.v1.BrokerService`: it cannot buy, that
  is the store is unreachable and some scope fails closed, or every Exchange is down (or none is
  configured);
- `ramp.broker.v1.BudgetService`: the store is unreachable and some scope fails closed (budget
  status reads it as purchases do);
- `ramp.broker.v1.BudgetAdminService`: the store is unreachable (whatever the failure policies);
- all three also before the first probe has finished (starting);
- `grpc.health.v1.Health` and reflection: never, until the drain below.

Once the server starts draining (SIGTERM), every service is NOT_SERVING and `Watch` streams
end after saying so, so they do not hold the shutdown up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from grpc_health.v1 import health_pb2 as hpb

from broker.config import ReadinessSetting
from broker.rpc.codecs import MAX_BODY_BYTES, server_codecs, server_compressions
from budget.stores.contract import Store, StoreUnavailable
from ramp.grpc.health.v1.health_connect import HealthASGIApplication
from rpc_server.serving import ASGIApp

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
BROKER_SERVICE = "ramp.broker.v1.BrokerService"
BUDGET_SERVICE = "ramp.broker.v1.BudgetService"
ADMIN_SERVICE = "ramp.broker.v1.BudgetAdminService"

Status: TypeAlias = hpb.HealthCheckResponse.ServingStatus
SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = hpb.HealthCheckResponse.SERVICE_UNKNOWN

# What each service needs: (every Exchange down stops it, which store outage stops it).
_NEEDS: dict[str, tuple[bool, str | None]] = {
    "": (True, "closed"),
    BROKER_SERVICE: (True, "closed"),
    BUDGET_SERVICE: (False, "closed"),
    ADMIN_SERVICE: (False, "any"),
}
STARTING = "starting: the first readiness probe has not finished"
DRAINING = "shutting down"


class Readiness:
    """The last probe's answer, per service, and the task that probes."""

    def __init__(
        self, setting: ReadinessSetting, services: Iterable[str], *,
        store: Store | None = None, account: str | None = None, closed_scopes: bool = False,
        exchanges: Mapping[str, str] | None = None,
    ) -> None:
        self.services = frozenset({"", *services})
        self._interval_s = setting.interval_seconds
        self._timeout_ms = setting.timeout_ms
        self._store = store if account is not None else None
        self._account = account
        self._closed_scopes = closed_scopes
        self._exchanges = dict(exchanges or {})
        self._probed = False
        self._draining = False
        self._store_problem: str | None = None
        self._exchange_problems: dict[str, str] = {}
        self._changed = asyncio.Event()

    # --- answers -------------------------------------------------------------------------------

    def reasons(self, service: str = "") -> list[str] | None:
        """Why `service` cannot serve now ([] when it can); None for a service the broker lacks."""
        if service not in self.services:
            return None
        if self._draining:
            return [DRAINING]
        if service not in _NEEDS:
            return []
        if not self._probed:
            return [STARTING]
        exchanges, store = _NEEDS[service]
        found = []
        store_stops = store == "any" or (store == "closed" and self._closed_scopes)
        if self._store_problem is not None and store_stops:
            found.append("the budget store is unreachable"
                         + (": purchases charged to closed scopes are refused" if store == "closed" else ""))
        if exchanges and not self._exchanges:
            found.append("no Exchange is configured")
        elif exchanges and len(self._exchange_problems) == len(self._exchanges):
            found.append("every Exchange is down: " + ", ".join(
                f"{name} ({problem})" for name, problem in sorted(self._exchange_problems.items())))
        return found

    def status(self, service: str = "") -> Status | None:
        reasons = self.reasons(service)
        if reasons is None:
            return None
        return NOT_SERVING if reasons else SERVING

    async def watch(self, service: str) -> AsyncIterator[Status]:
        """The service's status now, then each change; ends after the drain has begun."""
        last: Status | None = None
        while True:
            changed = self._changed
            status = self.status(service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield status
                last = status
            if self._draining:
                return
            await changed.wait()

    def drain(self) -> None:
        """The server is shutting down: every service is NOT_SERVING from now on."""
        if not self._draining:
            self._draining = True
            log.info("readiness: shutting down, every service reports NOT_SERVING")
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- probing -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, draining: asyncio.Event | None = None) -> None:
        """Probe until `stop`; once `draining` is set, report the drain and stop probing."""
        draining = draining or asyncio.Event()
        async with httpx.AsyncClient(follow_redirects=False, timeout=self._timeout_ms / 1000) as client:
            while not (stop.is_set() or draining.is_set()):
                await self.probe(client)
                await _first_of(stop, draining, self._interval_s)
        if draining.is_set():
            self.drain()

    async def probe(self, client: httpx.AsyncClient) -> None:
        """Probe the store and every Exchange at once, and publish what changed."""
        store, *exchanges = await asyncio.gather(
            self._probe_store(), *(self._probe_exchange(client, url) for url in self._exchanges.values()))
        problems = {name: p for name, p in zip(self._exchanges, exchanges, strict=True) if p is not None}
        before = {s: self.reasons(s) for s in self.services}
        self._store_problem, self._exchange_problems, self._probed = store, problems, True
        after = {s: self.reasons(s) for s in self.services}
        if after == before:
            return
        if after[""] != before[""]:
            if after[""]:
                log.warning("broker not ready: %s", "; ".join(after[""] or ()))
            else:
                log.info("broker ready")
        self._notify()

    async def _probe_store(self) -> str | None:
        if self._store is None or self._account is None:
            return None
        try:
            async with asyncio.timeout(self._timeout_ms / 1000):
                await self._store.identity(self._account)
        except TimeoutError:
            problem = f"no answer in {self._timeout_ms} ms"
        except StoreUnavailable as exc:
            problem = str(exc)[:200] or type(exc).__name__
        except Exception as exc:
            log.exception("readiness: the store probe failed")
            problem = type(exc).__name__
        else:
            return None
        if self._store_problem is None:
            log.warning("readiness: the budget store is unreachable: %s", problem)
        return problem

    async def _probe_exchange(self, client: httpx.AsyncClient, endpoint: str) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_ms / 1000):
                answer = await client.get(endpoint.rstrip("/") + "/healthz")
        except TimeoutError:
            return f"no answer in {self._timeout_ms} ms"
        except httpx.HTTPError as exc:
            return "unreachable" if isinstance(exc, httpx.ConnectError) else type(exc).__name__
        return f"HTTP {answer.status_code}" if answer.status_code >= 500 else None


async def _first_of(a: asyncio.Event, b: asyncio.Event, timeout_s: float) -> None:
    """Until either event is set, for at most `timeout_s`."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)


class HealthService:
    """grpc.health.v1.Health over connectrpc (Check, List, Watch), from a Readiness."""

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    async def check(self, request: hpb.HealthCheckRequest, ctx: object, /) -> hpb.HealthCheckResponse:
        status = self._readiness.status(request.service)
        if status is None:
            shown = request.service if len(request.service) <= 64 else request.service[:64] + "..."
            raise ConnectError(Code.NOT_FOUND, f"unknown service {shown!r}")
        return hpb.HealthCheckResponse(status=status)

    async def list(self, request: hpb.HealthListRequest, ctx: object, /) -> hpb.HealthListResponse:
        return hpb.HealthListResponse(statuses={
            s: hpb.HealthCheckResponse(status=self._readiness.status(s)) for s in self._readiness.services})

    async def watch(
        self, request: hpb.HealthCheckRequest, ctx: object, /
    ) -> AsyncIterator[hpb.HealthCheckResponse]:
        async for status in self._readiness.watch(request.service):
            yield hpb.HealthCheckResponse(status=status)


def health_apps(readiness: Readiness, interceptors: Sequence[Interceptor] = ()) -> dict[str, ASGIApp]:
    """grpc.health.v1.Health, by the path prefix the Router serves it on (no key needed: probes
    such as Kubernetes' call without one)."""
    common: dict[str, Any] = {"interceptors": interceptors, "codecs": server_codecs(),
                              "compressions": server_compressions(), "read_max_bytes": MAX_BODY_BYTES}
    app = HealthASGIApplication(HealthService(readiness), **common)
    return {app.path: app}


def readyz(readiness: Readiness) -> Any:
    """GET /readyz: 200 {"status": "ready"}, or 503 {"status": "not ready", "reasons": [...]}."""

    async def route(method: str, body: Any) -> tuple[int, Any]:
        reasons = readiness.reasons("") or []
        if reasons:
            return 503, {"status": "not ready", "reasons": reasons}
        return 200, {"status": "ready"}

    return route
