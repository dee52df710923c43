"""Memory per connected agent: the coordinator against gRPC's own floor, in the same run.

The same idle Heartbeat streams (raw, one TCP connection each, registered and then silent)
are opened against a ``tether serve`` coordinator and against ``bench.bare_server``, a
grpc.aio server with the same options and nothing behind it. The RSS slope of each says
what one connected agent costs; the difference is Tether's own share. The coordinator runs
with a long lease TTL here, so that silent streams are not declared STALE while measured.

Each line is fitted over seven points, each the median of three RSS readings 0.5 s apart,
by the same code for Tether and for the bare server: one reading of the coordinator moves
by about 1% with what registrations leave behind, where the bare server's barely moves.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil
from tether_server import free_port, wait_until

from bench.fleet import Fleet, split
from bench.harness import Bench, say
from bench.infra import LOOPBACK, stop
from bench.md import KB, Row, missed_by, table, verdict
from bench.phase import WORKERS, Flag, Phase, Results, ints
from bench.phases import kill
from bench.stats import slope

_TTL = 300.0
_SAMPLES = 3  # RSS readings per point, 0.5 s apart: the median is the point's figure


@dataclass(frozen=True)
class Settings:
    # Seven points a line: one RSS reading moves by ~1% with what a registration leaves
    # behind (fragmentation, garbage not yet collected), and the slope with it.
    streams: list[int] = field(default_factory=lambda: list(range(0, 3001, 500)))
    workers: int = 4
    runs: list[int] = field(default_factory=lambda: list(range(0, 6001, 1000)))  # multiplexed
    run_processes: int = 2  # the multiplexed runs' processes: a stream each, since i13-cmux


STREAM_GOAL = 1.15  # coordinator RSS per stream at most this multiple of bare gRPC's
RUN_LIMIT = 2 * KB  # coordinator RSS per multiplexed run


@dataclass
class Point:
    streams: int = 0
    rss_bytes: int = 0


@dataclass
class Growth:
    """A server's RSS as idle streams were added, and its least-squares slope per stream."""

    points: list[Point] = field(default_factory=list)
    rss_per_stream_bytes: float = 0.0


@dataclass
class Result:
    lease_ttl: float = _TTL
    sizes: list[int] = field(default_factory=list)
    tether: Growth = field(default_factory=Growth)
    bare_grpc: Growth = field(default_factory=Growth)
    tether_share_bytes: float | None = None
    per_run: Growth = field(default_factory=Growth)  # SDK runs sharing their process's stream
    per_run_streams: int = 0  # streams those runs held open at the largest size (channelz)
    per_run_processes: int = 0


def rss(pid: int) -> float:
    """The median of a few RSS readings of ``pid``, taken once what was added has settled."""
    readings = []
    for _ in range(_SAMPLES):
        time.sleep(0.5)
        readings.append(float(psutil.Process(pid).memory_info().rss))
    return statistics.median(readings)


def _grow(fleet: Fleet, target: str, pid: int, sizes: list[int], label: str) -> Growth:
    points: list[tuple[float, float]] = []
    time.sleep(1)
    points.append((0.0, rss(pid)))
    for size in sorted(s for s in sizes if s > 0):
        shares = split(size - fleet.size, len(fleet.workers))
        fleet.each(
            "add",
            [{"n": n, "target": target, "prefix": f"mem{i}-{fleet.size}-",
              "streams_per_channel": 1, "idle": True} for i, n in enumerate(shares)],
            within=180,
        )  # fmt: skip
        fleet.size = size
        time.sleep(2)
        registered = int(fleet.total("registered"))
        points.append((float(registered), rss(pid)))
        say(f"memory {label}: {registered} streams, RSS {points[-1][1] / 2**20:.1f} MiB")
    per_stream, _ = slope(points)
    return Growth(
        points=[Point(streams=int(n), rss_bytes=int(r)) for n, r in points],
        rss_per_stream_bytes=round(per_stream, 1),
    )


