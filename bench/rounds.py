"""Kill rounds at one fleet size: the fleet at rest, then Kill and Resume, timed per agent.

Used by the kill phases (bench/phases/kill.py). Each agent's moment of observing the kill
is taken inside its SDK with ``time.monotonic()``, which all processes on this machine
share; latencies are taken from the moment the Kill RPC was issued and from its return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import tether

from bench.fleet import Fleet, Grow
from bench.harness import cpu_percent, log_lines, say
from bench.infra import Coordinator, Etcd
from bench.record import OMIT
from bench.stats import Summary, summary
from bench.tls import TENANT

LOST_ETCD = "coordinator lost etcd"


@dataclass
class Idle:
    """Heartbeats per second and coordinator CPU while nothing but heartbeats happens."""

    heartbeats_per_s: float = 0.0
    coordinator_cpu_pct: list[float] = field(default_factory=list)
    # etcd's load meanwhile: request messages it received per second (every method, unary
    # and stream), the measure the polling baseline is compared at
    etcd_requests_per_s: float | None = field(default=None, metadata=OMIT)


@dataclass
class Attempt:
    """A fleet grown to ``agents``, then watched at rest: did the coordinators hold it?"""

    agents: int = 0
    grow: Grow = field(default_factory=Grow)
    idle: Idle = field(default_factory=Idle)
    connections: list[int] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    running: int = 0
    idle_lost: int = 0
    idle_coordinator_lost_etcd: int = 0
    stable: bool = False


@dataclass
class Unseen:
    """Agents that never saw a round's kill: their state, and when they last registered."""

    by_state: dict[str, int] = field(default_factory=dict)
    never_regranted: int = 0
    regranted_before_kill_returned: int = 0
    regranted_after_kill_returned: dict[str, int] = field(default_factory=dict)


@dataclass
class RoundLine:
    kill_rpc_ms: float = 0.0
    p50_from_issue_ms: float | None = None
    max_from_issue_ms: float | None = None
    missing: int = 0
    lost: int = 0
    reconnects: int = 0


@dataclass
class Size(Attempt):
    """A size that was held, with its rounds of Kill and Resume summed up."""

    rounds: int = 0
    from_issue_ms: Summary = field(default_factory=Summary)
    from_return_ms: Summary = field(default_factory=Summary)
    round_max_from_issue_ms: Summary = field(default_factory=Summary)
    kill_rpc_ms: Summary = field(default_factory=Summary)
    resume_from_issue_ms: Summary = field(default_factory=Summary)
    missing: int = 0
    not_resumed: int = 0
    lost: int = 0
    reconnects: int = 0
    effects_after_kill_returned: int = 0
    effects_after_own_killed: int = 0
    unseen_kill: list[Unseen] = field(default_factory=list)
    per_round: list[RoundLine] = field(default_factory=list)
    collapsed: str | None = field(default=None, metadata=OMIT)
    coordinator_lost_etcd: int = 0


@dataclass
class Round:
    """One Kill and Resume, per agent (not recorded as such: ``Size`` sums rounds up)."""

    kill_rpc_ms: float
    from_issue_ms: list[float]
    from_return_ms: list[float]
    missing: int
    resume_from_issue_ms: list[float]
    not_resumed: int
    lost: int
    reconnects: int
    effects_after_kill_returned: int
    effects_after_own_killed: int
    unseen_kill: Unseen | None


def lost_etcd(coords: list[Coordinator]) -> int:
    """'lost etcd' lines in the coordinators' logs so far."""
    return sum(log_lines(c, LOST_ETCD) for c in coords)


def etcd_requests(etcd: Etcd) -> float:
    """Request messages etcd has received so far, over every method."""
    return sum(v for k, v in etcd.metrics().items() if k.startswith(_RECEIVED))


_RECEIVED = "grpc_server_msg_received_total:"


def _idle_window(
    coords: list[Coordinator], fleet: Fleet, seconds: float, etcd: Etcd | None
) -> Idle:
    cpu0 = [c.cpu_seconds() for c in coords]
    replies0 = fleet.total("replies")
    requests0 = etcd_requests(etcd) if etcd is not None else 0.0
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    replies = fleet.total("replies") - replies0
    requests = etcd_requests(etcd) - requests0 if etcd is not None else None
    return Idle(
        heartbeats_per_s=round(replies / elapsed, 1),
        coordinator_cpu_pct=[
            cpu_percent(b, c.cpu_seconds(), elapsed) for b, c in zip(cpu0, coords, strict=True)
        ],
        etcd_requests_per_s=None if requests is None else round(requests / elapsed, 2),
    )


def settle(
    coords: list[Coordinator], fleet: Fleet, grown: Grow, seconds: float, etcd: Etcd | None = None
) -> Attempt:
    """The fleet at rest: load, memory, connections, and whether anything failed closed."""
    lost0, lost_etcd0 = fleet.total("lost"), lost_etcd(coords)
    idle = _idle_window(coords, fleet, seconds, etcd)
    running = int(fleet.total("running"))
    lost = int(fleet.total("lost") - lost0)
    lost_etcd_now = lost_etcd(coords) - lost_etcd0
    return Attempt(
        agents=grown.target,
        grow=grown,
        idle=idle,
        connections=[c.connections() for c in coords],
        rss_bytes=[c.rss_bytes() for c in coords],
        running=running,
        idle_lost=lost,
        idle_coordinator_lost_etcd=lost_etcd_now,
        stable=lost == 0 and lost_etcd_now == 0 and running == grown.target,
    )


