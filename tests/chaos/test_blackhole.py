"""A blackholed link, with the fault proxy: sockets stay open and nothing gets through.

A blackhole is the hard case of a broken link: nothing resets, so only timers notice it.
Both ends must fail closed within the lease TTL, and the fleet must run again when it heals.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tether
from tether_server import CoordinatorProcess

from tests.chaos.conftest import SLACK, until
from tests.chaos.fleet import HALTED, RUNNING, FleetProcess
from tests.chaos.proxy import Proxy
from tests.conftest import LEASE_TTL, Coordinator, Etcd, eventually

AGENTS = 20


def _all(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["counts"][state] == AGENTS


def test_a_coordinator_blackholed_from_etcd_fails_its_agents_closed_and_a_kill_lands_everywhere(
    etcd: Etcd,
    tmp_path: Path,
    tenant: str,
    *,
    fleet: Callable[[], FleetProcess],
    proxy: Callable[[str], Proxy],
    report: Callable[[str], None],
) -> None:
    link = proxy(etcd.endpoint)
    cut_off = CoordinatorProcess(
        link.url, lease_ttl=LEASE_TTL, log=tmp_path / "cut-off.log",
        env={**os.environ, "TETHER_LOG_LEVEL": "INFO"},
    ).start()  # fmt: skip
    healthy = Coordinator(etcd).start(tmp_path)
    try:
        behind, beside = fleet(), fleet()
        behind.start(AGENTS, [cut_off.addr], tenant)
        beside.start(AGENTS, [healthy.addr], tenant)
        paused_at = time.monotonic()
        link.pause()
        stopped = until(behind, paused_at, lambda s: None not in s["stopped"])
        slowest = max(stopped["stopped"]) - paused_at
        report(f"{AGENTS} agents of the blackholed coordinator all stopped {slowest:.2f}s "
               f"after the pause (lease TTL {LEASE_TTL}s)")  # fmt: skip
        assert slowest <= LEASE_TTL + SLACK
        assert beside.status(paused_at)["counts"][RUNNING] == AGENTS  # no one else stopped

        with tether.AdminClient(healthy.addr) as admin:
            killed_at = time.monotonic()
            admin.kill(tether.selector(tenant=tenant), "through the other coordinator")
        until(beside, killed_at, _all(HALTED))
        healed_at = time.monotonic()
        link.resume()
        until(behind, healed_at, _all(HALTED))  # the halt waited in etcd for them
        report(f"after healing, the kill reached the blackholed coordinator's agents in "
               f"{time.monotonic() - healed_at:.2f}s")  # fmt: skip
    finally:
        cut_off.stop()
        healthy.stop()


def test_an_agent_blackholed_from_its_coordinator_fails_closed_and_runs_again_when_healed(
    coord: Coordinator,
    tenant: str,
    proxy: Callable[[str], Proxy],
    report: Callable[[str], None],
) -> None:
    link = proxy(coord.addr)
    with tether.Agent(f"agent://{tenant}/w", run_id="r", target=link.addr) as agent:
        agent.check()
        paused_at = time.monotonic()
        link.pause()
        eventually(lambda: agent.killed, interval=0.01)
        took = time.monotonic() - paused_at
        with pytest.raises(tether.TetherLost):
            agent.check()
        assert took <= agent.ttl + SLACK
        healed_at = time.monotonic()
        link.resume()
        eventually(lambda: not agent.killed, timeout=30)
        agent.check()
        report(f"agent failed closed {took:.2f}s after the pause (TTL {agent.ttl:g}s); "
               f"ran again {time.monotonic() - healed_at:.2f}s after healing")  # fmt: skip
