"""Dying parts, timed against the lease TTL.

- STALE after an agent dies: a worker process holding N agents is SIGKILLed (the kernel
  closes its sockets: a crash) or SIGSTOPped (sockets stay open and silent: a hang or a
  partition). An operator's ``AdminClient.watch`` on another coordinator timestamps each
  instance turning STALE.
- Fail closed after the coordinator dies: the coordinator of N agents is SIGKILLed or
  SIGSTOPped; the worker polls each agent's verdict every 5 ms and timestamps each agent's first
  True. The SDK's own timer (no confirmed reply within the TTL) is what must fire.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import tether

from bench.fleet import Fleet
from bench.harness import Bench, say
from bench.md import Row, fmt, table, verdict
from bench.phase import Flag, Phase, Results, floats
from bench.record import load
from bench.stats import Summary, summary
from bench.tls import TENANT

POLL_S = 0.005  # the worker polls every agent's verdict this often in the fail-closed runs


class StaleWatch:
    """Watches a tenant through the AdminService and timestamps STALE per instance."""

    def __init__(self, addr: str, expected: int) -> None:
        self.expected = expected
        self.stale_at: dict[str, float] = {}
        self.snapshot = 0
        self.ready = threading.Event()
        self.done = threading.Event()
        self._admin = tether.AdminClient(addr, timeout=3600)
        self._thread = threading.Thread(target=self._run, name="stale-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._admin.watch(tenant=TENANT):
                now = time.monotonic()
                if event.snapshot:
                    self.snapshot += 1
                    if self.snapshot >= self.expected:
                        self.ready.set()
                    continue
                self.ready.set()
                if event.instance.state is tether.State.STALE:
                    self.stale_at.setdefault(event.instance.instance_id, now)
                    if len(self.stale_at) >= self.expected:
                        break
        except Exception:
            pass
        finally:
            self.ready.set()
            self.done.set()

    def close(self) -> None:
        self._admin.close()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class Settings:
    agents: int = 200
    ttls: list[float] = field(default_factory=lambda: [2.0, 5.0])


@dataclass
class Stale:
    agents: int = 0
    signal: str = ""
    lease_ttl_s: float = 0.0
    granted_ttl_s: float | None = None
    stale_ms: Summary = field(default_factory=Summary)
    never_stale: int = 0

    @property
    def times(self) -> Summary:
        return self.stale_ms

    @property
    def never(self) -> int:
        return self.never_stale

    @property
    def limit_ms(self) -> float:
        """The target: the TTL plus 1 s."""
        return self.lease_ttl_s * 1000 + 1000.0

    @property
    def resolution_ms(self) -> float:
        """The watch timestamps each event as it comes: no sampling blur."""
        return 0.0


@dataclass
class FailClosed:
    agents: int = 0
    signal: str = ""
    lease_ttl_s: float = 0.0
    granted_ttl_s: float | None = None
    fail_closed_ms: Summary = field(default_factory=Summary)
    never_failed_closed: int = 0
    killed_before_signal: int = 0
    early: int = 0
    resolution_ms: float = POLL_S * 1000  # sampled by polling check(): finer cannot be told

    @property
    def times(self) -> Summary:
        return self.fail_closed_ms

    @property
    def never(self) -> int:
        return self.never_failed_closed

    @property
    def limit_ms(self) -> float:
        """The target: the TTL."""
        return self.lease_ttl_s * 1000


@dataclass
class Result:
    stale: list[Stale] = field(default_factory=list)
    fail_closed: list[FailClosed] = field(default_factory=list)


@dataclass
class Closed:
    """The worker's answer to ``failclosed``: when each agent's verdict first stopped it."""

    times: list[float] = field(default_factory=list)
    missing: int = 0
    killed_before: int = 0
    ttl: float | None = None


def _name(sig: int) -> str:
    return "SIGKILL" if sig == signal.SIGKILL else "SIGSTOP"


def _stale(bench: Bench, cfg: Settings, ttl: float, sig: int) -> Stale:
    n, name = cfg.agents, _name(sig)
    with bench.cluster(f"stale-{name}-{ttl:g}", 2, ttl=ttl) as (_, (home, observer)):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        watch: StaleWatch | None = None
        try:
            grown = fleet.grow_sdk(n, [home.addr], deadline=120)
            time.sleep(ttl / 2)
            watch = StaleWatch(observer.addr, n)
            watch.ready.wait(30)
            time.sleep(0.5)
            signalled = time.monotonic()
            fleet.workers[0].proc.send_signal(sig)
            watch.done.wait(ttl + 15 + n / 500)
            lat = [(t - signalled) * 1e3 for t in watch.stale_at.values()]
        finally:
            if watch is not None:
                watch.close()
            fleet.kill()
    return Stale(n, name, ttl, grown.ttl, summary(lat), n - len(lat))


def _fail_closed(bench: Bench, cfg: Settings, ttl: float, sig: int) -> FailClosed:
    n, name = cfg.agents, _name(sig)
    with bench.cluster(f"failclosed-{name}-{ttl:g}", 1, ttl=ttl) as (_, (coord,)):
        fleet = Fleet(bench.procs, "sdk", 1, bench.logs)
        try:
            fleet.grow_sdk(n, [coord.addr], deadline=120)
            time.sleep(ttl / 2)
            worker = fleet.workers[0]
            worker.send("failclosed", timeout=ttl + 15, interval=POLL_S)
            time.sleep(0.3)
            signalled = time.monotonic()
            coord.send(sig)
            reply = load(Closed, worker.receive(ttl + 45))
        finally:
            fleet.kill()
            coord.unpause()
    lat = [(t - signalled) * 1e3 for t in reply.times]
    return FailClosed(
        agents=n,
        signal=name,
        lease_ttl_s=ttl,
        granted_ttl_s=reply.ttl,
        fail_closed_ms=summary(lat),
        never_failed_closed=reply.missing,
        killed_before_signal=reply.killed_before,
        early=sum(1 for x in lat if x < 0),
    )


def failures(bench: Bench, cfg: Settings) -> Result:
    out = Result()
    for ttl in cfg.ttls:
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            stale = _stale(bench, cfg, ttl, sig)
            out.stale.append(stale)
            say(f"failure: STALE {stale}")
            closed = _fail_closed(bench, cfg, ttl, sig)
            out.fail_closed.append(closed)
            say(f"failure: fail closed {closed}")
    return out


# -- the report ---------------------------------------------------------------------------------

_HEAD = ["lease TTL", "signal", "agents", "p50 ms", "p99 ms", "max ms", "never"]


def _row(e: Stale | FailClosed) -> Row:
    s = e.times
    return [
        f"{e.lease_ttl_s:g} s", e.signal, fmt(e.agents),
        fmt(s.p50, 0), fmt(s.p99, 0), fmt(s.max, 0), fmt(e.never),
    ]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    return [
        "## STALE and fail-closed against the lease TTL\n",
        "Agents' process signalled; time until the operator's watch (on another coordinator) "
        "shows STALE:\n\n"
        + table(_HEAD, [_row(e) for e in res.stale])
        + "\nCoordinator signalled; time until each agent's `check()` raises:\n\n"
        + table(_HEAD, [_row(e) for e in res.fail_closed]),
    ]


def _budget(figure: str, target: str, entries: list[Stale] | list[FailClosed]) -> Row:
    """Every entry's worst time within its TTL (plus slack), and none that never came."""
    if not entries:
        return [figure, target, "-", verdict(None)]
    parts, ok, blurred = [], True, False
    for e in entries:
        worst, limit, never = e.times.max, e.limit_ms, e.never
        # The fail-closed side is sampled by polling check(); finer than that cannot be told.
        within = worst is not None and worst <= limit + e.resolution_ms and never == 0
        blurred = blurred or (within and worst is not None and worst > limit)
        ok = ok and within
        parts.append(
            f"TTL {e.lease_ttl_s:g} s, {e.signal}: max {fmt(worst, 0)} ms"
            + (f" ({never} never)" if never else "")
        )
    text = "; ".join(parts)
    if blurred:
        text += (
            " (a maximum above the TTL by less than the "
            f"{POLL_S * 1000:g} ms polling interval counts as met)"
        )
    return [figure, target, text, verdict(ok)]


def budgets(results: Results) -> list[Row]:
    res = results.of(PHASE) or Result()
    return [
        _budget("STALE declared after an agent dies", "≤ lease TTL + 1 s", res.stale),
        _budget("agent fails closed after losing its coordinator", "≤ lease TTL", res.fail_closed),
    ]


PHASE = Phase(
    name="failure",
    about="time to STALE after an agent dies, and to fail closed after its coordinator dies",
    result=Result,
    run=failures,
    defaults=Settings(),
    quick=Settings(agents=50, ttls=[2.0]),
    flags=(Flag("--failure-ttls", "ttls", floats, "lease TTLs for STALE and fail-closed"),),
    budgets=budgets,
    section=section,
)
