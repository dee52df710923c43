"""The evaluator forgets runs that ended: on a real etcd, an evaluator deciding rounds at
chosen times over counts published as a coordinator publishes them."""

from __future__ import annotations

import asyncio
import json
import time

from tether_server._audit import AuditLog
from tether_server._breakers import Totals
from tether_server._etcd import Store
from tether_server._evaluator import Evaluator, list_breakers
from tether_server._halts import HaltTable
from tether_server._policy_store import PolicyStore
from tether_server._store import RunKey, counts_key, put_op

from tests.conftest import Etcd

POLICY = """
breakers:
  - {{name: errors, selector: {{tenant: {t}}}, window: 10s, min_calls: 4, error_rate: 0.5}}
rules:
  - {{name: watch, selector: {{tenant: {t}}}, window: 10s, when: 'run.spend.usd > 99.0',
     action: notify}}
"""


def test_an_ended_run_is_forgotten_after_the_window_and_starts_afresh(
    etcd: Etcd, tenant: str
) -> None:
    asyncio.run(_ended_run(etcd, tenant))


async def _ended_run(etcd: Etcd, tenant: str) -> None:
    store = Store([etcd.endpoint])
    evaluator = Evaluator(store, "forget", HaltTable())
    fleet = evaluator._fleet
    await PolicyStore(store, AuditLog(store)).apply(POLICY.format(t=tenant), "test")
    run, name, agent = RunKey(tenant, "mailer", "r1"), f"{tenant}/mailer/r1", (tenant, "mailer")

    async def publish(runs: dict[str, list[int]], signals: dict[str, list[float]]) -> None:
        doc = json.dumps({"runs": runs, "signals": signals}).encode()
        await store.txn((), [put_op(counts_key(f"forget-{tenant}"), doc)])

    t = time.time()
    await publish({name: [3, 3, 1]}, {f"{name}/i1": [0.5, 10, 1, 0]})
    await evaluator.decide(t)
    assert fleet.totals(run) == Totals(3, 3, 1) and fleet.spend(run) == (0.5, 10, 1)
    await publish({}, {})  # the run ended: its coordinator forgot it
    await evaluator.decide(t + 1)
    await evaluator.decide(t + 6)  # a sweep, within the window: kept
    assert run in fleet.known_runs() and fleet.members_of(agent) == {run}
    await evaluator.decide(t + 12)  # a sweep, past the window: gone from every structure
    assert run not in fleet.known_runs() and fleet.members_of(agent) == set()
    assert fleet.totals(run) == fleet.totals(agent) == Totals() and fleet.spend(run) == (0, 0, 0)
    assert not any(run in of_window for of_window in evaluator._series.values())
    assert not any(run in seen for seen in evaluator._rules.decisions._seen.values())
    assert not [key for key in evaluator._keys if key[1] == run]

    # The same run id comes back (a new run of the agent): its own figures, nothing older.
    await publish({name: [4, 4, 3]}, {f"{name}/i2": [0.25, 2, 1, 0]})
    await evaluator.decide(t + 13)
    assert fleet.totals(run) == fleet.totals(agent) == Totals(4, 4, 3)
    assert fleet.spend(run) == (0.25, 2, 1)
    (breaker,) = (await list_breakers(store, tenant)).breakers
    assert breaker.reason == "error rate 0.75 over 10s (3/4) > 0.5", breaker.reason


def test_a_new_evaluator_counts_a_run_that_began_under_the_policy(etcd: Etcd, tenant: str) -> None:
    """Elected after a run's first counts were published (the last evaluator died, or the
    key was gone a moment): what the run did since it began under the policy is in its
    window, and a run that began before the policy is history."""
    asyncio.run(_elected_late(etcd, tenant))


async def _elected_late(etcd: Etcd, tenant: str) -> None:
    store = Store([etcd.endpoint])
    before = time.time() - 1.0
    await PolicyStore(store, AuditLog(store)).apply(POLICY.format(t=tenant), "test")
    began = time.time()
    runs = {f"{tenant}/mailer/old": [6, 6, 4], f"{tenant}/mailer/new": [6, 6, 4]}
    doc = {"runs": runs, "signals": {}, "began": {
        f"{tenant}/mailer/old": [before], f"{tenant}/mailer/new": [began],
    }}  # fmt: skip
    await store.txn((), [put_op(counts_key(f"late-{tenant}"), json.dumps(doc).encode())])
    await Evaluator(store, "late", HaltTable()).decide(time.time())  # its first round
    found = {b.subject: b.reason for b in (await list_breakers(store, tenant)).breakers}
    assert found == {f"{tenant}/mailer/new": "error rate 0.67 over 10s (4/6) > 0.5"}, found
