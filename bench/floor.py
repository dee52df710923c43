"""The physical floor: how long etcd itself takes from a put to the watch event for it.

No kill can reach an agent sooner than etcd delivers the halt to a watcher, so Tether's
kill latency is reported as a multiple of this. One process puts a key and watches it, on
separate gRPC channels; samples are spaced with jitter so they do not queue on each other.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
from aetcd import rpc

from bench.harness import Bench, Result, say
from bench.stats import summary

KEY = b"/bench/floor/halt"


async def _measure(endpoint: str, samples: int) -> dict[str, list[float]]:
    own = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(endpoint, options=own) as put_ch,
        grpc.aio.insecure_channel(endpoint, options=own) as watch_ch,
    ):
        kv = rpc.KVStub(put_ch)
        events: asyncio.Queue[float] = asyncio.Queue()
        requests: asyncio.Queue[Any] = asyncio.Queue()
        await requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=KEY)))

        async def outgoing() -> Any:
            while True:
                yield await requests.get()

        call = rpc.WatchStub(watch_ch).Watch(outgoing())

        async def read() -> None:
            async for resp in call:
                now = time.monotonic()
                for _ in resp.events:
                    events.put_nowait(now)

        reader = asyncio.create_task(read())
        from_put: list[float] = []
        from_ack: list[float] = []
        try:
            await asyncio.sleep(0.3)  # the watch is created
            await kv.Put(rpc.PutRequest(key=KEY, value=b"warm-up"), timeout=5)
            await asyncio.wait_for(events.get(), 5)
            for i in range(samples):
                await asyncio.sleep(0.005 + random.random() * 0.01)
                issued = time.monotonic()
                await kv.Put(rpc.PutRequest(key=KEY, value=str(i).encode()), timeout=5)
                acked = time.monotonic()
                seen = await asyncio.wait_for(events.get(), 5)
                from_put.append((seen - issued) * 1e3)
                from_ack.append((seen - acked) * 1e3)
        finally:
            reader.cancel()
            call.cancel()
        return {"from_put": from_put, "from_ack": from_ack}


def etcd_floor(bench: Bench) -> Result:
    samples = bench.settings.floor_samples
    with bench.cluster("floor", coordinators=0) as (etcd, _):
        say(f"floor: {samples} put-to-watch-event samples")
        raw = asyncio.run(_measure(etcd.endpoint, samples))
    out = {
        "samples": samples,
        "put_to_event_ms": summary(raw["from_put"], 3),
        "ack_to_event_ms": summary(raw["from_ack"], 3),
    }
    say(f"floor: put to event {out['put_to_event_ms']}")
    return out
