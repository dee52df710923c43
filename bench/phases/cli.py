"""``tether kill`` wall time against a live coordinator, with Python's own start as floors.

Each sample starts the real ``tether`` console script in a fresh process, as an operator
does, and times it until it exits: ``tether kill --tenant ... --force`` (no agent of that
tenant ever registered) against a coordinator serving on loopback; the halt is lifted
again, untimed, before the next sample. In the same loop, so that the machine's drift hits
all three alike: ``python -c pass`` (the interpreter's start) and ``python -c "import grpc"``
(the transport every command needs).

Before the first sample the ``tether`` package is compiled to bytecode, untimed, as ``pip
install`` does: in a checkout whose ``__pycache__`` is stale and whose environment sets
``PYTHONDONTWRITEBYTECODE`` (as this machine's does), every run would otherwise compile each
of the CLI's modules from source, about 15 ms that no installed CLI pays.
"""

from __future__ import annotations

import compileall
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tether

from bench.harness import Bench, say
from bench.md import Row, fmt, missed_by, table, verdict
from bench.phase import Flag, Phase, Results
from bench.record import OMIT
from bench.stats import Summary, summary

LIMIT_MS = 100.0
TENANT = "bench-cli"


@dataclass(frozen=True)
class Settings:
    samples: int = 15


@dataclass
class Result:
    samples: int = 0
    kill_ms: Summary = field(default_factory=Summary)
    python_pass_ms: Summary = field(default_factory=Summary)
    import_grpc_ms: Summary = field(default_factory=Summary)
    failures: int = 0
    error: str | None = field(default=None, metadata=OMIT)


def _tether() -> list[str]:
    script = Path(sys.executable).parent / "tether"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tether"]


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return (time.perf_counter() - start) * 1e3, done


def measure(bench: Bench, cfg: Settings) -> Result:
    out = Result(samples=cfg.samples)
    kills: list[float] = []
    passes: list[float] = []
    grpcs: list[float] = []
    compileall.compile_dir(Path(tether.__file__).parent, quiet=1)  # see the module's docstring
    with bench.cluster("cli", 1) as (_, (coord,)):
        admin = coord.admin(timeout=30)
        kill = [*_tether(), "kill", "--addr", coord.addr, "--tenant", TENANT, "--force"]
        kill += ["--reason", "bench"]
        try:
            for _ in range(cfg.samples):
                ms, done = _timed(kill)
                if done.returncode != 0:
                    out.failures += 1
                    said = (done.stderr or done.stdout).strip().splitlines()
                    out.error = said[-1] if said else f"exit status {done.returncode}"
                else:
                    kills.append(ms)
                admin.resume(tether.selector(tenant=TENANT), "bench")
                passes.append(_timed([sys.executable, "-c", "pass"])[0])
                grpcs.append(_timed([sys.executable, "-c", "import grpc"])[0])
        finally:
            admin.close()
    out.kill_ms, out.python_pass_ms = summary(kills), summary(passes)
    out.import_grpc_ms = summary(grpcs)
    say(f"cli: tether kill {out.kill_ms}; python -c pass p50 {out.python_pass_ms.p50} ms")
    return out


def budgets(results: Results) -> list[Row]:
    figure, target = "`tether kill` wall time, median of 10 or more", f"≤ {LIMIT_MS:g} ms"
    res = results.of(PHASE)
    if res is None or res.kill_ms.p50 is None:
        note = f"every run failed: {res.error}" if res is not None and res.error else "-"
        return [[figure, target, note, verdict(None if res is None else False)]]
    k, median = res.kill_ms, res.kill_ms.p50
    text = (
        f"median {fmt(median)} ms, p90 {fmt(k.p90)} ms over {k.n} runs; floors in the same run: "
        f"`python -c pass` {fmt(res.python_pass_ms.p50)} ms, `import grpc` "
        f"{fmt(res.import_grpc_ms.p50)} ms" + missed_by(median, LIMIT_MS)
    )
    if res.failures:
        text += f"; {res.failures} runs failed ({res.error})"
    return [[figure, target, text, verdict(median <= LIMIT_MS and not res.failures)]]


def section(results: Results) -> list[str]:
    if (res := results.of(PHASE)) is None:
        return []
    rows = [
        [label, fmt(s.n), fmt(s.p50), fmt(s.p90), fmt(s.max)]
        for label, s in (
            ("`tether kill --tenant T` against a live coordinator", res.kill_ms),
            ('`python -c "import grpc"`', res.import_grpc_ms),
            ("`python -c pass`", res.python_pass_ms),
        )
    ]
    return [
        "## CLI start-up: `tether kill` wall time\n",
        "Each a fresh process, timed to its exit, the three interleaved; ms.\n\n"
        + table(["command", "runs", "median", "p90", "max"], rows),
    ]


PHASE = Phase(
    name="cli",
    about="`tether kill` wall time against a live coordinator, with python's start as floors",
    result=Result,
    run=measure,
    defaults=Settings(),
    quick=Settings(samples=10),
    flags=(Flag("--cli-samples", "samples", int, "cli: timed runs of each command"),),
    budgets=budgets,
    section=section,
)
