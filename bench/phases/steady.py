"""etcd writes per heartbeat in steady state.

Real SDK agents at the shortest lease TTL (2 s, a beat every 0.5 s) for a window, with no
checkpoints, an unchanged checkpoint re-reported all the time, and a checkpoint that
changes more often than it is sent. etcd's revision counts write transactions; the keys'
versions count keys written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tether_server._store import CHECKPOINTS

from bench.fleet import Fleet, Grow
from bench.harness import Bench, log_lines, say
from bench.infra import Coordinator, Etcd
from bench.md import Row, fmt, pct, table, verdict
from bench.phase import TLS, WORKERS, Flag, Phase, Results, ints
from bench.phases.capacity import Window, measure_window
from bench.rounds import LOST_ETCD

TTL = 2.0
MODES = ("none", "same", "changing")


@dataclass(frozen=True)
class Settings:
    agents: list[int] = field(default_factory=lambda: [300, 1000])
    window: float = 15.0
    workers: int = 4
    tls: bool = False  # mutual TLS on every connection (bench/tls.py)


@dataclass
class Mode(Window):
    """One checkpoint mode's window: heartbeats, and what etcd wrote for them."""

    heartbeats: int = 0
    etcd_revisions: int = 0
    checkpoint_keys_written: int = 0
    raft_proposals: float = 0.0
    writes_per_heartbeat: float | None = None
    keys_written_per_heartbeat: float | None = None
    lost: int = 0
    reregistrations: int = 0
    coordinator_lost_etcd: int = 0
    steady: bool = False


@dataclass
class Run:
    """One fleet size through the three modes; ``steady`` if no agent re-registered."""

    agents: int = 0
    lease_ttl: float = TTL
    window_s: float = 0.0
    modes: dict[str, Mode] = field(default_factory=dict)
    grow: Grow = field(default_factory=Grow)
    steady: bool = False
    tls: bool = False


@dataclass
class Result(Run):
    """The run the budget is judged on (the largest steady one), and every run."""

    runs: list[Run] = field(default_factory=list)


def _mode(coord: Coordinator, etcd: Etcd, fleet: Fleet, mode: str, window: float) -> Mode:
    fleet.all("checkpoints", mode=mode, period=0.2)
    time.sleep(3)  # the first report of a value is written; then it settles
    rev0, keys0 = etcd.revision(), etcd.key_versions(CHECKPOINTS)
    m0, lost0, grants0 = etcd.metrics(), fleet.total("lost"), fleet.total("grants")
    lost_etcd0 = log_lines(coord, LOST_ETCD)
    measured = measure_window(coord, etcd, fleet, "replies", window)
    rev1, keys1 = etcd.revision(), etcd.key_versions(CHECKPOINTS)
    m1 = etcd.metrics()
    beats = measured.heartbeats_per_s * window
    proposals = "etcd_server_proposals_committed_total"
    out = Mode(
        **vars(measured),
        heartbeats=round(beats),
        etcd_revisions=rev1 - rev0,
        checkpoint_keys_written=keys1 - keys0,
        raft_proposals=m1.get(proposals, 0) - m0.get(proposals, 0),
        writes_per_heartbeat=round((rev1 - rev0) / beats, 5) if beats else None,
        keys_written_per_heartbeat=round((keys1 - keys0) / beats, 5) if beats else None,
        lost=int(fleet.total("lost") - lost0),
        reregistrations=int(fleet.total("grants") - grants0),
        coordinator_lost_etcd=log_lines(coord, LOST_ETCD) - lost_etcd0,
    )
    out.steady = not (out.lost or out.reregistrations or out.coordinator_lost_etcd)
    return out


