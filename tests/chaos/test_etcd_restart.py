"""etcd SIGKILLed and restarted on the same data directory: the coordinator re-attaches, what
was stored before the crash is intact, and the audit's hash chain still verifies."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tether

from tests.chaos.conftest import stored, until
from tests.chaos.fleet import HALTED, RUNNING, FleetProcess
from tests.conftest import Coordinator, Etcd, eventually

AGENTS = 20


def _verified(coordinator: Coordinator) -> int:
    """``tether audit --verify`` passes; the number of entries it checked."""
    verify = subprocess.run(
        [sys.executable, "-m", "tether", "audit", "--verify", "--addr", coordinator.addr],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    match = re.fullmatch(r"audit intact: (\d+) entries, hash chain verified\n", verify.stdout)
    assert match is not None, verify.stdout
    return int(match[1])


def test_the_coordinator_reattaches_to_an_etcd_restarted_on_its_data_dir_and_nothing_is_lost(
    tmp_path: Path,
    tenant: str,
    fleet: Callable[[], FleetProcess],
    report: Callable[[str], None],
) -> None:
    store = Etcd(tmp_path / "etcd").start()
    coordinator = Coordinator(store).start(tmp_path)
    try:
        agents = fleet()
        agents.start(AGENTS, [coordinator.addr], tenant)
        with tether.AdminClient(coordinator.addr, actor="chaos") as admin:
            admin.kill(tether.selector(run_id="run-0"), "stays killed across the crash")
            admin.kill(tether.selector(run_id="run-1"), "a kill, then a resume")
            admin.resume(tether.selector(run_id="run-1"), "audited too")
            last = agents.freeze()
            eventually(lambda: stored(admin, tenant) == last)
        entries = _verified(coordinator)

        crashed_at = time.monotonic()
        store.stop(signal.SIGKILL)
        until(agents, crashed_at, lambda s: s["counts"][RUNNING] == 0)  # failed closed
        store.start()  # the same data directory and ports
        eventually(coordinator.serving, timeout=30)
        serving = time.monotonic() - crashed_at
        # Every run but run-0 runs again, and run-0, back from losing its tether, is told
        # of its halt: wait for both, since run-0 may re-register a moment after the rest.
        back = until(
            agents,
            crashed_at,
            lambda s: s["counts"][RUNNING] == AGENTS - 1 and s["counts"][HALTED] == 1,
        )
        ran = max(t for t in back["ran"] if t is not None) - crashed_at
        report(f"etcd SIGKILL + restart: coordinator serving {serving:.1f}s, "
               f"{AGENTS - 1} agents running {ran:.1f}s after the crash")  # fmt: skip
        assert back["counts"][HALTED] == 1  # run-0's halt outlived the crash

        with tether.AdminClient(coordinator.addr) as admin:
            assert stored(admin, tenant) == last  # every checkpoint stored before is intact
        assert _verified(coordinator) >= entries
    finally:
        coordinator.stop()
        store.stop()
