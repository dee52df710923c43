"""Real ``tether.AsyncAgent`` instances for a load generator (``worker.py sdk``).

Each agent has a TCP connection and a stream of its own, as if it ran in its own process:
gRPC pools subchannels process-wide, so the agents' channels ask for a local subchannel pool,
and the SDK shares one stream among a process's agents with the same settings (i13-cmux), so
each agent's channel options carry its own index as well (``own_stream``). Each
agent's ``on_reply`` hook timestamps, with ``time.monotonic()``, the reply that first made
its verdict halted (or running again, or lost); every process on this machine reads the
same clock, so the harness compares these times with the moment it issued the Kill.
Given ``tls_ca``, ``tls_cert`` and ``tls_key`` in the ``add`` command, each agent connects
with mutual TLS: its own connection, so its own handshake.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import tether

from bench.marks import HALTED, LOST, RUNNING, Transitions
from bench.tls import TENANT

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def own_stream(i: int) -> tuple[tuple[str, int], ...]:
    """Channel options that give agent ``i`` a connection and a stream no other agent shares."""
    return (*OWN_CONNECTION, ("tether.bench.agent", i))


def state_of(verdict: tether.Verdict) -> int:
    """RUNNING, HALTED, or LOST (``TetherLost``: failed closed) for a verdict."""
    if verdict.stop is None:
        return RUNNING
    return LOST if isinstance(verdict.stop, tether.TetherLost) else HALTED


class SdkFleet:
    """The generator's agents, their transitions, and their gated actions."""

    def __init__(self) -> None:
        self.agents: list[tether.AsyncAgent] = []
        self.marks = Transitions()
        self.replies = 0
        self.grants = 0
        self.failed = 0
        self._reporter: asyncio.Task[None] | None = None
        self._actor: asyncio.Task[None] | None = None
        self.actions: list[tuple[float, int]] = []  # (when, agent) of gated effects since arm
        self.refused = 0
        self._pending: set[asyncio.Task[None]] = set()
        self.lost_at: list[float | None] = []
        self._lost_watch: asyncio.Task[None] | None = None

    def _observer(self, idx: int) -> Callable[[tether.Verdict, bool], None]:
        """Agent ``idx``'s ``on_reply``: count the reply and mark any change of state."""

        def on_reply(verdict: tether.Verdict, granted: bool) -> None:
            now = time.monotonic()
            self.replies += 1
            state = state_of(verdict)
            self.marks.observe(idx, state, now)
            if granted:  # the agent (re)registered
                self.grants += 1
                self.marks.granted[idx] = (now, state)

        return on_reply

    def _agent(self, cmd: dict[str, Any], i: int) -> tether.AsyncAgent:
        targets, name = list(cmd["targets"]), f"{cmd['prefix']}{i}"
        tenant, agents_per_tenant = str(cmd.get("tenant", TENANT)), int(cmd.get("kinds", 16))
        config = tether.AgentConfig(
            # "all_targets": every agent is given every address, in this order (failover)
            targets=tuple(targets) if cmd.get("all_targets") else (targets[i % len(targets)],),
            connect_timeout=float(cmd.get("connect_timeout", 60)),
            channel_options=own_stream(i),
            on_reply=self._observer(self.marks.add()),
            tls_ca=cmd.get("tls_ca"),
            tls_cert=cmd.get("tls_cert"),
            tls_key=cmd.get("tls_key"),
        )
        return tether.AsyncAgent(
            f"agent://{tenant}/agent-{i % agents_per_tenant}",
            run_id=f"run-{name}",
            instance_id=name,
            config=config,
        )

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Register ``n`` more agents; answer by ``deadline`` seconds even if some are pending."""
        n, gate = int(cmd["n"]), asyncio.Semaphore(int(cmd.get("concurrency", 32)))
        started, base = time.monotonic(), len(self.agents)
        registered = 0

        async def one(i: int) -> None:
            nonlocal registered
            agent = self._agent(cmd, i)
            self.agents.append(agent)
            async with gate:
                try:
                    await agent.start()
                    registered += 1
                except Exception:
                    self.failed += 1

        tasks = [asyncio.create_task(one(i)) for i in range(base, base + n)]
        self._pending.update(tasks)
        for task in tasks:
            task.add_done_callback(self._pending.discard)
        await asyncio.wait(tasks, timeout=float(cmd.get("deadline", 120)))
        return {
            "count": len(self.agents),
            "registered": registered,
            "pending": len(self._pending),
            "failed": self.failed,
            "seconds": time.monotonic() - started,
            "ttl": self.agents[0].ttl if self.agents else None,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "replies": self.replies,
            "grants": self.grants,
            "agents": len(self.agents),
            "failed": self.failed,
            "lost": self.marks.lost,
            "running": self.marks.n_running,
        }

    async def checkpoints(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start reporting checkpoints from every agent: "same" value or "changing" each time."""
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        mode, period = str(cmd["mode"]), float(cmd.get("period", 0.2))
        if mode != "none":
            self._reporter = asyncio.create_task(self._report(mode, period))
        return {"mode": mode}

    async def _report(self, mode: str, period: float) -> None:
        for step in itertools.count(1):  # ends when cancelled
            for i, agent in enumerate(self.agents):
                value = step if mode == "changing" else 0
                agent.report({"agent": i, "step": value, "note": "benchmark checkpoint"})
            await asyncio.sleep(period)

    async def act(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start every agent acting every ``period`` s, each action gated by ``check()``."""
        if self._actor is None:
            self._actor = asyncio.create_task(self._act(float(cmd.get("period", 0.2))))
        return {"acting": len(self.agents)}

    async def _act(self, period: float, slices: int = 10) -> None:
        for tick in itertools.count():  # ends when cancelled
            for i in range(tick % slices, len(self.agents), slices):
                try:
                    self.agents[i].check()
                except tether.Killed:
                    self.refused += 1
                    continue
                if len(self.actions) < 1_000_000:
                    self.actions.append((time.monotonic(), i))
            await asyncio.sleep(period / slices)

    async def effects(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Gated actions after ``after`` (monotonic), and after each agent's own kill."""
        after = float(cmd["after"])
        late = [(t, i) for t, i in self.actions if t > after]
        killed_at = self.marks.killed_at
        past_own = sum(1 for t, i in late if (k := killed_at[i]) is not None and t >= k)
        return {"after": len(late), "after_own_kill": past_own, "refused": self.refused}

    def arm(self) -> None:
        self.marks.arm()
        self.actions = []

    async def failclosed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Poll ``agent.killed`` for every agent until all report killed, at most ``timeout``."""
        interval, timeout = float(cmd.get("interval", 0.005)), float(cmd["timeout"])
        first: list[float | None] = [None] * len(self.agents)
        killed_before = sum(1 for a in self.agents if a.killed)
        deadline = time.monotonic() + timeout
        remaining = len(self.agents)
        while remaining and time.monotonic() < deadline:
            now = time.monotonic()
            for i, agent in enumerate(self.agents):
                if first[i] is None and agent.killed:
                    first[i] = now
                    remaining -= 1
            await asyncio.sleep(interval)
        times = [t for t in first if t is not None]
        ttl = self.agents[0].ttl if self.agents else None
        return {"times": times, "missing": remaining, "killed_before": killed_before, "ttl": ttl}

    # -- failover (bench/phases/failover.py) --------------------------------------------------

    async def watch_lost(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start (afresh) noting when each agent's ``check()`` first raises ``TetherLost``.

        Polled every ``interval`` s: a fail-closed that the SDK's own TTL timer declares
        calls no ``on_reply``, so only ``check()`` shows it.
        """
        if self._lost_watch is not None:
            self._lost_watch.cancel()
        self.lost_at = [None] * len(self.agents)
        interval = float(cmd.get("interval", 0.005))
        self._lost_watch = asyncio.create_task(self._poll_lost(interval))
        return {"watching": len(self.agents)}

    async def _poll_lost(self, interval: float) -> None:
        while True:  # ends when cancelled by the next watch_lost
            now = time.monotonic()
            for i, agent in enumerate(self.agents):
                if self.lost_at[i] is None:
                    try:
                        agent.check()
                    except tether.TetherLost:
                        self.lost_at[i] = now
                    except tether.Killed:
                        pass
            await asyncio.sleep(interval)

    async def lost_seen(self, _: dict[str, Any]) -> dict[str, Any]:
        """When each agent first failed closed since ``watch_lost`` (only those that did)."""
        return {"times": [t for t in self.lost_at if t is not None]}

    async def regranted(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every agent registered again after ``since`` and runs, at most ``timeout``.

        Answers each such agent's moment of that registration (its ``on_reply`` stamp).
        """
        since, timeout = float(cmd["since"]), float(cmd["timeout"])
        marks, deadline = self.marks, time.monotonic() + timeout

        def back() -> list[float]:
            grants = [marks.granted.get(i) for i in range(len(self.agents))]
            return [g[0] for g in grants if g is not None and g[0] > since and g[1] == RUNNING]

        while time.monotonic() < deadline:
            if len(back()) == len(self.agents):
                break
            await asyncio.sleep(0.005)
        times = back()
        return {"times": times, "missing": len(self.agents) - len(times)}
