"""What every phase shares: settings, the process owner, and fresh etcds and coordinators."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.infra import Coordinator, Etcd, Procs


@dataclass
class Settings:
    """Sizes and durations of one run; ``quick()`` is the small fast variant."""

    sizes: list[int] = field(default_factory=lambda: [100, 1000, 2000, 5000, 10000])
    two_coordinator_sizes: list[int] = field(default_factory=lambda: [100, 1000, 2000, 5000, 10000])
    rounds: int = 5
    workers: int = 4
    kill_ttl: float = 10.0
    long_ttl: float = 30.0  # a second kill phase with fewer heartbeats per second
    long_ttl_sizes: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    poll_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    poll_interval: float = 0.1
    poll_action_every: float = 1.0
    poll_rounds: int = 5
    floor_samples: int = 400
    capacity_streams: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400, 800])
    memory_streams: list[int] = field(default_factory=lambda: [0, 1000, 2000, 3000])
    capacity_mux_streams: int = 100
    capacity_window: float = 8.0
    steady_agents: list[int] = field(default_factory=lambda: [300, 1000])
    steady_window: float = 15.0
    failure_agents: int = 200
    failure_ttls: list[float] = field(default_factory=lambda: [2.0, 5.0])
    phase_budget: float = 300.0  # seconds a kill phase may spend before it stops growing
    profile: bool = False  # sample the coordinator with py-spy during kill rounds
    profile_sizes: list[int] = field(default_factory=lambda: [1000])

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            sizes=[100, 1000],
            two_coordinator_sizes=[100, 1000],
            long_ttl_sizes=[1000],
            rounds=3,
            poll_sizes=[100, 1000],
            poll_rounds=2,
            floor_samples=100,
            capacity_streams=[25, 100],
            memory_streams=[0, 500, 1000],
            capacity_mux_streams=50,
            capacity_window=3.0,
            steady_agents=[200],
            steady_window=5.0,
            failure_agents=50,
            failure_ttls=[2.0],
            phase_budget=90.0,
        )


class Bench:
    """Owns a run's processes and scratch directory."""

    def __init__(
        self, settings: Settings, scratch: Path, procs: Procs, out: Path | None = None
    ) -> None:
        self.settings = settings
        self.out = out
        self.scratch = scratch
        self.procs = procs
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _dir(self, what: str) -> Path:
        self._n += 1
        path = self.scratch / f"{self._n:02d}-{what}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def cluster(
        self, what: str, coordinators: int = 1, ttl: float = 10.0
    ) -> Iterator[tuple[Etcd, list[Coordinator]]]:
        """A fresh etcd and ``coordinators`` coordinators, all stopped on the way out."""
        base = self._dir(what)
        etcd = Etcd(self.procs, base / "etcd").start()
        coords: list[Coordinator] = []
        try:
            for _ in range(coordinators):
                coords.append(Coordinator(self.procs, etcd, base, lease_ttl=ttl).start())
            yield etcd, coords
        finally:
            for coord in coords:
                with contextlib.suppress(Exception):
                    coord.stop(9)  # SIGKILL: draining thousands of sessions is not measured
            etcd.stop()


def log_lines(coord: Coordinator, needle: str) -> int:
    """How many lines of the coordinator's log contain ``needle``."""
    if not coord.log.exists():
        return 0
    return sum(1 for line in coord.log.read_text(errors="replace").splitlines() if needle in line)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_percent(before: float, after: float, seconds: float) -> float:
    return round(100.0 * (after - before) / seconds, 1) if seconds > 0 else 0.0


Result = dict[str, Any]
