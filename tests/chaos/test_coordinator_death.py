"""A coordinator SIGKILLed under load: its agents move to the other, lose no checkpoint, and
the next kill reaches every one of them."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tether

from tests.chaos.conftest import stored, until
from tests.chaos.fleet import RUNNING, FleetProcess
from tests.conftest import Coordinator, Etcd, eventually

AGENTS = 200


def _moved(status: dict[str, Any]) -> bool:
    """Every agent registered again since the kill, and runs."""
    return None not in status["granted"] and status["counts"][RUNNING] == AGENTS


def test_agents_of_a_sigkilled_coordinator_run_on_the_other_and_the_next_kill_reaches_all(
    etcd: Etcd,
    tmp_path: Path,
    tenant: str,
    fleet: Callable[[], FleetProcess],
    report: Callable[[str], None],
) -> None:
    doomed = Coordinator(etcd).start(tmp_path)
    other = Coordinator(etcd).start(tmp_path)
    try:
        agents = fleet()
        # Every agent dials the first address first: all of them are on the doomed one.
        agents.start(AGENTS, [doomed.addr, other.addr], tenant, period=0.1)
        with tether.AdminClient(other.addr) as admin:
            eventually(lambda: len(stored(admin, tenant)) == AGENTS)  # checkpoints flow
            killed_at = time.monotonic()
            doomed.stop(signal.SIGKILL)
            moved = until(agents, killed_at, _moved, timeout=60)
            report(f"{AGENTS} agents registered on the other coordinator "
                   f"{max(moved['granted']) - killed_at:.2f}s after the SIGKILL; "
                   f"{sum(t is not None for t in moved['stopped'])} failed closed meanwhile")  # fmt: skip

            last = agents.freeze()
            eventually(lambda: stored(admin, tenant) == last, timeout=30)

            kill_at = time.monotonic()
            admin.kill(tether.selector(tenant=tenant), "right after the failover")
            halted = until(agents, kill_at, lambda s: None not in s["halted"])
            report(f"kill after failover reached all {AGENTS} in "
                   f"{max(halted['halted']) - kill_at:.2f}s (20 ms sampling)")  # fmt: skip
    finally:
        doomed.stop()
        other.stop()
