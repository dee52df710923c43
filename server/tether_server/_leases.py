"""The coordinator's one lease, kept alive over a LeaseKeepAlive stream off the event loop.

Every presence key this coordinator writes hangs on that lease. The coordinator deletes an
instance's key itself the moment the instance says goodbye, its stream breaks, or it is
silent for a TTL; if the coordinator dies or loses etcd, the lease lapses and etcd drops all
its instances' keys at once. Either way STALE is a fact in etcd within the TTL, and
renewals cost one message per round per coordinator, not one per agent.

The stream moves between members: when it breaks, or a renewal goes unanswered for a
round, it is opened again on the store's next member and renews at once. A new etcd
leader extends every lease by its TTL, so a leader's death costs no lease. The keeper
gives up only when etcd says the lease is gone, or when no renewal was answered for a
whole TTL (by our count it has lapsed). Whether the halt view is current is proven
separately (``_freshness``): that, not the keep-alive, is what fails agents closed within
two thirds of the TTL when etcd cannot be reached.

The stream runs on gRPC's blocking API in its own thread, so a loop busy with thousands of
agents delays neither the renewal nor the reading of its answer. The loop still asks for
each renewal: a wedged loop lets the lease lapse, and its instances go STALE.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from aetcd import rpc

from tether_server._errors import Unavailable
from tether_server._etcd import REQUIRE_LEADER, Member, Store

_RETRY = 0.1  # seconds between a broken stream and its successor on the next member


class EtcdLost(Unavailable):
    """The lease expired, or no keep-alive was answered for a whole TTL."""


class _Stream:
    """One LeaseKeepAlive stream to one member, with its own queue of renewals to send."""

    def __init__(self, store: Store, member: Member, lease: int) -> None:
        self.member = member
        self.asked_at = self.answered_at = 0.0
        self.abandoned = ""
        self._asks: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._channel = store.blocking_channel(member)
        stub = rpc.LeaseStub(self._channel)
        self.call = stub.LeaseKeepAlive(self._outgoing(lease), metadata=REQUIRE_LEADER)

    def _outgoing(self, lease: int) -> Iterator[Any]:  # on gRPC's request thread
        while self._asks.get():
            yield rpc.LeaseKeepAliveRequest(ID=lease)

    def ask(self) -> None:
        if self.answered_at >= self.asked_at:  # keep the oldest unanswered one
            self.asked_at = time.monotonic()
        self._asks.put(True)

    def unanswered_for(self, now: float) -> float:
        return now - self.asked_at if self.asked_at > self.answered_at else 0.0

    def abandon(self, reason: str) -> None:
        self.abandoned = reason
        self.call.cancel()

    def close(self) -> None:
        self._asks.put(False)
        self.call.cancel()
        self._channel.close()


class LeaseKeeper:
    """Renews the coordinator's lease every third of the TTL, on whichever member serves."""

    def __init__(self, store: Store, lease: int, ttl: float) -> None:
        self._store = store
        self.lease = lease
        self._round = ttl / 3
        self._lost_after = ttl
        self._answered_at = time.monotonic()
        self._stream: _Stream | None = None
        self._closed = threading.Event()

    async def run(self) -> None:
        """Keep the lease alive until it is lost.

        Raises:
            EtcdLost: always, with the reason, when it returns.
        """
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = loop.create_future()

        def end(reason: str) -> None:  # on the keeper's thread
            def settle() -> None:
                if not ended.done():
                    ended.set_result(reason)

            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(settle)

        threading.Thread(
            target=self._keep, args=(end,), name="tether-lease-keeper", daemon=True
        ).start()
        try:
            while not ended.done():
                self._tick()
                await asyncio.wait({ended}, timeout=self._round)
            raise EtcdLost(ended.result())
        finally:
            self._closed.set()
            if self._stream is not None:
                self._stream.close()

    def _tick(self) -> None:
        """One round: give up, move a stream that went unanswered, or ask for a renewal."""
        now = time.monotonic()
        silent = now - self._answered_at
        if silent > self._lost_after:
            raise EtcdLost(f"etcd answered no lease keep-alive for {silent:.1f}s")
        stream = self._stream
        if stream is None:
            return
        waited = stream.unanswered_for(now)
        if waited > self._round / 2:
            stream.abandon(f"no answer to a lease keep-alive for {waited:.1f}s")
        else:
            stream.ask()

    def _keep(self, end: Callable[[str], None]) -> None:  # on its own thread
        while not self._closed.is_set():
            stream = _Stream(self._store, self._store.member(), self.lease)
            self._stream = stream
            if self._closed.is_set():  # run() ended before it could see this stream
                stream.close()
                return
            stream.ask()  # renew at once on a new stream
            gone = self._read(stream)
            stream.close()
            if gone:
                end(gone)
                return
            self._closed.wait(_RETRY)

    def _read(self, stream: _Stream) -> str:
        """Read renewals until the stream ends; return why if the lease is gone, else ""."""
        reason: BaseException = ConnectionError("etcd ended the lease keep-alive stream")
        try:
            for resp in stream.call:
                if resp.TTL <= 0:
                    return "the coordinator's lease expired"
                stream.answered_at = self._answered_at = time.monotonic()
        except grpc.RpcError as err:
            reason = ConnectionError(stream.abandoned) if stream.abandoned else err
        if not self._closed.is_set():
            # The preference is one int: moving it from this thread is safe under the GIL.
            self._store.failed(stream.member, reason)
        return ""
