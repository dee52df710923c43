"""The effect gate: every side effect an agent takes passes through it and into the ledger.

    with agent.effect("send_email", key=f"batch-{i}") as fx:
        send(batch, permit=fx.permit)

Local mode (the default) reads the halt state the stream keeps fresh: no round trip. Strict
mode asks the coordinator over the stream before the effect leaves and carries a signed
permit that downstream tools can verify. Either way the ledger records the effect as
intended, then landed or failed, or refused with the halt that refused it; an effect whose
key already landed in this run raises ``DuplicateEffect`` instead of running again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from tether._errors import CapabilityFrozen, Killed, TetherError, TetherLost
from tether._types import Halt
from tether.v1 import types_pb2

if TYPE_CHECKING:
    from tether._core import Core

F = TypeVar("F", bound=Callable[..., Any])


class DuplicateEffect(TetherError):
    """The effect's idempotency key already landed in this run; it did not run again."""

    def __init__(self, capability: str, key: str) -> None:
        super().__init__(f"{capability} {key!r} already landed in this run; not sent again")
        self.capability = capability
        self.key = key


def _now(ts: Any) -> None:
    ts.FromNanoseconds(time.time_ns())


class Effect:
    """One pass through the gate. Reusable as a decorator: each call is a fresh pass."""

    def __init__(
        self,
        core: Core,
        loop: Callable[[], asyncio.AbstractEventLoop | None],
        capability: str,
        key: str | Callable[..., str] | None,
        strict: bool,
        *,
        drain: bool = False,
    ) -> None:
        self._core, self._loop = core, loop
        self.capability, self._key, self.strict = capability, key, strict
        self.drain = drain
        self.key = key if isinstance(key, str) else ""
        self.permit = ""
        self.record = types_pb2.Effect()

    # -- the pass -----------------------------------------------------------------------------

    def _begin(self) -> None:
        record = self.record = types_pb2.Effect(
            effect_id=uuid.uuid4().hex, key=self.key, capability=self.capability, strict=self.strict
        )
        _now(record.intended_at)
        if self.key and self.key in self._core.landed:
            self._finish(types_pb2.EFFECT_STATUS_DUPLICATE)
            raise DuplicateEffect(self.capability, self.key)

    @contextlib.contextmanager
    def _refusing(self) -> Iterator[None]:
        """A stop raised inside is recorded in the ledger as a refusal, then re-raised."""
        try:
            yield
        except Killed as stop:
            if not self.record.status:
                self._refuse(stop.halt_id)
            raise

    def _local(self) -> None:
        with self._refusing():
            self._core.check(self.capability, drain=self.drain)
        self._intend()

    def _decided(self, decision: Any) -> None:
        if decision.duplicate:
            self._finish(types_pb2.EFFECT_STATUS_DUPLICATE)
            raise DuplicateEffect(self.capability, self.key)
        if not decision.granted and not decision.refused_by.id:
            reason = decision.refused_by.reason or "the coordinator refused the permit"
            self._refuse("")
            raise TetherLost(reason)  # no halt refused it: the coordinator cannot vouch
        if not decision.granted:
            halt = Halt.from_pb(decision.refused_by)
            self._refuse(halt.id)
            scope = halt.selector.scope.value
            if halt.selector.capability:
                raise CapabilityFrozen(
                    self.capability, halt.reason, scope=scope, actor=halt.actor, halt_id=halt.id
                )
            raise Killed(halt.reason or "refused", scope=scope, actor=halt.actor, halt_id=halt.id)
        self.permit = decision.permit
        self.record.permit_revision = decision.revision
        self._intend()

    def _intend(self) -> None:
        intended = types_pb2.Effect()
        intended.CopyFrom(self.record)
        intended.status = types_pb2.EFFECT_STATUS_INTENDED
        self._core.record(intended)
        self._core.stops.track(intended, None)

    def _refuse(self, halt_id: str) -> None:
        self.record.refused_by = halt_id
        self._finish(types_pb2.EFFECT_STATUS_REFUSED)

    def _end(self, exc: BaseException | None) -> None:
        self._core.stops.untrack(self.record.effect_id)
        if exc is None:
            self._finish(types_pb2.EFFECT_STATUS_LANDED)
        elif isinstance(exc, asyncio.CancelledError) and self._core.stops.stop_in_force.is_set():
            self.record.error = "cancelled by a kill"
            self._finish(types_pb2.EFFECT_STATUS_CANCELLED)
        else:
            self.record.error = f"{type(exc).__name__}: {exc}"[:500]
            self._finish(types_pb2.EFFECT_STATUS_FAILED)

    def _finish(self, status: int) -> None:
        self.record.status = status  # type: ignore[assignment]
        _now(self.record.ended_at)
        self._core.record(self.record)

    # -- sync and async front doors -----------------------------------------------------------

    def __enter__(self) -> Effect:
        self._begin()
        if not self.strict:
            self._local()
            return self
        loop = self._loop()
        if loop is None:
            raise TetherError("strict effects in asyncio code need `async with agent.effect(...)`")
        with self._refusing():
            self._core.check(drain=self.drain)  # a stop already known needs no round trip
            permit = self._core.permit(self.capability, self.key, drain=self.drain)
            self._decided(asyncio.run_coroutine_threadsafe(permit, loop).result())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end(exc)

    async def __aenter__(self) -> Effect:
        self._begin()
        if not self.strict:
            self._local()
        else:
            with self._refusing():
                self._core.check(drain=self.drain)
                permit = await self._core.permit(self.capability, self.key, drain=self.drain)
                self._decided(permit)
        self._core.stops.track(self.record, asyncio.current_task())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end(exc)

    def __call__(self, fn: F) -> F:
        """Decorator form: ``key``, if callable, is called with the function's arguments."""

        def fresh(args: Any, kwargs: Any) -> Effect:
            key = self._key(*args, **kwargs) if callable(self._key) else self._key
            return Effect(
                self._core, self._loop, self.capability, key, self.strict, drain=self.drain
            )

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with fresh(args, kwargs):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with fresh(args, kwargs):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]
