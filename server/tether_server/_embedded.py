"""A single-node etcd kept alive as a child process, for ``tether serve`` with no ``--etcd``.

The coordinator supervises it:

- **It is restarted when it dies**, on the same ports and data, with backoff. The loss is
  logged once and the return once; the coordinator's own loop re-attaches to it.
- **It dies with the coordinator.** On Linux the child asks the kernel for SIGKILL when its
  parent dies (``PR_SET_PDEATHSIG``), so a SIGKILLed coordinator leaves no etcd behind.
- **An orphan is found at start.** ``etcd.pid`` in the data directory names the etcd this
  directory last ran. If that process still runs etcd on this directory (an earlier
  coordinator crashed where the death signal does not reach), it is stopped before a new
  one starts; otherwise the new etcd would wait forever for the old one's database lock.
- **One coordinator per data directory.** ``coordinator.lock`` is held (``flock``) while the
  coordinator lives, and the kernel drops it when it dies; a second ``tether serve`` on the
  same directory is refused with the holder's pid.

etcd runs in its own process group, so a Ctrl-C in the terminal reaches the coordinator
alone: it flushes its last checkpoints to etcd, then stops etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import IO

import grpc
from aetcd import rpc

from tether_server._launch import LOOPBACK, LaunchError, etcd_argv, free_port

log = logging.getLogger("tether_server")

PID_FILE = "etcd.pid"
LOCK_FILE = "coordinator.lock"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_MAX_BACKOFF = 5.0
_STILL_DOWN_EVERY = 30.0  # seconds between reminders while restarts keep failing


def _port_or_free(port: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return free_port()
    return port


# Run as ``python -c _SHIM PARENT_PID ETCD_ARGV...``: ask the kernel for SIGKILL when the
# parent dies, give up if it already has, then become etcd (the request survives exec).
# A shim rather than a ``preexec_fn``: code between fork and exec is unsafe in a process
# with threads, and gRPC runs threads in the coordinator.
_SHIM = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that the child dies with this process; as given off Linux.

    The kernel signals the child when the *thread* that started it ends, so the caller
    spawns from the event loop's thread, which lives as long as the coordinator.
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *argv]


def _cmdline(pid: int) -> list[str]:
    """The argv of process ``pid``, or [] when it is gone, a zombie, or cannot be read."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return []
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _runs_etcd_on(pid: int, etcd_dir: Path) -> bool:
    return f"--data-dir={etcd_dir}" in _cmdline(pid)


def _orphan(pid_file: Path, etcd_dir: Path) -> int | None:
    """The pid ``pid_file`` names if that process still runs etcd on ``etcd_dir``."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _runs_etcd_on(pid, etcd_dir) else None


async def _stop_orphan(pid_file: Path, etcd_dir: Path) -> None:
    """Stop the etcd that ``pid_file`` names if it still runs on ``etcd_dir``."""
    if (pid := _orphan(pid_file, etcd_dir)) is None:
        return
    log.warning("stopping etcd pid %d, left running on %s by an earlier coordinator", pid, etcd_dir)
    for sig, patience in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(int(patience / 0.05)):
            if not _runs_etcd_on(pid, etcd_dir):
                return
            await asyncio.sleep(0.05)
    raise LaunchError(f"etcd pid {pid} on {etcd_dir} would not stop; stop it and start again")


def _lock(path: Path) -> IO[str]:
    """Hold ``path`` locked for this process's life; the kernel drops it when we die."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise LaunchError(
            f"{path.parent} is in use by another tether serve (pid {holder}); "
            "stop it, or give this one another --data-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class EmbeddedEtcd:
    """Owns one etcd process: started on loopback, restarted if it dies, stopped on exit.

    Data is kept in ``data_dir``. ``start()`` awaits readiness on the event loop:
    ``tether serve`` is asyncio end to end.
    """

    def __init__(self, data_dir: Path, ready_timeout: float = 20.0) -> None:
        # Absolute, so that etcd's command line names the directory wherever it was started
        # from: that is how an orphan of this directory is recognised.
        self.data_dir = data_dir.absolute()
        self.ready_timeout = ready_timeout
        self.client_port = 0
        self.peer_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._dir_lock: IO[str] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The running etcd's process id, or None."""
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        """Take the data directory, stop an orphan on it, start etcd, and supervise it.

        Raises:
            LaunchError: another coordinator holds the directory, or etcd is not installed,
                exited, or did not answer in time.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = _lock(self.data_dir / LOCK_FILE)
        try:
            await _stop_orphan(self.data_dir / PID_FILE, self.data_dir / "etcd")
            self.client_port, self.peer_port = _port_or_free(2379), _port_or_free(2380)
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="embedded-etcd")

    async def _launch(self) -> None:
        """One etcd process, awaited until it answers; killed if it does not."""
        client, peer = f"http://{self.endpoint}", f"http://{LOOPBACK}:{self.peer_port}"
        argv = etcd_argv("tether", self.data_dir / "etcd", client, peer, log_level="warn")
        with (self.data_dir / "etcd.log").open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *_dying_with_parent(argv),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                process_group=0,  # a terminal's Ctrl-C is the coordinator's to handle
            )
        (self.data_dir / PID_FILE).write_text(f"{self._proc.pid}\n")
        try:
            await self._wait_ready()
        except BaseException:
            await self._end(signal.SIGKILL)
            raise

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            stub = rpc.MaintenanceStub(channel)
            while loop.time() < deadline:
                if self._proc is not None and self._proc.returncode is not None:
                    raise LaunchError(
                        f"embedded etcd exited with {_how(self._proc.returncode)}; "
                        f"see {self.data_dir / 'etcd.log'}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    await stub.Status(rpc.StatusRequest(), timeout=1)
                    return
                await asyncio.sleep(0.1)
        raise LaunchError(f"embedded etcd not ready within {self.ready_timeout:g}s")

    async def _supervise(self) -> None:
        """Wait for etcd to die; restart it until it answers again. Ends when cancelled."""
        while self._proc is not None:
            pid, code = self._proc.pid, await self._proc.wait()
            log.error(
                "embedded etcd (pid %d) exited with %s; restarting it on %s",
                pid, _how(code), self.endpoint,
            )  # fmt: skip
            down = asyncio.get_running_loop().time()
            await self._restart(down)
            log.warning(
                "embedded etcd is back (pid %d) after %.1fs",
                self.pid, asyncio.get_running_loop().time() - down,
            )  # fmt: skip

    async def _restart(self, down: float) -> None:
        """Launch until one answers, backing off; a reminder now and then, not every try."""
        loop, backoff, reminded = asyncio.get_running_loop(), 0.1, down
        while True:
            try:
                await self._launch()
                return
            except LaunchError as err:
                log.debug("embedded etcd restart failed: %s", err)
                if loop.time() - reminded >= _STILL_DOWN_EVERY:
                    reminded = loop.time()
                    log.error("embedded etcd still down after %.0fs: %s", reminded - down, err)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def stop(self) -> None:
        """Stop supervising, stop etcd (SIGTERM, then SIGKILL if it lingers), free the dir."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._end(signal.SIGTERM)
        if self._dir_lock is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / PID_FILE).unlink(missing_ok=True)
            self._dir_lock.close()
            self._dir_lock = None

    async def _end(self, sig: int, grace: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        await reap(proc, grace)


async def reap(proc: asyncio.subprocess.Process, patience: float) -> None:
    """Wait up to ``patience`` seconds for ``proc`` to exit after a signal, then kill it."""
    try:
        await asyncio.wait_for(proc.wait(), patience)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
