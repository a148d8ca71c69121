"""Unique ids for reservations, journal entries and requests, without a system call each.

uuid4 reads 16 bytes from the kernel every time; here 64 random bits are read once per
process and a counter follows them, so ids from two processes (brokers on one store, or one
broker before and after a restart) differ in their first half, and ids of one process in
their second. Same shape as uuid4().hex: 32 lowercase hex digits.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
