"""Memory per connected agent: the coordinator against gRPC's own floor, in the same run.

The same idle Heartbeat streams (raw, one TCP connection each, registered and then silent)
are opened against a ``tether serve`` coordinator and against ``bench.bare_server``, a
grpc.aio server with the same options and nothing behind it. The RSS slope of each says
what one connected agent costs; the difference is Tether's own share. The coordinator runs
with a long lease TTL here, so that silent streams are not declared STALE while measured.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil
from tether_server import free_port, wait_until

from bench.fleet import Fleet, split
from bench.harness import Bench, say
from bench.infra import LOOPBACK, stop
from bench.md import KB, Row, table, verdict
from bench.phase import WORKERS, Phase, Results
from bench.phases import kill
from bench.stats import slope

_TTL = 300.0


@dataclass(frozen=True)
class Settings:
    streams: list[int] = field(default_factory=lambda: [0, 1000, 2000, 3000])
    workers: int = 4


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


def _grow(fleet: Fleet, target: str, pid: int, sizes: list[int], label: str) -> Growth:
    points: list[tuple[float, float]] = []
    time.sleep(1)
    points.append((0.0, float(psutil.Process(pid).memory_info().rss)))
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
        rss = psutil.Process(pid).memory_info().rss
        points.append((float(registered), float(rss)))
        say(f"memory {label}: {registered} streams, RSS {rss / 2**20:.1f} MiB")
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
    return out


# -- the report ---------------------------------------------------------------------------------


def _floor_table(res: Result) -> str:
    rows = []
    for growth, label in ((res.tether, "tether serve"), (res.bare_grpc, "bare grpc.aio server")):
        rows += [[label, f"{p.streams:,}", f"{p.rss_bytes / 2**20:.1f}"] for p in growth.points]
        rows.append([label, "slope", f"{growth.rss_per_stream_bytes / KB:.1f} KB per stream"])
    share = res.tether_share_bytes or 0.0
    rows.append(["Tether's own share", "", f"{share / KB:.1f} KB per stream"])
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
    """Coordinator RSS per agent: from this phase, or else from kill1's growth."""
    figure, target = "coordinator memory per connected agent", "≤ 30 KB"
    res, kill1 = results.of(PHASE), results.of(kill.KILL1)
    from_kill = (
        f"; {kill1.rss_per_agent_bytes / KB:.1f} KB with SDK agents in kill1"
        if kill1 is not None and kill1.rss_per_agent_bytes
        else ""
    )
    if res is not None and res.tether_share_bytes is not None:
        kb = res.tether.rss_per_stream_bytes / KB
        floor_kb = res.bare_grpc.rss_per_stream_bytes / KB
        largest = max(p.streams for p in res.tether.points)
        measured = (
            f"{kb:.1f} KB (RSS slope over 0-{largest:,} agents, one TCP connection each), "
            f"of which a bare grpc.aio server holds {floor_kb:.1f} KB and Tether "
            f"{kb - floor_kb:.1f} KB{from_kill}"
        )
        return [[figure, target, measured, verdict(kb <= 30)]]
    if kill1 is not None and kill1.sizes:
        kb = kill1.rss_per_agent_bytes / KB
        measured = f"{kb:.1f} KB (RSS slope over 0-{kill1.largest():,} agents)"
        return [[figure, target, measured, verdict(kb <= 30)]]
    return [[figure, target, "-", verdict(None)]]


PHASE = Phase(
    name="memory",
    about="RSS per connected agent, against a bare grpc.aio server with the same options",
    result=Result,
    run=memory_per_agent,
    defaults=Settings(),
    quick=Settings(streams=[0, 500, 1000]),
    flags=(WORKERS,),
    budgets=budgets,
    section=section,
)
