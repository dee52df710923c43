"""A load-generator process: many simulated agents on one asyncio loop.

Run as ``python -m bench.worker KIND``. It reads one JSON command per line on stdin and
answers each with one JSON line on stdout; bench/fleet.py is the other end. Three kinds:

- ``sdk``: real ``tether.AsyncAgent`` instances (bench/sdk_agents.py).
- ``poll``: the do-it-yourself baseline, polling a kill key in etcd (bench/pollers.py).
- ``raw``: raw Heartbeat streams with no SDK (bench/raw_streams.py).
- ``listen``: raw streams that wait for pushed orders, the floors' clients (bench/listeners.py).
- ``mux``: runs sharing the process's stream, each holding gated work (bench/mux_agents.py).

Every loop is bounded by a count or a deadline; stdin closing ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from bench.infra import raise_nofile
from bench.listeners import ListenFleet
from bench.mux_agents import MuxFleet
from bench.pollers import PollFleet
from bench.raw_streams import RawFleet
from bench.record import dump
from bench.sdk_agents import SdkFleet

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
AnyFleet = SdkFleet | PollFleet | RawFleet | ListenFleet | MuxFleet


def handlers(fleet: AnyFleet) -> dict[str, Handler]:
    """The commands ``fleet`` answers: add, stats, and for agents with marks, arm and wait."""
    me = psutil.Process()

    async def stats(_: dict[str, Any]) -> dict[str, Any]:
        times = me.cpu_times()
        return {
            **fleet.stats(),
            "rss": me.memory_info().rss,
            "cpu": times.user + times.system,
            "now": time.monotonic(),
        }

    out: dict[str, Handler] = {"add": fleet.add, "stats": stats}
    if isinstance(fleet, ListenFleet | MuxFleet):
        return {**fleet.commands(), "stats": stats}
    if isinstance(fleet, RawFleet):
        return out
    marks = fleet.marks

    async def arm(_: dict[str, Any]) -> dict[str, Any]:
        fleet.arm()
        return {"armed": len(marks.state), "halted": marks.n_halted}

    async def wait(cmd: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = dump(await marks.wait(cmd["state"], float(cmd["timeout"])))
        return reply

    out.update(arm=arm, wait=wait)
    if isinstance(fleet, SdkFleet):
        out.update(
            checkpoints=fleet.checkpoints,
            failclosed=fleet.failclosed,
            act=fleet.act,
            effects=fleet.effects,
            watch_lost=fleet.watch_lost,
            lost_seen=fleet.lost_seen,
            regranted=fleet.regranted,
        )
    return out


async def serve(kind: str) -> None:
    """Answer commands from stdin until it closes."""
    kinds: dict[str, type[AnyFleet]] = {
        "sdk": SdkFleet, "poll": PollFleet, "raw": RawFleet, "listen": ListenFleet,
        "mux": MuxFleet,
    }  # fmt: skip
    fleet = kinds[kind]()
    answer = handlers(fleet)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": kind}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            reply = await answer[cmd["cmd"]](cmd)
        except Exception as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> None:
    raise_nofile()
    kind = sys.argv[1]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(kind))
    # Exit at once: closing thousands of agents cleanly is not what is being measured,
    # and the harness stops the coordinators right after.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
