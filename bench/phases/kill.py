"""Kill propagation: from the operator's Kill to every SDK agent holding a Killed verdict.

A fleet of real ``AsyncAgent`` instances is grown step by step (100, 1,000, ...) on one or
two coordinators. At each size, several rounds of Kill (tenant scope) and Resume are timed
(bench/rounds.py). The same growth yields the coordinator's RSS per fleet size (memory per
agent) and the heartbeat load each size puts on it. Three variants: ``kill1`` (one
coordinator), ``kill2`` (two) and ``kill1long`` (one, at a long lease TTL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tether

from bench.fleet import Fleet
from bench.harness import Bench, say
from bench.infra import BenchError, Coordinator, Etcd
from bench.md import KB, Row, fmt, table, verdict
from bench.phase import TLS, WORKERS, Flag, Phase, Results, draw_latency, ints
from bench.profile import profiling
from bench.record import OMIT
from bench.rounds import Attempt, Size, lost_etcd, measure_size, settle
from bench.stats import Summary, slope

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Settings:
    label: str  # names the scratch directory and the profile
    coordinators: int
    sizes: list[int]
    ttl: float
    rounds: int = 5
    workers: int = 4
    phase_budget: float = 300.0  # seconds the phase may spend before it stops growing
    profile: bool = False  # sample the coordinator with py-spy during kill rounds
    profile_sizes: list[int] = field(default_factory=lambda: [1000])
    tls: bool = False  # mutual TLS on every connection (bench/tls.py)


@dataclass
class Result:
    coordinators: int = 0
    lease_ttl: float = 0.0
    sizes: list[Size] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    rss_baseline_bytes: list[int] = field(default_factory=list)
    stopped: str | None = field(default=None, metadata=OMIT)
    error: str | None = field(default=None, metadata=OMIT)
    worker_tracebacks: int = 0
    coordinator_lost_etcd_total: int = 0
    rss_per_agent_bytes: float = 0.0
    tls: bool = False

    def size(self, agents: int) -> Size | None:
        return next((e for e in self.sizes if e.agents == agents), None)

    def largest(self) -> int:
        return max((e.agents for e in self.sizes), default=0)


# -- measuring ----------------------------------------------------------------------------------


def propagate(bench: Bench, cfg: Settings) -> Result:
    """Grow the fleet size by size and time kill rounds at each size it holds."""
    out = Result(coordinators=cfg.coordinators, lease_ttl=cfg.ttl, tls=cfg.tls)
    deadline = time.monotonic() + cfg.phase_budget
    with bench.cluster(cfg.label, cfg.coordinators, cfg.ttl, tls=cfg.tls) as (etcd, coords):
        time.sleep(1)
        out.rss_baseline_bytes = [c.rss_bytes() for c in coords]
        fleet = Fleet(bench.procs, "sdk", cfg.workers, bench.logs)
        admin = coords[0].admin(timeout=60)
        try:
            _sizes(bench, cfg, out, deadline, etcd=etcd, coords=coords, fleet=fleet, admin=admin)
        except BenchError as err:
            out.error = str(err)
            say(f"{cfg.label}: {err}")
        finally:
            out.worker_tracebacks = fleet.stderr_tracebacks()
            admin.close()
            fleet.kill()
        out.coordinator_lost_etcd_total = lost_etcd(coords)
    points = [(0.0, float(sum(out.rss_baseline_bytes)))] + [
        (float(e.agents), float(sum(e.rss_bytes))) for e in out.attempts if e.stable
    ]
    out.rss_per_agent_bytes = round(slope(points)[0], 1)
    return out


def _sizes(
    bench: Bench, cfg: Settings, out: Result, deadline: float, *, etcd: Etcd,
    coords: list[Coordinator], fleet: Fleet, admin: tether.AdminClient,
) -> None:  # fmt: skip
    label = cfg.label
    for size in sorted(cfg.sizes):
        left = deadline - time.monotonic()
        if left < 30:
            out.stopped = f"phase budget {cfg.phase_budget:g}s spent before {size}"
            say(f"{label}: {out.stopped}")
            return
        say(f"{label}: growing the fleet to {size} agents")
        targets = [c.addr for c in coords]
        grown = fleet.grow_sdk(size, targets, deadline=min(left, 240), tls=coords[0].agent_tls)
        fleet.all("act", period=0.5)
        time.sleep(2 + size / 2500)
        rest = settle(coords, fleet, grown, 4.0, etcd)
        out.attempts.append(rest)
        say(f"{label}: {size} agents: grow {grown}, at rest {rest}")
        if grown.reached < size or not rest.stable:
            out.stopped = _not_held(rest)
            say(f"{label}: {out.stopped}")
            return
        rounds = cfg.rounds if size < 5000 else max(2, cfg.rounds - 2)
        sampled = cfg.profile and size in cfg.profile_sizes
        with profiling(bench, coords[0], f"{label}-{size}", on=sampled):
            out.sizes.append(
                measure_size(label, rest, rounds, admin=admin, coords=coords, fleet=fleet)
            )


def _not_held(a: Attempt) -> str:
    grow = a.grow
    return (
        f"{a.agents} agents not held: {grow.reached} registered "
        f"({grow.pending} pending, {grow.failed} failed) in {grow.seconds:g}s; at rest "
        f"{a.running} running, {a.idle_lost} agents failed closed and the coordinator logged "
        f"{a.idle_coordinator_lost_etcd} 'lost etcd' while idle at "
        f"{a.idle.heartbeats_per_s} hb/s"
    )


# -- the report ---------------------------------------------------------------------------------

_HEAD = [
    "agents", "rounds", "p50 from issue", "p99 from issue", "max from issue",
    "p50 from return", "p99 from return", "Kill RPC p50", "resume p50", "hb/s (idle)",
    "coord CPU (idle)", "never killed", "fail-closed (lost)", "reconnects",
    "coordinator lost etcd", "Kill RPC returned p50", "Kill RPC returned p99",
    "last agent stopped p50", "last agent stopped p99",
]  # fmt: skip


def _cpus(values: list[float]) -> str:
    return " + ".join(f"{c:g}%" for c in values)


def _row(e: Size) -> Row:
    fi, fr = e.from_issue_ms, e.from_return_ms
    return [
        fmt(e.agents), fmt(e.rounds), fmt(fi.p50), fmt(fi.p99), fmt(fi.max), fmt(fr.p50),
        fmt(fr.p99), fmt(e.kill_rpc_ms.p50), fmt(e.resume_from_issue_ms.p50),
        fmt(e.idle.heartbeats_per_s, 0), _cpus(e.idle.coordinator_cpu_pct), fmt(e.missing),
        fmt(e.lost), fmt(e.reconnects), fmt(e.coordinator_lost_etcd), fmt(e.kill_rpc_ms.p50),
        fmt(e.kill_rpc_ms.p99), fmt(e.round_max_from_issue_ms.p50),
        fmt(e.round_max_from_issue_ms.p99),
    ]  # fmt: skip


def _unheld(a: Attempt) -> str:
    grow, idle = a.grow, a.idle
    return (
        f"\n**{a.agents:,} agents not held.** {grow.reached:,} registered "
        f"({grow.pending:,} still pending, {grow.failed:,} failed) after "
        f"{grow.seconds:g} s of growing; at rest {a.running:,} held a RUN verdict, the "
        f"coordinator(s) had {' + '.join(str(c) for c in a.connections)} TCP connections, "
        f"handled {fmt(idle.heartbeats_per_s, 0)} hb/s at "
        f"{_cpus(idle.coordinator_cpu_pct)} CPU, "
        f"{a.idle_lost} agents failed closed and 'lost etcd' was logged "
        f"{a.idle_coordinator_lost_etcd} times. No larger size was tried.\n"
    )


def kill_table(res: Result) -> str:
    """The rounds at each size, then what went wrong (collapsed, not held, stopped)."""
    ttl = res.lease_ttl
    tls = " Mutual TLS on every connection (`--tls`)." if res.tls else ""
    text = (
        f"Lease TTL {ttl:g} s (a heartbeat every {ttl / 4:g} s).{tls} Latencies in ms, over all "
        'agents of all rounds; "never killed" counts agents that had not seen the kill when the '
        'round gave up. "Kill RPC returned" is from Kill issued to its reply, "last agent '
        'stopped" from Kill issued to the last agent of the round holding `Killed` (p50/p99 '
        "over rounds).\n\n" + table(_HEAD, [_row(e) for e in res.sizes])
    )
    for e in res.sizes:
        if e.collapsed:
            text += f"\n- {e.agents:,} agents collapsed in {e.collapsed}.\n"
    text += "".join(_unheld(a) for a in res.attempts if not a.stable)
    if (res.stopped or "").startswith("phase budget"):
        text += f"\nStopped early: {res.stopped}.\n"
    if res.error:
        text += f"\nError: {res.error}.\n"
    return text


def _effects_budget(results: Results) -> Row:
    figure = "effects that leave an agent using the gate after a kill"
    sizes = [e for p in (KILL1, KILL2) if (res := results.of(p)) for e in res.sizes]
    if not sizes:
        return [figure, "0", "-", verdict(None)]
    own = sum(e.effects_after_own_killed for e in sizes)
    after_return = sum(e.effects_after_kill_returned for e in sizes)
    return [
        figure,
        "0",
        f"{own} gated actions after the agent's SDK held `Killed`; "
        f"{after_return} between Kill returning and the agent hearing of it",
        verdict(own == 0),
    ]


def budgets(results: Results) -> list[Row]:
    """Gated effects after a kill. Kill latency is judged against floors measured in the same
    run (stackfloor, killmux, poll), not against absolute times."""
    return [_effects_budget(results)]


def _mib(values: list[int]) -> str:
    return " + ".join(f"{b / 2**20:.0f}" for b in values)


def memory_rows(results: Results) -> list[Row]:
    """Coordinator RSS at each size of each kill variant, and the slope per agent."""
    rows = []
    for phase in VARIANTS:
        res = results.of(phase)
        if res is None or not res.sizes:
            continue
        label = _SETUP[phase.name]
        rows.append([label, "0", _mib(res.rss_baseline_bytes), "-"])
        rows += [
            [label, fmt(e.agents), _mib(e.rss_bytes), " + ".join(str(c) for c in e.connections)]
            for e in res.sizes
        ]
        rows.append([label, "slope", f"{res.rss_per_agent_bytes / KB:.1f} KB per agent", ""])
    return rows


def latencies(results: Results) -> list[tuple[str, list[tuple[int, Summary]]]]:
    """Each variant's kill latency (from issue) by fleet size, for the floor's table."""
    out = []
    for phase in VARIANTS:
        res = results.of(phase)
        if res is not None:
            out.append((_LEGEND[phase.name], [(e.agents, e.from_issue_ms) for e in res.sizes]))
    return out


# -- the variants -------------------------------------------------------------------------------

_LEGEND = {
    "kill1": "Tether, 1 coordinator",
    "kill2": "Tether, 2 coordinators",
    "kill1long": "Tether, 1 coordinator, long TTL",
}
_SETUP = {
    "kill1": "1 coordinator",
    "kill2": "2 coordinators",
    "kill1long": "1 coordinator, long TTL",
}
_COLOR = {"kill1": "tab:blue", "kill2": "tab:green", "kill1long": "tab:purple"}
_HEADING = {
    "kill1": "## Kill propagation, one coordinator\n",
    "kill2": "## Kill propagation, two coordinators (agents split across both)\n",
    "kill1long": "## Kill propagation, one coordinator, long lease TTL\n",
}
ROUNDS = Flag("--rounds", "rounds", int, "kill/resume rounds per size")
SIZES = Flag(
    "--sizes", "sizes", ints,
    "fleet sizes for kill propagation on one coordinator (kill1) and its stack floor",
)  # fmt: skip
KILL_TTL = Flag("--kill-ttl", "ttl", float, "lease TTL of the kill-phase coordinators")
PROFILE = Flag("--profile", "profile", bool, "py-spy the coordinator (needs py-spy)", switch=True)


def _variant(
    name: str, about: str, full: Settings, quick: Settings, *, flags: tuple[Flag, ...],
    budgets: Callable[[Results], list[Row]] | None = None,
) -> Phase[Settings, Result]:  # fmt: skip
    def section(results: Results) -> list[str]:
        res = results.of(phase)
        return [] if res is None else [_HEADING[name], kill_table(res)]

    def plot(results: Results, ax: Axes) -> None:
        if (res := results.of(phase)) is not None:
            points = [(e.agents, e.from_issue_ms) for e in res.sizes]
            draw_latency(ax, _LEGEND[name], _COLOR[name], points)

    phase = Phase(
        name=name, about=about, result=Result, run=propagate, defaults=full, quick=quick,
        flags=(*flags, ROUNDS, WORKERS, PROFILE, TLS), section=section, plot=plot,
        budgets=budgets or (lambda _: []),
    )  # fmt: skip
    return phase


def _kill(label: str, coordinators: int, sizes: list[int], ttl: float) -> tuple[Settings, Settings]:
    """Full and quick settings: the quick run stops at 1,000 agents, 3 rounds, 90 s."""
    full = Settings(label, coordinators, sizes, ttl)
    quick = Settings(
        label, coordinators, [s for s in sizes if s <= 1000], ttl, 3, phase_budget=90.0
    )
    return full, quick


KILL1 = _variant(
    "kill1",
    "kill propagation at 100 to 10k agents on one coordinator (lease TTL 10 s)",
    *_kill("kill-1c", 1, [100, 1000, 2000, 5000, 10000], 10.0),
    flags=(SIZES, KILL_TTL),
    budgets=budgets,
)
KILL2 = _variant(
    "kill2",
    "the same with the agents split across two coordinators",
    *_kill("kill-2c", 2, [100, 1000, 2000, 5000, 10000], 10.0),
    flags=(Flag("--sizes-2c", "sizes", ints, "fleet sizes for two coordinators"), KILL_TTL),
)
KILL1LONG = _variant(
    "kill1long",
    "one coordinator at lease TTL 30 s: fan-out apart from heartbeat load",
    *_kill("kill-1c-long", 1, [1000, 5000, 10000], 30.0),
    flags=(),
)
VARIANTS = (KILL1, KILL2, KILL1LONG)
