"""The effect gate: every side effect an agent takes passes through it and into the ledger.

    with agent.effect("send_email", key=f"batch-{i}") as fx:
        fx.undo({"message_id": message_id})   # what reverses it, for `tether compensate`
        send(batch, permit=fx.permit)

Local mode (the default) reads the halt state the stream keeps fresh: no round trip. Strict
mode asks the coordinator over the stream before the effect leaves and carries a signed
permit that downstream tools can verify. Either way the ledger records the effect as
intended, then landed or failed, or refused with the halt that refused it; an effect whose
key already landed in this run raises ``DuplicateEffect`` instead of running again.

One effect per key at a time: a pass whose key another pass of this instance holds waits
for it to end, then raises ``DuplicateEffect`` if it landed, or runs if it did not. A pass
that cannot wait (the same thread or task holds the key, or a sync ``with`` inside an
event loop) raises ``DuplicateEffect`` with ``in_flight`` set. Across instances of a run,
strict mode has the coordinator refuse a key in flight elsewhere the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from tether._errors import InvalidArgument, Killed, TetherError, TetherLost
from tether._types import Halt
from tether._undo import current_trace, undo_struct
from tether._verdict import refusal
from tether.v1 import types_pb2

if TYPE_CHECKING:
    from tether._core import Core

F = TypeVar("F", bound=Callable[..., Any])


MAX_KEY_BYTES = 1024  # the coordinator's limit: a key becomes part of an etcd key


class DuplicateEffect(TetherError):
    """The effect's idempotency key already landed in this run, or is in flight; it did not run.

    Attributes:
        in_flight: True when another pass holds the key now (it may still fail: retry
            then), False when the key already landed.
    """

    def __init__(self, capability: str, key: str, *, in_flight: bool = False) -> None:
        what = "is in flight in this run" if in_flight else "already landed in this run"
        super().__init__(f"{capability} {key!r} {what}; not sent again")
        self.capability = capability
        self.key = key
        self.in_flight = in_flight


_LANDED, _MINE = "landed", "mine"


class InFlight:
    """The idempotency keys held by passes through one instance's gate. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[object, Future[None]]] = {}

    def claim(self, key: str, owner: object, landed: Collection[str]) -> Future[None] | str | None:
        """None: ``owner`` holds ``key`` now. Else "landed", "mine" (``owner`` holds it
        already), or the end of the pass that holds it, to wait for."""
        with self._lock:  # landed is read under the lock that release() takes after it grew
            if key in landed:
                return _LANDED
            held = self._held.get(key)
            if held is None:
                self._held[key] = (owner, Future())
                return None
            return _MINE if held[0] == owner else held[1]

    def release(self, key: str) -> None:
        with self._lock:
            _, end = self._held.pop(key)
        end.set_result(None)


