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

from bench.echo import add_streams, process_tree_cpu, ramp_bare, serve_workers, window
from bench.fleet import Fleet, split
from bench.harness import Bench, cpu_percent, log_lines, say
from bench.infra import Coordinator, Etcd
from bench.md import Row, fmt, missed_by, pct, table, verdict
from bench.phase import WORKERS, Flag, Phase, Results, ints
from bench.record import OMIT
from bench.rounds import LOST_ETCD


@dataclass(frozen=True)
class Settings:
    streams: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400, 800])
    mux_streams: int = 100  # the comparison: 25 streams per TCP connection
    window: float = 8.0
    workers: int = 4
    echo_streams: list[int] = field(default_factory=lambda: [100, 400])  # also in ``streams``
    serve_workers_streams: int = 400  # raw streams against `tether serve --workers 1` and 2


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
class Echo:
    """A bare grpc.aio echo (bench/bare_server.py) under the same raw streams."""

    streams: int = 0
    heartbeats_per_s: float = 0.0
    cpu_us_per_heartbeat: float = 0.0


@dataclass
class Workers:
    """``tether serve --workers N``: heartbeats per second and CPU of all its processes."""

    workers: int = 0
    streams: int = 0
    heartbeats_per_s: float = 0.0
    cpu_pct: float = 0.0
    processes: int = 0


@dataclass
class Result:
    bare_echo: list[Echo] = field(default_factory=list)
    serve_workers: list[Workers] = field(default_factory=list)
    serve_workers_note: str = ""
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


def _serve_workers(bench: Bench, cfg: Settings, workers: int) -> Workers:
    """Raw streams against ``tether serve --workers N``, its whole process tree measured."""
    with bench.cluster(f"capacity-workers{workers}", 0) as (etcd, _):
        coord = Coordinator(bench.procs, etcd, bench.logs, 10.0)
        coord.start("--workers", str(workers))
        fleet = Fleet(bench.procs, "raw", max(2, cfg.workers - 1), bench.logs)
        try:
            add_streams(fleet, coord.addr, cfg.serve_workers_streams)
            rate, cpu = window(lambda: process_tree_cpu(coord.pid), fleet, cfg.window)
            tree = 1 + len(psutil.Process(coord.pid).children(recursive=True))
        finally:
            fleet.kill()
            for child in psutil.Process(coord.pid).children(recursive=True):
                child.kill()
            coord.stop(9)
    return Workers(workers, cfg.serve_workers_streams, round(rate, 1), round(100 * cpu, 1), tree)


def heartbeat_capacity(bench: Bench, cfg: Settings) -> Result:
    own = _ramp(bench, cfg, "capacity", cfg.streams, 1)
    shared = _ramp(bench, cfg, "capacity-mux", [cfg.mux_streams], 25)
    out = Result(own_connection=own, multiplexed=shared, steps=own.steps)
    steps = [s for s in cfg.echo_streams if s in cfg.streams] or sorted(cfg.streams)[:1]
    echo = ramp_bare(bench, steps, max(2, cfg.workers - 1), cfg.window)
    out.bare_echo = [Echo(n, rate, us) for n, rate, us in echo]
    say(f"capacity: bare echo {out.bare_echo}")
    if serve_workers():
        out.serve_workers = [_serve_workers(bench, cfg, n) for n in (1, 2)]
        say(f"capacity: tether serve --workers {out.serve_workers}")
    else:
        out.serve_workers_note = "not available: this build's `tether serve` has no --workers"
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


GOAL = 1.3  # coordinator CPU per heartbeat at most this multiple of a bare echo's


def _ratios(res: Result) -> list[tuple[int, float, float, float]]:
    """(streams, Tether µs/hb, bare echo µs/hb, ratio) at each stream count both measured."""
    tether = {s.streams: s.coordinator_cpu_us_per_heartbeat for s in res.own_connection.steps}
    return [
        (e.streams, us, e.cpu_us_per_heartbeat, us / e.cpu_us_per_heartbeat)
        for e in res.bare_echo
        if (us := tether.get(e.streams)) and e.cpu_us_per_heartbeat
    ]


def budgets(results: Results) -> list[Row]:
    figure = "coordinator CPU per heartbeat against a bare grpc.aio echo, same raw streams"
    res = results.of(PHASE)
    ratios = _ratios(res) if res is not None else []
    if not ratios:
        return [[figure, f"≤ {GOAL:g}x", "-", verdict(None)]]
    worst = max(r for *_, r in ratios)
    text = "; ".join(
        f"{r:,.2f}x at {n:,} streams ({fmt(us)} µs against {fmt(floor)} µs)"
        for n, us, floor, r in ratios
    )
    return [[figure, f"≤ {GOAL:g}x", text + missed_by(worst, GOAL), verdict(worst <= GOAL)]]


def _workers_part(res: Result) -> list[str]:
    if not res.serve_workers:
        return [f"\n`tether serve --workers 1` against `--workers 2`: {res.serve_workers_note}.\n"]
    rows = [
        [fmt(w.workers), fmt(w.processes), fmt(w.streams), fmt(w.heartbeats_per_s, 0),
         pct(w.cpu_pct)]
        for w in res.serve_workers
    ]  # fmt: skip
    return [
        "\n`tether serve --workers N`, the same raw streams (one connection each, spread by "
        "the kernel over the workers' SO_REUSEPORT sockets), CPU of all its processes:\n\n",
        table(["--workers", "processes", "streams", "hb/s", "CPU"], rows),
    ]


def _echo_part(res: Result) -> list[str]:
    rows = [[fmt(n), fmt(us), fmt(floor), f"{r:,.2f}x"] for n, us, floor, r in _ratios(res)]
    if not rows:
        return []
    return [
        "\nAgainst a bare grpc.aio echo (`bench/bare_server.py`: one pre-serialised reply per "
        "beat), the same raw streams in the same run:\n\n",
        table(["streams", "coordinator µs CPU/hb", "bare echo µs CPU/hb", "ratio"], rows),
    ]


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
    if res.at_max is not None:
        parts.append(
            f"\nBest step: {fmt(res.max_heartbeats_per_s, 0)} hb/s at "
            f"{pct(res.at_max.coordinator_cpu_pct)} coordinator CPU (one full core ≈ "
            f"{fmt(res.one_core_projection_per_s)} hb/s).\n"
        )
    return parts + _echo_part(res) + _workers_part(res)


PHASE = Phase(
    name="capacity",
    about="heartbeats per second one coordinator sustains, and its CPU per heartbeat",
    result=Result,
    run=heartbeat_capacity,
    defaults=Settings(),
    quick=Settings(
        streams=[25, 100], mux_streams=50, window=3.0, echo_streams=[100], serve_workers_streams=100
    ),
    flags=(Flag("--capacity-streams", "streams", ints, "raw stream counts for capacity"), WORKERS),
    budgets=budgets,
    section=section,
)
