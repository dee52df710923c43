"""What a stop does inside the agent: cancel timers, cancel or wait out work in flight, and
acknowledge the kill with the final checkpoint and what was in flight.

A hard kill cancels gated asyncio work at once (sync work stops at its next gate or
check). A soft kill lets gated work in flight finish within the halt's grace, then
escalates: what is still running is cancelled and the acknowledgement says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tether._errors import TetherLost
from tether._verdict import Verdict, stops
from tether.v1 import agent_pb2, types_pb2

log = logging.getLogger("tether")


class Ends:
    """The ends of gate passes a kill cancelled, recorded in one batch a turn later.

    A kill's cancels all step in one loop turn; each pass's exit only queues its end here,
    so the cancel of every run reaches its code before any ledger record is built. The
    batch runs before the stop's acks are built (they carry the records, ended), and
    before an instance that leaves says goodbye.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ends: list[Callable[[int], None]] = []

    def later(self, end: Callable[[int], None]) -> bool:
        """Call ``end`` with the time on a later turn; False off this loop (end it now)."""
        if asyncio.get_running_loop() is not self._loop:
            return False
        ends = self._ends
        ends.append(end)
        if len(ends) == 1:
            self._loop.call_soon(self.run)
        return True

    def run(self) -> None:
        """Call the ends queued so far, with one timestamp for them all."""
        ends, self._ends = self._ends, []
        now = time.time_ns()
        for end in ends:
            try:
                end(now)
            except Exception:
                log.exception("tether: recording a cancelled effect failed")


class Stopper:
    """Per-instance stop machinery; its hooks run on the tether's event loop."""

    def __init__(self, send_ack: Callable[[agent_pb2.KillAck], None]) -> None:
        self._send_ack = send_ack  # queues the ack for the stream, with the newest checkpoint
        self._lock = threading.Lock()  # in-flight work is tracked from user threads too
        self.inflight: dict[str, tuple[types_pb2.Effect, asyncio.Task[Any] | None]] = {}
        self.timers: set[Any] = set()  # anything with .cancel()
        self.stop_in_force = threading.Event()  # set while a stop is in force
        self.discarded = 0
        self._soft: tuple[str, asyncio.TimerHandle] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- called by the gate -------------------------------------------------------------------

    def track(self, record: types_pb2.Effect, task: asyncio.Task[Any] | None) -> None:
        with self._lock:
            self.inflight[record.effect_id] = (record, task)

    def untrack(self, effect_id: str) -> None:
        with self._lock:
            self.inflight.pop(effect_id, None)
            drained = self._soft is not None and not self.inflight
        if drained and self._loop is not None:
            self._loop.call_soon_threadsafe(self._soft_drained)

    # -- called by the core when the order changes ----------------------------------------

    def on_order(
        self,
        before: Verdict | None,
        after: Verdict,
        halts: list[types_pb2.Halt],
        later: list[Callable[[], None]] | None = None,
        *,
        stopping: list[types_pb2.Halt] | None = None,
    ) -> None:
        """Act on a new verdict: what a stop cancels, waits out, and acknowledges.

        With ``later``, the acknowledgement is appended there instead of sent: the link
        cancels the work of every instance a reply stops first, and builds the acks after.
        ``stopping``: ``stops(halts)``, when the caller has it already.
        """
        self._loop = asyncio.get_running_loop()
        if after.stop is None:
            self.stop_in_force.clear()
            self._forget_soft()
            return
        self.stop_in_force.set()
        first = before is None or before.stop is None
        if first and self.timers:
            for timer in list(self.timers):
                timer.cancel()
            self.timers.clear()
        if stopping is None:
            stopping = stops(halts)
        if not stopping or isinstance(after.stop, TetherLost):
            if first:
                self._cancel_inflight()  # fail closed: nothing to wait for, nobody to tell
            return
        hard = next((h for h in stopping if h.mode != types_pb2.KILL_MODE_SOFT), None)
        if hard is not None:  # the hardest halt decides, even one that came later
            if first or self._forget_soft():
                in_flight = self._cancel_inflight()
                self._ack_soon(later, hard.id, escalated=not first, in_flight=in_flight)
            return
        if first:
            self._start_soft(min(stopping, key=lambda h: h.grace.ToTimedelta()), later)

    def _start_soft(self, halt: types_pb2.Halt, later: list[Callable[[], None]] | None) -> None:
        assert self._loop is not None
        with self._lock:
            if self.inflight:
                grace = halt.grace.ToTimedelta().total_seconds()
                self._soft = (halt.id, self._loop.call_later(grace, self._grace_over, halt.id))
                return
        self._ack_soon(later, halt.id, escalated=False, in_flight=[])

    def _soft_drained(self) -> None:
        with self._lock:
            if self._soft is None or self.inflight:
                return
            (halt_id, handle), self._soft = self._soft, None
        handle.cancel()
        self._ack(halt_id, escalated=False, in_flight=[])

    def _grace_over(self, halt_id: str) -> None:
        with self._lock:
            if self._soft is None:
                return
            self._soft = None
        self._ack(halt_id, escalated=True, in_flight=self._cancel_inflight())

    def _forget_soft(self) -> bool:
        """Drop a soft kill's pending grace; True if one was pending."""
        with self._lock:
            soft, self._soft = self._soft, None
        if soft is None:
            return False
        soft[1].cancel()
        return True

    def _cancel_inflight(self) -> list[types_pb2.Effect]:
        with self._lock:  # a done task's pass ended already (its record may wait in Ends)
            running = [(r, t) for r, t in self.inflight.values() if t is None or not t.done()]
        for _, task in running:
            if task is not None:
                task.cancel()
        return [record for record, _ in running]

    def _ack_soon(
        self,
        later: list[Callable[[], None]] | None,
        halt_id: str,
        *,
        escalated: bool,
        in_flight: list[types_pb2.Effect],
    ) -> None:
        """Acknowledge now, or append the acknowledgement to ``later``, as it is now."""
        if later is None:
            self._ack(halt_id, escalated=escalated, in_flight=in_flight)
            return
        ack = functools.partial(
            self._ack, halt_id, escalated=escalated, in_flight=in_flight, discarded=self.discarded
        )
        later.append(ack)

    def _ack(
        self,
        halt_id: str,
        *,
        escalated: bool,
        in_flight: list[types_pb2.Effect],
        discarded: int | None = None,
    ) -> None:
        ack = agent_pb2.KillAck(
            halt_id=halt_id,
            escalated=escalated,
            in_flight=in_flight,
            discarded=self.discarded if discarded is None else discarded,
        )
        self._send_ack(ack)
