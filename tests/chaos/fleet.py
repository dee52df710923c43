"""A fleet of ``tether.AsyncAgent`` in one subprocess, driven by the test over JSON lines.

The child (``python tests/chaos/fleet.py``) reads one command per line on stdin and answers
one JSON line on stdout. The agents share the process's one Multiplex stream per target (as
every SDK process does), each reports a checkpoint
``{"agent": i, "step": n}`` that changes every ``period`` seconds, and is sampled with
``check()`` every 20 ms, so that a fail-closed by the agent's own TTL watchdog (which calls
no hook) is seen too. Times are ``time.monotonic()``, which every process on the machine
shares, so the test compares them with the moment it broke something.

``FleetProcess`` is the test's side.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tether

RUNNING, HALTED, LOST = "running", "halted", "lost"
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def state_of(agent: tether.AsyncAgent) -> str:
    try:
        agent.check()
    except tether.TetherLost:
        return LOST
    except tether.Killed:
        return HALTED
    return RUNNING


class Fleet:
    """The child's agents and what was seen of them."""

    def __init__(self) -> None:
        self.agents: list[tether.AsyncAgent] = []
        self.state: list[str] = []
        self.changed: list[list[tuple[float, str]]] = []  # per agent: (when, new state)
        self.grants: list[list[float]] = []  # per agent: when it (re)registered
        self.last: dict[str, int] = {}  # run id -> last step reported
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, n: int, targets: list[str], tenant: str, period: float) -> dict[str, Any]:
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with gate:
                await self.agents[i].start()

        for i in range(n):
            self.agents.append(self._agent(i, targets, tenant))
            self.state.append(RUNNING)
            self.changed.append([])
            self.grants.append([])
        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        self._tasks = [
            asyncio.create_task(self._report(period)),
            asyncio.create_task(self._sample()),
        ]
        return {"registered": n, "seconds": time.monotonic() - started}

    def _agent(self, i: int, targets: list[str], tenant: str) -> tether.AsyncAgent:
        def on_reply(verdict: tether.Verdict, granted: bool) -> None:
            if granted:
                self.grants[i].append(time.monotonic())

        config = tether.AgentConfig(
            targets=tuple(targets),
            channel_options=OWN_CONNECTION,
            on_reply=on_reply,
            connect_timeout=60,
        )
        return tether.AsyncAgent(
            f"agent://{tenant}/a{i % 8}", run_id=f"run-{i}", instance_id=f"i-{i}", config=config
        )

    async def _report(self, period: float) -> None:
        for step in itertools.count(1):
            for i, agent in enumerate(self.agents):
                agent.report({"agent": i, "step": step})
                self.last[agent.run_id] = step
            await asyncio.sleep(period)

    async def _sample(self) -> None:
        while True:
            now = time.monotonic()
            for i, agent in enumerate(self.agents):
                state = state_of(agent)
                if state != self.state[i]:
                    self.state[i] = state
                    self.changed[i].append((now, state))
            await asyncio.sleep(0.02)

    def freeze(self) -> dict[str, Any]:
        """Stop reporting; answer the last step each run reported."""
        self._tasks[0].cancel()
        return {"last": self.last}

    def status(self, since: float) -> dict[str, Any]:
        """Counts by state now; per agent, when it first stopped, first ran, and last
        registered after ``since`` (None: not since)."""

        def first(i: int, state: str) -> float | None:
            return next((t for t, s in self.changed[i] if t >= since and s == state), None)

        def stopped(i: int) -> float | None:
            times = [t for t, s in self.changed[i] if t >= since and s != RUNNING]
            return min(times) if times else None

        n = len(self.agents)
        return {
            "counts": {s: self.state.count(s) for s in (RUNNING, HALTED, LOST)},
            "stopped": [stopped(i) for i in range(n)],
            "halted": [first(i, HALTED) for i in range(n)],
            "ran": [first(i, RUNNING) for i in range(n)],
            "granted": [next((t for t in self.grants[i] if t >= since), None) for i in range(n)],
        }


async def _serve() -> None:
    fleet, loop = Fleet(), asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "start":
            answer = await fleet.start(**cmd)
        elif op == "freeze":
            answer = fleet.freeze()
        else:
            answer = fleet.status(**cmd)
        print(json.dumps(answer), flush=True)


class FleetProcess:
    """The test's side: start the child, send commands, read answers; killed on close."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the fleet process exited with {self.proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def start(self, n: int, targets: list[str], tenant: str, period: float = 0.1) -> dict[str, Any]:
        return self.ask("start", n=n, targets=targets, tenant=tenant, period=period)

    def status(self, since: float = 0.0) -> dict[str, Any]:
        return self.ask("status", since=since)

    def freeze(self) -> dict[str, int]:
        """Stop reporting checkpoints; the last step each run reported."""
        last: dict[str, int] = self.ask("freeze")["last"]
        return last

    def close(self) -> None:
        """SIGKILL: quick, and the tests' etcd is wiped after each test anyway."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    asyncio.run(_serve())
