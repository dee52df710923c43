"""GetStatus: what one coordinator sees, for ``tether doctor`` to compare across coordinators.

The halt view is proven fresh, not assumed: the answer reads the halts from etcd and says
whether the coordinator's in-memory view (kept by its watch) holds exactly those. A view a
few milliseconds behind a halt just written is given a moment to catch up.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from tether.v1 import admin_pb2, types_pb2

from tether_server._canary import visible
from tether_server._etcd import EtcdUnavailable
from tether_server._halts import halt_from_kv
from tether_server._store import HALTS

if TYPE_CHECKING:
    from tether_server._canary import Canary
    from tether_server._coordinator import Coordinator

StatusSource = Callable[[], Awaitable[admin_pb2.CoordinatorStatus]]
"""Answers GetStatus for one coordinator."""

_CATCH_UP = (0.05, 0.1, 0.2, 0.4)  # seconds the view may take to catch up, between reads


def digest(halts: Iterable[types_pb2.Halt]) -> str:
    """sha256 over the halts' ids, revisions and modes, sorted: equal views, equal digests."""
    lines = sorted(f"{h.id}@{h.revision}:{h.mode}" for h in halts)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def status_source(coordinator: Coordinator, canary: Canary | None) -> StatusSource:
    """GetStatus's answer for ``coordinator``, and its canary, if it runs one."""

    async def status() -> admin_pb2.CoordinatorStatus:
        config = coordinator.config
        out = admin_pb2.CoordinatorStatus(
            coordinator_id=config.coordinator_id,
            listen=config.listen,
            serving=coordinator.attached.is_set(),
            tls=config.tls_cert is not None,
            client_auth=config.tls_client_ca is not None,
        )
        out.lease_ttl.FromMilliseconds(int(config.lease_ttl * 1000))
        signer = coordinator.gate.signer
        out.permit_key_id = signer.key_id if signer is not None else ""
        await _halt_view(coordinator, out)
        if canary is not None:
            out.canary.CopyFrom(canary.status())
        out.now.GetCurrentTime()
        return out

    return status


async def _halt_view(coordinator: Coordinator, out: admin_pb2.CoordinatorStatus) -> None:
    """The view's revision, size and digest, and whether etcd holds the same halts."""
    for pause in (*_CATCH_UP, None):
        view = visible(coordinator.halts.halts.values())
        out.halt_view_revision = coordinator.halts.revision
        out.halts, out.halt_view_digest = len(view), digest(view)
        try:
            resp = await coordinator.store.range(HALTS)
        except EtcdUnavailable as err:
            out.etcd_error = str(err)
            return
        out.etcd_cluster_id = resp.header.cluster_id
        out.etcd_member_id = resp.header.member_id
        out.etcd_revision = resp.header.revision
        in_etcd = digest(visible(halt_from_kv(kv) for kv in resp.kvs))
        out.halt_view_fresh = in_etcd == out.halt_view_digest
        if out.halt_view_fresh or pause is None:
            return
        await asyncio.sleep(pause)
