"""What the chaos tests share: fleets in a subprocess, fault proxies, coordinators with an
embedded etcd, and a report of the measured times printed at the end of the run.

Times are reported, not asserted, except where the issue states them as behaviour ("fails
closed within the TTL"); those assert the TTL plus a slack for a loaded machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tether
from tether_server import CoordinatorProcess

from tests.chaos.fleet import FleetProcess
from tests.chaos.proxy import Proxy
from tests.conftest import LEASE_TTL, eventually

SLACK = 1.0  # seconds on top of a TTL a loaded 2-core machine may add to a stop
_REPORT: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: breaks real processes and links (tests/chaos/)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a chaos test: ``-m chaos`` runs the suite, ``-m "not chaos"`` the rest."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.chaos)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("chaos: measured times")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``report(line)``: a measured figure, printed in the run's summary."""

    def add(line: str) -> None:
        _REPORT.append(f"{request.node.name}: {line}")

    return add


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[[], FleetProcess]]:
    """``fleet()``: a new agent fleet subprocess; every one is killed after the test."""
    made: list[FleetProcess] = []

    def make() -> FleetProcess:
        made.append(FleetProcess(tmp_path / f"fleet-{len(made)}.log"))
        return made[-1]

    yield make
    for one in made:
        one.close()


@pytest.fixture
def proxy() -> Iterator[Callable[[str], Proxy]]:
    """``proxy("HOST:PORT")``: a started fault proxy to that address; closed after the test."""
    made: list[Proxy] = []

    def make(target: str) -> Proxy:
        made.append(Proxy(target).start())
        return made[-1]

    yield make
    for one in made:
        one.close()


class EmbeddedCoordinator(CoordinatorProcess):
    """``tether serve`` with no ``--etcd``: it runs and supervises its own etcd in ``data_dir``."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        super().__init__(
            "", lease_ttl=LEASE_TTL, log=log, env={**os.environ, "TETHER_LOG_LEVEL": "INFO"}
        )
        self.data_dir = data_dir

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "tether", "serve",
            "--listen", self.addr,
            "--data-dir", str(self.data_dir),
            "--lease-ttl", f"{self.lease_ttl:g}",
            *extra,
        ]  # fmt: skip

    def etcd_pid(self) -> int:
        """The pid of the etcd it runs now, from the pid file it keeps."""
        return int((self.data_dir / "etcd.pid").read_text())


def until(
    fleet: FleetProcess, since: float, done: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    """The fleet's status (since ``since``) once ``done`` says so; a bounded wait."""

    def probe() -> dict[str, Any]:
        status = fleet.status(since)
        return status if done(status) else {}

    return eventually(probe, timeout, interval=0.1)


def stored(admin: tether.AdminClient, tenant: str) -> dict[str, int]:
    """The step of each run's stored checkpoint."""
    return {
        a.run_id: int(a.checkpoint["step"])
        for a in admin.agents(tenant=tenant)
        if a.checkpoint is not None
    }


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
