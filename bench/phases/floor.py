"""The physical floor: how long etcd itself takes from a put to the watch event for it.

No kill can reach an agent sooner than etcd delivers the halt to a watcher, so Tether's
kill latency is reported as a multiple of this. One process puts a key and watches it, on
separate gRPC channels; samples are spaced with jitter so they do not queue on each other.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from aetcd import rpc

from bench import md
from bench.harness import Bench, say
from bench.md import fmt, table
from bench.phase import Phase, Results
from bench.phases import kill, poll
from bench.sdk_agents import OWN_CONNECTION
from bench.stats import Summary, summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

KEY = b"/bench/floor/halt"


async def _measure(endpoint: str, samples: int) -> dict[str, list[float]]:
    async with (
        grpc.aio.insecure_channel(endpoint, options=OWN_CONNECTION) as put_ch,
        grpc.aio.insecure_channel(endpoint, options=OWN_CONNECTION) as watch_ch,
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


@dataclass(frozen=True)
class Settings:
    samples: int = 400


@dataclass
class Result:
    samples: int = 0
    put_to_event_ms: Summary = field(default_factory=Summary)
    ack_to_event_ms: Summary = field(default_factory=Summary)


def measure(bench: Bench, cfg: Settings) -> Result:
    with bench.cluster("floor", coordinators=0) as (etcd, _):
        say(f"floor: {cfg.samples} put-to-watch-event samples")
        raw = asyncio.run(_measure(etcd.endpoint, cfg.samples))
    out = Result(
        samples=cfg.samples,
        put_to_event_ms=summary(raw["from_put"], 3),
        ack_to_event_ms=summary(raw["from_ack"], 3),
    )
    say(f"floor: put to event {out.put_to_event_ms}")
    return out


def _row(label: str, s: Summary) -> md.Row:
    return [label, fmt(s.n), fmt(s.p50, 2), fmt(s.p99, 2), fmt(s.max, 2)]


def section(results: Results) -> list[str]:
    """etcd's own latency, and each kill design's latency as a multiple of it."""
    res = results.of(PHASE)
    floor = res.put_to_event_ms if res is not None else Summary()
    if res is None or not floor.n or floor.p50 is None or floor.p99 is None:
        return ["## Against the physical floor\n", "Not measured.\n"]
    rows = [_row("from put issued", floor)]
    if res.ack_to_event_ms.n:
        rows.append(_row("from put acknowledged", res.ack_to_event_ms))
    text = table(["etcd put → watch event", "n", "p50", "p99", "max"], rows)
    rows = [
        [label, fmt(agents), fmt(s.p50), fmt(s.p99),
         f"{s.p50 / floor.p50:,.0f}x", f"{s.p99 / floor.p99:,.0f}x"]
        for label, points in [*kill.latencies(results), *poll.latencies(results)]
        for agents, s in points
        if s.p50 is not None and s.p99 is not None
    ]  # fmt: skip
    text += (
        "\nKill latency (from the kill being issued) as a multiple of the floor "
        "(from the put being issued):\n\n"
    )
    text += table(
        ["design", "agents", "p50 ms", "p99 ms", "p50 ÷ floor p50", "p99 ÷ floor p99"], rows
    )
    return ["## Against the physical floor\n", text]


def plot(results: Results, ax: Axes) -> None:
    res = results.of(PHASE)
    floor = res.put_to_event_ms if res is not None else Summary()
    if not floor.n or floor.p50 is None or floor.p99 is None:
        return
    ax.axhline(
        floor.p50, color="grey", linestyle=":", label=f"etcd put→watch p50 ({floor.p50:.2f} ms)"
    )
    ax.axhline(
        floor.p99, color="black", linestyle=":", label=f"etcd put→watch p99 ({floor.p99:.2f} ms)"
    )


PHASE = Phase(
    name="floor",
    about="etcd's own put→watch-event latency: the physical floor for any kill",
    result=Result,
    run=measure,
    defaults=Settings(),
    quick=Settings(samples=100),
    section=section,
    plot=plot,
)
