"""Logging: plain text or one JSON object per line, with the request's ids on every record.

The request id (the caller's `x-request-id`, or a new one, echoed in the
response) and the purchase's idempotency key live in context variables, so every
record logged while serving a request carries them, including records from the
purchase task it started. Amounts are logged as decimal strings, never floats.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from typing import Any

from connectrpc.request import RequestContext
from pythonjsonlogger.json import JsonFormatter

from common.ids import new_id

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
IDEMPOTENCY_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("idempotency_key", default="")
_GIVEN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _Ids(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.idempotency_key = IDEMPOTENCY_KEY.get()
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{name}={value}" for name in ("request_id", "idempotency_key")
                       if (value := getattr(record, name, "")))
        return f"{line} [{ids}]" if ids else line


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send every record to stderr as text or JSON (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Ids())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        ))
    else:
        handler.setFormatter(_Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO: the readiness probes alone would add a line every few
    # seconds. Its request lines show at DEBUG.
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


class RequestIds:
    """Metadata interceptor, first in every chain: a request id for every call, in the logs and
    the response headers, set before the body is read so even a refused call carries one."""

    async def on_start(self, ctx: RequestContext[Any, Any]) -> contextvars.Token[str]:
        given = ctx.request_headers.get("x-request-id", "")
        request_id = given if _GIVEN_ID.fullmatch(given) else new_id()
        ctx.response_headers["x-request-id"] = request_id
        return REQUEST_ID.set(request_id)

    async def on_end(
        self, token: contextvars.Token[str], ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        REQUEST_ID.reset(token)
