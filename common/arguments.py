"""Command-line arguments shared by the commands that call a running broker (`ramp-broker budget`,
`holds`, `mcp`): its address and a timeout."""

from __future__ import annotations

import argparse
import os

import httpx


def http_url(given: str | None, env: str, default: str) -> str:
    """`--broker`, else $`env`, else `default`; checked to be an http(s) URL (ValueError naming
    where it came from)."""
    text = given or os.environ.get(env) or default
    where = "--broker" if given else env if os.environ.get(env) else "default"
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{where}: {text[:100]!r} is not an http:// or https:// URL (such as {default})")
    return text.rstrip("/")


def seconds_argument(text: str) -> float:
    """argparse type: seconds, more than 0 and at most an hour (a --timeout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 3600 seconds")
    return value
