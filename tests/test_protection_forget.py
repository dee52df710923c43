"""The evaluator forgets runs that ended: on a real etcd, an evaluator deciding rounds at
chosen times over counts published as a coordinator publishes them."""

from __future__ import annotations

import asyncio
import json
import time

from tether_server._audit import AuditLog
from tether_server._breakers import BreakerState, State, Totals
from tether_server._etcd import Store
from tether_server._evaluator import Evaluator, list_breakers, state_json
from tether_server._halts import HaltTable
from tether_server._policy_store import PolicyStore
from tether_server._store import RunKey, breaker_key, counts_key, put_op

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


ANOMALIES = """
breakers:
  - {{name: odd, selector: {{tenant: {t}}}, window: 10s, min_calls: 4, anomaly_rate: 0.5}}
"""


def test_a_new_evaluator_takes_a_moved_runs_lifetime_anomalies_as_history(
    etcd: Etcd, tenant: str
) -> None:
    """A run whose coordinator died reconnects elsewhere, and that coordinator stamps it as
    begun now. Its effects are counted there from zero, but its anomalies are the
    instance's lifetime totals: a newly elected evaluator must not read them as all fresh
    (50 anomalies against 6 effects would trip the breaker on a healthy run)."""
    asyncio.run(_moved(etcd, tenant))


async def _moved(etcd: Etcd, tenant: str) -> None:
    store = Store([etcd.endpoint])
    await PolicyStore(store, AuditLog(store)).apply(ANOMALIES.format(t=tenant), "test")
    run, instance = f"{tenant}/mailer/moved", f"{tenant}/mailer/moved/i1"
    doc = {
        "runs": {run: [6, 6, 0]},
        "signals": {instance: [0.0, 0, 0, 50]},
        "began": {run: [time.time()]},
    }
    await store.txn((), [put_op(counts_key(f"b-{tenant}"), json.dumps(doc).encode())])
    evaluator = Evaluator(store, "late", HaltTable())
    await evaluator.decide(time.time())  # its first round
    assert (await list_breakers(store, tenant)).breakers == []
    doc["runs"] = {run: [12, 12, 0]}  # six more effects and eight new anomalies
    doc["signals"] = {instance: [0.0, 0, 0, 58]}
    await store.txn((), [put_op(counts_key(f"b-{tenant}"), json.dumps(doc).encode())])
    await evaluator.decide(time.time() + 1.0)
    found = {b.subject: b.reason for b in (await list_breakers(store, tenant)).breakers}
    reason = "anomaly rate 0.67 over 10s (8/12) > 0.5"  # the eight new ones count
    assert found == {f"{tenant}/mailer/moved": reason}, found


def test_a_half_open_breaker_whose_subject_counts_afresh_still_reopens(
    etcd: Etcd, tenant: str
) -> None:
    """HALF_OPEN began at totals larger than the subject's now (its runs were forgotten and
    a new run came back under the name): the evaluator stores the new probe base, so a
    failing probe reopens the breaker instead of every round re-basing and dropping it."""
    asyncio.run(_half_open(etcd, tenant))


async def _half_open(etcd: Etcd, tenant: str) -> None:
    store = Store([etcd.endpoint])
    await PolicyStore(store, AuditLog(store)).apply(POLICY.format(t=tenant), "test")
    subject, name = (tenant, "mailer", "r1"), f"{tenant}/mailer/r1"
    half = BreakerState(State.HALF_OPEN, since=time.time(), probe_base=Totals(600, 500, 100, 0))
    await store.txn((), [put_op(breaker_key("errors", subject), state_json(half, {}))])

    async def publish(counts: list[int]) -> None:
        doc = json.dumps({"runs": {name: counts}, "signals": {}}).encode()
        await store.txn((), [put_op(counts_key(f"half-{tenant}"), doc)])

    evaluator, t = Evaluator(store, "half", HaltTable()), time.time()
    await publish([2, 2, 0])
    await evaluator.decide(t)  # below the base: the probes count from (2, 2, 0)
    await publish([4, 4, 1])  # two probe writes, one failed
    await evaluator.decide(t + 1)
    (breaker,) = (await list_breakers(store, tenant)).breakers
    assert breaker.state == "open", breaker
    assert breaker.reason == "1 of 2 probe writes failed in HALF_OPEN", breaker.reason
