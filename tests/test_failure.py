"""What happens when parts die: the agent, the coordinator, etcd. Real processes, real signals."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tether
from tether_server import free_port

from tests.conftest import Coordinator, Etcd, Siblings, eventually


@contextlib.contextmanager
def agent_process(uri: str, run_id: str, target: str) -> Iterator[subprocess.Popen[bytes]]:
    """tests/agent_process.py in its own process, registered (it printed READY); killed after."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "agent_process.py"), uri, run_id, target],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_sigkilled_agent_goes_stale(
    coordinators: tuple[Coordinator, Coordinator], tenant: str
) -> None:
    a, b = coordinators
    with (
        agent_process(f"agent://{tenant}/worker", "r-stale", a.addr) as proc,
        tether.AdminClient(b.addr) as admin,  # the other coordinator sees it too
    ):
        eventually(lambda: admin.agents(tenant=tenant)[0].checkpoint)  # a beat carried one
        events = admin.watch(tenant=tenant)
        snapshot = next(events)  # the stream is open from here on
        assert snapshot.snapshot and snapshot.instance.state is tether.State.ACTIVE
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        event = next(events)
        assert event.instance.state is tether.State.STALE
        assert event.previous is tether.State.ACTIVE
        assert event.instance.instance_id == "proc-r-stale"
        (found,) = admin.agents(tenant=tenant)
        assert found.state is tether.State.STALE
        assert found.checkpoint is not None and found.checkpoint["i"] >= 1


def test_silent_agent_goes_stale_after_the_ttl(coord: Coordinator, tenant: str) -> None:
    """SIGSTOP keeps the TCP connection open: only the coordinator's silence timer notices."""
    with (
        agent_process(f"agent://{tenant}/w", "r-silent", coord.addr) as proc,
        tether.AdminClient(coord.addr) as admin,
    ):
        proc.send_signal(signal.SIGSTOP)
        eventually(lambda: admin.agents(tenant=tenant)[0].state is tether.State.STALE)


def test_instances_go_stale_in_etcd_when_their_coordinator_dies(
    etcd: Etcd, coord: Coordinator, tmp_path: Path, tenant: str
) -> None:
    """Nobody is left to delete the presence key: the coordinator's lease lapsing does it."""
    doomed = Coordinator(etcd).start(tmp_path)
    try:
        with (
            agent_process(f"agent://{tenant}/w", "r-orphan", doomed.addr),
            tether.AdminClient(coord.addr) as admin,  # another coordinator's view of etcd
        ):
            (found,) = admin.agents(tenant=tenant)
            assert found.state is tether.State.ACTIVE
            doomed.stop(signal.SIGKILL)
            eventually(lambda: admin.agents(tenant=tenant)[0].state is tether.State.STALE)
    finally:
        doomed.stop()


def test_agent_fails_closed_when_its_coordinator_dies_and_recovers_through_another(
    etcd: Etcd, tmp_path: Path, tenant: str, siblings: Siblings
) -> None:
    first = Coordinator(etcd).start(tmp_path)
    second = Coordinator(etcd)  # its port is known to the agent, but nothing listens yet
    grants: list[tether.Verdict] = []  # the verdict each session grant put in force

    def on_reply(verdict: tether.Verdict, grant: bool) -> None:
        if grant:
            grants.append(verdict)

    config = tether.AgentConfig(on_reply=on_reply)
    targets = f"{first.addr},{second.addr}"
    try:
        with (
            siblings.around(targets, fate=True),  # on the same stream: the same fate
            tether.Agent(f"agent://{tenant}/w", run_id="r", target=targets, config=config) as agent,
        ):
            agent.check()
            first.stop(signal.SIGKILL)
            eventually(lambda: agent.killed)
            with pytest.raises(tether.TetherLost) as info:
                agent.check()
            assert "lease TTL" in info.value.reason
            siblings.shared_fate(stopped=True)
            second.start(tmp_path)
            eventually(lambda: not agent.killed)  # reconnected and told RUN
            agent.check()
            siblings.shared_fate(stopped=False)
            eventually(lambda: len(grants) >= 2)  # registered with the first, then the second
            assert grants[-1].stop is None
    finally:
        first.stop()
        second.stop()


def test_coordinator_that_loses_etcd_tells_its_agents_to_stop(
    tmp_path: Path, tenant: str, siblings: Siblings
) -> None:
    store = Etcd(tmp_path / "etcd").start()
    coordinator = Coordinator(store).start(tmp_path)
    try:
        with (
            siblings.around(coordinator.addr, fate=True),
            tether.Agent(f"agent://{tenant}/w", target=coordinator.addr) as agent,
        ):
            agent.check()
            store.stop(signal.SIGKILL)
            eventually(lambda: agent.killed)
            with pytest.raises(tether.TetherLost) as info:
                agent.check()
            assert "etcd" in info.value.reason
            siblings.shared_fate(stopped=True)
            store.start()  # same data dir and ports
            eventually(coordinator.serving)
            eventually(lambda: not agent.killed)
            siblings.shared_fate(stopped=False)
            log = coordinator.log
            assert log is not None
            eventually(lambda: "etcd is back: re-attached after" in log.read_text())
            said = log.read_text()
            assert said.count("coordinator lost etcd, failing closed") == 1  # not per retry
            assert said.count("etcd is back") == 1
    finally:
        coordinator.stop()
        store.stop()


def test_coordinator_without_etcd_exits_with_a_reason(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "tether._cli", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--etcd", dead],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TETHER_STARTUP_TIMEOUT": "2", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tether: etcd at 127.0.0.1:")
    assert "did not answer" in lines[-1]
    assert "Traceback" not in result.stderr
    assert len(lines) == 2 and lines[0].startswith("tether: waiting for etcd: ")  # not per try
