"""The shared half of a tether: one channel and one ``Multiplex`` stream per process, target
list and credentials, carrying every ``Agent`` and ``AsyncAgent`` of the process.

A link owns the reconnect loop (backing off, to the next target), the stream's one writer
(every instance's queued frames and the stream's beat, one ``MuxRequest`` per wake-up), its
reader (each ``MuxReply`` dispatched to the instances it lists) and the watchdog that fails
closed every instance whose stream confirmed nothing within the TTL. Links are found in a
process-wide table keyed by (event loop, targets, TLS files, token, channel options); the
last instance leaving closes its link.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from tether._channel import bearer, open_aio_channel, traced
from tether._config import AgentConfig
from tether._core import Core
from tether._errors import TetherError, from_rpc_error, is_permanent
from tether._link_stream import Stream, chunks, eof_error
from tether._stop import Ends
from tether._types import Halt
from tether._verdict import stops, verdict_of
from tether.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("tether")

_INITIAL_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
_CLOSE_TIMEOUT = 2.0  # for the coordinator to end a stream whose last instance left
_MOST_FRAMES = 1000  # frames in one MuxRequest; a reconnect of a big fleet is split

_LINKS: dict[tuple[Any, ...], Link] = {}
_LINKS_LOCK = threading.Lock()  # asyncio agents on loops of several threads join at once


def _forget_links() -> None:
    """In a forked child: the parent's links, their loops and their streams are not here."""
    global _LINKS_LOCK  # noqa: PLW0603 - a lock held by a thread at fork is never released here
    _LINKS.clear()
    _LINKS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_links)


def join(core: Core, loop: asyncio.AbstractEventLoop) -> Link:
    """The link ``core`` shares with the process's other instances; it registers there."""
    config = core.config
    key = (loop, config.targets, config.tls, config.token, config.channel_options)
    with _LINKS_LOCK:
        link = _LINKS.get(key)
        if link is None or link.closing:
            link = _LINKS[key] = Link(key, loop, config)
    link.add(core)
    return link


