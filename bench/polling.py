"""The do-it-yourself baseline: every agent polls a kill key in etcd.

Each simulated agent issues a linearizable Range on one kill key every ``poll_interval``
seconds, and one more before each action (one action every ``poll_action_every`` seconds).
A kill is a Put of that key; the latency is from the Put being issued (and returning) to
each agent's first Range that sees it. The load is measured at etcd itself (its /metrics)
as well as counted by the generators; when the generators fall behind the schedule, the
achieved rate is below the offered one and the row says so.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from aetcd import rpc

from bench.fleet import Fleet, split
from bench.harness import Bench, Result, cpu_percent, say
from bench.infra import Etcd
from bench.stats import summary

KILL_KEY = "/diy/kill/bench"


def _load(etcd: Etcd, fleet: Fleet, seconds: float) -> dict[str, Any]:
    m0, cpu0, req0 = etcd.metrics(), etcd.cpu_seconds(), fleet.total("requests")
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    m1, cpu1, req1 = etcd.metrics(), etcd.cpu_seconds(), fleet.total("requests")
    ranges = m1.get("grpc_server_handled_total:Range", 0) - m0.get(
        "grpc_server_handled_total:Range", 0
    )
    return {
        "etcd_ranges_per_s": round(ranges / elapsed, 1),
        "generated_requests_per_s": round((req1 - req0) / elapsed, 1),
        "etcd_cpu_pct": cpu_percent(cpu0, cpu1, elapsed),
    }


def _round(kv: Any, fleet: Fleet, timeout: float) -> dict[str, Any]:
    fleet.all("arm")
    issued = time.monotonic()
    kv.Put(rpc.PutRequest(key=KILL_KEY.encode(), value=b"halt"), timeout=10)
    returned = time.monotonic()
    stamps, missing = fleet.times("killed", timeout)
    fleet.all("arm")
    kv.DeleteRange(rpc.DeleteRangeRequest(key=KILL_KEY.encode()), timeout=10)
    _, not_back = fleet.times("running", timeout)
    return {
        "from_issue_ms": [(t - issued) * 1e3 for t in stamps],
        "from_return_ms": [(t - returned) * 1e3 for t in stamps],
        "missing": missing,
        "not_resumed": not_back,
    }


def polling_baseline(bench: Bench) -> Result:
    cfg = bench.settings
    offered_per_agent = 1 / cfg.poll_interval + 1 / cfg.poll_action_every
    out: Result = {
        "interval_s": cfg.poll_interval,
        "action_every_s": cfg.poll_action_every,
        "offered_requests_per_agent_per_s": offered_per_agent,
        "sizes": [],
    }
    deadline = time.monotonic() + cfg.phase_budget
    with bench.cluster("poll", coordinators=0) as (etcd, _):
        fleet = Fleet(bench.procs, "poll", cfg.workers, bench.logs)
        channel = grpc.insecure_channel(etcd.endpoint)
        kv = rpc.KVStub(channel)
        try:
            for size in sorted(cfg.poll_sizes):
                if time.monotonic() > deadline:
                    out["stopped"] = f"phase budget {cfg.phase_budget:g}s spent before {size}"
                    break
                shares = split(size - fleet.size, len(fleet.workers))
                fleet.each(
                    "add",
                    lambda i, shares=shares: {
                        "n": shares[i],
                        "endpoint": etcd.endpoint,
                        "key": KILL_KEY,
                        "interval": cfg.poll_interval,
                        "action_every": cfg.poll_action_every,
                    },
                )
                fleet.size = size
                time.sleep(2)
                late0 = fleet.total("late")
                load = _load(etcd, fleet, 4.0)
                rounds = [
                    _round(kv, fleet, timeout=10 + size / 1000)
                    for _ in range(cfg.poll_rounds if size < 5000 else min(cfg.poll_rounds, 3))
                ]
                offered = size * offered_per_agent
                entry = {
                    "agents": size,
                    "offered_requests_per_s": round(offered, 1),
                    **load,
                    "achieved_fraction": round(load["generated_requests_per_s"] / offered, 3),
                    "late_polls": int(fleet.total("late") - late0),
                    "errors": int(fleet.total("errors")),
                    "from_issue_ms": summary([x for r in rounds for x in r["from_issue_ms"]]),
                    "from_return_ms": summary([x for r in rounds for x in r["from_return_ms"]]),
                    "missing": sum(r["missing"] for r in rounds),
                    "rounds": len(rounds),
                }
                out["sizes"].append(entry)
                say(
                    f"poll: {size} agents, {load}, p50/p99 from issue "
                    f"{entry['from_issue_ms'].get('p50')}/{entry['from_issue_ms'].get('p99')} ms"
                )
        finally:
            channel.close()
            fleet.kill()
    return out
