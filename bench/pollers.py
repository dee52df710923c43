"""The do-it-yourself baseline's agents: each polls a kill key in etcd (``worker.py poll``)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc

from bench.marks import HALTED, RUNNING, Transitions
from bench.sdk_agents import OWN_CONNECTION


class PollFleet:
    """Agents that each poll an etcd key: every ``interval`` seconds and before each action."""

    def __init__(self) -> None:
        self.marks = Transitions()
        self.requests = 0
        self.errors = 0
        self.late = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from aetcd import rpc

        n, endpoint, key = int(cmd["n"]), str(cmd["endpoint"]), str(cmd["key"]).encode()
        interval, action = float(cmd.get("interval", 0.1)), float(cmd.get("action_every", 1.0))
        if not self._channels:
            self._channels = [
                grpc.aio.insecure_channel(endpoint, options=OWN_CONNECTION)
                for _ in range(int(cmd.get("channels", 16)))
            ]
        stubs = [rpc.KVStub(c) for c in self._channels]
        request = rpc.RangeRequest(key=key)
        for _ in range(n):
            idx = self.marks.add()
            stub = stubs[idx % len(stubs)]
            task = asyncio.create_task(self._poll(idx, stub, request, interval, action))
            self._tasks.append(task)
        return {"count": len(self._tasks)}

    async def _poll(
        self, idx: int, stub: Any, request: Any, interval: float, action: float
    ) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random() * interval)  # spread the fleet's phase
        next_poll = next_action = loop.time()
        next_action += random.random() * action
        while True:  # ends when cancelled
            now = loop.time()
            if now >= next_action:  # "before each action": one more Range
                next_action += action
            await self._range(idx, stub, request)
            next_poll += interval
            now = loop.time()
            if next_poll < now:  # behind schedule: skip, do not burst
                self.late += 1
                next_poll = now + interval
            if next_action < next_poll:
                await asyncio.sleep(max(next_action - now, 0))
                await self._range(idx, stub, request)
                next_action += action
                now = loop.time()
            await asyncio.sleep(max(next_poll - now, 0))

    async def _range(self, idx: int, stub: Any, request: Any) -> None:
        self.requests += 1
        try:
            resp = await stub.Range(request, timeout=5)
        except grpc.RpcError:
            self.errors += 1
            return
        self.marks.observe(idx, HALTED if resp.kvs else RUNNING, time.monotonic())

    def arm(self) -> None:
        self.marks.arm()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "late": self.late,
            "agents": len(self._tasks),
        }
