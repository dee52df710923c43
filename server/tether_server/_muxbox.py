"""What a Multiplex stream writes: one writer per stream, one port per instance on it.

A port looks to the rest of the coordinator (presence, fan-out, permits, silence) like a
Heartbeat stream's :class:`~tether_server._outbox.Outbox`; what it is given goes to the
stream's :class:`MuxWriter`. The writer gathers what was posted while it was busy, or in the
same loop turn, into ONE ``MuxResponse``: replies whose ``HeartbeatResponse`` bytes are equal
share one ``MuxReply`` listing all their locals. So a kill pushed to 1,000 instances of one
stream goes out as one message, built by hand from the order serialised once (protobuf
parses concatenated fields as one message, as in ``_orders.with_ack``). A push that goes
alone (a one-instance stream's kill) is bytes built once per (order, local) (:func:`alone`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from tether_server._orders import Push
from tether_server._outbox import End, ends_stream

_HELD = object()  # a writer that is not a task: the reader writing a bare ack
# Bytes a MuxResponse grows to before the rest waits for the next: well under the 4 MiB
# that gRPC clients receive by default, however many registrations complete together.
MAX_BATCH = 1 << 20
_SMALL = tuple(bytes([n]) for n in range(128))


class StreamGone(Exception):
    """The instance's stream, or the instance itself, ended before its grant was written."""


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + varint(len(body)) + body


def end_bytes(end: End) -> bytes:
    """A serialised ``MuxEnd``."""
    code = end.code.value[0]
    head = b"\x08" + varint(code) if code else b""
    return head + (_field(b"\x12", end.details.encode()) if end.details else b"")


def reply_bytes(locals_: Iterable[int], what: bytes | End) -> bytes:
    """One ``MuxReply`` as a ``MuxResponse.replies`` field: ``what`` is a serialised
    ``HeartbeatResponse`` (the reply) or an :class:`End` (the instances' end)."""
    body = _field(b"\x0a", b"".join(map(varint, locals_)))
    if isinstance(what, End):
        body += _field(b"\x1a", end_bytes(what))
    else:
        body += _field(b"\x12", what)
    return _field(b"\x12", body)


def response_bytes(ack_seq: int, replies: Iterable[bytes]) -> bytes:
    """A serialised ``MuxResponse``."""
    head = b"\x08" + varint(ack_seq) if ack_seq else b""
    return head + b"".join(replies)


def _payload(item: Any) -> bytes | End:
    if isinstance(item, End):
        return item
    if isinstance(item, Push):
        return item.payload
    return item if isinstance(item, bytes) else bytes(item.SerializeToString())


_ALONE: dict[tuple[bytes, int], bytes] = {}  # (order, local) -> its MuxResponse
_ALONE_MOST = 256  # distinct pairs kept; pushes of one halt need a handful


def alone(payload: bytes, local: int) -> bytes:
    """A ``MuxResponse`` carrying ``payload`` to ``local`` alone, built once per distinct
    pair: a kill pushed to a thousand one-instance streams (local 1 on each) is built once."""
    key = (payload, local)
    found = _ALONE.get(key)
    if found is None:
        if len(_ALONE) >= _ALONE_MOST:
            _ALONE.clear()
        found = _ALONE[key] = response_bytes(0, (reply_bytes((local,), payload),))
    return found


