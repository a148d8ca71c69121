"""The broker's idempotency cache: what a key keeps once its purchase has answered."""

from __future__ import annotations

import asyncio

import pytest

from broker.purchase.idempotency import Entry, IdempotencyCache
from ramp.broker.v1 import broker_pb2 as bpb


async def test_an_answered_purchase_keeps_its_answer_not_its_task() -> None:
    """A finished task keeps its coroutine and context alive: at 100,000 keys, full garbage
    collections of tens of milliseconds. Once answered, a key holds only the answer."""
    answer = bpb.TransactResponse(idempotency_key="k1")

    async def purchase() -> bpb.TransactResponse:
        await asyncio.sleep(0)
        return answer

    entry = Entry("fp", asyncio.create_task(purchase()))
    assert entry.running()
    assert await entry.result() is answer
    await asyncio.sleep(0)  # the task's done-callbacks
    assert (entry.task, entry.answer) == (None, answer)
    assert await entry.result() is answer  # a retry: no task to wait for


async def test_a_failed_purchase_keeps_its_error_for_retries() -> None:
    async def purchase() -> bpb.TransactResponse:
        raise RuntimeError("after the wire")

    entry = Entry("fp", asyncio.create_task(purchase()))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="after the wire"):
            await entry.result()
    assert entry.task is not None
    assert entry.answer is None


async def test_a_purchase_in_flight_is_never_forgotten() -> None:
    gate = asyncio.Event()

    async def purchase() -> bpb.TransactResponse:
        await gate.wait()
        return bpb.TransactResponse()

    cache = IdempotencyCache(1)
    running = Entry("fp", asyncio.create_task(purchase()))
    cache.add(("a", "k1"), running)
    cache.add(("a", "k2"), Entry("fp", None, bpb.TransactResponse()))
    assert cache.find(("a", "k1"), "fp") is running  # over the size, but still running
    gate.set()
    await running.result()
    cache.add(("a", "k3"), Entry("fp", None, bpb.TransactResponse()))
    assert cache.find(("a", "k1"), "fp") is None
