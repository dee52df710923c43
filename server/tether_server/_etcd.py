"""The etcd client: one channel per member, one preferred member, and the few calls Tether makes.

Keys and the operations of a transaction are built in ``_store``; this module only talks to
etcd, and fails over between its members.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from tether_server._errors import Unavailable
from tether_server._store import prefix_end

log = logging.getLogger("tether_server")
T = TypeVar("T")

# etcd's defaults: --max-txn-ops 128 and --max-request-bytes 1.5 MiB. Batched writes are
# split to fit both, with room for the transaction's own framing.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    # A member that comes back is dialled within a second (gRPC's default grows to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

REQUIRE_LEADER = (("hasleader", "true"),)
"""gRPC metadata that etcd reads as clientv3's ``WithRequireLeader``: a member without a
leader refuses the call, and cancels such a stream after three election timeouts."""

# What a failed call says about the member rather than the request.
MEMBER_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class EtcdUnavailable(Unavailable):
    """etcd did not answer; the message says which endpoint and why."""


class Member:
    """One etcd endpoint, the channel to it, and the stubs over that channel."""

    def __init__(self, endpoint: str, channel: grpc.aio.Channel) -> None:
        self.endpoint, self.channel = endpoint, channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.healthy = False  # it served the last call: its failure is news worth a line


class Store:
    """A thin async face over etcd's KV and Lease services, failing over between members.

    aetcd's client dials one host and does not fail over. One channel over ``ipv4:a,b,c``
    (gRPC's default ``pick_first``, as before) kept every call and both long-lived streams
    on the first member that connected while its TCP connection lived, even hung with its
    sockets open; ``round_robin`` skips a closed connection but not a hung one either.
    So there is one channel per member and one *preferred* member: calls, and streams
    opened on ``member()``, go there; a failure that blames the member (UNAVAILABLE: down,
    refused, no leader; DEADLINE_EXCEEDED: hung, cut off) moves the preference on. Nothing
    is retried here: a write that timed out may have been applied, and only the caller
    knows if it may repeat it. Every call carries ``REQUIRE_LEADER``.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = 5.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.endpoints, self.timeout, self._credentials = tuple(endpoints), timeout, credentials
        self.members = [Member(e, self._open(grpc.aio, e)) for e in self.endpoints]
        self._preferred = 0

    def _open(self, api: Any, target: str) -> Any:
        """A channel to one member on ``api`` (``grpc.aio``, or ``grpc`` for the blocking
        API), TLS when credentials are set; each member is verified under its own name."""
        if self._credentials is None:
            return api.insecure_channel(target, options=_CHANNEL_OPTIONS)
        return api.secure_channel(target, self._credentials, options=_CHANNEL_OPTIONS)

    def member(self) -> Member:
        """The member that calls and new streams go to now."""
        return self.members[self._preferred]

    def failed(self, member: Member, err: BaseException) -> None:
        """``member`` could not serve: if it is the preferred one, prefer the next."""
        if member.healthy:
            member.healthy = False
            log.warning("etcd member %s failed: %s", member.endpoint, _detail(err))
        if member is self.member() and len(self.members) > 1:
            self._preferred = (self._preferred + 1) % len(self.members)
            log.debug("etcd: moving to member %s", self.member().endpoint)

    def blocking_channel(self, member: Member) -> grpc.Channel:
        """A channel to ``member`` on gRPC's blocking API, for a stream driven from its own
        threads."""
        return self._open(grpc, member.endpoint)  # type: ignore[no-any-return]

    async def close(self) -> None:
        for member in self.members:
            await member.channel.close()

    def unavailable(self, err: BaseException, member: Member) -> EtcdUnavailable:
        return EtcdUnavailable(f"etcd at {member.endpoint} did not answer: {_detail(err)}")

    async def _call(
        self, method: Callable[[Member], Any], request: Any, timeout: float | None = None
    ) -> Any:
        member = self.member()
        try:
            resp = await method(member)(
                request, timeout=timeout or self.timeout, metadata=REQUIRE_LEADER
            )
        except grpc.RpcError as err:
            if err.code() in MEMBER_DOWN:
                self.failed(member, err)
            raise self.unavailable(err, member) from err
        member.healthy = True
        return resp

    async def range(self, key: bytes, *, prefix: bool = True, limit: int = 0) -> Any:
        end = prefix_end(key) if prefix else b""
        return await self._call(_RANGE, rpc.RangeRequest(key=key, range_end=end, limit=limit))

    async def range_between(self, start: bytes, end: bytes, *, limit: int = 0) -> Any:
        """The keys from ``start`` up to ``end`` (excluded), at most ``limit``: one page."""
        return await self._call(_RANGE, rpc.RangeRequest(key=start, range_end=end, limit=limit))

    async def exists(self, key: bytes, *, prefix: bool = True) -> bool:
        end = prefix_end(key) if prefix else b""
        req = rpc.RangeRequest(key=key, range_end=end, limit=1, count_only=True)
        return int((await self._call(_RANGE, req)).count) > 0

    async def revision(self, key: bytes, timeout: float | None = None) -> int:
        """etcd's revision now, by a linearizable read of next to nothing (a count)."""
        req = rpc.RangeRequest(key=key, range_end=prefix_end(key), count_only=True)
        return int((await self._call(_RANGE, req, timeout)).header.revision)

    async def txn(
        self, compare: Iterable[Any], success: Iterable[Any], failure: Iterable[Any] = ()
    ) -> Any:
        req = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._call(_TXN, req)

    async def put_many(self, ops: Sequence[Any]) -> None:
        """Write ops in as few transactions as etcd's op and size limits allow."""
        batch: list[Any] = []
        size = 0
        for op in ops:
            op_size = op.ByteSize()
            if batch and (len(batch) == MAX_TXN_OPS or size + op_size > MAX_TXN_BYTES):
                await self.txn((), batch)
                batch, size = [], 0
            batch.append(op)
            size += op_size
        if batch:
            await self.txn((), batch)

    async def grant(self, ttl: float) -> tuple[int, float]:
        resp = await self._call(_GRANT, rpc.LeaseGrantRequest(TTL=round(ttl)))
        if resp.error:
            raise EtcdUnavailable(f"etcd refused a lease: {resp.error}")
        return int(resp.ID), float(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(_REVOKE, rpc.LeaseRevokeRequest(ID=lease_id))
        except EtcdUnavailable as err:
            cause = err.__cause__
            if (
                isinstance(cause, grpc.aio.AioRpcError)
                and cause.code() == grpc.StatusCode.NOT_FOUND
            ):
                return  # already expired: the outcome we wanted
            raise


_RANGE, _TXN = operator.attrgetter("kv.Range"), operator.attrgetter("kv.Txn")
_GRANT, _REVOKE = operator.attrgetter("lease.LeaseGrant"), operator.attrgetter("lease.LeaseRevoke")


def _detail(err: BaseException) -> str:
    details = getattr(err, "details", None)  # both gRPC APIs' errors carry details()
    return str(details() if callable(details) else err)


def spawn(tasks: set[asyncio.Task[T]], coro: Coroutine[Any, Any, T]) -> None:
    """Run ``coro`` as a task, held in ``tasks`` until it is done (the loop keeps only a
    weak reference: a task nobody holds may be collected before it finishes)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def every(interval: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``step`` every ``interval`` seconds; when etcd does not answer, defer it."""
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except EtcdUnavailable as err:
            log.warning("%s deferred: %s", what, err)
