"""The etcd key layout and the few KV operations the coordinator makes.

Everything Tether knows lives under ``/tether/``. What WatchAgents needs sits under
``/tether/fleet/`` so that one watch sees it all::

    /tether/fleet/halts/<halt id>                    Halt (JSON), until resumed
    /tether/fleet/live/<tenant>/<agent>/<run>/<inst> session id, on its coordinator's lease
    /tether/fleet/roster/<tenant>/<agent>/<run>/<inst> AgentInstance (JSON), outlives presence
    /tether/checkpoints/<tenant>/<agent>/<run>       the run's last checkpoint (Struct JSON)
    /tether/runs/<run>                               "<tenant>/<agent>" of a run, for run kills
    /tether/ledger/<tenant>/<agent>/<run>/<chunk>    EffectBatch (JSON), append-only
    /tether/audit/<time ns>-<random>                 AuditEntry (JSON), append-only
    /tether/audit-head                               the hash of the newest audit entry
    /tether/keys/permit-ed25519                      the shared permit key, unless --permit-key
    /tether/coordinators/<id>                        on the coordinator's own lease

Keys are built and parsed only here, by the typed functions below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc
from aetcd import rpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tether_server._errors import Unavailable

ROOT = b"/tether/"
FLEET = ROOT + b"fleet/"
HALTS = FLEET + b"halts/"
LIVE = FLEET + b"live/"
ROSTER = FLEET + b"roster/"
CHECKPOINTS = ROOT + b"checkpoints/"
RUNS = ROOT + b"runs/"
LEDGER = ROOT + b"ledger/"
AUDIT = ROOT + b"audit/"
AUDIT_HEAD = ROOT + b"audit-head"
KEYS = ROOT + b"keys/"
PERMIT_KEY = KEYS + b"permit-ed25519"
COORDINATORS = ROOT + b"coordinators/"

# etcd's defaults: --max-txn-ops 128 and --max-request-bytes 1.5 MiB. Batched writes are
# split to fit both, with room for the transaction's own framing.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
]

M = TypeVar("M", bound=Message)
log = logging.getLogger("tether_server")


class EtcdUnavailable(Unavailable):
    """etcd did not answer; the message says which endpoint and why."""


class RunKey(NamedTuple):
    """One run: what a checkpoint and a ledger belong to."""

    tenant: str
    agent: str
    run_id: str


class InstanceKey(NamedTuple):
    """Who an instance is; also the tail of its presence and roster keys."""

    tenant: str
    agent: str
    run_id: str
    instance_id: str

    @property
    def run(self) -> RunKey:
        return RunKey(self.tenant, self.agent, self.run_id)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.tenant, self.agent, self.run_id, self.instance_id)


# -- keys: built and parsed here only -----------------------------------------------------


def _join(prefix: bytes, *parts: str) -> bytes:
    return prefix + "/".join(parts).encode()


def live_key(key: InstanceKey) -> bytes:
    """The instance's presence: exists while a coordinator serves its stream."""
    return _join(LIVE, *key.parts)


def roster_key(key: InstanceKey) -> bytes:
    """The instance's record, which outlives its presence."""
    return _join(ROSTER, *key.parts)


def roster_prefix(tenant: str, agent: str = "") -> bytes:
    """Every roster key of a tenant, or of one agent of it."""
    return _join(ROSTER, *(p for p in (tenant, agent) if p), "")


def instance_of(raw: bytes) -> InstanceKey | None:
    """The instance a presence or roster key names; None for any other key."""
    for prefix in (LIVE, ROSTER):
        if raw.startswith(prefix):
            parts = raw[len(prefix) :].decode().split("/")
            return InstanceKey(*parts) if len(parts) == 4 else None
    return None


def checkpoint_key(run: RunKey) -> bytes:
    return _join(CHECKPOINTS, *run)


def checkpoint_prefix(tenant: str = "") -> bytes:
    """Every checkpoint, or every checkpoint of one tenant."""
    return _join(CHECKPOINTS, tenant, "") if tenant else CHECKPOINTS


def run_of_checkpoint(raw: bytes) -> RunKey | None:
    """The run a checkpoint key belongs to; None for any other key."""
    if not raw.startswith(CHECKPOINTS):
        return None
    parts = raw[len(CHECKPOINTS) :].decode().split("/")
    return RunKey(*parts) if len(parts) == 3 else None


def run_owner_key(run_id: str) -> bytes:
    """``<tenant>/<agent>`` of a run, so that a run kill can be checked by run id alone."""
    return _join(RUNS, run_id)


def run_owner(run: RunKey) -> bytes:
    """The value under ``run_owner_key``: who the run belongs to."""
    return f"{run.tenant}/{run.agent}".encode()


