"""Failover: agents of a dead coordinator running elsewhere, and kills during an etcd
leader change.

- Coordinator death: two coordinators on one etcd; N SDK agents, each given both addresses
  with the doomed one first, so all of them start on it. It is SIGKILLed; each agent's moment
  of registering again on the other coordinator with a running verdict is taken in its
  ``on_reply`` hook. Meanwhile a poller notes every agent whose ``check()`` raised
  ``TetherLost`` (failed closed) before it got there.
- etcd leader change: a 3-member etcd cluster with etcd's default election timing
  (heartbeat 100 ms, election timeout 1 s), one coordinator given all three endpoints, N
  agents on it. Each round SIGKILLs the leader, issues a tenant kill at once, times every
  agent's Killed from the issue, resumes, then watches the fleet for two lease TTLs: any
  agent that failed closed in the round was stopped by mistake. The member is restarted
  before the next round. Lease TTL 5 s or more: the coordinator must prove its halt view
  fresh within the TTL, and a leaderless cluster takes 1 to 2 s to elect with the default
  timing, so a smaller TTL can fail agents closed (the chaos test elects in 0.5 to 1 s for
  its 3 s TTL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import tether
from tether_server import CoordinatorProcess, EtcdCluster

from bench.fleet import Fleet, Worker
from bench.harness import Bench, say
from bench.md import Row, fmt, table, verdict
from bench.phase import Flag, Phase, Results
from bench.stats import Summary, summary
from bench.tls import TENANT


@dataclass(frozen=True)
class Settings:
    agents: int = 200
    rounds: int = 3
    ttl: float = 5.0


@dataclass
class CoordinatorRound:
    agents: int = 0
    moved_ms: list[float] = field(default_factory=list)  # SIGKILL -> RUN on the other
    missing: int = 0  # never ran again on the other within the wait
    failed_closed: int = 0  # check() raised TetherLost on the way


@dataclass
class LeaderRound:
    agents: int = 0
    kill_rpc_ms: float = 0.0  # from the first attempt until one was accepted
    refused: int = 0  # Kill attempts refused (UNAVAILABLE) before one was accepted
    refusal: str = ""  # what the first refusal said
    from_issue_ms: list[float] = field(default_factory=list)
    missing: int = 0  # never saw the kill
    not_resumed: int = 0
    failed_closed: int = 0  # stopped by mistake: TetherLost at any time in the round
    failed_closed_before_kill: int = 0


@dataclass
class Result:
    lease_ttl_s: float = 0.0
    coordinator: list[CoordinatorRound] = field(default_factory=list)
    leader: list[LeaderRound] = field(default_factory=list)
    moved_ms: Summary = field(default_factory=Summary)
    kill_ms: Summary = field(default_factory=Summary)


# -- coordinator death --------------------------------------------------------------------------


def _coordinator_round(bench: Bench, cfg: Settings, n: int) -> CoordinatorRound:
    with bench.cluster(f"failover-coordinator-{n}", 2, ttl=cfg.ttl) as (_, (doomed, spare)):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        try:
            grown = fleet.grow_sdk(
                cfg.agents, [doomed.addr, spare.addr], deadline=120, every_target=True
            )
            time.sleep(1.0)
            worker = fleet.workers[0]
            worker.call("watch_lost")
            killed = time.monotonic()
            doomed.send(signal.SIGKILL)
            wait = 3 * cfg.ttl + 10
            moved = worker.call("regranted", within=wait + 30, since=killed, timeout=wait)
            lost = worker.call("lost_seen")
        finally:
            fleet.kill()
    out = CoordinatorRound(
        agents=grown.reached,
        moved_ms=[round((t - killed) * 1e3, 2) for t in moved["times"]],
        missing=int(moved["missing"]),
        failed_closed=len(lost["times"]),
    )
    s = summary(out.moved_ms)
    say(
        f"failover: coordinator round {n}: {out.agents} agents, p50/p99/max "
        f"{s.p50}/{s.p99}/{s.max} ms, missing {out.missing}, failed closed {out.failed_closed}"
    )
    return out


# -- etcd leader change -------------------------------------------------------------------------


@contextlib.contextmanager
def _etcd_cluster(bench: Bench, cfg: Settings) -> Iterator[tuple[EtcdCluster, str]]:
    """Three etcd members (default elections) and one coordinator given every endpoint."""
    base = bench.scratch / "failover-cluster"
    base.mkdir(parents=True, exist_ok=True)
    cluster = EtcdCluster(base / "etcd", log_dir=bench.logs)
    coord: CoordinatorProcess | None = None
    try:
        cluster.start()
        env = {**os.environ, "TETHER_LOG_LEVEL": "WARNING", "OTEL_SDK_DISABLED": "true"}
        coord = CoordinatorProcess(
            cluster.urls, lease_ttl=cfg.ttl, log=bench.logs / "failover-coordinator.log", env=env
        )
        bench.procs.own(coord)
        coord.start()
        yield cluster, coord.addr
    finally:
        if coord is not None:
            coord.kill()
        cluster.stop()


def _kill_until_accepted(admin: tether.AdminClient, sel: tether.Selector) -> list[str]:
    """Issue the kill, again at once each time it is refused, as an operator would.

    The coordinator does not retry etcd calls (a write that timed out may have landed), so
    a Kill that meets the election gets UNAVAILABLE ("leader changed", "no leader").
    Returns what each refused attempt said.
    """
    refused: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        try:
            admin.kill(sel, "bench: kill during an etcd leader change")
            return refused
        except tether.Unavailable as err:
            refused.append(str(err))
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _leader_round(
    cluster: EtcdCluster, admin: tether.AdminClient, fleet: Fleet, cfg: Settings
) -> LeaderRound:
    """SIGKILL the leader, kill the tenant at once, resume, watch; restart the member."""
    worker: Worker = fleet.workers[0]
    sel, wait = tether.selector(tenant=TENANT), 10 + cfg.agents / 100
    leader = cluster.leader()
    worker.call("watch_lost")
    fleet.all("arm")
    leader.kill()
    issued = time.monotonic()
    refused = _kill_until_accepted(admin, sel)
    returned = time.monotonic()
    killed = fleet.arrivals("killed", wait)
    fleet.all("arm")
    admin.resume(sel, "bench: resume")
    _, not_resumed = fleet.times("running", wait)
    time.sleep(2 * cfg.ttl)  # would anyone fail closed once the dust settles?
    lost = [float(t) for t in worker.call("lost_seen")["times"]]
    cluster.restart(leader)
    time.sleep(2.0)  # the member catches up before the next round
    return LeaderRound(
        agents=cfg.agents,
        kill_rpc_ms=round((returned - issued) * 1e3, 2),
        refused=len(refused),
        refusal=refused[0] if refused else "",
        from_issue_ms=[round((t - issued) * 1e3, 2) for t in killed.times],
        missing=killed.missing,
        not_resumed=not_resumed,
        failed_closed=len(lost),
        failed_closed_before_kill=sum(1 for t in lost if t < issued),
    )


def _leader_rounds(bench: Bench, cfg: Settings) -> list[LeaderRound]:
    out: list[LeaderRound] = []
    with _etcd_cluster(bench, cfg) as (cluster, addr):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        try:
            fleet.grow_sdk(cfg.agents, [addr], deadline=120)
            time.sleep(1.0)
            with tether.AdminClient(addr, timeout=60) as admin:
                for n in range(1, cfg.rounds + 1):
                    r = _leader_round(cluster, admin, fleet, cfg)
                    s = summary(r.from_issue_ms)
                    say(
                        f"failover: leader round {n}: {r.refused} refused, kill rpc "
                        f"{r.kill_rpc_ms} ms, p50/p99 "
                        f"{s.p50}/{s.p99} ms, missing {r.missing}, failed closed "
                        f"{r.failed_closed} ({r.failed_closed_before_kill} before the kill)"
                    )
                    out.append(r)
        finally:
            fleet.kill()
    return out


def failover(bench: Bench, cfg: Settings) -> Result:
    out = Result(lease_ttl_s=cfg.ttl)
    out.coordinator = [_coordinator_round(bench, cfg, n) for n in range(1, cfg.rounds + 1)]
    out.moved_ms = summary([x for r in out.coordinator for x in r.moved_ms])
    out.leader = _leader_rounds(bench, cfg)
    out.kill_ms = summary([x for r in out.leader for x in r.from_issue_ms])
    return out


# -- the report ---------------------------------------------------------------------------------


def _coordinator_row(n: int, r: CoordinatorRound) -> Row:
    s = summary(r.moved_ms)
    return [
        str(n), fmt(r.agents), fmt(s.p50, 0), fmt(s.p99, 0), fmt(s.max, 0),
        fmt(r.missing), fmt(r.failed_closed),
    ]  # fmt: skip


def _leader_row(n: int, r: LeaderRound) -> Row:
    s = summary(r.from_issue_ms)
    return [
        str(n), fmt(r.agents), fmt(r.refused), fmt(r.kill_rpc_ms, 0), fmt(s.p50, 0),
        fmt(s.p99, 0), fmt(s.max, 0), fmt(r.missing), fmt(r.failed_closed),
    ]  # fmt: skip


def _refusal(res: Result) -> str:
    said = next((r.refusal for r in res.leader if r.refusal), "")
    return f"it said: {said!r}" if said else "none was refused in this run"


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    ttl = f"{res.lease_ttl_s:g} s"
    apart = results.record.get("merged", {}).get(PHASE.name)
    measured = (
        f"Measured apart from the run above, with `{apart['command']}` on {apart['date']} "
        f"(commit {apart['commit'][:10]}), and merged into `results.json`.\n\n"
        if apart
        else ""
    )
    co, ki = res.moved_ms, res.kill_ms
    return [
        "## Failover: a coordinator dies, an etcd leader dies\n",
        measured + f"Two coordinators (lease TTL {ttl}) on one etcd; every agent is given both "
        "addresses and starts on the first, which is SIGKILLed. Time from the SIGKILL until "
        "each agent holds a running verdict from the other coordinator, and how many failed "
        f"closed (`TetherLost`) on the way. All rounds: p50 {fmt(co.p50, 0)} ms, p99 "
        f"{fmt(co.p99, 0)} ms, max {fmt(co.max, 0)} ms.\n\n"
        + table(["round", "agents", "p50 ms", "p99 ms", "max ms", "never", "failed closed"],
                [_coordinator_row(i, r) for i, r in enumerate(res.coordinator, 1)])
        + "\nA 3-member etcd cluster with etcd's default election timing (election timeout "
        f"1 s), one coordinator (lease TTL {ttl}) given all three endpoints. Each round "
        "SIGKILLs the etcd leader and issues a tenant kill at once. The coordinator does "
        "not retry etcd calls, so a Kill that meets the election is refused with UNAVAILABLE "
        f"({_refusal(res)}); the bench then issues it again at once, as an operator would "
        "(\"Kill refused\": attempts refused; \"Kill RPC\": from the first attempt until one "
        "was accepted). Kill latency is from the first attempt; \"failed closed\" counts "
        "agents stopped by mistake (`TetherLost`) from the SIGKILL until two TTLs after "
        "the resume. The member is restarted between rounds. "
        f"All rounds: p50 {fmt(ki.p50, 0)} ms, p99 {fmt(ki.p99, 0)} ms. With the default "
        "election timing a lease TTL under about 5 s can fail agents closed: the coordinator "
        "must prove its halt view fresh within the TTL, and a leaderless cluster takes 1 to "
        "2 s to elect (the chaos test runs 3 s with a 0.5 s election timeout).\n\n"
        + table(["round", "agents", "Kill refused", "Kill RPC ms", "p50 ms", "p99 ms",
                 "max ms", "never", "failed closed"],
                [_leader_row(i, r) for i, r in enumerate(res.leader, 1)]),
    ]  # fmt: skip


def budgets(results: Results) -> list[Row]:
    res = results.of(PHASE)
    if res is None or not res.leader:
        return [["losing one etcd member of three", "0 agents stopped", "-", verdict(None)]]
    stopped = sum(r.failed_closed for r in res.leader)
    missed = sum(r.missing for r in res.leader)
    text = (
        f"{stopped} of {res.leader[0].agents} agents stopped by mistake, etcd leader "
        f"SIGKILLed {len(res.leader)} times (lease TTL {res.lease_ttl_s:g} s); a kill issued at "
        f"once reached all but {missed}, p99 {fmt(res.kill_ms.p99, 0)} ms"
    )
    return [["losing one etcd member of three", "0 agents stopped", text, verdict(stopped == 0)]]


PHASE = Phase(
    name="failover",
    about="agents of a SIGKILLed coordinator running on the other; kills during an etcd "
    "leader change",
    result=Result,
    run=failover,
    defaults=Settings(),
    quick=Settings(agents=50, rounds=1),
    flags=(
        Flag("--failover-agents", "agents", int, "agents in the failover phase"),
        Flag("--failover-rounds", "rounds", int, "rounds of each failover measurement"),
        Flag("--failover-ttl", "ttl", float, "lease TTL of the failover phase (5 s or more)"),
    ),
    budgets=budgets,
    section=section,
)