class MuxWriter:
    """Writes one Multiplex stream; at most one write is in flight. Also the stream's clock:
    ``at`` is its last beat, which every instance on it reads as its own."""

    __slots__ = ("_ack", "_closing", "_context", "_items", "_on_push", "_writer", "at", "closed")

    def __init__(self, context: Any, on_push: Callable[[float], None]) -> None:
        self._context = context
        self._items: deque[tuple[int, Any]] = deque()
        self._on_push = on_push  # told how long each push took from its watch event
        self._writer: Any = None
        self._ack = 0  # the beat to confirm with the next message; 0: none
        self._closing: End | None = None  # the stream's end, after what is queued
        self.at = time.monotonic()
        self.closed = False  # the stream ended: what is posted now is dropped

    def post(self, local: int, item: Any) -> None:
        """Queue ``item`` (a reply, a Push or an End) for instance ``local``."""
        if not self.closed:
            self._items.append((local, item))
            self._wake()

    def end(self, end: End) -> None:
        """End the whole stream once what is queued (and what joins it now) is written."""
        if self._closing is None and not self.closed:
            self._closing = end
            self._wake()

    async def beat(self, seq: int) -> None:
        """Confirm beat ``seq``: a bare ack at once when nothing is pending, else with it."""
        if self.closed:
            return
        self._ack = seq
        if self._writer is not None or self._items or self._closing is not None:
            self._wake()
            return
        self._writer = _HELD
        self._ack = 0
        try:
            await self._context.write(response_bytes(seq, ()))
        finally:
            self._writer = None
            if self._items or self._ack or self._closing is not None:
                self._wake()

    async def close(self) -> None:
        """Wait until what is queued has been written (or the stream has ended)."""
        writer = self._writer
        if isinstance(writer, asyncio.Task):
            await asyncio.gather(writer, return_exceptions=True)

    def _wake(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._items or self._ack:
                message, pushed = self._batch()
                await self._context.write(message)
                if pushed:
                    now = time.monotonic()
                    for since in pushed:
                        self._on_push(now - since)
            if (end := self._closing) is not None:
                self.closed = True
                if end.code != grpc.StatusCode.OK:
                    await self._context.abort(end.code, end.details)
        except Exception:  # the stream is gone; its reader lets its instances go
            self.closed = True
        finally:
            if self.closed:
                self._items.clear()
            self._writer = None

    def _batch(self) -> tuple[bytes, list[float]]:
        """One MuxResponse from the head of the queue, of about MAX_BATCH bytes at most.

        An instance appears in it at most once, so replies that share bytes can share a
        MuxReply without reordering any instance's replies. The beat's ack goes with the
        message that empties the queue: it confirms every order posted before it.
        """
        items = self._items
        if len(items) == 1 and not self._ack and type(push := items[0][1]) is Push:
            return alone(push.payload, items.popleft()[0]), [push.since]  # a push alone
        groups: dict[bytes | End, list[int]] = {}
        seen: set[int] = set()
        pushed: list[float] = []
        size = 0
        while items and items[0][0] not in seen and size < MAX_BATCH:
            local, item = items.popleft()
            seen.add(local)
            what = _payload(item)
            if (group := groups.get(what)) is None:
                group = groups[what] = []
                size += len(what) if isinstance(what, bytes) else len(what.details)
            group.append(local)
            size += 4
            if isinstance(item, Push):
                pushed.append(item.since)
        ack = 0
        if not items:
            ack, self._ack = self._ack, 0
        replies = (reply_bytes(locals_, what) for what, locals_ in groups.items())
        return response_bytes(ack, replies), pushed


class MuxPort:
    """One instance's side of a Multiplex stream: an Outbox to the rest of the coordinator.

    An End posted here (replaced by a newer stream) ends this instance alone, unless it ends
    the stream itself (silence, lost etcd, shutdown: UNAVAILABLE).
    """

    __slots__ = ("_on_end", "_writer", "ended", "local")

    def __init__(self, writer: MuxWriter, local: int, on_end: Callable[[MuxPort, End], None]):
        self._writer = writer
        self._on_end = on_end  # the stream's reader lets go of the instance
        self.local = local
        self.ended = False

    @property
    def shared(self) -> MuxWriter:
        """The stream's writer, shared by every instance on the stream."""
        return self._writer

    def post(self, item: Any) -> None:
        if self.ended:
            return
        if isinstance(item, End):
            if ends_stream(item):
                self._writer.end(item)
            else:
                self._on_end(self, item)
            return
        self._writer.post(self.local, item)

    def finish(self, end: End) -> None:
        """Write this instance's end; what is posted to it afterwards is dropped."""
        if not self.ended:
            self.ended = True
            self._writer.post(self.local, end)

    async def first(self, message: Any) -> None:
        """Queue the grant, unless the instance or its stream has ended meanwhile."""
        if self.ended or self._writer.closed:
            raise StreamGone(f"instance {self.local} ended before its grant")
        self._writer.post(self.local, message)

    async def send(self, message: Any) -> None:
        self.post(message)

    async def close(self) -> None:
        """Nothing to wait for: the stream's reader waits for its writer."""
