"""A TCP fault proxy on loopback: forwards one port to a target, and breaks the link on demand.

- ``pause()``: a blackhole. Every socket stays open and nothing is forwarded either way;
  new connections are accepted and held. ``resume()`` delivers what waited, as a healed
  link would after TCP retransmits.
- ``cut()``: every open connection is reset; new ones are forwarded.
- ``delay(seconds)``: each chunk is forwarded that much later, in each direction, without
  slowing the throughput.

It runs an asyncio loop in a daemon thread of the test process; every method is called from
the test's thread and returns once the loop has applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


class Proxy:
    """Forwards ``LOOPBACK:port`` to ``target`` (``HOST:PORT``)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._flowing = asyncio.Event()
        self._delay = 0.0
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def addr(self) -> str:
        """``HOST:PORT`` to dial instead of the target."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, as ``tether serve --etcd`` takes it."""
        return f"http://{self.addr}"

    def start(self) -> Self:
        self._thread.start()
        self._server = self._run(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        """Reset every link, stop listening, and end the loop's thread."""
        self._run(self._shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def pause(self) -> None:
        """Hold every byte, keeping every socket open."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Forward again, what was held first."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def delay(self, seconds: float) -> None:
        """Forward each chunk ``seconds`` after it arrived (0: at once)."""
        self._delay = seconds

    def cut(self) -> None:
        """Reset every open connection."""
        self._run(self._cut())

    # -- on the proxy's loop --------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> asyncio.Server:
        self._flowing.set()
        return await asyncio.start_server(self._link, LOOPBACK, 0)

    async def _cut(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()

    async def _shut(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
        # A paused link still waits to forward: end it here, not when the stopped loop is freed.
        links = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)

    async def _link(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self._links.add(down_w)
        try:
            await self._flowing.wait()  # a blackhole holds the connection before it reaches
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            down_w.transport.abort()
            self._links.discard(down_w)
            return
        self._links.add(up_w)
        try:
            await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
        finally:
            for writer in (down_w, up_w):
                writer.transport.abort()
                self._links.discard(writer)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read ``src`` as it comes; write each chunk to ``dst`` when it is due and flowing."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst))
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    queue.put_nowait((loop.time() + self._delay, data))
            queue.put_nowait((0.0, b""))  # end of stream, after what is queued
            await sender
        finally:
            sender.cancel()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                due, data = await queue.get()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                await asyncio.sleep(max(due - loop.time(), 0))
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
