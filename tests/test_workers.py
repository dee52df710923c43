"""``tether serve --workers N``: real worker processes sharing one port, real etcd, real agents,
each agent a process of its own so that each holds a connection of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tether
from tether_server import CoordinatorProcess, free_port
from tether_server._server import server_options
from tether_server._store import COORDINATORS

from tests.conftest import LEASE_TTL, Etcd, eventually, ok, tether_cli

MAX_AGENTS = 16  # the kernel spreads connections at random: 16 all on one worker is 1 in 32768

# An agent that fails closed while its coordinator is gone, and ends only when killed.
AGENT = """
import sys, time, tether
uri, run_id, target = sys.argv[1:4]
with tether.Agent(uri, run_id=run_id, target=target) as agent:
    print("READY", flush=True)
    while True:
        try:
            agent.check()
        except tether.TetherLost:
            pass  # the SDK reconnects, through the shared port, to a worker that serves
        except tether.Killed:
            print("KILLED", flush=True)
            break
        time.sleep(0.02)
"""


@contextmanager
def supervisor(etcd: Etcd, tmp_path: Path, *extra: str) -> Iterator[CoordinatorProcess]:
    """``tether serve --workers 2`` on the tests' etcd, serving; stopped (SIGTERM) after."""
    env = {**os.environ, "TETHER_LOG_LEVEL": "INFO"}
    serve = CoordinatorProcess(etcd.url, lease_ttl=LEASE_TTL, log=tmp_path / "serve.log", env=env)
    serve.start("--workers", "2", *extra)
    try:
        yield serve
    finally:
        serve.stop()


class Fleet:
    """Agent processes of one tenant, each on a connection of its own."""

    def __init__(self, tenant: str, target: str) -> None:
        self.tenant, self.target = tenant, target
        self.procs: list[subprocess.Popen[str]] = []

    def add(self) -> None:
        run = f"r{len(self.procs)}"
        argv = [sys.executable, "-c", AGENT, f"agent://{self.tenant}/w", run, self.target]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"

    def workers(self, admin: tether.AdminClient) -> set[str]:
        """The worker (``w0``, ``w1``) each live instance's record names as its coordinator."""
        found = admin.agents(tenant=self.tenant, state=tether.State.ACTIVE)
        assert len(found) == len(self.procs)
        return {a.coordinator.rsplit("-w", 1)[1].split("-")[0] for a in found}

    def on_both(self, admin: tether.AdminClient) -> None:
        """Add agents until both workers hold some (at least four agents)."""
        while len(self.procs) < 4 or self.workers(admin) != {"0", "1"}:
            assert len(self.procs) < MAX_AGENTS, "every agent landed on one worker"
            self.add()

    def all_killed(self) -> None:
        for proc in self.procs:
            out, _ = proc.communicate(timeout=30)
            assert out.strip() == "KILLED"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@contextmanager
def fleet(tenant: str, target: str) -> Iterator[Fleet]:
    agents = Fleet(tenant, target)
    try:
        yield agents
    finally:
        agents.close()


def children(pid: int) -> dict[int, str]:
    """The child processes of ``pid``: pid -> command line."""
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {
        int(c): Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode() for c in raw
    }


def worker_pid(supervisor_pid: int, index: int) -> int:
    (pid,) = (p for p, cmd in children(supervisor_pid).items() if f"_workers {index}" in cmd)
    return pid


