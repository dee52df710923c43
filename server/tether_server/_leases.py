"""Many leases kept alive over one long-lived LeaseKeepAlive stream, driven off the event loop.

A lease is renewed at most once per round (a third of the TTL) and only if its instance
heartbeated since the last round, so renewals cost one small stream message per instance
per round however fast agents beat. The coordinator's own lease goes first in every round
and doubles as the probe of etcd: when no keep-alive at all has been answered for two thirds
of the instance TTL, the instances' leases are in jeopardy and the coordinator must fail
closed. A slow answer within that bound is load, not loss.

The stream runs on gRPC's blocking API in its own threads, not on the event loop. On the
loop, each message written to a stream waits for one loop iteration, and a loop busy with
thousands of agents turns a round of 5,000 renewals into tens of seconds: leases lapsed,
and once the coordinator's own lease did, the whole fleet failed closed with etcd healthy.
Off the loop, renewals go out as fast as etcd takes them, however busy the agents keep it.
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

from tether_server._store import Store


class EtcdLost(Exception):
    """The keep-alive stream broke or went unanswered."""


class LeaseKeeper:
    """Renews leases for instances that heartbeated, and probes etcd every round."""

    def __init__(
        self, store: Store, own_lease: int, ttl: float, on_expired: Callable[[int], None]
    ) -> None:
        self._store = store
        self._own = own_lease
        self._round = ttl / 3
        self._lost_after = ttl * 2 / 3
        self._on_expired = on_expired
        self._due: set[int] = set()
        self._answered_at = time.monotonic()

    def touch(self, lease_id: int) -> None:
        """Renew ``lease_id`` in the next round."""
        self._due.add(lease_id)

    def forget(self, lease_id: int) -> None:
        self._due.discard(lease_id)

    async def run(self) -> None:
        """Keep leases alive until the stream breaks.

        Raises:
            EtcdLost: always, with the reason, when it returns.
        """
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = loop.create_future()
        rounds: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        queued: set[int] = set()  # a lease waits to be sent at most once: no pile-up

        def outgoing() -> Iterator[Any]:  # on gRPC's request thread
            while (batch := rounds.get()) is not None:
                for lease_id in batch:
                    queued.discard(lease_id)
                    yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        def end(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        def expired(lease_id: int) -> None:
            if lease_id == self._own:
                end("the coordinator's own lease expired")
            else:
                self._on_expired(lease_id)

        channel = self._store.blocking_channel()
        call = rpc.LeaseStub(channel).LeaseKeepAlive(outgoing())

        def read() -> None:  # on its own thread
            reason = "etcd ended the lease keep-alive stream"
            try:
                for resp in call:
                    # Any answer proves etcd is there: under load the probe may wait behind
                    # thousands of renewals, and that is load, not loss.
                    self._answered_at = time.monotonic()
                    if resp.TTL <= 0:
                        loop.call_soon_threadsafe(expired, int(resp.ID))
            except grpc.RpcError as err:
                reason = str(self._store.unavailable(err))
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(end, reason)

        reader = threading.Thread(target=read, name="tether-lease-keeper", daemon=True)
        reader.start()
        try:
            while not ended.done():
                silent = time.monotonic() - self._answered_at
                if silent > self._lost_after:
                    raise EtcdLost(f"etcd answered no lease keep-alive for {silent:.1f}s")
                due, self._due = self._due, set()
                batch = [self._own, *(lease for lease in due if lease not in queued)]
                queued.update(batch)
                rounds.put(batch)
                await asyncio.wait({ended}, timeout=self._round)
            raise EtcdLost(ended.result())
        finally:
            rounds.put(None)
            call.cancel()
            channel.close()
