"""Automatic protection: what the evaluator costs, and how soon a trip commits.

    python bench/protection.py [--agents 1000] [--rounds 40] [--trips 20]

``--trips 0`` measures the decision cost only (for A/B runs against another checkout:
run this file with that checkout's interpreter, which imports that checkout's server).

1. Decision cost, against a real etcd: the elected evaluator's round (read every
   coordinator's counts, merge, 5 breakers, 10 CEL rules) with the counts of ``--agents``
   runs from 3 coordinators, when nothing changed and when every agent reports spend (and
   effects) with every beat, so a tenth of the runs moved since the last round. The median
   of the rounds' process CPU, converted to CPU per heartbeat of the fleet (agents beat 4
   times per lease TTL of 10 s; the evaluator decides 4 times a second).
2. Threshold crossed to halt committed: a real etcd and coordinator, a run whose writes
   fail half the time under an error-rate breaker; from the end of the write that crosses
   the threshold to the moment the SDK holds the degraded verdict (the halt committed and
   pushed), ``--trips`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tether
from tether_server._audit import AuditLog
from tether_server._etcd import Store
from tether_server._evaluator import EVALUATE_EVERY, Evaluator
from tether_server._halts import HaltTable
from tether_server._launch import CoordinatorProcess, EtcdProcess
from tether_server._policy_store import PolicyStore
from tether_server._store import counts_key, put_op

RULES = "\n".join(
    f"  - {{name: rule{k}, when: 'run.spend.usd > {100 + k}.0 || run.rates.error > 0.99',"
    " action: degrade}"
    for k in range(10)
)
BREAKERS = "\n".join(
    f"  - {{name: breaker{k}, error_rate: 0.99, min_calls: 20, scope: {s}}}"
    for k, s in enumerate(["run", "agent", "tenant", "run", "agent"])
)
POLICY = f"breakers:\n{BREAKERS}\nrules:\n{RULES}\n"
HEARTBEATS_PER_SECOND_PER_AGENT = 4 / 10.0
COORDINATORS = 3


def _counts(agents: int, bump: int) -> list[bytes]:
    """Each coordinator's published counts, a third of the runs each; at ``bump`` n, the
    runs whose beat came in the last 0.25 s (a tenth: they beat every 2.5 s) spent more."""
    docs: list[dict[str, dict[str, list[float]]]] = [
        {"runs": {}, "signals": {}} for _ in range(COORDINATORS)
    ]
    for i in range(agents):
        doc = docs[i % COORDINATORS]
        beats = (bump + 9 - i % 10) // 10  # how many of its beats spent, by round ``bump``
        doc["runs"][f"bench/a{i % 20}/r{i}"] = [100 + beats, 100 + beats, 1]
        doc["signals"][f"bench/a{i % 20}/r{i}/i{i}"] = [1.0 + beats * 0.01, 10 + beats, 1, 0]
    return [json.dumps(d).encode() for d in docs]


class _Published:
    """The coordinators' counts, as they publish them: running totals, which only grow
    (counts that fell would read as a coordinator restarted from zero, and count every
    run's effects, failures included, anew)."""

    def __init__(self, store: Store, agents: int) -> None:
        self.store, self.agents, self.bump = store, agents, 0

    async def publish(self, *, advance: bool) -> None:
        """Publish the counts; with ``advance``, after a tenth of the runs beat again."""
        self.bump += advance
        docs = _counts(self.agents, self.bump)
        await self.store.txn((), [put_op(counts_key(f"c{n}"), d) for n, d in enumerate(docs)])


async def _round_cpu(published: _Published, evaluator: Evaluator, rounds: int) -> dict[str, float]:
    """The median CPU of a round, in ms (the machine is shared: a median resists others)."""
    out = {}
    for label, changing in (("no counts changed", False), ("spend on every beat", True)):
        spent = []
        for r in range(rounds):
            if changing or r == 0:  # a coordinator publishes only when its counts changed
                await published.publish(advance=changing)
            started = time.process_time()
            await evaluator.decide(time.time())
            spent.append(time.process_time() - started)
        out[label] = statistics.median(spent) * 1e3
    return out


async def decision_cost(etcd: EtcdProcess, agents: int, rounds: int) -> dict[str, float]:
    """CPU per round with no policy (counts merged only), then with 10 rules, 5 breakers."""
    store = Store([etcd.endpoint])
    published = _Published(store, agents)
    out: dict[str, float] = {}
    for name, policy in (("no policy", ""), ("10 rules, 5 breakers", POLICY)):
        evaluator = Evaluator(store, "bench", HaltTable())
        await PolicyStore(store, AuditLog(store)).apply(policy, "bench")
        await evaluator.decide(time.time())  # parse the policy once, warm the windows
        cost = await _round_cpu(published, evaluator, rounds)
        out |= {f"{name}, {label}": ms for label, ms in cost.items()}
    return out


def trip_latency(etcd: EtcdProcess, work: Path, trips: int) -> list[float]:
    coordinator = CoordinatorProcess(etcd.url, lease_ttl=10.0)
    coordinator.log = work / "coordinator.log"
    coordinator.start(timeout=30)
    policy = (
        "breakers:\n  - {name: e, selector: {tenant: trip}, window: 60s, min_calls: 10,"
        " error_rate: 0.3, cooldown: 3600s}\n"
    )
    found = []
    try:
        with tether.AdminClient(coordinator.addr) as admin:
            admin.apply_policy(policy)
            for n in range(trips):
                found.append(_one_trip(coordinator.addr, f"t{n}"))
    finally:
        coordinator.stop()
    return found


def _one_trip(addr: str, run: str) -> float:
    kinds = {"send": "write"}
    with tether.Agent("agent://trip/mailer", run_id=run, target=addr, capabilities=kinds) as a:
        crossed = 0.0
        for i in range(10):  # the 10th write makes min_calls with 5 failed: 0.5 > 0.3
            try:
                with a.effect("send"):
                    if i % 2 == 0:
                        raise RuntimeError("down")
            except RuntimeError:
                pass
            crossed = time.monotonic()
        while not a.frozen("send"):
            time.sleep(0.001)
        return (time.monotonic() - crossed) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--trips", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-protect-") as tmp:
        etcd = EtcdProcess(Path(tmp) / "etcd", "bench").start()
        try:
            cost = asyncio.run(decision_cost(etcd, args.agents, args.rounds))
            latencies = trip_latency(etcd, Path(tmp), args.trips) if args.trips else []
        finally:
            etcd.stop()
    beats = args.agents * HEARTBEATS_PER_SECOND_PER_AGENT
    for label, ms in cost.items():
        per_beat = ms * 1e3 / EVALUATE_EVERY / beats
        print(f"evaluator round, {label}: {ms:.2f} ms CPU = {per_beat:.1f} us per heartbeat")
    if not latencies:
        return 0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"threshold crossed -> degraded verdict held: p50 {statistics.median(latencies):.0f} ms, "
        f"p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms over {len(latencies)} trips"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