def _owner() -> object:
    """Who holds a key: the asyncio task, else the thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.get_ident()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
        undo: Mapping[str, Any] | None = None,
    ) -> None:
        self._core, self._loop = core, loop
        self.capability, self._key, self.strict = capability, key, strict
        self.drain = drain
        self.key = key if isinstance(key, str) else ""
        if len(self.key.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument(f"effect key is longer than {MAX_KEY_BYTES} bytes; hash it")
        self._undo_given = undo
        self._undo = undo_struct(undo) if undo is not None else None  # refused before it runs
        self.permit = ""
        self.record = types_pb2.Effect()
        self._claimed = False

    def anomaly(self, reason: str) -> None:
        """Flag this effect as deviating from the baseline; anomaly-rate breakers count it.

        Never blocks. The reason goes into the effect's ledger record.
        """
        self.record.anomaly = reason[:500]
        self._core.out.add_signals(anomalies=1)

    # -- the pass -----------------------------------------------------------------------------

    def _begin(self) -> None:
        record = self.record = types_pb2.Effect(
            effect_id=uuid.uuid4().hex, key=self.key, capability=self.capability, strict=self.strict
        )
        _now(record.intended_at)
        record.trace_id, record.span_id = current_trace()
        record.release = self._core.identity.labels.get("version", "")
        if self._undo is not None:
            record.undo.CopyFrom(self._undo)

    def undo(self, data: Mapping[str, Any]) -> None:
        """Attach what reverses this effect (a JSON object of at most 16 KiB) to its record.

        Call it before the effect leaves, or pass ``undo=`` to ``agent.effect``: oversized
        or non-JSON data raises ``tether.InvalidArgument`` here.
        """
        self.record.undo.CopyFrom(undo_struct(data))

    def _claim(self) -> Future[None] | None:
        """Hold the key; returns the end of the pass that holds it, to wait for."""
        if not self.key:
            return None
        held = self._core.in_flight.claim(self.key, _owner(), self._core.landed)
        if held is None:
            self._claimed = True
        elif isinstance(held, str):
            self._duplicate(in_flight=held == _MINE)
        return None if held is None else held

    def _duplicate(self, *, in_flight: bool) -> NoReturn:
        if in_flight:
            self.record.error = "its key is in flight in this run"
        self._finish(types_pb2.EFFECT_STATUS_DUPLICATE)
        raise DuplicateEffect(self.capability, self.key, in_flight=in_flight)

    @contextlib.contextmanager
    def _released_on_error(self) -> Iterator[None]:
        """An error before the effect runs ends the pass: recorded, and the key let go."""
        try:
            yield
        except BaseException:
            if not self.record.status:
                self._refuse("")  # it did not run: no decision, or none that let it
            raise

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
        if decision.duplicate or decision.in_flight:
            self._duplicate(in_flight=decision.in_flight)
        if not decision.granted and not decision.refused_by.id:
            reason = decision.refused_by.reason or "the coordinator refused the permit"
            self._refuse("")
            raise TetherLost(reason)  # no halt refused it: the coordinator cannot vouch
        if not decision.granted:
            halt = Halt.from_pb(decision.refused_by)
            self._refuse(halt.id)
            if halt.selector.writes or halt.selector.capability:
                raise refusal(halt, self.capability)
            scope = halt.selector.scope.value
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
            self._cancelled(time.time_ns())
        else:
            self.record.error = f"{type(exc).__name__}: {exc}"[:500]
            self._finish(types_pb2.EFFECT_STATUS_FAILED)

    def _cancelled(self, now_ns: int) -> None:
        """Record the pass as cancelled by a kill, ended at ``now_ns``."""
        self.record.error = "cancelled by a kill"
        self._finish(types_pb2.EFFECT_STATUS_CANCELLED, now_ns)

    def _killed(self, now_ns: int) -> None:
        """The end of a pass a kill cancelled, run in a batch after the kill's cancels."""
        self._core.stops.untrack(self.record.effect_id)
        self._cancelled(now_ns)

    def _finish(self, status: int, now_ns: int | None = None) -> None:
        self.record.status = status  # type: ignore[assignment]
        self.record.ended_at.FromNanoseconds(time.time_ns() if now_ns is None else now_ns)
        self._core.record(self.record)  # a landed key joins core.landed before the release
        if self._claimed:
            self._claimed = False
            self._core.in_flight.release(self.key)

    # -- sync and async front doors -----------------------------------------------------------

    def __enter__(self) -> Effect:
        loop = self._loop() if self.strict else None
        if self.strict and loop is None:
            raise TetherError("strict effects in asyncio code need `async with agent.effect(...)`")
        self._begin()
        while (held := self._claim()) is not None:
            if _in_event_loop():  # blocking here would stall the loop the holder runs on
                self._duplicate(in_flight=True)
            held.result()
        with self._released_on_error():
            if loop is None:
                self._local()
                return self
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
        while (held := self._claim()) is not None:
            await asyncio.shield(
                asyncio.wrap_future(held)
            )  # a cancelled waiter cancels only itself
        with self._released_on_error():
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
        # Work a kill cancelled: the kill is held already and the pass is over (nothing of
        # it can start again), so its record is built with the other cancels', a turn later.
        if isinstance(exc, asyncio.CancelledError) and self._core.end_later(self._killed):
            return
        self._end(exc)

    def __call__(self, fn: F) -> F:
        """Decorator form: ``key``, if callable, is called with the function's arguments."""

        def fresh(args: Any, kwargs: Any) -> Effect:
            key = self._key(*args, **kwargs) if callable(self._key) else self._key
            return Effect(
                self._core, self._loop, self.capability, key, self.strict, drain=self.drain,
                undo=self._undo_given,
            )  # fmt: skip

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
