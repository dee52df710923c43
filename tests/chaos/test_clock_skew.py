"""A coordinator whose clock is minutes off still kills, goes STALE and fails closed.

Leases live in etcd (etcd's clock decides when one lapses) and the SDK fails closed on its
own monotonic clock, so neither depends on the coordinator's wall clock. Debian's
``faketime`` runs ``tether serve`` with a shifted clock: ten minutes ahead with a true
monotonic clock (a host whose NTP is broken), and ten minutes behind with its monotonic
clock shifted too.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tether
from tether_server import CoordinatorProcess

from tests.conftest import LEASE_TTL, Coordinator, Etcd, eventually

SLACK = 1.0  # seconds a loaded 2-core machine may add to a stop
SKEWS = [
    pytest.param(("--exclude-monotonic", "-f", "+10m"), id="wall-10min-ahead"),
    pytest.param(("-f", "-10m"), id="wall-and-monotonic-10min-behind"),
]

pytestmark = pytest.mark.skipif(
    shutil.which("faketime") is None,
    reason="Debian's faketime is not installed (apt-get install faketime; CI installs it)",
)


class Skewed:
    """``tether serve`` under faketime. faketime forks, so signals go to its child."""

    def __init__(self, etcd: Etcd, tmp: Path, faketime: tuple[str, ...]) -> None:
        self.process = CoordinatorProcess(
            etcd.url,
            lease_ttl=LEASE_TTL,
            log=tmp / "skewed.log",
            env={**os.environ, "TETHER_LOG_LEVEL": "INFO"},
            prefix=("faketime", "-m", *faketime),
        )

    @property
    def addr(self) -> str:
        return self.process.addr

    def coordinator(self) -> psutil.Process:
        """The coordinator itself, under the faketime wrapper."""
        (child,) = psutil.Process(self.process.pid).children()
        return child

    def close(self) -> None:
        if self.process.proc is not None:
            for child in psutil.Process(self.process.pid).children():
                child.send_signal(signal.SIGCONT)
                child.send_signal(signal.SIGTERM)
        self.process.stop()


@pytest.fixture(params=SKEWS)
def skewed(request: pytest.FixtureRequest, etcd: Etcd, tmp_path: Path) -> Iterator[Skewed]:
    coordinator = Skewed(etcd, tmp_path, request.param)
    coordinator.process.start(timeout=30)
    yield coordinator
    coordinator.close()


def test_a_skewed_coordinator_kills_goes_stale_and_fails_closed(
    skewed: Skewed, coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/skewed"
    with (
        tether.Agent(uri, run_id="on-skewed", target=skewed.addr) as agent,
        tether.Agent(uri, run_id="on-true", target=coord.addr) as bystander,
        tether.AdminClient(skewed.addr, actor="skewed-admin") as skewed_admin,
    ):
        seen = admin.agent(tenant, "skewed", "on-skewed")
        assert seen.registered_at is not None
        offset = (seen.registered_at - datetime.datetime.now(datetime.UTC)).total_seconds()
        assert abs(offset) > 300  # faketime is in effect: the skewed clock stamped it

        # A kill through a true coordinator reaches an agent on the skewed one, and back.
        for via, target in ((admin, agent), (skewed_admin, bystander)):
            sel = tether.selector(tenant=tenant, run_id=target.run_id)
            via.kill(sel, "skew drill")
            eventually(lambda target=target: target.killed)  # type: ignore[misc]
            via.resume(sel, "over")
            eventually(lambda target=target: not target.killed)  # type: ignore[misc]
        assert admin.verify_audit()[0]  # the chain orders by etcd revision, not by clocks

        # Freeze the skewed coordinator: its agent fails closed on its own monotonic
        # clock, and etcd lapses its lease on etcd's clock, so the agent goes STALE.
        skewed.coordinator().send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        eventually(lambda: _fails_closed(agent), timeout=LEASE_TTL + SLACK + 2)
        assert time.monotonic() - frozen_at <= LEASE_TTL + SLACK
        eventually(lambda: admin.agent(tenant, "skewed", "on-skewed").state is tether.State.STALE)
        bystander.check()  # nothing else stopped
        skewed.coordinator().send_signal(signal.SIGCONT)
        eventually(lambda: not agent.killed, timeout=30)  # and it runs again


def _fails_closed(agent: tether.Agent) -> bool:
    try:
        agent.check()
    except tether.TetherLost:
        return True
    return False
