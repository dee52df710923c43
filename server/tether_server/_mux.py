"""AgentService.Multiplex: any number of instances of one process on one stream.

Each instance, numbered by its ``local``, is a full session: the same per-session steps as a
Heartbeat stream's (``Sessions.register``, ``take``, ``leave``, ``let_go``), written through
a port of the stream's writer (``_muxbox``). What the instances share is the stream: a
``MuxRequest.seq`` beats them all, silence or a lost etcd ends them all, and the stream's end
makes every instance still open on it STALE. A refused or failed instance ends alone, with a
``MuxEnd``; its local may then be registered again.

Registrations and goodbyes wait for etcd, so they run off the reader: a thousand instances
registering together must not hold up the beat. Frames for an instance that is registering
or leaving wait for it, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from tether.v1 import agent_pb2

from tether_server._errors import ANSWERABLE, status_of
from tether_server._etcd import spawn
from tether_server._halts import COMMITTING
from tether_server._identity import Principal
from tether_server._muxbox import MuxPort, MuxWriter, StreamGone
from tether_server._outbox import DONE, End
from tether_server._registry import Session
from tether_server._wire import malformed

if TYPE_CHECKING:
    from tether_server._sessions import Sessions

log = logging.getLogger("tether_server")


# Frames of one request taken in before the loop serves others: a process's 1,000 runs
# starting their work at once send 1,000 ledger records in one request, and ten such
# streams taken in whole would keep a Kill waiting at each of its awaits for all of them.
_INTAKE_SLICE = 64
_MAKE_WAY_MOST = 0.1  # seconds one request's intake waits, in all, for Kills being committed
_UNCLEAN = "the agent closed its side without goodbye for {} instance(s)"


async def _make_way(quiet: asyncio.Event, until: float) -> None:
    """Let the loop serve others; wait out a push, and a Kill being committed (but not past
    ``until``: Kills one after the other must not hold a stream's beats back for a TTL)."""
    await asyncio.sleep(0)
    if not quiet.is_set():
        await quiet.wait()
    while COMMITTING.kills and time.monotonic() < until:  # noqa: ASYNC110 (a per-process count)
        await asyncio.sleep(0.002)


class _Instance(MuxPort):
    """One local on the stream: its port (itself: one object an instance, not two), its
    session once registered, and the frames that wait while it registers or leaves (None:
    none wait, take them at once)."""

    __slots__ = ("session", "waiting")

    def __init__(self, writer: MuxWriter, local: int, on_end: Callable[[MuxPort, End], None]):
        super().__init__(writer, local, on_end)
        self.session: Session | None = None
        self.waiting: list[agent_pb2.HeartbeatRequest] | None = []


class MuxStream:
    """Reads one Multiplex stream and holds the instances open on it."""

    def __init__(self, sessions: Sessions, context: Any, who: Principal) -> None:
        self._sessions = sessions
        self._who = who
        self._metadata = context.invocation_metadata()
        self._writer = MuxWriter(context, sessions.pushed)
        self._open: dict[int, _Instance] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, requests: AsyncIterator[Any]) -> None:
        """Serve the stream until either side ends it; then every open instance is STALE."""
        writer = self._writer
        try:
            quiet = self._sessions.quiet
            async for req in requests:
                if isinstance(req, int):  # a beat alone, not parsed (_wire.mux_request)
                    if req:
                        writer.at = time.monotonic()
                        await writer.beat(req)
                    continue
                await self._intake(req, quiet)
            if self._open:  # as on Heartbeat: an end without goodbye is not a clean one
                writer.end(End(grpc.StatusCode.CANCELLED, _UNCLEAN.format(len(self._open))))
        except DecodeError as err:  # parsed message by message, here, not at the edge
            writer.end(End(grpc.StatusCode.INVALID_ARGUMENT, malformed(err)))
        except (grpc.RpcError, grpc.aio.AbortError):
            pass  # the agent went away, or this stream was ended from elsewhere
        except Exception as err:  # a bug must end the stream, not leave it hanging
            log.exception("multiplex stream failed")
            writer.end(End(grpc.StatusCode.INTERNAL, f"coordinator error: {type(err).__name__}"))
        finally:
            self._close()
        await writer.close()

    async def _intake(self, req: agent_pb2.MuxRequest, quiet: asyncio.Event) -> None:
        """One request's frames, a slice at a time; then its beat is acknowledged."""
        until = time.monotonic() + _MAKE_WAY_MOST
        if req.seq:
            self._writer.at = until - _MAKE_WAY_MOST  # heard from, however long its intake
        if req.frames and (not quiet.is_set() or COMMITTING.kills):
            await _make_way(quiet, until)  # a kill being pushed or committed goes first
        for n, frame in enumerate(req.frames, 1):
            self._frame(frame.local, frame.body)
            if n % _INTAKE_SLICE == 0:
                await _make_way(quiet, until)
        if req.seq:
            await self._writer.beat(req.seq)

    def _close(self) -> None:
        """The stream ended: each instance still open on it is STALE."""
        self._writer.closed = True
        for inst in self._open.values():
            inst.ended = True
            if inst.session is not None:
                self._sessions.let_go(inst.session)
        self._open.clear()

    def _frame(self, local: int, body: agent_pb2.HeartbeatRequest) -> None:
        inst = self._open.get(local)
        if body.WhichOneof("body") == "register":
            if local == 0:
                self._refuse(0, "frame.local 0 is reserved: number instances from 1")
            elif inst is not None:
                self._end(inst, _bad(f"local {local} is already open: register it once"))
            else:
                self._register(local, body.register)
        elif inst is None:
            self._refuse(local, f"local {local} has no open instance: send register first")
        elif inst.waiting is not None:
            inst.waiting.append(body)
        else:
            self._take(inst, body)

    def _register(self, local: int, register: agent_pb2.Register) -> None:
        inst = self._open[local] = _Instance(self._writer, local, self._end_port)
        spawn(self._tasks, self._admit(inst, register))

    async def _admit(self, inst: _Instance, register: agent_pb2.Register) -> None:
        sessions = self._sessions
        try:
            inst.session = await sessions.register(
                register, self._metadata, self._who, inst, clock=self._writer
            )
        except ANSWERABLE as err:
            if not sessions.serving:  # it can serve no one (etcd lost, starting): go elsewhere
                self._writer.end(End(grpc.StatusCode.UNAVAILABLE, str(err)))
                return
            self._end(inst, End(status_of(err), str(err)))
            return
        except StreamGone:
            return  # its session was let go already
        except Exception as err:  # a bug ends the instance it hit, not its neighbours
            self._failed(inst, err)
            return
        # Admitted now, as a Heartbeat session is: its silence counts from here, even if
        # the registration waited on etcd longer than a TTL since the stream opened.
        self._writer.at = max(self._writer.at, time.monotonic())
        self._resume(inst)

    def _resume(self, inst: _Instance) -> None:
        """Take what waited for the instance, in order, until something makes it wait again."""
        waiting, inst.waiting = inst.waiting or [], None
        for n, body in enumerate(waiting):
            if inst.ended:
                return
            if inst.waiting is not None:  # leaving: the rest comes after its goodbye
                inst.waiting.extend(waiting[n:])
                return
            self._take(inst, body)

    def _take(self, inst: _Instance, body: agent_pb2.HeartbeatRequest) -> None:
        session = inst.session
        assert session is not None
        try:
            goodbye = self._sessions.take(session, body)
        except Exception as err:
            self._ended_by(inst, err)
            return
        if goodbye is not None:
            inst.waiting = []
            spawn(self._tasks, self._leave(inst, session, goodbye))

    async def _leave(self, inst: _Instance, session: Session, goodbye: agent_pb2.Goodbye) -> None:
        try:
            await self._sessions.leave(session, goodbye)
        except Exception as err:
            self._ended_by(inst, err)
            return
        self._end(inst, DONE)

    def _ended_by(self, inst: _Instance, err: Exception) -> None:
        """End the instance ``err`` hit: with its status when answerable, else as a bug."""
        if isinstance(err, ANSWERABLE):
            self._end(inst, End(status_of(err), str(err)))
        else:
            self._failed(inst, err)

    def _failed(self, inst: _Instance, err: Exception) -> None:
        """A bug: log it and end the instance it hit, not its neighbours."""
        log.exception("instance %d of a multiplex stream failed", inst.local, exc_info=err)
        self._end(inst, End(grpc.StatusCode.INTERNAL, f"coordinator error: {type(err).__name__}"))

    def _end(self, inst: _Instance, end: End) -> None:
        """End one instance: write its end and free its local; without goodbye, STALE."""
        if inst.ended:
            return
        inst.finish(end)
        if self._open.get(inst.local) is inst:
            del self._open[inst.local]
        if end is not DONE and inst.session is not None:
            self._sessions.let_go(inst.session)

    def _end_port(self, port: MuxPort, end: End) -> None:
        inst = self._open.get(port.local)
        if inst is not None and inst is port:
            self._end(inst, end)

    def _refuse(self, local: int, message: str) -> None:
        """A frame for no instance: its end, for that local alone."""
        self._writer.post(local, _bad(message))


def _bad(message: str) -> End:
    return End(grpc.StatusCode.INVALID_ARGUMENT, message)
