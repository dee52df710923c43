"""Dying parts, timed against the lease TTL.

- STALE after an agent dies: a worker process holding N agents is SIGKILLed (the kernel
  closes its sockets: a crash) or SIGSTOPped (sockets stay open and silent: a hang or a
  partition). An operator's ``AdminClient.watch`` on another coordinator timestamps each
  instance turning STALE.
- Fail closed after the coordinator dies: the coordinator of N agents is SIGKILLed or
  SIGSTOPped; the worker polls ``agent.killed`` every 5 ms and timestamps each agent's first
  True. The SDK's own timer (no confirmed reply within the TTL) is what must fire.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import tether

from bench.fleet import Fleet
from bench.harness import Bench, Result, say
from bench.infra import Coordinator
from bench.stats import summary


class StaleWatch:
    """Watches a tenant through the AdminService and timestamps STALE per instance."""

    def __init__(self, addr: str, expected: int) -> None:
        self.expected = expected
        self.stale_at: dict[str, float] = {}
        self.snapshot = 0
        self.ready = threading.Event()
        self.done = threading.Event()
        self._admin = tether.AdminClient(addr, timeout=3600)
        self._thread = threading.Thread(target=self._run, name="stale-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._admin.watch(tenant="bench"):
                now = time.monotonic()
                if event.snapshot:
                    self.snapshot += 1
                    if self.snapshot >= self.expected:
                        self.ready.set()
                    continue
                self.ready.set()
                if event.instance.state is tether.State.STALE:
                    self.stale_at.setdefault(event.instance.instance_id, now)
                    if len(self.stale_at) >= self.expected:
                        break
        except Exception:
            pass
        finally:
            self.ready.set()
            self.done.set()

    def close(self) -> None:
        self._admin.close()
        self._thread.join(timeout=5)


def _stale(bench: Bench, ttl: float, sig: int) -> Result:
    n = bench.settings.failure_agents
    name = "SIGKILL" if sig == signal.SIGKILL else "SIGSTOP"
    with bench.cluster(f"stale-{name}-{ttl:g}", 2, ttl=ttl) as (_, (home, observer)):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        watch: StaleWatch | None = None
        try:
            grown = fleet.grow_sdk(n, [home.addr], deadline=120)
            time.sleep(ttl / 2)
            watch = StaleWatch(observer.addr, n)
            watch.ready.wait(30)
            time.sleep(0.5)
            signalled = time.monotonic()
            fleet.workers[0].proc.send_signal(sig)
            watch.done.wait(ttl + 15 + n / 500)
            lat = [(t - signalled) * 1e3 for t in watch.stale_at.values()]
        finally:
            if watch is not None:
                watch.close()
            fleet.kill()
    return {
        "agents": n,
        "signal": name,
        "lease_ttl_s": ttl,
        "granted_ttl_s": grown.get("ttl"),
        "stale_ms": summary(lat),
        "never_stale": n - len(lat),
    }


def _fail_closed(bench: Bench, ttl: float, sig: int) -> Result:
    n = bench.settings.failure_agents
    name = "SIGKILL" if sig == signal.SIGKILL else "SIGSTOP"
    with bench.cluster(f"failclosed-{name}-{ttl:g}", 1, ttl=ttl) as (_, (coord,)):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        try:
            grown = fleet.grow_sdk(n, [coord.addr], deadline=120)
            time.sleep(ttl / 2)
            worker = fleet.workers[0]
            worker.send("failclosed", timeout=ttl + 15, interval=0.005)
            time.sleep(0.3)
            assert coord.proc is not None
            signalled = time.monotonic()
            coord.proc.send_signal(sig)
            reply: dict[str, Any] = worker.receive(ttl + 45)
        finally:
            fleet.kill()
            _unfreeze(coord)
    lat = [(t - signalled) * 1e3 for t in reply["times"]]
    return {
        "agents": n,
        "signal": name,
        "lease_ttl_s": ttl,
        "granted_ttl_s": reply.get("ttl", grown.get("ttl")),
        "fail_closed_ms": summary(lat),
        "never_failed_closed": int(reply["missing"]),
        "killed_before_signal": int(reply["killed_before"]),
        "early": sum(1 for x in lat if x < 0),
        "resolution_ms": 5.0,
    }


def _unfreeze(coord: Coordinator) -> None:
    if coord.proc is not None and coord.proc.poll() is None:
        coord.proc.send_signal(signal.SIGCONT)


def failures(bench: Bench) -> Result:
    out: Result = {"stale": [], "fail_closed": []}
    for ttl in bench.settings.failure_ttls:
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            entry = _stale(bench, ttl, sig)
            out["stale"].append(entry)
            say(f"failure: STALE {entry}")
            entry = _fail_closed(bench, ttl, sig)
            out["fail_closed"].append(entry)
            say(f"failure: fail closed {entry}")
    return out
