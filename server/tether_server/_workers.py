"""``tether serve --workers N``: N coordinator processes behind one address, and their supervisor.

The supervisor is the process the operator started. It serves no calls itself:

- **One address.** It checks that ``--listen`` (and ``--health-listen``) are free, then
  starts N workers that each bind them with SO_REUSEPORT; the kernel spreads connections
  across them. SO_REUSEPORT is on here and only here: a lone coordinator binds its port
  alone, so that a second one on a port in use fails.
- **Each worker is a whole coordinator**, attached to etcd on its own: its own lease, its
  own coordinator id (``ID-w0``, ``ID-w1``, ...; ``ID-w1-r2`` after its second restart),
  its own agents (``tether agents`` lists every worker's: they share etcd). A kill reaches
  every worker through etcd's watch, as it reaches every coordinator of a cluster.
- **One embedded etcd.** Without ``--etcd`` the supervisor starts the embedded etcd and
  holds the data directory; the workers share it.
- **Other listeners.** The health port is shared like the main one (a probe's connection
  lands on one worker, as an agent's does). Each worker's canary has its own private
  socket and its own synthetic run. Telemetry is pushed (OTLP), so there is no metrics port.
- **Stopping.** SIGTERM or SIGINT to the supervisor stops every worker as a lone
  coordinator stops (drain, then goodbye), then the embedded etcd; it exits 0.
- **A worker that dies** after it served is logged and restarted, with backoff from 0.5 s
  to 30 s (reset once a worker has served for a minute); its agents reconnect through the
  shared port to the others meanwhile. A worker that fails before it ever served ends the
  supervisor with that worker's exit code (a bad file, etcd unreachable at start): restarting
  it would fail the same way. A restart that fails before serving is retried.
- **A SIGKILLed supervisor** takes its workers and etcd along (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import sys

from tether_server._config import ConfigError, ServerConfig
from tether_server._embedded import EmbeddedEtcd, _dying_with_parent, _how, reap

log = logging.getLogger("tether_server")

READY = b"serving\n"  # what a worker writes on its readiness pipe once it serves
_FIRST_BACKOFF, _MAX_BACKOFF = 0.5, 30.0
_SERVED_LONG = 60.0  # seconds of service after which a death restarts the backoff


class Supervisor:
    """Runs ``config.workers`` workers until stopped; ``run`` returns the exit code."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.code = 0
        self._stop = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready = 0

    async def run(self) -> int:
        """Start every worker, keep them running until a signal or a failed first start,
        then stop them all."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._stop.set)
        keepers = [
            asyncio.create_task(self._keep(i), name=f"worker-{i}")
            for i in range(self.config.workers)
        ]
        for keeper in keepers:
            keeper.add_done_callback(self._kept)
        try:
            await self._stop.wait()
        finally:
            await self._stop_all()
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        return self.code

    def _kept(self, keeper: asyncio.Task[None]) -> None:
        """A keeper that failed (it could not start a process) leaves its worker dead: stop."""
        if not keeper.cancelled() and (err := keeper.exception()) is not None:
            log.error("%s failed: %s: %s", keeper.get_name(), type(err).__name__, err)
            self.code = self.code or 1
            self._stop.set()

    async def _keep(self, index: int) -> None:
        """Worker ``index``: started, awaited, restarted after a death with backoff."""
        backoff, start = _FIRST_BACKOFF, 0
        while True:
            served, lasted, code, pid = await self._one_life(index, start)
            if self._stop.is_set():
                return
            if not served and start == 0:
                self._fail(index, pid, code)
                return
            backoff = _FIRST_BACKOFF if lasted >= _SERVED_LONG else backoff
            log.error(
                "worker %d (pid %d) exited with %s%s; restarting it in %.1fs",
                index, pid, _how(code), "" if served else " before it served", backoff,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
                return
            backoff, start = min(backoff * 2, _MAX_BACKOFF), start + 1

    async def _one_life(self, index: int, start: int) -> tuple[bool, float, int, int]:
        """Run the worker once: (whether it served, seconds it served, exit code, pid)."""
        loop = asyncio.get_running_loop()
        proc = await self._spawn(index, start)
        served = await self._await_ready(proc, index, start)
        since = loop.time()
        code = await proc.wait()
        self._procs.pop(index, None)
        return served, loop.time() - since if served else 0.0, code, proc.pid

    async def _spawn(self, index: int, start: int) -> asyncio.subprocess.Process:
        suffix = f"-w{index}" + (f"-r{start}" if start else "")
        config = dataclasses.replace(
            self.config, coordinator_id=f"{self.config.coordinator_id}{suffix}"
        )
        # -P: the working directory is not on the path, so a worker runs the code the
        # supervisor runs, never a stray module of the directory it was started from.
        argv = [sys.executable, "-P", "-m", "tether_server._workers", str(index)]
        proc = await asyncio.create_subprocess_exec(
            *_dying_with_parent(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            process_group=0,  # a terminal's Ctrl-C is the supervisor's to handle
        )
        self._procs[index] = proc  # from here on, a stop reaches it
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(config))
        await proc.stdin.drain()
        proc.stdin.close()
        return proc

    async def _await_ready(self, proc: asyncio.subprocess.Process, index: int, start: int) -> bool:
        """Whether the worker said it serves (rather than ending first)."""
        assert proc.stdout is not None
        if await proc.stdout.readline() != READY:
            return False
        log.info("worker %d (pid %d) serving", index, proc.pid)
        self._ready += start == 0
        if start == 0 and self._ready == self.config.workers:
            log.warning(
                "%d workers serving on %s (SO_REUSEPORT), coordinator ids %s-w0..w%d",
                self.config.workers, self.config.listen,
                self.config.coordinator_id, self.config.workers - 1,
            )  # fmt: skip
        return True

    def _fail(self, index: int, pid: int, code: int) -> None:
        log.error("worker %d (pid %d) exited with %s before it served", index, pid, _how(code))
        if self.code == 0:
            self.code = code if code > 0 else 1
        self._stop.set()

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains as a lone coordinator does), SIGKILL if one
        is still running after its shutdown grace and some."""
        procs = list(self._procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        patience = self.config.shutdown_grace + 10.0
        await asyncio.gather(*(reap(proc, patience) for proc in procs))


async def supervise(config: ServerConfig) -> int:
    """Run ``config.workers`` coordinators behind ``config.listen``; return the exit code.

    Raises:
        OSError: ``--listen`` or ``--health-listen`` is in use.
        LaunchError: the embedded etcd did not start.
    """
    from tether_server._server import check_free  # grpc's server module: not before a check

    for listen in (config.listen, config.health_listen):
        if listen:
            check_free(listen)
    embedded = None
    if not config.etcd:
        embedded = EmbeddedEtcd(config.data_dir)
        await embedded.start()
        config = dataclasses.replace(config, etcd=(embedded.endpoint,), etcd_tls=False)
        log.warning("embedded etcd at http://%s, data in %s", embedded.endpoint, config.data_dir)
    try:
        return await Supervisor(config).run()
    finally:
        if embedded is not None:
            await embedded.stop()


def worker_main(index: int) -> int:
    """One worker: its config on stdin, its readiness on stdout; exit codes as ``tether serve``."""
    from tether_server._server import serve

    config: ServerConfig = pickle.load(sys.stdin.buffer)
    ready = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what a worker prints goes to stderr
    logging.basicConfig(
        level=os.environ.get("TETHER_LOG_LEVEL", "WARNING").upper(),
        format=f"tether[w{index}]: %(message)s",
    )

    def serving() -> None:
        ready.write(READY)
        ready.close()

    try:
        asyncio.run(serve(config, serving=serving))
    except (ConfigError, ValueError) as err:  # a bad file or OTEL_* value
        print(f"tether[w{index}]: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:
        print(f"tether[w{index}]: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(int(sys.argv[1])))
