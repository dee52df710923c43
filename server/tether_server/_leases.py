"""The coordinator's one lease, kept alive over a LeaseKeepAlive stream off the event loop.

Every presence key this coordinator writes hangs on that lease. The coordinator deletes an
instance's key itself the moment the instance says goodbye, its stream breaks, or it is
silent for a TTL; if the coordinator dies or loses etcd, the lease lapses and etcd drops all
its instances' keys at once. Either way STALE is a fact in etcd within the TTL, and
renewals cost one message per round per coordinator, not one per agent.

The keep-alive is also the probe of etcd: when none has been answered for two thirds of
the TTL, the lease is in jeopardy and the coordinator must fail closed. A slow answer
within that bound is load, not loss.

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
from collections.abc import Iterator
from typing import Any

import grpc
from aetcd import rpc

from tether_server._errors import Unavailable
from tether_server._store import Store


class EtcdLost(Unavailable):
    """The keep-alive stream broke or went unanswered, or the lease expired."""


class LeaseKeeper:
    """Renews the coordinator's lease every third of the TTL, and probes etcd with it."""

    def __init__(self, store: Store, lease: int, ttl: float) -> None:
        self._store = store
        self.lease = lease
        self._round = ttl / 3
        self._lost_after = ttl * 2 / 3
        self._answered_at = time.monotonic()

    async def run(self) -> None:
        """Keep the lease alive until the stream breaks.

        Raises:
            EtcdLost: always, with the reason, when it returns.
        """
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = loop.create_future()
        asks: queue.SimpleQueue[bool] = queue.SimpleQueue()

        def outgoing() -> Iterator[Any]:  # on gRPC's request thread
            while asks.get():
                yield rpc.LeaseKeepAliveRequest(ID=self.lease)

        def end(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        channel = self._store.blocking_channel()
        call = rpc.LeaseStub(channel).LeaseKeepAlive(outgoing())

        def read() -> None:  # on its own thread
            reason = "etcd ended the lease keep-alive stream"
            try:
                for resp in call:
                    self._answered_at = time.monotonic()
                    if resp.TTL <= 0:
                        reason = "the coordinator's lease expired"
                        break
            except grpc.RpcError as err:
                reason = str(self._store.unavailable(err))
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(end, reason)

        reader = threading.Thread(target=read, name="tether-lease-keeper", daemon=True)
        reader.start()
        try:
            while not ended.done():
                silent = time.monotonic() - self._answered_at
                if silent > self._lost_after:
                    raise EtcdLost(f"etcd answered no lease keep-alive for {silent:.1f}s")
                asks.put(True)
                await asyncio.wait({ended}, timeout=self._round)
            raise EtcdLost(ended.result())
        finally:
            asks.put(False)
            call.cancel()
            channel.close()