def _run(bench: Bench, cfg: Settings, n: int) -> Run:
    out = Run(agents=n, window_s=cfg.window, tls=cfg.tls)
    with bench.cluster(f"steady-{n}", 1, ttl=TTL, tls=cfg.tls) as (etcd, (coord,)):
        fleet = Fleet(bench.procs, "sdk", max(2, cfg.workers // 2), bench.logs)
        try:
            deadline = 120 + n * 0.05
            out.grow = fleet.grow_sdk(n, [coord.addr], deadline, tls=coord.agent_tls)
            for mode in MODES:
                out.modes[mode] = _mode(coord, etcd, fleet, mode, cfg.window)
                say(f"steady {n} {mode}: {out.modes[mode]}")
        finally:
            fleet.kill()
    out.steady = all(m.steady for m in out.modes.values())
    return out


def steady_state(bench: Bench, cfg: Settings) -> Result:
    """One run per fleet size; the budget is judged on the largest run that stayed steady."""
    runs = [_run(bench, cfg, n) for n in cfg.agents]
    held = [r for r in runs if r.steady]
    chosen = max(held, key=lambda r: r.agents) if held else runs[0]
    return Result(**vars(chosen), runs=runs)


# -- the report ---------------------------------------------------------------------------------

_HEAD = [
    "agents", "checkpoint", "hb/s", "coord CPU", "µs CPU/hb", "etcd write txns",
    "keys written", "raft proposals", "writes/hb", "keys/hb", "re-registrations",
    "coordinator lost etcd",
]  # fmt: skip
_LABELS = {
    "none": "none reported",
    "same": "unchanged, re-reported every 0.2 s",
    "changing": "changes every 0.2 s",
}


def _row(run: Run, mode: str, m: Mode) -> Row:
    return [
        fmt(run.agents), _LABELS.get(mode, mode), fmt(m.heartbeats_per_s, 0),
        pct(m.coordinator_cpu_pct), fmt(m.coordinator_cpu_us_per_heartbeat),
        fmt(m.etcd_revisions), fmt(m.checkpoint_keys_written), fmt(int(m.raft_proposals)),
        fmt(m.writes_per_heartbeat, 4), fmt(m.keys_written_per_heartbeat, 4),
        fmt(m.reregistrations), fmt(m.coordinator_lost_etcd),
    ]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    rows = [_row(run, mode, m) for run in res.runs or [res] for mode, m in run.modes.items()]
    return [
        "## etcd writes per heartbeat, steady state\n",
        f"SDK agents at lease TTL 2 s (a beat every 0.5 s), {res.window_s:g} s windows"
        + (", mutual TLS on every connection (`--tls`)" if res.tls else "")
        + ". A run "
        "with re-registrations or 'lost etcd' was not steady: the agents were failing closed "
        "and registering again, and each registration writes etcd. The budget is judged on "
        "the largest steady run.\n\n" + table(_HEAD, rows),
    ]


def budgets(results: Results) -> list[Row]:
    figure, target = "etcd writes per heartbeat, steady state", "≤ 0.05"
    res = results.of(PHASE)
    quiet = [res.modes[m].writes_per_heartbeat for m in ("none", "same") if res and m in res.modes]
    if res is None or not quiet or None in quiet:
        return [[figure, target, "-", verdict(None)]]
    worst = max(q for q in quiet if q is not None)
    changing = res.modes.get("changing", Mode())
    measured = (
        f"{worst:.4f} at {fmt(res.agents)} agents, checkpoint unchanged "
        f"(changing every beat: {fmt(changing.writes_per_heartbeat, 4)} write "
        f"txns, {fmt(changing.keys_written_per_heartbeat, 3)} keys per hb)"
    )
    if not res.steady:
        measured += "; **the fleet was not steady: agents re-registered**"
    return [[figure, target, measured, verdict(worst <= 0.05) if res.steady else verdict(None)]]


PHASE = Phase(
    name="steady",
    about="etcd writes per heartbeat with no checkpoint, an unchanged one, and a changing one",
    result=Result,
    run=steady_state,
    defaults=Settings(),
    quick=Settings(agents=[200], window=5.0),
    flags=(
        Flag("--steady-agents", "agents", ints, "fleet sizes of the steady phase"),
        Flag("--steady-window", "window", float, "seconds each steady checkpoint mode is measured"),
        WORKERS,
        TLS,
    ),
    budgets=budgets,
    section=section,
)
