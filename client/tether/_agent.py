"""``Agent`` and ``AsyncAgent``: two thin front doors over one ``Core``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from tether._config import AgentConfig, resolve_targets
from tether._core import Core
from tether._errors import InvalidArgument
from tether._gate import Effect
from tether._link_stream import SHARED_LOOP
from tether._types import Halt
from tether._uri import check_name, parse_agent_uri
from tether._verdict import Identity
from tether._work import Timer, WorkQueue, retry

T = TypeVar("T")
# A list of capabilities (each a write), or a mapping of each to "read" or "write".
Capabilities = Iterable[str] | Mapping[str, str]
log = logging.getLogger("tether")


def _settings(
    config: AgentConfig | None,
    target: str | None,
    given: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
) -> AgentConfig:
    """The front doors' keyword arguments win over ``config``, or over ``environ`` without one.

    ``Agent`` and ``AsyncAgent`` are the front doors: the one place the process environment
    comes in, so that an agent deployed with ``TETHER_ADDR`` set finds its coordinators with
    no code change, as the documented ``target`` default promises. Below them nothing reads
    ``os.environ``: it is handed, as an argument, to the one loader ``AgentConfig.from_env``
    (and to ``resolve_targets``), as the server's front door hands it to its config loader.
    """
    overrides = {name: value for name, value in given.items() if value is not None}
    if target:
        overrides["targets"] = tuple(resolve_targets(target, environ))
    if config is None:
        return AgentConfig.from_env(environ, **overrides)
    return dataclasses.replace(config, **overrides)


def _identity(
    uri: str,
    run_id: str | None,
    instance_id: str | None,
    capabilities: Capabilities,
    labels: Mapping[str, str] | None,
) -> Identity:
    ref = parse_agent_uri(uri)
    instance = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return Identity(
        tenant=ref.tenant,
        agent=ref.agent,
        run_id=check_name("run_id", run_id or uuid.uuid4().hex),
        instance_id=check_name("instance_id", instance),
        capabilities=tuple(capabilities),
        labels=dict(labels or {}),
        reads=_reads(capabilities),
    )


def _reads(capabilities: Capabilities) -> frozenset[str]:
    """The capabilities declared ``"read"``; a plain list declares every one a write."""
    if not isinstance(capabilities, Mapping):
        return frozenset()
    for name, kind in capabilities.items():
        if kind not in ("read", "write"):
            raise InvalidArgument(f'capability {name} is of kind {kind!r}: use "read" or "write"')
    return frozenset(name for name, kind in capabilities.items() if kind == "read")


def _released(labels: Mapping[str, str] | None, release: str | None) -> dict[str, str]:
    """The labels, with ``release`` as the ``version`` label."""
    out = dict(labels or {})
    if release is None:
        return out
    if out.get("version", release) != release:
        raise InvalidArgument(
            f"release {release!r} and label version={out['version']!r} disagree; give one"
        )
    out["version"] = check_name("release", release)
    return out


class _Front:
    """What both front doors share: everything that only reads or replaces state."""

    def __init__(
        self,
        uri: str,
        *,
        run_id: str | None = None,
        target: str | None = None,
        instance_id: str | None = None,
        capabilities: Capabilities = (),
        labels: Mapping[str, str] | None = None,
        connect_timeout: float | None = None,
        strict_effects: bool | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
        config: AgentConfig | None = None,
        release: str | None = None,
    ) -> None:
        """See ``Agent`` for the arguments."""
        identity = _identity(uri, run_id, instance_id, capabilities, _released(labels, release))
        given = {
            "connect_timeout": connect_timeout,
            "strict_effects": strict_effects,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "token": token,
        }
        settings = _settings(config, target, given)
        self._core = Core(identity, settings)
        self._strict = settings.strict_effects

    def _strict_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop a sync caller may block on for a strict permit; None for asyncio code."""
        return None

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """The run's last stored checkpoint at registration, or None for a fresh run."""
        return self._core.checkpoint

    @property
    def run_id(self) -> str:
        return self._core.identity.run_id

    @property
    def instance_id(self) -> str:
        return self._core.identity.instance_id

    @property
    def ttl(self) -> float:
        """The lease TTL in seconds the coordinator granted; 0.0 before registration."""
        return self._core.ttl

    @property
    def halts(self) -> tuple[Halt, ...]:
        """The halts that match this instance, as the coordinator last said."""
        return self._core.halts

    @property
    def killed(self) -> bool:
        """True when ``check()`` would raise."""
        try:
            self._core.check()
        except Exception:
            return True
        return False

    def check(self, capability: str | None = None) -> None:
        """Raise ``tether.Killed`` if a halt matches or the tether is lost. Makes no RPC.

        With ``capability``, also raise ``tether.CapabilityFrozen`` if that one is frozen.
        """
        self._core.check(capability)

    def frozen(self, capability: str) -> bool:
        """True when ``check(capability)`` would raise."""
        try:
            self._core.check(capability)
        except Exception:
            return True
        return False

    def report(self, checkpoint: Mapping[str, Any]) -> None:
        """Store the newest checkpoint; the stream sends it. Never blocks."""
        self._core.report(checkpoint)

    def spend(self, *, usd: float = 0.0, tokens: int = 0, calls: int = 0) -> None:
        """Add to the run's spend; the next heartbeat carries it. Never blocks.

        Spend rules of the policy (``run.spend.usd > 50.0``) trip on it.
        """
        if usd < 0 or tokens < 0 or calls < 0 or math.isnan(usd):
            raise InvalidArgument("spend adds: usd, tokens and calls must be 0 or more")
        self._core.out.add_signals(usd=float(usd), tokens=int(tokens), calls=int(calls))

    def anomaly(self, reason: str) -> None:
        """Flag an anomaly outside any effect; anomaly-rate breakers count it. Never blocks."""
        log.info("tether: anomaly flagged: %s", reason[:500])
        self._core.out.add_signals(anomalies=1)

    def effect(
        self,
        capability: str,
        *,
        key: str | Callable[..., str] | None = None,
        strict: bool | None = None,
        drain: bool = False,
        undo: Mapping[str, Any] | None = None,
    ) -> Effect:
        """Gate one side effect: ``with``, ``async with``, or as a decorator.

        Args:
            capability: The tool or effect, such as ``send_email``.
            key: Idempotency key; an effect whose key already landed in this run raises
                ``tether.DuplicateEffect``. In decorator form, a callable of the arguments.
            strict: Ask the coordinator before the effect leaves, and get a permit.
                Defaults to the agent's ``strict_effects``.
            undo: What reverses the effect, for ``tether compensate``: a JSON object of at
                most 16 KiB (``tether.MAX_UNDO_BYTES``); too big, and the effect does not
                run. Or call ``fx.undo({...})`` inside the pass.
        """
        check_name("capability", capability)
        mode = self._strict if strict is None else strict
        return Effect(self._core, self._strict_loop, capability, key, mode, drain=drain, undo=undo)

    @property
    def landed_keys(self) -> frozenset[str]:
        """Idempotency keys that landed in this run, as far as this instance knows."""
        return frozenset(self._core.landed)


