"""A single-node etcd started as a child process, for ``tether serve`` with no ``--etcd``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
from pathlib import Path

import grpc
from aetcd import rpc

from tether_server._launch import LOOPBACK, LaunchError, etcd_argv, free_port

log = logging.getLogger("tether_server")


def _port_or_free(port: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return free_port()
    return port


class EmbeddedEtcd:
    """Owns one etcd process: started on loopback, stopped on exit, data kept in ``data_dir``.

    Unlike ``EtcdProcess`` it awaits readiness on the event loop: ``tether serve`` is
    asyncio end to end.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = _port_or_free(2379)
        self.peer_port = _port_or_free(2380)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    async def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until it answers.

        Raises:
            LaunchError: etcd is not installed, exited, or did not answer in time.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client, peer = f"http://{self.endpoint}", f"http://{LOOPBACK}:{self.peer_port}"
        argv = etcd_argv("tether", self.data_dir / "etcd", client, peer, log_level="warn")
        log_file = (self.data_dir / "etcd.log").open("ab")
        # Popen only forks; readiness is awaited below without blocking the loop.
        self._proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        log_file.close()
        await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            stub = rpc.MaintenanceStub(channel)
            while loop.time() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise LaunchError(
                        f"embedded etcd exited with code {self._proc.returncode}; "
                        f"see {self.data_dir / 'etcd.log'}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    await stub.Status(rpc.StatusRequest(), timeout=1)
                    return
                await asyncio.sleep(0.1)
        self.stop()
        raise LaunchError(f"embedded etcd not ready within {timeout:g}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
