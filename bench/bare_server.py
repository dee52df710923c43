"""A bare grpc.aio server with Tether's Heartbeat method and nothing behind it: the floors.

Run as ``python -m bench.bare_server HOST:PORT [--broadcast]``. Same server options and
handler wiring as ``tether serve``, and every message gets one pre-serialised reply shaped
like the coordinator's ack (``ACK``). It is the floor three phases measure against:

- ``memory``: what gRPC itself holds for one connected stream;
- ``capacity``: what a bare echo costs per heartbeat (CPU per beat);
- ``stackfloor`` and ``killmux``: with ``--broadcast``, each line ``kill`` on stdin writes one
  pre-serialised stop order (``KILL``, shaped like Tether's) to every open stream, and the
  server answers ``sent N SECONDS`` on stdout once every write has returned.

The broadcast is the least a server can do: every stream's handler waits on one future,
and setting it wakes them all to write the same bytes; nothing is looked up or encoded.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tether.v1 import agent_pb2, types_pb2
from tether_server._server import SERVER_OPTIONS, agent_handler

ACK = agent_pb2.HeartbeatResponse(
    order=agent_pb2.ORDER_RUN, ack_seq=1, revision=1
).SerializeToString()
KILL = agent_pb2.HeartbeatResponse(
    order=agent_pb2.ORDER_STOP,
    revision=2,
    halts=[
        types_pb2.Halt(
            id="tenant/bench",
            selector=types_pb2.Selector(scope=types_pb2.SCOPE_TENANT, tenant="bench"),
            reason="benchmark kill round",
            actor="anonymous@127.0.0.1",
            revision=2,
        )
    ],
).SerializeToString()


class Broadcast:
    """The streams waiting for the next order, and the order that wakes them."""

    def __init__(self) -> None:
        self.next: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams = 0
        self.written = 0

    async def serve(self, requests: AsyncIterator[Any], context: Any) -> None:
        """Answer every message with ``ACK``; write ``KILL`` each time a broadcast fires."""
        reader = asyncio.ensure_future(_echo(requests, context))
        self.streams += 1
        try:
            while not reader.done():
                wake = self.next  # fire() swaps in the next one before it wakes this one
                await asyncio.wait([wake, reader], return_when=asyncio.FIRST_COMPLETED)
                if wake.done() and not reader.done():
                    await context.write(KILL)
                    self.written += 1
        finally:
            self.streams -= 1
            reader.cancel()

    async def fire(self) -> tuple[int, float]:
        """Wake every stream; return how many wrote and the seconds until they all had."""
        start, expected = time.monotonic(), self.streams
        self.written = 0
        wake, self.next = self.next, asyncio.get_running_loop().create_future()
        wake.set_result(None)
        while time.monotonic() - start < 60:
            if self.written >= expected:
                break
            await asyncio.sleep(0.0005)
        return self.written, time.monotonic() - start


async def _echo(requests: AsyncIterator[Any], context: Any) -> None:
    async for _ in requests:
        await context.write(ACK)


async def _commands(broadcast: Broadcast) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"kill":
            written, seconds = await broadcast.fire()
            print(f"sent {written} {seconds:.6f}", flush=True)


async def main(listen: str, *, broadcast: bool) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    fanout = Broadcast()
    handler = fanout.serve if broadcast else _echo
    server.add_generic_rpc_handlers((agent_handler(handler),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    print("serving", flush=True)
    if broadcast:
        await _commands(fanout)
        await server.stop(0)
    else:
        await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], broadcast="--broadcast" in sys.argv[2:]))
