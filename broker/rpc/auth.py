"""Who is calling: agents by their API key, operators by the admin token.

Agents present an API key (`authorization: Bearer <key>` or `x-api-key`); the
config maps each key, by its SHA-256, to an account, the scopes it is always
charged to, and the scopes it may name. Naming any other scope is refused
before anything is read or written. With no agents configured the broker needs
no credential and has no period scopes.

The caller is identified from the headers by a metadata interceptor that runs
before the request body is read: an unknown key costs the broker no decoding.
The identity is the owner of everything the caller creates (sessions,
idempotency keys and their replays); handlers read it with `caller()`. Which scopes its
purchases are charged to is broker.purchase.agents'.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from connectrpc.request import RequestContext

from broker.config import AgentSetting, BrokerConfig, ChargeSetting
from broker.purchase.agents import ANONYMOUS, Agent
from broker.refusals import PermissionDenied, Unauthenticated
from broker.rpc.errors import ErrorMapping
from budget.scopes import billing_scope
from common.configfile import ConfigError

log = logging.getLogger(__name__)
_CALLER: contextvars.ContextVar[Agent | None] = contextvars.ContextVar("caller", default=None)


def caller() -> Agent:
    """The caller of the request being served, as `Authenticate` identified it."""
    agent = _CALLER.get()
    if agent is None:
        raise RuntimeError("no caller identified: Authenticate must be the first interceptor")
    return agent


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return headers.get("x-api-key") or None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _agent(agent_id: str, a: ChargeSetting) -> Agent:
    return Agent(
        id=agent_id, account=a.account,
        billing_scope=billing_scope(a.billing_ref) if a.billing_ref else None,
        charged_to=tuple(a.charged_to), may_name=frozenset(a.may_name),
    )


class Authenticator:
    def __init__(self, agents: Sequence[AgentSetting], anonymous: ChargeSetting | None = None) -> None:
        self._anonymous = _agent("anonymous", anonymous) if anonymous else ANONYMOUS
        self._by_digest: dict[str, Agent] = {}
        owners: dict[str, str] = {}
        for i, a in enumerate(agents):
            if a.key_env is not None:
                key = os.environ.get(a.key_env)
                if not key:
                    raise ConfigError(f"agents.{i}.key_env: environment variable {a.key_env} is not set")
                digest = _digest(key)
            else:
                assert a.key_sha256 is not None
                digest = a.key_sha256
            if digest in owners:
                # One key, two identities: whichever won would own the other's sessions and keys.
                raise ConfigError(f"agents.{i}: agents {owners[digest]} and {a.id} have the same API key")
            owners[digest] = a.id
            self._by_digest[digest] = _agent(a.id, a)

    def identify(self, headers: Mapping[str, str]) -> Agent:
        key = _bearer(headers)
        if key is None:
            if self._by_digest and self._anonymous is ANONYMOUS:
                raise Unauthenticated("an API key is required: send 'authorization: Bearer <key>'")
            return self._anonymous
        agent = self._by_digest.get(_digest(key))
        if agent is None:
            raise Unauthenticated("unknown API key")
        return agent


class Authenticate:
    """Metadata interceptor, ahead of the body: identifies the caller or refuses the call."""

    def __init__(self, auth: Authenticator, errors: ErrorMapping) -> None:
        self._auth = auth
        self._errors = errors

    async def on_start(self, ctx: RequestContext[Any, Any]) -> contextvars.Token[Agent | None]:
        try:
            agent = self._auth.identify(ctx.request_headers)
        except Unauthenticated as exc:
            raise self._errors.connect_error(exc) from None
        return _CALLER.set(agent)

    async def on_end(
        self, token: contextvars.Token[Agent | None], ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        _CALLER.reset(token)


class RequireAdmin:
    """Metadata interceptor, ahead of the body: the admin API takes the operator's token only."""

    def __init__(self, token: AdminToken, errors: ErrorMapping) -> None:
        self._token = token
        self._errors = errors

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        try:
            self._token.check(ctx.request_headers)
        except (Unauthenticated, PermissionDenied) as exc:
            raise self._errors.connect_error(exc) from None

    async def on_end(self, token: None, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        pass


class AdminToken:
    """The operator's token for the admin API, from the environment; the API is off without it."""

    def __init__(self, config: BrokerConfig) -> None:
        name = config.admin.token_env
        self._token = os.environ.get(name) if name else None
        self._off = (f"the admin API is disabled: environment variable {name} (admin.token_env) is not set"
                     if name else "the admin API is disabled: no admin.token_env is configured")
        if name and not self._token:
            # Off is the safe side: nobody can change limits until the operator sets it.
            log.warning("admin API disabled: environment variable %s (admin.token_env) is not set", name)

    def check(self, headers: Mapping[str, str]) -> None:
        if self._token is None:
            raise PermissionDenied("authorization", self._off, reason="admin_api_disabled", scope="admin")
        given = _bearer(headers)
        if given is None or not hmac.compare_digest(given.encode(), self._token.encode()):
            raise Unauthenticated("the admin API needs 'authorization: Bearer <admin token>'",
                                  reason="admin_token_invalid")
