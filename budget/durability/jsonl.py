"""Compact JSON for the records written on every purchase (journal lines, intents).

orjson encodes them several times faster than the standard library, byte-compatible with
what `json.loads` reads (compact separators, keys in insertion order), so journals and intents
written before it read back unchanged. What orjson refuses, integers beyond 64 bits (no amount
reaches them today: nano-units stay below 10^18) and strings with lone surrogates, the standard
library writes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """json.JSONDecodeError (a ValueError) on malformed input, as json.loads raises. What orjson
    refuses and the standard library reads (an escaped lone surrogate, as `dumps` may have written
    it) is read by the standard library."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
