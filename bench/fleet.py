"""The harness's end of the load-generator processes (bench/worker.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether_server import TlsFiles

from bench.infra import BenchError, Procs, stop
from bench.record import load
from bench.tls import client_kwargs

Reply = dict[str, Any]
_FLEETS = itertools.count(1)


@dataclass
class Grow:
    """How growing a fleet went: reached of target, and the failed and still pending."""

    target: int = 0
    failed: int = 0
    pending: int = 0
    ttl: float | None = None  # the lease TTL the coordinator granted
    reached: int = 0
    seconds: float = 0.0


@dataclass
class Arrivals:
    """When agents reached a state since ``arm``, and about those that did not.

    ``by_state`` counts the missing by the state they were in; ``last_grants`` holds, for
    missing agents that (re)registered, when that was and the state it gave them.
    """

    times: list[float] = field(default_factory=list)
    missing: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    last_grants: list[tuple[float, str]] = field(default_factory=list)


class Worker:
    """One generator process, driven by JSON lines over its stdin and stdout."""

    def __init__(
        self, procs: Procs, kind: str, name: str, log_dir: Path | None = None, tag: str = ""
    ) -> None:
        self.name = name
        self.log = (log_dir / f"{tag or name}.log") if log_dir is not None else None
        with contextlib.ExitStack() as stack:
            err = stack.enter_context(self.log.open("ab")) if self.log else None
            self.proc = procs.spawn(
                [sys.executable, "-m", "bench.worker", kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name=f"{name}-out", daemon=True).start()
        self._expect("ready", 60)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise BenchError(f"worker {self.name} is gone: {err}") from err

    def receive(self, timeout: float) -> Reply:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"worker {self.name}: no reply within {timeout:g}s") from None
        if line is None:
            raise BenchError(f"worker {self.name} exited with {self.proc.wait(timeout=5)}")
        reply: Reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"worker {self.name}: {reply['error']}")
        return reply

    def _expect(self, key: str, timeout: float) -> Reply:
        reply = self.receive(timeout)
        if key not in reply:
            raise BenchError(f"worker {self.name}: expected {key!r}, got {reply}")
        return reply

    def call(self, cmd: str, within: float = 60, **args: Any) -> Reply:
        self.send(cmd, **args)
        return self.receive(within)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        stop(self.proc, sig)


class Fleet:
    """Several workers of one kind, addressed together."""

    def __init__(self, procs: Procs, kind: str, workers: int, log_dir: Path | None = None) -> None:
        self.kind = kind
        tag = next(_FLEETS)
        self.workers = [
            Worker(procs, kind, f"{kind}{i}", log_dir, f"{tag:02d}-{kind}{i}")
            for i in range(workers)
        ]
        self.size = 0

    def stderr_tracebacks(self) -> int:
        """Tracebacks the workers (the SDK inside them) wrote to stderr."""
        total = 0
        for w in self.workers:
            if w.log is not None and w.log.exists():
                total += w.log.read_text(errors="replace").count("Traceback (most recent")
        return total

    def all(self, cmd: str, within: float = 60, **args: Any) -> list[Reply]:
        """Send ``cmd`` to every worker at once, then gather the replies within ``within`` s."""
        for worker in self.workers:
            worker.send(cmd, **args)
        deadline = time.monotonic() + within
        return [w.receive(max(deadline - time.monotonic(), 0.1)) for w in self.workers]

    def each(self, cmd: str, args: Sequence[dict[str, Any]], within: float = 60) -> list[Reply]:
        """Send ``cmd`` with each worker's own arguments, then gather the replies."""
        for worker, own in zip(self.workers, args, strict=True):
            worker.send(cmd, **own)
        deadline = time.monotonic() + within
        return [w.receive(max(deadline - time.monotonic(), 0.1)) for w in self.workers]

    def grow_sdk(
        self,
        to: int,
        targets: Sequence[str],
        deadline: float,
        *,
        chunk: int = 1000,
        concurrency: int = 32,
        tls: TlsFiles | None = None,
        every_target: bool = False,
    ) -> Grow:
        """Add SDK agents in chunks until the fleet has ``to``, or ``deadline`` seconds pass.

        Returns how many were added, how long it took, and how many failed or are still
        pending (a fleet that does not converge is reported, not waited for forever).
        ``tls``: the certificate the agents present (``Coordinator.agent_tls``).
        ``every_target``: each agent gets all ``targets`` in order (it fails over along
        them), instead of one of them round-robin.
        """
        started = time.monotonic()
        out = Grow(target=to)
        while self.size < to:
            add = min(chunk, to - self.size)
            # A healthy coordinator registers a few hundred agents a second; a chunk that
            # takes far longer means the fleet is not converging, so stop rather than wait.
            left = min(deadline - (time.monotonic() - started), 20 + add * 0.04)
            if left <= 0:
                break
            shares = split(add, len(self.workers))
            args = [
                {"n": n, "targets": list(targets), "prefix": f"w{i}-",
                 "concurrency": concurrency, "deadline": left, "all_targets": every_target,
                 **client_kwargs(tls)}
                for i, n in enumerate(shares)
            ]  # fmt: skip
            replies = self.each("add", args, within=left + 60)
            self.size += add
            out.failed = sum(int(r["failed"]) for r in replies)
            out.pending = sum(int(r["pending"]) for r in replies)
            out.ttl = replies[0].get("ttl")
            if out.pending:
                break
        out.reached = self.size - out.failed - out.pending
        out.seconds = round(time.monotonic() - started, 2)
        return out

    def times(self, state: str, timeout: float) -> tuple[list[float], int]:
        """Every agent's timestamp of reaching ``state`` since ``arm``, and how many did not."""
        got = self.arrivals(state, timeout)
        return got.times, got.missing

    def arrivals(self, state: str, timeout: float) -> Arrivals:
        """``times`` plus, for the agents that did not get there, their state and last grant."""
        replies = self.all("wait", within=timeout + 30, state=state, timeout=timeout)
        out = Arrivals()
        for reply in replies:
            part = load(Arrivals, reply)
            out.times += part.times
            out.missing += part.missing
            out.last_grants += part.last_grants
            for k, v in part.by_state.items():
                out.by_state[k] = out.by_state.get(k, 0) + v
        return out

    def stats(self) -> list[Reply]:
        return self.all("stats", within=30)

    def total(self, field: str) -> float:
        """``field`` of the workers' stats, summed over the workers."""
        return sum(float(r[field]) for r in self.stats())

    def totals(self, *fields: str) -> list[float]:
        """Several fields of one round of stats, each summed over the workers."""
        stats = self.stats()
        return [sum(float(r[f]) for r in stats) for f in fields]

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
