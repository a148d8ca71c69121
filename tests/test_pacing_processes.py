"""Predictive pacing against broker processes on the wall clock (issue 23's targets, from outside).

The reference Exchange and two brokers run as processes (`ramp-broker serve`, one embedded store
shared by both). Each scope's limit is spread over what is left of a 60 s window (windows are
aligned to the Unix epoch): the limit is the even rate times the time from the start of the load to
the window's end, which the brokers' curve spreads evenly (the window's own curve runs far ahead of
an untouched budget, so it is lowered to the spend when the load starts). bench.pacing's drive()
offers purchases open loop at N x the even rate and scrapes every broker's gauge. Bounded: at most
33 s of waiting for a window with 25 s left, then at most 60 s of load, 120 purchases a second.

The same targets are checked exactly (seeded, on a simulated clock) by test_pacing.py; here the
bounds are the issue's, on real processes and a shared machine.
"""

from __future__ import annotations

import time
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

from bench.common import ITEM_PRICE, ITEM_URI
from bench.pacing import Load, Run, drive, next_window, scopes_config
from tests.harness import free_port
from tests.processes import broker_tree, catalog_tree, start_broker, start_exchange
from tests.test_pacing import HALF_LIFE_S, check_gauge, check_on_the_curve, issue_bound

PRICE = Decimal(ITEM_PRICE)
RATE = Decimal("0.05")  # each scope's even rate, USD a second: 5 purchases
STARTUP_S = 8.0  # the time given to start the three processes before the load begins
MIN_LOAD_S = 25.0  # less left of the current window than this: the next window


async def test_paced_budgets_follow_their_curve_in_broker_processes(tmp_path: Path) -> None:
    start, end = next_window(time.time() + STARTUP_S, MIN_LOAD_S)
    limit = (RATE * Decimal(str(end - start))).quantize(Decimal("0.01"), ROUND_DOWN)
    rules: dict[str, dict[str, Any]] = {
        "team:x2": {"pacing": "even"}, "team:x10": {"pacing": "even"}, "team:drop": {"pacing": "even"},
        "team:lease": {"pacing": "even", "mode": "lease"}}
    catalog = catalog_tree(offers=[{"uri": ITEM_URI, "offer_id": "p", "rate": ITEM_PRICE, "currency": "USD"}],
                           accounts={"ramp-broker": {"USD": "100000.00"}})

    # Twice the limit for the scope 2 brokers share: each admits as many purchases as a strict scope.
    limits = {scope: 2 * limit if scope == "team:lease" else limit for scope in rules}

    def tree(name: str) -> dict[str, Any]:
        paced = scopes_config(limits, rules, tmp_path, name, HALF_LIFE_S)
        paced["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        return broker_tree(exchange, session={"default_limit": {"amount": "100000.00", "currency": "USD"}},
                           **paced)

    async with start_exchange(tmp_path, catalog) as exchange:
        trees = [tree("1"), tree("2")]
        async with start_broker(tmp_path, trees[0], name="broker-1") as b1, \
                start_broker(tmp_path, trees[1], name="broker-2") as b2:
            run = Run(max(start, time.time()), 0.0, limits, PRICE)
            run.end = end - run.start
            half = run.end / 2
            await drive([Load("team:x2", (b1.url,), ((0, 2),)), Load("team:x10", (b1.url,), ((0, 10),)),
                         Load("team:drop", (b1.url,), ((0, 4), (half, 0.5))),
                         Load("team:lease", (b1.url, b2.url), ((0, 4),))],
                        run, [f"http://{t['metrics']['listen']}/metrics" for t in trees])
            stderr = b1.stderr + b2.stderr
    assert "Traceback" not in stderr
    for scope, attempts in run.attempts.items():
        assert not [a for a in attempts if a.status.startswith("error") or a.status == "late"], scope
    for scope, multiple, brokers in (("team:x2", 2.0, 1), ("team:x10", 10.0, 1), ("team:lease", 4.0, 2)):
        assert run.multiple(scope) >= 0.9 * multiple, f"{scope}: the load generator fell behind"
        check_on_the_curve(run, scope, run.multiple(scope))
        for broker in range(brokers):
            check_gauge(run, scope, broker)
    # Demand drops to half the curve's rate halfway: within 2 half-lives, every purchase is admitted.
    before = run.multiple("team:drop", until=half)
    bound = issue_bound(before, run.limits["team:drop"], run.even("team:drop"))
    assert run.deviation("team:drop", until=half) <= bound
    after = [a for a in run.attempts["team:drop"] if a.sent >= half + 2 * HALF_LIFE_S]
    assert after
    assert all(a.status == "ok" for a in after), [a for a in after if a.status != "ok"][:3]
