"""The canary: a synthetic instance the coordinator kills and resumes on itself, through etcd.

``tether serve --canary-interval 60s`` proves the kill path every interval, end to end: the
canary registers over a real Heartbeat stream (on a private Unix socket, so it needs no
certificate), a halt for it is written to etcd, and the time until the stop order reaches
its stream is recorded as ``tether.canary.kill.duration`` (seconds). The halt is then
deleted and the canary says goodbye. When the stop does not arrive within the lease TTL,
the kill path is broken (a stalled watch, say): health goes NOT_SERVING until a cycle works.

The canary lives in the reserved tenant ``_canary``. It is not a valid tenant name (names
start with a letter or digit), so no agent can register as it; the coordinator admits only
its own canary, which carries a secret made at start. Canary instances and halts are left
out of ListAgents, WatchAgents and ListHalts unless the tenant ``_canary`` is asked for, and
a canary cycle writes no audit entry: its halt is written directly, and it sends no KillAck.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from opentelemetry import metrics
from tether.v1 import admin_pb2, agent_pb2, agent_pb2_grpc, types_pb2

from tether_server._config import ServerConfig
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._selectors import halt_id
from tether_server._store import InstanceKey, delete_op, halt_key, put_op, to_json
from tether_server._telemetry import SECONDS_BUCKETS

log = logging.getLogger("tether_server")

CANARY_TENANT = "_canary"
CANARY_AGENT = "canary"
CANARY_METADATA = "x-tether-canary"


class CanaryFailed(Exception):
    """A canary cycle did not complete; the message says where it stopped."""


def hidden(tenant: str, asked: str) -> bool:
    """Whether a listing for tenant ``asked`` ('' for all) leaves out an entry of ``tenant``."""
    return tenant == CANARY_TENANT and asked != CANARY_TENANT


def visible(halts: Iterable[types_pb2.Halt]) -> list[types_pb2.Halt]:
    """The halts that are not the canaries'."""
    return [h for h in halts if h.selector.tenant != CANARY_TENANT]