def test_two_workers_serve_a_kill_to_agents_on_either(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    with (
        supervisor(etcd, tmp_path) as serve,
        fleet(tenant, serve.addr) as agents,
        tether.AdminClient(serve.addr) as admin,
    ):
        agents.on_both(admin)
        ok(tether_cli("kill", "--tenant", tenant, "--reason", "both workers", addr=serve.addr))
        agents.all_killed()
        assert {a.state for a in admin.agents(tenant=tenant)} == {tether.State.KILLED}
        # Whichever worker answers sees the fleet of both, its acknowledgements included.
        assert ok(tether_cli("doctor", addr=serve.addr)).startswith("healthy: ")


def test_a_sigkilled_worker_is_restarted_and_its_agents_served_again(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    with (
        supervisor(etcd, tmp_path) as serve,
        fleet(tenant, serve.addr) as agents,
        tether.AdminClient(serve.addr) as admin,
    ):
        agents.on_both(admin)
        doomed = worker_pid(serve.pid, 1)
        os.kill(doomed, signal.SIGKILL)
        eventually(lambda: worker_pid(serve.pid, 1) != doomed)
        eventually(lambda: any(k.endswith(b"-w1-r1") for k in etcd.keys(COORDINATORS)))
        assert serve.proc is not None and serve.proc.poll() is None
        log = serve.log.read_text() if serve.log else ""
        assert f"worker 1 (pid {doomed}) exited with signal SIGKILL; restarting it" in log
        # Every agent is ACTIVE again, on w0 or on the new w1, and a kill still reaches all.
        eventually(lambda: agents.workers(admin) <= {"0", "1"}, timeout=30)
        ok(tether_cli("kill", "--tenant", tenant, "--reason", "after a restart", addr=serve.addr))
        agents.all_killed()


def test_sigterm_stops_every_worker_and_the_one_embedded_etcd(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "tether", "serve", "--workers", "2", "--listen", addr]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(tmp_path / "data"), "--lease-ttl", str(LEASE_TTL)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def etcd_and_two_workers() -> dict[int, str]:
            found = children(proc.pid)
            assert len(found) == 3
            return found

        kids = eventually(etcd_and_two_workers, timeout=30)
        assert sum("tether_server._workers" in cmd for cmd in kids.values()) == 2
        assert sum("etcd" in cmd and "_workers" not in cmd for cmd in kids.values()) == 1
        eventually(lambda: ok(tether_cli("agents", addr=addr)), timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert not [pid for pid in kids if Path(f"/proc/{pid}").exists()]
    finally:
        proc.kill()
        proc.wait()


def test_a_lone_coordinator_or_another_supervisor_on_the_workers_port_fails(
    etcd: Etcd, tmp_path: Path
) -> None:
    """SO_REUSEPORT is on in the workers only: nothing else joins their port by accident."""
    assert ("grpc.so_reuseport", 0) in server_options(shared=False)
    with supervisor(etcd, tmp_path) as serve:
        for extra in ([], ["--workers", "2"]):
            result = tether_cli("serve", "--listen", serve.addr, "--etcd", etcd.url, *extra)
            assert result.returncode == 1
            assert (
                result.stderr.strip()
                == f"tether: cannot listen on {serve.addr}: address already in use"
            )


@pytest.mark.parametrize("count", ["0", "-1", "abc", "2.5"])
def test_a_bad_worker_count_is_refused_with_one_line(count: str) -> None:
    result = tether_cli("serve", "--workers", count)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tether: --workers '{count}': give a whole number from 1")
    assert len(result.stderr.strip().splitlines()) == 1


def test_tether_workers_is_read_from_the_environment() -> None:
    env = {**os.environ, "TETHER_WORKERS": "none"}
    result = subprocess.run(
        [sys.executable, "-m", "tether", "serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("tether: --workers 'none'")


def test_a_worker_that_fails_before_it_serves_stops_the_supervisor(
    etcd: Etcd, tmp_path: Path
) -> None:
    """Restarting it would fail the same way: the supervisor exits with the worker's code."""
    missing = tmp_path / "rbac.yaml"
    addr = f"127.0.0.1:{free_port()}"
    result = tether_cli(
        "serve", "--workers", "2", "--listen", addr, "--etcd", etcd.url, "--rbac", str(missing)
    )
    assert result.returncode == 2, result.stderr
    assert f"--rbac {missing}: No such file or directory" in result.stderr
    assert "before it served" in result.stderr
