"""The admin verbs: one function each, given a connected ``AdminClient`` and the parsed args."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tether._cli._output import (
    AGENT_HEADERS,
    AUDIT_HEADERS,
    EXIT_ERROR,
    EXIT_OK,
    HALT_HEADERS,
    WIDE_AGENT_HEADERS,
    agent_row,
    audit_row,
    fail,
    halt_row,
    print_event,
    print_json,
    print_listing,
    wide_agent_row,
)
from tether._errors import FailedPrecondition, InvalidArgument
from tether._halt import Halt, Scope, Selector
from tether._selector import selector
from tether._uri import parse_agent_uri

# The other verbs' modules, and the types they list (tether._types), are imported when
# their verb runs: `tether kill` needs none of them (tests/test_cli_imports.py).
if TYPE_CHECKING:
    from tether._admin import AdminClient


def _selector(args: argparse.Namespace) -> Any:
    if args.in_tenant and not args.run:
        raise InvalidArgument("--in-tenant goes with --run")
    labels = _labels("--label", args.label)
    tenant = args.in_tenant if args.run else args.tenant
    return selector(
        all=args.all, tenant=tenant, agent=args.agent, run_id=args.run,
        capability=args.capability, labels=labels, writes=getattr(args, "writes", False),
    )  # fmt: skip


def _labels(flag: str, items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{flag} {item!r}: expected KEY=VALUE, e.g. version=1.4.3")
        labels[key] = value
    return labels


def _agent_filter(args: argparse.Namespace) -> dict[str, str]:
    tenant, agent = args.tenant, args.agent
    if agent.startswith("agent://"):
        tenant, agent = parse_agent_uri(agent)
    return {"tenant": tenant, "agent": agent, "run_id": args.run}


def kill(client: AdminClient, args: argparse.Namespace) -> int:
    if args.grace is not None and args.mode != "soft":
        raise InvalidArgument("--grace goes with --mode soft")
    if args.grace is not None and not 0 <= args.grace <= 3600:  # also refuses nan and inf
        raise InvalidArgument(f"--grace {args.grace}: give seconds between 0 and 3600")
    try:
        halt, already = client.kill(
            _selector(args), args.reason, force=args.force, soft=args.mode == "soft",
            grace=args.grace, drain=args.queue == "drain",
        )  # fmt: skip
    except FailedPrecondition as err:  # the coordinator speaks of the wire's field
        raise FailedPrecondition(str(err).replace("pass force", "add --force")) from err
    if args.output == "json":
        print_json({"halt": halt, "already_halted": already})
    else:
        verb = "already halted" if already else "halted"
        print(f"{verb} {halt.selector.describe()} (halt {halt.id}, revision {halt.revision})")
    return EXIT_OK


def resume(client: AdminClient, args: argparse.Namespace) -> int:
    sel = _selector(args)
    required = _labels("--require-label", args.require_label)
    halt = client.resume(sel, args.reason, require_labels=required)
    narrower = [] if halt else narrower_halts(sel, client.halts(tenant=sel.tenant))
    if args.output == "json":
        print_json({"resumed": halt, "was_halted": halt is not None, "narrower": narrower})
    elif halt:
        only = " only for " + ",".join(f"{k}={v}" for k, v in required.items()) if required else ""
        print(f"resumed {sel.describe()}{only}")
    elif narrower:
        names = "; ".join(
            f"{h.selector.describe()} (`{resume_command(h.selector)}`)" for h in narrower
        )
        print(f"{sel.describe()} was not halted; these narrower halts remain: {names}; "
              "resume them by name")  # fmt: skip
    else:
        print(f"{sel.describe()} was not halted")
    return EXIT_OK


def narrower_halts(sel: Selector, found: list[Halt]) -> list[Halt]:
    """The halts inside ``sel``'s scope, other than ``sel`` itself: what a user who resumed
    ``sel`` and found it not halted most likely meant."""
    return [
        h for h in found
        if h.selector != sel
        and sel.names(h.selector.tenant, h.selector.agent, h.selector.run_id)
        and sel.capability in ("", h.selector.capability)
        and all(h.selector.labels.get(k) == v for k, v in sel.labels.items())
    ]  # fmt: skip


def resume_command(sel: Selector) -> str:
    """The ``tether resume`` that lifts exactly ``sel``."""
    words = ["tether resume"]
    if sel.scope is Scope.GLOBAL:
        words.append("--global")
    elif sel.scope is Scope.TENANT:
        words.append(f"--tenant {sel.tenant}")
    elif sel.scope is Scope.AGENT:
        words.append(f"--agent agent://{sel.tenant}/{sel.agent}")
    else:
        words.append(f"--run {sel.run_id}" + (f" --in-tenant {sel.tenant}" if sel.tenant else ""))
    if sel.capability:
        words.append(f"--capability {sel.capability}")
    words.extend(f"--label {k}={v}" for k, v in sorted(sel.labels.items()))
    return " ".join(words)


def agents(client: AdminClient, args: argparse.Namespace) -> int:
    from tether._types import State

    ended = (State.EXITED, State.STALE)  # listed only with --all or --state
    found = client.agents(**_agent_filter(args), state=State(args.state) if args.state else None)
    if not (args.all or args.state):
        found = [a for a in found if a.state not in ended]
    headers, row = (WIDE_AGENT_HEADERS, wide_agent_row) if args.output == "wide" else (
        AGENT_HEADERS, agent_row)  # fmt: skip
    print_listing(args.output, found, headers, row, no_headers=args.no_headers)
    return EXIT_OK


def halts(client: AdminClient, args: argparse.Namespace) -> int:
    found = client.halts(tenant=args.tenant)
    print_listing(args.output, found, HALT_HEADERS, halt_row, no_headers=args.no_headers)
    return EXIT_OK


def audit(client: AdminClient, args: argparse.Namespace) -> int:
    if args.verify:
        return _verify_audit(client, args)
    from tether._cli._recovery import when

    entries = client.audit(tenant=args.tenant, since=when("--since", args.since), limit=args.limit)
    print_listing(args.output, entries, AUDIT_HEADERS, audit_row, no_headers=args.no_headers)
    return EXIT_OK


def _verify_audit(client: AdminClient, args: argparse.Namespace) -> int:
    intact, count, bad, problem = client.verify_audit()
    if args.output == "json":
        print_json({"intact": intact, "entries": count, "first_bad_id": bad, "problem": problem})
    elif intact:
        print(f"audit intact: {count} entries, hash chain verified")
    if not intact:
        where = f" at entry {bad}" if bad else ""
        return fail(EXIT_ERROR, f"audit chain broken{where}: {problem}")
    return EXIT_OK


def watch(client: AdminClient, args: argparse.Namespace) -> int:
    events = client.watch(**_agent_filter(args), snapshot=not args.no_snapshot, progress=False)
    for seen, event in enumerate(events, start=1):
        print_event(event, args.output)
        if args.count and seen >= args.count:
            break
    return EXIT_OK


def _seconds(flag: str, raw: str) -> float:
    """``30m``, ``24h``, ``7d``, ``90s`` or plain seconds."""
    from tether._cli._recovery import age

    if (duration := age(raw)) is not None:
        return duration.total_seconds()
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"{flag} {raw!r}: use a duration such as 30m, 24h or 7d") from None


def token(client: AdminClient, args: argparse.Namespace) -> int:
    ttl = _seconds("--ttl", args.ttl) if args.ttl else None
    issued = client.issue_agent_token(args.tenant, agent=args.agent, ttl=ttl)
    if args.output == "json":
        print_json(issued)
    else:
        print(issued.token)
    return EXIT_OK


def whoami(client: AdminClient, args: argparse.Namespace) -> int:
    me = client.whoami()
    if args.output == "json":
        print_json(me)
        return EXIT_OK
    print(f"{me.id} ({me.kind})")
    if me.role:
        print(f"role {me.role} of {', '.join(me.tenants)}")
    else:
        print("no role: this identity may not read or operate the fleet")
    return EXIT_OK


def permit_key(client: AdminClient, args: argparse.Namespace) -> int:
    pem, key_id = client.permit_key()
    if args.output == "json":
        print_json({"public_key_pem": pem, "key_id": key_id})
    else:
        print(pem, end="")
    return EXIT_OK


Verb = Callable[["AdminClient", argparse.Namespace], int]


def _from(module: str, name: str) -> Verb:
    """A verb that lives in ``tether._cli.MODULE``, imported when it runs."""

    def run(client: AdminClient, args: argparse.Namespace) -> int:
        verb: Verb = getattr(importlib.import_module(f"tether._cli.{module}"), name)
        return verb(client, args)

    return run


ADMIN_VERBS: dict[str, Verb] = {
    "kill": kill,
    "resume": resume,
    "agents": agents,
    "halts": halts,
    "audit": audit,
    "watch": watch,
    "effects": _from("_recovery", "effects"),
    "compensate": _from("_recovery", "compensate"),
    "permit-key": permit_key,
    "token": token,
    "whoami": whoami,
    "policy": _from("_protect_verbs", "policy"),
    "breakers": _from("_protect_verbs", "breakers"),
}
