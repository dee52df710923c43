"""The do-it-yourself baseline: every agent polls a kill key in etcd.

Each simulated agent issues a linearizable Range on one kill key every ``poll_interval``
seconds, and one more before each action (one action every ``poll_action_every`` seconds).
A kill is a Put of that key; the latency is from the Put being issued (and returning) to
each agent's first Range that sees it. The load is measured at etcd itself (its /metrics)
as well as counted by the generators; when the generators fall behind the schedule, the
achieved rate is below the offered one and the row says so.

The goal compares Tether with polling **at equal etcd load**: the same request messages per
second reaching etcd as Tether's coordinator sends it with the same fleet at rest (kill1's
idle window, every etcd method counted, keep-alives included). A fleet of N pollers at that
load polls each agent every N / load seconds; a kill lands at a uniform moment of each
poller's cycle, so its p99 is at least 0.99 of that interval (the Range's own time only
adds). That interval is far too long to measure by waiting, so the comparison uses it as a
lower bound, and the measured 100 ms polling, at many times Tether's load, shows how close
the model comes (its p99 against 0.99 x 100 ms). Both are in the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from aetcd import rpc

from bench.fleet import Fleet, split
from bench.harness import Bench, cpu_percent, say
from bench.infra import Etcd
from bench.md import Row, fmt, missed_by, table, verdict
from bench.phase import WORKERS, Flag, Phase, Results, draw_latency, ints
from bench.phases import kill
from bench.record import OMIT
from bench.stats import Summary, summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

KILL_KEY = "/diy/kill/bench"


@dataclass(frozen=True)
class Settings:
    sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    interval: float = 0.1
    action_every: float = 1.0
    rounds: int = 5
    workers: int = 4
    phase_budget: float = 300.0  # seconds the phase may spend before it stops growing


@dataclass
class Load:
    """What the pollers put on etcd: Ranges handled (etcd's count) and requests sent."""

    etcd_ranges_per_s: float = 0.0
    generated_requests_per_s: float = 0.0
    etcd_cpu_pct: float = 0.0


@dataclass
class Size(Load):
    agents: int = 0
    offered_requests_per_s: float = 0.0
    achieved_fraction: float = 0.0
    late_polls: int = 0
    errors: int = 0
    from_issue_ms: Summary = field(default_factory=Summary)
    from_return_ms: Summary = field(default_factory=Summary)
    missing: int = 0
    rounds: int = 0


@dataclass
class Result:
    interval_s: float = 0.0
    action_every_s: float = 0.0
    offered_requests_per_agent_per_s: float = 0.0
    sizes: list[Size] = field(default_factory=list)
    stopped: str | None = field(default=None, metadata=OMIT)


@dataclass
class _Round:
    from_issue_ms: list[float]
    from_return_ms: list[float]
    missing: int
    not_resumed: int


def _load(etcd: Etcd, fleet: Fleet, seconds: float) -> Load:
    m0, cpu0, req0 = etcd.metrics(), etcd.cpu_seconds(), fleet.total("requests")
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    m1, cpu1, req1 = etcd.metrics(), etcd.cpu_seconds(), fleet.total("requests")
    ranges = m1.get("grpc_server_handled_total:Range", 0) - m0.get(
        "grpc_server_handled_total:Range", 0
    )
    return Load(
        etcd_ranges_per_s=round(ranges / elapsed, 1),
        generated_requests_per_s=round((req1 - req0) / elapsed, 1),
        etcd_cpu_pct=cpu_percent(cpu0, cpu1, elapsed),
    )


def _round(kv: Any, fleet: Fleet, timeout: float) -> _Round:
    fleet.all("arm")
    issued = time.monotonic()
    kv.Put(rpc.PutRequest(key=KILL_KEY.encode(), value=b"halt"), timeout=10)
    returned = time.monotonic()
    stamps, missing = fleet.times("killed", timeout)
    fleet.all("arm")
    kv.DeleteRange(rpc.DeleteRangeRequest(key=KILL_KEY.encode()), timeout=10)
    _, not_back = fleet.times("running", timeout)
    return _Round(
        from_issue_ms=[(t - issued) * 1e3 for t in stamps],
        from_return_ms=[(t - returned) * 1e3 for t in stamps],
        missing=missing,
        not_resumed=not_back,
    )


def _size(cfg: Settings, etcd: Etcd, kv: Any, fleet: Fleet, size: int) -> Size:
    """Grow the pollers to ``size``, measure their load, then time the kill rounds."""
    shares = split(size - fleet.size, len(fleet.workers))
    fleet.each(
        "add",
        [{"n": n, "endpoint": etcd.endpoint, "key": KILL_KEY, "interval": cfg.interval,
          "action_every": cfg.action_every} for n in shares],
    )  # fmt: skip
    fleet.size = size
    time.sleep(2)
    late0 = fleet.total("late")
    load = _load(etcd, fleet, 4.0)
    rounds = [
        _round(kv, fleet, timeout=10 + size / 1000)
        for _ in range(cfg.rounds if size < 5000 else min(cfg.rounds, 3))
    ]
    offered = size * (1 / cfg.interval + 1 / cfg.action_every)
    return Size(
        **vars(load),
        agents=size,
        offered_requests_per_s=round(offered, 1),
        achieved_fraction=round(load.generated_requests_per_s / offered, 3),
        late_polls=int(fleet.total("late") - late0),
        errors=int(fleet.total("errors")),
        from_issue_ms=summary([x for r in rounds for x in r.from_issue_ms]),
        from_return_ms=summary([x for r in rounds for x in r.from_return_ms]),
        missing=sum(r.missing for r in rounds),
        rounds=len(rounds),
    )


def polling_baseline(bench: Bench, cfg: Settings) -> Result:
    out = Result(
        interval_s=cfg.interval,
        action_every_s=cfg.action_every,
        offered_requests_per_agent_per_s=1 / cfg.interval + 1 / cfg.action_every,
    )
    deadline = time.monotonic() + cfg.phase_budget
    with bench.cluster("poll", coordinators=0) as (etcd, _):
        fleet = Fleet(bench.procs, "poll", cfg.workers, bench.logs)
        channel = grpc.insecure_channel(etcd.endpoint)
        kv = rpc.KVStub(channel)
        try:
            for size in sorted(cfg.sizes):
                if time.monotonic() > deadline:
                    out.stopped = f"phase budget {cfg.phase_budget:g}s spent before {size}"
                    break
                entry = _size(cfg, etcd, kv, fleet, size)
                out.sizes.append(entry)
                say(
                    f"poll: {size} agents, {entry.etcd_ranges_per_s} Range/s at etcd, "
                    f"{entry.generated_requests_per_s} req/s sent, "
                    f"p50/p99 from issue {entry.from_issue_ms.p50}/{entry.from_issue_ms.p99} ms"
                )
        finally:
            channel.close()
            fleet.kill()
    return out


# -- the report ---------------------------------------------------------------------------------

_HEAD = [
    "agents", "offered req/s", "generated req/s", "etcd Range/s", "etcd CPU", "achieved",
    "etcd CPU µs/Range", "p50 from issue", "p99 from issue", "max", "never saw kill",
]  # fmt: skip


def _cost(e: Size) -> float | None:
    """etcd CPU µs per Range handled."""
    return 1e4 * e.etcd_cpu_pct / e.etcd_ranges_per_s if e.etcd_ranges_per_s else None


def _row(e: Size) -> list[str]:
    fi = e.from_issue_ms
    return [
        fmt(e.agents), fmt(e.offered_requests_per_s, 0), fmt(e.generated_requests_per_s, 0),
        fmt(e.etcd_ranges_per_s, 0), f"{e.etcd_cpu_pct:g}%",
        f"{100 * e.achieved_fraction:.0f}%", fmt(_cost(e), 0), fmt(fi.p50), fmt(fi.p99),
        fmt(fi.max), fmt(e.missing),
    ]  # fmt: skip


def poll_table(res: Result) -> str:
    text = (
        f"Each agent: a linearizable Range every {res.interval_s * 1000:g} ms and one "
        f"before each action (every {res.action_every_s:g} s). "
        "Where generated < offered, the generators (or etcd) could not keep the schedule and the "
        "latency is that of an overloaded system.\n\n"
    )
    text += table(_HEAD, [_row(e) for e in res.sizes])
    per_range = [c for e in res.sizes if (c := _cost(e))]
    if per_range:
        cost = min(per_range)
        rate = res.offered_requests_per_agent_per_s
        text += (
            f"\nAt the cheapest measured etcd cost ({cost:.0f} µs of etcd CPU per Range), keeping "
            f"the schedule ({rate:g} Range/s per agent) would take about "
            + ", ".join(f"{n * rate * cost / 1e6:.1f} cores at {n:,} agents" for n in (1000, 10000))
            + " for etcd alone; Tether's steady load on etcd is lease keep-alives on one stream "
            "per coordinator.\n"
        )
    return text


GOAL = 20.0  # Tether at least this many times faster than polling at equal etcd load
_QUIET = 0.25  # req/s: no request in kill1's 4 s idle window counts as one


@dataclass
class Versus:
    """Tether (kill1) against polling at one fleet size, at equal etcd load and at 100 ms."""

    agents: int
    tether_p99_ms: float
    tether_etcd_load: float  # request messages per second at etcd
    equal_interval_s: float  # each poller's interval at Tether's load
    measured: Size

    @property
    def equal_p99_ms(self) -> float:
        return 0.99 * self.equal_interval_s * 1e3

    @property
    def times(self) -> float:
        return self.equal_p99_ms / self.tether_p99_ms


def versus(results: Results) -> list[Versus]:
    """Each polled size that kill1 also held, with the loads and latencies to compare."""
    res, tether = results.of(PHASE), results.of(kill.KILL1)
    if res is None or tether is None:
        return []
    out = []
    for e in res.sizes:
        mine = tether.size(e.agents)
        if mine is None or mine.from_issue_ms.p99 is None or mine.idle.etcd_requests_per_s is None:
            continue  # kill1 did not hold this size, or recorded no etcd load (older runs)
        load = max(mine.idle.etcd_requests_per_s, _QUIET)
        out.append(Versus(e.agents, mine.from_issue_ms.p99, load, e.agents / load, e))
    return out


def budgets(results: Results) -> list[Row]:
    figure = "kill p99 against the polling baseline at equal etcd load"
    rows = []
    for v in versus(results):
        text = (
            f"{v.times:,.0f}x faster: Tether {fmt(v.tether_p99_ms)} ms at "
            f"{v.tether_etcd_load:g} req/s at etcd; polling at that load (every "
            f"{v.equal_interval_s:,.0f} s) p99 ≥ {v.equal_p99_ms / 1e3:,.0f} s"
            + missed_by(v.times, GOAL, most=False)
        )
        rows.append(
            [f"{figure}, {v.agents:,} agents", f"≥ {GOAL:g}x", text, verdict(v.times >= GOAL)]
        )
    return rows or [
        [figure, f"≥ {GOAL:g}x", "needs kill1 and poll at a common size", verdict(None)]
    ]


_VS = [
    "agents", "Tether p99", "Tether's etcd req/s", "poll interval at that load",
    "polling p99 at that load (≥)", "Tether faster by", "polling every 100 ms: etcd req/s",
    "x Tether's load", "its p99 (model: 99 ms)", "Tether ÷ it",
]  # fmt: skip


def _vs_row(v: Versus) -> Row:
    m = v.measured
    p99 = m.from_issue_ms.p99
    return [
        fmt(v.agents), fmt(v.tether_p99_ms), f"{v.tether_etcd_load:g}",
        f"{v.equal_interval_s:,.0f} s", f"{v.equal_p99_ms / 1e3:,.0f} s", f"{v.times:,.0f}x",
        fmt(m.etcd_ranges_per_s, 0), f"{m.etcd_ranges_per_s / v.tether_etcd_load:,.0f}x",
        fmt(p99), "-" if not p99 else f"{v.tether_p99_ms / p99:,.2f}x",
    ]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    parts = ["## Polling baseline (do-it-yourself: every agent polls etcd)\n", poll_table(res)]
    if rows := [_vs_row(v) for v in versus(results)]:
        parts += [
            "\nTether against polling (see `bench/phases/poll.py` for the model). Equal etcd "
            "load: the request messages per second etcd received from Tether's coordinator "
            "with the same fleet at rest (kill1). Polling at that load is too slow to wait "
            "for, so its p99 is the lower bound 0.99 x interval; the 100 ms polling measured "
            "above, at many times that load, is shown against the same model.\n\n",
            table(_VS, rows),
        ]
    return parts


def latencies(results: Results) -> list[tuple[str, list[tuple[int, Summary]]]]:
    """The baseline's kill latency (from issue) by fleet size, for the floor's table."""
    if (res := results.of(PHASE)) is None:
        return []
    return [("polling baseline", [(e.agents, e.from_issue_ms) for e in res.sizes])]


def plot(results: Results, ax: Axes) -> None:
    if (res := results.of(PHASE)) is not None:
        points = [(e.agents, e.from_issue_ms) for e in res.sizes]
        draw_latency(ax, "polling etcd every 100 ms", "tab:red", points)


PHASE = Phase(
    name="poll",
    about="the do-it-yourself baseline: each agent polls a kill key in etcd every 100 ms",
    result=Result,
    run=polling_baseline,
    defaults=Settings(),
    quick=Settings(sizes=[100, 1000], rounds=2, phase_budget=90.0),
    flags=(Flag("--poll-sizes", "sizes", ints, "fleet sizes for the polling baseline"), WORKERS),
    budgets=budgets,
    section=section,
    plot=plot,
)
