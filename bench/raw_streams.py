"""Raw Heartbeat streams from the generated stub, with no SDK (``worker.py raw``).

Pre-serialised messages beat as fast as the coordinator acks, to find what one coordinator
sustains; or, registered and then silent, to measure memory per connected stream.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc

from bench.sdk_agents import OWN_CONNECTION


class RawFleet:
    """Heartbeat streams that beat as fast as the coordinator acks, to find saturation."""

    def __init__(self) -> None:
        self.acks = 0
        self.errors = 0
        self.registered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from tether.v1 import agent_pb2

        n, target, prefix = int(cmd["n"]), str(cmd["target"]), str(cmd["prefix"])
        per_channel = int(cmd.get("streams_per_channel", 25))
        beats = [
            agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=s)).SerializeToString()
            for s in range(1, 257)
        ]
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for i in range(len(self._tasks), len(self._tasks) + n):
            if i % per_channel == 0:
                self._channels.append(grpc.aio.insecure_channel(target, options=OWN_CONNECTION))
            method = self._channels[-1].stream_stream("/tether.v1.AgentService/Heartbeat")
            name = f"{prefix}{i}"
            register = agent_pb2.HeartbeatRequest(
                register=agent_pb2.Register(
                    tenant="raw", agent="beater", run_id=f"run-{name}", instance_id=name
                )
            ).SerializeToString()
            fut: asyncio.Future[None] = loop.create_future()
            ready.append(fut)
            idle = bool(cmd.get("idle", False))
            self._tasks.append(
                asyncio.create_task(self._beat(method, register, beats, fut, idle=idle))
            )
        await asyncio.wait(ready, timeout=float(cmd.get("timeout", 60)))
        return {"streams": len(self._tasks), "registered": self.registered}

    async def _beat(
        self, method: Any, register: bytes, beats: list[bytes], ready: Any, *, idle: bool
    ) -> None:
        try:
            call = method()
            await call.write(register)
            await call.read()
            self.registered += 1
            ready.set_result(None)
            if idle:  # registered and silent: only memory is being measured
                await call.read()
                return
            for beat in itertools.cycle(beats):  # ends when cancelled or the stream breaks
                await call.write(beat)
                if await call.read() is grpc.aio.EOF:
                    break
                self.acks += 1
        except grpc.RpcError:
            self.errors += 1
        finally:
            if not ready.done():
                ready.set_result(None)

    def stats(self) -> dict[str, Any]:
        return {
            "acks": self.acks,
            "errors": self.errors,
            "streams": len(self._tasks),
            "registered": self.registered,
        }
