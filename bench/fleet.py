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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.infra import BenchError, Procs, stop

Reply = dict[str, Any]
_FLEETS = itertools.count(1)


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

    def each(
        self, cmd: str, args_for: Callable[[int], dict[str, Any]], within: float = 60
    ) -> list[Reply]:
        """Send ``cmd`` with per-worker arguments, then gather the replies."""
        for i, worker in enumerate(self.workers):
            worker.send(cmd, **args_for(i))
        deadline = time.monotonic() + within
        return [w.receive(max(deadline - time.monotonic(), 0.1)) for w in self.workers]

    def grow_sdk(
        self,
        to: int,
        targets: Sequence[str],
        deadline: float,
        chunk: int = 1000,
        concurrency: int = 32,
    ) -> dict[str, Any]:
        """Add SDK agents in chunks until the fleet has ``to``, or ``deadline`` seconds pass.

        Returns how many were added, how long it took, and how many failed or are still
        pending (a fleet that does not converge is reported, not waited for forever).
        """
        started = time.monotonic()
        out: dict[str, Any] = {"target": to, "failed": 0, "pending": 0, "ttl": None}
        while self.size < to:
            add = min(chunk, to - self.size)
            # A healthy coordinator registers a few hundred agents a second; a chunk that
            # takes far longer means the fleet is not converging, so stop rather than wait.
            left = min(deadline - (time.monotonic() - started), 20 + add * 0.04)
            if left <= 0:
                break
            shares = split(add, len(self.workers))
            replies = self.each(
                "add",
                lambda i, shares=shares, left=left: {
                    "n": shares[i],
                    "targets": list(targets),
                    "prefix": f"w{i}-",
                    "concurrency": concurrency,
                    "deadline": left,
                },
                within=left + 60,
            )
            self.size += add
            out["failed"] = sum(int(r["failed"]) for r in replies)
            out["pending"] = sum(int(r["pending"]) for r in replies)
            out["ttl"] = replies[0].get("ttl")
            if out["pending"]:
                break
        out["reached"] = self.size - out["failed"] - out["pending"]
        out["seconds"] = round(time.monotonic() - started, 2)
        return out

    def times(self, state: str, timeout: float) -> tuple[list[float], int]:
        """Every agent's timestamp of reaching ``state`` since ``arm``, and how many did not."""
        stamps, missing, _ = self.times_detail(state, timeout)
        return stamps, missing

    def times_detail(self, state: str, timeout: float) -> tuple[list[float], int, dict[str, Any]]:
        """``times`` plus, for the agents that did not get there, their state and last grant."""
        replies = self.all("wait", within=timeout + 30, state=state, timeout=timeout)
        stamps = [t for r in replies for t in r["times"]]
        by_state: dict[str, int] = {}
        for r in replies:
            for k, v in r.get("missing_by_state", {}).items():
                by_state[k] = by_state.get(k, 0) + int(v)
        grants = [tuple(g) for r in replies for g in r.get("missing_last_grants", [])]
        detail = {"by_state": by_state, "last_grants": grants}
        return stamps, sum(int(r["missing"]) for r in replies), detail

    def stats(self) -> list[Reply]:
        return self.all("stats", within=30)

    def total(self, field: str) -> float:
        return sum(float(r[field]) for r in self.stats())

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
