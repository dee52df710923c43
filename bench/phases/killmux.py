"""A multiplexed fleet: 10,000 runs in 10 processes, Kill issued → each run's work cancelled.

Each generator process (``worker.py mux``) holds 1,000 real ``AsyncAgent`` runs written
against the public SDK API alone, so they share whatever the SDK shares per process and
target (one Multiplex stream since i13-cmux; before it, a Heartbeat stream per run over one
TCP connection). The phase records how many streams were open, from the clients' own
channelz counters. Every run holds gated asyncio work (``async with agent.effect(...)``
around a long ``await``); the figure is from the Kill RPC being issued to that work being
cancelled, for every run, and "nothing missed" means every run's work was cancelled.

The floor has the same shape with no Tether: ``bench.bare_server --broadcast`` and one raw
stream per process, each holding 1,000 asyncio tasks that the order cancels on receipt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tether

from bench.fleet import Fleet
from bench.harness import Bench, say
from bench.infra import BenchError, Coordinator
from bench.md import Row, fmt, missed_by, ratio, table, verdict
from bench.phase import Flag, Phase, Results
from bench.phases import kill
from bench.phases.stackfloor import BareBroadcast, Broadcasts, broadcast_rounds
from bench.profile import profiling
from bench.record import OMIT
from bench.stats import Summary, summary
from bench.tls import TENANT

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LIMIT_MS = 100.0
GOAL = 1.3


@dataclass(frozen=True)
class Settings:
    processes: int = 10
    runs: int = 1000  # per process
    rounds: int = 5
    ttl: float = 10.0
    big: bool = False  # also 100 processes of 1,000 runs
    big_processes: int = 100
    profile: bool = False


@dataclass
class Fleetwide:
    """Kill rounds over every run of every process, and what the coordinator held."""

    processes: int = 0
    runs: int = 0
    registered: int = 0
    held: int = 0  # runs whose gated work was in flight before the first kill
    streams: int = 0  # HTTP/2 streams open to the coordinator (clients' channelz)
    connections: int = 0  # TCP connections open to the coordinator (clients' channelz)
    coordinator_connections: int = 0  # established on its port, as the coordinator sees them
    grow_seconds: float = 0.0
    coordinator_rss_bytes: int = 0
    rounds: int = 0
    from_issue_ms: Summary = field(default_factory=Summary)
    last_ms: Summary = field(default_factory=Summary)  # per round: the last run cancelled
    kill_rpc_ms: Summary = field(default_factory=Summary)
    missing: int = 0  # runs whose work was in flight at the Kill and not cancelled
    missing_stopped: int = 0  # of them, runs whose SDK held a stop all the same
    idle: int = 0  # runs whose work had ended before the Kill (their stream failed closed)
    idle_running: int = 0  # of them, runs still running after the round: the kill missed them
    settle_s: list[float] = field(default_factory=list)  # waited per round for a steady coordinator
    stopped: str | None = field(default=None, metadata=OMIT)


@dataclass
class Shape:
    """One fleet shape: Tether, and the bare broadcast of the same shape."""

    tether: Fleetwide = field(default_factory=Fleetwide)
    floor: Broadcasts = field(default_factory=Broadcasts)


@dataclass
class Result:
    lease_ttl: float = 0.0
    main: Shape = field(default_factory=Shape)
    big: Shape | None = field(default=None, metadata=OMIT)
    big_note: str = ""


# -- measuring ----------------------------------------------------------------------------------


def _floor(bench: Bench, processes: int, runs: int, rounds: int) -> Broadcasts:
    server = BareBroadcast(bench.procs)
    fleet = Fleet(bench.procs, "listen", processes, bench.logs)
    try:
        replies = fleet.all("add", within=120, n=1, target=server.addr, prefix="m", tasks=runs)
        registered = sum(int(r["registered"]) for r in replies)
        time.sleep(1)
        s, last, writes, missing = broadcast_rounds(server, fleet, rounds, 10 + runs / 500)
        return Broadcasts(processes, registered, runs, rounds, s, last, writes, missing)
    finally:
        fleet.kill()
        server.close()


def _grow(coord: Coordinator, fleet: Fleet, out: Fleetwide, runs: int) -> None:
    started, left = time.monotonic(), 30 + out.runs * 0.01  # 130 s for 10,000 runs
    replies = fleet.each(
        "add",
        [{"n": runs, "target": coord.addr, "tenant": TENANT, "prefix": f"p{i}-",
          "deadline": left} for i in range(out.processes)],
        within=left + 60,
    )  # fmt: skip
    out.grow_seconds = round(time.monotonic() - started, 1)
    out.registered = out.runs - sum(int(r["failed"]) + int(r["pending"]) for r in replies)
    held = fleet.all("hold", within=120, timeout=60)
    out.held = sum(int(r["held"]) for r in held)
    opened = fleet.all("streams")
    out.streams = sum(int(r["streams"]) for r in opened)
    out.connections = sum(int(r["connections"]) for r in opened)
    out.coordinator_rss_bytes = coord.rss_bytes()
    out.coordinator_connections = coord.connections()


def settle(coord: Coordinator, idle: float = 0.15, most: float = 15.0) -> float:
    """Wait until the coordinator has taken in what the last round left (each run's new
    work is a ledger record, each stop a KillAck and records): until it used under ``idle``
    of a core over 0.2 s, or ``most`` seconds. A kill is measured on a steady fleet, as the
    floor's is; the seconds waited are returned."""
    started = time.monotonic()
    before = coord.cpu_seconds()
    while time.monotonic() - started < most:
        time.sleep(0.2)
        now = coord.cpu_seconds()
        if now - before < idle * 0.2:
            break
        before = now
    return time.monotonic() - started


