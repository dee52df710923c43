"""The embedded etcd under its coordinator's supervision: crashes of either, and what is left."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tether
from tether_server import EtcdProcess, ProcessExited

from tests.chaos.conftest import EmbeddedCoordinator, alive
from tests.conftest import eventually


def _started(tmp_path: Path, name: str = "coordinator") -> EmbeddedCoordinator:
    return EmbeddedCoordinator(tmp_path / "data", tmp_path / f"{name}.log").start(timeout=30)


def _log(coordinator: EmbeddedCoordinator) -> str:
    assert coordinator.log is not None
    return coordinator.log.read_text()


def test_a_sigkilled_embedded_etcd_is_restarted_and_the_coordinator_serves_again(
    tmp_path: Path, tenant: str, report: Callable[[str], None]
) -> None:
    coordinator = _started(tmp_path)
    try:
        with tether.Agent(f"agent://{tenant}/w", run_id="r", target=coordinator.addr) as agent:
            first = coordinator.etcd_pid()
            killed_at = time.monotonic()
            subprocess.run(["kill", "-KILL", str(first)], check=True)
            eventually(lambda: coordinator.etcd_pid() != first, timeout=30)
            eventually(coordinator.serving, timeout=30)
            serving = time.monotonic() - killed_at
            eventually(lambda: not agent.killed, timeout=30)
            report(f"etcd SIGKILL -> serving again {serving:.1f}s")
            agent.check()
            assert not alive(first)  # reaped: no zombie left behind
            assert alive(coordinator.etcd_pid())
        eventually(lambda: "embedded etcd is back" in _log(coordinator))
        text = _log(coordinator)
        assert text.count("exited with signal SIGKILL; restarting") == 1  # said once
        assert text.count("embedded etcd is back") == 1
        last = coordinator.etcd_pid()
    finally:
        coordinator.stop()
    assert not alive(last)  # a clean stop stops etcd too, and forgets it
    assert not (tmp_path / "data" / "etcd.pid").exists()


def test_a_sigkilled_coordinator_leaves_no_etcd_and_a_restart_on_its_data_dir_works(
    tmp_path: Path, tenant: str, report: Callable[[str], None]
) -> None:
    coordinator = _started(tmp_path)
    try:
        with tether.AdminClient(coordinator.addr) as admin:
            admin.kill(tether.selector(tenant=tenant), "outlives the crash", force=True)
        etcd = coordinator.etcd_pid()
        coordinator.stop(signal.SIGKILL)
        eventually(lambda: not alive(etcd), timeout=10)  # the kernel's death signal did it
        started = time.monotonic()
        again = _started(tmp_path, "again")
        report(f"restart on the same data dir serving in {time.monotonic() - started:.1f}s")
        with tether.AdminClient(again.addr) as admin:
            assert [h.reason for h in admin.halts(tenant=tenant)] == ["outlives the crash"]
    finally:
        coordinator.stop()
        if "again" in locals():
            again.stop()


def test_an_orphan_etcd_named_by_the_pid_file_is_stopped_before_a_new_one_starts(
    tmp_path: Path,
) -> None:
    """Where the kernel's death signal does not reach (not Linux, or a crash in between),
    the etcd a crashed coordinator left on the data dir is found by its pid file."""
    data = tmp_path / "data"
    orphan = EtcdProcess(data / "etcd", "tether", log=tmp_path / "orphan.log").start()
    (data / "etcd.pid").write_text(f"{orphan.pid}\n")
    proc = orphan.proc
    coordinator = _started(tmp_path)
    try:
        assert proc is not None and proc.wait(timeout=10) is not None
        assert coordinator.etcd_pid() != proc.pid
        assert f"stopping etcd pid {proc.pid}" in _log(coordinator)
    finally:
        coordinator.stop()
        orphan.stop()


def test_a_second_coordinator_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = _started(tmp_path)
    try:
        second = EmbeddedCoordinator(tmp_path / "data", tmp_path / "second.log")
        with pytest.raises(ProcessExited):
            second.start(timeout=30)
        lines = _log(second).strip().splitlines()
        assert lines[-1].endswith(
            f"is in use by another tether serve (pid {first.pid}); "
            "stop it, or give this one another --data-dir"
        )
        assert first.serving()
    finally:
        first.stop()