class Canary:
    """Kills and resumes a synthetic instance of this coordinator every ``interval``.

    Args:
        config: The coordinator's; ``canary_interval`` and ``lease_ttl`` set the pace and
            the deadline; ``coordinator_id`` names the canary's run (``_canary-ID``).
        store: etcd, where the canary's halt is written.
        health: Set NOT_SERVING when a cycle fails, SERVING when one works again.
        attached: Set while the coordinator holds etcd; cycles wait for it.
        services: The health services the canary's verdict sets.
    """

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        health: HealthServicer,
        attached: asyncio.Event,
        services: Iterable[str],
    ) -> None:
        self._services = tuple(services)
        self._interval = config.canary_interval
        self._deadline = config.lease_ttl
        self._store = store
        self._health = health
        self._attached = attached
        self._secret = secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix="tether-canary-"))  # 0700: only us
        self.address = f"unix:{self._dir / 'canary.sock'}"
        # Outside the name rules, like the tenant: no agent can claim this run before us.
        run = f"{CANARY_TENANT}-{config.coordinator_id}"
        self.key = InstanceKey(CANARY_TENANT, CANARY_AGENT, run, run)
        self._selector = types_pb2.Selector(
            scope=types_pb2.SCOPE_RUN, tenant=CANARY_TENANT, agent=CANARY_AGENT, run_id=run
        )
        self._halt_id = halt_id(self._selector)
        self._state = admin_pb2.CanaryStatus(enabled=True, ok=True)
        self._state.interval.FromMilliseconds(int(self._interval * 1000))
        self._duration = metrics.get_meter("tether_server").create_histogram(
            "tether.canary.kill.duration",
            unit="s",
            description="Canary: from its halt written to etcd to the stop on its stream",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )

    def status(self) -> admin_pb2.CanaryStatus:
        """How the canary fares: for the GetStatus RPC and ``tether doctor``."""
        out = admin_pb2.CanaryStatus()
        out.CopyFrom(self._state)
        return out

    def admits(self, register: agent_pb2.Register, metadata: Iterable[Any]) -> InstanceKey | None:
        """The canary's key when ``register`` is this coordinator's own canary; None otherwise."""
        if register.tenant != CANARY_TENANT:
            return None
        said = dict(metadata or ()).get(CANARY_METADATA, "")
        if not secrets.compare_digest(str(said), self._secret):
            return None
        return self.key

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    async def run(self) -> None:
        """Cycle every interval while the coordinator holds etcd, until cancelled."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            while True:
                await asyncio.sleep(self._interval)
                if not self._attached.is_set():
                    continue  # the coordinator is NOT_SERVING already and says why
                try:
                    took = await asyncio.wait_for(self._cycle(stub), self._deadline * 2)
                except (CanaryFailed, EtcdUnavailable, grpc.RpcError) as err:
                    await self._failed(_reason(err))
                except TimeoutError:
                    await self._failed(f"a cycle took over {self._deadline * 2:g}s")
                else:
                    await self._passed(took)

    async def _cycle(self, stub: Any) -> float:
        """Register, kill through etcd, see the stop, resume, see it lifted, say goodbye."""
        call = stub.Heartbeat(metadata=((CANARY_METADATA, self._secret),))
        try:
            await call.write(self._register())
            await self._until(call, lambda r: r.HasField("session"), "registration")
            lease, _ = await self._store.grant(self._deadline)  # a crash leaves no halt behind
            sent = time.monotonic()
            await self._store.txn((), [put_op(halt_key(self._halt_id), self._halt(), lease)])
            await self._until(call, self._killed, "kill")
            took = time.monotonic() - sent
            await self._store.txn((), [delete_op(halt_key(self._halt_id))])
            await self._until(call, lambda r: not self._killed(r), "resume")
            await call.write(agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye()))
            await call.done_writing()
            return took
        finally:
            call.cancel()

    def _register(self) -> agent_pb2.HeartbeatRequest:
        tenant, agent, run, instance = self.key
        reg = agent_pb2.Register(tenant=tenant, agent=agent, run_id=run, instance_id=instance)
        return agent_pb2.HeartbeatRequest(register=reg)

    def _halt(self) -> bytes:
        halt = types_pb2.Halt(
            id=self._halt_id,
            selector=self._selector,
            reason="canary: proving the kill path",
            actor="tether-canary",
            mode=types_pb2.KILL_MODE_HARD,
        )
        halt.created_at.GetCurrentTime()
        return to_json(halt)

    def _killed(self, reply: agent_pb2.HeartbeatResponse) -> bool:
        return any(h.id == self._halt_id for h in reply.halts)

    async def _until(self, call: Any, done: Any, what: str) -> None:
        """Read replies until ``done(reply)``, within the deadline."""
        try:
            async with asyncio.timeout(self._deadline):
                while (reply := await call.read()) is not grpc.aio.EOF:
                    if reply.fail_closed_reason:
                        raise CanaryFailed(f"failed closed: {reply.fail_closed_reason}")
                    if done(reply):
                        return
        except TimeoutError:
            raise CanaryFailed(f"canary {what} not seen within {self._deadline:g}s") from None
        raise CanaryFailed(f"the canary's stream ended before its {what}")

    async def _passed(self, took: float) -> None:
        self._duration.record(took)
        recovered = not self._state.ok
        self._state.ok, self._state.problem = True, ""
        self._state.cycles += 1
        self._state.last_kill.FromNanoseconds(int(took * 1e9))
        self._state.last_at.GetCurrentTime()
        if recovered:
            log.warning("canary: the kill path works again (%.1f ms); SERVING", took * 1e3)
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        else:
            log.info("canary kill seen in %.1f ms", took * 1e3)

    async def _failed(self, problem: str) -> None:
        if self._state.ok:
            log.error("canary: %s; the kill path is broken: NOT_SERVING", problem)
        self._state.ok, self._state.problem = False, problem
        self._state.last_at.GetCurrentTime()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: Any) -> None:
        for service in self._services:
            await self._health.set(service, status)


def _reason(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"canary stream refused: {err.code().name}: {err.details()}"
    return str(err)
