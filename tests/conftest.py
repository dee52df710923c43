"""Real etcd, real coordinators, on free loopback ports. No mocks of etcd or gRPC.

One etcd and two coordinators serve the whole session; keys are wiped between tests.
Tests that break things (SIGKILL a coordinator, stop etcd) start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import tether
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tether_server._embedded import etcd_binary, free_port

LEASE_TTL = 2  # etcd's floor: keeps STALE and fail-closed tests short
T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; a bounded wait, not a timing claim."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
            last = result
        except ProcessExited:
            raise
        except Exception as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last result: {last!r}")


class ProcessExited(RuntimeError):
    """A server under test died; waiting longer will not help."""


@dataclass
class Etcd:
    data_dir: Path
    port: int = field(default_factory=free_port)
    peer: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Etcd:
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [
                etcd_binary(),
                "--name=test",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        eventually(self._ready)
        return self

    def _ready(self) -> bool:
        with grpc.insecure_channel(self.endpoint) as channel:
            rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=1)
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def wipe(self) -> None:
        """Delete every fact under /tether/ except the coordinators' shared permit key."""
        with grpc.insecure_channel(self.endpoint) as channel:
            kv = rpc.KVStub(channel)
            for start, end in ((b"/tether/", b"/tether/keys/"), (b"/tether/keys0", b"/tether0")):
                kv.DeleteRange(rpc.DeleteRangeRequest(key=start, range_end=end))


@dataclass
class Coordinator:
    etcd: Etcd
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Coordinator:
        self.log = tmp / f"coordinator-{self.port}.log"
        env = {**os.environ, "TETHER_LOG_LEVEL": "INFO", **(env or {})}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "tether._cli", "serve",
                    "--listen", self.addr,
                    "--etcd", f"http://{self.etcd.endpoint}",
                    "--lease-ttl", str(LEASE_TTL),
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        eventually(self.serving)
        return self

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessExited(f"coordinator exited: {self.log.read_text() if self.log else ''}")
        with grpc.insecure_channel(self.addr) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tether.v1.AgentService"), timeout=1
            )
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tether")


@pytest.fixture(scope="session")
def etcd(session_tmp: Path) -> Iterator[Etcd]:
    server = Etcd(session_tmp / "etcd").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def coordinators(etcd: Etcd, session_tmp: Path) -> Iterator[tuple[Coordinator, Coordinator]]:
    a = Coordinator(etcd).start(session_tmp)
    b = Coordinator(etcd).start(session_tmp)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def coord(coordinators: tuple[Coordinator, Coordinator]) -> Coordinator:
    return coordinators[0]


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    if "etcd" in request.fixturenames:
        request.getfixturevalue("etcd").wipe()


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A tenant name of this test's own, so tests never see each other's agents."""
    name: str = request.node.name
    return "t-" + name.replace("_", "-").replace("[", "-").strip("]")[:40]


@pytest.fixture
def admin(coord: Coordinator) -> Iterator[tether.AdminClient]:
    """An admin client of the first coordinator; the audit names it ``pytest``."""
    with tether.AdminClient(coord.addr, actor="pytest") as client:
        yield client


def settled_effects(
    admin: tether.AdminClient, tenant: str, n: int = 1
) -> list[tether.EffectRecord]:
    """The tenant's ledger once it holds at least ``n`` rows and none is merely intended."""

    def settled() -> list[tether.EffectRecord]:
        rows = admin.effects(tenant)
        if len(rows) < n or any(r.status is tether.EffectStatus.INTENDED for r in rows):
            raise AssertionError([(r.key, r.capability, r.status.value) for r in rows])
        return rows

    return eventually(settled)
