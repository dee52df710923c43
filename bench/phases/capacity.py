"""Heartbeat capacity of one coordinator.

Raw Heartbeat streams (generated stub, pre-serialised messages, no SDK) beat as fast as
acks come back. The number of streams is stepped up; each step reports acks per second and
the coordinator's CPU. On 2 cores the generators share the machine with the coordinator,
so the CPU cost per heartbeat is reported too: it says what one fully used core would
sustain even when the generators cannot push the coordinator that far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

from bench.fleet import Fleet, split
from bench.harness import Bench, cpu_percent, log_lines, say
from bench.infra import Coordinator, Etcd
from bench.md import Row, fmt, pct, table, verdict
from bench.phase import WORKERS, Flag, Phase, Results, ints
from bench.record import OMIT
from bench.rounds import LOST_ETCD


@dataclass(frozen=True)
class Settings:
    streams: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400, 800])
    mux_streams: int = 100  # the comparison: 25 streams per TCP connection
    window: float = 8.0
    workers: int = 4


@dataclass
class Window:
    """A coordinator's load over a window: heartbeats and the CPU they cost, machine-wide."""

    heartbeats_per_s: float = 0.0
    coordinator_cpu_pct: float = 0.0
    coordinator_user_pct: float = 0.0
    coordinator_system_pct: float = 0.0
    coordinator_cpu_us_per_heartbeat: float | None = None
    etcd_cpu_pct: float = 0.0
    generators_cpu_pct: float = 0.0
    machine_cpu_pct: float = 0.0


@dataclass
class Step(Window):
    streams: int = 0
    stream_errors: int = 0
    coordinator_lost_etcd: int = 0


@dataclass
class Ramp:
    streams_per_connection: int = 1
    steps: list[Step] = field(default_factory=list)
    stopped: str | None = field(default=None, metadata=OMIT)


@dataclass
class Result:
    own_connection: Ramp = field(default_factory=Ramp)
    multiplexed: Ramp = field(default_factory=Ramp)
    steps: list[Step] = field(default_factory=list)  # own_connection's, as recorded before
    max_heartbeats_per_s: float | None = field(default=None, metadata=OMIT)
    at_max: Step | None = field(default=None, metadata=OMIT)
    one_core_projection_per_s: int | None = field(default=None, metadata=OMIT)


