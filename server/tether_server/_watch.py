"""One etcd watch over a key prefix, from a revision, as an async iterator of event batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from tether_server._errors import Unavailable
from tether_server._store import Store, prefix_end


class WatchBroken(Unavailable):
    """The watch ended: etcd is unreachable, or it cancelled or compacted the watch."""


async def watch_prefix(
    store: Store, prefix: bytes, start_revision: int, *, end: bytes | None = None
) -> AsyncIterator[Any]:
    """Yield every WatchResponse that carries events under ``prefix`` after ``start_revision``.

    ``end`` widens the watch to every key from ``prefix`` up to (not including) ``end``.

    Raises:
        WatchBroken: the stream failed or etcd cancelled it; the caller must resync.
    """
    requests: asyncio.Queue[Any] = asyncio.Queue()
    create = rpc.WatchCreateRequest(
        key=prefix, range_end=end or prefix_end(prefix), start_revision=start_revision, prev_kv=True
    )
    await requests.put(rpc.WatchRequest(create_request=create))

    async def outgoing() -> AsyncIterator[Any]:
        while True:
            yield await requests.get()

    call = store.watch.Watch(outgoing())
    try:
        async for resp in call:
            if resp.canceled or resp.compact_revision:
                raise WatchBroken(
                    f"etcd cancelled the watch on {prefix.decode()}: "
                    f"{resp.cancel_reason or f'compacted at {resp.compact_revision}'}"
                )
            if resp.events:
                yield resp
        raise WatchBroken(f"etcd ended the watch on {prefix.decode()}")
    except grpc.RpcError as err:
        raise WatchBroken(str(store.unavailable(err))) from err
    finally:
        call.cancel()