class Agent(_Front):
    """A tethered agent instance for synchronous code.

    The stream runs on an event loop in a daemon thread that every sync agent of the
    process shares, as it shares one stream per coordinator list and credentials;
    ``check()`` and ``report()`` never touch it, so they cost an attribute read.

    Args:
        uri: ``agent://TENANT/AGENT``.
        run_id: The execution this instance serves; its checkpoint is the run's.
        target: ``HOST:PORT`` of a coordinator, or a comma-separated list to fail over
            across. Defaults to ``TETHER_ADDR``, then ``127.0.0.1:7700``.
        instance_id: Unique per process; generated when omitted.
        capabilities: The tools or effects this instance may use: a list (each one a
            write), or a mapping of each to ``"read"`` or ``"write"``. A degraded mode
            freezes the writes and lets the reads go on.
        labels: Free-form labels, such as ``{"version": "2.3.1"}``.
        release: The agent's release, recorded on every effect; the same as the label
            ``version`` (``tether resume --require-label version=...`` waits for it).
        connect_timeout: How long ``__enter__`` waits to register before raising
            ``tether.Unavailable``. Defaults to 10 seconds.
        strict_effects: Gate effects in strict mode by default (see ``effect``).
        tls_ca: CA bundle (PEM) that verifies the coordinator; TLS is on when given.
            Defaults to ``TETHER_TLS_CA``.
        tls_cert: Client certificate (PEM) whose URI SAN names this agent, with ``tls_key``.
            Defaults to ``TETHER_TLS_CERT`` and ``TETHER_TLS_KEY``.
        tls_key: Private key of ``tls_cert``.
        token: A signed agent token (``tether token issue``), for platforms without client
            certificates. Defaults to ``TETHER_TOKEN``.
        config: Settings beyond these, such as gRPC channel options or a reply observer;
            the arguments above, when given, win over it. Without it, settings come from
            ``AgentConfig.from_env(os.environ)``.
    """

    _loop: asyncio.AbstractEventLoop | None = None  # the shared loop, once started

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closing = threading.Lock()
        self._pid = os.getpid()  # the process that started it: a forked child's copy is inert

    def _strict_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def queue(
        self, capability: str, handler: Callable[[Any], Any], *, strict: bool | None = None
    ) -> WorkQueue:
        """A work queue whose items each run as one gated ``capability`` effect."""
        check_name("capability", capability)
        mode = self._strict if strict is None else strict
        return WorkQueue(self._core, self._strict_loop, capability, handler, strict=mode)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` after ``delay`` seconds unless a kill comes first."""
        self.check()
        return Timer(self._core.stops.timers, self._core.check, delay, fn, args)

    def retry(self, fn: Callable[..., T], *args: Any, **options: Any) -> T:
        """``fn(*args)`` with retries that a kill cancels; see ``tether._work.retry``."""
        return retry(self._core, fn, *args, **options)

    def start(self) -> None:
        """Register with a coordinator; blocks until the first reply.

        Raises:
            TetherError: called from a tether callback (a stop hook, a reply observer),
                which runs on the loop this call would wait on.
        """
        SHARED_LOOP.refuse_on_loop("Agent.start()")
        loop = SHARED_LOOP.acquire()
        try:
            asyncio.run_coroutine_threadsafe(self._core.start(), loop).result()
        except BaseException:
            SHARED_LOOP.release()
            raise
        self._loop, self._pid = loop, os.getpid()

    def close(self, checkpoint: Mapping[str, Any] | None = None) -> None:
        """End cleanly: the final checkpoint is stored before this returns.

        Raises:
            TetherError: called from a tether callback, as for ``start``.
        """
        SHARED_LOOP.refuse_on_loop("Agent.close()")
        with self._closing:  # two threads closing at once release the shared loop once
            loop = self._loop
            if loop is None:
                return
            if self._pid != os.getpid():  # inherited through fork(): its loop is not here
                self._loop = None
                return
            asyncio.run_coroutine_threadsafe(self._core.close(checkpoint), loop).result()
            self._loop = None  # a bad final checkpoint raised above: the agent is still open
        SHARED_LOOP.release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncAgent(_Front):
    """The same as ``Agent``, for asyncio code: the stream runs on the caller's loop."""

    async def start(self) -> None:
        """Register with a coordinator; returns after the first reply."""
        await self._core.start()

    async def close(self, checkpoint: Mapping[str, Any] | None = None) -> None:
        """End cleanly: the final checkpoint is stored before this returns."""
        await self._core.close(checkpoint)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
