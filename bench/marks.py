"""Per-agent state in a load generator, and when each agent's state changed.

Shared by the SDK agents (bench/sdk_agents.py) and the pollers (bench/pollers.py): the
harness arms a round, then waits until every agent has turned halted (or running again).
"""

from __future__ import annotations

import asyncio
import time

from bench.fleet import Arrivals

RUNNING, HALTED, LOST = 0, 1, 2


class Transitions:
    """Per-agent state (running, halted, or lost: failed closed) and when it changed.

    A round is timed from ``arm()``: the first time each agent turns halted, or running.
    Turning lost (``TetherLost``: the coordinator failed closed, or the TTL lapsed) is
    counted on its own, because it is not the kill being measured.
    """

    def __init__(self) -> None:
        self.state: list[int] = []
        self.killed_at: list[float | None] = []
        self.running_at: list[float | None] = []
        self.n_halted = 0
        self.n_running = 0
        self.lost = 0
        self.granted: dict[int, tuple[float, int]] = {}  # agent -> (when, state) of last grant

    def add(self) -> int:
        self.state.append(-1)
        self.killed_at.append(None)
        self.running_at.append(None)
        return len(self.state) - 1

    def arm(self) -> None:
        n = len(self.state)
        self.killed_at = [None] * n
        self.running_at = [None] * n

    def observe(self, idx: int, state: int, now: float) -> None:
        before = self.state[idx]
        if state == before:
            return
        self.state[idx] = state
        self.n_halted += (state == HALTED) - (before == HALTED)
        self.n_running += (state == RUNNING) - (before == RUNNING)
        if state == HALTED and self.killed_at[idx] is None:
            self.killed_at[idx] = now
        elif state == RUNNING and self.running_at[idx] is None:
            self.running_at[idx] = now
        elif state == LOST:
            self.lost += 1

    async def wait(self, state: str, timeout: float) -> Arrivals:
        """Wait until every agent is ``state`` ("killed" or "running"), at most ``timeout``."""
        want_killed = state == "killed"
        deadline = time.monotonic() + timeout
        n = len(self.state)
        while time.monotonic() < deadline:
            if (self.n_halted if want_killed else self.n_running) == n:
                break
            await asyncio.sleep(0.005)
        stamps = self.killed_at if want_killed else self.running_at
        times = [t for t in stamps if t is not None]
        missing = [i for i, t in enumerate(stamps) if t is None]
        by_state = {"running": 0, "halted": 0, "lost": 0, "unregistered": 0}
        names = {RUNNING: "running", HALTED: "halted", LOST: "lost"}
        for i in missing:
            by_state[names.get(self.state[i], "unregistered")] += 1
        # For agents that never saw it: their last (re)registration and what it said.
        grants = [
            (self.granted[i][0], names[self.granted[i][1]]) for i in missing if i in self.granted
        ]
        return Arrivals(times, len(missing), by_state, grants[:5000])
