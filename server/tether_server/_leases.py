"""Many leases kept alive over one long-lived LeaseKeepAlive stream.

A lease is renewed at most once per round (a third of the TTL) and only if its instance
heartbeated since the last round, so renewals cost one small stream message per instance
per round however fast agents beat. The coordinator's own lease goes out every round and
doubles as the probe of etcd: when no keep-alive at all has been answered for two thirds of the
instance TTL, the instances' leases are in jeopardy and the coordinator must fail closed.
A slow answer within that bound is load, not loss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
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
        queue: asyncio.Queue[int] = asyncio.Queue()
        queued: set[int] = set()  # a lease waits in the queue at most once: no pile-up

        async def outgoing() -> AsyncIterator[Any]:
            while True:
                lease_id = await queue.get()
                queued.discard(lease_id)
                yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        call = self._store.lease.LeaseKeepAlive(outgoing())
        reader = asyncio.create_task(self._read(call))
        try:
            while not reader.done():
                silent = time.monotonic() - self._answered_at
                if silent > self._lost_after:
                    raise EtcdLost(f"etcd answered no lease keep-alive for {silent:.1f}s")
                due, self._due = self._due, set()
                for lease_id in (self._own, *due):
                    if lease_id not in queued:
                        queued.add(lease_id)
                        queue.put_nowait(lease_id)
                await asyncio.wait({reader}, timeout=self._round)
            raise EtcdLost(reader.exception() or "etcd ended the lease keep-alive stream")
        finally:
            reader.cancel()
            call.cancel()

    async def _read(self, call: Any) -> None:
        try:
            async for resp in call:
                # Any answer proves etcd is there: on a busy coordinator the probe may wait
                # behind thousands of renewals, and that is load, not loss.
                self._answered_at = time.monotonic()
                if resp.TTL > 0:
                    continue
                if self._own == resp.ID:
                    raise EtcdLost("the coordinator's own lease expired")
                self._on_expired(int(resp.ID))
        except grpc.RpcError as err:
            raise EtcdLost(str(self._store.unavailable(err))) from err