def _unseen(missing: int, grants: list[tuple[float, str]], returned: float) -> Unseen:
    return Unseen(
        by_state={},
        never_regranted=missing - len(grants),
        regranted_before_kill_returned=sum(1 for t, _ in grants if t < returned),
        regranted_after_kill_returned={
            s: sum(1 for t, st in grants if t >= returned and st == s)
            for s in ("running", "halted", "lost")
        },
    )


def one_round(admin: tether.AdminClient, fleet: Fleet, timeout: float) -> Round:
    """Kill the tenant, wait for every agent; resume it, wait again."""
    sel = tether.selector(tenant=TENANT)
    lost0, grants0 = fleet.totals("lost", "grants")
    fleet.all("arm")
    issued = time.monotonic()
    admin.kill(sel, "benchmark kill round")
    returned = time.monotonic()
    killed = fleet.arrivals("killed", timeout)
    effects = fleet.all("effects", after=returned)
    fleet.all("arm")
    resume_issued = time.monotonic()
    admin.resume(sel, "benchmark resume")
    back, not_back = fleet.times("running", timeout)
    lost1, grants1 = fleet.totals("lost", "grants")
    unseen = None
    if killed.missing:
        unseen = _unseen(killed.missing, killed.last_grants, returned)
        unseen.by_state = killed.by_state
    return Round(
        kill_rpc_ms=round((returned - issued) * 1e3, 2),
        from_issue_ms=[(t - issued) * 1e3 for t in killed.times],
        from_return_ms=[(t - returned) * 1e3 for t in killed.times],
        missing=killed.missing,
        resume_from_issue_ms=[(t - resume_issued) * 1e3 for t in back],
        not_resumed=not_back,
        lost=int(lost1 - lost0),
        reconnects=int(grants1 - grants0),
        effects_after_kill_returned=sum(int(e["after"]) for e in effects),
        effects_after_own_killed=sum(int(e["after_own_kill"]) for e in effects),
        unseen_kill=unseen,
    )


def _line(r: Round) -> RoundLine:
    s = summary(r.from_issue_ms)
    return RoundLine(r.kill_rpc_ms, s.p50, s.max, r.missing, r.lost, r.reconnects)


def sum_up(rest: Attempt, rounds: list[Round]) -> Size:
    """A held size: its state at rest and its rounds, summed up."""
    return Size(
        **vars(rest),
        rounds=len(rounds),
        from_issue_ms=summary([x for r in rounds for x in r.from_issue_ms]),
        from_return_ms=summary([x for r in rounds for x in r.from_return_ms]),
        round_max_from_issue_ms=summary([max(r.from_issue_ms, default=0) for r in rounds]),
        kill_rpc_ms=summary([r.kill_rpc_ms for r in rounds]),
        resume_from_issue_ms=summary([x for r in rounds for x in r.resume_from_issue_ms]),
        missing=sum(r.missing for r in rounds),
        not_resumed=sum(r.not_resumed for r in rounds),
        lost=sum(r.lost for r in rounds),
        reconnects=sum(r.reconnects for r in rounds),
        effects_after_kill_returned=sum(r.effects_after_kill_returned for r in rounds),
        effects_after_own_killed=sum(r.effects_after_own_killed for r in rounds),
        unseen_kill=[r.unseen_kill for r in rounds if r.unseen_kill],
        per_round=[_line(r) for r in rounds],
    )


def _collapsed(n: int, r: Round) -> str | None:
    """Why a round ends its size, or None if it went cleanly."""
    if not (r.missing or r.not_resumed or r.lost):
        return None
    unseen = f"; the unseen: {r.unseen_kill}" if r.unseen_kill else ""
    return (
        f"round {n}: {r.missing} agents never saw the kill, {r.not_resumed} never saw the "
        f"resume, {r.lost} failed closed, {r.reconnects} re-registrations{unseen}"
    )


def measure_size(
    label: str, rest: Attempt, rounds: int, *,
    admin: tether.AdminClient, coords: list[Coordinator], fleet: Fleet,
) -> Size:  # fmt: skip
    """Up to ``rounds`` rounds at the size ``rest`` holds; a round that goes wrong ends it."""
    size = rest.agents
    lost_etcd0 = lost_etcd(coords)
    done: list[Round] = []
    collapsed = None
    for n in range(1, rounds + 1):
        last = one_round(admin, fleet, timeout=10 + size / 1000)
        done.append(last)
        s = summary(last.from_issue_ms)
        say(
            f"{label}: {size} round {n}: kill rpc {last.kill_rpc_ms} ms, "
            f"p50/p99 from issue {s.p50}/{s.p99} ms, "
            f"missing {last.missing}, lost {last.lost}, reconnects {last.reconnects}"
        )
        if (collapsed := _collapsed(n, last)) is not None:
            say(f"{label}: {size}: {collapsed}; no more rounds at this size")
            break
        time.sleep(1.0)
    out = sum_up(rest, done)
    out.collapsed = collapsed
    out.coordinator_lost_etcd = lost_etcd(coords) - lost_etcd0
    return out