def _cpu_split(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return float(times.user), float(times.system)


def measure_window(
    coord: Coordinator, etcd: Etcd, fleet: Fleet, count: str, seconds: float
) -> Window:
    """Sleep ``seconds`` and report the load; ``count`` names the workers' heartbeat counter."""
    u0, s0 = _cpu_split(coord.pid)
    e0 = etcd.cpu_seconds()
    stats0 = fleet.stats()
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    u1, s1 = _cpu_split(coord.pid)
    stats1 = fleet.stats()
    beats = sum(float(b[count]) - float(a[count]) for a, b in zip(stats0, stats1, strict=True))
    gen_cpu = sum(float(b["cpu"]) - float(a["cpu"]) for a, b in zip(stats0, stats1, strict=True))
    rate = beats / elapsed
    cpu = (u1 - u0 + s1 - s0) / elapsed
    return Window(
        heartbeats_per_s=round(rate, 1),
        coordinator_cpu_pct=round(100 * cpu, 1),
        coordinator_user_pct=round(100 * (u1 - u0) / elapsed, 1),
        coordinator_system_pct=round(100 * (s1 - s0) / elapsed, 1),
        coordinator_cpu_us_per_heartbeat=round(1e6 * cpu / rate, 1) if rate else None,
        etcd_cpu_pct=cpu_percent(e0, etcd.cpu_seconds(), elapsed),
        generators_cpu_pct=round(100 * gen_cpu / elapsed, 1),
        machine_cpu_pct=round(psutil.cpu_percent(interval=None), 1),
    )


def _step(
    coord: Coordinator, etcd: Etcd, fleet: Fleet, *, streams: int, per_connection: int,
    window: float,
) -> Step:  # fmt: skip
    """Add raw streams up to ``streams`` and measure one window."""
    lost0, errors0 = log_lines(coord, LOST_ETCD), fleet.total("errors")
    shares = split(streams - fleet.size, len(fleet.workers))
    fleet.each(
        "add",
        [{"n": n, "target": coord.addr, "prefix": f"raw{i}-{fleet.size}-",
          "streams_per_channel": per_connection} for i, n in enumerate(shares)],
        within=120,
    )  # fmt: skip
    fleet.size = streams
    time.sleep(2)
    psutil.cpu_percent(interval=None)
    measured = measure_window(coord, etcd, fleet, "acks", window)
    return Step(
        **vars(measured),
        streams=streams,
        stream_errors=int(fleet.total("errors") - errors0),
        coordinator_lost_etcd=log_lines(coord, LOST_ETCD) - lost0,
    )


def _ramp(bench: Bench, cfg: Settings, label: str, steps: list[int], per_connection: int) -> Ramp:
    """Step the number of raw streams up on one fresh coordinator; one window per step."""
    out = Ramp(streams_per_connection=per_connection)
    with bench.cluster(label, 1, ttl=10.0) as (etcd, (coord,)):
        fleet = Fleet(bench.procs, "raw", max(2, cfg.workers - 1), bench.logs)
        try:
            for streams in sorted(steps):
                step = _step(
                    coord, etcd, fleet, streams=streams, per_connection=per_connection,
                    window=cfg.window,
                )  # fmt: skip
                out.steps.append(step)
                say(f"{label}: {step}")
                if step.coordinator_lost_etcd:
                    out.stopped = f"the coordinator failed closed ('lost etcd') at {streams}"
                    break
        finally:
            fleet.kill()
    return out


def heartbeat_capacity(bench: Bench, cfg: Settings) -> Result:
    own = _ramp(bench, cfg, "capacity", cfg.streams, 1)
    shared = _ramp(bench, cfg, "capacity-mux", [cfg.mux_streams], 25)
    out = Result(own_connection=own, multiplexed=shared, steps=own.steps)
    clean = [s for s in own.steps if not s.coordinator_lost_etcd and not s.stream_errors]
    best = max(clean or own.steps, key=lambda s: s.heartbeats_per_s, default=None)
    if best is not None:
        out.max_heartbeats_per_s = best.heartbeats_per_s
        out.at_max = best
        us = best.coordinator_cpu_us_per_heartbeat
        out.one_core_projection_per_s = round(1e6 / us) if us else None
    return out


# -- the report ---------------------------------------------------------------------------------

_HEAD = [
    "streams", "hb/s", "coord CPU", "user", "system", "µs CPU/hb", "etcd CPU",
    "generators CPU", "machine CPU", "stream errors", "coordinator lost etcd",
]  # fmt: skip


def _row(s: Step) -> Row:
    return [
        fmt(s.streams), fmt(s.heartbeats_per_s, 0), pct(s.coordinator_cpu_pct),
        pct(s.coordinator_user_pct), pct(s.coordinator_system_pct),
        fmt(s.coordinator_cpu_us_per_heartbeat), pct(s.etcd_cpu_pct),
        pct(s.generators_cpu_pct), pct(s.machine_cpu_pct), fmt(s.stream_errors),
        fmt(s.coordinator_lost_etcd),
    ]  # fmt: skip


def budgets(results: Results) -> list[Row]:
    figure, target = "heartbeats handled per second by one coordinator process", "≥ 10,000"
    res = results.of(PHASE)
    if res is None or res.max_heartbeats_per_s is None or res.at_max is None:
        return [[figure, target, "-", verdict(None)]]
    best = res.at_max
    return [[
        figure, target,
        f"{fmt(res.max_heartbeats_per_s, 0)} hb/s at {fmt(best.coordinator_cpu_pct)}% CPU "
        f"({fmt(best.coordinator_cpu_us_per_heartbeat)} µs CPU/hb; "
        f"one full core ≈ {fmt(res.one_core_projection_per_s)} hb/s)",
        verdict(res.max_heartbeats_per_s >= 10000),
    ]]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    parts = [
        "## Heartbeat capacity of one coordinator (raw streams, beating as fast as acked)\n",
        "The budget figure is the best step in which the coordinator did not fail closed. "
        "'coordinator lost etcd' means the coordinator declared etcd lost and failed "
        "closed, even though etcd was healthy (see `bench/diag_keeper.py`); the ramp stops "
        "there.\n\n",
        "Each stream on its own TCP connection, as real agents are:\n\n",
        table(_HEAD, [_row(s) for s in res.own_connection.steps]),
    ]
    if res.multiplexed.steps:
        parts += [
            "\nFor comparison, 25 streams per TCP connection:\n\n",
            table(_HEAD, [_row(s) for s in res.multiplexed.steps]),
        ]
    return parts


PHASE = Phase(
    name="capacity",
    about="heartbeats per second one coordinator sustains, and its CPU per heartbeat",
    result=Result,
    run=heartbeat_capacity,
    defaults=Settings(),
    quick=Settings(streams=[25, 100], mux_streams=50, window=3.0),
    flags=(Flag("--capacity-streams", "streams", ints, "raw stream counts for capacity"), WORKERS),
    budgets=budgets,
    section=section,
)
