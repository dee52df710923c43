"""Heartbeat load against bare servers and multi-process coordinators, for ``capacity``.

``ramp_bare`` steps the same raw streams up against ``bench.bare_server`` (an echo that
answers each beat with one pre-serialised reply), so the coordinator's CPU per heartbeat has
a floor measured in the same run. ``serve_workers`` says whether ``tether serve`` takes
``--workers``; ``process_tree_cpu`` sums a server and its worker processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import psutil
from tether_server import free_port, wait_until

from bench.fleet import Fleet, split
from bench.harness import Bench
from bench.infra import LOOPBACK, stop


def serve_workers() -> bool:
    """Whether this build's ``tether serve`` has ``--workers`` (``tether serve --help``)."""
    done = subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return "--workers" in done.stdout


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process under it."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def window(cpu: Callable[[], float], fleet: Fleet, seconds: float) -> tuple[float, float]:
    """(acks per second, CPU seconds per second of ``cpu``) over a window of ``seconds``."""
    cpu0, acks0 = cpu(), fleet.total("acks")
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return (fleet.total("acks") - acks0) / elapsed, (cpu() - cpu0) / elapsed


def add_streams(fleet: Fleet, target: str, streams: int, per_connection: int = 1) -> None:
    """Grow ``fleet``'s beating raw streams to ``streams`` against ``target``."""
    shares = split(streams - fleet.size, len(fleet.workers))
    fleet.each(
        "add",
        [{"n": n, "target": target, "prefix": f"raw{i}-{fleet.size}-",
          "streams_per_channel": per_connection} for i, n in enumerate(shares)],
        within=120,
    )  # fmt: skip
    fleet.size = streams
    time.sleep(2)


def ramp_bare(
    bench: Bench, steps: list[int], workers: int, seconds: float
) -> list[tuple[int, float, float]]:
    """(streams, hb/s, CPU µs per heartbeat) of a bare echo at each step."""
    addr = f"{LOOPBACK}:{free_port()}"
    server = bench.procs.spawn(
        [sys.executable, "-m", "bench.bare_server", addr], stdout=subprocess.PIPE, text=True
    )
    out = []
    try:
        wait_until(lambda: server.stdout is not None and server.stdout.readline(), 30, "bare")
        fleet = Fleet(bench.procs, "raw", workers, bench.logs)
        try:
            for streams in sorted(steps):
                add_streams(fleet, addr, streams)
                rate, cpu = window(lambda: process_tree_cpu(server.pid), fleet, seconds)
                out.append((streams, round(rate, 1), round(1e6 * cpu / rate, 1) if rate else 0.0))
        finally:
            fleet.kill()
    finally:
        stop(server, 9)
    return out