def _rounds(
    admin: tether.AdminClient, coord: Coordinator, fleet: Fleet, out: Fleetwide, rounds: int
) -> None:
    sel, timeout = tether.selector(tenant=TENANT), 10 + out.runs / 1000
    arrivals: list[float] = []
    last: list[float] = []
    rpc: list[float] = []
    for n in range(1, rounds + 1):
        out.settle_s.append(round(settle(coord), 2))
        fleet.all("arm")
        issued = time.monotonic()
        admin.kill(sel, "benchmark kill round (killmux)")
        rpc.append((time.monotonic() - issued) * 1e3)
        replies = fleet.all("wait", within=timeout + 30, timeout=timeout)
        got = [(t - issued) * 1e3 for r in replies for t in r["times"]]
        missed = sum(int(r["missing"]) for r in replies)
        idle = sum(int(r.get("idle", 0)) for r in replies)
        unreached = sum(int(r.get("idle_running", 0)) for r in replies)
        out.missing_stopped += sum(int(r.get("missing_stopped", 0)) for r in replies)
        out.idle, out.idle_running = out.idle + idle, out.idle_running + unreached
        arrivals, out.missing, out.rounds = arrivals + got, out.missing + missed, n
        last.append(max(got, default=0.0))
        say(f"killmux: round {n}: p50/p99 {summary(got)}, missed {missed}, "
            f"idle at the Kill {idle} (still running after it: {unreached})")  # fmt: skip
        admin.resume(sel, "benchmark resume (killmux)")
        held = sum(int(r["held"]) for r in fleet.all("hold", within=120, timeout=60))
        if missed or unreached or held < out.held:
            out.stopped = (
                f"round {n}: {missed} runs' work not cancelled ({out.missing_stopped} of them "
                f"stopped), {unreached} runs without work still running, {held} held again"
            )
            break
    out.from_issue_ms, out.last_ms, out.kill_rpc_ms = summary(arrivals), summary(last), summary(rpc)


def _tether(bench: Bench, cfg: Settings, processes: int, label: str) -> Fleetwide:
    out = Fleetwide(processes=processes, runs=processes * cfg.runs)
    with bench.cluster(label, 1, cfg.ttl) as (_, (coord,)):
        fleet = Fleet(bench.procs, "mux", processes, bench.logs)
        admin = coord.admin(timeout=60)
        try:
            _grow(coord, fleet, out, cfg.runs)
            say(f"{label}: {out.registered} registered, {out.held} holding work, "
                f"{out.streams} streams on {out.connections} connections")  # fmt: skip
            if out.held < out.runs:
                out.stopped = f"only {out.held} of {out.runs} runs registered and held work"
                return out
            with profiling(bench, coord, label, on=cfg.profile):
                _rounds(admin, coord, fleet, out, cfg.rounds)
        except (BenchError, tether.TetherError) as err:  # a Kill or Resume not answered
            out.stopped = str(err)
            say(f"{label}: {err}")
        finally:
            admin.close()
            fleet.kill()
    return out


