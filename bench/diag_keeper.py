"""Diagnosis, not a benchmark: does a busy event loop make the coordinator think etcd is gone?

    python bench/diag_keeper.py

This runs the coordinator's own ``LeaseKeeper`` (tether_server._leases) against a real etcd,
on an event loop kept busy by tasks that each take a small slice of CPU and yield. That
stands in for a coordinator that is pushing a kill to thousands of streams or acking
thousands of heartbeats. For each case it prints how long one loop iteration took and
whether the keeper raised ``EtcdLost`` (the coordinator fails closed on that). etcd stays
healthy the whole time.

History: the keeper once renewed one lease per agent over an aio stream, one message per
loop iteration. With 2,000 leases and a 5.6 ms iteration a round outgrew TTL/3 and the
keeper failed closed after 10 s with etcd healthy; at 5,000 agents the coordinator's own
lease lapsed. Now presence keys hang on the coordinator's one lease and the stream runs on
its own thread, so only the loop's request for each renewal waits on the loop.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether_server._etcd import Store
from tether_server._leases import EtcdLost, LeaseKeeper

from bench.infra import Etcd, Procs

CASES = ((0, 0), (100, 50), (200, 100), (400, 100), (200, 500))  # busy tasks x µs each


async def case(endpoint: str, tasks: int, work_us: int, ttl: float = 10.0) -> str:
    store = Store([endpoint])
    own, _ = await store.grant(ttl)
    keeper = LeaseKeeper(store, own, ttl)
    stop = False
    steps = 0

    async def busy() -> None:
        nonlocal steps
        while not stop:
            t = time.perf_counter()
            while time.perf_counter() - t < work_us / 1e6:
                pass
            steps += 1
            await asyncio.sleep(0)

    workers = [asyncio.create_task(busy()) for _ in range(tasks)]
    start = time.monotonic()
    limit = 2 * ttl + 1
    try:
        await asyncio.wait_for(keeper.run(), limit)
        verdict = "keeper returned"
    except EtcdLost as err:
        verdict = f"EtcdLost after {time.monotonic() - start:.1f}s ({err})"
    except TimeoutError:
        verdict = f"held for {limit:.0f}s"
    stop = True
    elapsed = time.monotonic() - start
    for t in workers:
        t.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    await store.close()
    iteration = f"{1000 * elapsed * tasks / steps:.1f} ms" if steps else "idle"
    return f"{tasks:3d} busy tasks x {work_us:3d} µs (loop iteration {iteration}): {verdict}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Procs() as procs:
        etcd = Etcd(procs, Path(tmp) / "etcd").start()
        for tasks, work in CASES:
            print(asyncio.run(case(etcd.endpoint, tasks, work)), flush=True)


if __name__ == "__main__":
    main()
