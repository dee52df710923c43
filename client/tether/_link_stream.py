"""One ``Multiplex`` stream of a link, what its beats confirm, and the loop sync agents share.

A ``Stream`` is the state every instance registered on it reads in ``check()``: one float,
``confirmed_at``, moved forward by each ack. An instance holds the stream it was granted on;
when that stream is gone its confirmations stop, so the instance fails closed within its TTL
unless a new stream grants it again.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from typing import Any

import grpc

from tether._errors import TetherError, from_rpc_error
from tether.v1 import agent_pb2

_BEATS_KEPT = 64  # beats awaiting their ack before old ones are forgotten
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Stream:
    """One open ``Multiplex`` call and the beats sent on it that await their ack."""

    __slots__ = ("_sent", "_seq", "beating", "broken", "call", "confirmed_at")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.broken: BaseException | None = None  # why this side ended the call, if it did
        self.confirmed_at = 0.0  # time.monotonic() when the newest acked beat was sent
        self.beating = False  # beats start with the first grant on the stream
        self._sent: deque[tuple[int, float]] = deque()  # (seq, when sent), oldest first
        self._seq = 0

    def beat(self, now: float) -> int:
        """The seq of a beat sent ``now``."""
        self._seq += 1
        self._sent.append((self._seq, now))
        if len(self._sent) > _BEATS_KEPT:  # acks that never came: forget the oldest
            self._sent.popleft()
        return self._seq

    def confirm(self, seq: int) -> float | None:
        """The ack of beat ``seq``: when that beat was sent, or None if it is unknown.

        Acks come in order, so the beats sent before it will never be acked.
        """
        sent = self._sent
        while sent and sent[0][0] < seq:
            sent.popleft()
        if not sent or sent[0][0] != seq:
            return None
        at = sent.popleft()[1]
        self.confirmed_at = max(self.confirmed_at, at)
        return at


DEAD = Stream(None)
"""The stream of an instance not registered on any: it confirms nothing."""


def status_error(code: int, message: str) -> TetherError:
    """The SDK's error for a gRPC status given as a number, as in ``MuxEnd``."""
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    metadata = grpc.aio.Metadata()
    return from_rpc_error(grpc.aio.AioRpcError(status, metadata, metadata, details=message))


async def eof_error(call: Any) -> grpc.RpcError:
    """The stream ended unasked; surface the coordinator's status as the error."""
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        code, details = grpc.StatusCode.UNAVAILABLE, "coordinator closed the stream"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


MOST_BYTES = 1 << 20  # a request's size: far under the coordinator's 4 MiB message limit


def chunks(request: agent_pb2.MuxRequest, most: int) -> list[agent_pb2.MuxRequest]:
    """``request`` as requests of at most ``most`` frames and about ``MOST_BYTES`` (one
    frame, at most a checkpoint's limit, may go over alone); the beat goes with the last."""
    frames = request.frames
    if len(frames) <= most and request.ByteSize() <= MOST_BYTES:
        return [request]
    parts = [agent_pb2.MuxRequest()]
    size = 0
    for frame in frames:
        grows = frame.ByteSize() + 8  # the frame's tag and length
        if parts[-1].frames and (len(parts[-1].frames) >= most or size + grows > MOST_BYTES):
            parts.append(agent_pb2.MuxRequest())
            size = 0
        parts[-1].frames.append(frame)
        size += grows
    parts[-1].seq = request.seq
    return parts


class SharedLoop:
    """The one daemon event loop that every sync ``Agent`` of the process runs on.

    Started with the first agent and stopped with the last, so that sync agents share
    links as asyncio agents of one loop do.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._users = 0

    def refuse_on_loop(self, what: str) -> None:
        """Raise if called on the shared loop's thread, where blocking on it deadlocks it.

        Raises:
            TetherError: ``what`` was called from a tether callback.
        """
        if self._thread is not None and threading.current_thread() is self._thread:
            raise TetherError(
                f"{what} was called from a tether callback (a stop hook or reply observer), "
                "which runs on the loop every sync Agent shares and would wait on itself; "
                "call it from another thread"
            )

    def forget(self) -> None:
        """In a forked child: the parent's loop thread does not exist here."""
        self._lock = threading.Lock()
        self._loop, self._thread, self._users = None, None, 0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="tether", daemon=True
                )
                self._thread.start()
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        loop.close()


async def _cancel_the_rest() -> None:
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


SHARED_LOOP = SharedLoop()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SHARED_LOOP.forget)
