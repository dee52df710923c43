"""What every phase shares: the process owner, scratch space, fresh etcds and coordinators."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from bench.infra import Coordinator, Etcd, Procs
from bench.tls import Pki


class Bench:
    """Owns a run's processes and scratch directory."""

    def __init__(self, scratch: Path, procs: Procs, out: Path | None = None) -> None:
        self.out = out
        self.scratch = scratch
        self.procs = procs
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self._pki: Pki | None = None

    @property
    def pki(self) -> Pki:
        """The run's development CA and certificates (bench/tls.py), made on first use."""
        if self._pki is None:
            self._pki = Pki(self.scratch / "pki")
        return self._pki

    def _dir(self, what: str) -> Path:
        self._n += 1
        path = self.scratch / f"{self._n:02d}-{what}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def cluster(
        self, what: str, coordinators: int = 1, ttl: float = 10.0, *, tls: bool = False
    ) -> Iterator[tuple[Etcd, list[Coordinator]]]:
        """A fresh etcd and ``coordinators`` coordinators, all stopped on the way out.

        With ``tls`` the coordinators serve mutual TLS with the run's ``pki``.
        """
        base = self._dir(what)
        etcd = Etcd(self.procs, base / "etcd").start()
        pki = self.pki if tls else None
        coords: list[Coordinator] = []
        try:
            for _ in range(coordinators):
                coords.append(Coordinator(self.procs, etcd, base, ttl, pki).start())
            yield etcd, coords
        finally:
            for coord in coords:
                with contextlib.suppress(Exception):
                    coord.stop(9)  # SIGKILL: draining thousands of sessions is not measured
            etcd.stop()


def log_lines(coord: Coordinator, needle: str) -> int:
    """How many lines of the coordinator's log contain ``needle``."""
    log = coord.log_path
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if needle in line)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_percent(before: float, after: float, seconds: float) -> float:
    return round(100.0 * (after - before) / seconds, 1) if seconds > 0 else 0.0
