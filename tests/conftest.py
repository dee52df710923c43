"""Real etcd, real coordinators, on free loopback ports. No mocks of etcd or gRPC.

One etcd and two coordinators serve the whole session; keys are wiped between tests.
Tests that break things (SIGKILL a coordinator, stop etcd) start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import tether
from aetcd import rpc
from tether_server import CoordinatorProcess, EtcdProcess, LaunchError, ProcessExited, wait_until
from tether_server._signer import _b64, _unb64
from tether_server._store import KEYS, PERMIT_KEY, ROOT, prefix_end

LEASE_TTL = 2  # etcd's floor: keeps STALE and fail-closed tests short
T = TypeVar("T")

ALICE, BOB, CAROL = "alice-token-0123456789", "bob-token-0123456789", "carol-token-0123456789"
RBAC = """
operators:
  alice: {role: admin, tenants: ["*"]}
  bob:   {role: operator, tenants: [acme]}
  carol: {role: viewer, tenants: [acme, globex]}
"""


def eventually(probe: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; a bounded wait, not a timing claim."""
    try:
        return wait_until(probe, timeout, "condition", interval)
    except ProcessExited:
        raise
    except LaunchError as err:
        raise AssertionError(str(err)) from None


class Etcd(EtcdProcess):
    """The tests' etcd: the launcher's, plus a wipe between tests."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, "test")

    def wipe(self) -> None:
        """Delete every fact under /tether/ except the coordinators' shared permit key."""
        with grpc.insecure_channel(self.endpoint) as channel:
            kv = rpc.KVStub(channel)
            for start, end in ((ROOT, KEYS), (prefix_end(KEYS), prefix_end(ROOT))):
                kv.DeleteRange(rpc.DeleteRangeRequest(key=start, range_end=end))

    def keys(self, prefix: bytes) -> list[bytes]:
        """Every key that starts with ``prefix``."""
        with grpc.insecure_channel(self.endpoint) as channel:
            request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
            resp = rpc.KVStub(channel).Range(request, timeout=5)
        return [kv.key for kv in resp.kvs]

    def permit_key(self) -> bytes:
        """The coordinators' shared signing key (stored hex at ``PERMIT_KEY``)."""
        with grpc.insecure_channel(self.endpoint) as channel:
            resp = rpc.KVStub(channel).Range(rpc.RangeRequest(key=PERMIT_KEY), timeout=5)
        return bytes.fromhex(resp.kvs[0].value.decode())


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


@pytest.fixture
def admin(coord: Coordinator) -> Iterator[tether.AdminClient]:
    """An admin client of the first coordinator; the audit names it ``pytest``."""
    with tether.AdminClient(coord.addr, actor="pytest") as client:
        yield client


def audited(admin: tether.AdminClient, tenant: str, action: str) -> tether.AuditEntry:
    """The tenant's first audit entry of ``action``, once there is one."""

    def found() -> list[tether.AuditEntry]:
        return [e for e in admin.audit(tenant=tenant) if e.action == action]

    return eventually(found)[0]


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


def forged(token: str, **changes: Any) -> str:
    """``token`` (``[PREFIX.]CLAIMS.SIGNATURE``) with ``changes`` made to its claims and the
    signature kept: what a forger can make without the key."""
    *head, claims, signature = token.split(".")
    body = {**json.loads(_unb64(claims)), **changes}
    return ".".join([*head, _b64(json.dumps(body).encode()), signature])


BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def tether_cli(
    *args: str, addr: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``tether ARGS...`` in a subprocess, as user ``oncall`` (``TETHER_ADDR=addr`` if given)."""
    env = {**os.environ, "USER": "oncall"}
    if addr is not None:
        env["TETHER_ADDR"] = addr
    return subprocess.run(
        [sys.executable, "-m", "tether._cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def write_rbac(directory: Path) -> tuple[Path, Path]:
    """(rbac, tokens) files of alice (admin), bob (operator of acme), carol (viewer)."""
    rbac, tokens = directory / "rbac.yaml", directory / "tokens"
    rbac.write_text(RBAC)
    tokens.write_text(f"# who is who\n{ALICE} alice\n{BOB} bob\n{CAROL} carol\n")
    return rbac, tokens


@pytest.fixture(scope="module")
def guarded(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A coordinator with roles (``write_rbac``): alice admin, bob operates acme, carol views
    acme and globex; one per module that asks for it."""
    directory = tmp_path_factory.mktemp("rbac")
    rbac, tokens = write_rbac(directory)
    coordinator = Coordinator(etcd).start(
        directory, "--rbac", str(rbac), "--admin-tokens", str(tokens)
    )
    yield coordinator
    coordinator.stop()


class Pki:
    """A development CA and certificates made on demand, as ``tether certs`` makes them.

    ``leaf(name, uri=...)`` writes ``NAME.crt`` and ``NAME.key`` once and returns their
    paths; ``coordinator()`` is valid for 127.0.0.1 and localhost. ``foreign`` is a second,
    untrusted CA.
    """

    def __init__(self, directory: Path) -> None:
        from tether._certs import new_ca

        self.dir = directory
        self._ca = new_ca()
        self.ca, _ = self._ca.write(directory, "ca")
        self._foreign = new_ca("some other CA")
        self._made: dict[str, tuple[Path, Path]] = {}

    def leaf(
        self, name: str, *, uri: str = "", foreign: bool = False, expired: bool = False
    ) -> tuple[Path, Path]:
        """(cert, key) paths of a leaf certificate with URI SAN ``uri``."""
        import datetime

        from tether._certs import issue

        if name not in self._made:
            past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
            pem = issue(
                self._foreign if foreign else self._ca,
                uri=uri,
                dns=["localhost"],
                ips=["127.0.0.1"],
                days=1 if expired else 30,
                not_before=past if expired else None,
            )
            self._made[name] = pem.write(self.dir, name)
        return self._made[name]

    def coordinator(self) -> tuple[Path, Path]:
        return self.leaf("coordinator", uri="spiffe://tether/coordinator/test")

    def agent(self, tenant: str, agent: str = "") -> tuple[Path, Path]:
        from tether._certs import spiffe_id

        name = f"agent-{tenant}-{agent or 'any'}"
        return self.leaf(name, uri=spiffe_id(tenant=tenant, agent=agent))

    def operator(self, name: str) -> tuple[Path, Path]:
        from tether._certs import spiffe_id

        return self.leaf(f"operator-{name}", uri=spiffe_id(operator=name))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One development PKI for the session's TLS tests."""
    return Pki(tmp_path_factory.mktemp("pki"))


class Siblings:
    """``n`` more agents of this process on the test's coordinator, in a tenant of their own
    that the test never kills: they share the test's agents' stream (one per process, target
    list and credentials), so the test runs with several runs per stream as well as one.

    ``around(target)`` (sync) or ``around_async(target)`` (on the test's own loop) opens them
    and, at the end, checks each was told RUN all along and is still running; or, with
    ``fate=True`` (a test that breaks the stream), ``shared_fate(stopped)`` checks that they
    are stopped (or running) along with the test's agent.
    """

    def __init__(self, n: int, tenant: str) -> None:
        self.n = n
        self.tenant = f"{tenant}-sib"
        self.agents: list[tether.Agent | tether.AsyncAgent] = []
        self.stops: list[tether.Verdict] = []  # every verdict with a stop a sibling was given
        self.replies = 0

    def _seen(self, verdict: tether.Verdict, grant: bool) -> None:
        self.replies += 1
        if verdict.stop is not None:
            self.stops.append(verdict)

    def _args(self, i: int, target: str) -> tuple[str, dict[str, Any]]:
        config = tether.AgentConfig.from_env(os.environ, on_reply=self._seen)
        return f"agent://{self.tenant}/sib{i}", {"target": target, "config": config}

    @contextlib.contextmanager
    def around(self, target: str, *, fate: bool = False) -> Iterator[Siblings]:
        with contextlib.ExitStack() as stack:
            for i in range(self.n):
                uri, kwargs = self._args(i, target)
                self.agents.append(stack.enter_context(tether.Agent(uri, **kwargs)))
            before = self.replies
            yield self
            if not fate:
                self.untouched(before)

    @contextlib.asynccontextmanager
    async def around_async(self, target: str) -> AsyncIterator[Siblings]:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(self.n):
                uri, kwargs = self._args(i, target)
                agent = tether.AsyncAgent(uri, **kwargs)
                self.agents.append(await stack.enter_async_context(agent))
            before = self.replies
            yield self
            await asyncio.to_thread(self.untouched, before)  # its loop must go on meanwhile

    def untouched(self, replies_before: int) -> None:
        """Each sibling was told RUN all along, is still acked, and still runs."""
        assert not self.stops, [str(v.stop) for v in self.stops]
        for agent in self.agents:
            agent.check()
            assert not agent.halts
        if self.n:
            eventually(lambda: self.replies > replies_before)  # acks kept coming

    def shared_fate(self, *, stopped: bool) -> None:
        """Each sibling is stopped (or running again) as the test's agent on its stream is."""
        for agent in self.agents:
            eventually(lambda agent=agent: agent.killed == stopped)  # type: ignore[misc]


@pytest.fixture(params=[0, 3], ids=["alone", "siblings"])
def siblings(request: pytest.FixtureRequest, tenant: str) -> Siblings:
    """None, or three more runs on the test's stream: ``Siblings``."""
    return Siblings(request.param, tenant)
