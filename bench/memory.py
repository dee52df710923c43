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

import psutil

from bench.fleet import Fleet, split
from bench.harness import Bench, Result, say
from bench.infra import LOOPBACK, free_port, stop, wait_for
from bench.stats import slope

_TTL = 300.0


def _grow(fleet: Fleet, target: str, pid: int, sizes: list[int], label: str) -> Result:
    points: list[tuple[float, float]] = []
    time.sleep(1)
    points.append((0.0, float(psutil.Process(pid).memory_info().rss)))
    for size in sorted(s for s in sizes if s > 0):
        shares = split(size - fleet.size, len(fleet.workers))
        fleet.each(
            "add",
            lambda i, shares=shares: {
                "n": shares[i],
                "target": target,
                "prefix": f"mem{i}-{fleet.size}-",
                "streams_per_channel": 1,
                "idle": True,
            },
            within=180,
        )
        fleet.size = size
        time.sleep(2)
        registered = int(fleet.total("registered"))
        rss = psutil.Process(pid).memory_info().rss
        points.append((float(registered), float(rss)))
        say(f"memory {label}: {registered} streams, RSS {rss / 2**20:.1f} MiB")
    per_stream, _ = slope(points)
    return {
        "points": [{"streams": int(n), "rss_bytes": int(r)} for n, r in points],
        "rss_per_stream_bytes": round(per_stream, 1),
    }


def memory_per_agent(bench: Bench) -> Result:
    cfg = bench.settings
    out: Result = {"lease_ttl": _TTL, "sizes": cfg.memory_streams}
    with bench.cluster("memory", 1, ttl=_TTL) as (_, (coord,)):
        fleet = Fleet(bench.procs, "raw", cfg.workers, bench.logs)
        try:
            out["tether"] = _grow(fleet, coord.addr, coord.pid, cfg.memory_streams, "tether")
        finally:
            fleet.kill()
    addr = f"{LOOPBACK}:{free_port()}"
    bare = bench.procs.spawn(
        [sys.executable, "-m", "bench.bare_server", addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert bare.stdout is not None
        wait_for(lambda: bare.stdout is not None and bare.stdout.readline(), 30, "bare server")
        fleet = Fleet(bench.procs, "raw", cfg.workers, bench.logs)
        try:
            out["bare_grpc"] = _grow(fleet, addr, bare.pid, cfg.memory_streams, "bare gRPC")
        finally:
            fleet.kill()
    finally:
        stop(bare, 9)
    tether_kb = out["tether"]["rss_per_stream_bytes"]
    floor_kb = out["bare_grpc"]["rss_per_stream_bytes"]
    out["tether_share_bytes"] = round(tether_kb - floor_kb, 1)
    return out
