"""A minimal agent: declare a session budget, buy two resources, read the budget.

    .venv/bin/python examples/agent.py            # against the broker from `make run`
    BROKER_URL=http://127.0.0.1:9999 .venv/bin/python examples/agent.py
"""

from __future__ import annotations

import asyncio
import os
import uuid

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from ramp.broker.v1 import broker_pb2 as bpb
from ramp.broker.v1.broker_connect import BrokerServiceClient, BudgetServiceClient
from ramp.v1 import ramp_pb2 as rpb

BROKER = os.environ.get("BROKER_URL", "http://127.0.0.1:9090")


async def main() -> None:
    transport = HTTPTransport()  # owned and closed explicitly
    try:
        async with (
            BudgetServiceClient(BROKER, http_client=Client(transport)) as budgets,
            BrokerServiceClient(BROKER, http_client=Client(transport)) as broker,
        ):
            session = f"agent-{uuid.uuid4().hex[:8]}"
            await budgets.declare_session_budget(bpb.DeclareSessionBudgetRequest(
                session_id=session, limit=rpb.Cost(amount="1.00", currency="USD")))
            for uri in ["https://news.example/articles/1", "https://news.example/articles/2"]:
                try:
                    answer = await broker.transact(bpb.TransactRequest(
                        session_id=session, idempotency_key=uuid.uuid4().hex, uris=[uri]))
                    for item in answer.items:
                        print(f"bought {item.uri} for {item.result.cost.amount} "
                              f"{item.result.cost.currency}: {bpb.ItemStatus.Name(item.status)}")
                except ConnectError as err:
                    if err.code != Code.RESOURCE_EXHAUSTED:
                        raise
                    info = bpb.BudgetExhausted.FromString(err.details[0].message_bytes)
                    print(f"denied {uri}: {info.reason}; remaining {info.remaining.amount} "
                          f"{info.remaining.currency}, needs {info.estimated_cost.amount}; "
                          f"{info.next_action}")
            status = await budgets.get_budget_status(bpb.GetBudgetStatusRequest(session_id=session))
            for b in status.budgets:
                print(f"session {b.scope}: spent {b.spent.amount} of {b.limit.amount} "
                      f"{b.limit.currency}, remaining {b.remaining.amount}")
    finally:
        await transport.aclose()


if __name__ == "__main__":
    asyncio.run(main())
