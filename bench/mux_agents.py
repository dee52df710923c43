"""Runs that share their process's connection, each holding gated asyncio work (``worker.py mux``).

The killmux phase's agents: real ``tether.AsyncAgent`` instances written against the public
SDK API only, with no channel options of their own, so they share whatever the SDK shares
(one Multiplex stream per process and target since the i13-cmux change; before it, one
Heartbeat stream each over one TCP connection). Every run holds one piece of gated work,
``async with agent.effect("work")`` around a long ``await``; a kill cancels it, and the
arrival is the moment that cancellation reaches the run's code.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import tether

from bench.channelz import open_streams

Handler = Any


class MuxFleet:
    """The process's runs, their held work, and when a kill cancelled it."""

    def __init__(self) -> None:
        self.agents: list[tether.AsyncAgent] = []
        self.failed = 0
        self.refused = 0  # work the gate refused to start (the run was stopped)
        self.cancelled_at: list[float | None] = []
        self.count = 0  # cancellations since arm
        self.work: list[asyncio.Task[None] | None] = []
        self.armed: list[bool] = []  # whose work was in flight when the round was armed

    def commands(self) -> dict[str, Handler]:
        return {
            "add": self.add, "hold": self.hold, "arm": self.arm, "wait": self.wait,
            "streams": self.streams,
        }  # fmt: skip

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Register ``n`` more runs; answer by ``deadline`` seconds even if some are pending."""
        n, gate = int(cmd["n"]), asyncio.Semaphore(int(cmd.get("concurrency", 64)))
        tenant, target, prefix = str(cmd["tenant"]), str(cmd["target"]), str(cmd["prefix"])
        started, base = time.monotonic(), len(self.agents)

        async def one(i: int) -> None:
            agent = tether.AsyncAgent(
                f"agent://{tenant}/agent-{i % 16}", run_id=f"run-{prefix}{i}",
                instance_id=f"{prefix}{i}", target=target,
            )  # fmt: skip
            self.agents.append(agent)
            self.cancelled_at.append(None)
            self.work.append(None)
            async with gate:
                try:
                    await agent.start()
                except Exception:
                    self.failed += 1

        tasks = [asyncio.create_task(one(i)) for i in range(base, base + n)]
        _, pending = await asyncio.wait(tasks, timeout=float(cmd.get("deadline", 120)))
        return {
            "count": len(self.agents), "failed": self.failed, "pending": len(pending),
            "seconds": round(time.monotonic() - started, 2),
        }  # fmt: skip

    async def _work(self, i: int, inside: asyncio.Event) -> None:
        try:
            async with self.agents[i].effect("work"):
                inside.set()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:  # the work is cancelled: the moment measured
                    if self.cancelled_at[i] is None:
                        self.cancelled_at[i] = time.monotonic()
                        self.count += 1
                    raise  # the gate's own exit (its ledger record) comes after
        except asyncio.CancelledError:
            pass
        except tether.TetherError:
            self.refused += 1

    async def hold(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Once every run may run again, start each one's gated work and wait until it holds."""
        deadline = time.monotonic() + float(cmd.get("timeout", 60))
        while time.monotonic() < deadline:
            if all(_runs(a) for a in self.agents):
                break
            await asyncio.sleep(0.01)
        entered = []
        for i, agent in enumerate(self.agents):
            task = self.work[i]
            if (task is None or task.done()) and _runs(agent):
                inside = asyncio.Event()
                self.work[i] = asyncio.create_task(self._work(i, inside))
                entered.append(asyncio.create_task(inside.wait()))
        if entered:
            await asyncio.wait(entered, timeout=max(deadline - time.monotonic(), 1))
        held = sum(1 for t in self.work if t is not None and not t.done())
        return {"held": held, "runs": len(self.agents), "refused": self.refused}

    async def arm(self, _: dict[str, Any]) -> dict[str, Any]:
        """Start a round: forget the last one's cancellations, and note which runs hold work
        now (a run whose work ended since ``hold``, say because its stream failed closed, has
        none for the kill to cancel; ``wait`` reports it apart)."""
        self.armed = [t is not None and not t.done() for t in self.work]
        self.cancelled_at, self.count = [None] * len(self.agents), 0
        return {"armed": sum(self.armed), "idle": len(self.agents) - sum(self.armed)}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until the work of every run armed with work was cancelled, at most ``timeout``.

        ``missing`` counts armed runs whose work was not cancelled; of them, ``missing_stopped``
        are runs whose SDK holds a stop all the same. ``idle`` runs held no work when armed;
        ``idle_running`` of them still run after the wait: the kill did not reach them either.
        """
        deadline, armed = time.monotonic() + float(cmd["timeout"]), sum(self.armed)
        idle = [i for i, held in enumerate(self.armed) if not held]
        while time.monotonic() < deadline:
            if self.count >= armed and not any(_runs(self.agents[i]) for i in idle):
                break
            await asyncio.sleep(0.005)
        times = [t for t in self.cancelled_at if t is not None]
        left = [i for i, t in enumerate(self.cancelled_at) if t is None and self.armed[i]]
        return {
            "times": times, "missing": len(left),
            "missing_stopped": sum(1 for i in left if not _runs(self.agents[i])),
            "idle": len(idle), "idle_running": sum(1 for i in idle if _runs(self.agents[i])),
        }  # fmt: skip

    async def streams(self, _: dict[str, Any]) -> dict[str, Any]:
        connections, streams = open_streams()
        return {"connections": connections, "streams": streams}

    def stats(self) -> dict[str, Any]:
        return {"agents": len(self.agents), "failed": self.failed, "refused": self.refused}


def _runs(agent: tether.AsyncAgent) -> bool:
    try:
        agent.check()
    except tether.TetherError:
        return False
    return True
