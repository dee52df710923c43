"""A load-generator process: many simulated agents on one asyncio loop.

Run as ``python -m bench.worker``. It reads one JSON command per line on stdin and answers
each with one JSON line on stdout; bench/fleet.py is the other end. Three kinds of agents:

- ``sdk``: real ``tether.AsyncAgent`` instances, each on its own TCP connection (as if each
  were its own process). ``Core._apply`` is wrapped per instance to timestamp, with
  ``time.monotonic()``, the reply that first made the verdict killed (or running again).
- ``poll``: the do-it-yourself baseline: each agent polls a kill key in etcd with a Range
  at a fixed interval and before every action.
- ``raw``: raw Heartbeat streams from the generated stub, pre-serialised, beating as fast
  as acks come back, to find what one coordinator sustains.

Every loop is bounded by a count or a deadline; stdin closing ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psutil

from bench.fleet import Arrivals
from bench.infra import raise_nofile
from bench.record import dump

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_aio_channel = grpc.aio.insecure_channel


def own_connection_channel(target: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
    """grpc.aio.insecure_channel, but never sharing a TCP connection with another channel.

    gRPC pools subchannels process-wide, so thousands of agents in one generator process
    would otherwise ride one HTTP/2 connection; real agents each have their own.
    """
    opts = [*(options or ()), ("grpc.use_local_subchannel_pool", 1)]
    return _aio_channel(target, opts, *args, **kwargs)


RUNNING, HALTED, LOST = 0, 1, 2


class Transitions:
    """Per-agent state (running, halted, or lost: failed closed) and when it changed.

    A round is timed from ``arm()``: the first time each agent turns halted, or running.
    Turning lost (``TetherLost``: the coordinator failed closed, or the TTL lapsed) is
    counted on its own, because it is not the kill being measured.
    """

    def __init__(self) -> None:
        self.state: list[int] = []
        self.killed_at: list[float | None] = []
        self.running_at: list[float | None] = []
        self.n_halted = 0
        self.n_running = 0
        self.lost = 0
        self.granted: dict[int, tuple[float, int]] = {}  # agent -> (when, state) of last grant

    def add(self) -> int:
        self.state.append(-1)
        self.killed_at.append(None)
        self.running_at.append(None)
        return len(self.state) - 1

    def arm(self) -> None:
        n = len(self.state)
        self.killed_at = [None] * n
        self.running_at = [None] * n

    def observe(self, idx: int, state: int, now: float) -> None:
        before = self.state[idx]
        if state == before:
            return
        self.state[idx] = state
        self.n_halted += (state == HALTED) - (before == HALTED)
        self.n_running += (state == RUNNING) - (before == RUNNING)
        if state == HALTED and self.killed_at[idx] is None:
            self.killed_at[idx] = now
        elif state == RUNNING and self.running_at[idx] is None:
            self.running_at[idx] = now
        elif state == LOST:
            self.lost += 1

    async def wait(self, state: str, timeout: float) -> Arrivals:
        """Wait until every agent is ``state`` ("killed" or "running"), at most ``timeout``."""
        want_killed = state == "killed"
        deadline = time.monotonic() + timeout
        n = len(self.state)
        while time.monotonic() < deadline:
            if (self.n_halted if want_killed else self.n_running) == n:
                break
            await asyncio.sleep(0.005)
        stamps = self.killed_at if want_killed else self.running_at
        times = [t for t in stamps if t is not None]
        missing = [i for i, t in enumerate(stamps) if t is None]
        by_state = {"running": 0, "halted": 0, "lost": 0, "unregistered": 0}
        names = {RUNNING: "running", HALTED: "halted", LOST: "lost"}
        for i in missing:
            by_state[names.get(self.state[i], "unregistered")] += 1
        # For agents that never saw it: their last (re)registration and what it said.
        grants = [
            (self.granted[i][0], names[self.granted[i][1]]) for i in missing if i in self.granted
        ]
        return Arrivals(times, len(missing), by_state, grants[:5000])


# -- sdk agents -------------------------------------------------------------------------------


class SdkFleet:
    def __init__(self) -> None:
        import tether._core

        tether._core.grpc.aio.insecure_channel = own_connection_channel  # type: ignore[attr-defined]
        self.agents: list[Any] = []
        self.marks = Transitions()
        self.replies = 0
        self.grants = 0
        self.failed = 0
        self._reporter: asyncio.Task[None] | None = None
        self._actor: asyncio.Task[None] | None = None
        self.actions: list[tuple[float, int]] = []  # (when, agent) of gated effects since arm
        self.refused = 0
        self._pending: set[asyncio.Task[None]] = set()

    def _hook(self, agent: Any, idx: int) -> None:
        from tether import TetherLost

        core = agent._core
        original = core._apply

        def _apply(resp: Any, confirmed_at: float) -> None:
            now = time.monotonic()
            original(resp, confirmed_at)
            self.replies += 1
            killed = core.verdict.killed if core.verdict is not None else None
            if killed is None:
                state = RUNNING
            else:
                state = LOST if isinstance(killed, TetherLost) else HALTED
            self.marks.observe(idx, state, now)
            if resp.HasField("session"):  # a grant: the agent (re)registered
                self.grants += 1
                self.marks.granted[idx] = (now, state)

        core._apply = _apply

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Register ``n`` more agents; answer by ``deadline`` seconds even if some are pending."""
        import tether

        n, targets, prefix = int(cmd["n"]), list(cmd["targets"]), str(cmd["prefix"])
        tenant, agents_per_tenant = str(cmd.get("tenant", "bench")), int(cmd.get("kinds", 16))
        gate = asyncio.Semaphore(int(cmd.get("concurrency", 32)))
        started = time.monotonic()
        base = len(self.agents)
        registered = 0

        async def one(i: int) -> None:
            nonlocal registered
            target = targets[i % len(targets)]
            name = f"{prefix}{i}"
            agent = tether.AsyncAgent(
                f"agent://{tenant}/agent-{i % agents_per_tenant}",
                run_id=f"run-{name}",
                instance_id=name,
                target=target,
                connect_timeout=float(cmd.get("connect_timeout", 60)),
            )
            idx = self.marks.add()
            self._hook(agent, idx)
            self.agents.append(agent)
            async with gate:
                try:
                    await agent.start()
                    registered += 1
                except Exception:
                    self.failed += 1

        tasks = [asyncio.create_task(one(i)) for i in range(base, base + n)]
        self._pending.update(tasks)
        for task in tasks:
            task.add_done_callback(self._pending.discard)
        await asyncio.wait(tasks, timeout=float(cmd.get("deadline", 120)))
        return {
            "count": len(self.agents),
            "registered": registered,
            "pending": len(self._pending),
            "failed": self.failed,
            "seconds": time.monotonic() - started,
            "ttl": self.agents[0]._core.ttl if self.agents else None,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "replies": self.replies,
            "grants": self.grants,
            "agents": len(self.agents),
            "failed": self.failed,
            "lost": self.marks.lost,
            "running": self.marks.n_running,
        }

    async def checkpoints(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start reporting checkpoints from every agent: "same" value or "changing" each time."""
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        mode, period = str(cmd["mode"]), float(cmd.get("period", 0.2))
        if mode != "none":
            self._reporter = asyncio.create_task(self._report(mode, period))
        return {"mode": mode}

    async def _report(self, mode: str, period: float) -> None:
        for step in itertools.count(1):  # ends when cancelled
            for i, agent in enumerate(self.agents):
                value = step if mode == "changing" else 0
                agent.report({"agent": i, "step": value, "note": "benchmark checkpoint"})
            await asyncio.sleep(period)

    async def act(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start every agent acting every ``period`` s, each action gated by ``check()``."""
        if self._actor is None:
            self._actor = asyncio.create_task(self._act(float(cmd.get("period", 0.2))))
        return {"acting": len(self.agents)}

    async def _act(self, period: float, slices: int = 10) -> None:
        from tether import Killed

        for tick in itertools.count():  # ends when cancelled
            for i in range(tick % slices, len(self.agents), slices):
                try:
                    self.agents[i].check()
                except Killed:
                    self.refused += 1
                    continue
                if len(self.actions) < 1_000_000:
                    self.actions.append((time.monotonic(), i))
            await asyncio.sleep(period / slices)

    async def effects(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Gated actions after ``after`` (monotonic), and after each agent's own kill."""
        after = float(cmd["after"])
        late = [(t, i) for t, i in self.actions if t > after]
        killed_at = self.marks.killed_at
        past_own = sum(1 for t, i in late if (k := killed_at[i]) is not None and t >= k)
        return {"after": len(late), "after_own_kill": past_own, "refused": self.refused}

    def arm(self) -> None:
        self.marks.arm()
        self.actions = []

    async def failclosed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Poll ``agent.killed`` for every agent until all report killed, at most ``timeout``."""
        interval, timeout = float(cmd.get("interval", 0.005)), float(cmd["timeout"])
        first: list[float | None] = [None] * len(self.agents)
        killed_before = sum(1 for a in self.agents if a.killed)
        deadline = time.monotonic() + timeout
        remaining = len(self.agents)
        while remaining and time.monotonic() < deadline:
            now = time.monotonic()
            for i, agent in enumerate(self.agents):
                if first[i] is None and agent.killed:
                    first[i] = now
                    remaining -= 1
            await asyncio.sleep(interval)
        times = [t for t in first if t is not None]
        ttl = self.agents[0]._core.ttl if self.agents else None
        return {"times": times, "missing": remaining, "killed_before": killed_before, "ttl": ttl}


# -- polling baseline -------------------------------------------------------------------------


class PollFleet:
    """Agents that each poll an etcd key: every ``interval`` seconds and before each action."""

    def __init__(self) -> None:
        self.marks = Transitions()
        self.requests = 0
        self.errors = 0
        self.late = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from aetcd import rpc

        n, endpoint, key = int(cmd["n"]), str(cmd["endpoint"]), str(cmd["key"]).encode()
        interval, action = float(cmd.get("interval", 0.1)), float(cmd.get("action_every", 1.0))
        if not self._channels:
            self._channels = [
                grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(int(cmd.get("channels", 16)))
            ]
        stubs = [rpc.KVStub(c) for c in self._channels]
        request = rpc.RangeRequest(key=key)
        for _ in range(n):
            idx = self.marks.add()
            stub = stubs[idx % len(stubs)]
            task = asyncio.create_task(self._poll(idx, stub, request, interval, action))
            self._tasks.append(task)
        return {"count": len(self._tasks)}

    async def _poll(
        self, idx: int, stub: Any, request: Any, interval: float, action: float
    ) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random() * interval)  # spread the fleet's phase
        next_poll = next_action = loop.time()
        next_action += random.random() * action
        while True:  # ends when cancelled
            now = loop.time()
            if now >= next_action:  # "before each action": one more Range
                next_action += action
            await self._range(idx, stub, request)
            next_poll += interval
            now = loop.time()
            if next_poll < now:  # behind schedule: skip, do not burst
                self.late += 1
                next_poll = now + interval
            if next_action < next_poll:
                await asyncio.sleep(max(next_action - now, 0))
                await self._range(idx, stub, request)
                next_action += action
                now = loop.time()
            await asyncio.sleep(max(next_poll - now, 0))

    async def _range(self, idx: int, stub: Any, request: Any) -> None:
        self.requests += 1
        try:
            resp = await stub.Range(request, timeout=5)
        except grpc.RpcError:
            self.errors += 1
            return
        self.marks.observe(idx, HALTED if resp.kvs else RUNNING, time.monotonic())

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "late": self.late,
            "agents": len(self._tasks),
        }


# -- raw heartbeat streams --------------------------------------------------------------------


class RawFleet:
    """Heartbeat streams that beat as fast as the coordinator acks, to find saturation."""

    def __init__(self) -> None:
        self.acks = 0
        self.errors = 0
        self.registered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[Any] = []

    async def add(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from tether.v1 import agent_pb2

        n, target, prefix = int(cmd["n"]), str(cmd["target"]), str(cmd["prefix"])
        per_channel = int(cmd.get("streams_per_channel", 25))
        beats = [
            agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=s)).SerializeToString()
            for s in range(1, 257)
        ]
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for i in range(len(self._tasks), len(self._tasks) + n):
            if i % per_channel == 0:
                self._channels.append(
                    grpc.aio.insecure_channel(
                        target, options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
            method = self._channels[-1].stream_stream("/tether.v1.AgentService/Heartbeat")
            name = f"{prefix}{i}"
            register = agent_pb2.HeartbeatRequest(
                register=agent_pb2.Register(
                    tenant="raw", agent="beater", run_id=f"run-{name}", instance_id=name
                )
            ).SerializeToString()
            fut: asyncio.Future[None] = loop.create_future()
            ready.append(fut)
            idle = bool(cmd.get("idle", False))
            self._tasks.append(
                asyncio.create_task(self._beat(method, register, beats, fut, idle=idle))
            )
        await asyncio.wait(ready, timeout=float(cmd.get("timeout", 60)))
        return {"streams": len(self._tasks), "registered": self.registered}

    async def _beat(
        self, method: Any, register: bytes, beats: list[bytes], ready: Any, *, idle: bool
    ) -> None:
        try:
            call = method()
            await call.write(register)
            await call.read()
            self.registered += 1
            ready.set_result(None)
            if idle:  # registered and silent: only memory is being measured
                await call.read()
                return
            for beat in itertools.cycle(beats):  # ends when cancelled or the stream breaks
                await call.write(beat)
                if await call.read() is grpc.aio.EOF:
                    break
                self.acks += 1
        except grpc.RpcError:
            self.errors += 1
        finally:
            if not ready.done():
                ready.set_result(None)

    def stats(self) -> dict[str, Any]:
        return {
            "acks": self.acks,
            "errors": self.errors,
            "streams": len(self._tasks),
            "registered": self.registered,
        }


# -- the command loop -------------------------------------------------------------------------


async def serve(kind: str) -> None:
    fleet: Any = {"sdk": SdkFleet, "poll": PollFleet, "raw": RawFleet}[kind]()
    me = psutil.Process()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    handlers: dict[str, Handler] = {"add": fleet.add}
    if isinstance(fleet, SdkFleet):
        handlers.update(
            checkpoints=fleet.checkpoints,
            failclosed=fleet.failclosed,
            act=fleet.act,
            effects=fleet.effects,
        )

    async def stats(_: dict[str, Any]) -> dict[str, Any]:
        times = me.cpu_times()
        return {
            **fleet.stats(),
            "rss": me.memory_info().rss,
            "cpu": times.user + times.system,
            "now": time.monotonic(),
        }

    async def arm(_: dict[str, Any]) -> dict[str, Any]:
        if isinstance(fleet, SdkFleet):
            fleet.arm()
        else:
            fleet.marks.arm()
        return {"armed": len(fleet.marks.state), "halted": fleet.marks.n_halted}

    async def wait(cmd: dict[str, Any]) -> dict[str, Any]:
        arrivals = await fleet.marks.wait(cmd["state"], float(cmd["timeout"]))
        reply: dict[str, Any] = dump(arrivals)
        return reply

    handlers.update(stats=stats, arm=arm, wait=wait)
    print(json.dumps({"ready": kind}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            reply = await handlers[cmd["cmd"]](cmd)
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
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
