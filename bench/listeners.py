"""The floors' clients: raw streams that register and then wait for pushed orders.

``worker.py listen``. Each stream registers with a pre-serialised message and then only
reads. With ``tasks`` 0, a stream's arrival is the moment the first order after ``arm``
reaches it. With ``tasks`` N, the stream holds N asyncio tasks, each awaiting a long sleep;
an order cancels all N, and each task's arrival is the moment its cancellation ran: the
same shape as a multiplexed stream whose SDK cancels every run's gated work.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from bench.sdk_agents import OWN_CONNECTION

Handler = Any


_OPEN_ATTEMPTS = 5


class ListenFleet:
    """Streams that wait for orders, and when each order (or cancellation) arrived."""

    def __init__(self) -> None:
        self.registered = 0
        self.errors = 0
        self.tasks = 0  # held tasks per stream
        self.arrived: list[float | None] = []  # one slot per stream, or per held task
        self.count = 0  # slots arrived since arm
        self.work: list[list[asyncio.Task[None]]] = []
        self._streams: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []
        self._opening = asyncio.Semaphore(256)  # registrations in flight at once

    def commands(self) -> dict[str, Handler]:
        return {"add": self.add, "arm": self.arm, "wait": self.wait}

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from tether.v1 import agent_pb2

        n, target, prefix = int(cmd["n"]), str(cmd["target"]), str(cmd["prefix"])
        per_channel, self.tasks = int(cmd.get("streams_per_channel", 1)), int(cmd.get("tasks", 0))
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[None]] = []
        for i in range(len(self._streams), len(self._streams) + n):
            if i % per_channel == 0:
                self._channels.append(grpc.aio.insecure_channel(target, options=OWN_CONNECTION))
            method = self._channels[-1].stream_stream("/tether.v1.AgentService/Heartbeat")
            register = agent_pb2.HeartbeatRequest(
                register=agent_pb2.Register(
                    tenant="bench", agent="floor", run_id=f"run-{prefix}{i}", instance_id=f"{i}"
                )
            ).SerializeToString()
            fut: asyncio.Future[None] = loop.create_future()
            ready.append(fut)
            self.work.append([])
            self._streams.append(asyncio.create_task(self._listen(i, method, register, fut)))
        self.arrived += [None] * (n * max(self.tasks, 1))
        await asyncio.wait(ready, timeout=float(cmd.get("timeout", 60)))
        await self.arm({})
        return {"streams": len(self._streams), "registered": self.registered}

    async def _open(self, method: Any, register: bytes) -> Any:
        """A registered stream. Thousands opened at once overflow the server's listen
        backlog (5,000 at once left hundreds refused): a few hundred at a time, retried."""
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                async with self._opening:
                    call = method()
                    await call.write(register)
                    await call.read()
                return call
            except grpc.RpcError:
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _listen(self, i: int, method: Any, register: bytes, ready: Any) -> None:
        try:
            call = await self._open(method, register)
            self.registered += 1
            ready.set_result(None)
            while (msg := await call.read()) is not grpc.aio.EOF:
                del msg
                now = time.monotonic()
                if not self.tasks:
                    self._arrive(i, now)
                for task in self.work[i]:
                    task.cancel()
        except grpc.RpcError:
            self.errors += 1
        finally:
            if not ready.done():
                ready.set_result(None)

    async def _hold(self, slot: int) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self._arrive(slot, time.monotonic())

    def _arrive(self, slot: int, now: float) -> None:
        if self.arrived[slot] is None:
            self.arrived[slot] = now
            self.count += 1

    async def arm(self, _: dict[str, Any]) -> dict[str, Any]:
        """Forget the last arrivals; with ``tasks``, start every stream's tasks afresh."""
        stale = [task for held in self.work for task in held]
        for task in stale:
            task.cancel()
        await asyncio.gather(*stale)
        self.arrived, self.count = [None] * len(self.arrived), 0
        if self.tasks:
            for i in range(len(self._streams)):
                self.work[i] = [
                    asyncio.create_task(self._hold(i * self.tasks + k)) for k in range(self.tasks)
                ]
            await asyncio.sleep(0)  # every task is waiting before the order can come
        return {"armed": len(self.arrived)}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every slot has arrived, at most ``timeout``; answer as ``Arrivals``."""
        deadline = time.monotonic() + float(cmd["timeout"])
        while time.monotonic() < deadline:
            if self.count >= len(self.arrived):
                break
            await asyncio.sleep(0.005)
        times = [t for t in self.arrived if t is not None]
        return {"times": times, "missing": len(self.arrived) - len(times)}

    def stats(self) -> dict[str, Any]:
        return {"registered": self.registered, "errors": self.errors, "streams": len(self._streams)}
