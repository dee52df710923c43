"""``tether doctor --addr A,B,...``: ask every coordinator what it sees, and say what is wrong.

It checks that every coordinator answers and is SERVING; that all share one etcd cluster
(a kill through one reaches the agents of all); that their halt views are fresh and equal;
that they sign permits with one key; that none serves plaintext on a non-loopback address;
their clocks against this machine's and each other's; their canaries; and agents that have
not acknowledged a kill after its grace. ``look`` asks (I/O), ``diagnose`` decides (pure),
``doctor`` prints: one line per problem and exit 1, or a short summary and exit 0.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tether._admin import AdminClient
from tether._cli._output import EXIT_ERROR, EXIT_OK, print_json
from tether._config import resolve_targets
from tether._errors import TetherError
from tether._failover import NoCoordinator
from tether._types import AgentInstance, AuditEntry, State
from tether.v1 import admin_pb2, types_pb2

Connect = Callable[[str], AdminClient]
_MAX_NAMES = 100  # an acknowledgement entry names at most this many instances
_LOOPBACK = ("127.", "localhost", "[::1]", "::1")


@dataclass
class Seen:
    """One coordinator's answer to GetStatus, or why there was none."""

    addr: str
    status: admin_pb2.CoordinatorStatus | None = None
    error: str = ""
    skew: float = 0.0  # its wall clock minus ours, at the middle of the call
    uncertainty: float = 0.0  # half the call's round trip


@dataclass
class Fleet:
    """What the reachable coordinators say of the fleet, for the unacknowledged kills."""

    halts: list[types_pb2.Halt] = field(default_factory=list)
    agents: list[AgentInstance] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def doctor(args: argparse.Namespace) -> int:
    """Run ``tether doctor``: exit 0 when healthy, 1 with one line per problem."""
    connect = _connector(args)
    seen = [look(addr, connect) for addr in resolve_targets(args.addr, os.environ)]
    reachable = [s.addr for s in seen if s.status is not None]
    fleet = read_fleet(",".join(reachable), connect) if reachable else None
    problems = diagnose(seen, fleet, max_skew=args.max_skew, ack_slack=args.ack_slack)
    summary = "" if problems else summarize(seen, args.max_skew)
    if args.output == "json":
        print_json(_report(seen, problems, summary))
    else:
        print("\n".join(problems) if problems else summary)
    return EXIT_ERROR if problems else EXIT_OK


def _connector(args: argparse.Namespace) -> Connect:
    def connect(addr: str) -> AdminClient:
        return AdminClient(
            addr, timeout=10.0, token=args.token,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        )  # fmt: skip

    return connect


def look(addr: str, connect: Connect) -> Seen:
    """Ask one coordinator for its status, timing the call to estimate its clock's skew."""
    seen = Seen(addr)
    try:
        with connect(addr) as admin:
            sent = time.time()
            seen.status = admin.status()
            received = time.time()
    except NoCoordinator as err:
        seen.error = err.failures[0][1] if err.failures else str(err)
        return seen
    except TetherError as err:
        seen.error = " ".join(str(err).split()) or type(err).__name__
        return seen
    now = seen.status.now.ToNanoseconds() / 1e9
    seen.skew = now - (sent + received) / 2
    seen.uncertainty = (received - sent) / 2
    return seen


def read_fleet(addrs: str, connect: Connect) -> Fleet | None:
    """Halts, agents and the audit since the oldest halt, from whichever coordinator answers."""
    try:
        with connect(addrs) as admin:
            raw = admin._call(admin._stub.ListHalts, admin_pb2.ListHaltsRequest())
            fleet = Fleet(halts=list(raw.halts))
            if fleet.halts:
                since = min(h.created_at.ToDatetime(UTC) for h in fleet.halts)
                fleet.agents = admin.agents(state=State.KILLED)
                fleet.audit = admin.audit(since=since, limit=100_000)
            return fleet
    except TetherError:
        return None  # the coordinators' own problems are reported from their status


def diagnose(
    seen: list[Seen], fleet: Fleet | None, *, max_skew: float, ack_slack: float = 5.0
) -> list[str]:
    """Every problem, one line each; none for a healthy fleet."""
    answered = [s for s in seen if s.status is not None]
    problems = [f"{s.addr}: unreachable ({s.error})" for s in seen if s.status is None]
    for s in answered:
        problems += _own(s, max_skew)
    problems += _agreement(answered, max_skew)
    if fleet is not None:
        problems += unacknowledged(fleet, ack_slack)
    return problems


