"""Heartbeat capacity of one coordinator, and etcd writes per heartbeat in steady state.

``heartbeat_capacity``: raw Heartbeat streams (generated stub, pre-serialised messages, no
SDK) beat as fast as acks come back. The number of streams is stepped up; each step reports
acks per second and the coordinator's CPU. On 2 cores the generators share the machine
with the coordinator, so the CPU cost per heartbeat is reported too: it says what one fully
used core would sustain even when the generators cannot push the coordinator that far.

``steady_state``: real SDK agents at the shortest lease TTL (2 s, a beat every 0.5 s) for a
window, with no checkpoints, an unchanged checkpoint re-reported all the time, and a
checkpoint that changes more often than it is sent. etcd's revision counts write
transactions; the keys' versions count keys written.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from bench.fleet import Fleet, split
from bench.harness import Bench, Result, cpu_percent, log_lines, say
from bench.infra import Coordinator, Etcd
from bench.kill import LOST_ETCD

CHECKPOINTS = b"/tether/checkpoints/"


def _cpu_split(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return float(times.user), float(times.system)


def _window(coord: Coordinator, etcd: Etcd, fleet: Fleet, field: str, seconds: float) -> Result:
    u0, s0 = _cpu_split(coord.pid)
    e0 = etcd.cpu_seconds()
    stats0 = fleet.stats()
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    u1, s1 = _cpu_split(coord.pid)
    stats1 = fleet.stats()
    count = sum(float(b[field]) - float(a[field]) for a, b in zip(stats0, stats1, strict=True))
    gen_cpu = sum(float(b["cpu"]) - float(a["cpu"]) for a, b in zip(stats0, stats1, strict=True))
    rate = count / elapsed
    cpu = (u1 - u0 + s1 - s0) / elapsed
    return {
        "heartbeats_per_s": round(rate, 1),
        "coordinator_cpu_pct": round(100 * cpu, 1),
        "coordinator_user_pct": round(100 * (u1 - u0) / elapsed, 1),
        "coordinator_system_pct": round(100 * (s1 - s0) / elapsed, 1),
        "coordinator_cpu_us_per_heartbeat": round(1e6 * cpu / rate, 1) if rate else None,
        "etcd_cpu_pct": cpu_percent(e0, etcd.cpu_seconds(), elapsed),
        "generators_cpu_pct": round(100 * gen_cpu / elapsed, 1),
        "machine_cpu_pct": round(psutil.cpu_percent(interval=None), 1),
    }


def _ramp(bench: Bench, label: str, steps: list[int], per_connection: int, window: float) -> Result:
    """Step the number of raw streams up on one fresh coordinator; one window per step."""
    out: Result = {"streams_per_connection": per_connection, "steps": []}
    with bench.cluster(label, 1, ttl=10.0) as (etcd, (coord,)):
        workers = max(2, bench.settings.workers - 1)
        fleet = Fleet(bench.procs, "raw", workers, bench.logs)
        try:
            for streams in sorted(steps):
                lost0, errors0 = log_lines(coord, LOST_ETCD), fleet.total("errors")
                shares = split(streams - fleet.size, workers)
                fleet.each(
                    "add",
                    lambda i, shares=shares: {
                        "n": shares[i],
                        "target": coord.addr,
                        "prefix": f"raw{i}-{fleet.size}-",
                        "streams_per_channel": per_connection,
                    },
                    within=120,
                )
                fleet.size = streams
                time.sleep(2)
                psutil.cpu_percent(interval=None)
                step = {"streams": streams, **_window(coord, etcd, fleet, "acks", window)}
                step["stream_errors"] = int(fleet.total("errors") - errors0)
                step["coordinator_lost_etcd"] = log_lines(coord, LOST_ETCD) - lost0
                out["steps"].append(step)
                say(f"{label}: {step}")
                if step["coordinator_lost_etcd"]:
                    out["stopped"] = f"the coordinator failed closed ('lost etcd') at {streams}"
                    break
        finally:
            fleet.kill()
    return out


def heartbeat_capacity(bench: Bench) -> Result:
    cfg = bench.settings
    own = _ramp(bench, "capacity", cfg.capacity_streams, 1, cfg.capacity_window)
    shared = _ramp(bench, "capacity-mux", [cfg.capacity_mux_streams], 25, cfg.capacity_window)
    out: Result = {"own_connection": own, "multiplexed": shared, "steps": own["steps"]}
    clean = [s for s in own["steps"] if not s["coordinator_lost_etcd"] and not s["stream_errors"]]
    best = max(clean or own["steps"], key=lambda s: s["heartbeats_per_s"], default=None)
    if best is not None:
        out["max_heartbeats_per_s"] = best["heartbeats_per_s"]
        out["at_max"] = best
        us = best["coordinator_cpu_us_per_heartbeat"]
        out["one_core_projection_per_s"] = round(1e6 / us) if us else None
    return out


def _steady(bench: Bench, n: int) -> Result:
    cfg = bench.settings
    out: Result = {"agents": n, "lease_ttl": 2.0, "window_s": cfg.steady_window, "modes": {}}
    with bench.cluster(f"steady-{n}", 1, ttl=2.0) as (etcd, (coord,)):
        fleet = Fleet(bench.procs, "sdk", max(2, cfg.workers // 2), bench.logs)
        try:
            out["grow"] = fleet.grow_sdk(n, [coord.addr], deadline=120 + n * 0.05)
            for mode in ("none", "same", "changing"):
                fleet.all("checkpoints", mode=mode, period=0.2)
                time.sleep(3)  # the first report of a value is written; then it settles
                rev0, keys0 = etcd.revision(), etcd.key_versions(CHECKPOINTS)
                m0, lost0, grants0 = etcd.metrics(), fleet.total("lost"), fleet.total("grants")
                lost_etcd0 = log_lines(coord, LOST_ETCD)
                window = _window(coord, etcd, fleet, "replies", cfg.steady_window)
                rev1, keys1 = etcd.revision(), etcd.key_versions(CHECKPOINTS)
                m1 = etcd.metrics()
                beats = window["heartbeats_per_s"] * cfg.steady_window
                proposals = m1.get("etcd_server_proposals_committed_total", 0) - m0.get(
                    "etcd_server_proposals_committed_total", 0
                )
                result: dict[str, Any] = {
                    **window,
                    "heartbeats": round(beats),
                    "etcd_revisions": rev1 - rev0,
                    "checkpoint_keys_written": keys1 - keys0,
                    "raft_proposals": proposals,
                    "writes_per_heartbeat": round((rev1 - rev0) / beats, 5) if beats else None,
                    "keys_written_per_heartbeat": (
                        round((keys1 - keys0) / beats, 5) if beats else None
                    ),
                    "lost": int(fleet.total("lost") - lost0),
                    "reregistrations": int(fleet.total("grants") - grants0),
                    "coordinator_lost_etcd": log_lines(coord, LOST_ETCD) - lost_etcd0,
                }
                result["steady"] = not (
                    result["lost"] or result["reregistrations"] or result["coordinator_lost_etcd"]
                )
                out["modes"][mode] = result
                say(f"steady {n} {mode}: {result}")
        finally:
            fleet.kill()
    out["steady"] = all(m["steady"] for m in out["modes"].values())
    return out


def steady_state(bench: Bench) -> Result:
    """One run per fleet size; the budget is judged on the largest run that stayed steady."""
    runs = [_steady(bench, n) for n in bench.settings.steady_agents]
    held = [r for r in runs if r["steady"]]
    chosen = max(held, key=lambda r: r["agents"]) if held else runs[0]
    return {**chosen, "runs": runs}
