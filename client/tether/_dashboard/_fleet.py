"""The fleet as the page shows it: one ``WatchAgents`` stream, fanned out to every browser.

``AdminClient`` is synchronous, so the stream runs in one thread of its own; each event is
handed to the event loop, which alone touches the roster and the browsers' queues.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tether._admin import AdminClient
from tether._errors import TetherError
from tether._types import AgentEvent, AgentInstance

Message = tuple[str, dict[str, Any]]  # (SSE event name, JSON data)
QUEUE_SIZE = 256  # a browser further behind than this is sent a fresh snapshot instead


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def instance_row(i: AgentInstance) -> dict[str, Any]:
    """One instance as the page's fleet table reads it."""
    return {
        "key": "/".join((i.tenant, i.agent, i.run_id, i.instance_id)),
        "tenant": i.tenant,
        "agent": i.agent,
        "run_id": i.run_id,
        "instance_id": i.instance_id,
        "state": i.state.value,
        "last_heartbeat": _iso(i.last_heartbeat),
        "ended_at": _iso(i.ended_at),
        "checkpoint": i.checkpoint,
        "coordinator": i.coordinator,
        "labels": i.labels,
        "halts": [h.selector.describe() for h in i.halts],
    }


class Fleet:
    """The newest row of every instance, and the queues of the browsers listening."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.link: dict[str, Any] = {"connected": False, "coordinator": "", "error": "connecting"}
        self._listeners: set[asyncio.Queue[Message]] = set()

    def snapshot(self) -> Message:
        now = datetime.now(UTC).isoformat()
        return "snapshot", {"rows": list(self.rows.values()), "link": self.link, "now": now}

    def subscribe(self) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE_SIZE)
        queue.put_nowait(self.snapshot())
        self._listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message]) -> None:
        self._listeners.discard(queue)

    def apply(self, event: AgentEvent) -> None:
        row = instance_row(event.instance)
        self.rows[row["key"]] = row
        self._broadcast(("agent", row))

    def reset(self, link: dict[str, Any]) -> None:
        """A new stream begins: its snapshot replaces everything known so far."""
        self.rows.clear()
        self.link = link
        for queue in self._listeners:
            self._resync(queue)

    def set_link(self, link: dict[str, Any]) -> None:
        self.link = link
        self._broadcast(("link", link))

    def _broadcast(self, message: Message) -> None:
        for queue in self._listeners:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._resync(queue)

    def _resync(self, queue: asyncio.Queue[Message]) -> None:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(self.snapshot())


class Watcher:
    """Keeps one ``WatchAgents`` stream open, to the next coordinator when one fails."""

    def __init__(
        self,
        fleet: Fleet,
        connect: Callable[[str], AdminClient],
        targets: tuple[str, ...],
        tenant: str,
    ) -> None:
        self._fleet, self._connect, self._targets, self._tenant = fleet, connect, targets, tenant
        self._stopping = threading.Event()
        self._client: AdminClient | None = None
        self._up = False  # the last stream got as far as its snapshot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=self._run, name="tether-dashboard-watch", daemon=True
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        """Close the stream (its channel) and let the thread end."""
        self._stopping.set()
        if (client := self._client) is not None:
            client.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.25
        for target in itertools.cycle(self._targets):
            try:
                self._watch(target)
                problem = "the watch stream ended"
            except TetherError as err:
                problem = str(err) or type(err).__name__
            if self._up:
                backoff, self._up = 0.25, False
            if self._stopping.is_set():
                return
            self._post(self._fleet.set_link, {"connected": False, "coordinator": target,
                                              "error": problem})  # fmt: skip
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 5.0)

    def _watch(self, target: str) -> None:
        with self._connect(target) as client:
            self._client = client
            if self._stopping.is_set():
                return
            client.halts(tenant=self._tenant)  # answers at once whether this coordinator is up
            self._up = True
            self._post(self._fleet.reset, {"connected": True, "coordinator": target, "error": ""})
            for event in client.watch(tenant=self._tenant, progress=True):
                self._post(self._fleet.apply, event)

    def _post(self, apply: Callable[[Any], None], value: Any) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(apply, value)
        except RuntimeError:  # the loop closed between the check and the call
            return