class Link:
    """One channel and one stream at a time, shared by the instances in ``members``."""

    def __init__(self, key: tuple[Any, ...], loop: asyncio.AbstractEventLoop, config: AgentConfig):
        self._key = key
        self.loop = loop
        self._config = config  # the first member's: targets, TLS, token and options are shared
        self.members: dict[int, Core] = {}
        self._locals = itertools.count(1)
        self._dirty: set[Core] = set()  # members with something queued to write
        self._registering: dict[int, Core] = {}  # members to register on the current stream
        self._orphans: list[int] = []  # locals whose instance left: say goodbye for them
        self._observed: set[Core] = set()  # members with an on_reply observer
        self._lost: set[Core] = set()  # members the watchdog failed closed
        self.current: Stream | None = None
        self.closing = False
        self._interval = 1.0
        self._ttl = 0.0
        self._served = False  # the last stream granted a registration
        self._wake = asyncio.Event()
        self.ends = Ends(loop)  # gate passes a kill ended, recorded in one batch
        self._task = loop.create_task(self._run(), name="tether-link")
        self._watchdog = loop.create_task(self._watch(), name="tether-watchdog")

    # -- membership, on the link's loop -----------------------------------------------------

    def add(self, core: Core) -> None:
        core.local = local = next(self._locals)
        self.members[local] = core
        core.out.bind(self.loop, functools.partial(self.mark, core))
        if core.config.on_reply is not None:
            self._observed.add(core)
        if self.current is not None:
            self._registering[local] = core
            self._wake.set()

    def mark(self, core: Core) -> None:
        """``core`` has something to write."""
        if core.local in self.members:
            self._dirty.add(core)
            self._wake.set()

    def says_goodbye(self, core: Core) -> bool:
        """Have the writer send ``core``'s goodbye; False when it is registered on no stream."""
        if self.current is None or core.stream is not self.current or core.said_goodbye:
            return False
        self.mark(core)
        return True

    async def leave(self, core: Core) -> None:
        """``core`` is gone; the last one to leave closes the link."""
        if self.members.pop(core.local, None) is None:
            return
        for found in (self._dirty, self._observed, self._lost):
            found.discard(core)
        self._registering.pop(core.local, None)
        stream = self.current
        if stream is not None and core.stream is stream and not core.said_goodbye:
            self._orphans.append(core.local)  # its session must not outlive it
            self._wake.set()
        if not self.members:
            await self._close()

    async def _close(self) -> None:
        self.closing = True
        with _LINKS_LOCK:
            if _LINKS.get(self._key) is self:
                del _LINKS[self._key]
        self._wake.set()  # the writer ends the stream; the coordinator then ends it too
        if self.current is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=_CLOSE_TIMEOUT)
        for task in (self._task, self._watchdog):
            task.cancel()
        await asyncio.gather(self._task, self._watchdog, return_exceptions=True)

    # -- the stream, reconnected with backoff -----------------------------------------------

    async def _run(self) -> None:
        backoff = _INITIAL_BACKOFF
        targets = self._config.targets
        for attempt in itertools.count():
            target = targets[attempt % len(targets)]
            try:
                await self._session(target)
            except grpc.RpcError as err:
                if self.closing:
                    return
                if is_permanent(err):
                    self._refuse_all(from_rpc_error(err))
                    return
                log.info("tether: stream to %s broke (%s); reconnecting", target, err)
            except Exception as err:  # a reply it cannot read, a bug: reconnect, never die
                if self.closing:
                    return
                log.warning("tether: stream to %s failed (%r); reconnecting", target, err)
            if self.closing:
                return
            if self._served:  # a stream that granted: the next break starts a new round
                backoff, self._served = _INITIAL_BACKOFF, False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _refuse_all(self, error: TetherError) -> None:
        """The coordinator refused the stream itself (its credentials): every member is over."""
        self.closing = True  # a new instance gets a new link, and tries again
        with _LINKS_LOCK:
            if _LINKS.get(self._key) is self:
                del _LINKS[self._key]
        for core in list(self.members.values()):
            core.refused(error)

    async def _session(self, target: str) -> None:
        config = self._config
        async with open_aio_channel(target, config.tls, config.channel_options) as channel:
            metadata = traced(bearer(config.token))  # the stream joins the caller's trace
            call = agent_pb2_grpc.AgentServiceStub(channel).Multiplex(metadata=metadata)
            stream = self.current = Stream(call)
            self._registering = {
                local: core
                for local, core in self.members.items()
                if not (core.closing or core.ended)
            }
            writer = asyncio.create_task(self._write(stream), name="tether-writer")
            writer.add_done_callback(functools.partial(_cancel_on_error, stream))
            try:
                await self._read(stream)
            finally:
                self.current = None
                self._served = stream.beating
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    # -- the one writer -----------------------------------------------------------------------

    async def _write(self, stream: Stream) -> None:
        """Every member's queued frames and the stream's beat, one request per wake-up."""
        wake, loop = self._wake, self.loop
        next_beat = 0.0
        while True:
            wake.clear()
            now = time.monotonic()
            beat = stream.beating and now >= next_beat
            request, taken = self._gather(stream, beat)
            if beat:
                request.seq = stream.beat(now)
                next_beat = now + self._interval
            await self._send(stream, request, taken)
            if self.closing and not self.members:
                await stream.call.done_writing()
                return
            alarm = None
            if stream.beating:
                delay = max(next_beat - time.monotonic(), 0)
                alarm = loop.call_at(loop.time() + delay, wake.set)  # no task per beat
            try:
                await wake.wait()
            finally:
                if alarm is not None:
                    alarm.cancel()

    def _gather(
        self, stream: Stream, beat: bool
    ) -> tuple[agent_pb2.MuxRequest, list[tuple[Core, list[types_pb2.Effect]]]]:
        request = agent_pb2.MuxRequest()
        frames = request.frames
        for local in self._orphans:
            frames.add(local=local).body.goodbye.SetInParent()
        self._orphans.clear()
        for local, core in self._registering.items():
            frames.add(local=local).body.CopyFrom(core.identity.register())
            core.pending = stream  # its grant (or end) is due on this stream
        self._registering.clear()
        dirty, self._dirty = self._dirty, set()
        taken: list[tuple[Core, list[types_pb2.Effect]]] = []
        for core in list(self.members.values()) if beat else dirty:
            if core.stream is not stream or core.said_goodbye:
                if core in dirty and not core.said_goodbye:
                    self._dirty.add(core)  # it writes once granted on this stream
                continue
            goodbye = core.closing
            verdict = core.verdict
            stopped = verdict is not None and verdict.stop is not None
            effects = core.out.take(core.local, request, beat=beat or stopped, goodbye=goodbye)
            core.said_goodbye = goodbye
            if effects:
                taken.append((core, effects))
        return request, taken

    async def _send(
        self,
        stream: Stream,
        request: agent_pb2.MuxRequest,
        taken: list[tuple[Core, list[types_pb2.Effect]]],
    ) -> None:
        if not request.frames and not request.seq:
            return
        try:
            for part in chunks(request, _MOST_FRAMES):
                await stream.call.write(part)
        except BaseException:
            for core, effects in taken:
                core.out.requeue(effects)  # the next stream sends them
            raise

    # -- the reader ---------------------------------------------------------------------------

    async def _read(self, stream: Stream) -> None:
        call = stream.call
        while True:
            try:
                resp = await call.read()
            except asyncio.CancelledError:
                if stream.broken is None:  # the link itself is being cancelled
                    raise
                raise ConnectionError(f"the stream's writer failed: {stream.broken!r}") from None
            if resp is grpc.aio.EOF:
                if self.closing:
                    return
                raise await eof_error(call)
            if resp is None:  # grpc hands back None for a reply it could not parse
                raise ConnectionError("a reply from the coordinator could not be parsed")
            for reply in resp.replies:
                self._dispatch(stream, reply)
            if resp.ack_seq:
                self._confirm(stream, resp.ack_seq)

    def _dispatch(self, stream: Stream, reply: agent_pb2.MuxReply) -> None:
        if reply.HasField("end"):
            self._ended(stream, reply)
            return
        resp, now = reply.reply, time.monotonic()
        if resp.HasField("session"):
            self._granted(stream, reply.locals, resp, now)
            return
        halts = tuple(Halt.from_pb(h) for h in resp.halts)
        verdict = verdict_of(resp, halts, now)  # the same for every instance it lists
        # A stop cancels the work of every instance listed first; their acknowledgements
        # are built, and the writer woken, on a later turn, after the cancelled work ran.
        later: list[Callable[[], None]] | None = [] if verdict.stop is not None else None
        applied: list[Core] = []
        members, wire = self.members, list(resp.halts)
        shared = (wire, stops(wire))  # the same for every instance it lists
        for local in reply.locals:
            core = members.get(local)
            if core is not None and core.stream is stream:
                applied.append(core)
                try:  # one instance's hook that raises must not keep the order from the rest
                    core.apply(resp, halts, verdict, later=later, wire=shared)
                except Exception:
                    log.exception("tether: applying an order to instance %d failed", local)
        if later is not None:
            self.loop.call_soon(self._acknowledge, later, applied)

    def _acknowledge(self, later: list[Callable[[], None]], stopped: list[Core]) -> None:
        """After a stop's cancels: record the passes they ended, queue the acks, then have
        the writer send them and the newest checkpoints, one request for the whole stream."""
        self.ends.run()  # the acks carry the records of what was in flight, ended
        for ack in later:
            try:
                ack()
            except Exception:
                log.exception("tether: acknowledging a stop failed")
        for core in stopped:
            self.mark(core)

    def _granted(
        self, stream: Stream, locals_: Any, resp: agent_pb2.HeartbeatResponse, now: float
    ) -> None:
        grant = resp.session
        self._ttl = grant.ttl_ms / 1000.0
        self._interval = max(grant.heartbeat_interval_ms / 1000.0, 0.01)
        for local in locals_:
            core = self.members.get(local)
            if core is None or core.closing or core.ended:
                self._orphans.append(local)  # it left while registering: end its session
            else:
                core.on_grant(stream, resp, now)
                self._dirty.add(core)  # what it queued meanwhile goes now
        stream.beating = True
        self._wake.set()

    def _ended(self, stream: Stream, reply: agent_pb2.MuxReply) -> None:
        end = reply.end
        for local in reply.locals:
            core = self.members.get(local)
            if core is None or stream not in (core.stream, core.pending):
                continue  # an end of an earlier registration, on an earlier stream
            if not core.on_end(end.code, end.message):
                delay = _INITIAL_BACKOFF * (1 + 9 * random.random())
                self.loop.call_later(delay, self._register_again, core)

    def _register_again(self, core: Core) -> None:
        stream = self.current
        wanted = core.local in self.members and not (core.closing or core.ended)
        if wanted and stream is not None and stream not in (core.stream, core.pending):
            self._registering[core.local] = core
            self._wake.set()

    def _confirm(self, stream: Stream, seq: int) -> None:
        sent = stream.confirm(seq)
        if sent is None:
            return
        for core in self._lost | self._observed:
            if core.stream is stream and core.confirmed(sent):
                self._lost.discard(core)

    # -- the watchdog ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Fail closed in full, stop hooks too, every member whose stream went quiet."""
        while True:
            await asyncio.sleep(max(self._ttl / 4, 0.05))
            now, stream = time.monotonic(), self.current
            fresh = stream is not None and now - stream.confirmed_at <= self._ttl
            for core in list(self.members.values()):
                if fresh and core.stream is stream:
                    continue
                if core.lost(now):
                    self._lost.add(core)


def _cancel_on_error(stream: Stream, writer: asyncio.Task[None]) -> None:
    """A writer that failed ends the stream, so that the reader sees it and reconnects."""
    if not writer.cancelled() and writer.exception() is not None:
        stream.broken = writer.exception()
        stream.call.cancel()
