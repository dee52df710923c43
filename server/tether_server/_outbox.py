"""What a Heartbeat stream writes, and the one writer at a time that writes it.

A gRPC stream takes one write at a time. The reader writes a heartbeat's ack itself, at
once, when nothing else is writing: no queue, no second task, no wake-up per beat. Pushes
(kills, resumes, permit decisions, the end of the stream) arrive from elsewhere; they queue,
and a short-lived task writes them in order, then exits. A coordinator holding thousands
of idle streams thus holds one task per stream, not two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from tether_server._orders import Push


@dataclass(frozen=True, slots=True)
class End:
    """End the stream: OK after what is queued, any other code by aborting it."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


DONE = End()


def ends_stream(end: End) -> bool:
    """An End that lets go of the whole stream, not one instance on it: silence, lost etcd
    or shutdown (UNAVAILABLE: reconnect, preferably elsewhere)."""
    return end.code == grpc.StatusCode.UNAVAILABLE


class Mailbox(Protocol):
    """What the coordinator writes one session's replies through: an :class:`Outbox` (a
    Heartbeat stream) or a Multiplex stream's port for one instance."""

    @property
    def shared(self) -> Any:
        """The object that writes to the wire: sessions with the same one share a stream."""

    def post(self, item: Any) -> None: ...

    async def first(self, message: Any) -> None: ...

    async def send(self, message: Any) -> None: ...

    async def close(self) -> None: ...


_HELD = object()  # a writer that is not a task: the reader, or the opener writing the grant


class Outbox:
    """Orders a stream's writes; at most one is in flight."""

    __slots__ = ("_context", "_items", "_on_push", "_writer")

    def __init__(self, context: Any, on_push: Callable[[float], None]) -> None:
        self._context = context
        # A list, not a deque: it is short when used, and empty it takes 56 bytes, not 624.
        self._items: list[Any] = []
        self._on_push = on_push  # told how long each push took from its watch event
        self._writer: Any = _HELD  # the grant goes first; see first()

    @property
    def shared(self) -> Outbox:
        """The writer of this stream: the Outbox itself (a Heartbeat stream has one session)."""
        return self

    def post(self, item: Any) -> None:
        """Queue ``item``; a writer task starts unless a writer is already at work."""
        self._items.append(item)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def first(self, message: Any) -> None:
        """Write the grant; what was posted meanwhile follows it."""
        try:
            await self._context.write(message)
        finally:
            self._release()

    async def send(self, message: Any) -> None:
        """Write ``message`` from the calling task if the stream is free, else queue it."""
        if self._writer is not None or self._items:
            self.post(message)
            return
        self._writer = _HELD
        try:
            await self._context.write(message)
        finally:
            self._release()

    async def close(self) -> None:
        """Wait until what is queued has been written (or the stream has ended)."""
        writer = self._writer
        if isinstance(writer, asyncio.Task):
            await asyncio.gather(writer, return_exceptions=True)

    def _release(self) -> None:
        self._writer = None
        if self._items:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        context = self._context
        try:
            while self._items:
                item = self._items.pop(0)
                if isinstance(item, End):
                    self._items.clear()
                    if item.code != grpc.StatusCode.OK:
                        await context.abort(item.code, item.details)
                    return
                if isinstance(item, Push):
                    await context.write(item.payload)
                    self._on_push(time.monotonic() - item.since)
                else:
                    await context.write(item)
        except Exception:  # the stream is gone; its reader ends the session
            self._items.clear()
        finally:
            self._writer = None
