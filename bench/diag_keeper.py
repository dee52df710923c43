"""Diagnosis, not a benchmark: does a busy event loop make the coordinator think etcd is gone?

    python bench/diag_keeper.py

This runs the coordinator's own ``LeaseKeeper`` (tether_server._leases) against a real etcd,
on an event loop kept busy by tasks that each take a small slice of CPU and yield. That
stands in for a coordinator that is pushing a kill to thousands of streams or acking
thousands of heartbeats. For each case it prints how long one loop iteration took and
whether the keeper raised ``EtcdLost`` (the coordinator fails closed on that). etcd stays
healthy the whole time.

Why it happens: the keeper queues the coordinator's own lease (the probe) ahead of every
instance lease it renews that round. gRPC's aio stream writes those requests one at a time,
awaiting each write, and reads the replies one at a time, so each message costs at least
one loop iteration. With N leases and an iteration of t seconds, a round needs about
2·N·t. Once that exceeds the round (TTL/3), the probe of the next round waits behind the
backlog and the keeper gives up.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether_server._leases import EtcdLost, LeaseKeeper
from tether_server._store import Store

from bench.infra import Etcd, Procs

CASES = ((2000, 0, 0), (2000, 100, 50), (500, 100, 50), (2000, 200, 100), (5000, 100, 50))


async def case(endpoint: str, leases: int, tasks: int, work_us: int, ttl: float = 10.0) -> str:
    store = Store([endpoint])
    round_s = ttl / 3
    own, _ = await store.grant(ttl)
    ids: list[int] = []
    while len(ids) < leases:
        batch = min(200, leases - len(ids))
        ids += [i for i, _ in await asyncio.gather(*(store.grant(ttl) for _ in range(batch)))]
    # The third argument has been the round length and, later, the TTL; pass what it names.
    params = list(inspect.signature(LeaseKeeper).parameters)
    keeper = LeaseKeeper(store, own, round_s if "round" in params[2] else ttl, lambda _: None)
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

    async def touch() -> None:  # every instance heartbeats at TTL/4, as agents do
        while not stop:
            for lease in ids:
                keeper.touch(lease)
            await asyncio.sleep(ttl / 4)

    workers = [asyncio.create_task(busy()) for _ in range(tasks)]
    toucher = asyncio.create_task(touch())
    start = time.monotonic()
    limit = 6 * round_s + 1
    try:
        await asyncio.wait_for(keeper.run(), limit)
        verdict = "keeper returned"
    except EtcdLost as err:
        verdict = f"EtcdLost after {time.monotonic() - start:.1f}s ({err})"
    except TimeoutError:
        verdict = f"held for {limit:.0f}s"
    stop = True
    elapsed = time.monotonic() - start
    for t in (*workers, toucher):
        t.cancel()
    await asyncio.gather(*workers, toucher, return_exceptions=True)
    await store.close()
    iteration = f"{1000 * elapsed * tasks / steps:.1f} ms" if steps else "idle"
    load = f"{leases:5d} leases, {tasks:3d} busy tasks x {work_us:3d} µs"
    return f"{load} (loop iteration {iteration}): {verdict}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, Procs() as procs:
        etcd = Etcd(procs, Path(tmp) / "etcd").start()
        for leases, tasks, work in CASES:
            print(asyncio.run(case(etcd.endpoint, leases, tasks, work)), flush=True)


if __name__ == "__main__":
    main()
