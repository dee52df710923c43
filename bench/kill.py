"""Kill propagation: from the operator's Kill to every SDK agent holding a Killed verdict.

A fleet of real ``AsyncAgent`` instances is grown step by step (100, 1,000, ...) on one or
two coordinators. At each size, several rounds of Kill (tenant scope) and Resume are timed.
Each agent's moment of observing the kill is taken inside the SDK (``Core._apply``) with
``time.monotonic()``, which all processes on this machine share. Latencies are reported
both from the moment the Kill RPC was issued and from the moment it returned.

The same growth yields the coordinator's RSS per fleet size (memory per agent) and the
heartbeat load each size puts on it.
"""

from __future__ import annotations

import time
from typing import Any

import tether

from bench.fleet import Fleet
from bench.harness import Bench, Result, cpu_percent, log_lines, say
from bench.infra import BenchError, Coordinator
from bench.profile import profiling
from bench.stats import slope, summary

TENANT = "bench"
LOST_ETCD = "coordinator lost etcd"


def _idle_window(coords: list[Coordinator], fleet: Fleet, seconds: float) -> dict[str, Any]:
    """Heartbeats per second and coordinator CPU while nothing but heartbeats happens."""
    cpu0 = [c.cpu_seconds() for c in coords]
    replies0 = fleet.total("replies")
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    replies = fleet.total("replies") - replies0
    return {
        "heartbeats_per_s": round(replies / elapsed, 1),
        "coordinator_cpu_pct": [
            cpu_percent(b, c.cpu_seconds(), elapsed) for b, c in zip(cpu0, coords, strict=True)
        ],
    }


def _round(admin: tether.AdminClient, fleet: Fleet, timeout: float) -> dict[str, Any]:
    sel = tether.selector(tenant=TENANT)
    before = fleet.stats()
    lost0 = sum(int(s["lost"]) for s in before)
    grants0 = sum(int(s["grants"]) for s in before)
    fleet.all("arm")
    issued = time.monotonic()
    admin.kill(sel, "benchmark kill round")
    returned = time.monotonic()
    stamps, missing, detail = fleet.times_detail("killed", timeout)
    effects = fleet.all("effects", after=returned)
    fleet.all("arm")
    resume_issued = time.monotonic()
    admin.resume(sel, "benchmark resume")
    resume_returned = time.monotonic()
    back, not_back = fleet.times("running", timeout)
    after = fleet.stats()
    lost = sum(int(s["lost"]) for s in after) - lost0
    reconnects = sum(int(s["grants"]) for s in after) - grants0
    from_issue = [(t - issued) * 1e3 for t in stamps]
    unseen: dict[str, Any] = {}
    if missing:
        grants = detail["last_grants"]
        unseen = {
            "by_state": detail["by_state"],
            "never_regranted": missing - len(grants),
            "regranted_before_kill_returned": sum(1 for t, _ in grants if t < returned),
            "regranted_after_kill_returned": {
                s: sum(1 for t, st in grants if t >= returned and st == s)
                for s in ("running", "halted", "lost")
            },
        }
    return {
        "unseen_kill": unseen,
        "kill_rpc_ms": round((returned - issued) * 1e3, 2),
        "from_issue_ms": from_issue,
        "from_return_ms": [(t - returned) * 1e3 for t in stamps],
        "missing": missing,
        "resume_rpc_ms": round((resume_returned - resume_issued) * 1e3, 2),
        "resume_from_issue_ms": [(t - resume_issued) * 1e3 for t in back],
        "not_resumed": not_back,
        "lost": lost,
        "reconnects": reconnects,
        "effects_after_kill_returned": sum(int(e["after"]) for e in effects),
        "effects_after_own_killed": sum(int(e["after_own_kill"]) for e in effects),
    }


