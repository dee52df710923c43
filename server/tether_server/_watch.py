"""etcd watches over a key prefix: a plain one for operators' streams, and the coordinator's
halt watch, which moves to another member when its own fails and proves it is current."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aetcd import rpc

from tether_server._errors import Unavailable
from tether_server._etcd import REQUIRE_LEADER, Member, Store
from tether_server._freshness import Freshness
from tether_server._store import prefix_end

log = logging.getLogger("tether_server")

_RETRY = 0.1  # seconds between attempts on the next member, and between failed proofs
_MAX_BACKOFF = 0.5


class WatchBroken(Unavailable):
    """The watch ended: etcd is unreachable, or it cancelled or compacted the watch."""


class WatchStalled(WatchBroken):
    """The halt view could not be proven current within the deadline."""


class _Interrupted(Exception):
    """The stream on one member ended; the watch goes on on the next."""


def _create(prefix: bytes, start_revision: int, end: bytes | None = None) -> Any:
    create = rpc.WatchCreateRequest(
        key=prefix,
        range_end=end or prefix_end(prefix),
        start_revision=start_revision,
        prev_kv=True,
    )
    return rpc.WatchRequest(create_request=create)


async def watch_prefix(
    store: Store, prefix: bytes, start_revision: int, *, end: bytes | None = None
) -> AsyncIterator[Any]:
    """Yield every WatchResponse that carries events under ``prefix`` after ``start_revision``.

    ``end`` widens the watch to every key from ``prefix`` up to (not including) ``end``.

    Raises:
        WatchBroken: the stream failed or etcd cancelled it; the caller must resync.
    """
    member = store.member()
    requests: asyncio.Queue[Any] = asyncio.Queue()
    requests.put_nowait(_create(prefix, start_revision, end))

    async def outgoing() -> AsyncIterator[Any]:
        while True:
            yield await requests.get()

    call = member.watch.Watch(outgoing(), metadata=REQUIRE_LEADER)
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
        store.failed(member, err)
        raise WatchBroken(str(store.unavailable(err, member))) from err
    finally:
        call.cancel()


class ResumingWatch:
    """A watch on ``prefix`` that outlives the member it runs on.

    When its stream ends (the member died, refused it, lost its leader, or the prover
    found it silent), it opens a new one on the store's next member, from the revision
    after the last one it delivered: no event is lost or repeated. Only a compaction past
    that revision ends it, with ``WatchBroken``: the events in between are gone, and the
    caller must reload.

    Args:
        store: where the members are.
        prefix: the keys to watch.
        after: the revision the caller's view is at; events after it are delivered.
        reached: called with each revision the watch is known to have delivered up to.
    """

    def __init__(
        self, store: Store, prefix: bytes, after: int, reached: Callable[[int], None]
    ) -> None:
        self._store, self._prefix, self._reached = store, prefix, reached
        self.revision = after
        self.asked_at = 0.0  # when progress was last asked for
        self.heard_at = 0.0  # when the stream last said anything
        self._requests: asyncio.Queue[Any] | None = None
        self._call: Any = None
        self._abandoned = ""

    async def events(self) -> AsyncIterator[Any]:
        """Yield every WatchResponse that carries events, across members.

        Raises:
            WatchBroken: etcd compacted the revisions the watch still needed.
        """
        backoff = _RETRY
        while True:
            member = self._store.member()
            try:
                async with contextlib.aclosing(self._stream(member)) as stream:
                    async for resp in stream:
                        backoff = _RETRY
                        yield resp
            except _Interrupted as err:
                self._store.failed(member, err)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _stream(self, member: Member) -> AsyncGenerator[Any, None]:
        requests: asyncio.Queue[Any] = asyncio.Queue()
        requests.put_nowait(_create(self._prefix, self.revision + 1))

        async def outgoing() -> AsyncIterator[Any]:
            while True:
                yield await requests.get()

        call = member.watch.Watch(outgoing(), metadata=REQUIRE_LEADER)
        self._call, self._requests, self._abandoned = call, requests, ""
        self.asked_at = self.heard_at = 0.0  # silence is counted from an ask on this stream
        try:
            async for resp in call:
                self.heard_at = time.monotonic()
                if resp.events:
                    yield resp
                    self.revision = max(self.revision, resp.events[-1].kv.mod_revision)
                    self._reached(self.revision)
                else:
                    self._quiet(resp)
            raise _Interrupted("etcd ended the watch")
        except grpc.RpcError as err:
            raise _Interrupted(self._abandoned or str(err.details())) from err
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._abandoned or (task is not None and task.cancelling()):
                raise
            raise _Interrupted(self._abandoned) from None
        finally:
            self._call = self._requests = None
            call.cancel()

    def _quiet(self, resp: Any) -> None:
        """A response without events: created, cancelled, or a progress notification."""
        if resp.compact_revision:
            raise WatchBroken(
                f"etcd compacted the watch on {self._prefix.decode()} "
                f"at {resp.compact_revision}; the halts must be reloaded"
            )
        if resp.canceled:
            raise _Interrupted(f"etcd cancelled the watch: {resp.cancel_reason}")
        if not resp.created:
            self._reached(resp.header.revision)

    def request_progress(self) -> bool:
        """Ask the live stream for a progress notification; False if none is open."""
        if self._requests is None:
            return False
        self._requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        if self.heard_at >= self.asked_at:  # the previous request was answered
            self.asked_at = time.monotonic()
        return True

    def silent_for(self, now: float) -> float:
        """Seconds an unanswered progress request has been waiting; 0 if none waits."""
        return now - self.asked_at if self.asked_at > self.heard_at else 0.0

    def abandon(self, reason: str) -> None:
        """Give up the live stream: the watch resumes on the next member."""
        if self._call is not None:
            log.warning("halt watch: %s; moving to another etcd member", reason)
            self._abandoned = reason
            self._call.cancel()


async def prove_fresh(
    watch: ResumingWatch,
    read: Callable[[float], Awaitable[int]],
    fresh: Freshness,
    period: float,
) -> None:
    """Prove the view ``watch`` feeds current every ``period``, until it cannot be.

    Each round reads etcd's revision (``read(timeout)``, linearizable) and asks the watch
    for progress; ``fresh`` hears what the watch delivers. A watch that leaves a progress
    request unanswered for a period is abandoned, so it moves to another member.

    Raises:
        WatchStalled: no proof within ``fresh.deadline``.
    """
    last = "the watch delivered no progress notification"
    while True:
        now = time.monotonic()
        if not fresh.fresh(now):
            raise WatchStalled(
                f"etcd could not prove the halt view current for {fresh.age(now):.1f}s "
                f"(deadline {fresh.deadline:.1f}s): {last}"
            )
        if watch.silent_for(now) > period:
            last = f"no answer to a progress request for {watch.silent_for(now):.1f}s"
            watch.abandon(last)
        wait = _RETRY
        try:
            fresh.asked(now, await read(max(_RETRY, min(period, fresh.expires_in(now)))))
            if watch.request_progress():
                wait = period
        except Unavailable as err:
            last = str(err)  # the store moved to another member; try it at once
        await asyncio.sleep(max(0.0, min(wait, fresh.expires_in(time.monotonic()) + 0.01)))
