"""A tool call's bad arguments in one plain sentence naming the argument.

The `mcp` SDK checks a tool's arguments against their pydantic model and reports pydantic's own
text ("1 validation error for buyArguments ... errors.pydantic.dev"), which names the argument
somewhere in the middle of a dump of types and links. An agent corrects an argument faster when
told which one, what it must be and what it sent: `max_price.amount must be a decimal string
such as "2.50" (got 2.5)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

# Longest rendering of what the caller sent, in characters.
_SHOWN = 40


def argument_path(loc: tuple[int | str, ...]) -> str:
    """("offers", 0, "exchange") -> "offers[0].exchange"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _form_key(loc: tuple[int | str, ...]) -> str:
    """The key of `forms` that says what the argument at `loc` must be: its name, or its list's
    name and "[]" for an item of a list."""
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return ""
    return f"{names[-1]}[]" if isinstance(loc[-1], int) else names[-1]


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


def _shown(value: Any) -> str:
    """What the caller sent, short: a scalar as JSON, a list by its length, an object by its keys."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object with " + (_short(", ".join(map(str, value))) or "no fields")
    if isinstance(value, str):
        return json.dumps(_short(value), ensure_ascii=False)
    try:
        return _short(json.dumps(value))
    except (TypeError, ValueError):
        return type(value).__name__


def argument_problem(exc: ValidationError, forms: Mapping[str, str]) -> tuple[str, str]:
    """The first bad argument's path and one sentence about it (naming any others too).

    `forms` says what an argument must be, by name ("amount") or, for a list's items, by the
    list's name and "[]" ("uris[]"); an argument it does not know is described in pydantic's
    words for the error, without the dump around them.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return "", "the arguments do not match the tool's input schema"
    first = errors[0]
    loc = tuple(first["loc"])
    path = argument_path(loc) or "the arguments"
    form = forms.get(_form_key(loc))
    if first["type"] == "missing":
        sentence = f"{path} is missing" + (f": it must be {form}" if form else "")
    elif form:
        sentence = f"{path} must be {form} (got {_shown(first['input'])})"
    else:
        msg = str(first["msg"])
        sentence = f"{path}: {msg[:1].lower()}{msg[1:]} (got {_shown(first['input'])})"
    others = list(dict.fromkeys(argument_path(tuple(e["loc"])) for e in errors[1:]))
    others = [o for o in others if o != path]
    if others:
        sentence += f"; also wrong: {', '.join(others)}"
    return argument_path(loc), sentence
