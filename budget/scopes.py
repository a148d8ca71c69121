"""Scope and account names: what may become part of a store key.

A scope is `kind:id` (`user:alice`, `team:eng`, `org:acme`, `billing:ref`).
Names are checked against a small ASCII alphabet before anything else sees
them, so nothing an agent sends can reach a store key unescaped: no braces
(Redis Cluster hash tags), no `|` (our key separator), no spaces, no second
colon, no look-alike unicode.
"""

from __future__ import annotations

import re

MAX_SCOPE_LENGTH = 160

_KIND = r"[a-z][a-z0-9_-]{0,31}"
_ID = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}"
_SCOPE = re.compile(rf"({_KIND}):({_ID})")
_ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ScopeError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_scope(value: str, field: str) -> str:
    if not value:
        raise ScopeError(field, "is required (kind:id, e.g. user:alice)")
    if len(value) > MAX_SCOPE_LENGTH:
        raise ScopeError(field, f"is longer than {MAX_SCOPE_LENGTH} characters")
    if not _SCOPE.fullmatch(value):
        raise ScopeError(
            field,
            "must be kind:id: kind is a-z, 0-9, _ or - (starting with a letter, at most 32); "
            "id is letters, digits and . _ @ + - (at most 128, ASCII only)",
        )
    return value


def check_account(value: str, field: str) -> str:
    if not _ACCOUNT.fullmatch(value):
        raise ScopeError(field, "must be 1-64 ASCII letters, digits and . _ - (starting alphanumeric)")
    return value


def billing_scope(billing_ref: str) -> str:
    """The scope a requester is charged to when it names none (RAMP keys budgets by billing_ref)."""
    return f"billing:{billing_ref}"
