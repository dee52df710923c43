"""Real etcd, real coordinators, on free loopback ports. No mocks of etcd or gRPC.

One etcd and two coordinators serve the whole session; keys are wiped between tests.
Tests that break things (SIGKILL a coordinator, stop etcd) start their own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aetcd import rpc
from tether_server import CoordinatorProcess, EtcdProcess, ProcessExited

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


class Etcd(EtcdProcess):
    """The tests' etcd: the launcher's, plus a wipe between tests."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, "test")

    def wipe(self) -> None:
        """Delete every fact under /tether/ except the coordinators' shared permit key."""
        with grpc.insecure_channel(self.endpoint) as channel:
            kv = rpc.KVStub(channel)
            for start, end in ((b"/tether/", b"/tether/keys/"), (b"/tether/keys0", b"/tether0")):
                kv.DeleteRange(rpc.DeleteRangeRequest(key=start, range_end=end))


class Coordinator:
    """A ``tether serve`` with the tests' lease TTL, logging at INFO into the test's tmp dir."""

    def __init__(self, etcd: Etcd) -> None:
        self.process = CoordinatorProcess(
            etcd.url, lease_ttl=LEASE_TTL, env={**os.environ, "TETHER_LOG_LEVEL": "INFO"}
        )

    @property
    def addr(self) -> str:
        return self.process.addr

    @property
    def log(self) -> Path | None:
        return self.process.log

    def start(self, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Coordinator:
        self.process.log = tmp / f"coordinator-{self.process.port}.log"
        self.process.start(*extra, env=env, timeout=15)
        return self

    def serving(self) -> bool:
        return self.process.serving()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.stop(sig)


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
