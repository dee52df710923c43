"""Work that a kill must reach: a queue that drains or discards, timers, and retries.

Seed 000: queued tasks need drain-or-discard decided up front, and every timer or retry set
before the flip must be cancelled, not "expire harmlessly later".
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tether._errors import Killed
from tether._gate import DuplicateEffect, Effect
from tether.v1 import types_pb2

if TYPE_CHECKING:
    import asyncio

    from tether._core import Core

T = TypeVar("T")


class WorkQueue:
    """Items that each become one gated effect of ``capability``, run by ``handler``.

    On a kill the halt's queue policy decides: DISCARD drops what is queued and records it
    in the ledger as not started, so a resume can pick it up; DRAIN runs it to completion
    through the gate. Either way nothing new can be queued while halted.
    """

    def __init__(
        self,
        core: Core,
        strict_loop: Callable[[], asyncio.AbstractEventLoop | None],
        capability: str,
        handler: Callable[[Any], Any],
        *,
        strict: bool,
    ) -> None:
        self._core = core
        self._strict_loop = strict_loop  # the loop a strict permit blocks on
        self.capability = capability
        self._handler = handler
        self._strict = strict
        self._items: deque[tuple[Any, str]] = deque()
        self.done = 0
        self.discarded: list[str] = []

    def __len__(self) -> int:
        return len(self._items)

    def put(self, payload: Any, *, key: str = "") -> None:
        """Queue one item; raises ``tether.Killed`` while halted."""
        self._core.check(self.capability)
        self._items.append((payload, key))

    def run(self) -> int:
        """Work through the queue; returns how many items ran. Raises ``Killed`` on a
        discarding kill, after recording what it dropped."""
        draining = False
        while self._items:
            payload, key = self._items[0]
            try:
                with self._effect(key, draining):
                    self._handler(payload)
            except DuplicateEffect:
                pass
            except Killed as stop:
                if not draining and self._core.verdict_drains():
                    draining = True
                    continue
                self._discard(stop)
                raise
            self._items.popleft()
            self.done += 1
        return self.done

    def _effect(self, key: str, draining: bool) -> Effect:
        return Effect(
            self._core,
            self._strict_loop,
            self.capability,
            key or None,
            self._strict,
            drain=draining,
        )

    def _discard(self, stop: Killed) -> None:
        core = self._core
        while self._items:
            _, key = self._items.popleft()
            record = types_pb2.Effect(
                effect_id=uuid.uuid4().hex,
                key=key,
                capability=self.capability,
                status=types_pb2.EFFECT_STATUS_NOT_STARTED,
                refused_by=stop.halt_id,
            )
            record.intended_at.GetCurrentTime()
            record.ended_at.GetCurrentTime()
            core.record(record)
            self.discarded.append(key)
            core.stops.discarded += 1


class Timer:
    """A callback set with ``call_later``; a kill cancels it before it fires."""

    def __init__(
        self,
        registry: set[Any],
        check: Callable[[], None],
        delay: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self._registry = registry
        self._check = check
        self._fn, self._args = fn, args
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True
        self.fired = False
        registry.add(self)
        self._timer.start()

    def _fire(self) -> None:
        if self not in self._registry:
            return  # a kill came first
        self._registry.discard(self)
        try:
            self._check()  # a lost tether counts as a kill here too
        except Killed:
            return
        self.fired = True
        self._fn(*self._args)

    def cancel(self) -> None:
        self._registry.discard(self)
        self._timer.cancel()


def retry(
    core: Core,
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Call ``fn`` until it succeeds, checking the tether before every attempt and waking
    at once if a kill arrives during a wait: no retry fires after the stop."""
    for attempt in range(1, attempts + 1):
        core.check()
        try:
            return fn(*args)
        except retry_on:
            if attempt == attempts:
                raise
        if core.stops.stop_in_force.wait(delay * backoff ** (attempt - 1)):
            core.check()
    raise AssertionError("unreachable")  # pragma: no cover
