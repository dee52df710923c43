"""A bare grpc.aio server with Tether's Heartbeat method and nothing behind it.

Run as ``python -m bench.bare_server HOST:PORT``. Every message gets an empty reply. Same
server options and handler wiring as ``tether serve``. It is the memory floor: what gRPC
itself holds for one connected stream, measured side by side with the coordinator.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tether_server._server import SERVER_OPTIONS, agent_handler


async def _heartbeat(requests: AsyncIterator[Any], context: Any) -> None:
    async for _ in requests:
        await context.write(b"")


async def main(listen: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((agent_handler(_heartbeat),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