def measure(bench: Bench, cfg: Settings) -> Result:
    out = Result(lease_ttl=cfg.ttl)
    out.main = Shape(floor=_floor(bench, cfg.processes, cfg.runs, cfg.rounds))
    say(f"killmux floor: {out.main.floor.from_issue_ms}")
    out.main.tether = _tether(bench, cfg, cfg.processes, "killmux")
    if not cfg.big:
        out.big_note = "not run (enable with --killmux-big)"
    elif out.main.tether.stopped:
        out.big_note = f"not tried: the {cfg.processes}-process fleet did not hold"
    else:
        big = cfg.big_processes
        out.big = Shape(floor=_floor(bench, big, cfg.runs, max(2, cfg.rounds - 2)))
        out.big.tether = _tether(bench, cfg, big, "killmux-big")
    return out


# -- the report ---------------------------------------------------------------------------------


def _held(f: Fleetwide) -> str:
    missed = "nothing missed" if not f.missing else f"**{f.missing:,} runs' work not cancelled**"
    if f.idle:
        missed += (
            f"; {f.idle:,} runs' work had ended before a Kill (their stream failed closed), "
            f"{f.idle_running:,} of them still running after it"
        )
    return (
        f"{missed}; {f.streams:,} streams on {f.connections:,} connections for "
        f"{f.registered:,} runs (the coordinator saw {f.coordinator_connections:,} connections)"
    )


def _rows(shape: Shape, label: str) -> list[Row]:
    f, floor = shape.tether, shape.floor
    figure = f"{f.runs:,} runs in {f.processes} processes, Kill issued → in-flight work cancelled"
    if f.from_issue_ms.p99 is None:
        note = f.stopped or "no rounds"
        return [[f"{figure}, p99", f"≤ {LIMIT_MS:g} ms", note, verdict(False)]]
    p99 = f.from_issue_ms.p99
    times = ratio(p99, floor.from_issue_ms.p99)
    clean = not f.missing and not f.idle_running and not f.stopped
    return [
        [f"{figure}, p99{label}", f"≤ {LIMIT_MS:g} ms, nothing missed",
         f"{fmt(p99)} ms (p50 {fmt(f.from_issue_ms.p50)}); {_held(f)}"
         + missed_by(p99, LIMIT_MS), verdict(p99 <= LIMIT_MS and clean)],
        [f"the same against a bare broadcast of that shape ({floor.streams} streams, "
         f"{floor.tasks_per_stream:,} tasks each cancelled on receipt)", f"≤ {GOAL:g}x",
         "-" if times is None else f"{times:,.2f}x (floor p99 {fmt(floor.from_issue_ms.p99)} ms)"
         + missed_by(times, GOAL), verdict(None if times is None else times <= GOAL and clean)],
    ]  # fmt: skip


def budgets(results: Results) -> list[Row]:
    res = results.of(PHASE)
    if res is None:
        return [["10,000 multiplexed runs, Kill issued → work cancelled, p99",
                 f"≤ {LIMIT_MS:g} ms", "-", verdict(None)]]  # fmt: skip
    rows = _rows(res.main, "")
    if res.big is not None:
        rows += _rows(res.big, "")
    else:
        rows.append(["100,000 runs in 100 processes, the same", f"≤ {LIMIT_MS:g} ms",
                     res.big_note, verdict(None)])  # fmt: skip
    return rows


_HEAD = [
    "fleet", "runs", "streams", "connections", "rounds", "p50 from issue", "p99", "max",
    "last run p50", "last run p99", "Kill RPC p50", "Kill RPC p99", "not cancelled",
]  # fmt: skip