def _own(s: Seen, max_skew: float) -> list[str]:
    """What is wrong with one coordinator on its own."""
    st = s.status
    assert st is not None
    out = []
    if not st.serving:
        out.append(f"{s.addr}: NOT_SERVING: not attached to etcd ({st.etcd_error or 'starting'})")
    elif st.etcd_error:
        out.append(f"{s.addr}: etcd did not answer: {st.etcd_error}")
    elif not st.halt_view_fresh:
        out.append(
            f"{s.addr}: halt view stale: {st.halts} halt(s) at revision "
            f"{st.halt_view_revision}, but etcd holds others at revision {st.etcd_revision}"
        )
    if not st.permit_key_id:
        out.append(f"{s.addr}: no permit key loaded")
    if not st.tls and not (_loopback(s.addr) and _loopback(st.listen)):
        out.append(
            f"{s.addr}: plaintext on a non-loopback address ({st.listen}): serve with "
            "--tls-cert, --tls-key and --tls-client-ca"
        )
    if abs(s.skew) > max_skew + s.uncertainty:
        out.append(f"{s.addr}: clock {s.skew:+.2f}s off this machine's (±{s.uncertainty:.2f}s)")
    if st.canary.enabled and not st.canary.ok:
        out.append(f"{s.addr}: canary failing: {st.canary.problem}")
    return out


def _agreement(answered: list[Seen], max_skew: float) -> list[str]:
    """What the coordinators disagree on: etcd cluster, halt view, permit key, clock."""
    out = []
    statuses = [(s.addr, s.status) for s in answered if s.status is not None]
    clusters = {st.etcd_cluster_id for _, st in statuses if st.etcd_cluster_id}
    if len(clusters) > 1:
        on = ", ".join(f"{a} on {st.etcd_cluster_id:x}" for a, st in statuses)
        out.append(
            f"etcd cluster mismatch: {on}: a kill through one never reaches the agents of another"
        )
    elif len({st.halt_view_digest for _, st in statuses if st.serving}) > 1:
        views = ", ".join(
            f"{a} has {st.halts} halt(s) at revision {st.halt_view_revision}" for a, st in statuses
        )
        out.append(f"halt views differ: {views}")
    keys = {st.permit_key_id for _, st in statuses if st.permit_key_id}
    if len(keys) > 1:
        signs = ", ".join(f"{a} signs with {st.permit_key_id}" for a, st in statuses)
        out.append(f"permit keys differ: {signs}: permits of one fail at tools that trust another")
    skews = sorted(answered, key=lambda s: s.skew)
    if len(skews) > 1 and skews[-1].skew - skews[0].skew > max_skew * 2:
        spread = skews[-1].skew - skews[0].skew
        out.append(f"clocks differ by {spread:.2f}s between {skews[0].addr} and {skews[-1].addr}")
    return out


def unacknowledged(fleet: Fleet, slack: float) -> list[str]:
    """Instances a stopping halt has matched past its grace that never acknowledged it."""
    out = []
    for halt in fleet.halts:
        if halt.selector.capability:
            continue  # a freeze stops no instance; there is nothing to acknowledge
        grace = halt.grace.ToTimedelta().total_seconds() if halt.HasField("grace") else 0.0
        age = (fleet.now - halt.created_at.ToDatetime(UTC)).total_seconds()
        entries = [e for e in fleet.audit if e.halt_id == halt.id and e.action in _ACKS]
        if age <= grace + slack or any(len(e.instances) >= _MAX_NAMES for e in entries):
            continue  # still in its grace, or the audit names too few to tell
        acked = {name for e in entries for name in e.instances}
        for a in fleet.agents:
            name = f"{a.tenant}/{a.agent}/{a.run_id}/{a.instance_id}"
            if name not in acked and any(h.id == halt.id for h in a.halts):
                out.append(
                    f"agent://{a.tenant}/{a.agent} run {a.run_id} instance {a.instance_id} "
                    f"has not acknowledged halt {halt.id} ({age:.0f}s old, grace {grace:g}s)"
                )
    return out


_ACKS = ("ack", "escalate")


def summarize(seen: list[Seen], max_skew: float) -> str:
    """One short line for a healthy fleet."""
    statuses = [s.status for s in seen if s.status is not None]
    first = statuses[0]
    tls = "TLS" if all(st.tls for st in statuses) else "plaintext on loopback"
    canaries = [st.canary for st in statuses if st.canary.enabled]
    canary = f"; {len(canaries)} canary(ies) passing" if canaries else ""
    return (
        f"healthy: {len(statuses)} coordinator(s) SERVING on etcd cluster "
        f"{first.etcd_cluster_id:x}; halt views fresh and equal ({first.halts} halt(s)); "
        f"one permit key ({first.permit_key_id}); {tls}; clocks within {max_skew:g}s"
        f"{canary}; no unacknowledged kill"
    )


def _loopback(hostport: str) -> bool:
    return hostport.startswith(_LOOPBACK)


def _report(seen: list[Seen], problems: list[str], summary: str) -> dict[str, object]:
    from google.protobuf import json_format  # imported here: the CLI's other verbs never need it

    return {
        "healthy": not problems,
        "problems": problems,
        "summary": summary,
        "coordinators": [
            {
                "addr": s.addr,
                "reachable": s.status is not None,
                "error": s.error,
                "skew_seconds": round(s.skew, 4),
                "status": json_format.MessageToDict(s.status) if s.status is not None else None,
            }
            for s in seen
        ],
    }
