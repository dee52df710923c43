"""The stack floor: a bare grpc.aio server broadcasting one pre-serialised order.

The same client processes and stream count as ``kill1`` (one TCP connection per stream),
against ``bench.bare_server --broadcast``, which writes one pre-serialised stop order to
every open stream and does nothing else. Each client stamps the order's arrival with
``time.monotonic()``, as kill1's agents stamp their kill; the latency is from the trigger
(the harness writing ``kill`` to the server) to each arrival. This is what Python gRPC on
this machine costs before Tether does anything, so Tether's kill p99 is judged against it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether_server import free_port, wait_until

from bench.fleet import Fleet, split
from bench.harness import Bench, say
from bench.infra import LOOPBACK, BenchError, Procs, stop
from bench.md import Row, fmt, missed_by, ratio, table, verdict
from bench.phase import WORKERS, Phase, Results, draw_latency
from bench.phases import kill
from bench.profile import profiling
from bench.record import OMIT
from bench.stats import Summary, summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GOAL = 1.3  # Tether's kill p99 at most this multiple of the floor's


@dataclass(frozen=True)
class Settings:
    sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    rounds: int = 5
    workers: int = 4
    profile: bool = False
    profile_sizes: list[int] = field(default_factory=lambda: [1000])


@dataclass
class Broadcasts:
    """Rounds of one broadcast to every stream (or every held task), at one size."""

    streams: int = 0
    registered: int = 0
    tasks_per_stream: int = 0
    rounds: int = 0
    from_issue_ms: Summary = field(default_factory=Summary)
    last_ms: Summary = field(default_factory=Summary)  # per round: the last arrival
    writes_done_ms: Summary = field(default_factory=Summary)  # per round: the server's writes
    missing: int = 0


@dataclass
class Result:
    workers: int = 0
    sizes: list[Broadcasts] = field(default_factory=list)
    error: str | None = field(default=None, metadata=OMIT)

    def size(self, streams: int) -> Broadcasts | None:
        return next((s for s in self.sizes if s.streams == streams), None)


class BareBroadcast:
    """``bench.bare_server --broadcast`` on a free port: ``fire()`` sends one order to all."""

    def __init__(self, procs: Procs) -> None:
        self.addr = f"{LOOPBACK}:{free_port()}"
        self.proc = procs.spawn(
            [sys.executable, "-m", "bench.bare_server", self.addr, "--broadcast"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        out = self.proc.stdout
        wait_until(lambda: out is not None and out.readline(), 30, "bare broadcast server")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def fire(self) -> tuple[float, float]:
        """Trigger one broadcast: (when it was triggered, seconds until every write returned)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        issued = time.monotonic()
        self.proc.stdin.write("kill\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "sent":
            raise BenchError(f"bare broadcast server answered {line!r}")
        return issued, float(line[2])

    def close(self) -> None:
        stop(self.proc, 9)


def broadcast_rounds(server: BareBroadcast, fleet: Fleet, rounds: int, timeout: float) -> Any:
    """``rounds`` broadcasts to ``fleet``; each arrival timed from the trigger."""
    arrivals: list[float] = []
    last: list[float] = []
    writes: list[float] = []
    missing = 0
    for _ in range(rounds):
        fleet.all("arm")
        issued, seconds = server.fire()
        replies = fleet.all("wait", within=timeout + 30, timeout=timeout)
        got = [(t - issued) * 1e3 for r in replies for t in r["times"]]
        missing += sum(int(r["missing"]) for r in replies)
        arrivals += got
        last.append(max(got, default=0.0))
        writes.append(seconds * 1e3)
        time.sleep(0.5)
    return summary(arrivals), summary(last), summary(writes), missing


def _size(bench: Bench, cfg: Settings, server: BareBroadcast, fleet: Fleet, n: int) -> Broadcasts:
    shares = split(n - fleet.size, len(fleet.workers))
    replies = fleet.each(
        "add",
        [{"n": k, "target": server.addr, "prefix": f"f{i}-{fleet.size}-"}
         for i, k in enumerate(shares)],
        within=120 + n / 50,
    )  # fmt: skip
    fleet.size = n
    registered = sum(int(r["registered"]) for r in replies)
    if registered < n:
        raise BenchError(f"stackfloor: {registered} of {n} streams registered")
    time.sleep(1 + n / 5000)
    sampled = cfg.profile and n in cfg.profile_sizes
    with profiling(bench, server, f"stackfloor-{n}", on=sampled):
        s, last, writes, missing = broadcast_rounds(server, fleet, cfg.rounds, 10 + n / 1000)
    return Broadcasts(n, registered, 0, cfg.rounds, s, last, writes, missing)


def measure(bench: Bench, cfg: Settings) -> Result:
    out = Result(workers=cfg.workers)
    server = BareBroadcast(bench.procs)
    fleet = Fleet(bench.procs, "listen", cfg.workers, bench.logs)
    try:
        for n in sorted(cfg.sizes):
            entry = _size(bench, cfg, server, fleet, n)
            out.sizes.append(entry)
            say(f"stackfloor: {n} streams: from trigger {entry.from_issue_ms}")
    except BenchError as err:
        out.error = str(err)
        say(str(err))
    finally:
        fleet.kill()
        server.close()
    return out


# -- the report ---------------------------------------------------------------------------------


def _tether(results: Results, streams: int) -> Summary | None:
    """kill1's latency at ``streams`` agents, or else kill1long's (``_where`` says which)."""
    for phase in (kill.KILL1, kill.KILL1LONG):
        res = results.of(phase)
        if res is not None and (entry := res.size(streams)) is not None:
            return entry.from_issue_ms
    return None


def _where(results: Results, streams: int) -> str:
    one, long = results.of(kill.KILL1), results.of(kill.KILL1LONG)
    if (one is not None and one.size(streams)) or long is None or not long.size(streams):
        return ""
    held = one.largest() if one is not None else 0
    return (
        f"; Tether's figure from kill1long (lease TTL {long.lease_ttl:g} s): at "
        f"{one.lease_ttl if one is not None else 10:g} s kill1 held at most {held:,} agents"
    )


def _budget(results: Results, floor: Broadcasts) -> Row:
    figure = (
        f"kill p99, {floor.streams:,} agents on one coordinator (kill1), against a bare "
        "grpc.aio broadcast to the same streams (stackfloor)"
    )
    mine, base = _tether(results, floor.streams), floor.from_issue_ms.p99
    times = ratio(mine.p99 if mine else None, base)
    if times is None or base is None or mine is None:
        why = "did not hold this size" if results.ran(kill.KILL1, kill.KILL1LONG) else "not run"
        return [figure, f"≤ {GOAL:g}x", f"kill1 (and kill1long) {why}", verdict(None)]
    text = f"{times:,.2f}x (Tether {fmt(mine.p99)} ms, floor {fmt(base)} ms)"
    text += _where(results, floor.streams)
    if times > GOAL:
        text += missed_by(times, GOAL) + f" (the goal is p99 ≤ {GOAL * base:,.1f} ms)"
    return [figure, f"≤ {GOAL:g}x", text, verdict(times <= GOAL)]


def budgets(results: Results) -> list[Row]:
    """Tether's kill p99 (kill1) as a multiple of the floor's, at each floor size."""
    res = results.of(PHASE)
    if res is None or not res.sizes:
        return [["kill p99 against a bare grpc.aio broadcast", f"≤ {GOAL:g}x", "-", verdict(None)]]
    return [_budget(results, floor) for floor in sorted(res.sizes, key=lambda b: b.streams)]


_HEAD = [
    "streams", "rounds", "p50 from trigger", "p99", "max", "last stream p50", "last stream p99",
    "server writes done p50", "never arrived", "Tether p99 (kill1, else kill1long)",
    "Tether ÷ floor (p99)",
]  # fmt: skip


def _row(results: Results, b: Broadcasts) -> Row:
    mine = _tether(results, b.streams)
    times = ratio(mine.p99 if mine else None, b.from_issue_ms.p99)
    return [
        fmt(b.streams), fmt(b.rounds), fmt(b.from_issue_ms.p50), fmt(b.from_issue_ms.p99),
        fmt(b.from_issue_ms.max), fmt(b.last_ms.p50), fmt(b.last_ms.p99),
        fmt(b.writes_done_ms.p50), fmt(b.missing), fmt(mine.p99 if mine else None),
        "-" if times is None else f"{times:,.2f}x",
    ]  # fmt: skip


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    text = (
        f"`bench/bare_server.py --broadcast`: every open stream's handler waits on one future; "
        f"the trigger sets it and each writes one pre-serialised stop order. {res.workers} "
        "client processes, one TCP connection per stream, as in kill1. Latencies in ms from the "
        "trigger to each stream's receipt, over all rounds.\n\n"
        + table(_HEAD, [_row(results, b) for b in res.sizes])
    )
    if res.error:
        text += f"\nError: {res.error}.\n"
    return ["## Stack floor: a bare grpc.aio broadcast to the same streams\n", text]


def plot(results: Results, ax: Axes) -> None:
    if (res := results.of(PHASE)) is not None:
        points = [(b.streams, b.from_issue_ms) for b in res.sizes]
        draw_latency(ax, "bare grpc.aio broadcast (stack floor)", "tab:gray", points)


PHASE = Phase(
    name="stackfloor",
    about="a bare grpc.aio server broadcasting one order to kill1's streams: Tether's floor",
    result=Result,
    run=measure,
    defaults=Settings(),
    quick=Settings(sizes=[100, 1000], rounds=3),
    flags=(
        kill.SIZES,
        kill.ROUNDS,
        WORKERS,
        kill.PROFILE,
    ),
    budgets=budgets,
    section=section,
    plot=plot,
)
