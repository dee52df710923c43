"""Webhooks: every listed event of the policy, as a JSON POST, never in the way of a kill.

``emit`` only queues; one task per event posts it to each webhook, retrying with backoff.
A slow or dead webhook delays nothing but its own delivery. The ``slack`` format posts a
Slack-compatible ``{"text": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tether.v1 import types_pb2

from tether_server._etcd import spawn
from tether_server._policy import Policy, Webhook
from tether_server._selectors import halt_id

log = logging.getLogger("tether_server")
ATTEMPTS = 5
FIRST_BACKOFF = 0.2  # seconds, doubled after each failed attempt
TIMEOUT = 5.0  # seconds per attempt

PolicySource = Callable[[], Awaitable[tuple[Policy, int]]]


def payload(
    event: str, actor: str, reason: str, sel: types_pb2.Selector, figures: Mapping[str, Any]
) -> dict[str, Any]:
    """What a webhook receives: the event, who acted and why, on what, when, and figures."""
    return {
        "event": event,
        "actor": actor,
        "reason": reason,
        "selector": halt_id(sel) if sel.scope else "",
        "time": datetime.now(UTC).isoformat(),
        "figures": dict(figures),
    }


def body_for(hook: Webhook, data: Mapping[str, Any]) -> bytes:
    if hook.format == "slack":
        text = f"tether {data['event']}: {data['selector']} by {data['actor']}: {data['reason']}"
        return json.dumps({"text": text}).encode()
    return json.dumps(data).encode()


async def post(url: str, body: bytes, timeout: float = TIMEOUT) -> int:
    """POST ``body`` as JSON; the HTTP status. Raises OSError or TimeoutError."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or ""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if tls else None
        )
        try:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            status = await reader.readline()
        finally:
            writer.close()
    return int(status.split()[1])


class Notifier:
    """Queues events to the webhooks of the policy in force."""

    def __init__(self, policy: PolicySource) -> None:
        self._policy = policy
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(
        self,
        event: str,
        actor: str,
        reason: str,
        sel: types_pb2.Selector,
        figures: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one event; returns at once."""
        data = payload(event, actor, reason, sel, figures or {})
        spawn(self._tasks, self._deliver(event, data))

    async def _deliver(self, event: str, data: dict[str, Any]) -> None:
        try:
            policy, _ = await self._policy()
        except Exception as err:
            log.warning("could not read the policy's webhooks for %s: %s", event, err)
            return
        hooks = [h for h in policy.notify if event in h.events]
        await asyncio.gather(*(self._retrying(h, body_for(h, data)) for h in hooks))

    async def _retrying(self, hook: Webhook, body: bytes) -> None:
        backoff = FIRST_BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            started = time.monotonic()
            try:
                status = await post(hook.url, body)
                if 200 <= status < 300:
                    return
                problem = f"HTTP {status}"
            except (OSError, TimeoutError, ValueError, IndexError) as err:
                problem = f"{type(err).__name__}: {err}"
            log.warning(
                "webhook %s, attempt %d of %d (%.1fs): %s",
                hook.url, attempt, ATTEMPTS, time.monotonic() - started, problem,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff *= 2