def _size_result(size: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    issue = [x for r in rounds for x in r["from_issue_ms"]]
    ret = [x for r in rounds for x in r["from_return_ms"]]
    return {
        "agents": size,
        "rounds": len(rounds),
        "from_issue_ms": summary(issue),
        "from_return_ms": summary(ret),
        "round_max_from_issue_ms": summary([max(r["from_issue_ms"], default=0) for r in rounds]),
        "kill_rpc_ms": summary([r["kill_rpc_ms"] for r in rounds]),
        "resume_from_issue_ms": summary([x for r in rounds for x in r["resume_from_issue_ms"]]),
        "missing": sum(r["missing"] for r in rounds),
        "not_resumed": sum(r["not_resumed"] for r in rounds),
        "lost": sum(r["lost"] for r in rounds),
        "reconnects": sum(r["reconnects"] for r in rounds),
        "effects_after_kill_returned": sum(r["effects_after_kill_returned"] for r in rounds),
        "effects_after_own_killed": sum(r["effects_after_own_killed"] for r in rounds),
        "unseen_kill": [r["unseen_kill"] for r in rounds if r["unseen_kill"]],
        "per_round": [
            {
                "kill_rpc_ms": r["kill_rpc_ms"],
                "p50_from_issue_ms": summary(r["from_issue_ms"]).get("p50"),
                "max_from_issue_ms": summary(r["from_issue_ms"]).get("max"),
                "missing": r["missing"],
                "lost": r["lost"],
                "reconnects": r["reconnects"],
            }
            for r in rounds
        ],
    }


def _settle(coords: list[Coordinator], fleet: Fleet, size: int, seconds: float) -> dict[str, Any]:
    """The fleet at rest: load, memory, connections, and whether anything failed closed."""
    lost0 = fleet.total("lost")
    lost_etcd0 = sum(log_lines(c, LOST_ETCD) for c in coords)
    idle = _idle_window(coords, fleet, seconds)
    running = fleet.total("running")
    lost = int(fleet.total("lost") - lost0)
    lost_etcd = sum(log_lines(c, LOST_ETCD) for c in coords) - lost_etcd0
    return {
        "idle": idle,
        "connections": [c.connections() for c in coords],
        "rss_bytes": [c.rss_bytes() for c in coords],
        "running": int(running),
        "idle_lost": lost,
        "idle_coordinator_lost_etcd": lost_etcd,
        "stable": lost == 0 and lost_etcd == 0 and int(running) == size,
    }


def _measure_size(
    label: str,
    admin: tether.AdminClient,
    coords: list[Coordinator],
    fleet: Fleet,
    *,
    size: int,
    rounds: int,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"agents": size}
    lost_etcd0 = sum(log_lines(c, LOST_ETCD) for c in coords)
    done: list[dict[str, Any]] = []
    for n in range(rounds):
        done.append(_round(admin, fleet, timeout=10 + size / 1000))
        last = done[-1]
        say(
            f"{label}: {size} round {n + 1}: kill rpc {last['kill_rpc_ms']} ms, "
            f"p50/p99 from issue {summary(last['from_issue_ms']).get('p50')}/"
            f"{summary(last['from_issue_ms']).get('p99')} ms, "
            f"missing {last['missing']}, lost {last['lost']}, reconnects {last['reconnects']}"
        )
        if last["missing"] or last["not_resumed"] or last["lost"]:
            entry["collapsed"] = (
                f"round {n + 1}: {last['missing']} agents never saw the kill, "
                f"{last['not_resumed']} never saw the resume, {last['lost']} failed closed, "
                f"{last['reconnects']} re-registrations"
                + (f"; the unseen: {last['unseen_kill']}" if last["unseen_kill"] else "")
            )
            say(f"{label}: {size}: {entry['collapsed']}; no more rounds at this size")
            break
        time.sleep(1.0)
    entry.update(_size_result(size, done))
    entry["coordinator_lost_etcd"] = sum(log_lines(c, LOST_ETCD) for c in coords) - lost_etcd0
    return entry


def kill_propagation(
    bench: Bench, *, coordinators: int, sizes: list[int], ttl: float, label: str
) -> Result:
    cfg = bench.settings
    out: Result = {"coordinators": coordinators, "lease_ttl": ttl, "sizes": [], "attempts": []}
    deadline = time.monotonic() + cfg.phase_budget
    with bench.cluster(label, coordinators, ttl) as (_, coords):
        time.sleep(1)
        baseline = [c.rss_bytes() for c in coords]
        out["rss_baseline_bytes"] = baseline
        fleet = Fleet(bench.procs, "sdk", cfg.workers, bench.logs)
        admin = tether.AdminClient(coords[0].addr, timeout=60)
        try:
            for size in sorted(sizes):
                left = deadline - time.monotonic()
                if left < 30:
                    out["stopped"] = f"phase budget {cfg.phase_budget:g}s spent before {size}"
                    say(f"{label}: {out['stopped']}")
                    break
                say(f"{label}: growing the fleet to {size} agents")
                grown = fleet.grow_sdk(size, [c.addr for c in coords], deadline=min(left, 240))
                fleet.all("act", period=0.5)
                time.sleep(2 + size / 2500)
                rest = _settle(coords, fleet, size, 4.0)
                attempt = {"agents": size, "grow": grown, **rest}
                out["attempts"].append(attempt)
                say(f"{label}: {size} agents: grow {grown}, at rest {rest}")
                if grown["reached"] < size or not rest["stable"]:
                    out["stopped"] = (
                        f"{size} agents not held: {grown['reached']} registered "
                        f"({grown['pending']} pending, {grown['failed']} failed) in "
                        f"{grown['seconds']:g}s; at rest {rest['running']} running, "
                        f"{rest['idle_lost']} agents failed closed and the coordinator logged "
                        f"{rest['idle_coordinator_lost_etcd']} 'lost etcd' while idle at "
                        f"{rest['idle']['heartbeats_per_s']} hb/s"
                    )
                    say(f"{label}: {out['stopped']}")
                    break
                rounds = cfg.rounds if size < 5000 else max(2, cfg.rounds - 2)
                with profiling(bench, coords[0], f"{label}-{size}", size):
                    entry = _measure_size(label, admin, coords, fleet, size=size, rounds=rounds)
                out["sizes"].append({**attempt, **entry})
        except BenchError as err:
            out["error"] = str(err)
            say(f"{label}: {err}")
        finally:
            out["worker_tracebacks"] = fleet.stderr_tracebacks()
            admin.close()
            fleet.kill()
        out["coordinator_lost_etcd_total"] = sum(log_lines(c, LOST_ETCD) for c in coords)
    points = [(0.0, float(sum(baseline)))] + [
        (float(e["agents"]), float(sum(e["rss_bytes"]))) for e in out["attempts"] if e.get("stable")
    ]
    per_agent, _ = slope(points)
    out["rss_per_agent_bytes"] = round(per_agent, 1)
    return out