def _row(name: str, f: Fleetwide) -> Row:
    s = f.from_issue_ms
    return [
        name, fmt(f.registered), fmt(f.streams), fmt(f.connections), fmt(f.rounds), fmt(s.p50),
        fmt(s.p99), fmt(s.max), fmt(f.last_ms.p50), fmt(f.last_ms.p99), fmt(f.kill_rpc_ms.p50),
        fmt(f.kill_rpc_ms.p99), fmt(f.missing),
    ]  # fmt: skip


def _floor_row(b: Broadcasts) -> Row:
    s = b.from_issue_ms
    return [
        "bare broadcast", fmt(b.streams * b.tasks_per_stream), fmt(b.registered),
        fmt(b.streams), fmt(b.rounds), fmt(s.p50), fmt(s.p99), fmt(s.max), fmt(b.last_ms.p50),
        fmt(b.last_ms.p99), "-", "-", fmt(b.missing),
    ]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    rows = []
    for shape in (res.main, res.big):
        if shape is not None:
            rows += [_row("Tether", shape.tether), _floor_row(shape.floor)]
    text = (
        f"Lease TTL {res.lease_ttl:g} s. Each process's runs are `AsyncAgent`s with default "
        "settings, so they share what the SDK shares; 'streams' and 'connections' are what the "
        "processes held open to the coordinator (gRPC channelz). Each run holds "
        '`async with agent.effect("work")` around a long sleep; latencies in ms from Kill '
        "issued to each run's work being cancelled. The floor: `bench/bare_server.py "
        "--broadcast`, one raw stream per process holding as many asyncio tasks as the process "
        "has runs, all cancelled when the order arrives.\n\n" + table(_HEAD, rows)
    )
    for shape in (res.main, res.big):
        if shape is not None and shape.tether.settle_s:
            waits = ", ".join(f"{w:g}" for w in shape.tether.settle_s)
            text += (
                f"\n- {shape.tether.runs:,} runs: before each round the bench waited until the "
                "coordinator had taken in what the last one left (each run's new work is a "
                "ledger record, each stop a KillAck and records): under 15% of a core over "
                f"0.2 s, at most 15 s. Waited, in seconds: {waits}.\n"
            )
    for shape in (res.main, res.big):
        if shape is not None and shape.tether.stopped:
            text += f"\n- {shape.tether.runs:,} runs: {shape.tether.stopped}.\n"
    if res.big is None:
        text += f"\n100,000 runs in 100 processes: {res.big_note}.\n"
    return ["## Multiplexed fleet: Kill issued → every run's gated work cancelled\n", text]


def plot(results: Results, ax: Axes) -> None:
    if (res := results.of(PHASE)) is None:
        return
    for shape, marker in ((res.main, "D"), (res.big, "P")):
        s = shape.tether.from_issue_ms if shape is not None else None
        if shape is None or s is None or s.p50 is None or s.p99 is None:
            continue
        runs = shape.tether.runs
        ax.plot([runs], [s.p50], marker, color="tab:orange", label=f"multiplexed {runs:,} p50")
        ax.plot([runs], [s.p99], marker, color="tab:orange", mfc="none",
                label=f"multiplexed {runs:,} p99")  # fmt: skip
        f = shape.floor.from_issue_ms
        if f.p99 is not None:
            label = "bare broadcast, same shape, p99"
            ax.plot([runs], [f.p99], marker, color="tab:gray", mfc="none", label=label)


PHASE = Phase(
    name="killmux",
    about="10,000 runs in 10 processes sharing a stream each: Kill → gated work cancelled",
    result=Result,
    run=measure,
    defaults=Settings(),
    quick=Settings(processes=4, runs=500, rounds=3),
    flags=(
        Flag("--killmux-processes", "processes", int, "killmux: generator processes"),
        Flag("--killmux-runs", "runs", int, "killmux: runs per process"),
        Flag(
            "--killmux-big", "big", bool, "killmux: also 100,000 runs in 100 processes", switch=True
        ),
        kill.ROUNDS,
        kill.PROFILE,
    ),
    budgets=budgets,
    section=section,
    plot=plot,
)