def _bare(bench: Bench, cfg: Settings) -> Growth:
    """The same streams against bench/bare_server.py: gRPC's own share."""
    addr = f"{LOOPBACK}:{free_port()}"
    bare = bench.procs.spawn(
        [sys.executable, "-m", "bench.bare_server", addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: bare.stdout is not None and bare.stdout.readline(), 30, "bare server")
        fleet = Fleet(bench.procs, "raw", cfg.workers, bench.logs)
        try:
            return _grow(fleet, addr, bare.pid, cfg.streams, "bare gRPC")
        finally:
            fleet.kill()
    finally:
        stop(bare, 9)


def _runs(bench: Bench, cfg: Settings, out: Result) -> None:
    """Coordinator RSS as SDK runs are added in a few processes, sharing what the SDK shares."""
    with bench.cluster("memory-runs", 1, ttl=_TTL) as (_, (coord,)):
        fleet = Fleet(bench.procs, "mux", cfg.run_processes, bench.logs)
        try:
            time.sleep(1)
            points = [(0.0, rss(coord.pid))]
            for size in sorted(s for s in cfg.runs if s > 0):
                shares = split(size - fleet.size, len(fleet.workers))
                fleet.each(
                    "add",
                    [{"n": n, "target": coord.addr, "tenant": "mem", "prefix": f"r{i}-{size}-",
                      "deadline": 120} for i, n in enumerate(shares)],
                    within=200,
                )  # fmt: skip
                fleet.size = size
                time.sleep(2)
                points.append((float(size), rss(coord.pid)))
                say(f"memory runs: {size} runs, RSS {points[-1][1] / 2**20:.1f} MiB")
            out.per_run_streams = sum(int(r["streams"]) for r in fleet.all("streams"))
        finally:
            fleet.kill()
    out.per_run_processes = cfg.run_processes
    out.per_run = Growth(
        points=[Point(streams=int(n), rss_bytes=int(r)) for n, r in points],
        rss_per_stream_bytes=round(slope(points)[0], 1),
    )


def memory_per_agent(bench: Bench, cfg: Settings) -> Result:
    out = Result(sizes=cfg.streams)
    with bench.cluster("memory", 1, ttl=_TTL) as (_, (coord,)):
        fleet = Fleet(bench.procs, "raw", cfg.workers, bench.logs)
        try:
            out.tether = _grow(fleet, coord.addr, coord.pid, cfg.streams, "tether")
        finally:
            fleet.kill()
    out.bare_grpc = _bare(bench, cfg)
    share = out.tether.rss_per_stream_bytes - out.bare_grpc.rss_per_stream_bytes
    out.tether_share_bytes = round(share, 1)
    if cfg.runs:
        _runs(bench, cfg, out)
    return out


# -- the report ---------------------------------------------------------------------------------


def _floor_table(res: Result) -> str:
    rows = []
    for growth, label in ((res.tether, "tether serve"), (res.bare_grpc, "bare grpc.aio server")):
        rows += [[label, f"{p.streams:,}", f"{p.rss_bytes / 2**20:.1f}"] for p in growth.points]
        rows.append([label, "slope", f"{growth.rss_per_stream_bytes / KB:.1f} KB per stream"])
    share = res.tether_share_bytes or 0.0
    rows.append(["Tether's own share", "", f"{share / KB:.1f} KB per stream"])
    if len(res.per_run.points) > 1:
        label = f"tether serve, SDK runs in {res.per_run_processes} processes"
        rows += [[label, f"{p.streams:,} runs", f"{p.rss_bytes / 2**20:.1f}"]
                 for p in res.per_run.points]  # fmt: skip
        rows.append([label, "slope", f"{res.per_run.rss_per_stream_bytes / KB:.2f} KB per run "
                     f"({res.per_run_streams:,} streams open at the end)"])  # fmt: skip
    return table(["server", "streams", "RSS MiB"], rows)


def section(results: Results) -> list[str]:
    """The coordinator's RSS in the kill phases, and against a bare gRPC server."""
    res = results.of(PHASE)
    parts = []
    if res is not None or results.ran(kill.KILL1, kill.KILL2):
        parts.append("## Coordinator memory\n")
    if results.ran(*kill.VARIANTS):
        parts.append(table(["setup", "agents", "coordinator RSS MiB", "TCP connections"],
                           kill.memory_rows(results)))  # fmt: skip
    if res is not None and res.tether_share_bytes is not None:
        parts += [
            "\nThe same idle streams (registered, then silent; one TCP connection each) against "
            "a coordinator and against `bench/bare_server.py`, a grpc.aio server with the same "
            "options and nothing behind it, in the same run:\n\n",
            _floor_table(res),
        ]
    return parts


def budgets(results: Results) -> list[Row]:
    """Per stream against bare gRPC, and per multiplexed run."""
    return [_stream_budget(results), _run_budget(results)]


def _stream_budget(results: Results) -> Row:
    figure, target = "coordinator memory per stream against bare gRPC", f"≤ {STREAM_GOAL:g}x"
    res, kill1 = results.of(PHASE), results.of(kill.KILL1)
    from_kill = (
        f"; {kill1.rss_per_agent_bytes / KB:.1f} KB with SDK agents in kill1"
        if kill1 is not None and kill1.rss_per_agent_bytes
        else ""
    )
    if res is None or res.tether_share_bytes is None or res.bare_grpc.rss_per_stream_bytes <= 0:
        return [figure, target, "-", verdict(None)]
    kb, floor_kb = res.tether.rss_per_stream_bytes / KB, res.bare_grpc.rss_per_stream_bytes / KB
    times = kb / floor_kb
    largest = max(p.streams for p in res.tether.points)
    measured = (
        f"{times:.2f}x: {kb:.1f} KB against {floor_kb:.1f} KB (RSS slopes over 0-{largest:,} "
        f"idle streams, one TCP connection each){from_kill}" + missed_by(times, STREAM_GOAL)
    )
    return [figure, target, measured, verdict(times <= STREAM_GOAL)]


def _run_budget(results: Results) -> Row:
    figure, target = "coordinator memory per multiplexed run", f"≤ {RUN_LIMIT / KB:g} KB"
    res = results.of(PHASE)
    if res is None or len(res.per_run.points) < 2:
        return [figure, target, "-", verdict(None)]
    per_run = res.per_run.rss_per_stream_bytes
    largest = max(p.streams for p in res.per_run.points)
    measured = (
        f"{per_run / KB:.2f} KB (RSS slope over 0-{largest:,} SDK runs in "
        f"{res.per_run_processes} processes, {res.per_run_streams:,} streams open)"
        + missed_by(per_run, RUN_LIMIT)
    )
    return [figure, target, measured, verdict(per_run <= RUN_LIMIT)]


PHASE = Phase(
    name="memory",
    about="RSS per connected agent, against a bare grpc.aio server with the same options",
    result=Result,
    run=memory_per_agent,
    defaults=Settings(),
    quick=Settings(streams=[0, 500, 1000], runs=[0, 1000, 2000]),
    flags=(WORKERS, Flag("--memory-runs", "runs", ints, "multiplexed run counts for memory")),
    budgets=budgets,
    section=section,
)