def owner_of(value: bytes) -> tuple[str, str]:
    """The ``(tenant, agent)`` a ``run_owner`` value names."""
    tenant, _, agent = value.decode().partition("/")
    return tenant, agent


def halt_key(halt_id: str) -> bytes:
    return HALTS + halt_id.encode()


def halt_id_of(raw: bytes) -> str:
    """The halt id a halt key names."""
    return raw[len(HALTS) :].decode()


def ledger_prefix(tenant: str, agent: str = "", run_id: str = "") -> bytes:
    """Every ledger chunk of a tenant, an agent of it, or one run of that agent."""
    return _join(LEDGER, *(p for p in (tenant, agent, run_id) if p), "")


def ledger_chunk_key(run: RunKey, name: str) -> bytes:
    return ledger_prefix(*run) + name.encode()


def audit_key(entry_id: str) -> bytes:
    return AUDIT + entry_id.encode()


def coordinator_key(coordinator_id: str) -> bytes:
    return _join(COORDINATORS, coordinator_id)


async def every(interval: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``step`` every ``interval`` seconds; when etcd does not answer, defer it."""
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except EtcdUnavailable as err:
            log.warning("%s deferred: %s", what, err)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover every key starting with prefix."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def to_json(msg: Message) -> bytes:
    return json_format.MessageToJson(msg, indent=None, sort_keys=True).encode()


def from_json(data: bytes, msg: M) -> M:
    json_format.Parse(data, msg, ignore_unknown_fields=True)
    return msg


def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, *, prev_kv: bool = False) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, prev_kv=prev_kv))


def range_op(key: bytes, *, prefix: bool = False) -> Any:
    end = prefix_end(key) if prefix else b""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end))


def absent(key: bytes) -> Any:
    """A compare that holds when ``key`` does not exist."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0
    )


def present(key: bytes) -> Any:
    return rpc.Compare(
        key=key, result=rpc.Compare.GREATER, target=rpc.Compare.CREATE, create_revision=0
    )


def unchanged_since(key: bytes, revision: int) -> Any:
    """A compare that holds while ``key`` was last written at ``revision``."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision
    )


def holds(key: bytes, value: bytes) -> Any:
    """A compare that holds when ``key`` has ``value``."""
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=value)


class Store:
    """A thin async face over etcd's KV and Lease services (aetcd's generated stubs)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = 5.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._target = endpoints[0] if len(endpoints) == 1 else "ipv4:" + ",".join(endpoints)
        self._credentials = credentials
        self._options: list[tuple[str, object]] = list(_CHANNEL_OPTIONS)
        if credentials is not None and len(endpoints) > 1:
            # An ipv4: list has no one host name; verify each member as the first one's name,
            # which a cluster's certificate carries among its SANs.
            host = endpoints[0].rpartition(":")[0]
            self._options.append(("grpc.default_authority", host))
        self.channel: grpc.aio.Channel = self._open(grpc.aio)
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)

    def blocking_channel(self) -> grpc.Channel:
        """A channel on gRPC's blocking API, for a stream driven from its own threads."""
        return self._open(grpc)  # type: ignore[no-any-return]

    def _open(self, api: Any) -> Any:
        """A channel from ``api`` (``grpc`` or ``grpc.aio``), TLS when credentials are set."""
        if self._credentials is None:
            return api.insecure_channel(self._target, options=self._options)
        return api.secure_channel(self._target, self._credentials, options=self._options)

    async def close(self) -> None:
        await self.channel.close()

    def unavailable(self, err: grpc.RpcError) -> EtcdUnavailable:
        details = getattr(err, "details", None)  # both APIs' errors carry details()
        detail = details() if callable(details) else str(err)
        return EtcdUnavailable(f"etcd at {', '.join(self.endpoints)} did not answer: {detail}")

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise self.unavailable(err) from err

    async def range(self, key: bytes, *, prefix: bool = True, limit: int = 0) -> Any:
        end = prefix_end(key) if prefix else b""
        return await self._call(
            self.kv.Range, rpc.RangeRequest(key=key, range_end=end, limit=limit)
        )

    async def exists(self, key: bytes, *, prefix: bool = True) -> bool:
        end = prefix_end(key) if prefix else b""
        req = rpc.RangeRequest(key=key, range_end=end, limit=1, count_only=True)
        return int((await self._call(self.kv.Range, req)).count) > 0

    async def txn(
        self, compare: Iterable[Any], success: Iterable[Any], failure: Iterable[Any] = ()
    ) -> Any:
        req = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._call(self.kv.Txn, req)

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
        resp = await self._call(self.lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=round(ttl)))
        if resp.error:
            raise EtcdUnavailable(f"etcd refused a lease: {resp.error}")
        return int(resp.ID), float(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout)
        except grpc.RpcError as err:
            if isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.NOT_FOUND:
                return  # already expired: the outcome we wanted
            raise self.unavailable(err) from err
